"""Look at and edit what :func:`._pickle.parse` built: never recursive, never a full repr.

The tree may be deep (lists and dicts nest without limit), shared (memo references) or
cyclic (a list that contains itself), so nothing here recurses over it, and
:func:`describe` names a value for an error message without printing the tree below it.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Global", "Instance", "PStr", "Persistent", "PickleError", "PickleLimitError", "PickleTruncatedError", "children",
    "describe", "mapping_items", "substitute",
]  # fmt: skip

class PickleError(Exception):
    """The byte stream is not a pickle this module can read (the caller adds the file name)."""


class PickleTruncatedError(PickleError):
    """The bytes end before the pickle's STOP opcode (a truncated file, or a window too short)."""


class PickleLimitError(PickleError):
    """The pickle exceeds one of this reader's limits (nesting, object budget, hostile keys)."""


# String opcodes whose payload we can re-encode: opcode byte -> width of the length field.
_LENGTH_WIDTH = {b"X"[0]: 4, b"\x8c"[0]: 1, b"\x8d"[0]: 8}
_LENGTH_FORMAT = {1: "<B", 4: "<I", 8: "<Q"}


class PStr(str):
    """A string from the pickle, with the offset and opcode byte that produced it."""

    __slots__ = ("opcode", "pos")
    pos: int
    opcode: int

    def __new__(cls, value: str, pos: int, opcode: int) -> PStr:
        obj = super().__new__(cls, value)
        obj.pos = pos
        obj.opcode = opcode
        return obj


@dataclass(frozen=True, slots=True)
class Global:
    """A ``module.name`` reference in the pickle; never imported."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, repr=False, slots=True)
class Instance:
    """An object the pickle would build by calling ``func`` (REDUCE, NEWOBJ, OBJ...); never called."""

    func: Any
    args: Any
    kind: str = "reduce"
    kwargs: Any = None
    items: list[tuple[Any, Any]] | None = None
    listitems: list[Any] | None = None
    state: Any = None

    def is_call_to(self, *qualnames: str) -> bool:
        return isinstance(self.func, Global) and self.func.qualname in qualnames

    def __repr__(self) -> str:  # never the (possibly huge, deep or cyclic) tree below it
        return f"<{self.kind} of {self.func.qualname if isinstance(self.func, Global) else type(self.func).__name__}>"


@dataclass(eq=False, repr=False, slots=True)
class Persistent:
    """A persistent id (torch uses them for tensor storages)."""

    pid: Any

    def __repr__(self) -> str:
        return "<persistent id>"


def mapping_items(node: Any) -> list[tuple[Any, Any]] | None:
    """The ``(key, value)`` pairs of a dict or of a dict-like :class:`Instance` (e.g. OrderedDict), else None."""
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, Instance) and (node.items is not None or node.is_call_to("collections.OrderedDict")):
        return list(node.items or [])
    return None


def children(node: Any) -> Iterator[Any]:
    """The objects directly referenced by ``node`` (dict keys excluded)."""
    if isinstance(node, Mapping):
        yield from node.values()
    elif isinstance(node, (list, tuple, set, frozenset)):
        yield from node
    elif isinstance(node, Instance):
        yield node.func
        yield node.args
        if node.kwargs is not None:
            yield node.kwargs
        for _, value in node.items or ():
            yield value
        yield from node.listitems or ()
        if node.state is not None:
            yield node.state
    elif isinstance(node, Persistent):
        yield node.pid


def describe(value: Any, limit: int = 80) -> str:
    """A short one-line name for a parsed value, for messages (a string's repr, cut; else its kind)."""
    if isinstance(value, str):
        text = repr(str(value))
        return text if len(text) <= limit else text[: limit - 4] + "...'"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, (tuple, list, dict, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    return repr(value) if isinstance(value, Instance) else f"a {type(value).__name__}"


def substitute(
    data: bytes, base: int, renames: Iterable[tuple[PStr, str]], frames: Iterable[tuple[int, int]] = ()
) -> bytes:
    """Return ``data`` (a pickle that starts at offset ``base``) with the given strings replaced.

    Each :class:`PStr` is re-encoded with its own opcode and the lengths of the protocol-4
    frames around it are corrected; every other byte is kept. Only the result is allocated.

    Raises:
        PickleError: a string was produced by an opcode that cannot be re-encoded (protocol 0).
    """
    edits: dict[int, tuple[int, bytes]] = {}  # offset in data -> (bytes replaced, replacement)
    for old, new in renames:
        width = _LENGTH_WIDTH.get(old.opcode)
        if width is None:
            raise PickleError(f"cannot rewrite the string {describe(old)}: it uses an old pickle text encoding")
        at = old.pos - base
        (length,) = struct.unpack(_LENGTH_FORMAT[width], data[at + 1 : at + 1 + width])
        payload = new.encode("utf-8", "surrogatepass")
        encoded = bytes([old.opcode]) + struct.pack(_LENGTH_FORMAT[width], len(payload)) + payload
        edits[at] = (1 + width + length, encoded)
    ordered = sorted(edits)
    lost_before = [0, *itertools.accumulate(edits[e][0] - len(edits[e][1]) for e in ordered)]
    for pos, length in frames:
        at, start = pos - base, pos - base + 9
        first, last = bisect.bisect_left(ordered, start), bisect.bisect_left(ordered, start + length)
        lost = lost_before[last] - lost_before[first]
        if lost:
            edits[at] = (9, b"\x95" + struct.pack("<Q", length - lost))
    view = memoryview(data)
    pieces: list[Any] = []
    cursor = 0
    for at in sorted(edits):
        size, replacement = edits[at]
        pieces += [view[cursor:at], replacement]
        cursor = at + size
    pieces.append(view[cursor:])
    return b"".join(pieces)
