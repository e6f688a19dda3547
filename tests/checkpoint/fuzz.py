"""Seeded structured fuzzing of strip and inspect: safetensors files, Hugging Face folders, shard indexes.

Each case builds a valid checkpoint from a seeded generator, applies one to three structured
mutations (header fields, offsets, dtypes, lengths, JSON shape and depth, index entries, special
files, links), then runs ``inspect_checkpoint`` and ``strip_checkpoint`` on it. A case passes when:

- both calls end with a :class:`~random_ltd_cli.errors.CheckpointError` (the output is absent, no
  temporary file is left, the input is byte for byte unchanged), or
- they succeed, safetensors itself loads the input and the output, and every output tensor has
  the stripped name and the input's bytes;

and it finishes within the per-case time bound. Anything else (another exception, a hang, an
accepted file that safetensors refuses) is a failure. The CI part is ``test_ckpt_fuzz.py``;
a longer run::

    python tests/checkpoint/fuzz.py --cases 20000 --seed 7 [--json results.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
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

CASE_TIMEOUT_S = 20
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1, "F64": 8}
DTYPES_OK = tuple(DTYPE_BYTES)
WORDS = ["model", "h", "0", "1", "attn", "mlp", "weight", "bias", "random_ltd_layer", "random_ltd_layers", "ln"]


# --- valid checkpoints ---------------------------------------------------------------------


def random_name(rng: random.Random) -> str:
    return ".".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))


def random_tensors(rng: random.Random) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape", "data"}}``: 0 to 5 tensors with distinct names and stripped names."""
    out: dict[str, dict[str, Any]] = {}
    for _ in range(rng.randint(0, 5)):
        name = random_name(rng)
        if name in out or strip_key(name) in {strip_key(n) for n in out}:
            continue
        dtype = rng.choice(list(DTYPES_OK))
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
        numel = 1
        for d in shape:
            numel *= d
        out[name] = {"dtype": dtype, "shape": shape, "data": rng.randbytes(numel * DTYPE_BYTES[dtype])}
    return out


def header_of(tensors: dict[str, dict[str, Any]], metadata: dict[str, Any] | None) -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    data, pos = bytearray(), 0
    for name, t in tensors.items():
        header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [pos, pos + len(t["data"])]}
        data += t["data"]
        pos += len(t["data"])
    return header, bytes(data)


def encode(header: dict[str, Any] | str | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


# --- mutations -----------------------------------------------------------------------------

ODD_VALUES: list[Any] = [None, True, -1, 2**64, 1.5, "", "x", [], {}, [1, 2, 3], "f32", "F33", 2**31]


def _pick_entry(rng: random.Random, header: dict[str, Any]) -> dict[str, Any] | None:
    names = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
    return header[rng.choice(names)] if names else None


def m_dtype(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    entry = _pick_entry(rng, header)
    if entry is not None:
        entry["dtype"] = rng.choice([*DTYPES_OK, "f32", "", "F8_E4M3", "F4", "C64", "U64", 7, None])
    return header, data


def m_shape(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    entry = _pick_entry(rng, header)
    if entry is not None:
        shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else []
        op = rng.randrange(4)
        if op == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 2**40, -1, True, 2.0])
        elif op == 1:
            shape.append(rng.choice([1, 0, 3]))
        elif op == 2 and shape:
            shape.pop()
        else:
            entry["shape"] = rng.choice(ODD_VALUES)
            return header, data
        entry["shape"] = shape
    return header, data


def m_offsets(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    entry = _pick_entry(rng, header)
    if entry is not None:
        offsets = entry.get("data_offsets")
        valid = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        begin, end = offsets if valid else (0, 0)
        entry["data_offsets"] = rng.choice([
            [begin + 1, end + 1], [begin, end + 1], [max(begin - 1, 0), end], [end, begin], [0, end],
            [begin, end, end], [begin], [-1, end], [begin, 2**64], "0,4", [begin, float(end)],
        ])
    return header, data


def m_keys(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    entry = _pick_entry(rng, header)
    if entry is not None:
        if rng.random() < 0.5:
            entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        else:
            entry[rng.choice(["extra", "dtype "])] = rng.choice(ODD_VALUES)
    else:
        header[random_name(rng)] = rng.choice(ODD_VALUES)
    return header, data


def m_names(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    names = [k for k in header if k != "__metadata__"]
    if names:
        old = rng.choice(names)
        new = rng.choice([strip_key(old), old + ".random_ltd_layer", "", "\ud800", "é.random_ltd_layer.w",
                          "__metadata__", "a" * 300, random_name(rng)])
        header = {(new if k == old else k): v for k, v in header.items()}
    return header, data


def m_metadata(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    depth = rng.choice([1, 10, 70, 3000])
    header["__metadata__"] = rng.choice([
        {"format": "pt"}, {"random_ltd": "[" * depth + "]" * depth}, {"random_ltd": '{"a": 1}'}, {"k": 1},
        {"k": "\udfff"}, None, [], "x", {"k": {"a": "b"}}, {"random_ltd": "not json"},
    ])
    return header, data


def m_data(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    op = rng.randrange(3)
    if op == 0:
        return header, data + rng.randbytes(rng.randint(1, 9))
    if op == 1 and data:
        return header, data[: rng.randrange(len(data))]
    return header, data


MUTATORS: list[Callable[[random.Random, dict[str, Any], bytes], tuple[Any, bytes]]] = [
    m_dtype, m_shape, m_offsets, m_keys, m_names, m_metadata, m_data,
]


def raw_mutation(rng: random.Random, blob: bytes) -> bytes:
    """Byte-level changes to the encoded file: length field, flipped or cut bytes, JSON text edits."""
    op = rng.randrange(7)
    length = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
    if op == 0:
        return struct.pack("<Q", rng.choice([0, 1, length + 1, max(length - 1, 0), 2**63, 100_000_001])) + blob[8:]
    if op == 1 and len(blob) > 8:
        pos = rng.randrange(8, len(blob))
        return blob[:pos] + bytes([rng.randrange(256)]) + blob[pos + 1 :]
    if op == 2:
        return blob[: rng.randrange(len(blob) + 1)]
    if op == 3:  # deep nesting inside the header
        depth = rng.choice([65, 2000, 200_000])
        text = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        return struct.pack("<Q", len(text)) + text
    if op == 4:  # many small objects
        text = b'{"a":[' + b"{}," * rng.choice([10, 1_000_000]) + b"{}]}"
        return struct.pack("<Q", len(text)) + text
    if op == 5:  # a duplicate key
        text = blob[8 : 8 + length]
        if text.startswith(b"{") and len(text) > 2:
            first = text[1:].split(b",", 1)[0].rstrip(b"}")
            dup = b"{" + first + b"," + text[1:]
            return struct.pack("<Q", len(dup)) + dup + blob[8 + length :]
    if op == 6:  # not UTF-8
        return blob[:8] + blob[8:].replace(b'"', b'"\xff', 1)
    return blob


# --- Hugging Face folders ------------------------------------------------------------------


def make_folder(rng: random.Random, root: Path) -> None:
    """A sharded Hugging Face folder (index + 1-3 shards), then one folder-level mutation."""
    root.mkdir()
    weight_map: dict[Any, Any] = {}
    for i in range(rng.randint(1, 3)):
        shard = f"model-{i}.safetensors"
        tensors = random_tensors(rng)
        tensors = {n: t for n, t in tensors.items() if strip_key(n) not in {strip_key(k) for k in weight_map}}
        header, data = header_of(tensors, {"format": "pt"})
        (root / shard).write_bytes(encode(header, data))
        weight_map.update(dict.fromkeys(tensors, shard))
    index: dict[str, Any] = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "config.json").write_text("{}")
    op = rng.randrange(12)
    names = list(weight_map)
    if op == 0 and names:
        index["weight_map"][rng.choice(names)] = rng.choice([["model-0.safetensors"], 1, None, {"a": 1}])
    elif op == 1 and names:
        index["weight_map"][rng.choice(names)] = rng.choice(["../x.safetensors", "/etc/passwd", "missing.safetensors",
                                                             "a\\b", "", ".", "sub/../model-0.safetensors"])
    elif op == 2:
        index["weight_map"] = rng.choice([[], "x", None, {"\ud800": "model-0.safetensors"}])
    elif op == 3:
        index["metadata"] = "[" * 3000 + "]" * 3000
    elif op == 4:
        os.mkfifo(root / rng.choice(["pipe", "model-9.safetensors"]))
    elif op == 5:
        (root / "link.json").symlink_to(rng.choice(["config.json", "../outside.json", "/etc/hostname", "nowhere"]))
    elif op == 6:
        shard = root / "model-0.safetensors"
        shard.write_bytes(raw_mutation(rng, shard.read_bytes()))
    elif op == 7:
        (root / "adapter_config.json").write_text(rng.choice(['{"target_modules": ' + "[" * 3000 + "]" * 3000 + "}",
                                                              '{"target_modules": ["h.0.random_ltd_layer.c"]}',
                                                              "not json", '{"r": 8}']))
    elif op == 8 and names:
        index["weight_map"][names[0] + ".random_ltd_layer"] = index["weight_map"][names[0]]
    text = json.dumps(index) if op != 9 else '{"weight_map": {}, "weight_map": {}}'
    (root / "model.safetensors.index.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    if op == 10:
        (root / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}")
    if op == 11:
        (root / "model-7.safetensors").mkdir()
        index["weight_map"]["x"] = "model-7.safetensors"
        (root / "model.safetensors.index.json").write_text(json.dumps(index))


# --- running cases -------------------------------------------------------------------------


@dataclass
class Result:
    cases: int = 0
    refused: int = 0
    accepted: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cli_runs: int = 0


def snapshot(path: Path) -> dict[str, str]:
    if path.is_symlink() or not path.exists():
        return {"": "link or missing"}
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() \
            else "other"
    return out


def check_loads(src: Path, out: Path) -> None:
    """safetensors loads the input and the output; output names are the stripped input names, same bytes."""
    from safetensors import safe_open

    files = [("", src, out)] if src.is_file() else [
        (p.name, p, out / p.name) for p in sorted(src.iterdir()) if p.suffix == ".safetensors" and p.is_file()
    ]
    for _, a, b in files:
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            want = {strip_key(k): fa.get_tensor(k) for k in fa.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            got = {k: fb.get_tensor(k) for k in fb.keys()}  # noqa: SIM118
            assert set(got) == set(want), (sorted(got), sorted(want))
            for k, t in want.items():
                assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
                assert got[k].contiguous().view(-1).view(dtype=__import__("torch").uint8).equal(
                    t.contiguous().view(-1).view(dtype=__import__("torch").uint8)), k


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"case took more than {CASE_TIMEOUT_S} s")


def check_cli(src: Path, out: Path, refused: bool) -> None:
    """The real CLI on the same input agrees: exit 1 with one ``Error:`` line and a JSON error, or exit 0."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "random_ltd_cli", "strip", str(src), "-o", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=CASE_TIMEOUT_S, check=False)
    data = json.loads(proc.stdout)  # one JSON document, result or error
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if refused:
        assert proc.returncode == 1 and "error" in data, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr[-2000:]
        assert not out.exists() and not out.is_symlink(), "CLI wrote an output despite the error"
    else:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def run_case(rng: random.Random, work: Path, *, cli: bool = False) -> str:
    """One case in the empty folder ``work``: ``"refused:<Error>"`` or ``"ok"``; raises on a failure.

    With ``cli``, the real CLI (a subprocess) strips the same input too and must agree.
    """
    if rng.random() < 0.7:
        src = work / "m.safetensors"
        tensors = random_tensors(rng)
        header, data = header_of(tensors, rng.choice([None, {"format": "pt"}]))
        blob: bytes | None = None
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.7:
                header, data = rng.choice(MUTATORS)(rng, header, data)
            else:
                blob = raw_mutation(rng, blob if blob is not None else encode(header, data))
        src.write_bytes(blob if blob is not None else encode(header, data))
    else:
        src = work / "hf"
        make_folder(rng, src)
    out = work / ("out.safetensors" if src.is_file() else "out")
    before = snapshot(src)
    try:
        inspect_checkpoint(src)
        strip_checkpoint(src, out)
    except CheckpointError as exc:
        assert not out.exists() and not out.is_symlink(), "output written despite the error"
        assert not [p for p in work.iterdir() if p.name.endswith(".tmp")], "temporary file left"
        assert snapshot(src) == before, "input changed"
        if cli:
            check_cli(src, work / ("cli-" + out.name), refused=True)
        return f"refused:{type(exc).__name__}"
    assert snapshot(src) == before, "input changed"
    check_loads(src, out)
    if cli:
        check_cli(src, work / ("cli-" + out.name), refused=False)
    return "ok"


def run(cases: int, seed: int, *, stop_after: int = 20, cli_every: int = 0) -> Result:
    """Run ``cases`` seeded cases; each case's own seed is ``seed * 1_000_003 + i``.

    Every ``cli_every``-th case (0: none) is also run through the real CLI in a subprocess.
    """
    result = Result()
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory(prefix="rltd-fuzz-") as tmp:
            for i in range(cases):
                work = Path(tmp) / str(i)
                work.mkdir()
                case_seed = seed * 1_000_003 + i
                signal.alarm(CASE_TIMEOUT_S)
                try:
                    outcome = run_case(random.Random(case_seed), work, cli=bool(cli_every) and i % cli_every == 0)
                except BaseException as exc:  # every other outcome is a finding
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    result.failures.append({"seed": case_seed, "error": f"{type(exc).__name__}: {exc}"[:500],
                                            "traceback": traceback.format_exc()[-3000:]})
                    outcome = "failure"
                finally:
                    signal.alarm(0)
                result.cases += 1
                result.cli_runs += bool(cli_every) and i % cli_every == 0
                if outcome.startswith("refused:"):
                    result.refused += 1
                    result.errors[outcome[8:]] = result.errors.get(outcome[8:], 0) + 1
                elif outcome == "ok":
                    result.accepted += 1
                shutil.rmtree(work, ignore_errors=True)
                if len(result.failures) >= stop_after:
                    break
    finally:
        signal.signal(signal.SIGALRM, previous)
    result.seconds = time.monotonic() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--cli-every", type=int, default=50, help="also run every Nth case through the CLI (0: none)")
    args = parser.parse_args(argv)
    res = run(args.cases, args.seed, stop_after=10**9, cli_every=args.cli_every)
    summary = {"cases": res.cases, "cli_runs": res.cli_runs, "refused": res.refused, "accepted": res.accepted,
               "errors": res.errors,
               "failures": len(res.failures), "seconds": round(res.seconds, 1), "seed": args.seed}
    print(json.dumps(summary, indent=2))
    for failure in res.failures[:5]:
        print(f"seed {failure['seed']}: {failure['error']}\n{failure['traceback']}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({**summary, "failure_details": res.failures}, indent=2))
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
