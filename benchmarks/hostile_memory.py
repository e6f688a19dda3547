"""Peak memory and time of `random-ltd inspect` and `strip` on hostile torch checkpoints (issue 18).

Builds each case in a temporary folder (with the builders of ``tests/checkpoint/hostile_files.py``),
runs the CLI on it in a fresh child process and reports that child's own peak RSS (``wait4``), its
wall time and its exit code. The promise checked: peak RSS under 256 MiB on every input, a refusal
(exit 1, one ``Error:`` line) for every hostile one. Cases:

* deflate bombs: 1 GiB inflated from ~1 MB (honest size; size declared as 4 KiB; wrong CRC over 24 MiB);
* a tuple dict key nested 10^6 levels deep (was a segfault);
* the largest pickles the reader accepts: ~80 MiB of estimated objects (empty lists; empty sets) and a
  dict of 20,000 tensor records, and one past the object budget;
* a ZIP with 65,536 records (the most it accepts);
* a legacy file whose storage count says 2^62 elements.

    python benchmarks/hostile_memory.py            # every case; table + results/local/hostile_memory.json
    python benchmarks/hostile_memory.py --smoke --json /tmp/h.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))

from hostile_files import (  # noqa: E402  (the shared builders live with the tests)
    deep_key_pickle,
    deflate_bomb,
    legacy_torch_save,
    pickle_zip,
    raw_zip,
    split_legacy,
    zip_entries,
    zip_torch_save,
)

RESULTS = ROOT / "benchmarks" / "results"
BUDGET_MIB = 256
_SCRIPT = Path(sys.executable).with_name("random-ltd")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "random_ltd_cli"]


def _stored_zip(path: Path, pkl: bytes) -> Path:
    return pickle_zip(path, pkl)


def _spam(path: Path, opcode: bytes, count: int) -> Path:
    """A list of ``count`` objects made by ``opcode``, in opcodes torch's weights-only unpickler reads."""
    return _stored_zip(path, b"\x80\x02](" + opcode * count + b"e.")


def _tensors(path: Path, count: int) -> Path:
    import torch

    path.write_bytes(zip_torch_save({f"model.layers.{i}.random_ltd_layer.w": torch.zeros(1) for i in range(count)}))
    return path


def _many_records(path: Path) -> Path:
    import torch

    records = [(n, 0, c, len(c), zlib.crc32(c)) for n, c in zip_entries(zip_torch_save({"a": torch.zeros(2)}))]
    records += [(f"archive/pad/{i:06d}", 0, b"", 0, 0) for i in range(65536 - len(records))]
    return raw_zip(path, records)


def _legacy_count(path: Path) -> Path:
    import torch

    parts = split_legacy(legacy_torch_save({"w": torch.zeros(3)}))
    parts[5] = struct.pack("<q", 2**62) + parts[5][8:]
    path.write_bytes(b"".join(parts))
    return path


def _deep(path: Path) -> Path:
    path.write_bytes(deep_key_pickle(10**6))
    return path


def cases(smoke: bool) -> dict[str, tuple[Callable[[Path], Path], bool]]:
    """name -> (builder, whether the CLI must refuse it)."""
    scale = 16 if smoke else 1
    found: dict[str, tuple[Callable[[Path], Path], bool]] = {
        "deflate bomb 1 GiB": (lambda p: deflate_bomb(p, inflated=(1 << 30) // scale), True),
        "deflate bomb, size declared 4 KiB": (lambda p: deflate_bomb(p, inflated=(1 << 30) // scale, declared=4096),
                                              True),
        "tuple key nested 10^6 deep": (_deep, True),
        "legacy count 2^62": (_legacy_count, True),
    }
    if not smoke:
        found.update({
            "wrong CRC, 24 MiB inflated": (lambda p: deflate_bomb(p, inflated=24 << 20, crc=1), True),
            "past the object budget (sets)": (lambda p: _spam(p, b"\x8f", 400_000), True),
            "largest accepted: 800k empty lists": (lambda p: _spam(p, b"]", 800_000), False),
            "largest accepted: 300k empty sets": (lambda p: _spam(p, b"\x8f", 300_000), False),
            "20,000 tensor records": (lambda p: _tensors(p, 20_000), False),
            "65,536 ZIP records": (_many_records, False),
        })  # fmt: skip
    return found


_WRAPPER = """
import json, os, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
print(json.dumps([time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  proc.returncode, proc.stderr.decode(errors="replace")]))
"""


def run(argv: list[str]) -> tuple[float, int, int, str]:
    """Wall seconds, peak RSS (bytes), exit code and stderr of one child process.

    Measured from a small wrapper process whose only child is the command: a child forked from
    this process (which imported torch to build the cases) would inherit its peak RSS.
    """
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, check=True)
    seconds, kib, code, err = json.loads(out.stdout)
    return seconds, kib * 1024, code, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="four refused cases, inspect only, smaller bombs")
    parser.add_argument("--json", type=Path, default=RESULTS / "local" / "hostile_memory.json",
                        help="where to write results (default: results/local/, never the committed reference)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (build, refused)) in enumerate(cases(args.smoke).items()):
            path = build(Path(tmp) / f"case{i}.pt")
            for command in ("inspect",) if args.smoke else ("inspect", "strip"):
                extra = ["-o", str(Path(tmp) / f"out{i}.pt")] if command == "strip" else []
                seconds, rss, code, err = run([*CLI, command, str(path), *extra])
                ok = (code == 1 and err.startswith("Error: ") and len(err.strip().splitlines()) == 1) if refused \
                    else code == 0  # fmt: skip
                rows.append({"case": name, "command": command, "input_bytes": path.stat().st_size,
                             "peak_rss_mib": round(rss / 2**20, 1), "seconds": round(seconds, 2), "exit": code,
                             "as_expected": ok and rss < BUDGET_MIB << 20})  # fmt: skip
                (Path(tmp) / f"out{i}.pt").unlink(missing_ok=True)
            path.unlink()
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':{width}}  command  input MiB  peak RSS MiB  seconds  exit  ok")
    for r in rows:
        print(f"{r['case']:{width}}  {r['command']:7}  {r['input_bytes'] / 2**20:9.1f}  {r['peak_rss_mib']:12.1f}  "
              f"{r['seconds']:7.2f}  {r['exit']:4}  {'yes' if r['as_expected'] else 'NO'}")
    result = {
        "budget_mib": BUDGET_MIB, "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
        "all_as_expected": all(r["as_expected"] for r in rows), "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not result["all_as_expected"]:
        raise SystemExit("some case broke the promise (see the table)")


if __name__ == "__main__":
    main()
