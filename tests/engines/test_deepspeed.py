"""DeepSpeed's engine on CPU (gloo, one rank): train a converted model with ZeRO 2 and 3, save, strip, reload.

One subprocess writes every folder the tests read (session fixture): ZeRO-2, ZeRO-3 and pipeline-engine
checkpoints written by ``engine.save_checkpoint``, with DeepSpeed's own random-LTD block enabled in the
config (so DeepSpeed strips ``module`` itself but leaves its side tables wrapped, and saves its scheduler).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from random_ltd_cli import RandomLTDScheduler
from random_ltd_cli.checkpoint import inspect_checkpoint, load_state_dict, strip_checkpoint
from random_ltd_cli.errors import CheckpointError
from random_ltd_cli.keys import strip_key

from ._ds_worker import ds_config
from .conftest import free_port, require, run_worker


@pytest.fixture(scope="session")
def ds_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    run_worker("_ds_worker.py", "write", str(out), str(free_port()))
    return out


def facts(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


def test_zero2_and_zero3_train_with_tokens_dropped_strip_and_reload_into_the_plain_model(
    ds_out: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    for stage in (2, 3):
        shutil.copytree(ds_out / f"zero{stage}", out / f"zero{stage}")
        shutil.copy(ds_out / f"zero{stage}.json", out)
        report = strip_checkpoint(out / f"zero{stage}")  # ZeRO optimizer states: allow-listed DeepSpeed classes only
        assert report.wrote and report.side_renamed
    run_worker("_ds_worker.py", "reload", str(out), str(free_port()))
    for stage in (2, 3):
        wrote, reloaded = facts(out, f"zero{stage}"), facts(out, f"reload{stage}")
        # two wrapped layers, 3 steps: r = 8, 8, 16 of 32 tokens (min 8, max 32, 6 steps, multiples of 8)
        assert wrote["kept"] == [8, 8, 8, 8, 16, 16]
        assert any(".random_ltd_layer." in name for name in wrote["names"])
        trained = {strip_key(k): v for k, v in wrote["trained"].items()}
        assert reloaded["loaded"] == trained  # (a) engine.load_checkpoint into the unconverted model
        assert reloaded["strict"] == "<All keys matched successfully>"  # (b) zero_to_fp32 gives plain names
        assert all(".random_ltd_layer" not in k for k in reloaded["fp32_names"])
        assert reloaded["fp32"] == trained
        # DeepSpeed's saved scheduler state equals ours; our scheduler, fed it, resumes exactly
        assert wrote["theirs"] == wrote["ours"] == reloaded["theirs"]
        assert reloaded["ours_after"] == reloaded["theirs_after"]
        fresh = RandomLTDScheduler.from_deepspeed(ds_config(stage))
        uninterrupted = [[fresh.update_seq(g), fresh.consumed_layer_tokens] for g in range(5)]
        assert reloaded["resumed"] == uninterrupted[3:] == [[16, 704], [24, 928]]


def test_zero3_folder_is_refused_where_full_weights_are_needed(ds_out: Path) -> None:
    folder = ds_out / "zero3"
    with pytest.raises(CheckpointError) as err:
        load_state_dict(folder)
    assert str(err.value) == (
        f"{folder} is a DeepSpeed ZeRO stage-3 checkpoint: its model states hold only placeholders for the "
        f"parameters; run its zero_to_fp32.py (python {folder}/zero_to_fp32.py {folder} OUT) to gather the full "
        "weights, then pass that file."
    )
    info = inspect_checkpoint(folder)
    assert info.metadata["zero_stage"] == 3 and "zero_to_fp32.py" in info.metadata["note"]
    # shapes come from param_shapes: the same parameter count as the ZeRO-2 folder of the same model
    assert info.parameter_count == 53504 + 32  # parameters + the persistent buffer (lm_head is tied)


def test_pipeline_layer_files_report_their_layer_index(ds_out: Path) -> None:
    info = inspect_checkpoint(ds_out / "pipe")
    assert info.wrapped_layers == ["2", "3"]
    report = strip_checkpoint(ds_out / "pipe", dry_run=True)
    assert ("2.random_ltd_layer.attn.c_attn.weight", "2.attn.c_attn.weight") in report.renamed
    assert ("3.random_ltd_layer.attn.c_attn.weight", "3.attn.c_attn.weight") in report.renamed


def test_plain_module_with_wrapped_side_tables_is_reported(ds_out: Path) -> None:
    folder = ds_out / "zero2"
    info = inspect_checkpoint(folder)
    assert info.wrapped_layers == ["transformer.h.1", "transformer.h.2"]  # module is plain, side tables are not
    assert not any(".random_ltd_layer." in t.name for t in info.tensors)
    report = strip_checkpoint(folder, dry_run=True)
    assert report.renamed == []
    assert ("transformer.h.1.random_ltd_layer.scale", "transformer.h.1.scale") in report.side_renamed
    assert len(report.side_renamed) == 25  # 24 parameters and 1 buffer of the two wrapped blocks
    cli = subprocess.run(
        [sys.executable, "-m", "random_ltd_cli", "strip", str(folder), "--dry-run"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "transformer.h.1.random_ltd_layer.scale -> transformer.h.1.scale (side table)\n" in cli.stdout
    assert cli.stdout.count(" (side table)\n") == 25


def test_deepspeed_random_ltd_state_is_shown(ds_out: Path) -> None:
    for stage in (2, 3):
        metadata = inspect_checkpoint(ds_out / f"zero{stage}").metadata
        assert metadata["deepspeed_random_ltd_state"] == facts(ds_out, f"zero{stage}")["theirs"]
        assert "random_ltd" not in metadata


def test_the_docs_example_trains_saves_and_resumes(tmp_path: Path) -> None:
    require("deepspeed")
    run_worker("_ds_worker.py", "docs", str(tmp_path), str(free_port()))
    ran = facts(tmp_path, "docs")
    assert ran["trained"] == ran["resumed"] == {"consumed_layer_tokens": 512, "current_steps": 2, "current_value": 16,
                                                "min_value": 8, "max_value": 32}  # fmt: skip
    assert ran["same_weights"]  # the converted model resumed from the folder DeepSpeed wrote
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step3"


def test_convert_weights_from_a_zero3_folder_is_one_error_line(ds_out: Path, tmp_path: Path) -> None:
    init = json.dumps({"vocab_size": 50, "block_size": 32, "n_layer": 4, "n_head": 2, "n_embd": 32})
    out = tmp_path / "out.safetensors"
    folder = ds_out / "zero3"
    cli = subprocess.run(
        [sys.executable, "-m", "random_ltd_cli", "convert", "random_ltd_cli.model:GPT", "--init", init,
         "--weights", str(folder), "-o", str(out)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert cli.returncode == 1 and not out.exists()
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "ZeRO stage-3 checkpoint" in lines[0] and f"python {folder}/zero_to_fp32.py {folder} OUT" in lines[0]
