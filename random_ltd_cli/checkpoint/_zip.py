"""Just enough ZIP to read torch's archives and to replace one small record in a copy of one.

torch.save writes an uncompressed ZIP whose tensor records are aligned (and, from format
version 1 on, laid out so a reader may compute their offsets). To strip names we change
only ``data.pkl``; :func:`patch_record` does it so every other record keeps its offset:
the new, shorter record starts later by the number of bytes it lost, which go into an
extra field of its local header (or, if they do not fit there, stay as a gap after it).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field

from ._io import pread_exact

__all__ = ["ZipError", "ZipRecord", "patch_record", "read_directory", "read_record"]

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_PAD_ID = 0x4C52  # our extra-field id for padding ("RL")
_U32 = 0xFFFFFFFF


class ZipError(Exception):
    """The archive is truncated, corrupted or uses a layout this module does not rewrite."""


@dataclass
class ZipRecord:
    """One member of the archive, with where its header fields live."""

    name: str
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    header_offset: int
    central_offset: int
    data_offset: int = 0
    local_extra: bytes = b""
    zip64_fields: dict[str, int] = field(default_factory=dict)  # usize/csize -> file offset of its 8-byte value


def _find_eocd(fd: int, size: int) -> tuple[int, int, int, int]:
    """Return (end-of-central-directory offset, entry count, directory size, directory offset)."""
    tail_len = min(size, 22 + 0xFFFF)
    tail = pread_exact(fd, tail_len, size - tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise ZipError("no end-of-archive record (the file is truncated or not a ZIP archive)")
    eocd = size - tail_len + at
    _, _, _, count, cd_size, cd_offset, _ = struct.unpack("<HHHHIIH", tail[at + 4 : at + 22])
    if count == 0xFFFF or cd_size == _U32 or cd_offset == _U32:
        if eocd < 20:
            raise ZipError("ZIP64 locator missing")
        locator = pread_exact(fd, 20, eocd - 20)
        if locator[:4] != _LOCATOR64:
            raise ZipError("ZIP64 locator missing")
        (eocd64,) = struct.unpack("<Q", locator[8:16])
        record = pread_exact(fd, 56, eocd64)
        if record[:4] != _EOCD64:
            raise ZipError("ZIP64 end-of-archive record missing")
        count, cd_size, cd_offset = struct.unpack("<QQQ", record[32:56])
        eocd = eocd64
    if cd_offset + cd_size > eocd:
        raise ZipError("the central directory points past the end of the archive")
    return eocd, count, cd_size, cd_offset


def _zip64_fields(extra: bytes, base: int, wanted: list[str]) -> dict[str, tuple[int, int]]:
    """Values of the ``wanted`` fields in a ZIP64 extra field, with the file offset of each."""
    found: dict[str, tuple[int, int]] = {}
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[at : at + 4])
        if tag == 1:
            pos = at + 4
            for name in wanted:
                if pos + 8 > at + 4 + length:
                    raise ZipError("ZIP64 extra field too short")
                found[name] = (struct.unpack("<Q", extra[pos : pos + 8])[0], base + pos)
                pos += 8
            return found
        at += 4 + length
    if wanted:
        raise ZipError("ZIP64 extra field missing")
    return found


def read_directory(fd: int) -> dict[str, ZipRecord]:
    """Read the central directory and every local header; check that all records lie inside the file.

    Raises:
        ZipError: truncated or corrupted archive.
    """
    try:
        return _read_directory(fd)
    except (EOFError, struct.error, UnicodeDecodeError) as exc:
        raise ZipError(str(exc)) from exc


def _read_directory(fd: int) -> dict[str, ZipRecord]:
    size = os.fstat(fd).st_size
    _, count, cd_size, cd_offset = _find_eocd(fd, size)
    directory = pread_exact(fd, cd_size, cd_offset)
    records: dict[str, ZipRecord] = {}
    at = 0
    for _ in range(count):
        if directory[at : at + 4] != _CENTRAL or at + 46 > len(directory):
            raise ZipError("corrupted central directory")
        flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len = struct.unpack(
            "<HHHHIIIHHH", directory[at + 8 : at + 34]
        )
        (header_offset,) = struct.unpack("<I", directory[at + 42 : at + 46])
        name = directory[at + 46 : at + 46 + name_len].decode("utf-8" if flags & 0x800 else "cp437")
        extra = directory[at + 46 + name_len : at + 46 + name_len + extra_len]
        values = {"usize": usize, "csize": csize, "header_offset": header_offset}
        wanted = [k for k in ("usize", "csize", "header_offset") if values[k] == _U32]
        wide = _zip64_fields(extra, cd_offset + at + 46 + name_len, wanted)
        values.update({k: v for k, (v, _) in wide.items()})
        rec = ZipRecord(
            name,
            flags,
            method,
            crc,
            values["csize"],
            values["usize"],
            values["header_offset"],
            cd_offset + at,
            zip64_fields={k: off for k, (_, off) in wide.items() if k != "header_offset"},
        )
        _read_local_header(fd, rec, size)
        records[name] = rec
        at += 46 + name_len + extra_len + comment_len
    return records


def _read_local_header(fd: int, rec: ZipRecord, size: int) -> None:
    if rec.header_offset + 30 > size:
        raise ZipError(f"record {rec.name!r} starts past the end of the file")
    head = pread_exact(fd, 30, rec.header_offset)
    if head[:4] != _LOCAL:
        raise ZipError(f"record {rec.name!r}: bad local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    rec.local_extra = pread_exact(fd, extra_len, rec.header_offset + 30 + name_len)
    rec.data_offset = rec.header_offset + 30 + name_len + extra_len
    if rec.data_offset + rec.csize > size:
        raise ZipError(f"record {rec.name!r} runs past the end of the file (truncated)")


def read_record(fd: int, rec: ZipRecord, *, limit: int) -> bytes:
    """The uncompressed bytes of a (stored or deflated) record, CRC-checked; at most ``limit`` bytes."""
    if rec.usize > limit:
        raise ZipError(f"record {rec.name!r} is {rec.usize} bytes, over the {limit}-byte limit")
    try:
        raw = pread_exact(fd, rec.csize, rec.data_offset)
    except EOFError as exc:
        raise ZipError(f"record {rec.name!r} is truncated") from exc
    if rec.method == 8:
        data = zlib.decompressobj(-15).decompress(raw, limit + 1)
    elif rec.method == 0:
        data = raw
    else:
        raise ZipError(f"record {rec.name!r} uses compression method {rec.method}")
    if len(data) != rec.usize or zlib.crc32(data) != rec.crc:
        raise ZipError(f"record {rec.name!r} is corrupted (size or CRC-32 mismatch)")
    return data


def _descriptor(fd: int, rec: ZipRecord) -> tuple[bool, int]:
    """(has a signature, width of the size fields) of the data descriptor after the record's data."""
    try:
        raw = pread_exact(fd, 28, rec.data_offset + rec.csize)
    except EOFError as exc:
        raise ZipError(f"record {rec.name!r}: data descriptor missing") from exc
    has_sig = raw[:4] == _DESCRIPTOR
    body = raw[4:] if has_sig else raw[:24]
    if struct.unpack("<III", body[:12]) == (rec.crc, rec.csize, rec.usize):
        return has_sig, 4
    if struct.unpack("<IQQ", body[:20]) == (rec.crc, rec.csize, rec.usize):
        return has_sig, 8
    raise ZipError(f"record {rec.name!r}: data descriptor does not match the central directory")


def patch_record(fd: int, rec: ZipRecord, data: bytes) -> list[tuple[int, bytes]]:
    """The writes that turn a byte-for-byte copy of the archive ``fd`` into one whose record ``rec`` holds ``data``.

    ``data`` must not be longer than the record. Every other record keeps its offset. The
    writes are computed (and every check made) before anything is written.
    """
    if rec.method != 0 or len(data) > rec.usize:
        raise ZipError(f"record {rec.name!r} cannot be replaced in place")
    shrink = rec.usize - len(data)
    crc = zlib.crc32(data)
    writes: list[tuple[int, bytes]] = []
    extra_at = rec.data_offset - len(rec.local_extra)
    start = rec.data_offset
    if 4 <= shrink <= 0xFFFF - len(rec.local_extra):
        # The lost bytes become a padding field in the local header, so the data ends where it did.
        pad = struct.pack("<HH", _PAD_ID, shrink - 4) + bytes(shrink - 4)
        writes.append((rec.header_offset + 28, struct.pack("<H", len(rec.local_extra) + shrink)))
        writes.append((extra_at, rec.local_extra + pad))
        start += shrink
    writes.append((start, data))
    end = start + len(data)
    gap = bytes(rec.data_offset + rec.csize - end)  # zeros where the old, longer data ended (if not absorbed)
    if rec.flags & 0x8:
        has_sig, width = _descriptor(fd, rec)
        body = struct.pack("<III" if width == 4 else "<IQQ", crc, len(data), len(data))
        writes.append((end, (_DESCRIPTOR if has_sig else b"") + body + gap))
    else:
        writes.append((end, gap))
        writes.append((rec.header_offset + 14, struct.pack("<I", crc)))
        sizes = struct.unpack("<II", pread_exact(fd, 8, rec.header_offset + 18))
        if _U32 in sizes:  # ZIP64: the local header's extra field holds both sizes
            local64 = _zip64_fields(rec.local_extra, extra_at, ["usize", "csize"])
            writes += [(off, struct.pack("<Q", len(data))) for _, off in local64.values()]
        else:
            writes.append((rec.header_offset + 18, struct.pack("<II", len(data), len(data))))
    writes.append((rec.central_offset + 16, struct.pack("<I", crc)))
    for name, at in (("csize", rec.central_offset + 20), ("usize", rec.central_offset + 24)):
        if name in rec.zip64_fields:
            writes.append((rec.zip64_fields[name], struct.pack("<Q", len(data))))
        else:
            writes.append((at, struct.pack("<I", len(data))))
    return writes
