"""Values read from untrusted checkpoints, made safe to print (no rich, no torch here).

A checkpoint may carry metadata nested thousands of levels deep, integers of millions of
digits, a dict that holds the same list a million times, or strings with lone surrogates:
``json.dumps`` would raise ``RecursionError`` or ``ValueError``, and ``print`` a
``UnicodeEncodeError``. :func:`json_ready` returns a bounded copy that always prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_NODES", "json_ready", "text"]

MAX_DEPTH = 32
"""Containers nested deeper are shown as a short string."""

MAX_NODES = 200_000
"""Values shown in one output at most; the rest are replaced by a short string."""

_MAX_INT_BITS = 10_000  # str(int) refuses more than 4,300 digits (about 14,000 bits)
_MAX_TEXT = 10_000  # characters of an object's str() shown


def text(value: str) -> str:
    """``value`` with lone surrogates written as ``\\udxxx`` escapes, so it can be encoded as UTF-8."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _key(key: Any) -> str:
    if isinstance(key, str):
        return text(key)
    if key is None or isinstance(key, (bool, float)) or (isinstance(key, int) and key.bit_length() <= _MAX_INT_BITS):
        return str(key)
    return f"<{type(key).__name__}>"


def json_ready(value: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """A copy of ``value`` that ``json.dumps`` and ``print`` always handle.

    Containers deeper than ``max_depth`` and values beyond ``max_nodes`` become short strings
    (``"<nested deeper than 32 levels>"``, ``"<truncated>"``); huge integers, NaN and infinities
    become strings; keys become strings; other objects their ``str()`` (paths) or type name.
    """
    left = [max_nodes]

    def convert(item: Any, depth: int) -> Any:
        left[0] -= 1
        if left[0] < 0:
            return "<truncated>"
        if item is None or isinstance(item, bool):
            return item
        if isinstance(item, int):
            return int(item) if item.bit_length() <= _MAX_INT_BITS else f"<integer of {item.bit_length()} bits>"
        if isinstance(item, float):
            return item if math.isfinite(item) else str(item)
        if isinstance(item, str):
            return text(item)
        if isinstance(item, PurePath):
            return text(str(item))
        if isinstance(item, (Mapping, list, tuple, set, frozenset)):
            if depth >= max_depth:
                return f"<nested deeper than {max_depth} levels>"
            pairs = item.items() if isinstance(item, Mapping) else enumerate(item)
            out: dict[str, Any] = {}
            for k, v in pairs:
                if left[0] <= 0:
                    out["<truncated>"] = f"more than {max_nodes} values"
                    break
                out[_key(k) if isinstance(item, Mapping) else str(len(out))] = convert(v, depth + 1)
            return out if isinstance(item, Mapping) else list(out.values())
        try:
            shown = str(item)
        except Exception:  # an object whose str() fails or recurses: its type is enough
            return f"<{type(item).__name__}>"
        return text(shown[:_MAX_TEXT])

    return convert(value, 0)
