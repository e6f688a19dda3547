"""Rendering helpers for the CLI: rich tables on stdout, JSON, escaped user strings (no torch here)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._plain import json_ready


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def print_json(data: Any) -> None:
    """One JSON document on stdout, bounded in depth and size (see :func:`._plain.json_ready`)."""
    sys.stdout.write(json.dumps(json_ready(data), indent=2) + "\n")


def layers_table(report: Any, title: str) -> Table:
    """Table of a model's layer stack: index, qualified name, class, wrapped."""
    table = Table(title=escape(title), title_justify="left")
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
