"""One short GPU check (under 5 minutes): the gpu-marked tests and the two speed benchmarks in bf16 at S=2048.

Runs on a CUDA machine without network where torch (and the project) are installed:

    python benchmarks/gpu_check.py

1. ``pytest -m gpu`` (CUDA correctness: gather/scatter against a reference, no host syncs in sampling);
2. ``layer_overhead.py`` in bf16: GPT-2-small block, B=8, S=2048, r=1024;
3. ``model_speedup.py`` in bf16: 12-layer GPT-2-small-shaped model, B=4, S=2048, r=1024;

and prints one table (also written to benchmarks/results/gpu_check.json). Without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
              "Run this script on a machine with an NVIDIA GPU.")
        return 0
    sys.path.insert(0, str(HERE))
    import layer_overhead
    import model_speedup

    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name()), ("torch", torch.__version__)]
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")],
                           capture_output=True, text=True, cwd=ROOT, timeout=240)
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    rows.append(("gpu tests", f"{'ok' if tests.returncode == 0 else 'FAILED'}: {summary}"))
    if tests.returncode != 0:
        print(tests.stdout[-4000:], tests.stderr[-2000:], sep="\n")
    lo = layer_overhead.main(["--device", "cuda", "--dtype", "bfloat16", "--seq", "2048", "--batch", "8",
                              "--repeats", "20", "--warmup", "3", "--json", str(HERE / "results/gpu_layer.json")])
    rows.append(("layer overhead (wrapped / bare)", f"{lo['ratio_wrapped_over_bare']:.3f}"))
    ms = model_speedup.main(["--device", "cuda", "--dtype", "bfloat16", "--seq", "2048", "--batch", "4",
                             "--repeats", "10", "--warmup", "2", "--json", str(HERE / "results/gpu_model.json")])
    rows.append(("model step ratio measured", f"{ms['ratio_measured']:.3f}"))
    rows.append(("model step ratio ideal", f"{ms['ratio_ideal']:.3f}"))
    rows.append(("measured / ideal", f"{ms['measured_over_ideal']:.3f}"))
    rows.append(("wall time", f"{time.perf_counter() - t0:.0f} s"))
    width = max(len(k) for k, _ in rows)
    print("\nGPU check")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    out = HERE / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows), indent=2) + "\n")
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
