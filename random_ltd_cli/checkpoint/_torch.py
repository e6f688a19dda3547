"""torch checkpoints (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), read and stripped without unpickling.

Both layouts torch.save has used are supported:

* **zip** (torch >= 1.6): the pickled structure is the ``<archive>/data.pkl`` record and each
  tensor storage is a ``<archive>/data/<key>`` record. Stripping copies the file as it is
  and rewrites only ``data.pkl`` (and its CRC and sizes), so tensor bytes are never read.
* **legacy** (``_use_new_zipfile_serialization=False``): four pickles, then the raw storages.
  Stripping rewrites the fourth pickle and copies everything around it.

The pickle is read by :mod:`._pickle`, which never imports or calls anything. A file whose
pickle names a global outside torch's ``weights_only`` allowlist is refused unless the
caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import contextlib
import os
import re
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    CheckpointError,
    KeyCollisionError,
    LimitExceededError,
    MalformedCheckpointError,
    UnsafePickleError,
)
from ._allowlist import is_engine_global
from ._common import TensorInfo, plain_metadata
from ._copy import copy_patched
from ._io import Progress, copy_range, write_at
from ._pickle import (
    Global,
    Instance,
    Parsed,
    PickleError,
    PickleLimitError,
    describe,
    mapping_items,
    parse,
    substitute,
)
from ._torch_checks import ITEMSIZE, check_loaded_ids, check_small_records, check_tensors, storages
from ._torch_legacy import MAX_PICKLE, read_legacy
from ._torch_names import REBUILD_CALLS, TreeRenames, main_state_dict, plan_renames, tensor_meta
from ._zip import ZipError, ZipLimitError, ZipRecord, check_deflated, patch_record, read_directory, read_record

__all__ = [
    "TorchFile", "TorchPlan", "is_safe_global", "plan_strip", "printable", "read_torch", "reuse_reads", "scan",
]  # fmt: skip

ZIP_MAGIC = b"PK\x03\x04"
MAX_DEFLATED = 2 << 30  # torch.save never compresses tensor records; compressed ones are checked up to this size

_SAFE = frozenset(
    {
        "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device", "_codecs.encode",
        "builtins.bytearray", "builtins.set", "builtins.complex", "torch._tensor._rebuild_from_type_v2",
        "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
        "torch.per_tensor_affine", "torch.per_tensor_symmetric", "torch.per_channel_affine",
        "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
    }
    | REBUILD_CALLS
)  # fmt: skip
_SAFE_PATTERNS = (
    re.compile(r"torch(\.cuda)?\.[A-Za-z0-9]+Storage"),
    re.compile(r"torch(\.cuda)?(\.sparse)?\.[A-Za-z0-9]+Tensor"),
    re.compile(r"torch\.(u?int[1-7]|u?int(8|16|32|64)|float(16|32|64)|bfloat16|bool|complex(32|64|128)"
               r"|float8_\w+|float4_\w+|q(u)?int\w+|bits\w+)"),
)  # fmt: skip


def canonical(qualname: str) -> str:
    """The Python 3 name of a global (protocol-2 pickles spell ``builtins`` as ``__builtin__``...)."""
    module, _, name = qualname.rpartition(".")
    module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    return f"{module}.{name}"


DCP_GLOBALS = frozenset(
    {f"torch.distributed.checkpoint.metadata.{name}" for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )}
    | {"torch.distributed.checkpoint.filesystem._StorageInfo", "torch.distributed.checkpoint.planner.LoadItemType",
       "torch.distributed.checkpoint.planner.WriteItemType", "pathlib.PosixPath", "pathlib.WindowsPath",
       "pathlib.PurePosixPath", "pathlib.PureWindowsPath"}
)  # fmt: skip
"""What ``torch.distributed.checkpoint.save`` writes into ``.metadata`` besides torch's tensor allowlist."""


def is_safe_global(qualname: str, *, dcp: bool = False) -> bool:
    """Whether ``torch.load(weights_only=True)`` allows this global (mirrors torch's allowlist), or it is one
    of the inert engine classes of :mod:`._allowlist` (the loader stands in for those), by exact name.

    ``dcp=True`` also allows the exact names DCP's ``.metadata`` uses (``dcp.load`` unpickles it unrestricted).
    """
    full = canonical(qualname)
    if dcp and full in DCP_GLOBALS:
        return True
    return full in _SAFE or any(p.fullmatch(full) for p in _SAFE_PATTERNS) or is_engine_global(full)


@dataclass
class TorchFile:
    """A parsed torch checkpoint: its main pickle, where that pickle lives, and the archive records."""

    path: Path
    kind: str  # "zip" or "legacy"
    parsed: Parsed
    pickle: bytes
    size: int
    record: ZipRecord | None = None
    records: dict[str, ZipRecord] = field(default_factory=dict)
    globals: list[Global] = field(default_factory=list)  # of every pickle in the file, in order


WEIGHTS_ONLY_OPCODES = frozenset(
    {
        "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE",
        "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT",
        "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID",
        "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP",
    }
)  # fmt: skip
"""The opcodes torch's weights-only unpickler executes (torch/_weights_only_unpickler.py); others it refuses."""


class _Guard:
    """Collects the globals of every pickle read from one file and refuses unsafe ones at once."""

    def __init__(self, path: Path, trust_pickle: bool) -> None:
        self.path, self.trust, self.seen = path, trust_pickle, dict[tuple[str, str], Global]()

    def __call__(self, parsed: Parsed) -> Parsed:
        for g in parsed.globals:
            self.seen.setdefault((g.module, g.name), g)
        if not self.trust:
            _refuse_unsafe(self.path, parsed.globals)
            other = sorted(parsed.opcodes - WEIGHTS_ONLY_OPCODES)
            if other:
                raise UnsafePickleError(
                    f"{self.path} uses pickle opcodes that torch.load(weights_only=True) does not read: "
                    f"{', '.join(other)} (a pickle protocol above 2, or a hand-made pickle). Loading it needs "
                    "weights_only=False; only if you trust its source, pass --trust-pickle (trust_pickle=True)."
                )
        return parsed


def printable(name: str, limit: int = 120) -> str:
    """``name`` on one line, control and surrogate characters escaped, cut at ``limit`` characters."""
    text = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_unsafe(path: Path, found: list[Global]) -> None:
    unsafe = sorted({canonical(g.qualname) for g in found if not is_safe_global(g.qualname)})
    if unsafe:
        shown = ", ".join(printable(name) for name in unsafe[:20]) + (" ..." if len(unsafe) > 20 else "")
        raise UnsafePickleError(
            f"{path} needs Python globals that torch.load(weights_only=True) refuses: {shown}. "
            "random-ltd never runs them, but such a file can run code when loaded with torch. "
            "Only if you trust its source, pass --trust-pickle (trust_pickle=True)."
        )


def read_torch(path: Path, *, trust_pickle: bool = False) -> TorchFile:
    """Parse the checkpoint's structure (never its tensor data) and check the globals of every pickle in it.

    Raises:
        UnsafePickleError: a pickle names globals outside the allowlist and ``trust_pickle`` is false.
        LimitExceededError: the file exceeds a reader limit (pickle size, nesting, records).
        MalformedCheckpointError: truncated, corrupted or inconsistent file.
        CheckpointError: not a torch checkpoint.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, trust_pickle)
        if _cache.depth and _cache.last is not None and _cache.last[0] == key:
            return _cache.last[1]
        _cache.last = None  # never hold two parsed files at once (the memory budget counts one)
        tf = _read(path, fd, st.st_size, _Guard(path, trust_pickle))
    finally:
        os.close(fd)
    if _cache.depth:
        _cache.last = (key, tf)
    return tf


class _Cache:
    depth = 0
    last: tuple[tuple[Any, ...], TorchFile] | None = None


_cache = _Cache()


@contextlib.contextmanager
def reuse_reads() -> Iterator[None]:
    """Within this block, reading the same unchanged file again returns the first parse (inspect reads a
    file up to three times); outside it every call parses afresh."""
    _cache.depth += 1
    try:
        yield
    finally:
        _cache.depth -= 1
        if not _cache.depth:
            _cache.last = None


def _read(path: Path, fd: int, size: int, guard: _Guard) -> TorchFile:
    head = os.pread(fd, 4, 0)
    try:
        if head == ZIP_MAGIC:
            tf = _read_zip(path, fd, size, guard)
        elif head[:1] == b"\x80":
            parsed, data = read_legacy(path, fd, size, guard)
            tf = TorchFile(path, "legacy", parsed, data, size)
        else:
            raise CheckpointError(f"{path} is not a torch checkpoint (no ZIP or pickle signature).")
    except (ZipLimitError, PickleLimitError) as exc:
        raise LimitExceededError(
            f"{path} exceeds a safety limit of this reader: {exc}. random-ltd refuses such files without reading "
            "further; if it is genuine, load it with torch where you trust it and save a smaller structure."
        ) from exc
    except (ZipError, PickleError, EOFError) as exc:
        raise MalformedCheckpointError(
            f"{path} is a truncated or corrupted torch checkpoint: {exc}. Re-save or re-download it."
        ) from exc
    tf.globals = list(guard.seen.values())
    return tf


def _read_zip(path: Path, fd: int, size: int, guard: _Guard) -> TorchFile:
    records = read_directory(fd)
    if any(name.endswith("/constants.pkl") for name in records):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a torch.save checkpoint.")
    pickles = [name for name in records if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"{path} is a ZIP archive but not a torch.save checkpoint (no <archive>/data.pkl).")
    record = records[pickles[0]]
    prefix = record.name[: -len("data.pkl")]
    strays = [name for name in records if not name.startswith(prefix)]
    if strays:
        raise ZipError(f"the record {strays[0]!r} lies outside the archive folder {prefix!r}")
    check_small_records(fd, records, prefix)
    data = read_record(fd, record, limit=MAX_PICKLE)
    parsed = guard(parse(data))
    calls: list[Instance] = []
    found = storages([parsed.root, parsed.persistents], calls)  # every persistent id loaded, reachable or not
    check_loaded_ids(parsed.persistents, width=5)
    check_tensors(calls, found)
    for key, (type_name, numel) in found.items():
        rec = records.get(f"{prefix}data/{key}")
        need = numel * ITEMSIZE[type_name]
        if rec is None or rec.usize != need:  # torch.load refuses a record of any other size
            raise ZipError(f"storage record data/{key} is missing or does not hold exactly its {numel} elements")
    deflated = [rec for name, rec in records.items() if name.startswith(f"{prefix}data/") and rec.method != 0]
    if sum(rec.usize for rec in deflated) > MAX_DEFLATED:
        raise ZipLimitError(f"compressed tensor records inflate to more than {MAX_DEFLATED >> 30} GiB")
    for rec in deflated:  # torch.load does not check them: a corrupt one would load as garbage
        check_deflated(fd, rec)
    alignment = records.get(f"{prefix}.storage_alignment")  # torch.load reads it with int()
    if alignment is not None and not read_record(fd, alignment, limit=32).strip().isdigit():
        raise ZipError("the .storage_alignment record is not a number")
    return TorchFile(path, "zip", parsed, data, size, record, records)


# --- inspection -------------------------------------------------------------------------


def scan(path: Path, *, trust_pickle: bool = False) -> tuple[list[TensorInfo], dict[str, Any]]:
    """The model weights' names, dtypes and shapes, and simple top-level metadata."""
    tf = read_torch(path, trust_pickle=trust_pickle)
    tensors = [TensorInfo(str(k), *tensor_meta(v)) for k, v in main_state_dict(tf.parsed.root)]
    metadata: dict[str, Any] = {}
    for key, value in mapping_items(tf.parsed.root) or ():
        if key == "random_ltd":
            _random_ltd_entry(value, metadata)
        elif isinstance(key, str) and isinstance(value, (str, int, float, bool)):
            metadata[str(key)] = _plain(value)
    return tensors, plain_metadata(metadata)


def _random_ltd_entry(value: Any, metadata: dict[str, Any]) -> None:
    """A top-level ``random_ltd`` entry: ours (``{"random_ltd": settings JSON}`` from save_state_dict)
    or DeepSpeed's scheduler state (``{"current_value": 16, ...}``; ``None`` when its random-LTD was off)."""
    saved = mapping_items(value)
    if saved is None:
        if value is not None:
            metadata["random_ltd"] = _plain(value)
        return
    if saved and all(isinstance(k, str) and isinstance(v, str) for k, v in saved):
        metadata.update({str(k): v for k, v in saved})
    else:  # DeepSpeed's RandomLTDScheduler.state_dict(): plain numbers under string keys
        state = {str(k): _plain(v) for k, v in saved if isinstance(k, str) and isinstance(v, (int, float, bool, str))}
        metadata["deepspeed_random_ltd_state"] = state


_MAX_TEXT = 4096  # characters of one metadata string shown by inspect


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a scalar or a short flat list of scalars; anything else, a short description."""
    if isinstance(value, (list, tuple)) and len(value) <= 64 and not any(isinstance(v, (list, tuple)) for v in value):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value) if len(value) <= _MAX_TEXT else f"{value[:_MAX_TEXT]}... ({len(value)} characters)"
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and value.bit_length() <= 64):
        return value
    return describe(value)


def wrapped_side_names(path: Path, *, trust_pickle: bool = False) -> list[str]:
    """Names with a ``random_ltd_layer`` segment outside the state dicts (e.g. DeepSpeed's side tables)."""
    tf = read_torch(path, trust_pickle=trust_pickle)
    try:
        return [old for old, _ in plan_renames(tf.parsed.root).side_renames]
    except ValueError:  # a name stored in a way strip cannot rewrite: strip reports it
        return []


# --- stripping --------------------------------------------------------------------------


@dataclass
class TorchPlan:
    """Everything needed to write a stripped copy; computing it reads no tensor data."""

    source: Path
    tf: TorchFile
    renames: TreeRenames
    new_pickle: bytes
    patches: list[tuple[int, bytes]]  # zip: (offset, bytes) written over the copy

    @property
    def weights(self) -> dict[str, str]:
        return self.renames.weights

    @property
    def side_count(self) -> int:
        return self.renames.side_count

    @property
    def side_renames(self) -> list[tuple[str, str]]:
        return self.renames.side_renames

    @property
    def changed(self) -> bool:
        return bool(self.renames.subs)

    @property
    def nbytes(self) -> int:
        return self.tf.size - (len(self.tf.pickle) - len(self.new_pickle) if self.tf.kind == "legacy" else 0)

    def write(self, out: int, progress: Progress | None = None) -> None:
        """Write the stripped checkpoint to the empty file ``out``.

        zip: the whole input copied from offset 0 (page-aligned, or shared extents), then the
        planned writes over it. legacy: the pickle shrinks, so the storages after it move.
        """
        if self.tf.kind == "zip":
            copy_patched(self.source, out, self.patches, size=self.tf.size, progress=progress)
            return
        src = os.open(self.source, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            start, end = self.tf.parsed.start, self.tf.parsed.end
            copy_range(src, out, 0, 0, start, progress)
            write_at(out, self.new_pickle, start)
            if progress is not None:
                progress.advance(len(self.new_pickle))
            copy_range(src, out, end, start + len(self.new_pickle), self.tf.size - end, progress)
        finally:
            os.close(src)

    def write_in_place(self, progress: Progress | None = None) -> bool:
        """torch files are never patched in place; the caller writes a copy and renames it."""
        return False


def plan_strip(path: Path, *, trust_pickle: bool = False) -> TorchPlan:
    """Parse ``path`` and compute the stripped pickle; nothing is written.

    Raises:
        KeyCollisionError: two names would become one.
        UnsafePickleError, CheckpointError: see :func:`read_torch`.
    """
    tf = read_torch(path, trust_pickle=trust_pickle)
    try:
        renames = plan_renames(tf.parsed.root)
    except KeyCollisionError as exc:
        raise KeyCollisionError(f"{path}: {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    try:
        new = substitute(tf.pickle, tf.parsed.start, renames.subs.values(), tf.parsed.frames)
    except PickleError as exc:
        raise CheckpointError(f"{path}: {exc}; load it with torch and save it again, then retry.") from exc
    patches: list[tuple[int, bytes]] = []
    if tf.kind == "zip" and tf.record is not None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            patches = patch_record(fd, tf.record, new)
        except ZipError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        finally:
            os.close(fd)
    return TorchPlan(Path(path), tf, renames, new, patches)
