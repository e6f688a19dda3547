"""The Typer app object, shared option types and error rendering (no torch here)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated, NoReturn

import typer

from .. import __version__
from ..errors import RandomLTDError

app = typer.Typer(
    name="random-ltd",
    help="Random layerwise token dropping (random-LTD): convert models, inspect and strip checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Options shared by several commands, defined once.
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would happen; write nothing.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"random-ltd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Random layerwise token dropping (random-LTD) for PyTorch and Hugging Face models."""


def fail(message: str) -> NoReturn:
    """Print one ``Error:`` line on stderr and exit with code 1."""
    first, *rest = str(message).strip().splitlines() or ["unknown error"]
    print(f"Error: {' '.join([first, *[r.strip() for r in rest]])}", file=sys.stderr)
    raise typer.Exit(code=1)


def note(message: str) -> None:
    """A hint or progress line for people: stderr, so stdout stays parseable."""
    print(message, file=sys.stderr)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the project's errors (and file-system errors) into one ``Error:`` line and exit code 1."""
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
    except KeyboardInterrupt:
        fail("interrupted; nothing was written to the destination.")
