"""Builders of hostile and corrupt torch checkpoints (zip, legacy, bare pickle, DCP metadata) for the tests.

Nothing here runs a pickle. Payloads that would run code call ``os.system("touch CANARY")``,
so a test can assert that the canary never appears; they are only ever given to random-ltd
and to ``torch.load(weights_only=True)``, which must both refuse them.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
SYS_INFO = {"protocol_version": LEGACY_PROTOCOL, "little_endian": sys.byteorder == "little",
            "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip


def deep_key_pickle(depth: int = 10**6) -> bytes:
    """A dict whose only key is a tuple nested ``depth`` levels deep: ``{((((None,),),),): None}``."""
    return b"\x80\x02}N" + b"\x85" * depth + b"Ns."


def deep_frozenset_pickle(depth: int) -> bytes:
    """A frozenset whose member is a tuple nested ``depth`` levels deep (protocol 4)."""
    return b"\x80\x04(N" + b"\x85" * depth + b"\x91."


def system_call(command: str, *, stack_global: tuple[str, str] | None = None) -> bytes:
    """Opcodes (no PROTO, no STOP) that call ``os.system(command)`` and leave its result on the stack."""
    arg = command.encode()
    if stack_global is None:
        head = b"cos\nsystem\n"
    else:
        module, name = (s.encode() for s in stack_global)
        head = b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93"
    return head + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85R"


def with_payload(clean: bytes, command: str, **kwargs: Any) -> bytes:
    """A protocol-2+ pickle that runs ``command`` and then returns what ``clean`` returns (the payload is POPped)."""
    assert clean[:1] == b"\x80" and clean[2:3] != b"\x95", "needs an unframed pickle"
    return clean[:2] + system_call(command, **kwargs) + b"0" + clean[2:]


def unframed_dumps(obj: Any, protocol: int = 4) -> bytes:
    """``pickle.dumps`` without protocol-4 frames, so that byte edits need no frame fix-ups."""
    buf = io.BytesIO()
    pickler = pickle._Pickler(buf, protocol=protocol)  # type: ignore[attr-defined]
    pickler.framer.start_framing = lambda: None  # the pure-Python pickler frames only when asked to
    pickler.dump(obj)
    return buf.getvalue()


def legacy_bytes(
    main: bytes,
    storages: list[tuple[str, int, bytes]],
    *,
    magic: bytes | None = None,
    version: bytes | None = None,
    sys_info: bytes | None = None,
    keys: bytes | None = None,
) -> bytes:
    """A legacy (non-zip) torch file: four pickles, then ``(key, element count, raw bytes)`` per storage."""
    out = [
        magic if magic is not None else pickle.dumps(LEGACY_MAGIC, protocol=2),
        version if version is not None else pickle.dumps(LEGACY_PROTOCOL, protocol=2),
        sys_info if sys_info is not None else pickle.dumps(SYS_INFO, protocol=2),
        main,
        keys if keys is not None else pickle.dumps([k for k, _, _ in storages], protocol=2),
    ]
    for _, count, raw in storages:
        out.append(struct.pack("<q", count) + raw)
    return b"".join(out)


def split_legacy(data: bytes) -> list[bytes]:
    """The five pickles of a legacy file and the storage bytes after them."""
    parts = []
    stream = io.BytesIO(data)
    for _ in range(5):
        start = stream.tell()
        for _op in pickletools.genops(stream):  # reads opcodes up to STOP; runs nothing
            pass
        parts.append(data[start : stream.tell()])
    parts.append(data[stream.tell() :])
    return parts


def legacy_torch_save(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def zip_torch_save(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def write_zip(path: Path, entries: list[tuple[str, bytes]], *, deflate: tuple[str, ...] = ()) -> Path:
    """A ZIP with ``entries`` in order (duplicates allowed); the names in ``deflate`` are compressed."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names: that is the point
        with zipfile.ZipFile(path, "w") as z:
            for name, content in entries:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
                z.writestr(info, content)
    return path


def deflate_bomb(path: Path, *, inflated: int, declared: int | None = None, crc: int | None = None) -> Path:
    """A torch-shaped ZIP whose deflated ``archive/data.pkl`` inflates to ``inflated`` bytes (mostly zeros).

    The header declares ``declared`` bytes (default: the truth) and ``crc`` (default: the right CRC-32).
    Built from one flushed block of compressed zeros repeated, so a 1 GiB bomb takes a second to make.
    """
    head = pickle.dumps({}, protocol=2)  # a valid pickle first; the zeros after STOP are never parsed
    chunk = 1 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(head + bytes(chunk - len(head))) + comp.flush(zlib.Z_FULL_FLUSH)
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = zeros.compress(bytes(chunk)) + zeros.flush(zlib.Z_FULL_FLUSH)
    count = max(inflated // chunk, 1)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty final block
    body = first + block * (count - 1) + tail
    true_crc = zlib.crc32(head + bytes(chunk - len(head)))
    zero_mb = bytes(chunk)
    for _ in range(count - 1):
        true_crc = zlib.crc32(zero_mb, true_crc)
    usize = declared if declared is not None else count * chunk
    return raw_zip(path, [("archive/data.pkl", 8, body, usize, crc if crc is not None else true_crc), VERSION])


VERSION = ("archive/version", 0, b"3\n", 2, zlib.crc32(b"3\n"))
"""The format-version record torch requires, as a :func:`raw_zip` record."""


def pickle_zip(path: Path, pkl: bytes) -> Path:
    """A minimal torch-shaped ZIP: ``archive/data.pkl`` (stored) and the version record."""
    return raw_zip(path, [("archive/data.pkl", 0, pkl, len(pkl), zlib.crc32(pkl)), VERSION])


def raw_zip(
    path: Path,
    records: list[tuple[str, int, bytes, int, int]],
    *,
    zip64: bool = True,
    flags: int = 0,
    local_names: dict[str, str] | None = None,
    count_delta: int = 0,
) -> Path:
    """A ZIP written field by field: ``(name, method, stored bytes, uncompressed size, crc)`` per record.

    ``flags`` go into every header, ``local_names`` replace names in the local headers only, and
    ``count_delta`` is added to the entry count of the end records (all to build inconsistent archives).
    """
    out = bytearray()
    central = bytearray()
    for name, method, body, usize, crc in records:
        raw = name.encode()
        local_raw = (local_names or {}).get(name, name).encode()
        offset = len(out)
        big = usize >= 0xFFFFFFFF or len(body) >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, usize, len(body)) if big else b""
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(body), usize)
        out += struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 45, flags, method, 0, 0x21, crc, *sizes, len(local_raw), len(extra)
        )
        out += local_raw + extra + body
        cextra = struct.pack("<HHQQ", 1, 16, usize, len(body)) if big else b""
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, flags, method, 0, 0x21, crc, *sizes, len(raw), len(cextra),
            0, 0, 0, 0, offset,
        )  # fmt: skip
        central += raw + cextra
    cd_offset = len(out)
    out += central
    count = len(records) + count_delta
    if zip64:
        eocd64 = len(out)
        out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), cd_offset)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1)
    short = min(count, 0xFFFF) if zip64 else count  # 0xFFFF: "see the ZIP64 record"
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, short, short, len(central), cd_offset, 0)
    path.write_bytes(bytes(out))
    return path
