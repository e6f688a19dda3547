"""The opcode handlers of :mod:`._pickle`'s stack machine, and what each object costs in its budget."""

from __future__ import annotations

import pickletools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._pickle_tree import Global, Instance, Persistent, PickleError

if TYPE_CHECKING:  # pragma: no cover
    from ._pickle import _Machine

# Budget charges, in estimated bytes: per opcode, per list/tuple item, per dict/set item, per record.
OP_COST, _REF, _SLOT, OBJ_COST = 24, 16, 100, 120

STRING_OPS = frozenset(
    {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
OPCODE_BYTE = {op.name: ord(op.code) for op in pickletools.opcodes}
PUSH_ARG = frozenset(
    {
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
        "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    }
)  # fmt: skip
CONST: dict[str, Callable[[], Any]] = {
    "NONE": lambda: None,
    "NEWTRUE": lambda: True,
    "NEWFALSE": lambda: False,
    "EMPTY_TUPLE": tuple,
    "EMPTY_LIST": list,
    "EMPTY_DICT": dict,
    "EMPTY_SET": set,
}
CONST_COST = {"EMPTY_LIST": 64, "EMPTY_DICT": 96, "EMPTY_SET": 224}


def size_of_number(value: Any) -> int:
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
        m.charge(OBJ_COST + _REF * n)
        m.stack.append(m.hashable(items, items))

    return handler


def _marked_tuple(m: _Machine, _: Any) -> None:
    items = tuple(m.pop_mark())
    m.charge(OBJ_COST + _REF * len(items))
    m.stack.append(m.hashable(items, items))


def _marked_frozenset(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    m.check_keys(items)
    m.charge(OBJ_COST + 2 * _SLOT + _SLOT * len(items))
    m.stack.append(m.hashable(frozenset(items), items))  # members are checked before they are hashed


def _marked_list(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    m.charge(OBJ_COST + _REF * len(items))
    m.stack.append(items)


def _dict_from(m: _Machine, items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise PickleError("malformed pickle (a dict with an odd number of items)")
    keys = items[0::2]
    m.check_keys(keys)
    m.charge(OBJ_COST + _SLOT * len(keys))
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
    m.charge(OBJ_COST)
    m.stack.append(m.glob(module, name))


def _stack_global(m: _Machine, _: Any) -> None:
    name, module = m.pop(), m.pop()
    if not isinstance(name, str) or not isinstance(module, str):
        raise PickleError("malformed pickle (STACK_GLOBAL needs two strings)")
    m.charge(OBJ_COST)
    m.stack.append(m.glob(str(module), str(name)))


def _call(kind: str, with_kwargs: bool = False) -> Any:
    def handler(m: _Machine, _: Any) -> None:
        kwargs = m.pop() if with_kwargs else None
        args = m.pop()
        func = m.pop()
        if not isinstance(func, Global) or not isinstance(args, tuple):  # Python itself would fail to load it
            raise PickleError(f"malformed pickle ({kind.upper()} of a {type(func).__name__} with {type(args).__name__} "
                              "arguments; only a global called with a tuple can be loaded)")
        m.charge(OBJ_COST)
        m.stack.append(Instance(func, args, kind=kind, kwargs=kwargs))

    return handler


def _inst(m: _Machine, arg: Any) -> None:
    module, _, name = str(arg).partition(" ")
    args = tuple(m.pop_mark())
    m.charge(2 * OBJ_COST + _REF * len(args))
    m.stack.append(Instance(m.glob(module, name), m.hashable(args, args), kind="obj"))


def _obj(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    if not items:
        raise PickleError("malformed pickle (OBJ without a class)")
    args = tuple(items[1:])
    m.charge(2 * OBJ_COST + _REF * len(args))
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
    m.charge(OBJ_COST + len(str(arg)))
    m.stack.append(m.persistent(Persistent(arg)))


def _binpersid(m: _Machine, _: Any) -> None:
    m.charge(OBJ_COST)
    m.stack.append(m.persistent(Persistent(m.pop())))


def _unsupported(what: str) -> Any:
    def handler(m: _Machine, _: Any) -> None:
        raise PickleError(f"unsupported pickle construct: {what}")

    return handler


HANDLERS: dict[str, Callable[[_Machine, Any], None]] = {
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
