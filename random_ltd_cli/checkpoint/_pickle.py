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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._pickle_tree import Global, Instance, Persistent, PStr, children, describe, mapping_items, substitute

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
_OP, _REF, _SLOT, _OBJ = 24, 16, 100, 120  # cost: per opcode, per list/tuple item, per dict/set item, per record


class PickleError(Exception):
    """The byte stream is not a pickle this module can read (the caller adds the file name)."""


class PickleTruncatedError(PickleError):
    """The bytes end before the pickle's STOP opcode (a truncated file, or a window too short)."""


class PickleLimitError(PickleError):
    """The pickle exceeds one of this reader's limits (nesting, object budget, hostile keys)."""


@dataclass
class Parsed:
    """The result of :func:`parse`: the object tree and facts about the stream (offsets are absolute)."""

    root: Any = field(repr=False)
    start: int
    end: int
    protocol: int
    globals: list[Global] = field(default_factory=list)
    frames: list[tuple[int, int]] = field(default_factory=list)  # (offset of a FRAME opcode, frame length)


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
        machine.frames,
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
        for item in items:
            d, r = self.key_info(item)
            depth, risky = max(depth, d + 1), risky or r
        if depth > MAX_NESTING:
            raise PickleLimitError(f"the pickle nests tuples or sets deeper than {MAX_NESTING} levels")
        if depth > 1 or risky:
            self.nesting[id(container)] = (depth, risky, container)  # keeps it alive: ids stay unique
        return container

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
        self.cost += _OP
        self.ops += 1
        if self.ops > MAX_OPS:
            raise PickleLimitError(f"the pickle runs more than {MAX_OPS} opcodes (this reader's time budget)")
        if name in _STRING_OPS and isinstance(arg, str):
            self.charge(len(arg) * 4 + _OBJ)  # a PStr with its position: about 120 bytes, plus up to 4 per character
            self.stack.append(PStr(arg, pos, _OPCODE_BYTE[name]))
        elif name in _PUSH_ARG:
            self.charge(len(arg) + 64 if isinstance(arg, (bytes, bytearray)) else _size_of_number(arg))
            self.stack.append(arg)
        elif name in _CONST:
            self.charge(_CONST_COST.get(name, 0))
            self.stack.append(_CONST[name]())
        elif name == "MARK":
            if len(self.metastack) >= MAX_DEPTH:
                raise PickleLimitError(f"the pickle nests MARK deeper than {MAX_DEPTH} levels")
            self.charge(_OBJ)
            self.metastack.append(self.stack)
            self.stack = []
        elif name in _HANDLERS:
            _HANDLERS[name](self, arg)
        elif name == "PROTO":
            self.protocol = int(arg)
        elif name == "FRAME":
            self.frames.append((pos, int(arg)))
        elif name == "STOP":
            self.result = self.pop()
            self.done = True
        else:
            raise PickleError(f"unsupported pickle opcode {name}")


_STRING_OPS = frozenset(
    {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_OPCODE_BYTE = {op.name: ord(op.code) for op in pickletools.opcodes}
_PUSH_ARG = frozenset(
    {
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
        "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    }
)  # fmt: skip
_CONST: dict[str, Callable[[], Any]] = {
    "NONE": lambda: None,
    "NEWTRUE": lambda: True,
    "NEWFALSE": lambda: False,
    "EMPTY_TUPLE": tuple,
    "EMPTY_LIST": list,
    "EMPTY_DICT": dict,
    "EMPTY_SET": set,
}
_CONST_COST = {"EMPTY_LIST": 64, "EMPTY_DICT": 96, "EMPTY_SET": 224}


def _size_of_number(value: Any) -> int:
    return 32 + value.bit_length() // 8 if isinstance(value, int) else 32


def _pop(m: _Machine, _: Any) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


def _tuple_n(n: int) -> Any:
    def handler(m: _Machine, _: Any) -> None:
        if len(m.stack) < n:
            raise PickleError("malformed pickle (stack underflow)")
        items = tuple(m.stack[len(m.stack) - n :])
        del m.stack[len(m.stack) - n :]
        m.charge(_OBJ + _REF * n)
        m.stack.append(m.hashable(items, items))

    return handler


def _marked_tuple(m: _Machine, _: Any) -> None:
    items = tuple(m.pop_mark())
    m.charge(_OBJ + _REF * len(items))
    m.stack.append(m.hashable(items, items))


def _marked_frozenset(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    m.check_keys(items)
    m.charge(_OBJ + 2 * _SLOT + _SLOT * len(items))
    m.stack.append(m.hashable(frozenset(items), items))  # members are checked before they are hashed


def _marked_list(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    m.charge(_OBJ + _REF * len(items))
    m.stack.append(items)


def _dict_from(m: _Machine, items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise PickleError("malformed pickle (a dict with an odd number of items)")
    keys = items[0::2]
    m.check_keys(keys)
    m.charge(_OBJ + _SLOT * len(keys))
    return dict(zip(keys, items[1::2], strict=True))


def _setitems(m: _Machine, pairs: list[Any]) -> None:
    target = m.top()
    if len(pairs) % 2:
        raise PickleError("malformed pickle (odd SETITEMS)")
    if isinstance(target, dict):
        target.update(_dict_from(m, pairs))
    elif isinstance(target, Instance):
        m.charge(_SLOT * len(pairs))
        if target.items is None:
            target.items = []
        target.items.extend(zip(pairs[0::2], pairs[1::2], strict=True))  # in place: no quadratic copies
    else:
        raise PickleError(f"malformed pickle (SETITEM on {type(target).__name__})")


def _appends(m: _Machine, items: list[Any]) -> None:
    target = m.top()
    m.charge(_REF * len(items))
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, Instance):
        if target.listitems is None:
            target.listitems = []
        target.listitems.extend(items)
    else:
        raise PickleError(f"malformed pickle (APPEND on {type(target).__name__})")


def _additems(m: _Machine, items: list[Any]) -> None:
    target = m.top()
    if not isinstance(target, set):
        raise PickleError("malformed pickle (ADDITEMS on a non-set)")
    m.check_keys(items)
    m.charge(_SLOT * len(items))
    target.update(items)


def _build(m: _Machine, _: Any) -> None:
    state = m.pop()
    target = m.top()
    if not isinstance(target, Instance):
        raise PickleError(f"malformed pickle (BUILD on {type(target).__name__})")
    target.state = state


def _global(m: _Machine, arg: Any) -> None:
    module, _, name = str(arg).partition(" ")
    m.charge(_OBJ)
    m.stack.append(m.glob(module, name))


def _stack_global(m: _Machine, _: Any) -> None:
    name, module = m.pop(), m.pop()
    if not isinstance(name, str) or not isinstance(module, str):
        raise PickleError("malformed pickle (STACK_GLOBAL needs two strings)")
    m.charge(_OBJ)
    m.stack.append(m.glob(str(module), str(name)))


def _call(kind: str, with_kwargs: bool = False) -> Any:
    def handler(m: _Machine, _: Any) -> None:
        kwargs = m.pop() if with_kwargs else None
        args = m.pop()
        func = m.pop()
        m.charge(_OBJ)
        m.stack.append(Instance(func, args, kind=kind, kwargs=kwargs))

    return handler


def _inst(m: _Machine, arg: Any) -> None:
    module, _, name = str(arg).partition(" ")
    args = tuple(m.pop_mark())
    m.charge(2 * _OBJ + _REF * len(args))
    m.stack.append(Instance(m.glob(module, name), m.hashable(args, args), kind="obj"))


def _obj(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    if not items:
        raise PickleError("malformed pickle (OBJ without a class)")
    args = tuple(items[1:])
    m.charge(2 * _OBJ + _REF * len(args))
    m.stack.append(Instance(items[0], m.hashable(args, args), kind="obj"))


def _put(m: _Machine, arg: Any) -> None:
    key = len(m.memo) if arg is None else int(arg)
    if not 0 <= key < 1 << 32:
        raise PickleError(f"malformed pickle (memo index {key} out of range)")
    m.charge(_SLOT)
    m.memo[key] = m.top()


def _get(m: _Machine, arg: Any) -> None:
    key = int(arg)
    if not 0 <= key < 1 << 32 or key not in m.memo:
        raise PickleError("malformed pickle (a memo entry read before it is written)")
    m.stack.append(m.memo[key])


def _persid(m: _Machine, arg: Any) -> None:
    m.charge(_OBJ + len(str(arg)))
    m.stack.append(Persistent(arg))


def _binpersid(m: _Machine, _: Any) -> None:
    m.charge(_OBJ)
    m.stack.append(Persistent(m.pop()))


def _unsupported(what: str) -> Any:
    def handler(m: _Machine, _: Any) -> None:
        raise PickleError(f"unsupported pickle construct: {what}")

    return handler


_HANDLERS: dict[str, Callable[[_Machine, Any], None]] = {
    "POP": _pop,
    "POP_MARK": lambda m, _: m.pop_mark().clear(),
    "DUP": lambda m, _: m.stack.append(m.top()),
    "TUPLE": _marked_tuple,
    "TUPLE1": _tuple_n(1),
    "TUPLE2": _tuple_n(2),
    "TUPLE3": _tuple_n(3),
    "LIST": _marked_list,
    "DICT": lambda m, _: m.stack.append(_dict_from(m, m.pop_mark())),
    "FROZENSET": _marked_frozenset,
    "APPEND": lambda m, _: _appends(m, [m.pop()]),
    "APPENDS": lambda m, _: _appends(m, m.pop_mark()),
    "SETITEM": lambda m, _: _setitems(m, [m.pop(), m.pop()][::-1]),
    "SETITEMS": lambda m, _: _setitems(m, m.pop_mark()),
    "ADDITEMS": lambda m, _: _additems(m, m.pop_mark()),
    "BUILD": _build,
    "GLOBAL": _global,
    "STACK_GLOBAL": _stack_global,
    "REDUCE": _call("reduce"),
    "NEWOBJ": _call("newobj"),
    "NEWOBJ_EX": _call("newobj_ex", with_kwargs=True),
    "INST": _inst,
    "OBJ": _obj,
    "PUT": _put,
    "BINPUT": _put,
    "LONG_BINPUT": _put,
    "MEMOIZE": lambda m, _: _put(m, None),
    "GET": _get,
    "BINGET": _get,
    "LONG_BINGET": _get,
    "PERSID": _persid,
    "BINPERSID": _binpersid,
    "EXT1": _unsupported("extension registry codes"),
    "EXT2": _unsupported("extension registry codes"),
    "EXT4": _unsupported("extension registry codes"),
    "NEXT_BUFFER": _unsupported("out-of-band buffers"),
    "READONLY_BUFFER": _unsupported("out-of-band buffers"),
}
