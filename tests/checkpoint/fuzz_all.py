"""The fuzz driver over every checkpoint format: seeded cases, clean outcomes, no canary, bounded time and memory.

Formats: ``safetensors`` and ``hf-dir`` (generators of ``fuzz.py``), ``torch-zip``, ``torch-legacy``,
``bare-pickle`` (``fuzz_torch.py``), ``deepspeed-dir``, ``dcp-dir``, ``run-dir`` (``fuzz_folders.py``).
Each case runs ``inspect_checkpoint`` then ``strip_checkpoint`` in this process. It passes when:

- both end with a :class:`~random_ltd_cli.errors.CheckpointError`: no output, no temporary file,
  the input byte for byte unchanged; or
- they succeed: every rewritten torch file loads with ``torch.load(weights_only=True)`` with the
  input's tensors under the stripped names, safetensors files load with the stripped names and the
  same bytes, DCP metadata unpickles with the stripped names; a hostile input that was accepted is
  then loaded *without* restriction (``torch.load(weights_only=False)``, ``pickle.load``): if its
  payload ran, the canary says so and the case fails as a bypass;

and the canary file (``CANARY`` in the case folder, which every hostile payload would create) never
appears, within ``CASE_TIMEOUT_S`` (a hang guard, not a speed claim). ``ru_maxrss`` growth per case
is recorded. ``cli_sample`` runs generated cases through ``random-ltd inspect/strip --json`` in child
processes and measures each child's peak RSS (``wait4``) against the 256 MiB budget. A long run::

    python -m tests.checkpoint.fuzz_all --cases 20000 --seed 1807 --cli 100 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.errors import CheckpointError
from random_ltd_cli.keys import strip_key

from . import fuzz, fuzz_folders, fuzz_torch

CASE_TIMEOUT_S = 20
MEMORY_BUDGET_MIB = 256
TORCH_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")


def gen_safetensors(rng: random.Random, work: Path) -> tuple[Path, bool]:
    src = work / "m.safetensors"
    header, data = fuzz.header_of(fuzz.random_tensors(rng), rng.choice([None, {"format": "pt"}]))
    blob: bytes | None = None
    for _ in range(rng.randint(0, 3)):
        if rng.random() < 0.7:
            header, data = rng.choice(fuzz.MUTATORS)(rng, header, data)
        else:
            blob = fuzz.raw_mutation(rng, blob if blob is not None else fuzz.encode(header, data))
    src.write_bytes(blob if blob is not None else fuzz.encode(header, data))
    return src, False


def gen_hf(rng: random.Random, work: Path) -> tuple[Path, bool]:
    fuzz.make_folder(rng, work / "hf")
    return work / "hf", False


GENERATORS: dict[str, Callable[[random.Random, Path], tuple[Path, bool]]] = {
    "safetensors": gen_safetensors, "hf-dir": gen_hf, **fuzz_torch.GENERATORS, **fuzz_folders.GENERATORS,
}
FORMATS = list(GENERATORS)


# --- checking an accepted case ---------------------------------------------------------------------


def _tensors(obj: Any, out: list[tuple[str, tuple[int, ...], str]], seen: set[int]) -> None:
    """Every tensor reachable in ``obj`` as (dtype, shape, hash of bytes); no recursion limit issues (small)."""
    import torch

    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        raw = obj.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b""
        out.append((str(obj.dtype), tuple(obj.shape), hashlib.sha256(raw).hexdigest()))
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out, seen)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _tensors(v, out, seen)


def _state_dicts(obj: Any) -> list[dict[str, Any]]:
    """The state dicts strip renames: the object itself or under ``module``/``state_dict``/``model``."""
    import torch

    found = []
    for cand in [obj] + [obj.get(k) for k in ("module", "state_dict", "model") if isinstance(obj, dict)]:
        if isinstance(cand, dict) and cand and all(isinstance(v, torch.Tensor) for v in cand.values()):
            found.append(cand)
    return found


class InputUnloadable(Exception):
    """The accepted input does not load in its reference loader either, and the output fails the same way."""


def _equally_unloadable(load: Callable[[Path], Any], b: Path, exc: Exception) -> None:
    try:
        load(b)
    except Exception as out_exc:
        raise InputUnloadable(f"{type(exc).__name__} / {type(out_exc).__name__}") from exc
    raise AssertionError(f"{b.name} loads although the input does not ({type(exc).__name__}: {exc})")


def check_torch(a: Path, b: Path) -> None:
    import torch

    if a.read_bytes() == b.read_bytes():
        return  # copied unchanged (nothing to strip, or a side file)
    trusted = False
    try:
        want = torch.load(a, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" not in str(exc):
            _equally_unloadable(lambda p: torch.load(p, weights_only=True, map_location="cpu"), b, exc)
        # opcodes torch's restricted unpickler lacks (protocol 4, LONG4, POP...). strip accepted it without
        # --trust-pickle, so its globals are all on the allowlist: loading it unrestricted is what a user
        # would do; a payload that got through would leave the canary
        try:
            want, trusted = torch.load(a, weights_only=False, map_location="cpu"), True
        except Exception as exc2:
            _equally_unloadable(lambda p: torch.load(p, weights_only=False, map_location="cpu"), b, exc2)
    except Exception as exc:
        _equally_unloadable(lambda p: torch.load(p, weights_only=True, map_location="cpu"), b, exc)
    got = torch.load(b, weights_only=not trusted, map_location="cpu")
    tw: list[Any] = []
    tg: list[Any] = []
    _tensors(want, tw, set())
    _tensors(got, tg, set())
    assert sorted(tw) == sorted(tg), f"{b.name}: tensors differ from the input's"
    for sw, sg in zip(_state_dicts(want), _state_dicts(got), strict=False):
        assert {strip_key(k) for k in sw} == set(sg), f"{b.name}: names are not the stripped input names"


def _unpickle(path: Path) -> Any:
    with path.open("rb") as f:
        return pickle.load(f)  # what dcp.load does; a payload that got through would leave the canary


def check_metadata(a: Path, b: Path) -> None:
    try:
        want = _unpickle(a)
    except Exception as exc:
        _equally_unloadable(_unpickle, b, exc)
    got = _unpickle(b)
    assert {strip_key(k) for k in want.state_dict_metadata} == set(got.state_dict_metadata), "DCP names"


def check_output(src: Path, out: Path) -> None:
    pairs = [(src, out)] if src.is_file() else [
        (p, out / p.relative_to(src)) for p in sorted(src.rglob("*")) if p.is_file() and not p.is_symlink()
    ]
    for a, b in pairs:
        if not b.exists():
            continue  # strip may lay a run folder out differently; the files it wrote are checked
        if a.suffix == ".safetensors":
            fuzz.check_loads(a, b)
        elif a.suffix in TORCH_SUFFIXES:
            check_torch(a, b)
        elif a.name == ".metadata":
            check_metadata(a, b)


def load_unrestricted(src: Path) -> None:
    """Load an accepted hostile input the way a user would, without restriction: the canary shows a bypass."""
    import torch

    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
    for p in files:
        try:
            if p.name == ".metadata":
                with p.open("rb") as f:
                    pickle.load(f)
            elif p.suffix in TORCH_SUFFIXES:
                torch.load(p, weights_only=False, map_location="cpu")
        except Exception:  # corrupt files may fail to load; only the canary matters
            continue


# --- running ---------------------------------------------------------------------------------------


@dataclass
class Stats:
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    max_case_s: float = 0.0
    total_s: float = 0.0
    max_rss_growth_mib: float = 0.0


@dataclass
class Result:
    per_format: dict[str, Stats] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0

    @property
    def cases(self) -> int:
        return sum(s.cases for s in self.per_format.values())

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "failures": len(self.failures), "seconds": round(self.seconds, 1),
            "process_peak_rss_mib": round(self.peak_rss_mib, 1),
            "per_format": {f: {"cases": s.cases, "outcomes": dict(sorted(s.outcomes.items())),
                               "max_case_s": round(s.max_case_s, 3), "total_s": round(s.total_s, 1),
                               "max_rss_growth_mib": round(s.max_rss_growth_mib, 1)}
                           for f, s in self.per_format.items()},
        }  # fmt: skip


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"case took more than {CASE_TIMEOUT_S} s")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(fmt: str, rng: random.Random, work: Path) -> str:
    """One case in the empty folder ``work``: ``"refused:<Error>"``, ``"ok"``...; raises on a failure."""
    src, hostile = GENERATORS[fmt](rng, work)
    canary = work / fuzz_torch.CANARY
    out = work / ("out" + src.suffix if src.is_file() and not src.is_symlink() else "out")
    before = fuzz.snapshot(src)
    try:
        inspect_checkpoint(src)
        strip_checkpoint(src, out)
    except CheckpointError as exc:
        assert not canary.exists(), "CANARY: a payload ran"
        assert not out.exists() and not out.is_symlink(), "output written despite the error"
        assert not [p for p in work.iterdir() if p.name.endswith(".tmp")], "temporary file left"
        assert fuzz.snapshot(src) == before, "input changed"
        return f"refused:{type(exc).__name__}"
    assert not canary.exists(), "CANARY: a payload ran"
    assert fuzz.snapshot(src) == before, "input changed"
    unloadable = False
    if out.exists():
        try:
            check_output(src, out)
        except InputUnloadable:
            unloadable = True
    assert not canary.exists(), "CANARY: a payload ran when the output was loaded with weights_only=True"
    if hostile:
        load_unrestricted(src)
        assert not canary.exists(), "BYPASS: a hostile input was accepted and its payload runs when loaded"
        return "ok-hostile-inert"
    return "ok-input-unloadable" if unloadable else "ok"


def run(
    cases: int, seed: int, *, formats: list[str] | None = None, stop_after: int = 20, progress: bool = False,
) -> Result:
    """``cases`` cases, formats in turn; case ``i``'s seed is ``seed * 1_000_003 + i``."""
    import torch

    torch.set_num_threads(1)
    formats = formats or FORMATS
    result = Result(per_format={f: Stats() for f in formats})
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory(prefix="rltd-fuzz-all-") as tmp:
            for i in range(cases):
                fmt = formats[i % len(formats)]
                stats = result.per_format[fmt]
                work = Path(tmp) / str(i)
                work.mkdir()
                case_seed = seed * 1_000_003 + i
                rss0, t0 = _rss_mib(), time.monotonic()
                signal.alarm(CASE_TIMEOUT_S)
                try:
                    outcome = run_case(fmt, random.Random(case_seed), work)
                except BaseException as exc:  # every other outcome is a finding
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    result.failures.append({"format": fmt, "seed": case_seed,
                                            "error": f"{type(exc).__name__}: {exc}"[:500],
                                            "traceback": traceback.format_exc()[-3000:]})
                    outcome = "FAILURE"
                finally:
                    signal.alarm(0)
                stats.max_case_s = max(stats.max_case_s, time.monotonic() - t0)
                stats.total_s += time.monotonic() - t0
                stats.max_rss_growth_mib = max(stats.max_rss_growth_mib, _rss_mib() - rss0)
                stats.cases += 1
                stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
                _remove(work)
                if progress and (i + 1) % 1000 == 0:
                    print(f"{i + 1} cases, {len(result.failures)} failures, {time.monotonic() - start:.0f} s",
                          file=sys.stderr, flush=True)
                if len(result.failures) >= stop_after:
                    break
    finally:
        signal.signal(signal.SIGALRM, previous)
    result.seconds = time.monotonic() - start
    result.peak_rss_mib = _rss_mib()
    return result


def _remove(work: Path) -> None:
    for p in work.rglob("*"):  # a FIFO or a link is removed, never opened
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o700)
    shutil.rmtree(work, ignore_errors=True)


# --- the CLI on a sample ---------------------------------------------------------------------------


_WRAPPER = (  # a fresh process without torch runs the CLI, so the child's peak RSS is its own (a child forked
    # from this process would inherit this process's peak)
    "import json, resource, subprocess, sys\n"
    "out, err = open(sys.argv[1], 'wb'), open(sys.argv[2], 'wb')\n"
    "try:\n"
    "    rc = subprocess.run(sys.argv[4:], stdout=out, stderr=err, stdin=subprocess.DEVNULL,\n"
    "                        timeout=float(sys.argv[3])).returncode\n"
    "except subprocess.TimeoutExpired:\n"
    "    rc = 'hang'\n"
    "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc]))\n"
)


def _cli(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str, str, float]:
    """Run ``random-ltd ARGS`` in a child; return (exit code, stdout, stderr, the child's peak RSS in MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        wrapped = subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(out), str(err), str(timeout), sys.executable, "-m", "random_ltd_cli",
             *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
        )  # fmt: skip
        rss_kib, rc = json.loads(wrapped.stdout)
        if rc == "hang":
            raise AssertionError(f"random-ltd {' '.join(args)} hung for {timeout} s")
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace"), rss_kib / 1024


def check_cli(args: list[str], cwd: Path, *, json_mode: bool) -> tuple[int, float]:
    rc, out, err, rss = _cli(args, cwd)
    assert rc in (0, 1), f"exit {rc}: {err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert rss < MEMORY_BUDGET_MIB, f"peak RSS {rss:.0f} MiB"
    if json_mode:
        obj = json.loads(out)  # exactly one JSON object
        assert isinstance(obj, dict) and (rc == 0) == ("error" not in obj), out[-500:]
    elif rc == 1:
        # one Error: line, the last; notes may stand above it (inspect of a folder where nothing is readable
        # lists each file's reason first)
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("Error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    return rc, rss


def cli_sample(cases: int, seed: int, *, formats: list[str] | None = None) -> dict[str, Any]:
    """``cases`` generated cases through ``inspect --json`` and ``strip --json`` (every fourth without --json)."""
    formats = formats or FORMATS
    exits: dict[str, int] = {}
    peak = 0.0
    with tempfile.TemporaryDirectory(prefix="rltd-fuzz-cli-") as tmp:
        for i in range(cases):
            work = Path(tmp) / str(i)
            work.mkdir()
            src, _ = GENERATORS[formats[i % len(formats)]](random.Random(seed * 1_000_003 + i), work)
            json_mode = i % 4 != 3
            flags = ["--json"] if json_mode else []
            for args in (["inspect", str(src), *flags], ["strip", str(src), "-o", str(work / "out"), *flags]):
                try:
                    rc, rss = check_cli(args, work, json_mode=json_mode)
                except AssertionError as exc:
                    raise AssertionError(f"seed {seed * 1_000_003 + i}, random-ltd {args[0]}: {exc}") from exc
                peak = max(peak, rss)
                exits[f"{args[0]}:{rc}"] = exits.get(f"{args[0]}:{rc}", 0) + 1
            assert not (work / fuzz_torch.CANARY).exists(), f"seed {seed * 1_000_003 + i}: CANARY"
            _remove(work)
    return {"cli_cases": cases, "cli_runs": 2 * cases, "cli_exits": exits, "cli_peak_rss_mib": round(peak, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cli", type=int, default=0, help="also run this many cases through the CLI")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    res = run(args.cases, args.seed, formats=formats, stop_after=10**9, progress=True)
    summary = {**res.summary(), "seed": args.seed, "case_timeout_s": CASE_TIMEOUT_S,
               "command": "python -m tests.checkpoint.fuzz_all " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    if args.json is not None:  # the in-process part first, in case the CLI part fails
        args.json.write_text(json.dumps({**summary, "failure_details": res.failures}, indent=2) + "\n")
    if args.cli:
        try:
            summary.update(cli_sample(args.cli, args.seed + 1, formats=formats))
        except AssertionError as exc:
            summary["cli_failure"] = str(exc)[:2000]
    print(json.dumps(summary, indent=2))
    for failure in res.failures[:5]:
        print(f"{failure['format']} seed {failure['seed']}: {failure['error']}\n{failure['traceback']}",
              file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({**summary, "failure_details": res.failures}, indent=2) + "\n")
    return 1 if res.failures or "cli_failure" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
