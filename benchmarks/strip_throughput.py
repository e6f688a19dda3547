"""How close does `random-ltd strip` come to copying the file? Time and peak memory, .safetensors and .pt.

For each format, one checkpoint of --size-mib with random-LTD names is written, then, alternating
and --repeats times each:

* ``cp SRC DST``                      (the page cache holds the copy; nothing forces it to disk)
* ``cp SRC DST`` then ``fsync(DST)``  (the same durability strip gives: strip fsyncs before renaming)
* ``python -m random_ltd_cli strip SRC -o DST`` in a fresh process

Each command runs in its own child process; its peak RSS comes from ``os.wait4``. Medians are
reported, with strip time over cp time (targets: ratio <= 1.25, peak RSS <= 256 MiB), printed as a
table and written as JSON (default benchmarks/results/strip_throughput.json).

    python benchmarks/strip_throughput.py                 # 2 GiB files, 3 repeats
    python benchmarks/strip_throughput.py --size-mib 16 --repeats 1 --json /tmp/smoke.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.25
TARGET_RSS_MIB = 256
TENSORS = 16  # the checkpoint holds this many equal tensors, named like a wrapped layer's weights
BLOCK = 16 << 20  # random bytes repeated to fill the data region (random so no file system can compress it)


def names() -> list[str]:
    return [f"model.layers.{i}.random_ltd_layer.mlp.weight" for i in range(TENSORS)]


def write_safetensors(path: Path, size: int) -> None:
    """A safetensors file written directly (header + data), without holding the data in memory."""
    per = size // TENSORS // 4 * 4
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(names()):
        header[name] = {"dtype": "F32", "shape": [per // 4], "data_offsets": [i * per, (i + 1) * per]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = per * TENSORS
        while left:
            chunk = block[: min(left, BLOCK)]
            f.write(chunk)
            left -= len(chunk)


def write_torch(path: Path, source: Path) -> None:
    """A torch.save zip checkpoint with the same tensors, written by a child process.

    This process never imports torch: a child's peak RSS (``ru_maxrss``) counts the memory it
    inherits from the parent at fork time, so the parent must stay small.
    """
    script = (
        "import sys, torch; from safetensors.torch import load_file; torch.save(load_file(sys.argv[1]), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", script, str(source), str(path)], check=True)


GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def run_child(argv: list[str], scratch: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process.

    Linux counts a parent's memory in a child's peak RSS when the child is started from it,
    so the command is started by GNU time (a small program) where available, which reports the
    command's own peak; otherwise ``os.wait4`` gives an upper bound.
    """
    report = scratch / "rss.txt"
    launcher = [GNU_TIME, "-f", "%M", "-o", str(report)] if GNU_TIME else []
    start = time.perf_counter()
    proc = subprocess.Popen([*launcher, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    kib = int(report.read_text().split()[-1]) if GNU_TIME else usage.ru_maxrss  # KiB on Linux
    return elapsed, kib * 1024


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measure(src: Path, out: Path, repeats: int) -> dict[str, Any]:
    """Alternate cp, cp+fsync and strip ``repeats`` times; return medians and peaks."""

    def cp() -> tuple[float, int]:
        return run_child(["cp", str(src), str(out)], src.parent)

    def cp_fsync() -> tuple[float, int]:
        start = time.perf_counter()
        _, rss = run_child(["cp", str(src), str(out)], src.parent)
        fsync_path(out)
        return time.perf_counter() - start, rss

    def strip() -> tuple[float, int]:
        return run_child([sys.executable, "-m", "random_ltd_cli", "strip", str(src), "-o", str(out)], src.parent)

    commands: dict[str, Callable[[], tuple[float, int]]] = {"cp": cp, "cp_fsync": cp_fsync, "strip": strip}
    times: dict[str, list[float]] = {k: [] for k in commands}
    peaks: dict[str, int] = dict.fromkeys(commands, 0)
    for _ in range(repeats):
        for name, command in commands.items():
            out.unlink(missing_ok=True)
            os.sync()  # start each run without the previous run's dirty pages being written back
            seconds, rss = command()
            times[name].append(seconds)
            peaks[name] = max(peaks[name], rss)
    out.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bytes": src.stat().st_size,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_vs_cp": round(med["strip"] / med["cp"], 3),
        "ratio_vs_cp_fsync": round(med["strip"] / med["cp_fsync"], 3),
        "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "strip_gib_per_s": round(src.stat().st_size / med["strip"] / 2**30, 2),
    }


def filesystem(folder: Path) -> str:
    """The file system type of the mount that holds ``folder`` (Linux), else ''."""
    best, fs = "", ""
    if os.path.exists("/proc/mounts"):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(folder.resolve()).startswith(parts[1]) and len(parts[1]) >= len(best):
                best, fs = parts[1], parts[2]
    return fs


def machine(folder: Path) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": version("torch"),
        "cp": subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "filesystem": filesystem(folder),
        "peak_rss_by": "GNU time %M" if GNU_TIME else "os.wait4 ru_maxrss (upper bound: includes this process)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048, help="checkpoint size (default 2048 = 2 GiB)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command, alternating (default 3)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=RESULTS / "local" / "strip_throughput.json",
                        help="where to write results (default: results/local/, never the committed reference)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="strip-bench-", dir=args.dir))
    results: dict[str, Any] = {
        "benchmark": "strip_throughput",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "size_mib": args.size_mib,
        "repeats": args.repeats,
        "machine": machine(work),
        "targets": {"ratio": TARGET_RATIO, "peak_rss_mib": TARGET_RSS_MIB},
        "formats": {},
    }
    try:
        st = work / "model.safetensors"
        write_safetensors(st, args.size_mib << 20)
        pt = work / "model.pt"
        write_torch(pt, st)
        for fmt, src in (("safetensors", st), ("pt", pt)):
            results["formats"][fmt] = measure(src, work / f"out{src.suffix}", args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for r in results["formats"].values():
        r["meets_targets"] = r["ratio_vs_cp_fsync"] <= TARGET_RATIO and r["peak_rss_mib"]["strip"] <= TARGET_RSS_MIB
    print(
        f"strip vs cp on {args.size_mib} MiB files ({results['machine']['cpu_count']} CPUs, "
        f"{results['machine']['filesystem'] or 'unknown fs'}), median of {args.repeats}:"
    )
    print(
        f"{'format':<12} {'cp s':>7} {'cp+fsync s':>11} {'strip s':>8} {'/cp':>6} {'/cp+fsync':>10} "
        f"{'strip RSS MiB':>14} {'cp RSS MiB':>11}"
    )
    for fmt, r in results["formats"].items():
        s = r["seconds"]
        print(
            f"{fmt:<12} {s['cp']:>7.2f} {s['cp_fsync']:>11.2f} {s['strip']:>8.2f} {r['ratio_vs_cp']:>6.2f} "
            f"{r['ratio_vs_cp_fsync']:>10.2f} {r['peak_rss_mib']['strip']:>14.1f} {r['peak_rss_mib']['cp']:>11.1f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
