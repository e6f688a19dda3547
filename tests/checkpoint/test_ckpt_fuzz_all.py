"""The CI part of the all-format fuzz suite (``fuzz_all.py``), and hand-written payloads in every carrier.

5,000 seeded cases over safetensors, Hugging Face folders, torch ZIP, legacy and bare-pickle files,
DeepSpeed, DCP and run folders, in this process: each must end with the library's own error (nothing
written, input unchanged) or with an output that loads with the stripped names, never leave the
canary file, and finish within the hang guard. A sample goes through the CLI in child processes:
one JSON object or one ``Error:`` line, exit 0 or 1, peak RSS under 256 MiB. A longer run::

    python -m tests.checkpoint.fuzz_all --cases 20000 --seed N --cli 100
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.errors import CheckpointError

from . import fuzz_all
from .fuzz_folders import _dcp_templates, _unframed
from .fuzz_torch import CANARY, PAYLOAD_FORMS, with_payload
from .hostile_files import legacy_torch_save, split_legacy, write_zip, zip_entries, zip_torch_save

STATE = {"h.0.random_ltd_layer.w": torch.arange(4.0), "b": torch.ones(2)}


def _report(result: fuzz_all.Result) -> str:
    return "\n\n".join(f"{f['format']} seed {f['seed']}: {f['traceback']}" for f in result.failures)


def test_fuzz_every_format() -> None:
    result = fuzz_all.run(5000, 18, stop_after=3)
    assert not result.failures, _report(result)
    assert result.cases == 5000
    for fmt, stats in result.per_format.items():
        refused = sum(n for outcome, n in stats.outcomes.items() if outcome.startswith("refused:"))
        assert refused > 0, fmt
        if fmt != "bare-pickle":  # a plain pickle is never a checkpoint
            assert stats.outcomes.get("ok", 0) > 0, fmt  # valid files are exercised too
        assert stats.max_rss_growth_mib < fuzz_all.MEMORY_BUDGET_MIB, fmt
    hostile_refused = sum(s.outcomes.get("refused:UnsafePickleError", 0) for s in result.per_format.values())
    assert hostile_refused > 100


def test_fuzz_through_the_cli() -> None:
    sample = fuzz_all.cli_sample(24, 181)  # asserts each run: exit 0/1, one JSON object or Error: line, RSS
    assert sample["cli_peak_rss_mib"] < fuzz_all.MEMORY_BUDGET_MIB
    assert sample["cli_exits"].get("strip:1", 0) > 0 and sample["cli_exits"].get("strip:0", 0) > 0


# --- hand-written payloads in every carrier ----------------------------------------------------------------


def _carrier(kind: str, work: Path, form: int) -> Path:
    """A checkpoint of kind ``kind`` whose pickle runs payload ``form`` (creating work/CANARY) when unpickled."""
    rng = random.Random(form)
    canary = work / CANARY

    def evil(data: bytes) -> bytes:
        return with_payload(data, canary, rng, form)

    if kind in ("zip", "zip-dup-first", "zip-dup-last"):
        entries = zip_entries(zip_torch_save(STATE))
        pkl = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
        name, clean = entries[pkl]
        if kind == "zip":
            entries[pkl] = (name, evil(clean))
        else:
            entries.insert(pkl if kind == "zip-dup-first" else pkl + 1, (name, evil(clean)))
        return write_zip(work / "m.pt", entries)
    if kind.startswith("legacy-"):
        parts = split_legacy(legacy_torch_save(STATE))
        index = int(kind[-1])
        parts[index] = evil(parts[index])
        (work / "m.pt").write_bytes(b"".join(parts))
        return work / "m.pt"
    if kind == "bare":
        (work / "m.pt").write_bytes(evil(b"\x80\x02}q\x00."))
        return work / "m.pt"
    root = work / kind
    root.mkdir()
    entries = zip_entries(zip_torch_save({"module": STATE} if kind == "deepspeed" else STATE))
    entries = [(n, evil(c) if n.endswith("/data.pkl") else c) for n, c in entries]
    if kind == "hf-bin":
        (root / "config.json").write_text('{"model_type": "gpt2"}')
        write_zip(root / "pytorch_model.bin", entries)
    elif kind == "deepspeed":
        (root / "global_step1").mkdir()
        (root / "latest").write_text("global_step1")
        write_zip(root / "global_step1" / "mp_rank_00_model_states.pt", entries)
    elif kind == "run":
        for step in (1, 2):
            (root / f"checkpoint-{step}").mkdir()
            write_zip(root / f"checkpoint-{step}" / "pytorch_model.bin", entries)
    else:  # dcp
        meta, files = _dcp_templates()[0]
        for name, data in files.items():
            (root / name).write_bytes(data)
        import pickle

        (root / ".metadata").write_bytes(evil(_unframed(pickle.loads(meta))))  # our own template
    return root


CARRIERS = ["zip", "zip-dup-first", "zip-dup-last", *(f"legacy-{i}" for i in range(5)), "bare", "hf-bin",
            "deepspeed", "dcp", "run"]  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", CARRIERS)
def test_hand_written_payloads_are_refused_everywhere(tmp_path: Path, kind: str) -> None:
    for form in range(PAYLOAD_FORMS):
        work = tmp_path / str(form)
        work.mkdir()
        src = _carrier(kind, work, form)
        before = {p: p.read_bytes() for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file()}
        out = work / "out"
        if kind == "run":  # inspect lists a run folder's checkpoints; one it cannot read is shown as such
            assert {e.format for e in inspect_checkpoint(src).entries} == {"unreadable"}
        else:
            with pytest.raises(CheckpointError):
                inspect_checkpoint(src)
        with pytest.raises(CheckpointError):
            strip_checkpoint(src, out)
        assert not out.exists() and not (work / CANARY).exists(), (kind, form)
        assert {p: p.read_bytes() for p in before} == before
        shutil.rmtree(work)


@pytest.mark.parametrize("form", range(PAYLOAD_FORMS))
def test_the_payloads_are_live(tmp_path: Path, form: int) -> None:
    """Each payload form does create the canary when the file is loaded unrestricted (so the tests above can fail)."""
    src = _carrier("bare", tmp_path, form)
    with pytest.raises(Exception):  # noqa: B017 - the bare pickle is no torch file; the payload runs first
        torch.load(src, weights_only=False)
    assert (tmp_path / CANARY).exists()
