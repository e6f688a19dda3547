"""Checkpoint folders (Hugging Face and DeepSpeed): plan every file first, then write.

Planning reads each weights file's structure and every index, and checks all renames for
collisions, before a byte is written. Writing builds the whole new folder under a
temporary name beside the destination and renames it into place at the end; in place,
each file is replaced atomically and the shard indexes come last, so an interrupted run
can be finished by running the same command again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, MalformedCheckpointError
from ..keys import strip_key
from . import _dcp
from ._adapter import check_adapter_config
from ._atomic import atomic_dir, atomic_file, new_file
from ._common import FilePlan, TensorInfo
from ._copy import copy_file
from ._deepspeed_dir import deepspeed_files, pipeline_prefix, scan_deepspeed
from ._detect import detect_format, file_format, plan_file, scan_file
from ._hf_dir import hf_weight_files, indexes, renamed_index
from ._io import Progress, write_all
from ._run import run_entries

__all__ = ["DirPlan", "RunEntry", "plan_dir", "plan_run", "scan_dir", "write_dir", "write_dir_in_place"]


@dataclass
class DirPlan:
    """The stripped form of every weights file and index in a folder."""

    format: str
    source: Path
    files: dict[str, FilePlan] = field(default_factory=dict)  # relative path -> plan
    rewrites: dict[str, bytes] = field(default_factory=dict)  # relative path -> new content (indexes)
    weights: dict[str, str] = field(default_factory=dict)

    @property
    def side_count(self) -> int:
        return sum(p.side_count for p in self.files.values())

    @property
    def side_renames(self) -> list[tuple[str, str]]:
        pairs = (pair for p in self.files.values() for pair in getattr(p, "side_renames", ()))
        return list(dict.fromkeys(pairs))

    @property
    def changed(self) -> bool:
        return bool(self.rewrites) or any(p.changed for p in self.files.values())

    def nbytes(self, *, in_place: bool) -> int:
        """Bytes to write: only changed files in place; everything (copies included) otherwise."""
        if in_place:
            return sum(p.nbytes for p in self.files.values() if p.changed) + sum(map(len, self.rewrites.values()))
        total = 0
        for dirpath, _, filenames in os.walk(self.source):
            for name in filenames:
                rel = Path(dirpath, name).relative_to(self.source).as_posix()
                plan = self.files.get(rel)
                total += plan.nbytes if plan is not None else _size(Path(dirpath, name))
        return total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def plan_dir(root: Path, fmt: str, *, trust_pickle: bool) -> DirPlan:
    """Plan the strip of a Hugging Face or DeepSpeed folder; nothing is written.

    Raises:
        KeyCollisionError: two names would become one (within a file or across a shard index).
        CheckpointError: an unsafe shard name, a missing shard, an unreadable or inconsistent file.
    """
    plan = DirPlan(fmt, root)
    if fmt == "dcp-dir":  # names live only in .metadata; the .distcp files are copied as bytes
        plan.files[_dcp.METADATA] = _dcp.plan_strip(root, trust_pickle=trust_pickle)
        plan.weights = dict(plan.files[_dcp.METADATA].weights)
        return plan
    check_adapter_config(root)  # a PEFT adapter whose config names wrapped modules: refused
    found = indexes(root)
    names = hf_weight_files(root, found) + (deepspeed_files(root) if fmt == "deepspeed-dir" else [])
    for rel in dict.fromkeys(names):
        plan.files[rel] = plan_file(root / rel, trust_pickle=trust_pickle)
        prefix = pipeline_prefix(rel) if fmt == "deepspeed-dir" else ""  # a pipeline layer's names, as its module
        for old, new in plan.files[rel].weights.items():
            plan.weights.setdefault(prefix + old, prefix + new)
    for index in found:
        content, renames = renamed_index(root, index)
        for name, shard in index.weight_map.items():
            shard_names = plan.files[shard].weights
            if name not in shard_names and strip_key(name) not in shard_names.values():
                raise MalformedCheckpointError(
                    f"{root / index.name} says {name!r} is in {shard!r}, but that shard has no such tensor; "
                    "the checkpoint is inconsistent. Re-save or re-download it."
                )
        if any(k != v for k, v in renames.items()):
            plan.rewrites[index.name] = content
    return plan


@dataclass
class RunEntry:
    """One checkpoint of a run folder: its name in the folder, its format and its own plan."""

    name: str
    format: str
    plan: FilePlan | DirPlan
    entries: list[RunEntry] = field(default_factory=list)  # a run folder inside the run folder


def plan_run(root: Path, *, trust_pickle: bool) -> tuple[DirPlan, list[RunEntry]]:
    """Plan the strip of every checkpoint in a run folder, each on its own; one plan writes them all.

    Other files (logs, configs, optimizer states) are copied unchanged by :func:`write_dir`.
    """
    plan = DirPlan("run-dir", root)
    entries = []
    for path in run_entries(root):
        if path.is_dir():
            fmt = detect_format(path)
            nested: list[RunEntry] = []
            if fmt == "run-dir":
                sub, nested = plan_run(path, trust_pickle=trust_pickle)
            else:
                sub = plan_dir(path, fmt, trust_pickle=trust_pickle)
            plan.files.update({f"{path.name}/{rel}": p for rel, p in sub.files.items()})
            plan.rewrites.update({f"{path.name}/{rel}": c for rel, c in sub.rewrites.items()})
        else:
            fmt = file_format(path)
            file_plan = plan_file(path, trust_pickle=trust_pickle)
            plan.files[path.name] = file_plan
            nested = []
        entries.append(RunEntry(path.name, fmt, sub if path.is_dir() else file_plan, nested))
    return plan, entries


def write_dir(plan: DirPlan, dst: Path, progress: Progress | None = None) -> None:
    """Write the stripped folder to ``dst`` (which must not exist, or be empty).

    Symbolic links (checked by :func:`._fs.check_folder` to stay inside the folder) are recreated
    as the same links, except a weights file or index reached through one, which is written out
    stripped as a regular file.
    """
    root = plan.source
    pending = {*plan.files, *plan.rewrites}
    with atomic_dir(dst) as tmp:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            rel_dir = here.relative_to(root)
            (tmp / rel_dir).mkdir(exist_ok=True)
            for name in [*dirnames, *filenames]:
                src, out, rel = here / name, tmp / rel_dir / name, (rel_dir / name).as_posix()
                pending.discard(rel)
                if rel in plan.files:
                    with new_file(out, mode_like=src) as fd:
                        plan.files[rel].write(fd, progress)
                elif rel in plan.rewrites:
                    with new_file(out, mode_like=src) as fd:
                        write_all(fd, plan.rewrites[rel])
                elif src.is_symlink():
                    os.symlink(os.readlink(src), out)
                elif src.is_file():
                    with new_file(out, mode_like=src) as fd:
                        copy_file(src, fd, progress=progress)
        if pending:
            raise CheckpointError(
                f"{root / sorted(pending)[0]} lies under a linked folder, where strip cannot write it; "
                "replace the link with the folder it points to, then retry."
            )


def write_dir_in_place(plan: DirPlan, progress: Progress | None = None) -> None:
    """Replace each changed file of the folder atomically, shard indexes last (a link: the file it points to)."""
    for rel, file_plan in plan.files.items():
        path = Path(os.path.realpath(plan.source / rel))
        if not file_plan.changed:
            continue
        if not file_plan.write_in_place(progress):
            with atomic_file(path, mode_like=path) as fd:
                file_plan.write(fd, progress)
    for rel, content in plan.rewrites.items():
        path = Path(os.path.realpath(plan.source / rel))
        with atomic_file(path, mode_like=path) as fd:
            write_all(fd, content)


def scan_dir(root: Path, fmt: str, *, trust_pickle: bool) -> tuple[list[TensorInfo], dict[str, Any], list[str]]:
    """Tensor records and metadata of a folder's weights (for DeepSpeed: the newest tag's model states)."""
    if fmt == "deepspeed-dir":
        return scan_deepspeed(root, trust_pickle=trust_pickle)[:3]
    if fmt == "dcp-dir":
        return _dcp.scan(root, trust_pickle=trust_pickle)
    found = indexes(root)
    names = hf_weight_files(root, found)
    tensors: list[TensorInfo] = []
    metadata: dict[str, Any] = {}
    for rel in names:
        file_tensors, file_metadata = scan_file(root / rel, trust_pickle=trust_pickle)
        tensors += file_tensors
        for key, value in file_metadata.items():
            metadata.setdefault(key, value)
    for index in found:
        extra = index.data.get("metadata")
        if isinstance(extra, dict):
            for key, value in extra.items():
                metadata.setdefault(str(key), value)
    return tensors, metadata, [i.name for i in found] + names
