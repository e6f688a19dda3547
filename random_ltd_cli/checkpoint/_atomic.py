"""Writes that either complete or leave nothing behind.

Every output is written to a temporary name in the destination's own folder, fsynced and
then renamed over the destination (``os.replace``), so a reader sees the old file or the
new one, never a half-written one. On any error or interrupt the temporary file or folder
is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError, OutputExistsError
from ._fs import check_output

__all__ = ["atomic_dir", "atomic_file", "atomic_path", "new_file", "patch_in_place", "write_error"]


def write_error(dst: Path, exc: OSError) -> CheckpointError:
    """Turn a file-system error into a message that names the destination and the next step."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose an output folder you can write to (-o), or fix its permissions"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space or choose an output on another disk (-o)"
    else:
        hint = "check the destination and retry"
    return CheckpointError(
        f"cannot write {dst}: {exc.strerror or exc}; nothing was written there and the input is unchanged. "
        f"To fix: {hint}."
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode() -> int:
    return 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: str, dst: Path, overwrite: bool) -> None:
    """Give the finished ``tmp`` the name ``dst``: replace only a regular file, and only if ``overwrite``.

    Without ``overwrite`` a hard link makes the name appear atomically and fails if it exists
    (``EEXIST``); where links are not supported, the existence check and ``os.replace`` follow
    each other as closely as they can.
    """
    if not overwrite:
        try:
            os.link(tmp, dst)
        except FileExistsError:
            check_output(dst, overwrite=False)  # raises, naming what is there
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EACCES):
                raise
        else:
            os.unlink(tmp)
            return
    check_output(dst, overwrite=overwrite)  # again just before: a FIFO or link may have appeared meanwhile
    os.replace(tmp, dst)


@contextlib.contextmanager
def _temp_beside(dst: Path, mode_like: Path | None, overwrite: bool = True) -> Iterator[tuple[int, Path]]:
    """A temp file beside ``dst`` (descriptor and path); on success fsynced and renamed over ``dst``."""
    check_output(dst, overwrite=overwrite)
    try:
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(dst, exc) from exc
    done = False
    try:
        yield fd, Path(tmp)
        # fsync flushes the inode, so it also covers bytes written through another descriptor
        os.fchmod(fd, (os.stat(mode_like).st_mode & 0o777) if mode_like is not None else _default_mode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _publish(tmp, dst, overwrite)
        done = True
        _fsync_dir(dst.parent)
    except OSError as exc:
        raise write_error(dst, exc) from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(dst: Path, *, mode_like: Path | None = None, overwrite: bool = True) -> Iterator[int]:
    """Yield a file descriptor open for writing; on success the bytes replace ``dst`` atomically.

    The new file gets the permission bits of ``mode_like`` (e.g. the input), else the umask's.
    Only a regular file is ever replaced, and only when ``overwrite``.

    Raises:
        UnsupportedFileTypeError: ``dst`` is a link, FIFO, socket, device or folder.
        OutputExistsError: ``dst`` exists and ``overwrite`` is False.
        CheckpointError: the folder cannot be written to, or writing failed (no temp file is left).
    """
    with _temp_beside(Path(dst), mode_like, overwrite) as (fd, _):
        yield fd


@contextlib.contextmanager
def atomic_path(dst: Path, *, mode_like: Path | None = None) -> Iterator[Path]:
    """Like :func:`atomic_file`, for writers that take a path: yield the temporary file's path.

    The writer may replace the file at that path with a new one (``safetensors.torch.save_file``
    does), so the file found there afterwards is the one that gets the mode and the fsync.
    """
    with _temp_beside(Path(dst), mode_like) as (_, tmp):
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            os.fchmod(fd, (os.stat(mode_like).st_mode & 0o777) if mode_like is not None else _default_mode())
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dst``; on success it is renamed to ``dst``.

    Raises:
        CheckpointError: ``dst`` exists and is not an empty folder, or the parent is not writable.
    """
    dst = Path(dst)
    try:
        st: os.stat_result | None = os.lstat(dst)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise write_error(dst, exc) from exc
    if st is not None and stat.S_ISREG(st.st_mode):
        raise OutputExistsError(f"output {dst} is a file, and a folder is written here; choose another output path.")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        check_output(dst, overwrite=False)  # a link, FIFO or device: never replaced
    if st is not None and any(dst.iterdir()):
        raise OutputExistsError(f"output {dst} already exists; remove it or choose another output path (-o).")
    try:
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    except OSError as exc:
        raise write_error(dst, exc) from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(dst, exc) from exc
        raise


@contextlib.contextmanager
def new_file(path: Path, *, mode_like: Path | None = None) -> Iterator[int]:
    """Create ``path`` (inside a folder from :func:`atomic_dir`), yield its descriptor, fsync it."""
    mode = (os.stat(mode_like).st_mode & 0o777) if mode_like is not None else _default_mode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        yield fd
        os.fsync(fd)
    finally:
        os.close(fd)


def patch_in_place(path: Path, offset: int, data: bytes) -> None:
    """Overwrite ``len(data)`` bytes of ``path`` at ``offset`` with one write, then fsync.

    Only for ``--in-place`` header rewrites that keep the file's length and layout: the
    write is a single small ``pwrite``, so an interrupt cannot split it, but a power cut
    during it is not covered the way a rename is.
    """
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is no longer a regular file; nothing was written to it.")
        written = os.pwrite(fd, data, offset)
        if written != len(data):
            raise CheckpointError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        os.close(fd)
