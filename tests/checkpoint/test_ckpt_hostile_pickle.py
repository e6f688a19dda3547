"""Hostile and corrupt torch checkpoints (issue 18): no crash, no bypass, no memory bomb, one clean error.

Every file here is built by the test (see ``hostile_files.py``). Payloads that would run code
would create a canary file; they are given only to random-ltd and to
``torch.load(weights_only=True)``, and the canary must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.errors import CheckpointError, LimitExceededError, MalformedCheckpointError, UnsafePickleError

from .hostile_files import (
    deep_frozenset_pickle,
    deep_key_pickle,
    deflate_bomb,
    legacy_torch_save,
    pickle_zip,
    split_legacy,
    unframed_dumps,
    with_payload,
    write_zip,
    zip_entries,
    zip_torch_save,
)

HERE = Path(__file__).resolve().parent
STATE = {"h.0.random_ltd_layer.w": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float16)}


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "CANARY"
    yield path
    assert not path.exists(), "a payload ran"


def _refused_by_torch(path: Path) -> None:
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def _assert_strip_refuses(path: Path, error: type[Exception], match: str) -> None:
    out = path.with_name(path.stem + ".out.pt")
    with pytest.raises(error, match=match):
        strip_checkpoint(path, out)
    assert not out.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# --- deep nesting: a crash before (SIGSEGV), a clean error now ----------------------------------------


def _carriers(tmp_path: Path) -> dict[str, Path]:
    """The deep-key pickle as a bare file, inside a torch zip, as a legacy main pickle, in an HF .bin, in DCP."""
    deep = deep_key_pickle(10**6)
    out = {}
    out["bare"] = tmp_path / "bare.pt"
    out["bare"].write_bytes(deep)
    zipped = [(n, deep if n.endswith("data.pkl") else c) for n, c in zip_entries(zip_torch_save(STATE))]
    out["zip"] = write_zip(tmp_path / "zip.pt", zipped)
    parts = split_legacy(legacy_torch_save(STATE))
    out["legacy"] = tmp_path / "legacy.pt"
    out["legacy"].write_bytes(b"".join([*parts[:3], deep, *parts[4:]]))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    (hf / "pytorch_model.bin").write_bytes(deep)
    out["hf-bin"] = hf
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(deep)
    (dcp / "__0_0.distcp").write_bytes(b"\0" * 16)
    out["dcp"] = dcp
    out["frozenset"] = tmp_path / "frozenset.pt"
    out["frozenset"].write_bytes(deep_frozenset_pickle(10**6))
    return out


def test_deep_nesting_is_a_clean_error_in_a_subprocess(tmp_path: Path) -> None:
    """Run in a child process, so that a segfault fails this test instead of killing the run."""
    carriers = _carriers(tmp_path)
    script = textwrap.dedent(
        """
        import json, sys
        from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
        from random_ltd_cli.errors import CheckpointError
        out = {}
        for name, path in json.loads(sys.argv[1]).items():
            for what, call in (("inspect", lambda: inspect_checkpoint(path)),
                               ("strip", lambda: strip_checkpoint(path, dry_run=True))):
                try:
                    call()
                    out[f"{name} {what}"] = "accepted"
                except CheckpointError as exc:
                    out[f"{name} {what}"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
        """
    )
    arg = json.dumps({k: str(v) for k, v in carriers.items()})
    proc = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the child died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout)
    assert len(results) == 2 * len(carriers)
    for case, result in results.items():
        assert result.startswith("LimitExceededError: ") and "deeper than 1000 levels" in result, (case, result)
        assert "\n" not in result


def test_deep_nesting_through_the_cli(tmp_path: Path) -> None:
    path = _carriers(tmp_path)["zip"]
    proc = _cli("inspect", str(path), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"].endswith("and save a smaller structure.")
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if line.startswith("Error: ")
    ]
    assert len(proc.stderr.strip().splitlines()) == 1


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "random_ltd_cli", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_nesting_at_the_limit_is_read(tmp_path: Path) -> None:
    """1000 levels of tuples are fine (the refusal is a limit, not a failure to read deep values)."""
    path = tmp_path / "ok.pt"
    path.write_bytes(deep_key_pickle(1000))
    with pytest.raises(CheckpointError, match="plain pickle"):
        inspect_checkpoint(path)  # read to the end: refused only because a bare dict is not a torch file
    path.write_bytes(deep_key_pickle(1001))
    with pytest.raises(LimitExceededError, match="deeper than 1000 levels"):
        inspect_checkpoint(path)


# --- the four bypasses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2, 4], ids=["magic", "version", "sys-info", "storage-keys"])
def test_legacy_header_pickles_are_checked(tmp_path: Path, canary: Path, index: int) -> None:
    """Torch unpickles all five pickles of a legacy file; each one is checked, not only the main one."""
    parts = split_legacy(legacy_torch_save(STATE))
    parts[index] = with_payload(parts[index], f"touch {canary}")
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"".join(parts))
    with pytest.raises(UnsafePickleError, match=r"refuses: os\.system\..*--trust-pickle"):
        inspect_checkpoint(path)
    _assert_strip_refuses(path, UnsafePickleError, r"os\.system")
    _refused_by_torch(path)
    info = inspect_checkpoint(path, trust_pickle=True)  # the rest of the file is a valid checkpoint
    assert info.tensor_count == 2


def test_bare_pickle_header_is_checked(tmp_path: Path, canary: Path) -> None:
    path = tmp_path / "bare.pt"
    path.write_bytes(with_payload(pickle.dumps({"a": 1}, protocol=2), f"touch {canary}"))
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        inspect_checkpoint(path)
    _refused_by_torch(path)


@pytest.mark.parametrize("evil_first", [True, False], ids=["payload-first", "payload-last"])
def test_zip_with_two_data_pkl_records_is_refused(tmp_path: Path, canary: Path, evil_first: bool) -> None:
    """Readers disagree on which of two same-named records counts: duplicate names are refused outright."""
    entries = zip_entries(zip_torch_save(STATE))
    evil = [("archive/data.pkl", with_payload(pickle.dumps({}, protocol=2), f"touch {canary}"))]
    path = write_zip(tmp_path / "dup.pt", evil + entries if evil_first else entries + evil)
    with pytest.raises(MalformedCheckpointError, match="two records named 'archive/data.pkl'"):
        inspect_checkpoint(path)
    with pytest.raises(MalformedCheckpointError, match="two records"):
        inspect_checkpoint(path, trust_pickle=True)
    _assert_strip_refuses(path, MalformedCheckpointError, "two records")


def _dcp_folder(tmp_path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with pytest.warns(UserWarning):
        dcp.save({"model": dict(STATE)}, checkpoint_id=str(folder))
    return folder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dcp_metadata_globals_are_exact_names(tmp_path: Path, canary: Path) -> None:
    """``STACK_GLOBAL('torch', 'os.system')`` resolves to ``os.system`` through ``torch.os``: refused by name."""
    folder = _dcp_folder(tmp_path)
    meta = folder / ".metadata"
    with meta.open("rb") as f:
        metadata = pickle.load(f)  # our own file, just written by dcp.save
    clean = unframed_dumps(metadata)
    meta.write_bytes(with_payload(clean, f"touch {canary}", stack_global=("torch", "os.system")))
    with pytest.raises(UnsafePickleError, match=r"DCP metadata does not use: torch\.os\.system\."):
        inspect_checkpoint(folder)
    _assert_strip_refuses(folder, UnsafePickleError, r"torch\.os\.system")
    assert inspect_checkpoint(folder, trust_pickle=True).tensor_count == 2  # otherwise valid metadata
    meta.write_bytes(clean)
    assert inspect_checkpoint(folder).tensor_count == 2  # the clean metadata passes the exact-name check


# --- memory: bombs and lengths ---------------------------------------------------------------------------


def _peak_rss_mib(*args: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run the CLI in a fresh wrapper process whose only child it is; return the child's peak RSS in MiB.

    (A child forked from pytest, which imported torch, would inherit pytest's peak RSS.)
    """
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode, p.stdout, "
        "p.stderr]))\n"
    )
    cmd = [sys.executable, "-c", wrapper, sys.executable, "-m", "random_ltd_cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rss_kib, code, stdout, stderr = json.loads(out.stdout)
    return rss_kib // 1024, subprocess.CompletedProcess(args, code, stdout, stderr)


MEMORY_BUDGET_MIB = 256


def _bombs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    return {
        "1 GiB deflated data.pkl": (deflate_bomb(tmp_path / "bomb.pt", inflated=1 << 30), "over the 33554432-byte"),
        "lying size": (
            deflate_bomb(tmp_path / "liar.pt", inflated=1 << 30, declared=4096), "inflates to more than its declared"
        ),
        "wrong CRC": (deflate_bomb(tmp_path / "crc.pt", inflated=24 << 20, crc=1), "CRC-32 mismatch"),
        "object budget": (_budget_bomb(tmp_path / "objects.pt"), "more than 80 MiB of objects"),
    }


def _budget_bomb(path: Path) -> Path:
    """A 6 MiB data.pkl of empty sets (224 bytes each in memory): past the object budget."""
    pkl = b"\x80\x02](" + b"\x8f" * (6 << 20) + b"e."
    return pickle_zip(path, pkl)


def test_bombs_stay_within_the_memory_budget(tmp_path: Path) -> None:
    for name, (path, message) in _bombs(tmp_path).items():
        peak, proc = _peak_rss_mib("inspect", str(path))
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("Error: ") and message in proc.stderr, (name, proc.stderr)
        assert peak < MEMORY_BUDGET_MIB, (name, peak)
    assert os.path.getsize(tmp_path / "bomb.pt") < 2 << 20  # 1 GiB inflated from about a megabyte


@pytest.mark.parametrize("length", [2**40, 2**62], ids=["2^40", "2^62"])
@pytest.mark.parametrize("opcode", [b"\x8e", b"\x8d"], ids=["BINBYTES8", "BINUNICODE8"])
def test_huge_lengths_are_refused_before_allocation(tmp_path: Path, opcode: bytes, length: int) -> None:
    field = b"\x80\x04" + opcode + struct.pack("<Q", length) + b"abc."
    bare = tmp_path / "bare.pt"
    bare.write_bytes(field)
    parts = split_legacy(legacy_torch_save(STATE))
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"".join([*parts[:3], field, *parts[4:]]))
    zipped = pickle_zip(tmp_path / "zip.pt", field)
    for path in (bare, legacy, zipped):
        with pytest.raises(MalformedCheckpointError, match="ends before its STOP opcode"):
            inspect_checkpoint(path)


@pytest.mark.parametrize("count", [2**62, 2**63 - 1, -1, -(2**63)], ids=["2^62", "max", "-1", "min"])
def test_legacy_storage_counts_are_checked(tmp_path: Path, count: int) -> None:
    parts = split_legacy(legacy_torch_save(STATE))
    parts[5] = struct.pack("<q", count) + parts[5][8:]
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"".join(parts))
    with pytest.raises(MalformedCheckpointError, match=f"holds {count} elements but the pickle says"):
        inspect_checkpoint(path)
    _assert_strip_refuses(path, MalformedCheckpointError, "elements but the pickle says")


# --- legacy structure ----------------------------------------------------------------------------------


def _legacy_variant(parts: list[bytes], change: Callable[[list[bytes]], None]) -> bytes:
    parts = list(parts)
    change(parts)
    return b"".join(parts)


LEGACY_CASES = {
    "version": (lambda p: p.__setitem__(1, pickle.dumps(1002, protocol=2)), "format version is 1002"),
    "sys info": (lambda p: p.__setitem__(2, pickle.dumps([1], protocol=2)), "system-info record is not a dict"),
    "keys not a list": (lambda p: p.__setitem__(4, pickle.dumps("0", protocol=2)), "storage key list does not match"),
    "duplicate keys": (lambda p: p.__setitem__(4, pickle.dumps(["0", "0"], protocol=2)), "key list does not match"),
    "trailing bytes": (lambda p: p.append(b"\0"), "but the file has"),
    "truncated": (lambda p: p.__setitem__(5, p[5][:-1]), "the file ends inside storage"),
}


@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_legacy_structure_is_validated(tmp_path: Path, case: str) -> None:
    change, message = LEGACY_CASES[case]
    parts = split_legacy(legacy_torch_save({"w": torch.zeros(3)}))
    path = tmp_path / "legacy.pt"
    path.write_bytes(_legacy_variant(parts, change))
    with pytest.raises(MalformedCheckpointError, match=message):
        inspect_checkpoint(path)


def test_legacy_file_is_still_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    path.write_bytes(legacy_torch_save(STATE))
    info = inspect_checkpoint(path)
    assert (info.tensor_count, info.wrapped_layers) == (2, ["h.0"])
    out = tmp_path / "out.pt"
    strip_checkpoint(path, out)
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["h.0.w", "b"] and torch.equal(loaded["h.0.w"], STATE["h.0.random_ltd_layer.w"])
