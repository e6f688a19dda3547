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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ._io import pread_exact

__all__ = [
    "MAX_ENTRIES", "ZipError", "ZipLimitError", "ZipRecord", "check_name", "patch_record", "read_directory",
    "read_record",
]  # fmt: skip

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_PAD_ID = 0x4C52  # our extra-field id for padding ("RL")
_U32 = 0xFFFFFFFF
_KNOWN_FLAGS = 0x080E  # deflate options, data descriptor, UTF-8 names


class ZipError(Exception):
    """The archive is truncated, corrupted or uses a layout this module does not read or rewrite."""


class ZipLimitError(ZipError):
    """The archive exceeds one of this module's limits (directory size, entries, record size)."""


MAX_DIRECTORY = 8 << 20
"""Bytes of central directory read (about 120,000 torch records)."""
MAX_ENTRIES = 1 << 16
"""Records per archive (a torch checkpoint has one per tensor storage, plus four)."""
_CHUNK = 1 << 20  # compressed bytes inflated per step


@dataclass(slots=True)
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
    end: int = 0  # first byte after the record's data (and data descriptor)
    local_extra: bytes = b""
    zip64_fields: dict[str, int] = field(default_factory=dict)  # usize/csize -> file offset of its 8-byte value


def _find_eocd(fd: int, size: int) -> tuple[int, int, int, int]:
    """Return (offset where the end records start, entry count, directory size, directory offset)."""
    tail_len = min(size, 22 + 0xFFFF)
    tail = pread_exact(fd, tail_len, size - tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise ZipError("no end-of-archive record (the file is truncated or not a ZIP archive)")
    eocd = size - tail_len + at
    fields = struct.unpack("<HHHHIIH", tail[at + 4 : at + 22])
    disk, cd_disk, disk_count, count, cd_size, cd_offset, comment_len = fields
    if at + 22 + comment_len != len(tail):
        raise ZipError("bytes follow the end-of-archive record (a ZIP archive must end with it)")
    if disk != 0 or cd_disk != 0 or disk_count != count:
        raise ZipError("a multi-volume (spanned) ZIP archive")
    end_records = eocd
    wide = count == 0xFFFF or cd_size == _U32 or cd_offset == _U32
    locator = pread_exact(fd, 20, eocd - 20) if eocd >= 20 else b""
    if locator[:4] == _LOCATOR64:  # torch writes the ZIP64 end records even for small archives
        disk64, eocd64, disks = struct.unpack("<IQI", locator[4:20])
        if disk64 != 0 or disks != 1:
            raise ZipError("a multi-volume (spanned) ZIP archive")
        if eocd64 + 56 > eocd - 20:
            raise ZipError("the ZIP64 end-of-archive record lies outside the archive")
        record = pread_exact(fd, 56, eocd64)
        (record_size,) = struct.unpack("<Q", record[4:12])
        if record[:4] != _EOCD64 or eocd64 + 12 + record_size != eocd - 20:
            raise ZipError("ZIP64 end-of-archive record missing or misplaced")
        volume, cd_volume, count64, total64, size64, offset64 = struct.unpack("<IIQQQQ", record[16:56])
        if volume != 0 or cd_volume != 0:
            raise ZipError("a multi-volume (spanned) ZIP archive")
        for short, full, saturated in ((count, total64, 0xFFFF), (cd_size, size64, _U32), (cd_offset, offset64, _U32)):
            if short not in (full, saturated):
                raise ZipError("the ZIP64 and classic end-of-archive records disagree")
        if count64 != total64:
            raise ZipError("a multi-volume (spanned) ZIP archive")
        count, cd_size, cd_offset, end_records = total64, size64, offset64, eocd64
    elif wide:
        raise ZipError("ZIP64 locator missing")
    if cd_offset + cd_size != end_records:
        raise ZipError("the central directory does not end where the end-of-archive records start")
    if count > MAX_ENTRIES or cd_size > MAX_DIRECTORY:
        raise ZipLimitError(
            f"the archive lists {count} records in a {cd_size}-byte directory; this reader stops at "
            f"{MAX_ENTRIES} records and {MAX_DIRECTORY >> 20} MiB"
        )
    return end_records, count, cd_size, cd_offset


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


def check_name(name: str) -> None:
    """Refuse names a ZIP reader could resolve outside its target: absolute, ``..``, backslashes, empty parts."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or any(part in ("", ".", "..") for part in parts)
        or (len(parts[0]) == 2 and parts[0][1] == ":")
    ):
        raise ZipError(f"the record name {name[:200]!r} is not a plain relative path")


def read_directory(fd: int) -> dict[str, ZipRecord]:
    """Read and check the central directory and every local header.

    Checks: the end records are where they must be; names are unique, relative and free of
    ``..``; each local header agrees with its directory entry; stored records have equal
    sizes; records lie inside the file and do not overlap each other or the directory.

    Raises:
        ZipLimitError: more records or a larger directory than this reader accepts.
        ZipError: truncated, corrupted or ambiguous archive.
    """
    try:
        return _read_directory(fd)
    except (EOFError, struct.error, UnicodeDecodeError) as exc:
        raise ZipError(f"corrupted ZIP structure ({exc})") from exc


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
        disk, _, attributes, header_offset = struct.unpack("<HHII", directory[at + 34 : at + 46])
        if disk != 0:
            raise ZipError("a multi-volume (spanned) ZIP archive")
        if attributes & 0x10 or (attributes >> 16) & 0o170000 == 0o040000:
            raise ZipError("an entry is marked as a folder; torch's reader would not read it as a record")
        if at + 46 + name_len + extra_len + comment_len > len(directory):
            raise ZipError("corrupted central directory (an entry runs past its end)")
        raw_name = directory[at + 46 : at + 46 + name_len]
        name = raw_name.decode("utf-8")  # torch decodes every name as UTF-8, whatever the flag says
        check_name(name)
        if name in records:
            raise ZipError(f"the archive holds two records named {name!r}; readers disagree on which one counts")
        extra = directory[at + 46 + name_len : at + 46 + name_len + extra_len]
        values = {"usize": usize, "csize": csize, "header_offset": header_offset}
        wanted = [k for k in ("usize", "csize", "header_offset") if values[k] == _U32]
        wide = _zip64_fields(extra, cd_offset + at + 46 + name_len, wanted)
        values.update({k: v for k, (v, _) in wide.items()})
        rec = ZipRecord(
            name, flags, method, crc, values["csize"], values["usize"], values["header_offset"], cd_offset + at,
            zip64_fields={k: off for k, (_, off) in wide.items() if k != "header_offset"},
        )  # fmt: skip
        _check_entry(rec)
        _read_local_header(fd, rec, raw_name, cd_offset)
        records[name] = rec
        at += 46 + name_len + extra_len + comment_len
    if at != cd_size:
        raise ZipError("the central directory holds more bytes than its entries")
    _check_layout(records.values(), cd_offset)
    return records


def _check_entry(rec: ZipRecord) -> None:
    if rec.flags & 0x2041:
        raise ZipError(f"record {rec.name!r} is encrypted")
    if rec.flags & ~_KNOWN_FLAGS:
        raise ZipError(f"record {rec.name!r} uses ZIP features torch does not read (flags {rec.flags:#06x})")
    if rec.method not in (0, 8):
        raise ZipError(f"record {rec.name!r} uses compression method {rec.method} (only stored and deflated are read)")
    if rec.method == 0 and rec.csize != rec.usize:
        raise ZipError(f"record {rec.name!r} is stored uncompressed but its two sizes differ")


def _read_local_header(fd: int, rec: ZipRecord, raw_name: bytes, cd_offset: int) -> None:
    if rec.header_offset + 30 > cd_offset:
        raise ZipError(f"record {rec.name!r} starts inside or past the central directory")
    head = pread_exact(fd, 30, rec.header_offset)
    if head[:4] != _LOCAL:
        raise ZipError(f"record {rec.name!r}: bad local header")
    flags, method, _, _, crc, csize, usize, name_len, extra_len = struct.unpack("<HHHHIIIHH", head[6:30])
    local_name = pread_exact(fd, name_len, rec.header_offset + 30)
    if local_name != raw_name or method != rec.method or (flags ^ rec.flags) & 0x49:
        raise ZipError(f"record {rec.name!r}: the local header disagrees with the central directory")
    rec.local_extra = pread_exact(fd, extra_len, rec.header_offset + 30 + name_len)
    rec.data_offset = rec.header_offset + 30 + name_len + extra_len
    rec.end = rec.data_offset + rec.csize
    if rec.end > cd_offset:
        raise ZipError(f"record {rec.name!r} runs into the central directory (truncated or overlapping)")
    if rec.flags & 0x8:
        has_sig, width = _descriptor(fd, rec)
        rec.end += (4 if has_sig else 0) + (12 if width == 4 else 20)
        return
    sizes = [csize, usize]
    if _U32 in sizes:
        wide = _zip64_fields(rec.local_extra, 0, [k for k, v in (("usize", usize), ("csize", csize)) if v == _U32])
        sizes = [wide["csize"][0] if csize == _U32 else csize, wide["usize"][0] if usize == _U32 else usize]
    if crc != rec.crc or sizes != [rec.csize, rec.usize]:
        raise ZipError(f"record {rec.name!r}: the local header disagrees with the central directory")


def _check_layout(records: Iterable[ZipRecord], cd_offset: int) -> None:
    """Records must not overlap (one byte range read as two records is how ZIP bombs and confusions work)."""
    previous: ZipRecord | None = None
    for rec in sorted(records, key=lambda r: r.header_offset):
        if previous is not None and rec.header_offset < previous.end:
            raise ZipError(f"records {previous.name!r} and {rec.name!r} overlap")
        previous = rec
    if previous is not None and previous.end > cd_offset:
        raise ZipError(f"record {previous.name!r} overlaps the central directory")


def read_record(fd: int, rec: ZipRecord, *, limit: int) -> bytes:
    """The uncompressed bytes of a (stored or deflated) record, CRC-checked; at most ``limit`` bytes.

    A deflated record is inflated a piece at a time and refused as soon as it outgrows its
    declared size, so no more than ``limit`` bytes are ever held.

    Raises:
        ZipLimitError: the record is declared larger than ``limit``.
        ZipError: corrupted data (bad deflate stream, size or CRC-32 mismatch).
    """
    if rec.usize > limit or rec.csize > limit:
        raise ZipLimitError(f"record {rec.name!r} is {max(rec.usize, rec.csize)} bytes, over the {limit}-byte limit")
    try:
        data = pread_exact(fd, rec.csize, rec.data_offset) if rec.method == 0 else _inflate(fd, rec)
    except EOFError as exc:
        raise ZipError(f"record {rec.name!r} is truncated") from exc
    if len(data) != rec.usize or zlib.crc32(data) != rec.crc:
        raise ZipError(f"record {rec.name!r} is corrupted (size or CRC-32 mismatch)")
    return data


def _inflate(fd: int, rec: ZipRecord) -> bytes:
    return b"".join(_inflated_pieces(fd, rec))


def check_deflated(fd: int, rec: ZipRecord) -> None:
    """Inflate a deflated record piece by piece, holding none of it, and check its size and CRC-32.

    torch.load does not check a compressed tensor record: a corrupt one loads as garbage.
    """
    total, crc = 0, 0
    for piece in _inflated_pieces(fd, rec):
        total += len(piece)
        crc = zlib.crc32(piece, crc)
    if total != rec.usize or crc != rec.crc:
        raise ZipError(f"record {rec.name!r} is corrupted (size or CRC-32 mismatch)")


def _inflated_pieces(fd: int, rec: ZipRecord) -> Iterator[bytes]:
    inflater = zlib.decompressobj(-15)
    total = 0
    try:
        for done in range(0, rec.csize, _CHUNK):
            pending = pread_exact(fd, min(_CHUNK, rec.csize - done), rec.data_offset + done)
            while not inflater.eof:  # until this input is used up and no output is pending
                piece = inflater.decompress(pending, min(rec.usize - total + 1, _CHUNK))  # never past the size + 1
                total += len(piece)
                if total > rec.usize:
                    raise ZipError(f"record {rec.name!r} inflates to more than its declared {rec.usize} bytes")
                pending = inflater.unconsumed_tail
                if not piece and not pending:
                    break
                yield piece
            if inflater.eof and (pending or inflater.unused_data or done + _CHUNK < rec.csize):
                raise ZipError(f"record {rec.name!r} has bytes after the end of its compressed data")
    except zlib.error as exc:
        raise ZipError(f"record {rec.name!r} is not valid deflate data ({exc})") from exc
    if not inflater.eof:
        raise ZipError(f"record {rec.name!r}: its compressed data is truncated")


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
    if rec.method != 0:
        raise ZipError(
            f"record {rec.name!r} is compressed; strip rewrites it only stored uncompressed, as torch.save writes it "
            "(load the file with torch and save it again)"
        )
    if len(data) > rec.usize:
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
