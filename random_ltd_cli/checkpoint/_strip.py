"""strip and inspect for any supported path: choose the output, plan, then write (no torch here)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import CheckpointError
from ..keys import wrapped_prefixes
from . import _dcp
from ._atomic import atomic_file
from ._common import FilePlan
from ._deepspeed_dir import scan_deepspeed
from ._detect import detect_format, plan_file, scan_file
from ._dir import DirPlan, plan_dir, scan_dir, write_dir, write_dir_in_place
from ._io import Progress, ProgressFn
from ._report import CheckpointInfo, StripReport
from ._torch import wrapped_side_names

__all__ = ["default_output", "inspect", "strip"]

DIR_FORMATS = ("hf-dir", "deepspeed-dir", "dcp-dir")


def default_output(src: Path) -> Path:
    """Where a strip writes without ``-o``: ``model.stripped.safetensors``, ``ckpt-dir.stripped``."""
    if src.is_dir() or not src.suffix:
        return src.with_name(f"{src.name}.stripped")
    return src.with_name(f"{src.stem}.stripped{src.suffix}")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _target(src: Path, dst: Path | None, *, in_place: bool) -> Path:
    if in_place:
        if dst is not None and not _same(dst, src):
            raise CheckpointError(f"asked to write {dst} and to rewrite {src} in place; choose one.")
        return src
    target = Path(dst) if dst is not None else default_output(src)
    if target.is_dir() and not src.is_dir():
        target = target / src.name  # like cp: into an existing folder
    if target.exists() and _same(target, src):
        raise CheckpointError(
            f"the output {target} is the input; pass --in-place to rewrite it, or choose another output with -o."
        )
    if src.is_dir() and target.resolve().is_relative_to(src.resolve()):
        raise CheckpointError(f"the output {target} is inside the input folder {src}; choose an output outside it.")
    if not target.parent.is_dir():
        raise CheckpointError(f"the output folder {target.parent} does not exist; create it or choose another -o.")
    return target


def _write(plan: FilePlan | DirPlan, target: Path, *, in_place: bool, progress: ProgressFn | None) -> None:
    if isinstance(plan, DirPlan):
        tracker = Progress(progress, plan.nbytes(in_place=in_place))
        metadata = plan.files.get(_dcp.METADATA) if plan.format == "dcp-dir" else None
        if isinstance(metadata, _dcp.DcpPlan) and not in_place:  # data files copied first, flushed together
            _dcp.write_copy(metadata, target, tracker)
        elif in_place:
            write_dir_in_place(plan, tracker)
        else:
            write_dir(plan, target, tracker)
        return
    tracker = Progress(progress, plan.nbytes)
    if in_place and not target.is_symlink() and plan.write_in_place(tracker):
        return
    with atomic_file(target, mode_like=plan.source) as fd:
        plan.write(fd, tracker)


def strip(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    in_place: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> StripReport:
    """Implementation of :func:`random_ltd_cli.checkpoint.strip_checkpoint`."""
    source = Path(src)
    fmt = detect_format(source)
    target = _target(source, None if dst is None else Path(dst), in_place=in_place)
    plan: FilePlan | DirPlan = (
        plan_dir(source, fmt, trust_pickle=trust_pickle)
        if fmt in DIR_FORMATS
        else plan_file(source, trust_pickle=trust_pickle)
    )
    renamed = [(old, new) for old, new in plan.weights.items() if old != new]
    report = StripReport(
        format=fmt,
        source=source,
        output=target if plan.changed else None,
        renamed=[(str(a), str(b)) for a, b in renamed],
        untouched_count=len(plan.weights) - len(renamed),
        side_renamed_count=plan.side_count,
        side_renamed=list(getattr(plan, "side_renames", [])),
        in_place=in_place,
        dry_run=dry_run,
    )
    explicit_copy = dst is not None and not in_place  # "-o OUT" always leaves a result at OUT
    if dry_run or not (plan.changed or explicit_copy):
        return report
    _write(plan, target, in_place=in_place, progress=progress)
    report.output, report.wrote = target, True
    return report


def inspect(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> CheckpointInfo:
    """Implementation of :func:`random_ltd_cli.checkpoint.inspect_checkpoint`."""
    path = Path(path)
    fmt = detect_format(path)
    side: list[str] = []  # wrapped names outside the weights (DeepSpeed's side tables)
    if fmt == "deepspeed-dir":
        tensors, metadata, files, side = scan_deepspeed(path, trust_pickle=trust_pickle)
    elif fmt in DIR_FORMATS:
        tensors, metadata, files = scan_dir(path, fmt, trust_pickle=trust_pickle)
    else:
        tensors, metadata = scan_file(path, trust_pickle=trust_pickle)
        files = [path.name]
        if fmt == "torch":
            side = wrapped_side_names(path, trust_pickle=trust_pickle)
    dtypes = Counter(t.dtype for t in tensors)
    return CheckpointInfo(
        format=fmt,
        path=path,
        tensor_count=len(tensors),
        parameter_count=sum(t.numel for t in tensors),
        dtypes=dict(sorted(dtypes.items())),
        wrapped_layers=wrapped_prefixes([*(t.name for t in tensors), *side]),
        metadata=metadata,
        files=files,
        tensors=tensors,
    )
