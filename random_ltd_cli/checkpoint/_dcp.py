"""torch.distributed.checkpoint (DCP) folders, as FSDP, torchtitan and Accelerate write them.

Layout written by ``torch.distributed.checkpoint.save(state_dict, checkpoint_id=dir)``::

    dir/.metadata        a pickled ``Metadata``: every entry's name, dtype, shape and chunks,
                         where each chunk lives, and how flat names map back to nested dicts
    dir/__0_0.distcp     the bytes of rank 0's chunks (no names inside)
    dir/__1_0.distcp     ...

Names live only in ``.metadata``: the keys of ``state_dict_metadata``, the ``fqn`` of every
``MetadataIndex`` in ``storage_data``, and the keys and path elements of ``planner_data``
(``"model.h.1.random_ltd_layer.w" -> ("model", "h.1.random_ltd_layer.w")``). Stripping rewrites
those strings in the pickle (read by :mod:`._pickle`, never executed) and copies every
``.distcp`` file as bytes. Inspecting reads ``.metadata`` only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import (
    CheckpointError,
    KeyCollisionError,
    LimitExceededError,
    MalformedCheckpointError,
    UnsafePickleError,
)
from ..keys import SEGMENT, rename_keys, strip_key
from ._atomic import atomic_dir, new_file
from ._common import TensorInfo
from ._io import Progress, copy_range, pread_exact, write_all
from ._pickle import (
    Global,
    Instance,
    Parsed,
    PickleError,
    PickleLimitError,
    PStr,
    describe,
    mapping_items,
    parse,
    substitute,
)
from ._torch import is_safe_global, printable
from ._torch_names import size_shape, walk

__all__ = ["CONSOLIDATE_HINT", "METADATA", "DcpPlan", "is_dcp_dir", "plan_strip", "scan", "write_copy"]

METADATA = ".metadata"
MAX_METADATA = 32 << 20
"""Bytes of ``.metadata`` read (a few hundred bytes per tensor chunk)."""
CONSOLIDATE_HINT = (
    "consolidate it with torch's tool (python -m torch.distributed.checkpoint.format_utils dcp_to_torch DIR OUT.pt)"
)


def is_dcp_dir(root: Path) -> bool:
    """Whether ``root`` holds a DCP checkpoint: a ``.metadata`` file and at least one ``*.distcp`` file."""
    if not (root / METADATA).is_file():
        return False
    return any(p.suffix == ".distcp" and p.is_file() for p in root.iterdir())


@dataclass
class _Entries:
    """What ``.metadata`` says, with the strings that carry names."""

    parsed: Parsed
    data: bytes
    tensors: list[TensorInfo] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # non-tensor entries (bytes: step counters, RNG...)
    keys: list[PStr] = field(default_factory=list)  # state_dict_metadata keys, in file order
    fqns: list[Any] = field(default_factory=list)  # MetadataIndex.fqn strings of storage_data
    planner: list[tuple[Any, Any]] = field(default_factory=list)  # planner_data: flat name -> path tuple
    files: list[str] = field(default_factory=list)  # .distcp files storage_data points to
    version: Any = None


def _state(node: Any) -> dict[Any, Any]:
    """The attribute dict of a pickled dataclass instance (``NEWOBJ`` + ``BUILD``)."""
    state = node.state if isinstance(node, Instance) else None
    return dict(mapping_items(state) or ())


def _read(root: Path, *, trust_pickle: bool) -> _Entries:
    path = root / METADATA
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        if size > MAX_METADATA:
            raise LimitExceededError(
                f"{path} is {size} bytes; this reader stops at {MAX_METADATA >> 20} MiB of DCP metadata. "
                f"To read the checkpoint, {CONSOLIDATE_HINT.replace('DIR', str(root))}."
            )
        data = pread_exact(fd, size, 0)
    except EOFError as exc:
        raise MalformedCheckpointError(f"{path} changed while it was read; retry when nothing writes to it.") from exc
    finally:
        os.close(fd)
    try:
        parsed = parse(data)
    except PickleLimitError as exc:
        raise LimitExceededError(f"{path} exceeds a safety limit of this reader: {exc}.") from exc
    except PickleError as exc:
        raise MalformedCheckpointError(f"{path} is truncated or corrupted: {exc}. Re-save the checkpoint.") from exc
    unsafe = sorted({printable(g.qualname) for g in parsed.globals if not is_safe_global(g.qualname, dcp=True)})
    if unsafe and not trust_pickle:
        raise UnsafePickleError(
            f"{path} names Python globals that DCP metadata does not use: {', '.join(unsafe[:20])}. random-ltd "
            "never runs them, but torch would when loading it. Only if you trust its source, pass --trust-pickle."
        )
    root_node = parsed.root
    if not (isinstance(root_node, Instance) and root_node.is_call_to("torch.distributed.checkpoint.metadata.Metadata")):
        raise CheckpointError(f"{path} is not torch.distributed.checkpoint metadata (no Metadata record).")
    return _entries(path, parsed, data)


def _entries(path: Path, parsed: Parsed, data: bytes) -> _Entries:
    meta = _state(parsed.root)
    found = _Entries(parsed, data, version=meta.get("version"))
    for node in walk(parsed.root):  # tensor sizes, chunk offsets and sizes: unpickling builds torch.Size(<ints>)
        if isinstance(node, Instance) and node.is_call_to("torch.Size") and not (
            isinstance(node.args, tuple) and len(node.args) == 1 and isinstance(node.args[0], tuple | list)
            and all(isinstance(d, int) for d in node.args[0])
        ):
            raise MalformedCheckpointError(
                f"{path}: a tensor size is not a list of integers; the metadata is corrupted."
            )
    entries = mapping_items(meta.get("state_dict_metadata"))
    if entries is None:  # dcp.load iterates over it
        raise MalformedCheckpointError(f"{path} has no state_dict_metadata map; the metadata is corrupted.")
    for name, entry in entries:
        if not isinstance(name, PStr):
            raise MalformedCheckpointError(
                f"{path}: an entry name is not a string ({describe(name)}); the metadata is corrupted."
            )
        found.keys.append(name)
        fields = _state(entry)
        if "size" in fields and "properties" in fields:
            props = fields["properties"].state if isinstance(fields["properties"], Instance) else None
            dtype = props[0] if isinstance(props, tuple) and props else None
            dtype_name = dtype.name if isinstance(dtype, Global) and dtype.module == "torch" else "unknown"
            found.tensors.append(TensorInfo(str(name), dtype_name, size_shape(fields["size"])))
        else:
            found.other.append(str(name))
    for index, info in mapping_items(meta.get("storage_data")) or ():
        fqn = _state(index).get("fqn")
        if isinstance(fqn, str):
            found.fqns.append(fqn)
        relative = _state(info).get("relative_path")
        if isinstance(relative, str):
            found.files.append(relative)
    found.planner = list(mapping_items(meta.get("planner_data")) or ())
    found.files = list(dict.fromkeys(found.files))
    for name in found.files:
        pure = PurePosixPath(name)
        if pure.is_absolute() or len(pure.parts) != 1 or name in (".", "..") or "\\" in name or "\0" in name:
            raise CheckpointError(f"{path} points to the data file {describe(name)} outside its folder; refusing it.")
        if not (path.parent / name).is_file():
            raise CheckpointError(
                f"{path} needs the data file {name}, which is missing; copy the whole checkpoint folder and retry."
            )
    return found


def scan(root: Path, *, trust_pickle: bool = False) -> tuple[list[TensorInfo], dict[str, Any], list[str]]:
    """Tensor records (from ``.metadata`` alone), metadata, and the files read."""
    found = _read(root, trust_pickle=trust_pickle)
    metadata: dict[str, Any] = {
        "dcp_version": found.version if isinstance(found.version, str) else None,
        "non_tensor_entries": found.other,
        "data_files": found.files,
        "note": f"a torch.distributed.checkpoint folder sharded over .distcp files; to get one file, "
        f"{CONSOLIDATE_HINT.replace('DIR', str(root))}.",
    }
    return found.tensors, metadata, [METADATA]


@dataclass
class DcpPlan:
    """The stripped ``.metadata`` (the ``.distcp`` files are copied unchanged by the folder writer)."""

    source: Path
    weights: dict[str, str]
    new_metadata: bytes
    changed: bool
    side_count: int

    @property
    def nbytes(self) -> int:
        return len(self.new_metadata)

    def write(self, out: int, progress: Progress | None = None) -> None:
        """Write the stripped ``.metadata`` to the empty file ``out``."""
        write_all(out, self.new_metadata)
        if progress is not None:
            progress.advance(len(self.new_metadata))

    def write_in_place(self, progress: Progress | None = None) -> bool:
        """Never patched in place: the caller writes a new ``.metadata`` and renames it over the old one."""
        return False


def plan_strip(root: Path, *, trust_pickle: bool = False) -> DcpPlan:
    """Compute the stripped ``.metadata``; nothing is written.

    Raises:
        KeyCollisionError: two entries would get the same name.
        UnsafePickleError, CheckpointError: see :func:`scan`; also names that cannot be rewritten.
    """
    path = root / METADATA
    found = _read(root, trust_pickle=trust_pickle)
    try:
        weights = rename_keys(found.keys)
    except KeyCollisionError as exc:
        raise KeyCollisionError(f"{path}: {exc}") from exc
    subs: dict[int, tuple[PStr, str]] = {}
    side = 0

    def add(old: Any, new: str, *, is_side: bool) -> None:
        nonlocal side
        if not isinstance(old, PStr):
            raise CheckpointError(
                f"{path}: the name {describe(old)} is not stored as a plain string; it cannot be renamed."
            )
        if old.pos not in subs:
            subs[old.pos] = (old, new)
            side += is_side

    for old, new in weights.items():
        if new != old:
            add(old, new, is_side=False)
    for fqn in found.fqns:
        if strip_key(fqn) != fqn:
            add(fqn, strip_key(fqn), is_side=False)
    for flat, route in found.planner:
        if isinstance(flat, str) and strip_key(flat) != flat:
            add(flat, strip_key(flat), is_side=False)
        for part in route if isinstance(route, tuple) else ():
            if part == SEGMENT:
                raise CheckpointError(
                    f"{path}: the entry {describe(flat)} nests a dict under the key {SEGMENT!r}; strip cannot rename "
                    "a nesting level. Load the checkpoint, rename it in Python, and save it again."
                )
            if isinstance(part, str) and strip_key(part) != part:
                add(part, strip_key(part), is_side=True)
    try:
        content = substitute(found.data, 0, subs.values(), found.parsed.frames)
    except PickleError as exc:
        raise CheckpointError(f"{path}: {exc}; load the checkpoint with torch and save it again.") from exc
    return DcpPlan(path, {str(k): v for k, v in weights.items()}, content, bool(subs), side)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_copy(plan: DcpPlan, dst: Path, progress: Progress | None = None) -> None:
    """Write the stripped folder to ``dst``: every other file copied as bytes, the new ``.metadata`` last.

    The data files are all copied before any is flushed, then flushed together (as ``cp -r`` and
    ``sync`` would): the kernel writes them back while later files are still being copied, instead
    of one file at a time. The folder appears at ``dst`` only once everything is on disk.
    """
    root = plan.source.parent
    with atomic_dir(dst) as tmp:
        copied: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            rel_dir = here.relative_to(root)
            (tmp / rel_dir).mkdir(exist_ok=True)
            for name in [*dirnames, *filenames]:
                src, out = here / name, tmp / rel_dir / name
                if src.is_symlink() and not src.is_file():  # a linked folder or a dangling link: keep the link
                    os.symlink(os.readlink(src), out)
                elif src == plan.source or not src.is_file():
                    continue
                else:
                    _copy(src, out, progress)
                    copied.append(out)
        for path in copied:
            _fsync(path)
        with new_file(tmp / METADATA, mode_like=plan.source) as fd:
            plan.write(fd, progress)


def _copy(src: Path, out: Path, progress: Progress | None) -> None:
    mode = os.stat(src).st_mode & 0o777
    fd_in = os.open(src, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
        try:
            copy_range(fd_in, fd_out, 0, 0, os.fstat(fd_in).st_size, progress)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
