"""``random-ltd strip``: remove the ``random_ltd_layer`` segment from a checkpoint's names (no torch here)."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._app import DryRunOption, JsonOption, app, note, user_errors
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


class _ProgressBar:
    """A rich progress bar on stderr, started on the first large enough update when stderr is a terminal."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.enabled = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < PROGRESS_MIN_BYTES:
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
    path: Annotated[Path, typer.Argument(help="A checkpoint file or folder.", show_default=False)],
    output: OutputOption = None,
    in_place: InPlaceOption = False,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    trust_pickle: TrustOption = False,
) -> None:
    """Remove the '.random_ltd_layer' segment from every weight name, so plain models load the checkpoint.

    Reads .safetensors, torch.save files (.pt/.pth/.bin/.ckpt), Hugging Face folders and DeepSpeed folders.

    The input is not modified unless --in-place; tensor bytes are copied as they are; pickles are never run.

    Examples: random-ltd strip model.safetensors; random-ltd strip ckpt/ -o plain/; random-ltd strip x.pt --dry-run
    """
    if in_place and output is not None:
        raise typer.BadParameter("use either --in-place or -o/--output, not both.", param_hint="'--in-place'")
    with user_errors():
        from ..checkpoint import strip_checkpoint

        with _progress_and_signals() as bar:
            report = strip_checkpoint(
                path, output, in_place=in_place, dry_run=dry_run, trust_pickle=trust_pickle, progress=bar
            )
    _render(report, as_json)


def _render(report: StripReport, as_json: bool) -> None:
    if as_json:
        print_json(report.to_dict())
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
        note(f"Dry run: would rename {_names(report)} and write {where}; nothing was written.")
        return
    where = " (in place)" if report.in_place else ""
    print(f"Stripped {_names(report)} from {report.source}: {report.output}{where}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _names(report: StripReport) -> str:
    """E.g. '24 names (16 untouched, 48 other names)'."""
    side = f", {_plural(report.side_renamed_count, 'other name')}" if report.side_renamed_count else ""
    return f"{_plural(report.renamed_count, 'name')} ({report.untouched_count} untouched{side})"
