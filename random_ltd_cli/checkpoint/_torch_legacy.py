"""torch's legacy layout (``_use_new_zipfile_serialization=False``): five pickles, then the raw storages.

The file holds, in order: the magic number, the format version, a system-info dict, the
main pickle (the object, with storages as persistent ids), the list of storage keys, and
for each key an 8-byte element count followed by the storage's bytes. Every one of the
five pickles is checked (torch unpickles all of them), and the storages are walked by
their counts, which must equal what the main pickle says, up to the exact end of the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from ._io import pread_exact
from ._pickle import Instance, Parsed, PickleError, PickleLimitError, PickleTruncatedError, describe, parse
from ._torch_checks import ITEMSIZE, check_loaded_ids, check_tensors, storages

__all__ = ["LEGACY_MAGIC", "MAX_PICKLE", "parse_at", "read_legacy"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE = 32 << 20
"""Bytes in one pickle (a state dict's is about 130 bytes per tensor): larger ones are refused."""


def parse_at(fd: int, size: int, offset: int) -> tuple[Parsed, bytes]:
    """The pickle at ``offset`` of the file and its bytes, read through a window that grows up to MAX_PICKLE."""
    window = 64 << 10
    while True:
        length = min(size - offset, window)
        data = pread_exact(fd, length, offset) if length > 0 else b""
        try:
            parsed = parse(data, base=offset)
        except PickleTruncatedError:
            if offset + length >= size:
                raise
            if window >= MAX_PICKLE:
                raise PickleLimitError(f"a pickle at byte {offset} is longer than {MAX_PICKLE} bytes") from None
            window = min(window * 8, MAX_PICKLE)
            continue
        return parsed, data[: parsed.end - offset]


def read_legacy(path: Path, fd: int, size: int, guard: Callable[[Parsed], Parsed]) -> tuple[Parsed, bytes]:
    """The main pickle of a legacy file and its bytes, after checking the other four pickles and the storages.

    ``guard`` sees every pickle as soon as it is parsed (it refuses unsafe globals).
    """
    magic = guard(parse_at(fd, size, 0)[0])
    if type(magic.root) is not int or magic.root != LEGACY_MAGIC:
        raise CheckpointError(f"{path} is a plain pickle, not a torch checkpoint; random-ltd does not read it.")
    version = guard(parse_at(fd, size, magic.end)[0])
    if type(version.root) is not int or version.root != LEGACY_PROTOCOL:
        raise PickleError(f"the legacy format version is {describe(version.root)}, not {LEGACY_PROTOCOL}")
    sys_info = guard(parse_at(fd, size, version.end)[0])
    if not isinstance(sys_info.root, dict):
        raise PickleError("the legacy system-info record is not a dict")
    parsed, data = parse_at(fd, size, sys_info.end)
    guard(parsed)
    keys = guard(parse_at(fd, size, parsed.end)[0])
    _check_storages(fd, parsed, keys, size)
    return parsed, data


def _check_storages(fd: int, parsed: Parsed, keys: Parsed, size: int) -> None:
    """Walk the raw storages after the pickles (element counts only) and check that they end at EOF."""
    calls: list[Instance] = []
    found = storages([parsed.root, parsed.persistents], calls)  # every persistent id loaded, reachable or not
    check_loaded_ids(parsed.persistents, width=6)
    check_tensors(calls, found)
    listed = keys.root
    if (
        not isinstance(listed, list)
        or not all(isinstance(k, str) for k in listed)
        or len(set(listed)) != len(listed)
        or set(listed) != set(found)
    ):
        raise PickleError("the storage key list does not match the pickled structure")
    pos = keys.end
    for key in listed:
        type_name, numel = found[key]
        if pos + 8 > size:
            raise PickleError(f"the file ends inside storage {describe(key)}")
        (count,) = struct.unpack("<q", pread_exact(fd, 8, pos))
        if count != numel:
            raise PickleError(f"storage {describe(key)} holds {count} elements but the pickle says {numel}")
        pos += 8 + count * ITEMSIZE[type_name]
        if pos > size:
            raise PickleError(f"the file ends inside storage {describe(key)}")
    if pos != size:
        raise PickleError(f"the storages end at byte {pos} but the file has {size} bytes")
