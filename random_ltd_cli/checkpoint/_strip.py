"""strip and inspect for any supported path: choose the output, plan, then write (no torch here)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections import Counter
from pathlib import Path

from ..errors import CheckpointError, OutputExistsError
from ..keys import wrapped_prefixes
from . import _dcp
from ._atomic import atomic_file
from ._common import FilePlan
from ._deepspeed_dir import scan_deepspeed
from ._detect import detect_format, plan_file, scan_file
from ._dir import DirPlan, RunEntry, plan_dir, plan_run, scan_dir, write_dir, write_dir_in_place
from ._fs import check_folder, check_output, lstat_or_none, os_error
from ._io import Progress, ProgressFn
from ._report import CheckpointInfo, StripReport
from ._run import checkpoint_default_output, folder_kind, natural_key, run_entries, side_files
from ._torch import reuse_reads, wrapped_side_names
from ._verdict import checkpoint_verdicts

__all__ = ["default_output", "inspect", "strip"]

DIR_FORMATS = ("hf-dir", "deepspeed-dir", "dcp-dir", "run-dir")


def default_output(src: Path) -> Path:
    """Where a strip writes without ``-o``: ``model.stripped.safetensors``, ``ckpt-dir.stripped``.

    A checkpoint that a trainer rotates or resumes from goes outside the trainer's folder, under
    the same name: ``out/checkpoint-500`` -> ``out.stripped/checkpoint-500``, ``checkpoints/last.ckpt``
    -> ``checkpoints.stripped/last.ckpt`` (Accelerate's ``checkpoint_N`` likewise).
    """
    if not src.name:  # "." or ".."
        src = Path(os.path.abspath(src))
    managed = checkpoint_default_output(src)
    if managed is not None:
        return managed
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
        return src if src.is_dir() else Path(os.path.realpath(src))  # a linked file: rewrite the file itself
    target = Path(dst) if dst is not None else default_output(src)
    if target.is_dir() and not src.is_dir():
        target = target / src.name  # like cp: into an existing folder
    if target.exists() and _same(target, src):
        raise CheckpointError(
            f"the output {target} is the input; pass --in-place to rewrite it, or choose another output with -o."
        )
    if src.is_dir() and target.resolve().is_relative_to(src.resolve()):
        raise CheckpointError(f"the output {target} is inside the input folder {src}; choose an output outside it.")
    if not target.parent.is_dir() and (dst is not None or target.parent.exists()):
        raise CheckpointError(f"the output folder {target.parent} does not exist; create it or choose another -o.")
    return target


def _check_target(source: Path, target: Path, *, overwrite: bool) -> None:
    """Refuse an output that would replace something: a folder that is not empty, a file unless ``overwrite``.

    Nothing but a regular file is ever replaced (links, FIFOs, sockets and devices are refused).
    """
    if not source.is_dir():
        check_output(target, overwrite=overwrite)
        return
    st = lstat_or_none(target)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISREG(st.st_mode):
            raise OutputExistsError(f"the output {target} is a file, and a folder is written here; choose another -o.")
        check_output(target, overwrite=False)
    elif any(target.iterdir()):
        raise OutputExistsError(
            f"the output folder {target} already exists and is not empty; remove it or choose another -o "
            "(--force replaces files, never folders)."
        )


def _write(
    plan: FilePlan | DirPlan, target: Path, *, in_place: bool, overwrite: bool, progress: ProgressFn | None
) -> None:
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
    if in_place and plan.write_in_place(tracker):
        return
    with atomic_file(target, mode_like=plan.source, overwrite=overwrite or in_place) as fd:
        plan.write(fd, tracker)


def strip(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    in_place: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> StripReport:
    """Implementation of :func:`random_ltd_cli.checkpoint.strip_checkpoint`."""
    try:
        return _strip(Path(src), None if dst is None else Path(dst), in_place=in_place, dry_run=dry_run,
                      trust_pickle=trust_pickle, overwrite=overwrite, progress=progress)
    except OSError as exc:  # a file-system error not turned into a message on the way (e.g. a name too long)
        raise os_error(exc.filename or src, exc) from exc


def _strip(
    source: Path, dst: Path | None, *, in_place: bool, dry_run: bool, trust_pickle: bool, overwrite: bool,
    progress: ProgressFn | None,
) -> StripReport:
    fmt = detect_format(source)
    target = _target(source, dst, in_place=in_place)
    if fmt in DIR_FORMATS:
        check_folder(source)  # FIFOs, devices, links out of the folder: refused before anything is read
    entries: list[RunEntry] = []
    plan: FilePlan | DirPlan
    if fmt == "run-dir":
        plan, entries = plan_run(source, trust_pickle=trust_pickle)
    elif fmt in DIR_FORMATS:
        plan = plan_dir(source, fmt, trust_pickle=trust_pickle)
    else:
        plan = plan_file(source, trust_pickle=trust_pickle)
    report = _report(fmt, source, target, plan, entries, in_place=in_place, dry_run=dry_run)
    explicit_copy = dst is not None and not in_place  # "-o OUT" always leaves a result at OUT
    if not in_place and (plan.changed or explicit_copy):
        _check_target(source, target, overwrite=overwrite)  # in a dry run too: it predicts the refusal
    if dry_run or not (plan.changed or explicit_copy):
        return report
    made = None if target.parent.exists() else target.parent  # a default output's X.stripped/ folder
    try:
        if made is not None:
            made.mkdir()
        _write(plan, target, in_place=in_place, overwrite=overwrite, progress=progress)
    except BaseException:
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()  # only if still empty
        raise
    report.output, report.wrote = target, True
    _mark_written(report, target)
    return report


def _mark_written(report: StripReport, target: Path) -> None:
    """A run folder is written whole: every checkpoint in it is there, stripped or copied."""
    for entry in report.entries:
        entry.output, entry.wrote = target / entry.source.name, True
        _mark_written(entry, target / entry.source.name)


def _report(
    fmt: str, source: Path, target: Path, plan: FilePlan | DirPlan, entries: list[RunEntry], *,
    in_place: bool, dry_run: bool,
) -> StripReport:
    """The report of one plan; for a run folder, one report per checkpoint and their totals."""
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
    if entries:
        report.entries = [
            _report(e.format, source / e.name, target / e.name, e.plan, e.entries, in_place=in_place,
                    dry_run=dry_run)
            for e in entries
        ]
        report.renamed = [pair for e in report.entries for pair in e.renamed]
        report.renamed_count = len(report.renamed)
        report.untouched_count = sum(e.untouched_count for e in report.entries)
        report.side_renamed_count = sum(e.side_renamed_count for e in report.entries)
        report.side_renamed = [pair for e in report.entries for pair in e.side_renamed]
    return report


def inspect(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> CheckpointInfo:
    """Implementation of :func:`random_ltd_cli.checkpoint.inspect_checkpoint`."""
    try:
        with reuse_reads():  # a torch file is read for its tensors, side tables and globals: parse it once
            return _inspect(Path(path), trust_pickle=trust_pickle)
    except OSError as exc:  # a file-system error not turned into a message on the way (e.g. a name too long)
        raise os_error(exc.filename or path, exc) from exc


def _inspect(path: Path, *, trust_pickle: bool) -> CheckpointInfo:
    fmt = detect_format(path)
    if fmt == "run-dir":
        return _inspect_run(path, trust_pickle=trust_pickle)
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
    info = CheckpointInfo(
        format=fmt,
        path=path,
        tensor_count=len(tensors),
        parameter_count=sum(t.numel for t in tensors),
        dtypes=dict(sorted(dtypes.items())),
        wrapped_layers=sorted(wrapped_prefixes([*(t.name for t in tensors), *side]), key=natural_key),
        metadata=metadata,
        files=files,
        tensors=tensors,
    )
    if path.is_dir():
        info.kind = folder_kind(path, fmt)
        info.side_files = side_files(path, files)
    info.pickles = checkpoint_verdicts(path, fmt, trust_pickle=trust_pickle)
    return info


def _inspect_entry(path: Path, *, trust_pickle: bool) -> CheckpointInfo:
    try:
        return inspect(path, trust_pickle=trust_pickle)
    except CheckpointError as exc:
        return CheckpointInfo(format="unreadable", path=path, tensor_count=0, parameter_count=0, dtypes={},
                              wrapped_layers=[], metadata={"error": str(exc)}, files=[], kind="error")


def _inspect_run(path: Path, *, trust_pickle: bool) -> CheckpointInfo:
    """A run folder: each checkpoint inspected on its own; the totals add them up.

    A checkpoint that cannot be read (e.g. a pickle that needs --trust-pickle) is listed with
    ``format="unreadable"`` and the reason in ``metadata["error"]``; the others are still shown.
    """
    entries = [_inspect_entry(entry, trust_pickle=trust_pickle) for entry in run_entries(path)]
    dtypes: Counter[str] = Counter()
    for e in entries:
        dtypes.update(e.dtypes)
    return CheckpointInfo(
        format="run-dir",
        path=path,
        tensor_count=sum(e.tensor_count for e in entries),
        parameter_count=sum(e.parameter_count for e in entries),
        dtypes=dict(sorted(dtypes.items())),
        wrapped_layers=sorted({w for e in entries for w in e.wrapped_layers}, key=natural_key),
        metadata={},
        files=[e.path.name for e in entries],
        kind=folder_kind(path, "run-dir"),
        side_files=side_files(path, [e.path.name for e in entries]),
        entries=entries,
    )
