"""Read a pickle without running it, within fixed limits.

:func:`parse` interprets the opcode stream on a private stack machine: a global becomes a
:class:`Global` record (nothing is imported), a call becomes an :class:`Instance` record
(nothing is called), a persistent id becomes a :class:`Persistent` record. Every string
keeps the position of the opcode that produced it (:class:`PStr`), so
:func:`._pickle_tree.substitute` can later change chosen strings and leave every other
byte of the stream as it was.

The reader is built for hostile input. It reads only from a bytes object (so no length
field can make it allocate more than the input holds), never recurses over the object
tree, keeps every hashable container (tuples, frozensets) at most :data:`MAX_NESTING`
levels deep (Python hashes and compares them recursively in C), refuses dict keys that
could be made to collide in Python's hash table, and charges every object it builds to a
budget of :data:`MAX_COST` estimated bytes, which also bounds its running time.
"""

from __future__ import annotations

import io
import pickletools
import struct
from dataclasses import dataclass, field
from typing import Any

from ._pickle_ops import (
    CONST,
    CONST_COST,
    HANDLERS,
    OBJ_COST,
    OP_COST,
    OPCODE_BYTE,
    PUSH_ARG,
    STRING_OPS,
    size_of_number,
)
from ._pickle_tree import (
    Global,
    Instance,
    Persistent,
    PickleError,
    PickleLimitError,
    PickleTruncatedError,
    PStr,
    children,
    describe,
    mapping_items,
    substitute,
)

__all__ = [
    "MAX_COST",
    "MAX_NESTING",
    "Global",
    "Instance",
    "PStr",
    "Parsed",
    "Persistent",
    "PickleError",
    "PickleLimitError",
    "PickleTruncatedError",
    "children",
    "describe",
    "mapping_items",
    "parse",
    "substitute",
]

MAX_DEPTH = 10_000
"""Deeper MARK nesting than this is refused (no real checkpoint comes close)."""
MAX_NESTING = 1_000
"""Tuples and frozensets nested deeper than this are refused (real checkpoints nest a few levels)."""
MAX_COST = 80 << 20
"""Estimated bytes of Python objects one pickle may build (about 25,000 tensors in one state dict)."""
MAX_OPS = 1_000_000
"""Opcodes one pickle may run (about 40,000 tensors); bounds the time a hostile pickle can take."""
MAX_RISKY_KEYS = 1_000
"""Dict keys and set members whose hash an attacker could choose (huge integers) allowed per pickle."""

_SMALL_INT = 1 << 60  # ints below this in magnitude have distinct hashes (Python hashes ints modulo 2**61 - 1)


@dataclass
class Parsed:
    """The result of :func:`parse`: the object tree and facts about the stream (offsets are absolute)."""

    root: Any = field(repr=False)
    start: int
    end: int
    protocol: int
    globals: list[Global] = field(default_factory=list)
    frames: list[tuple[int, int]] = field(default_factory=list)  # (offset of a FRAME opcode, frame length)
    persistents: list[Persistent] = field(default_factory=list)  # every persistent id loaded, reachable or not
    opcodes: set[str] = field(default_factory=set)  # the names of the opcodes the stream uses


def parse(data: bytes, offset: int = 0, *, base: int = 0) -> Parsed:
    """Interpret the pickle that starts at ``data[offset]``.

    ``base`` is the absolute position of ``data[0]`` (e.g. its offset in a file); strings
    (:class:`PStr`), frames and :attr:`Parsed.start`/``end`` carry absolute positions.

    Raises:
        PickleTruncatedError: ``data`` ends before the pickle's STOP opcode.
        PickleLimitError: nesting, object budget or key rules exceeded.
        PickleError: malformed stream, or a construct this reader does not support.
    """
    stream = io.BytesIO(data)
    stream.seek(offset)
    machine = _Machine(base)
    try:
        for op, arg, pos in pickletools.genops(stream):
            machine.step(op.name, arg, base + (pos or 0))
            if machine.done:
                break
    except PickleError:
        raise
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
        if stream.tell() >= len(data):
            raise PickleTruncatedError("the pickle ends before its STOP opcode (truncated)") from exc
        raise PickleError(f"malformed pickle ({_one_line(exc)})") from exc
    if not machine.done:
        raise PickleTruncatedError("the pickle ends before its STOP opcode (truncated)")
    return Parsed(
        machine.result, base + offset, base + stream.tell(), machine.protocol, list(machine.globals.values()),
        machine.frames, machine.persistents, machine.opcodes,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


class _Machine:
    """The stack machine behind :func:`parse`; one function per opcode family."""

    def __init__(self, base: int) -> None:
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.globals: dict[tuple[str, str], Global] = {}
        self.protocol = 0
        self.frames: list[tuple[int, int]] = []
        self.persistents: list[Persistent] = []
        self.opcodes: set[str] = set()
        self.done = False
        self.result: Any = None
        self.cost = 0
        self.ops = 0
        self.risky = 0
        self.nesting: dict[int, tuple[int, bool, Any]] = {}  # id -> (depth, holds a risky int, the object)

    def charge(self, amount: int) -> None:
        self.cost += amount
        if self.cost > MAX_COST:
            raise PickleLimitError(
                f"the pickle builds more than {MAX_COST >> 20} MiB of objects (this reader's memory budget)"
            )

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise PickleError("malformed pickle (MARK missing)")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise PickleError("malformed pickle (stack underflow)")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise PickleError("malformed pickle (stack underflow)")
        return self.stack[-1]

    def glob(self, module: str, name: str) -> Global:
        return self.globals.setdefault((module, name), Global(module, name))

    # --- hashable containers: depth and hash safety ---------------------------------------

    def key_info(self, obj: Any) -> tuple[int, bool]:
        """(nesting depth, whether it holds an int whose hash an attacker can choose) of a hashable value."""
        kind = type(obj)
        if kind is int:
            return 0, not -_SMALL_INT < obj < _SMALL_INT
        if kind is tuple or kind is frozenset:
            depth, risky, _ = self.nesting.get(id(obj), (1, False, None))
            return depth, risky
        return 0, False

    def hashable(self, container: tuple[Any, ...] | frozenset[Any], items: Any) -> Any:
        """Record a new tuple's or frozenset's depth; refuse it past MAX_NESTING."""
        depth, risky = 1, False
        for item in items:  # key_info, inlined: this runs for every tuple of every tensor record
            kind = type(item)
            if kind is int:
                risky = risky or not -_SMALL_INT < item < _SMALL_INT
            elif kind is tuple or kind is frozenset:
                d, r, _ = self.nesting.get(id(item), (1, False, None))
                depth, risky = max(depth, d + 1), risky or r
        if depth > MAX_NESTING:
            raise PickleLimitError(f"the pickle nests tuples or sets deeper than {MAX_NESTING} levels")
        if depth > 1 or risky:
            self.nesting[id(container)] = (depth, risky, container)  # keeps it alive: ids stay unique
        return container

    def persistent(self, node: Persistent) -> Persistent:
        """Record a persistent id (the unpickler's ``persistent_load`` sees each, even one popped at once)."""
        self.persistents.append(node)
        return node

    def check_keys(self, keys: Any) -> None:
        """Count keys whose hash could be chosen to collide (refused past MAX_RISKY_KEYS)."""
        for key in keys:
            if self.key_info(key)[1]:
                self.risky += 1
                if self.risky > MAX_RISKY_KEYS:
                    raise PickleLimitError(
                        f"the pickle uses more than {MAX_RISKY_KEYS} huge integers as dict keys or set members"
                    )

    # --- the opcode loop ------------------------------------------------------------------

    def step(self, name: str, arg: Any, pos: int) -> None:
        self.ops += 1
        if self.ops > MAX_OPS:
            raise PickleLimitError(f"the pickle runs more than {MAX_OPS} opcodes (this reader's time budget)")
        self.cost += OP_COST
        self.opcodes.add(name)
        handler = HANDLERS.get(name)
        if handler is not None:  # the common case first: memo, tuples, calls, items
            handler(self, arg)
        elif name in STRING_OPS and isinstance(arg, str):
            self.charge(len(arg) * 4 + OBJ_COST)  # a PStr with its position: ~120 bytes, up to 4 per character
            self.stack.append(PStr(arg, pos, OPCODE_BYTE[name]))
        elif name in PUSH_ARG:
            self.charge(len(arg) + 64 if isinstance(arg, (bytes, bytearray)) else size_of_number(arg))
            self.stack.append(arg)
        elif name in CONST:
            self.charge(CONST_COST.get(name, 0))
            self.stack.append(CONST[name]())
        elif name == "MARK":
            if len(self.metastack) >= MAX_DEPTH:
                raise PickleLimitError(f"the pickle nests MARK deeper than {MAX_DEPTH} levels")
            self.charge(OBJ_COST)
            self.metastack.append(self.stack)
            self.stack = []
        elif name == "PROTO":
            self.protocol = int(arg)
            if self.protocol > 5:  # pickle.HIGHEST_PROTOCOL of the Pythons torch supports: they refuse it
                raise PickleError(f"unsupported pickle protocol {self.protocol}")
        elif name == "FRAME":
            self.frames.append((pos, int(arg)))
        elif name == "STOP":
            self.result = self.pop()
            self.done = True
        else:
            raise PickleError(f"unsupported pickle opcode {name}")
