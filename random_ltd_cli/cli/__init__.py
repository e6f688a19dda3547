"""The ``random-ltd`` command line. Each command lives in its own module; none imports torch at import time.

Importing this package does not import Typer either: :func:`main` first offers the command line
to the strip fast path (:mod:`._strip_run`, a plain ``random-ltd strip`` without Typer's
start-up), and builds the Typer ``app`` only for everything else.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import typer

    app: typer.Typer

__all__ = ["app", "main"]


def _load_app() -> typer.Typer:
    # Importing the command modules registers their commands on ``app`` (in this order in --help).
    # isort: off
    from . import convert, inspect, check, strip, demo  # noqa: F401
    from ._app import app

    # isort: on
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        return _load_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console-script entry point (it ends the process, like Typer's standalone mode)."""
    from ._strip_run import fast_main

    code = fast_main(sys.argv[1:])
    if code == 0:
        # The output is written, fsynced and renamed, and the report printed: flush it and skip the
        # interpreter's teardown (freeing every module), a noticeable part of a short strip's time.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if code is not None:
        sys.exit(code)  # the Error: line is printed
    _load_app()(prog_name="random-ltd")
