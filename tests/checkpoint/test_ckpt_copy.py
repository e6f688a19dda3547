"""Strip's copies: byte-identical to the previous release's output, whichever copy method the system allows."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from random_ltd_cli.checkpoint import _copy, _io, strip_checkpoint
from random_ltd_cli.checkpoint._io import Progress
from random_ltd_cli.errors import CheckpointError

GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFEST = json.loads((GOLDEN / "expected.json").read_text())
CASES = sorted(MANIFEST["expected_sha256"])


def digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        (p.relative_to(path).as_posix() if path.is_dir() else ""): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


def no_clone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_copy, "clone", lambda src, dst: False)


def no_kernel_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a system without copy_file_range: the read/write loop, in pieces smaller than a page."""
    no_clone(monkeypatch)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(_io, "CHUNK", 4093)


def refused_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """FICLONE and copy_file_range both refuse (another file system, an old kernel): quiet fallbacks."""
    import fcntl

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)


METHODS = {"auto": lambda mp: None, "no-clone": no_clone, "read-write": no_kernel_copy, "refused": refused_everywhere}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", CASES)
def test_output_is_byte_identical_to_the_previous_release(
    case: str, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digests in golden/expected.json were made by the previous strip (see golden/make_golden.py)."""
    src = GOLDEN / "inputs" / case
    METHODS[method](monkeypatch)
    out = tmp_path / case
    strip_checkpoint(src, out)
    assert digests(out) == MANIFEST["expected_sha256"][case]
    assert digests(out) != digests(src)  # every case renames something: the test cannot pass by copying


def test_golden_inputs_are_real_wrapped_checkpoints() -> None:
    from random_ltd_cli.checkpoint import inspect_checkpoint

    for case in CASES:
        info = inspect_checkpoint(GOLDEN / "inputs" / case)
        assert info.wrapped_layers and info.tensor_count > 10, case


def test_copy_file_copies_every_byte(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 4096 + 123))
    calls: list[tuple[int, int]] = []
    dst = tmp_path / "dst.bin"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = _copy.copy_file(src, fd, progress=Progress(lambda d, t: calls.append((d, t)), src.stat().st_size))
    finally:
        os.close(fd)
    assert size == src.stat().st_size and dst.read_bytes() == src.read_bytes()
    assert calls[-1] == (size, size)


def test_copy_patched_refuses_a_changed_input(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10_000)
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(CheckpointError, match="changed size while it was being copied; retry"):
            _copy.copy_patched(src, fd, [(0, b"y")], size=9_999)
        with pytest.raises(CheckpointError, match="outside"):
            _copy.copy_patched(src, fd, [(9_999, b"yy")], size=10_000)
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.environ.get("RANDOM_LTD_REFLINK_DIR"), reason="set RANDOM_LTD_REFLINK_DIR to a reflink fs")
def test_clone_on_a_file_system_that_shares_extents(monkeypatch: pytest.MonkeyPatch) -> None:
    """E.g. a loop-mounted ``mkfs.xfs -m reflink=1`` image (see docs/performance.md): clone, then patch."""
    import shutil

    folder = Path(os.environ["RANDOM_LTD_REFLINK_DIR"]) / f"rltd-clone-test-{os.getpid()}"
    clones: list[bool] = []
    real_clone = _copy.clone
    monkeypatch.setattr(_copy, "clone", lambda src, dst: clones.append(real_clone(src, dst)) or clones[-1])
    try:
        shutil.copytree(GOLDEN / "inputs", folder / "inputs")
        for case in CASES:
            out = folder / case
            strip_checkpoint(folder / "inputs" / case, out)
            assert digests(out) == MANIFEST["expected_sha256"][case]
        assert clones and all(clones)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
