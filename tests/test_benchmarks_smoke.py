"""Every benchmark runs end to end in a tiny smoke version (the real runs are never part of CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "args", "key"),
    [
        ("layer_overhead.py", ["--smoke"], "ratio_wrapped_over_bare"),
        ("model_speedup.py", ["--smoke"], "measured_over_ideal"),
        ("sampling_cost.py", ["--smoke"], "ratio_deepspeed_over_ours"),
        ("cli_startup.py", ["--smoke"], "median_s"),
        ("mixer_rule_cost.py", ["--smoke"], "rule_ms_per_layer"),
        ("compile_schedule.py", ["--smoke"], "compilations"),
        ("strip_throughput.py", ["--size-mib", "4", "--repeats", "1"], None),
        ("strip_dcp.py", ["--size-mib", "4", "--repeats", "1"], "ratio_vs_cp_r_sync"),
        ("verify_cost.py", ["--smoke"], "ratio_steady_state"),
        ("hostile_memory.py", ["--smoke"], "all_as_expected"),
        ("demo_threads.py", ["--smoke", "--threads", "1"], "rule_would_choose"),
    ],
)
def test_benchmark_smoke(tmp_path: Path, script: str, args: list[str], key: str | None) -> None:
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip()  # prints its table
    data = json.loads(out.read_text())
    if key is not None:
        assert key in data


def test_gpu_check_exits_cleanly_without_cuda() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run benchmarks/gpu_check.py by hand")
    p = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    assert "no CUDA device" in p.stdout
