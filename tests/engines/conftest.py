"""Helpers for the engine tests: real DeepSpeed, Accelerate, Lightning and PEFT on CPU.

An engine that is not installed skips its tests locally, but fails them in CI (``CI`` set), so a
broken install can never pass silently.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def require(module: str) -> ModuleType:
    """Import ``module``; skip without it, or fail in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed ({exc}); CI installs it with the [test] extra.")
        pytest.skip(f"{module} is not installed")
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_worker(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run a worker script of this folder in a fresh CPU-only process; fail with its output if it fails."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        pytest.fail(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return proc


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def untouched() -> Callable[[Path], Callable[[], None]]:
    """``check = untouched(path)`` records a file's or folder's bytes; ``check()`` asserts nothing changed."""

    def record(path: Path) -> Callable[[], None]:
        before = _snapshot(path)

        def check() -> None:
            assert _snapshot(path) == before, f"{path} changed"

        return check

    return record
