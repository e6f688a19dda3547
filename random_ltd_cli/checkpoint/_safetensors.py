"""``.safetensors`` files: read and rewrite the JSON header, stream the tensor bytes unchanged.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{"name": {"dtype", "shape", "data_offsets"}, ..., "__metadata__": {str: str}}``), then
the tensor data. Stripping only shortens names, so the new header is padded with spaces
(which JSON and the format allow) to the old length: the data keeps its offset and is
copied by the kernel, or, with ``--in-place``, not touched at all.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, KeyCollisionError
from ..keys import rename_keys, strip_key
from ._atomic import patch_in_place
from ._common import TensorInfo, plain_metadata
from ._copy import copy_patched, size_changed
from ._io import Progress, copy_range, write_at

__all__ = ["Header", "SafetensorsPlan", "plan_strip", "read_header", "scan"]

MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too
METADATA = "__metadata__"

# safetensors dtype -> (torch-style name, bits per element)
DTYPES = {
    "BOOL": ("bool", 8), "U8": ("uint8", 8), "I8": ("int8", 8), "F8_E5M2": ("float8_e5m2", 8),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E8M0": ("float8_e8m0fnu", 8), "I16": ("int16", 16),
    "U16": ("uint16", 16), "F16": ("float16", 16), "BF16": ("bfloat16", 16), "I32": ("int32", 32),
    "U32": ("uint32", 32), "F32": ("float32", 32), "F64": ("float64", 64), "I64": ("int64", 64),
    "U64": ("uint64", 64), "C64": ("complex64", 64), "F4": ("float4_e2m1fn_x2", 4),
    "F6_E2M3": ("float6_e2m3fn", 6), "F6_E3M2": ("float6_e3m2fn", 6),
}  # fmt: skip


@dataclass
class Header:
    """A parsed and checked safetensors header."""

    length: int
    entries: dict[str, Any]  # in file order, "__metadata__" included
    file_size: int
    raw: bytes  # the 8-byte length and the JSON as stored

    @property
    def data_start(self) -> int:
        return 8 + self.length

    @property
    def tensor_names(self) -> list[str]:
        return [k for k in self.entries if k != METADATA]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.entries.get(METADATA) or {})


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file: {what}. It may be truncated or corrupted; re-download or re-save it."
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_header(path: Path) -> Header:
    """Read and check the header of ``path``; no tensor data is read.

    Raises:
        CheckpointError: truncated file, malformed JSON, or entries that do not fit the data.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _bad(path, f"the file has only {size} bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER or 8 + length > size:
            raise _bad(path, f"the header claims {length} bytes but the file has {size}")
        raw = f.read(length)
    try:
        entries = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise _bad(path, f"the header is not JSON ({exc})") from exc
    if not isinstance(entries, dict):
        raise _bad(path, "the header is not a JSON object")
    header = Header(length, entries, size, prefix + raw)
    _check_entries(path, header)
    return header


def _check_entries(path: Path, header: Header) -> None:
    data_len = header.file_size - header.data_start
    meta = header.entries.get(METADATA)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _bad(path, "__metadata__ must map strings to strings")
    for name in header.tensor_names:
        info = header.entries[name]
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            valid = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
            valid = valid and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise _bad(path, f"the entry for {name!r} is malformed")
        if end > data_len:
            raise _bad(path, f"tensor {name!r} ends at byte {end} of the data, which has only {data_len} bytes")
        bits = DTYPES.get(dtype, (dtype, 0))[1]
        numel = 1
        for d in shape:
            numel *= d
        if bits and numel * bits != (end - begin) * 8:
            raise _bad(path, f"tensor {name!r} has {end - begin} bytes, not the {numel * bits // 8} its shape needs")


def scan(path: Path) -> tuple[list[TensorInfo], dict[str, Any]]:
    """Tensor names, dtypes and shapes, and ``__metadata__`` (its ``random_ltd`` entry parsed)."""
    header = read_header(path)
    tensors = [
        TensorInfo(name, DTYPES.get(header.entries[name]["dtype"], (header.entries[name]["dtype"], 0))[0],
                   tuple(header.entries[name]["shape"]))
        for name in header.tensor_names
    ]  # fmt: skip
    return tensors, plain_metadata(header.metadata)


def _renamed_metadata(header: Header, names: dict[str, str]) -> tuple[dict[str, str], int]:
    """Rename alias entries (``{removed_name: kept_name}``, as safetensors' ``save_model`` writes)."""
    meta = header.metadata
    renamed = 0
    out: dict[str, str] = {}
    for key, value in meta.items():
        new_key, new_value = key, value
        if value in names:  # an alias entry: both sides are tensor names
            new_key, new_value = strip_key(key), names[value]
        if new_key in out or (new_key != key and new_key in meta):
            raise KeyCollisionError(
                f"metadata entries {key!r} and {new_key!r} would both be named {new_key!r} after stripping; "
                "remove one of them from __metadata__ and retry."
            )
        renamed += (new_key, new_value) != (key, value)
        out[new_key] = new_value
    return out, renamed


@dataclass
class SafetensorsPlan:
    """A stripped header ready to be written; the tensor bytes are copied as they are."""

    source: Path
    header: Header
    names: dict[str, str]
    renamed_metadata: int
    new_header: bytes  # 8-byte length + JSON (+ spaces)

    @property
    def weights(self) -> dict[str, str]:
        return self.names

    @property
    def side_count(self) -> int:
        return self.renamed_metadata

    @property
    def changed(self) -> bool:
        return any(k != v for k, v in self.weights.items()) or self.side_count > 0

    @property
    def nbytes(self) -> int:
        return len(self.new_header) + self.header.file_size - self.header.data_start

    def write(self, out: int, progress: Progress | None = None) -> None:
        """Write the stripped file to the empty ``out``.

        When the new header has the old length (always, unless re-encoding made it longer),
        the whole input is copied from offset 0 (page-aligned, or shared extents) and the
        header overwritten; otherwise the header is written and the data copied after it.
        """
        if len(self.new_header) == self.header.data_start:
            copy_patched(self.source, out, [(0, self.new_header)], size=self.header.file_size, progress=progress)
            return
        write_at(out, self.new_header, 0)
        if progress is not None:
            progress.advance(len(self.new_header))
        data_len = self.header.file_size - self.header.data_start
        src = os.open(self.source, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            if os.fstat(src).st_size != self.header.file_size:
                raise size_changed(self.source)
            copy_range(src, out, self.header.data_start, len(self.new_header), data_len, progress)
        finally:
            os.close(src)

    def write_in_place(self, progress: Progress | None = None) -> bool:
        """Overwrite only the header when the data offset is unchanged; False if that is impossible."""
        if len(self.new_header) != self.header.data_start:
            return False
        patch_in_place(self.source, 0, self.new_header)
        if progress is not None:
            progress.advance(progress.total)
        return True


def plan_strip(path: Path) -> SafetensorsPlan:
    """Read the header of ``path`` and build the stripped one; nothing is written.

    Raises:
        KeyCollisionError: two tensor names (or metadata aliases) would become one.
        CheckpointError: the file is not a valid safetensors file.
    """
    path = Path(path)
    header = read_header(path)
    try:
        names = rename_keys(header.tensor_names)
        meta, side = _renamed_metadata(header, names)
    except KeyCollisionError as exc:
        raise KeyCollisionError(f"{path}: {exc}") from exc
    if side == 0 and all(k == v for k, v in names.items()):
        return SafetensorsPlan(path, header, names, 0, header.raw)  # nothing to strip: a byte-for-byte copy
    entries = {(METADATA if k == METADATA else names[k]): v for k, v in header.entries.items()}
    if METADATA in entries:
        entries[METADATA] = meta
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    length = header.length if len(text) <= header.length else (len(text) + 7) // 8 * 8
    new_header = struct.pack("<Q", length) + text + b" " * (length - len(text))
    return SafetensorsPlan(path, header, names, side, new_header)
