"""How fast does the CLI answer ``--help`` and ``--version``? (Target: under 0.3 s; torch never imported.)

Runs each command ``--repeats`` times in fresh subprocesses, interleaved with ``python -c pass``
as the interpreter's own start-up baseline, and prints the medians.

    python benchmarks/cli_startup.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median, write_json

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "random-ltd --version": [sys.executable, "-m", "random_ltd_cli", "--version"],
    "random-ltd --help": [sys.executable, "-m", "random_ltd_cli", "--help"],
    "random-ltd strip --help": [sys.executable, "-m", "random_ltd_cli", "strip", "--help"],
}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.repeats = 1
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(a.repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    t = {k: median(v) for k, v in times.items()}
    print(f"CLI start-up, median of {a.repeats} fresh processes (target: under 0.3 s)")
    for name, value in t.items():
        print(f"  {name:<28}{value * 1e3:8.0f} ms")
    result: dict[str, object] = {"benchmark": "cli_startup", "median_s": t, "target_s": 0.3, "repeats": a.repeats,
                                 "python": sys.version.split()[0]}
    if not a.smoke or a.json_path:
        print(f"  json: {write_json('cli_startup', result, a.json_path)}")
    return result


if __name__ == "__main__":
    main()
