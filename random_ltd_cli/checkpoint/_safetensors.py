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

from ..errors import KeyCollisionError, LimitExceededError, MalformedCheckpointError
from ..keys import rename_keys, strip_key
from ._atomic import patch_in_place
from ._common import TensorInfo, plain_metadata
from ._copy import copy_patched, size_changed
from ._fs import open_file
from ._io import Progress, copy_range, pread_exact, write_at
from ._jsonio import parse, read_json_bytes

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
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "F6_E2M3": ("float6_e2m3fn", 6), "F6_E3M2": ("float6_e3m2fn", 6),
}  # fmt: skip


@dataclass
class Header:
    """A parsed and checked safetensors header."""

    length: int
    entries: dict[str, Any]  # in file order, "__metadata__" included
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.length

    @property
    def tensor_names(self) -> list[str]:
        return [k for k in self.entries if k != METADATA]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.entries.get(METADATA) or {})


def _bad(path: Path, what: str) -> MalformedCheckpointError:
    return MalformedCheckpointError(
        f"{path} is not a valid safetensors file: {what}. It may be truncated or corrupted; re-download or re-save it."
    )


def read_header(path: Path) -> Header:
    """Read and check the header of ``path`` by the format's rules; no tensor data is read.

    Checked: the 8-byte length (at least 2, at most :data:`MAX_HEADER`, inside the file), UTF-8
    JSON object of bounded size, depth and memory (:mod:`._jsonio`), known dtypes, shapes of
    non-negative integers, each extent equal to shape x element size, extents contiguous from 0
    to the end of the file (no gap, no overlap), ``__metadata__`` a map of strings to strings.

    Raises:
        MalformedCheckpointError: any rule broken.
        LimitExceededError: a header too large to read within the memory budget.
        UnsupportedFileTypeError: not a regular file.
    """
    path = Path(path)
    fd = open_file(path)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise _bad(path, f"the file has only {size} bytes")
        (length,) = struct.unpack("<Q", pread_exact(fd, 8, 0))
        if length > MAX_HEADER:
            raise LimitExceededError(
                f"{path}: the safetensors header claims {length} bytes, more than the {MAX_HEADER} the format "
                "allows; the file is corrupted or not a safetensors file."
            )
        if length < 2 or 8 + length > size:
            raise _bad(path, f"the header claims {length} bytes but the file has {size}")
        raw = read_json_bytes(fd, 8, length, f"{path} (safetensors): the header")
    except (OSError, EOFError) as exc:
        raise _bad(path, f"it cannot be read ({exc})") from exc
    finally:
        os.close(fd)
    try:
        entries = parse(raw, "the header")
    except MalformedCheckpointError as exc:
        raise _bad(path, str(exc).rstrip(".")) from None
    except LimitExceededError as exc:
        raise LimitExceededError(f"{path} (safetensors): {exc}") from None
    del raw
    if not isinstance(entries, dict):
        raise _bad(path, "the header is not a JSON object")
    header = Header(length, entries, size)
    _check_entries(path, header)
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _extent(path: Path, name: str, info: Any) -> tuple[int, int]:
    """The ``(begin, end)`` of one tensor entry, checked against its dtype and shape."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError):
        raise _bad(path, f"the entry for {name!r} lacks dtype, shape or data_offsets") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad(path, f"tensor {name!r} has the unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _bad(path, f"tensor {name!r} has the shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise _bad(path, f"tensor {name!r} has data_offsets [{begin}, {end}], which end before they begin")
    width = DTYPES[dtype][1]
    if width < 8 and (not shape or shape[-1] * width % 8):  # 4- and 6-bit types pack whole bytes per row
        raise _bad(path, f"tensor {name!r} of the {width}-bit dtype {dtype} has the shape {shape}, whose last "
                         "dimension does not fill whole bytes")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * width
    if bits != (end - begin) * 8:
        raise _bad(path, f"tensor {name!r} has {end - begin} bytes, not the {bits / 8:g} its shape and dtype need")
    return begin, end


def _check_entries(path: Path, header: Header) -> None:
    data_len = header.file_size - header.data_start
    meta = header.entries.get(METADATA)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _bad(path, "__metadata__ must map strings to strings")
    extents = sorted((_extent(path, name, header.entries[name]), name) for name in header.tensor_names)
    position, previous = 0, None
    for (begin, end), name in extents:
        if end > data_len:
            raise _bad(path, f"tensor {name!r} ends at byte {end} of the data, which has only {data_len} bytes")
        if begin != position:
            what = f"overlaps {previous!r}" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise _bad(path, f"tensor {name!r} at bytes [{begin}, {end}) of the data {what}")
        position, previous = end, name
    if position != data_len:
        raise _bad(path, f"the tensors cover {position} bytes of data, but the file holds {data_len}")


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
    new_header: bytes | None  # 8-byte length + JSON (+ spaces); None: the input's, unchanged

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
        if self.new_header is None:
            return self.header.file_size
        return len(self.new_header) + self.header.file_size - self.header.data_start

    def write(self, out: int, progress: Progress | None = None) -> None:
        """Write the stripped file to the empty ``out``.

        When the new header has the old length (always, unless re-encoding made it longer),
        the whole input is copied from offset 0 (page-aligned, or shared extents) and the
        header overwritten; otherwise the header is written and the data copied after it.
        """
        if self.new_header is None or len(self.new_header) == self.header.data_start:
            writes = [] if self.new_header is None else [(0, self.new_header)]
            copy_patched(self.source, out, writes, size=self.header.file_size, progress=progress)
            return
        write_at(out, self.new_header, 0)
        if progress is not None:
            progress.advance(len(self.new_header))
        data_len = self.header.file_size - self.header.data_start
        src = open_file(self.source)
        try:
            if os.fstat(src).st_size != self.header.file_size:
                raise size_changed(self.source)
            copy_range(src, out, self.header.data_start, len(self.new_header), data_len, progress)
        finally:
            os.close(src)

    def write_in_place(self, progress: Progress | None = None) -> bool:
        """Overwrite only the header when the data offset is unchanged; False if that is impossible."""
        if self.new_header is None:
            return True
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
        return SafetensorsPlan(path, header, names, 0, None)  # nothing to strip: a byte-for-byte copy
    entries = {(METADATA if k == METADATA else names[k]): v for k, v in header.entries.items()}
    if METADATA in entries:
        entries[METADATA] = meta
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    length = header.length if len(text) <= header.length else (len(text) + 7) // 8 * 8
    new_header = b"".join((struct.pack("<Q", length), text, b" " * (length - len(text))))  # one copy, not two
    return SafetensorsPlan(path, header, names, side, new_header)
