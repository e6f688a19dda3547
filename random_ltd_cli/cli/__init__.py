"""The ``random-ltd`` command line. Each command lives in its own module; none imports torch at import time."""

from __future__ import annotations

# Importing the command modules registers their commands on ``app`` (in this order in --help).
# isort: off
from . import convert, inspect, strip, demo  # noqa: F401
from ._app import app

# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="random-ltd")
