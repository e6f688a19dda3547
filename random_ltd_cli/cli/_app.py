"""The Typer app object, shared option types and error rendering (no torch here)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import signal
import sys
from collections.abc import Iterator
from typing import Annotated, NoReturn

import typer

from .. import __version__
from ..errors import RandomLTDError

INTERRUPTED = 130
"""Exit code after Ctrl-C (SIGINT) or SIGTERM, as shells report a SIGINT death."""

app = typer.Typer(
    name="random-ltd",
    help="Random layerwise token dropping (random-LTD): convert and check models, inspect and strip checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags show no '<bool>' value, and --help never imports rich
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by several commands, defined once.
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table (errors too).")
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would happen; write nothing.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]

_json_errors: contextvars.ContextVar[bool] = contextvars.ContextVar("json_errors", default=False)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"random-ltd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Random layerwise token dropping (random-LTD) for PyTorch and Hugging Face models."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one ``Error:`` line on stderr (and, under ``--json``, an error object on stdout); exit ``code``."""
    first, *rest = str(message).strip().splitlines() or ["unknown error"]
    line = " ".join([first, *[r.strip() for r in rest]])
    if _json_errors.get():
        sys.stdout.write(json.dumps({"error": line, "exit_code": code}) + "\n")
    print(f"Error: {line}", file=sys.stderr)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM like Ctrl-C, so temporary outputs are removed (main thread only)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous: object = None
    with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


def note(message: str) -> None:
    """A hint or progress line for people: stderr, so stdout stays parseable."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors(as_json: bool = False, interrupted: str = "nothing was written") -> Iterator[None]:
    """Turn the project's errors (and file-system errors) into one ``Error:`` line and exit code 1.

    Ctrl-C exits 130 with ``interrupted; {interrupted}.``; under ``as_json`` errors are also a JSON
    object ``{"error": ..., "exit_code": ...}`` on stdout.
    """
    token = _json_errors.set(as_json)
    try:
        yield
    except RandomLTDError as exc:
        fail(str(exc))
    except PermissionError as exc:
        fail(f"permission denied: {exc.filename or exc}. Check the file's permissions or choose another path.")
    except FileNotFoundError as exc:
        fail(f"no such file or directory: {exc.filename or exc}. Check the path and retry.")
    except IsADirectoryError as exc:
        fail(f"expected a file but found a directory: {exc.filename or exc}.")
    except OSError as exc:  # e.g. a name too long for the file system, an I/O error
        fail(f"{exc.filename or 'a file'}: {exc.strerror or exc}. Check the path and retry.")
    except KeyboardInterrupt:
        fail(f"interrupted; {interrupted}.", code=INTERRUPTED)
    finally:
        _json_errors.reset(token)
