"""The ``random-ltd`` command line. Each command lives in its own module; none imports torch at import time."""

from __future__ import annotations

from . import _app
from ._app import app

# Importing the command modules registers their commands on ``app``.
for _name in ("convert", "inspect", "strip", "demo"):
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"{__name__}.{_name}":
            raise

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="random-ltd")


del _app
