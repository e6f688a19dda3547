"""Read a pickle without running it, and rewrite some of its strings in place.

:func:`parse` interprets the opcode stream on a private stack machine: a global becomes a
:class:`Global` record (nothing is imported), a call becomes an :class:`Instance` record
(nothing is called), a persistent id becomes a :class:`Persistent` record. Every string
keeps the position of the opcode that produced it (:class:`PStr`), so :func:`substitute`
can later change chosen strings and leave every other byte of the stream as it was.
"""

from __future__ import annotations

import io
import pickletools
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

__all__ = [
    "Global",
    "Instance",
    "PStr",
    "Parsed",
    "Persistent",
    "PickleError",
    "children",
    "mapping_items",
    "parse",
    "substitute",
]

MAX_DEPTH = 10_000
"""Deeper MARK nesting than this is refused (no real checkpoint comes close)."""

# String opcodes whose payload we can re-encode: opcode byte -> width of the length field.
_LENGTH_WIDTH = {b"X"[0]: 4, b"\x8c"[0]: 1, b"\x8d"[0]: 8}
_LENGTH_FORMAT = {1: "<B", 4: "<I", 8: "<Q"}


class PickleError(Exception):
    """The byte stream is not a pickle this module can read (the caller adds the file name)."""


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


@dataclass(frozen=True)
class Global:
    """A ``module.name`` reference in the pickle; never imported."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
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


@dataclass(eq=False)
class Persistent:
    """A persistent id (torch uses them for tensor storages)."""

    pid: Any


@dataclass
class Parsed:
    """The result of :func:`parse`: the object tree and facts about the stream."""

    root: Any
    start: int
    end: int
    protocol: int
    globals: list[Global] = field(default_factory=list)
    frames: list[tuple[int, int]] = field(default_factory=list)  # (offset of a FRAME opcode, frame length)


class _Mark:
    """Sentinel the stack machine keeps on its stack for MARK."""


def parse(source: bytes | BinaryIO, *, start: int | None = None) -> Parsed:
    """Interpret one pickle from ``source`` (bytes, or a file positioned at its start).

    Returns the object tree; strings are :class:`PStr` with offsets relative to the start
    of ``source`` (absolute file offsets for a file).

    Raises:
        PickleError: truncated or malformed stream, or a construct this reader does not support.
    """
    stream: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    begin = stream.tell() if start is None else start
    machine = _Machine()
    try:
        for op, arg, pos in pickletools.genops(stream):
            machine.step(op.code, op.name, arg, pos if pos is not None else 0)
            if op.name == "STOP":
                break
    except PickleError:
        raise
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
        raise PickleError(f"malformed pickle ({exc})") from exc
    if not machine.done:
        raise PickleError("the pickle ends before its STOP opcode")
    return Parsed(
        machine.result, begin, stream.tell(), machine.protocol, list(machine.globals.values()), machine.frames
    )


class _Machine:
    """The stack machine behind :func:`parse`; one method per opcode family."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.globals: dict[tuple[str, str], Global] = {}
        self.protocol = 0
        self.frames: list[tuple[int, int]] = []
        self.done = False
        self.result: Any = None

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise PickleError("malformed pickle (MARK missing)")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def glob(self, module: str, name: str) -> Global:
        return self.globals.setdefault((module, name), Global(module, name))

    def step(self, code: str, name: str, arg: Any, pos: int) -> None:
        stack = self.stack
        if isinstance(arg, str) and name in _STRING_OPS:
            stack.append(PStr(arg, pos, ord(code)))
        elif name in _PUSH_ARG:
            stack.append(arg)
        elif name in _CONST:
            stack.append(_CONST[name]())
        elif name == "MARK":
            if len(self.metastack) >= MAX_DEPTH:
                raise PickleError("pickle nested too deeply")
            self.metastack.append(stack)
            self.stack = []
        elif name in _HANDLERS:
            _HANDLERS[name](self, arg)
        elif name in ("PROTO",):
            self.protocol = int(arg)
        elif name == "FRAME":
            self.frames.append((pos, int(arg)))
        elif name == "STOP":
            self.result = stack.pop()
            self.done = True
        else:
            raise PickleError(f"unsupported pickle opcode {name}")


_STRING_OPS = frozenset(
    {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
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
        m.stack.append(items)

    return handler


def _dict_from(items: list[Any]) -> dict[Any, Any]:
    return {items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)}


def _setitems(m: _Machine, pairs: list[Any]) -> None:
    target = m.stack[-1]
    if len(pairs) % 2:
        raise PickleError("malformed pickle (odd SETITEMS)")
    if isinstance(target, dict):
        target.update(_dict_from(pairs))
    elif isinstance(target, Instance):
        target.items = (target.items or []) + [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    else:
        raise PickleError(f"malformed pickle (SETITEM on {type(target).__name__})")


def _appends(m: _Machine, items: list[Any]) -> None:
    target = m.stack[-1]
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, Instance):
        target.listitems = (target.listitems or []) + items
    else:
        raise PickleError(f"malformed pickle (APPEND on {type(target).__name__})")


def _additems(m: _Machine, items: list[Any]) -> None:
    target = m.stack[-1]
    if not isinstance(target, set):
        raise PickleError("malformed pickle (ADDITEMS on a non-set)")
    target.update(items)


def _build(m: _Machine, _: Any) -> None:
    state = m.stack.pop()
    target = m.stack[-1]
    if not isinstance(target, Instance):
        raise PickleError(f"malformed pickle (BUILD on {type(target).__name__})")
    target.state = state


def _global(m: _Machine, arg: Any) -> None:
    module, _, name = str(arg).partition(" ")
    m.stack.append(m.glob(module, name))


def _stack_global(m: _Machine, _: Any) -> None:
    name, module = m.stack.pop(), m.stack.pop()
    if not isinstance(name, str) or not isinstance(module, str):
        raise PickleError("malformed pickle (STACK_GLOBAL needs two strings)")
    m.stack.append(m.glob(str(module), str(name)))


def _reduce(m: _Machine, _: Any) -> None:
    args = m.stack.pop()
    m.stack[-1] = Instance(m.stack[-1], args)


def _newobj(m: _Machine, _: Any) -> None:
    args = m.stack.pop()
    m.stack[-1] = Instance(m.stack[-1], args, kind="newobj")


def _newobj_ex(m: _Machine, _: Any) -> None:
    kwargs, args = m.stack.pop(), m.stack.pop()
    m.stack[-1] = Instance(m.stack[-1], args, kind="newobj_ex", kwargs=kwargs)


def _push_marked(m: _Machine, build: Any) -> None:
    items = m.pop_mark()  # first: it replaces m.stack
    m.stack.append(build(items))


def _inst(m: _Machine, arg: Any) -> None:
    module, _, name = str(arg).partition(" ")
    args = tuple(m.pop_mark())
    m.stack.append(Instance(m.glob(module, name), args, kind="obj"))


def _obj(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    if not items:
        raise PickleError("malformed pickle (OBJ without a class)")
    m.stack.append(Instance(items[0], tuple(items[1:]), kind="obj"))


def _put(m: _Machine, arg: Any) -> None:
    if not m.stack:
        raise PickleError("malformed pickle (PUT on an empty stack)")
    m.memo[len(m.memo) if arg is None else int(arg)] = m.stack[-1]


def _get(m: _Machine, arg: Any) -> None:
    if int(arg) not in m.memo:
        raise PickleError(f"malformed pickle (memo {arg} read before it is written)")
    m.stack.append(m.memo[int(arg)])


def _persid(m: _Machine, arg: Any) -> None:
    m.stack.append(Persistent(arg))


def _binpersid(m: _Machine, _: Any) -> None:
    m.stack.append(Persistent(m.stack.pop()))


def _unsupported(what: str) -> Any:
    def handler(m: _Machine, _: Any) -> None:
        raise PickleError(f"unsupported pickle construct: {what}")

    return handler


_HANDLERS = {
    "POP": _pop,
    "POP_MARK": lambda m, _: m.pop_mark(),
    "DUP": lambda m, _: m.stack.append(m.stack[-1]),
    "TUPLE": lambda m, _: _push_marked(m, tuple),
    "TUPLE1": _tuple_n(1),
    "TUPLE2": _tuple_n(2),
    "TUPLE3": _tuple_n(3),
    "LIST": lambda m, _: _push_marked(m, list),
    "DICT": lambda m, _: _push_marked(m, _dict_from),
    "FROZENSET": lambda m, _: _push_marked(m, frozenset),
    "APPEND": lambda m, _: _appends(m, [m.stack.pop()]),
    "APPENDS": lambda m, _: _appends(m, m.pop_mark()),
    "SETITEM": lambda m, _: _setitems(m, [m.stack.pop(-2), m.stack.pop()]),
    "SETITEMS": lambda m, _: _setitems(m, m.pop_mark()),
    "ADDITEMS": lambda m, _: _additems(m, m.pop_mark()),
    "BUILD": _build,
    "GLOBAL": _global,
    "STACK_GLOBAL": _stack_global,
    "REDUCE": _reduce,
    "NEWOBJ": _newobj,
    "NEWOBJ_EX": _newobj_ex,
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


# --- walking the tree --------------------------------------------------------------------


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


# --- rewriting strings in place ---------------------------------------------------------


def substitute(
    data: bytes, base: int, renames: Iterable[tuple[PStr, str]], frames: Iterable[tuple[int, int]] = ()
) -> bytes:
    """Return ``data`` (a pickle that starts at offset ``base``) with the given strings replaced.

    Each :class:`PStr` is re-encoded with its own opcode and the lengths of the protocol-4
    frames around it are corrected; every other byte is kept.

    Raises:
        PickleError: a string was produced by an opcode that cannot be re-encoded (protocol 0).
    """
    edits: dict[int, tuple[int, bytes]] = {}  # offset in data -> (bytes replaced, replacement)
    for old, new in renames:
        width = _LENGTH_WIDTH.get(old.opcode)
        if width is None:
            raise PickleError(f"cannot rewrite the string {str(old)!r}: it uses an old pickle text encoding")
        at = old.pos - base
        (length,) = struct.unpack(_LENGTH_FORMAT[width], data[at + 1 : at + 1 + width])
        payload = new.encode("utf-8", "surrogatepass")
        encoded = bytes([old.opcode]) + struct.pack(_LENGTH_FORMAT[width], len(payload)) + payload
        edits[at] = (1 + width + length, encoded)
    for pos, length in frames:
        at, start = pos - base, pos - base + 9
        lost = sum(size - len(new) for e, (size, new) in edits.items() if start <= e < start + length)
        if lost:
            edits[at] = (9, b"\x95" + struct.pack("<Q", length - lost))
    out = bytearray()
    cursor = 0
    for at in sorted(edits):
        size, replacement = edits[at]
        out += data[cursor:at] + replacement
        cursor = at + size
    out += data[cursor:]
    return bytes(out)
