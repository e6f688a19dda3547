"""Shared helpers for the benchmarks: interleaved timing, machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
"""Reference results, committed: a run writes here only when asked (``--json benchmarks/results/NAME.json``)."""
LOCAL = RESULTS / "local"
"""Where a run writes by default (ignored by git), so the reference results are never overwritten."""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating between them so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(name: str, payload: dict[str, Any], path: str | None = None) -> Path:
    out = Path(path) if path else LOCAL / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def finish(
    name: str, title: str, rows: list[tuple[str, str]], result: dict[str, Any], argv: list[str] | None,
    smoke: bool, json_path: str | None, device: str,
) -> dict[str, Any]:
    """Add the machine and the command to ``result``, print the table, and write the JSON (not for smoke runs)."""
    result["machine"] = machine(device)
    result["command"] = f"python benchmarks/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(title)
    for label, value in rows:
        print(f"  {label:<30}{value:>10}")
    if not smoke or json_path:
        print(f"  json: {write_json(name, result, json_path)}")
    return result


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
