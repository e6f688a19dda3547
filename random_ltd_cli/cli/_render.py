"""Rendering helpers for the CLI: rich tables on stdout, JSON, escaped user strings (no torch here)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._plain import json_ready

NO_WRAP_WIDTH = 1000
"""Console width when stdout is not a terminal (pipe, file, CI log) and ``COLUMNS`` is unset: nothing wraps."""


def stdout_console(soft_wrap: bool = False) -> Console:
    """Rich on stdout; outside a terminal (and without ``COLUMNS``) wide enough that no cell or line wraps."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else NO_WRAP_WIDTH
    return Console(file=sys.stdout, highlight=False, soft_wrap=soft_wrap, width=width)


def print_table(console: Console, table: Table, title: str) -> None:
    """``title`` on a line of its own (never wrapped to the table's width), then ``table``."""
    console.print(escape(title), soft_wrap=True)
    console.print(table)


def print_json(data: Any) -> None:
    """One JSON document on stdout, bounded in depth and size (see :func:`._plain.json_ready`)."""
    sys.stdout.write(json.dumps(json_ready(data), indent=2) + "\n")


def layers_table(report: Any) -> Table:
    """Table of a model's layer stack: index, qualified name, class, wrapped (print with :func:`print_table`)."""
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("class")
    table.add_column("random-LTD")
    for row in report.layers:
        table.add_row(str(row.index), escape(row.name), escape(row.cls), "wrapped" if row.wrapped else "full")
    return table


def human_count(n: int | float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
