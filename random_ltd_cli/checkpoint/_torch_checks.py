"""What torch's loader checks in a torch file besides its globals, checked before anything is written.

torch.load refuses persistent ids that are not tensor storages, rebuild calls with the wrong
number of arguments, tensors whose sizes and strides reach past their storage, and archives whose
version, byteorder or serialization-id records it cannot read. random-ltd refuses the same files,
instead of copying them into equally unloadable outputs.
"""

from __future__ import annotations

from typing import Any

from ._pickle import Global, Instance, Persistent, PickleError, describe
from ._torch_names import walk
from ._zip import ZipError, ZipRecord, read_record

__all__ = ["ITEMSIZE", "check_loaded_ids", "check_small_records", "check_tensors", "storages"]

ITEMSIZE = {
    "FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "QInt8Storage": 1, "QUInt8Storage": 1,
    "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1,
}  # fmt: skip


def storages(root: Any, calls: list[Instance] | None = None) -> dict[str, tuple[str, int]]:
    """Storage key -> (storage class name, element count), from the persistent ids in the tree.

    ``calls``, if given, receives every call record met on the way (for :func:`check_tensors`).
    Every persistent id must be what torch's loader accepts: ``("storage", <storage class>, key,
    location, element count, ...)``.

    Raises:
        PickleError: another kind of persistent id, a storage of an unknown type, a negative or
            contradictory element count.
    """
    found: dict[str, tuple[str, int]] = {}
    for node in walk(root):
        if calls is not None and isinstance(node, Instance) and isinstance(node.func, Global):
            calls.append(node)  # for check_tensors, without a second walk over a large tree
        if not isinstance(node, Persistent):
            continue
        pid = node.pid
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise PickleError(f"a persistent id is not a tensor storage ({describe(pid)})")
        view = pid[5] if len(pid) == 6 else None  # legacy files: None or (view key, offset, size)
        if view is not None and not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                                     and type(view[1]) is int and type(view[2]) is int):  # fmt: skip
            raise PickleError(f"a storage view is malformed ({describe(view)})")
        _, kind, key, location, numel = pid[:5]
        if not (isinstance(kind, Global) and isinstance(key, str) and isinstance(location, str) and type(numel) is int):
            raise PickleError(f"a storage reference is malformed ({describe(key)})")
        if kind.name not in ITEMSIZE or numel < 0:
            raise PickleError(f"storage {describe(key)} has type {describe(kind.name)} and {numel} elements")
        if found.setdefault(str(key), (kind.name, numel)) != (kind.name, numel):
            raise PickleError(f"storage {describe(key)} is described twice, differently")
    return found


def check_loaded_ids(persistents: list[Persistent], *, width: int) -> None:
    """Every persistent id a pickle loads (torch's ``persistent_load`` sees each, even one that is popped at
    once) has exactly the ``width`` items torch unpacks: 5 in a ZIP archive, 6 in a legacy file.

    Raises:
        PickleError: one that torch.load would fail on.
    """
    for node in persistents:
        if not (isinstance(node.pid, tuple) and len(node.pid) == width):
            raise PickleError(f"a persistent id that torch.load cannot use ({describe(node.pid)})")


_ARITY = {  # torch._utils rebuild function -> (fewest, most) positional arguments torch has written
    "_rebuild_tensor": (4, 4), "_rebuild_tensor_v2": (6, 7), "_rebuild_tensor_v3": (7, 8),
    "_rebuild_parameter": (3, 3), "_rebuild_parameter_with_state": (4, 4),
}  # fmt: skip
_DTYPE_SIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "complex128": 16, "complex64": 8, "uint16": 2, "uint32": 4, "uint64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}  # fmt: skip


def check_tensors(calls: list[Instance], found: dict[str, tuple[str, int]]) -> None:
    """Every tensor rebuild call among ``calls`` has torch's number of arguments and stays inside its storage.

    Raises:
        PickleError: a call torch.load would reject.
    """
    for node in calls:
        if not (isinstance(node.func, Global) and node.func.module == "torch._utils"):
            continue
        limits = _ARITY.get(node.func.name)
        if limits is None:
            continue
        args = node.args
        if not isinstance(args, tuple) or not limits[0] <= len(args) <= limits[1]:
            count = len(args) if isinstance(args, tuple) else describe(args)
            raise PickleError(f"a call to torch._utils.{node.func.name} has {count} arguments")
        if node.func.name.startswith("_rebuild_tensor"):
            _check_extent(node.func.name, args, found)


def _check_extent(func: str, args: tuple[Any, ...], found: dict[str, tuple[str, int]]) -> None:
    storage, offset, size, stride = args[:4]
    if not (isinstance(storage, Persistent) and isinstance(storage.pid, tuple)):
        raise PickleError(f"a call to torch._utils.{func} has no storage")
    type_name, numel = found[str(storage.pid[2])]
    if func == "_rebuild_tensor_v3" or type_name == "UntypedStorage":  # the count is in bytes
        dtype = args[6] if func == "_rebuild_tensor_v3" else None
        width = _DTYPE_SIZE.get(dtype.name) if isinstance(dtype, Global) and dtype.module == "torch" else None
        if width is None:
            return  # a dtype of unknown width: torch checks it on load
        numel //= width
    if not (_ints(size) and _ints(stride) and type(offset) is int and len(size) == len(stride)):
        raise PickleError(f"a tensor's offset, sizes or strides are malformed ({describe(size)}, {describe(stride)})")
    if offset < 0 or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise PickleError("a tensor has a negative offset, size or stride")
    if all(size) and offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True)) + 1 > numel:
        raise PickleError(f"a tensor of sizes {size} and strides {stride} reaches past its storage of {numel} elements")


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def check_small_records(fd: int, records: dict[str, ZipRecord], prefix: str) -> None:
    """The ``version``, ``serialization_id`` and ``byteorder`` records torch reads must hold what it accepts."""
    version = records.get(f"{prefix}.data/version") or records.get(f"{prefix}version")
    if version is None:
        raise ZipError("the archive has no version record")
    text = read_record(fd, version, limit=64).strip()
    if not text.isdigit() or int(text) < 1:
        raise ZipError(f"the version record holds {text[:20]!r}, not a format version")
    serial = records.get(f"{prefix}.data/serialization_id")
    if serial is not None:
        try:
            read_record(fd, serial, limit=1024).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ZipError("the serialization_id record is not UTF-8 text") from exc
    byteorder = records.get(f"{prefix}byteorder")
    if byteorder is not None and read_record(fd, byteorder, limit=64) not in (b"little", b"big"):
        raise ZipError("the byteorder record is neither 'little' nor 'big'")
