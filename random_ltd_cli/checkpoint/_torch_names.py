"""Where parameter names live in a parsed torch checkpoint, and what they become.

Renamed (every occurrence, at any depth):

* the keys of every mapping with string keys and at least one tensor value: a bare state
  dict, Lightning's ``state_dict``, DeepSpeed's ``module``, ``{"model": ...}``, EMA copies...;
* the keys of a state dict's ``_metadata`` (module versions); when a wrapper and its inner
  layer meet at the same name, the later entry (torch writes the inner layer after its
  parent) wins, as ``dict`` assignment does;
* DeepSpeed's side tables: ``param_shapes`` (a dict, or a list of dicts in order),
  ``frozen_param_shapes``, ``buffer_names``, ``shared_params`` (keys and values),
  ``frozen_param_fragments`` and ZeRO's ``param_slice_mappings``.

Nothing here touches bytes: :func:`plan_renames` only says which strings change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..keys import rename_keys, strip_key
from ._pickle import Global, Instance, Persistent, PStr, children, describe, mapping_items

__all__ = [
    "CONTAINER_KEYS",
    "TreeRenames",
    "is_tensor",
    "main_state_dict",
    "plan_renames",
    "size_shape",
    "tensor_meta",
    "walk",
]

CONTAINER_KEYS = ("state_dict", "module", "model", "model_state_dict", "current_model_state", "model_state")
"""Keys under which checkpoints nest the model's state dict, in order of preference."""

SIDE_TABLES = frozenset(
    {"param_shapes", "frozen_param_shapes", "buffer_names", "shared_params", "frozen_param_fragments",
     "param_slice_mappings"}
)  # fmt: skip

REBUILD_CALLS = frozenset(
    f"torch._utils.{name}"
    for name in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
    )
) | {"torch._tensor._rebuild_from_type_v2"}  # fmt: skip

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}  # fmt: skip


_MAX_UNWRAP = 8


def is_tensor(node: Any) -> bool:
    """Whether ``node`` is a tensor or parameter record (a call to a torch rebuild function)."""
    return isinstance(node, Instance) and node.kind == "reduce" and node.is_call_to(*REBUILD_CALLS)


def _is_state_dict(pairs: list[tuple[Any, Any]]) -> bool:
    return bool(pairs) and all(isinstance(k, str) for k, _ in pairs) and any(is_tensor(v) for _, v in pairs)


@dataclass
class TreeRenames:
    """What :func:`plan_renames` found: string substitutions and the weight names they concern."""

    subs: dict[int, tuple[PStr, str]] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    _side: set[int] = field(default_factory=set)
    _weight: set[int] = field(default_factory=set)

    def add(self, old: Any, new: str, *, side: bool) -> None:
        if not isinstance(old, PStr):
            raise ValueError(f"the name {describe(old)} is not a plain pickled string and cannot be renamed")
        self.subs[old.pos] = (old, new)
        (self._side if side else self._weight).add(old.pos)

    @property
    def side_count(self) -> int:
        """Names renamed outside state dicts (side tables, module metadata)."""
        return len(self._side - self._weight)

    @property
    def side_renames(self) -> list[tuple[str, str]]:
        """``(old, new)`` of the names renamed outside state dicts, each pair once, in file order."""
        pairs = (self.subs[pos] for pos in sorted(self._side - self._weight))
        return list(dict.fromkeys((str(old), new) for old, new in pairs))


_LEAVES = frozenset({str, PStr, bytes, bytearray, int, float, bool, type(None), Global})
_SEQUENCES = frozenset({list, tuple, set, frozenset})


def walk(root: Any) -> Iterator[Any]:
    """Every container, record and persistent id reachable from ``root``, breadth first, each once.

    A loop, not a recursion: the tree may be deep, shared or cyclic. Dispatches on exact types
    (the parser builds only plain containers), which keeps it fast on large trees.
    """
    seen: set[int] = set()
    queue = deque([root])
    while queue:
        node = queue.popleft()
        kind = type(node)
        if kind in _LEAVES or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if kind is dict:
            queue.extend(node.values())
        elif kind in _SEQUENCES:
            queue.extend(node)
        else:
            queue.extend(children(node))


def _rename_mapping_keys(pairs: list[tuple[Any, Any]], plan: TreeRenames, *, side: bool) -> None:
    names = rename_keys(k for k, _ in pairs if isinstance(k, str))  # raises KeyCollisionError
    for old, new in names.items():
        if new != old:
            plan.add(old, new, side=side)


def _rename_strings(values: Iterable[Any], plan: TreeRenames) -> None:
    strings = [v for v in values if isinstance(v, str)]
    for old, new in rename_keys(strings).items():
        if new != old:
            plan.add(old, new, side=True)


def _side_table(name: str, value: Any, plan: TreeRenames) -> None:
    pairs = mapping_items(value)
    if pairs is not None:
        _rename_mapping_keys(pairs, plan, side=True)
        if name == "shared_params":
            for _, target in pairs:
                if isinstance(target, str) and strip_key(target) != target:
                    plan.add(target, strip_key(target), side=True)
    elif isinstance(value, (list, tuple)):
        _rename_strings(value, plan)
        for item in value:
            item_pairs = mapping_items(item)
            if item_pairs is not None:
                _rename_mapping_keys(item_pairs, plan, side=True)


def _module_metadata(node: Any, plan: TreeRenames) -> None:
    state_pairs = mapping_items(node.state) if isinstance(node, Instance) else None
    for key, value in state_pairs or ():
        if key == "_metadata":
            for prefix, _ in mapping_items(value) or ():
                if isinstance(prefix, str) and strip_key(prefix) != prefix:
                    plan.add(prefix, strip_key(prefix), side=True)


def plan_renames(root: Any) -> TreeRenames:
    """Find every name to strip in a parsed checkpoint.

    Raises:
        KeyCollisionError: two names in one mapping (or one side table) would become the same.
        ValueError: a name to rename is not stored as a plain pickled string.
    """
    plan = TreeRenames()
    for node in walk(root):
        pairs = mapping_items(node)
        if pairs is None:
            continue
        if _is_state_dict(pairs):
            names = rename_keys(k for k, _ in pairs)
            for old, new in names.items():
                plan.weights.setdefault(old, new)
                if new != old:
                    plan.add(old, new, side=False)
            _module_metadata(node, plan)
        for key, value in pairs:
            if isinstance(key, str) and key in SIDE_TABLES:
                _side_table(key, value, plan)
    return plan


def main_state_dict(root: Any) -> list[tuple[str, Any]]:
    """The model's weights: the root if it is a state dict, else the first nesting that holds one."""
    pairs = mapping_items(root)
    if pairs is not None and _is_state_dict(pairs):
        return pairs
    for key, value in pairs or ():
        if key in CONTAINER_KEYS:
            inner = mapping_items(value)
            if inner is not None and _is_state_dict(inner):
                return inner
    for node in walk(root):
        inner = mapping_items(node)
        if inner is not None and _is_state_dict(inner):
            return inner
    return []


def _storage(node: Any) -> tuple[Any, ...] | None:
    if isinstance(node, Persistent) and isinstance(node.pid, tuple) and len(node.pid) >= 5:
        return node.pid
    return None


def tensor_meta(node: Any) -> tuple[str, tuple[int, ...]]:
    """``(dtype, shape)`` of a tensor record, read from the rebuild call's arguments (``"unknown"`` if unclear)."""
    for _ in range(_MAX_UNWRAP):  # a parameter wraps a tensor; never follow a hostile chain far (no recursion)
        args = node.args if isinstance(node, Instance) and isinstance(node.args, tuple) else ()
        func = node.func.name if isinstance(node, Instance) and isinstance(node.func, Global) else ""
        if func in ("_rebuild_parameter", "_rebuild_parameter_with_state") and args:
            node = args[0]
        elif func == "_rebuild_from_type_v2" and len(args) >= 3 and isinstance(args[2], tuple):
            node = Instance(args[0], args[2])
        else:
            return _leaf_meta(func, args)
    return "unknown", ()


def _leaf_meta(func: str, args: tuple[Any, ...]) -> tuple[str, tuple[int, ...]]:
    if func == "_rebuild_meta_tensor_no_storage" and len(args) >= 2:
        return _dtype_name(args[0]), _shape(args[1])
    if func in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_qtensor") and len(args) >= 3:
        dtype = "unknown"
        if func == "_rebuild_tensor_v3" and len(args) >= 7:
            dtype = _dtype_name(args[6])
        pid = _storage(args[0])
        if dtype == "unknown" and pid is not None and isinstance(pid[1], Global):
            dtype = _STORAGE_DTYPES.get(pid[1].name, "unknown")
        return dtype, _shape(args[2])
    return "unknown", ()


def _dtype_name(node: Any) -> str:
    return node.name if isinstance(node, Global) and node.module == "torch" else "unknown"


def size_shape(node: Any) -> tuple[int, ...]:
    """The dimensions of a pickled ``torch.Size`` (or plain tuple) record; ``()`` if unclear."""
    return _shape(node)


def _shape(node: Any) -> tuple[int, ...]:
    if isinstance(node, Instance) and node.is_call_to("torch.Size") and isinstance(node.args, tuple) and node.args:
        node = node.args[0]
    if isinstance(node, tuple) and all(isinstance(d, int) for d in node):
        return tuple(node)
    return ()
