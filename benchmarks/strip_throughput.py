"""How close does `random-ltd strip` come to `cp` + `sync`? Paired runs, .safetensors and .pt, with the copy floor.

For each format, one checkpoint of --size-mib with random-LTD names is written; then, --repeats
times, three commands run back to back in a rotating order (so drift and cache state hit each alike):

* ``cp SRC DST`` then ``sync DST``  (the same durability as strip, which fsyncs before renaming)
* ``random-ltd strip SRC -o DST``  (a fresh process, the real CLI: the console script beside the
  interpreter, else ``python -m random_ltd_cli``)
* the aligned-copy floor: a bare ``os.copy_file_range`` loop from offset 0, 64 MiB per call, then
  ``fsync`` (what a whole-file kernel copy costs from Python, without strip's reading and writing)

Each repeat gives a ratio to the ``cp`` + ``sync`` of the same repeat; the medians of those paired
ratios (and their spread) are reported. Every run starts after a global ``sync`` (outside the
timing) with the source in the page cache; the package's bytecode is compiled first, as an installed
copy has it. Peak RSS comes from GNU time's ``%M``. Also reported: the start-up of a dry-run strip of
a small file next to ``python -c pass``. Targets: strip / (cp + sync) <= 1.15, peak RSS <= 64 MiB.
``--reflink-dir`` repeats the run in a folder on a file system that shares extents (e.g. a
loop-mounted ``mkfs.xfs -m reflink=1`` image), where ``cp``, the floor and strip all clone instead
of copying; there only the seconds mean something. Results go to
``benchmarks/results/local/strip_throughput.json`` (never over the committed reference) unless ``--json``.

    python benchmarks/strip_throughput.py                 # 2 GiB files, 7 paired repeats
    python benchmarks/strip_throughput.py --reflink-dir /mnt/xfs      # also on a reflink file system
    python benchmarks/strip_throughput.py --size-mib 16 --repeats 1 --json /tmp/smoke.json   # smoke run
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
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
from importlib.metadata import version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.15
TARGET_RSS_MIB = 64
TENSORS = 16  # the checkpoint holds this many equal tensors, named like a wrapped layer's weights
BLOCK = 16 << 20  # random bytes repeated to fill the data region (random so no file system can compress it)
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")
_SCRIPT = Path(sys.executable).with_name("random-ltd")
STRIP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "random_ltd_cli"]
"""The installed console script, as users run it; ``python -m random_ltd_cli`` where there is none."""
FLOOR = """
import os, sys
src, dst = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
size, at = os.fstat(src).st_size, 0
while at < size:
    at += os.copy_file_range(src, dst, min(size - at, 64 << 20), at, at)
os.fsync(dst)
"""


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
    """A torch.save zip checkpoint with the same tensors, written by a child process (this one stays small)."""
    script = (
        "import sys, torch; from safetensors.torch import load_file; torch.save(load_file(sys.argv[1]), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", script, str(source), str(path)], check=True)


def run_child(argv: list[str], scratch: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes; GNU time's %M where available) of one child process."""
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


PAIRS = {"strip": ("strip", "cp_sync"), "floor": ("floor", "cp_sync"), "strip_floor": ("strip", "floor")}


def measure(src: Path, out: Path, repeats: int) -> dict[str, Any]:
    """``repeats`` rounds of cp + sync, strip and the floor, in rotating order; paired ratios."""
    scratch = out.parent

    def cp_sync() -> tuple[float, int]:
        t1, rss = run_child(["cp", str(src), str(out)], scratch)
        t2, _ = run_child(["sync", str(out)], scratch)
        return t1 + t2, rss

    def strip() -> tuple[float, int]:
        return run_child([*STRIP, "strip", str(src), "-o", str(out)], scratch)

    def floor() -> tuple[float, int]:
        return run_child([sys.executable, "-c", FLOOR, str(src), str(out)], scratch)

    commands = {"cp_sync": cp_sync, "strip": strip, "floor": floor}
    order = list(commands)
    times: dict[str, list[float]] = {k: [] for k in commands}
    peaks: dict[str, int] = dict.fromkeys(commands, 0)
    for i in range(repeats):
        for name in order[i % 3 :] + order[: i % 3]:
            out.unlink(missing_ok=True)
            os.sync()  # no earlier run's dirty pages are written back during this one
            seconds, rss = commands[name]()
            times[name].append(seconds)
            peaks[name] = max(peaks[name], rss)
    out.unlink(missing_ok=True)
    ratios = {k: [a / b for a, b in zip(times[n], times[d], strict=True)] for k, (n, d) in PAIRS.items()}
    return {
        "bytes": src.stat().st_size,
        "seconds_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "strip_over_cp_sync": round(statistics.median(ratios["strip"]), 3),
        "strip_over_cp_sync_range": [round(min(ratios["strip"]), 3), round(max(ratios["strip"]), 3)],
        "floor_over_cp_sync": round(statistics.median(ratios["floor"]), 3),
        "floor_over_cp_sync_range": [round(min(ratios["floor"]), 3), round(max(ratios["floor"]), 3)],
        "strip_over_floor": round(statistics.median(ratios["strip_floor"]), 3),
        "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
    }


def startup(folder: Path, repeats: int) -> dict[str, float]:
    """Median seconds of ``python -c pass`` and of a dry-run strip of a small file (start-up up to the first write)."""
    small = folder / "small.safetensors"
    write_safetensors(small, 1 << 20)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "strip --dry-run": [*STRIP, "strip", str(small), "--dry-run"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            times[name].append(run_child(argv, folder)[0])
    small.unlink()
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


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
        "strip_command": " ".join(STRIP),
    }


def run_in(folder: Path | None, size_mib: int, repeats: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="strip-bench-", dir=folder))
    result: dict[str, Any] = {"folder": str(work.parent), "filesystem": filesystem(work), "formats": {}}
    try:
        st = work / "model.safetensors"
        write_safetensors(st, size_mib << 20)
        pt = work / "model.pt"
        write_torch(pt, st)
        result["startup_s"] = startup(work, repeats)
        for fmt, src in (("safetensors", st), ("pt", pt)):
            result["formats"][fmt] = measure(src, work / f"out{src.suffix}", repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def table(title: str, result: dict[str, Any]) -> None:
    print(title)
    print("start-up (median): " + ", ".join(f"{k} {v:.3f} s" for k, v in result["startup_s"].items()))
    print(
        f"{'format':<12} {'cp+sync s':>10} {'strip s':>8} {'floor s':>8} {'strip/(cp+sync)':>16} {'range':>13} "
        f"{'floor/(cp+sync)':>16} {'strip RSS MiB':>14}"
    )
    for fmt, r in result["formats"].items():
        s, lo_hi = r["seconds_median"], r["strip_over_cp_sync_range"]
        spread = f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}"
        print(
            f"{fmt:<12} {s['cp_sync']:>10.3f} {s['strip']:>8.3f} {s['floor']:>8.3f} {r['strip_over_cp_sync']:>16.3f} "
            f"{spread:>13} {r['floor_over_cp_sync']:>16.3f} {r['peak_rss_mib']['strip']:>14.1f}"
        )


def compile_package() -> None:
    """Write random_ltd_cli's bytecode, as an installed package has it.

    Without it, a source checkout run with PYTHONDONTWRITEBYTECODE=1 compiles every module again in
    every strip process, which is start-up no installed copy pays.
    """
    spec = importlib.util.find_spec("random_ltd_cli")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        compileall.compile_dir(folder, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048, help="checkpoint size (default 2048 = 2 GiB)")
    parser.add_argument("--repeats", type=int, default=7, help="paired rounds (default 7)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp folder)")
    parser.add_argument("--reflink-dir", type=Path, default=None, help="also run in this folder (a reflink fs)")
    parser.add_argument("--json", type=Path, default=RESULTS / "local" / "strip_throughput.json",
                        help="where to write results (default: results/local/, never the committed reference)")
    args = parser.parse_args()

    compile_package()
    results: dict[str, Any] = {
        "benchmark": "strip_throughput",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "size_mib": args.size_mib,
        "repeats": args.repeats,
        "machine": machine(Path(args.dir or tempfile.gettempdir())),
        "targets": {"strip_over_cp_sync": TARGET_RATIO, "peak_rss_mib": TARGET_RSS_MIB},
        "main": run_in(args.dir, args.size_mib, args.repeats),
    }
    for r in results["main"]["formats"].values():
        r["meets_targets"] = r["strip_over_cp_sync"] <= TARGET_RATIO and r["peak_rss_mib"]["strip"] <= TARGET_RSS_MIB
    results["formats"] = results["main"]["formats"]  # the headline figures, where earlier versions kept them
    where = f"{results['machine']['cpu_count']} CPUs, {results['main']['filesystem'] or 'unknown fs'}"
    title = f"strip vs cp + sync on {args.size_mib} MiB files ({where}), medians of {args.repeats} paired runs:"
    table(title, results["main"])
    if args.reflink_dir is not None:
        results["reflink"] = run_in(args.reflink_dir, args.size_mib, args.repeats)
        table(f"on {results['reflink']['filesystem']} at {args.reflink_dir} (extents shared):", results["reflink"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
