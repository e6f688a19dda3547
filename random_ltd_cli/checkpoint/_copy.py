"""Copy a whole file the way ``cp`` does, then overwrite the few regions that change.

Every strip output keeps the input's layout (each tensor at its original offset), so the
fastest correct copy is the whole file from offset 0, page-aligned, followed by a handful of
small positional writes (a safetensors header; a ZIP's ``data.pkl``, local header and
central directory entries). The whole-file copy tries, in order:

1. ``FICLONE`` (Linux ioctl): the new file shares the input's extents, nothing is copied
   (XFS with reflink, btrfs, bcachefs...); the later writes un-share only their blocks;
2. ``copy_file_range`` from offset 0 (in the kernel, whole pages; file systems that can
   share extents do so here too);
3. a ``pread``/``pwrite`` loop.

Each step falls back quietly to the next where the file system or platform does not support
it. Other formats (e.g. DCP shards) can reuse :func:`copy_file` and :func:`copy_patched`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError
from ._fs import open_file
from ._io import Progress, copy_range, write_at

__all__ = ["FICLONE", "clone", "copy_file", "copy_patched", "overwrite", "size_changed"]

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from <linux/fs.h>


def clone(src: int, dst: int) -> bool:
    """Make ``dst`` share all of ``src``'s extents (``FICLONE``); False where the file system cannot.

    ``dst`` must be an empty regular file open for writing. A failed attempt leaves it empty.
    """
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError:  # EOPNOTSUPP, EXDEV, EINVAL, ENOTTY...: not here; the next method copies
        return False
    return True


def _open(path: Path) -> int:
    return open_file(path)  # a regular file, opened without blocking (a FIFO swapped in is refused)


def size_changed(path: Path) -> CheckpointError:
    """The error for an input that another program resized while strip copied it."""
    return CheckpointError(f"{path} changed size while it was being copied; retry when nothing else writes to it.")


def _copy_whole(src: int, dst: int, size: int, path: Path, progress: Progress | None) -> str:
    """Copy ``size`` bytes (the whole of ``src``) into the empty ``dst``; return the method used."""
    if os.fstat(src).st_size != size:
        raise size_changed(path)
    if size > 0 and clone(src, dst):
        if os.fstat(dst).st_size != size:
            raise size_changed(path)
        if progress is not None:
            progress.advance(size)
        return "clone"
    copy_range(src, dst, 0, 0, size, progress)  # copy_file_range, else read/write; both from offset 0
    return "copy"


def copy_file(src: str | os.PathLike[str], dst: int, *, progress: Progress | None = None) -> int:
    """Copy the whole file ``src`` into ``dst``, an empty file open for writing; return its size.

    The caller owns ``dst`` (and its fsync): use it with :func:`._atomic.atomic_file` or
    :func:`._atomic.new_file`.

    Raises:
        CheckpointError: ``src`` changed size during the copy.
        OSError: reading or writing failed.
    """
    path = Path(src)
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        _copy_whole(fd, dst, size, path, progress)
    finally:
        os.close(fd)
    return size


def overwrite(dst: int, writes: Iterable[tuple[int, bytes]]) -> None:
    """Apply ``(offset, bytes)`` writes to ``dst`` in order (positional; the file does not grow past them)."""
    for offset, data in writes:
        write_at(dst, data, offset)


def copy_patched(
    src: str | os.PathLike[str],
    dst: int,
    writes: Iterable[tuple[int, bytes]],
    *,
    size: int,
    progress: Progress | None = None,
) -> None:
    """Write into the empty ``dst`` a copy of ``src`` with ``writes`` applied on top.

    ``size`` is the input's size when it was planned; a file that no longer has it is
    refused, since the planned writes would land in the wrong places. Every write must lie
    inside the file: the output has exactly ``size`` bytes.

    Raises:
        CheckpointError: ``src`` changed size, or a write would reach past ``size``.
    """
    path = Path(src)
    writes = list(writes)
    for offset, data in writes:
        if offset < 0 or offset + len(data) > size:
            raise CheckpointError(f"internal error: a write at {offset} of {len(data)} bytes is outside {path}")
    fd = _open(path)
    try:
        _copy_whole(fd, dst, size, path, progress)
    finally:
        os.close(fd)
    overwrite(dst, writes)
