"""JSON read from checkpoints, within fixed bounds: size, nesting depth, memory, valid Unicode (no torch here).

Every JSON text a checkpoint carries (a safetensors header, a shard index, ``adapter_config.json``,
the ``random_ltd`` metadata value) goes through :func:`parse`:

- before decoding, the memory the parsed objects would take is estimated from the text's
  length and its count of ``{``, ``[``, ``,`` and ``:`` (an upper bound for what :mod:`json`
  builds); more than :data:`PARSE_BUDGET` is refused, so a header of a million ``{}`` cannot
  take gigabytes;
- the bytes must be UTF-8 and the strings valid Unicode (no lone surrogates, which safetensors
  refuses and which cannot be written back);
- nesting deeper than :data:`MAX_DEPTH` is refused (the C parser's own recursion guard is
  turned into the same error), and so is a duplicate key.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import LimitExceededError, MalformedCheckpointError

__all__ = ["MAX_DEPTH", "PARSE_BUDGET", "estimate", "load_file", "parse", "parse_text", "read_json_bytes"]

MAX_DEPTH = 64
"""Deepest nesting accepted (a safetensors header needs 3 levels, a shard index 2)."""

PARSE_BUDGET = 160 << 20
"""Estimated bytes of memory a parse may use (the text, its decoded copy and the objects built).

With the interpreter (about 35 MiB) and the rewritten header of a strip, the process stays
under 256 MiB: a header of only strings may have about 53 MB, one of tensor records about
100,000 tensors (real files have at most a few thousand per file).
"""

# Upper bounds, in bytes, of what CPython 3.10+ builds per token (a dict with its key/value
# pairs list, a list, one item or key with its slot), measured with sys.getsizeof.
_PER_OBJECT, _PER_ARRAY, _PER_ITEM = 240, 80, 72
_PIECE = 8 << 20  # bytes read at a time


def read_json_bytes(fd: int, offset: int, length: int, where: str, *, budget: int = PARSE_BUDGET) -> bytearray:
    """Read ``length`` bytes of JSON at ``offset`` in 8 MiB pieces, stopping as soon as the text is over budget.

    Refused before a byte is read when the length alone exceeds the budget (three copies of
    the text), and while reading once the structure counted so far does: a header of a million
    ``{}`` costs a few MiB to refuse, not the gigabytes parsing it would take.

    Raises:
        LimitExceededError: over budget.
        EOFError: the file ends first.
    """
    if 3 * length > budget:
        raise _over(where, 3 * length, budget)
    buf = bytearray(length)
    view = memoryview(buf)
    need, done = 0, 0
    while done < length:
        got = os.preadv(fd, [view[done : done + _PIECE]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends before byte {offset + length}")
        need += _structure(buf[done : done + got])
        done += got
        if need + 3 * length > budget:
            raise _over(where, need + 3 * length, budget)
    view.release()
    return buf


def load_file(path: str | os.PathLike[str], limit: int, what: str) -> Any:
    """Parse a whole JSON file (an index, a config) of at most ``limit`` bytes within the bounds above.

    Raises:
        LimitExceededError: larger than ``limit``, or over the memory budget (found while reading).
        MalformedCheckpointError: as :func:`parse`.
        UnsupportedFileTypeError: not a regular file.
    """
    from ._fs import open_file, os_error

    fd = open_file(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise LimitExceededError(
                f"{path} has {size} bytes, more than the {limit} a {what} may have; it is not a real one. "
                "Fix or remove it."
            )
        raw = read_json_bytes(fd, 0, size, f"the {what} {path}")
    except EOFError as exc:
        raise MalformedCheckpointError(f"{path} changed while it was read ({exc}); retry.") from None
    except OSError as exc:
        raise os_error(path, exc) from exc
    finally:
        os.close(fd)
    return parse(raw, f"the {what} {path}")


def _over(where: str, need: int, budget: int) -> LimitExceededError:
    return LimitExceededError(
        f"{where}: parsing this JSON would need about {need >> 20} MiB of memory, more than the "
        f"{budget >> 20} MiB allowed; a real checkpoint's JSON is far smaller."
    )


def estimate(raw: bytes | bytearray | str) -> int:
    """Bytes of memory :func:`parse` may need for ``raw``: three copies of the text plus its structure."""
    return 3 * len(raw) + _structure(raw)


def _structure(raw: bytes | bytearray | str) -> int:
    if isinstance(raw, str):
        opens, arrays = raw.count("{"), raw.count("[")
        items = raw.count(",") + raw.count(":")
    else:
        opens, arrays = raw.count(b"{"), raw.count(b"[")
        items = raw.count(b",") + raw.count(b":")
    return _PER_OBJECT * opens + _PER_ARRAY * arrays + _PER_ITEM * items


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_tree(value: Any, where: str, max_depth: int) -> None:
    """Depth and string validity of a parsed value, without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                _check_string(item, where)
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise LimitExceededError(f"{where}: the JSON is nested deeper than {max_depth} levels.")
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not key.isascii():
                        _check_string(key, where)
                    stack.append((sub, depth + 1))
            else:
                stack.extend((sub, depth + 1) for sub in item)


def _check_string(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedCheckpointError(
            f"{where}: the string {text[:60]!r} holds a lone surrogate ({text[exc.start]!r}), which is not valid "
            "Unicode; safetensors and JSON writers refuse it."
        ) from None


def parse_text(text: str, where: str, *, max_depth: int = MAX_DEPTH, budget: int = PARSE_BUDGET) -> Any:
    """:func:`parse` for a JSON text already decoded (e.g. a metadata value)."""
    need = estimate(text)
    if need > budget:
        raise _over(where, need, budget)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise LimitExceededError(f"{where}: the JSON is nested deeper than {max_depth} levels.") from None
    except ValueError as exc:
        raise MalformedCheckpointError(f"{where} is not JSON ({exc}).") from None
    _check_tree(value, where, max_depth)
    return value


def parse(raw: bytes | bytearray, where: str, *, max_depth: int = MAX_DEPTH, budget: int = PARSE_BUDGET) -> Any:
    """Parse UTF-8 JSON within the bounds above.

    Args:
        raw: the JSON text as stored.
        where: names the file (and part) in messages, e.g. ``"model.safetensors: the header"``.

    Raises:
        LimitExceededError: too deep, or too much memory needed.
        MalformedCheckpointError: not UTF-8, not JSON, a duplicate key, a lone surrogate.
    """
    need = estimate(raw)
    if need > budget:  # checked on the bytes, before a decoded copy exists
        raise _over(where, need, budget)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedCheckpointError(f"{where} is not valid UTF-8 (at byte {exc.start}).") from None
    return parse_text(text, where, max_depth=max_depth, budget=budget)
