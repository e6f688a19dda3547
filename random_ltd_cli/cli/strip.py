"""``random-ltd strip``: remove the ``random_ltd_layer`` segment from a checkpoint's names (no torch here)."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._app import INTERRUPTED, DryRunOption, JsonOption, app, fail, note, user_errors
from ._render import print_json

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress, TaskID

    from ..checkpoint import StripReport

PROGRESS_MIN_BYTES = 64 << 20
"""Below this many bytes to write there is no progress bar."""

OutputOption = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="OUT",
        help="Where to write (default: beside the input, e.g. model.stripped.safetensors or ckpt-dir.stripped/).",
        show_default=False,
    ),
]
InPlaceOption = Annotated[
    bool, typer.Option("--in-place", help="Rewrite the input itself (safetensors: only its header).")
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Accept torch pickles that name globals outside torch's weights_only allowlist "
        "(random-ltd still never runs them; the output will need the same trust to load).",
    ),
]


PLAIN_INTERVAL_S = 5.0
"""Without a terminal, one plain progress line on stderr at most this often."""


class _ProgressBar:
    """Progress on stderr for large writes: a rich bar on a terminal, else a plain line every few seconds."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.enabled = sys.stderr.isatty()  # a rich bar; else plain lines
        self.started = time.monotonic()
        self.last_line = self.started

    def __call__(self, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        if not self.enabled:
            now = time.monotonic()
            if now - self.last_line >= PLAIN_INTERVAL_S or done >= total:
                self.last_line = now
                note(f"stripping: {_gib(done)} of {_gib(total)} GiB ({done / max(total, 1):.0%}), "
                     f"{now - self.started:.0f}s elapsed")
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("stripping"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("strip", total=total)
        assert self.task is not None
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}"


@contextlib.contextmanager
def _progress_and_signals() -> Iterator[_ProgressBar]:
    """A progress bar, and SIGTERM handled like Ctrl-C so temporary files are removed."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    bar = _ProgressBar()
    previous: Any = None
    with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield bar
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@app.command()
def strip(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Checkpoint files or folders; a run folder strips every checkpoint inside.",
                       show_default=False, metavar="PATH"),
    ],
    output: OutputOption = None,
    in_place: InPlaceOption = False,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    trust_pickle: TrustOption = False,
) -> None:
    """Remove the '.random_ltd_layer' segment from every weight name, so plain models load the checkpoint.

    Reads .safetensors, torch.save files (.pt/.pth/.bin/.ckpt), Hugging Face folders (PEFT adapters,
    Trainer and Accelerate checkpoints too), DeepSpeed folders, and run folders holding several
    checkpoints (a Trainer output_dir, a Lightning checkpoints/ folder): each checkpoint is stripped
    on its own and every other file is copied unchanged.

    The input is not modified unless --in-place; tensor bytes are copied as they are; pickles are never run.
    Default outputs sit where no trainer rotates or resumes from them: out/checkpoint-500 ->
    out.stripped/checkpoint-500, checkpoints/last.ckpt -> checkpoints.stripped/last.ckpt.

    \b
    Examples:
      random-ltd strip model.safetensors
      random-ltd strip out/ --dry-run
      random-ltd strip a.pt b.pt -o plain/
    """
    if in_place and output is not None:
        raise typer.BadParameter("use either --in-place or -o/--output, not both.", param_hint="'--in-place'")
    written: list[str] = []
    with user_errors(as_json, interrupted="nothing was written"):
        from ..checkpoint import strip_checkpoint

        if len(paths) > 1 and output is not None and not output.is_dir():
            fail(f"-o {str(output)!r} must be an existing folder when stripping {len(paths)} inputs; "
                 "create it, or strip one input at a time.")
        kwargs: dict[str, Any] = {"in_place": in_place, "trust_pickle": trust_pickle}
        # With several inputs, each goes into the -o folder under its own name.
        outputs = [output / (p.name or p.resolve().name) if output is not None and len(paths) > 1 else output
                   for p in paths]
        # Check every input before writing any output.
        checked = [strip_checkpoint(p, o, dry_run=True, **kwargs) for p, o in zip(paths, outputs, strict=True)]
        if dry_run:
            reports = checked
        else:
            reports = []
            try:
                with _progress_and_signals() as bar:
                    for p, o in zip(paths, outputs, strict=True):
                        reports.append(strip_checkpoint(p, o, progress=bar, **kwargs))
                        if reports[-1].wrote:
                            written.append(str(reports[-1].output))
            except KeyboardInterrupt:
                if not written:
                    raise
                fail(f"interrupted; already written: {', '.join(written)}; nothing else was written.",
                     code=INTERRUPTED)
    if as_json:
        print_json(reports[0].to_dict() if len(reports) == 1 else {"format": "list",
                                                                     "results": [r.to_dict() for r in reports]})
        return
    for report in reports:
        _render(report)


def _render(report: StripReport) -> None:
    if report.entries:
        for entry in report.entries:
            _render(entry)
        if report.dry_run:
            note(f"Dry run: {report.source} holds {_plural(len(report.entries), 'checkpoint')}; would write "
                 f"{'them in place' if report.in_place else report.output}; nothing was written.")
        elif report.wrote:
            print(f"Wrote {report.output}: {_plural(len(report.entries), 'checkpoint')}, other files copied.")
        return
    if report.renamed_count == 0 and report.side_renamed_count == 0:
        print(f"Nothing to strip: no name in {report.source} has a 'random_ltd_layer' segment.")
        if report.wrote:
            note(f"Copied it unchanged to {report.output}.")
        return
    if report.dry_run:
        for old, new in report.renamed:
            print(f"{old} -> {new}")
        for old, new in report.side_renamed:  # DeepSpeed's side tables, module metadata
            print(f"{old} -> {new} (side table)")
        where = "in place" if report.in_place else f"to {report.output}"
        note(f"Dry run: would rename {_names(report)} in {report.source} and write {where}; nothing was written.")
        return
    where = " (in place)" if report.in_place else ""
    print(f"Stripped {_names(report)} from {report.source}: {report.output}{where}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _names(report: StripReport) -> str:
    """E.g. '24 names (16 untouched, 48 other names)'."""
    side = f", {_plural(report.side_renamed_count, 'other name')}" if report.side_renamed_count else ""
    return f"{_plural(report.renamed_count, 'name')} ({report.untouched_count} untouched{side})"
