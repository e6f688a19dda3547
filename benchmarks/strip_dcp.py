"""How close does `random-ltd strip` of a torch.distributed.checkpoint folder come to `cp -r` + sync?

One DCP folder of --size-mib is written by ``dcp.save`` (in a child process, 4 writer threads, so
4 ``.distcp`` files) with random-LTD names; then, alternating and --repeats times each:

* ``cp -r SRC DST`` then fsync of every file and folder of DST (strip gives the same durability:
  it fsyncs the new folder before renaming it into place)
* ``python -m random_ltd_cli strip SRC -o DST`` in a fresh process

Each command runs in its own child process, started by GNU time where available (its ``%M`` is the
command's own peak RSS). Medians are reported with strip / (cp -r + sync); targets: ratio <= 1.25,
strip peak RSS <= 256 MiB. Results: table on stdout and JSON (default
benchmarks/results/local/strip_dcp.json; the committed reference in benchmarks/results/ is never
overwritten by default).

    python benchmarks/strip_dcp.py                                     # 2 GiB, 3 repeats
    python benchmarks/strip_dcp.py --size-mib 8 --repeats 1 --json /tmp/smoke.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from strip_throughput import GNU_TIME, run_child  # one child-process timer for both strip benchmarks

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.25
TARGET_RSS_MIB = 256
TENSORS = 16

_WRITE = """
import sys, torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
size, path, tensors = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
per = size // tensors // 4
g = torch.Generator().manual_seed(0)
state = {f"model.layers.{i}.random_ltd_layer.mlp.weight": torch.rand(per, generator=g) for i in range(tensors)}
dcp.save(state, storage_writer=FileSystemWriter(path, thread_count=4))
"""


def write_dcp(path: Path, size: int) -> None:
    """A DCP folder written by torch itself, in a child (this process stays small and torch-free)."""
    subprocess.run([sys.executable, "-W", "ignore", "-c", _WRITE, str(size), str(path), str(TENSORS)], check=True)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (what strip does for its output)."""
    for dirpath, _, filenames in os.walk(root):
        for name in [*filenames, "."]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def measure(src: Path, out: Path, repeats: int) -> dict[str, Any]:
    def cp_sync() -> tuple[float, int]:
        start = time.perf_counter()
        _, rss = run_child(["cp", "-r", str(src), str(out)], src.parent)
        fsync_tree(out)
        return time.perf_counter() - start, rss

    def strip() -> tuple[float, int]:
        return run_child([sys.executable, "-m", "random_ltd_cli", "strip", str(src), "-o", str(out)], src.parent)

    commands = {"cp_r_sync": cp_sync, "strip": strip}
    times: dict[str, list[float]] = {k: [] for k in commands}
    peaks = dict.fromkeys(commands, 0)
    for _ in range(repeats):
        for name, command in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # start without the previous run's dirty pages
            seconds, rss = command()
            times[name].append(seconds)
            peaks[name] = max(peaks[name], rss)
    shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    size = sum(p.stat().st_size for p in src.iterdir())
    return {
        "bytes": size,
        "files": sorted(p.name for p in src.iterdir()),
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_vs_cp_r_sync": round(med["strip"] / med["cp_r_sync"], 3),
        "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "strip_gib_per_s": round(size / med["strip"] / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048, help="checkpoint size (default 2048 = 2 GiB)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command, alternating (default 3)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=RESULTS / "local" / "strip_dcp.json",
                        help="where to write results (default: results/local/, never the committed reference)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="strip-dcp-bench-", dir=args.dir))
    try:
        src = work / "ckpt"
        write_dcp(src, args.size_mib << 20)
        result = measure(src, work / "out", args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(
        benchmark="strip_dcp",
        command=" ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        size_mib=args.size_mib,
        repeats=args.repeats,
        targets={"ratio": TARGET_RATIO, "peak_rss_mib": TARGET_RSS_MIB},
        machine={
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "peak_rss_by": "GNU time %M" if GNU_TIME else "os.wait4 ru_maxrss (upper bound)",
        },
    )
    result["meets_targets"] = (
        result["ratio_vs_cp_r_sync"] <= TARGET_RATIO and result["peak_rss_mib"]["strip"] <= TARGET_RSS_MIB
    )
    s = result["seconds"]
    print(f"strip vs cp -r + sync on a {args.size_mib} MiB DCP folder ({os.cpu_count()} CPUs), "
          f"median of {args.repeats}:")
    print(f"{'cp -r+sync s':>13} {'strip s':>8} {'ratio':>6} {'strip RSS MiB':>14} {'cp RSS MiB':>11} {'targets':>8}")
    print(
        f"{s['cp_r_sync']:>13.2f} {s['strip']:>8.2f} {result['ratio_vs_cp_r_sync']:>6.2f} "
        f"{result['peak_rss_mib']['strip']:>14.1f} {result['peak_rss_mib']['cp_r_sync']:>11.1f} "
        f"{'met' if result['meets_targets'] else 'MISSED':>8}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
