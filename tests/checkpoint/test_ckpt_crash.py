"""kill -9 in the middle of a real ``random-ltd strip``: the destination is absent or complete, never partial."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from random_ltd_cli.checkpoint import strip_checkpoint

SIZE = 64 << 20  # large enough that the copy takes a while, small enough for CI


def big_safetensors(path: Path) -> None:
    """A wrapped checkpoint with an unaligned data region, written without holding it in memory."""
    per = SIZE // 8
    header = {f"h.{i}.random_ltd_layer.w": {"dtype": "U8", "shape": [per], "data_offsets": [i * per, (i + 1) * per]}
              for i in range(8)}  # fmt: skip
    raw = json.dumps(header, separators=(",", ":")).encode()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(SIZE >> 20):
            f.write(block)


def start(src: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-m", "random_ltd_cli", "strip", str(src), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def kill_when(proc: subprocess.Popen[bytes], folder: Path, min_bytes: int) -> bool:
    """SIGKILL once the temporary output holds ``min_bytes``; True if it was killed before finishing."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        temps = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
        try:
            if temps and temps[0].stat().st_size >= min_bytes:
                proc.send_signal(signal.SIGKILL)
                break
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    return proc.wait() == -signal.SIGKILL


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_9_leaves_the_destination_absent_or_complete(tmp_path: Path) -> None:
    src = tmp_path / "in" / "big.safetensors"
    src.parent.mkdir()
    big_safetensors(src)
    reference = tmp_path / "reference.safetensors"
    strip_checkpoint(src, reference)
    expected = reference.read_bytes()
    killed = 0
    for i, min_bytes in enumerate((0, 1, SIZE // 3, SIZE)):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        out = folder / "out.safetensors"
        killed += kill_when(start(src, out), folder, min_bytes)
        assert not out.exists() or out.read_bytes() == expected, f"partial output after kill at {min_bytes} bytes"
    assert killed >= 2, "the kills should land while the copy is under way"
    assert src.stat().st_size == len(expected)
