"""The work of ``random-ltd strip`` without Typer: progress, signals, several inputs, rendering, a fast path.

Typer builds a pydantic validator for every parameter, and with rich that is most of a second
of start-up on a small machine: more than the copy itself takes for a checkpoint of a few GiB.
So :func:`fast_main` runs a plain ``random-ltd strip PATH... [-o OUT] [--in-place] [--dry-run]
[--json] [--trust-pickle] [--force]`` before Typer is imported. Both it and the Typer command in
:mod:`.strip` call :func:`execute`, so the library calls, output, ``Error:`` lines, JSON errors
and exit codes (1, 130) are the same. Anything the fast path does not parse unambiguously
(``--help``, an unknown or repeated option, a usage error) is left to Typer. Typer is imported
only to report an error, through the same ``._app.user_errors`` as every other command.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress, TaskID

    from ..checkpoint import StripReport

__all__ = ["PLAIN_INTERVAL_S", "PROGRESS_MIN_BYTES", "execute", "fast_main", "parse_plain", "render", "run"]

PROGRESS_MIN_BYTES = 64 << 20
"""Below this many bytes to write there is no progress bar."""

PLAIN_INTERVAL_S = 5.0
"""Without a terminal, one plain progress line on stderr at most this often."""

_FLAGS = {"--in-place": "in_place", "--dry-run": "dry_run", "--json": "as_json", "--trust-pickle": "trust_pickle",
          "--force": "force"}


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # as ._app.note, without importing Typer


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
                _note(f"stripping: {_gib(done)} of {_gib(total)} GiB ({done / max(total, 1):.0%}), "
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


class StripStop(Exception):
    """A failure found by the command itself (not the library); ``interrupted``: exit 130, else 1."""

    def __init__(self, message: str, *, interrupted: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.interrupted = interrupted


def run(
    paths: list[Path], output: Path | None, *, in_place: bool, dry_run: bool, trust_pickle: bool, force: bool = False
) -> list[StripReport]:
    """The library calls behind ``random-ltd strip``: check every input, then write each in turn.

    Raises:
        StripStop: several inputs and ``output`` is not a folder; or interrupted after some output was written.
        RandomLTDError, OSError, KeyboardInterrupt: as :func:`~random_ltd_cli.checkpoint.strip_checkpoint`.
    """
    from ..checkpoint import strip_checkpoint

    if len(paths) > 1 and output is not None and not _is_dir(output):
        raise StripStop(f"-o {str(output)!r} must be an existing folder when stripping {len(paths)} inputs; "
                        "create it, or strip one input at a time.")
    kwargs: dict[str, Any] = {"in_place": in_place, "trust_pickle": trust_pickle, "overwrite": force}
    # With several inputs, each goes into the -o folder under its own name.
    outputs = [output / (p.name or p.resolve().name) if output is not None and len(paths) > 1 else output
               for p in paths]
    # Check every input before writing any output.
    checked = [strip_checkpoint(p, o, dry_run=True, **kwargs) for p, o in zip(paths, outputs, strict=True)]
    if dry_run:
        return checked
    reports: list[StripReport] = []
    written: list[str] = []
    try:
        with _progress_and_signals() as bar:
            for p, o in zip(paths, outputs, strict=True):
                reports.append(strip_checkpoint(p, o, progress=bar, **kwargs))
                if reports[-1].wrote:
                    written.append(str(reports[-1].output))
    except KeyboardInterrupt:
        if not written:
            raise
        raise StripStop(f"interrupted; already written: {', '.join(written)}; nothing else was written.",
                        interrupted=True) from None
    return reports


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name too long: not a usable folder
        return False


def report_error(exc: BaseException, as_json: bool) -> int:
    """Print ``exc`` as every command reports errors (``._app.user_errors``); return the exit code.

    Re-raises ``exc`` when it is not a user's error (a bug shows its traceback).
    """
    import typer

    from ._app import INTERRUPTED, fail, user_errors

    try:
        with user_errors(as_json, interrupted="nothing was written"):
            if isinstance(exc, StripStop):
                fail(exc.message, code=INTERRUPTED if exc.interrupted else 1)
            raise exc
    except typer.Exit as done:
        return int(done.exit_code)
    raise exc  # pragma: no cover - user_errors re-raises what it does not handle


def execute(
    paths: list[Path], output: Path | None, *, in_place: bool, dry_run: bool, as_json: bool, trust_pickle: bool,
    force: bool = False,
) -> int:
    """The whole ``random-ltd strip`` after parsing: strip, print the result or the error; the exit code."""
    try:
        reports = run(paths, output, in_place=in_place, dry_run=dry_run, trust_pickle=trust_pickle, force=force)
    except (Exception, KeyboardInterrupt) as exc:
        return report_error(exc, as_json)
    render(reports, as_json)
    return 0


def render(reports: list[StripReport], as_json: bool) -> None:
    """Print the results: lines on stdout and notes on stderr, or one JSON object."""
    if as_json:
        from ._render import print_json

        print_json(reports[0].to_dict() if len(reports) == 1 else {"format": "list",
                                                                     "results": [r.to_dict() for r in reports]})
        return
    for report in reports:
        _render(report)


def _render(report: StripReport) -> None:
    from ._plain import text

    if report.entries:
        for entry in report.entries:
            _render(entry)
        if report.dry_run:
            _note(f"Dry run: {report.source} holds {_plural(len(report.entries), 'checkpoint')}; would write "
                  f"{'them in place' if report.in_place else report.output}; nothing was written.")
        elif report.wrote:
            print(text(f"Wrote {report.output}: {_plural(len(report.entries), 'checkpoint')}, other files copied."))
        return
    if report.renamed_count == 0 and report.side_renamed_count == 0:
        print(text(f"Nothing to strip: no name in {report.source} has a 'random_ltd_layer' segment."))
        if report.wrote:
            _note(f"Copied it unchanged to {report.output}.")
        return
    if report.dry_run:
        for old, new in report.renamed:
            print(text(f"{old} -> {new}"))  # names from a pickle may hold lone surrogates
        for old, new in report.side_renamed:  # DeepSpeed's side tables, module metadata
            print(text(f"{old} -> {new} (side table)"))
        where = "in place" if report.in_place else f"to {report.output}"
        _note(f"Dry run: would rename {_names(report)} in {report.source} and write {where}; nothing was written.")
        return
    where = " (in place)" if report.in_place else ""
    print(text(f"Stripped {_names(report)} from {report.source}: {report.output}{where}"))  # paths: any bytes


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
    opts: dict[str, Any] = {"paths": [], "output": None, **dict.fromkeys(_FLAGS.values(), False)}
    seen: set[str] = set()
    rest, positional_only = argv[1:], False
    while rest:
        arg, rest = rest[0], rest[1:]
        if positional_only or arg == "-" or not arg.startswith("-"):
            if not arg:
                return None
            opts["paths"].append(Path(arg))
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
    if not opts["paths"] or (opts["in_place"] and opts["output"] is not None):
        return None
    return opts


def fast_main(argv: list[str]) -> int | None:
    """Run a plain ``strip`` command line without Typer and return its exit code; None (nothing done) for any other."""
    opts = parse_plain(argv)
    if opts is None:
        return None
    return execute(opts.pop("paths"), opts.pop("output"), **opts)
