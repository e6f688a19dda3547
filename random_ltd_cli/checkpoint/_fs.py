"""Only regular files and folders, checked without ever blocking (no torch here).

Inputs are looked at with ``stat`` first (which never blocks, unlike ``open`` on a FIFO) and
opened with ``O_NONBLOCK``, then checked again with ``fstat``: a FIFO, socket or device is
refused before a byte is read. Outputs are looked at with ``lstat``: only a missing path or,
when replacing is allowed, a regular file may be written over. A folder that strip copies may
hold symbolic links only to places inside itself (they are recreated as links); a link that
leaves the folder, or is absolute, is refused: its target's contents are never copied.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import (
    CheckpointError,
    LimitExceededError,
    OutputExistsError,
    UnsupportedFileTypeError,
)

__all__ = [
    "check_folder",
    "check_output",
    "lstat_or_none",
    "open_file",
    "os_error",
    "path_exists",
    "read_file",
    "require_file",
    "stat_input",
]

PathArg = str | os.PathLike[str]

_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def kind(mode: int) -> str:
    """What a file-system entry is, in words."""
    for test, name in (
        (stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def os_error(path: PathArg, exc: OSError) -> CheckpointError:
    """A file-system error while reading ``path``, as the project's error with a next step."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENAMETOOLONG:
        return CheckpointError(f"{path}: the path is too long for the file system ({reason}); use a shorter one.")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return CheckpointError(f"no such file or folder: {path}. Check the path and retry.")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"permission denied: {path}. Check its permissions or choose another path.")
    if exc.errno == errno.ELOOP:
        return UnsupportedFileTypeError(f"{path}: too many levels of symbolic links; pass the file they point to.")
    return CheckpointError(f"cannot read {path}: {reason}. Check the path and retry.")


def _not_regular(path: PathArg, mode: int, what: str = "input") -> UnsupportedFileTypeError:
    return UnsupportedFileTypeError(
        f"the {what} {path} is a {kind(mode)}, not a regular file or folder; refusing to read it. "
        "Pass a checkpoint file or folder."
    )


def path_exists(path: PathArg) -> bool:
    """Whether something (even a dangling link) is at ``path``; a path the system cannot look up counts as there."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # e.g. ENAMETOOLONG: the reader reports it properly
    return True


def stat_input(path: PathArg) -> os.stat_result:
    """``stat`` an input (links followed): a regular file or a folder, else raise.

    Raises:
        UnsupportedFileTypeError: a FIFO, socket or device.
        CheckpointError: missing, too long a name, no permission...
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(path, exc) from exc
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise _not_regular(path, st.st_mode)
    return st


def require_file(path: PathArg, what: str = "input") -> os.stat_result:
    """Like :func:`stat_input`, for a path that must be a regular file (a folder is refused too)."""
    st = stat_input(path)
    if stat.S_ISDIR(st.st_mode):
        raise UnsupportedFileTypeError(f"the {what} {path} is a folder, where a checkpoint file was expected.")
    return st


def open_file(path: PathArg) -> int:
    """Open a regular file for reading without blocking; the caller closes the descriptor.

    Raises:
        UnsupportedFileTypeError, CheckpointError: as :func:`require_file`.
    """
    require_file(path)  # before open: opening some devices has effects
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise os_error(path, exc) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between the two looks
        os.close(fd)
        raise _not_regular(path, st.st_mode)
    return fd


def read_file(path: PathArg, limit: int, what: str) -> bytes:
    """The whole of a small regular file (an index, a config), refused beyond ``limit`` bytes.

    Raises:
        LimitExceededError: the file is larger than ``limit``.
    """
    fd = open_file(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise LimitExceededError(
                f"{path} has {size} bytes, more than the {limit} a {what} may have here; "
                "it is not a real one. Fix or remove it."
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise LimitExceededError(f"{path} grew past {limit} bytes while it was read; retry.")
        return b"".join(chunks)
    except OSError as exc:
        raise os_error(path, exc) from exc
    finally:
        os.close(fd)


def lstat_or_none(path: PathArg) -> os.stat_result | None:
    """``os.lstat(path)``, ``None`` when nothing is there; other OS errors as the library's error."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error(path, exc) from exc


def check_output(target: Path, *, overwrite: bool) -> None:
    """Refuse to write a file over anything but a regular file, and over one unless ``overwrite``.

    Raises:
        UnsupportedFileTypeError: ``target`` is a link (dangling or not), a FIFO, socket, device or folder.
        OutputExistsError: ``target`` is a regular file and ``overwrite`` is False.
    """
    st = lstat_or_none(target)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsupportedFileTypeError(
            f"the output {target} is a symbolic link (to {os.readlink(target)!r}); refusing to replace it. "
            "Remove it or choose another output path (-o)."
        )
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFileTypeError(
            f"the output {target} is a {kind(st.st_mode)}, not a regular file; refusing to replace it. "
            "Choose another output path (-o)."
        )
    if not overwrite:
        raise OutputExistsError(
            f"the output {target} already exists; pass --force to replace it, or choose another output path (-o)."
        )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_folder(root: Path) -> None:
    """Refuse a folder that strip cannot copy faithfully and safely.

    Every entry must be a regular file, a folder, or a relative symbolic link whose target (all
    links resolved) stays inside ``root``; such links are recreated as links. FIFOs, sockets,
    devices, absolute links and links leaving the folder are refused: their targets are never read.

    Raises:
        UnsupportedFileTypeError: the first such entry.
    """
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):  # links to folders are not descended
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError as exc:
                raise os_error(path, exc) from exc
            if stat.S_ISLNK(st.st_mode):
                link = os.readlink(path)
                if os.path.isabs(link) or not _inside(os.path.realpath(path), real_root):
                    raise UnsupportedFileTypeError(
                        f"{path} is a symbolic link to {link!r}, outside {root}; strip copies links only within "
                        "the folder and never follows one out of it. Replace the link with the file it points to "
                        "(e.g. copy the folder with 'cp -rL'), then retry."
                    )
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise UnsupportedFileTypeError(
                    f"{path} is a {kind(st.st_mode)}, not a regular file or folder; strip cannot copy it. "
                    "Remove it from the folder, then retry."
                )


def _raise(exc: OSError) -> None:
    raise os_error(exc.filename or "?", exc) from exc
