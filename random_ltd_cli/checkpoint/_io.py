"""Byte copying at disk speed (in the kernel where it can), positional reads, and progress."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from ..errors import CheckpointError

__all__ = ["Progress", "ProgressFn", "copy_range", "pread_exact", "write_all", "write_at"]

ProgressFn = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``: called as bytes are written."""

CHUNK = 64 << 20  # bytes per kernel call: large enough to be fast, small enough to report progress and see Ctrl-C
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


class Progress:
    """Adds up written bytes over one strip and forwards them to the caller's callback."""

    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read exactly ``size`` bytes at ``offset``; EOFError if the file is shorter (the caller names the file)."""
    chunks: list[bytes] = []
    want = size
    while want:
        chunk = os.pread(fd, min(want, CHUNK), offset + size - want)
        if not chunk:
            raise EOFError(f"the file ends before byte {offset + size}")
        chunks.append(chunk)
        want -= len(chunk)
    return b"".join(chunks)


def copy_range(
    src: int, dst: int, src_offset: int, dst_offset: int, count: int, progress: Progress | None = None
) -> None:
    """Copy ``count`` bytes between two file descriptors at explicit offsets.

    Uses ``copy_file_range`` (the kernel copies; filesystems that can share extents do) and
    falls back to ``pread``/``pwrite`` in 8 MiB pieces where it is unavailable.
    """
    use_kernel = hasattr(os, "copy_file_range")
    while count > 0:
        step = min(count, CHUNK)
        done = 0
        if use_kernel:
            try:
                done = os.copy_file_range(src, dst, step, src_offset, dst_offset)
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise
                use_kernel = False
                continue
        else:
            data = os.pread(src, min(step, 8 << 20), src_offset)
            done = len(data)
            view = memoryview(data)
            while view:
                written = os.pwrite(dst, view, dst_offset + len(data) - len(view))
                view = view[written:]
        if done == 0:
            raise CheckpointError(f"the input ended {count} bytes early while copying; was it changed meanwhile?")
        src_offset += done
        dst_offset += done
        count -= done
        if progress is not None:
            progress.advance(done)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the descriptor's current position."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (positional; the descriptor's position is unchanged)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
