"""The work of ``random-ltd strip`` without Typer: progress bar, signals, rendering, and a fast path.

Typer builds a pydantic validator for every parameter, and with rich that is most of a second
of start-up on a small machine: more than the copy itself takes for a checkpoint of a few GiB.
So :func:`fast_main` runs a plain ``random-ltd strip PATH [-o OUT] [--in-place] [--dry-run]
[--json] [--trust-pickle]`` before Typer is imported, with the same library call, output and
``Error:`` lines. Anything else (``--help``, an unknown or repeated option, a usage error) is
left to the Typer command in :mod:`.strip`, which calls the same functions.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress, TaskID

    from ..checkpoint import StripReport

__all__ = ["PROGRESS_MIN_BYTES", "fast_main", "parse_plain", "render", "run"]

PROGRESS_MIN_BYTES = 64 << 20
"""Below this many bytes to write there is no progress bar."""

_FLAGS = {"--in-place": "in_place", "--dry-run": "dry_run", "--json": "as_json", "--trust-pickle": "trust_pickle"}


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


def run(path: Path, output: Path | None, *, in_place: bool, dry_run: bool, trust_pickle: bool) -> StripReport:
    """The library call behind ``random-ltd strip``, with a progress bar and SIGTERM handling."""
    from ..checkpoint import strip_checkpoint

    with _progress_and_signals() as bar:
        return strip_checkpoint(
            path, output, in_place=in_place, dry_run=dry_run, trust_pickle=trust_pickle, progress=bar
        )


def _note(message: str) -> None:
    print(message, file=sys.stderr)  # as ._app.note, without importing Typer


def render(report: StripReport, as_json: bool) -> None:
    """Print the result: one line (stdout), notes (stderr), or the JSON report."""
    if as_json:
        from ._render import print_json

        print_json(report.to_dict())
        return
    if report.renamed_count == 0 and report.side_renamed_count == 0:
        print(f"Nothing to strip: no name in {report.source} has a 'random_ltd_layer' segment.")
        if report.wrote:
            _note(f"Copied it unchanged to {report.output}.")
        return
    if report.dry_run:
        for old, new in report.renamed:
            print(f"{old} -> {new}")
        where = "in place" if report.in_place else f"to {report.output}"
        _note(f"Dry run: would rename {_names(report)} and write {where}; nothing was written.")
        return
    where = " (in place)" if report.in_place else ""
    print(f"Stripped {_names(report)} from {report.source}: {report.output}{where}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _names(report: StripReport) -> str:
    """E.g. '24 names (16 untouched, 48 other names)'."""
    side = f", {_plural(report.side_renamed_count, 'other name')}" if report.side_renamed_count else ""
    return f"{_plural(report.renamed_count, 'name')} ({report.untouched_count} untouched{side})"


def parse_plain(argv: list[str]) -> dict[str, Any] | None:
    """The options of a plain ``strip`` command line, or None for anything Typer should handle."""
    if not argv or argv[0] != "strip":
        return None
    opts: dict[str, Any] = {"path": None, "output": None, **dict.fromkeys(_FLAGS.values(), False)}
    seen: set[str] = set()
    rest, positional_only = argv[1:], False
    while rest:
        arg, rest = rest[0], rest[1:]
        if positional_only or arg == "-" or not arg.startswith("-"):
            if opts["path"] is not None or not arg:
                return None
            opts["path"] = Path(arg)
            continue
        if arg == "--":
            positional_only = True
            continue
        name, value = arg, None
        if arg.startswith("--output="):
            name, value = "--output", arg[len("--output=") :]
        elif arg.startswith("-o") and arg != "-o" and arg[2] != "=":
            name, value = "-o", arg[2:]
        elif arg in ("-o", "--output") and rest:
            value, rest = rest[0], rest[1:]
        key = "output" if name in ("-o", "--output") else _FLAGS.get(name)
        if key is None or key in seen:
            return None  # unknown or repeated: Typer decides
        seen.add(key)
        if key != "output":
            opts[key] = True
        elif value and not value.startswith("-"):
            opts[key] = Path(value)
        else:
            return None  # a missing or unusual value: Typer decides
    if opts["path"] is None or (opts["in_place"] and opts["output"] is not None):
        return None
    return opts


def fast_main(argv: list[str]) -> bool:
    """Run a plain ``strip`` command line without Typer; False (nothing done) for any other."""
    opts = parse_plain(argv)
    if opts is None:
        return False
    as_json = opts.pop("as_json")
    try:
        report = run(opts.pop("path"), opts.pop("output"), **opts)
    except (Exception, KeyboardInterrupt) as exc:
        _exit_like_typer(exc)
    render(report, as_json)
    return True


def _exit_like_typer(exc: BaseException) -> None:
    """Report ``exc`` exactly as the Typer command does (one ``Error:`` line, exit code 1), or re-raise it."""
    import typer

    from ._app import user_errors

    try:
        with user_errors():
            raise exc
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
