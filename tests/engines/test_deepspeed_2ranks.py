"""DeepSpeed ZeRO-1/2/3 with two gloo ranks on CPU: train with tokens dropped, save, strip without
--trust-pickle, zero_to_fp32 equal to the renamed original, load_checkpoint into the plain model.

One launch of two processes (``_ds2_worker.py``, session fixture) writes and checks every folder; the
tests read its facts and the folders. The engine allowlist is what lets ZeRO optimizer states through.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.errors import UnsafePickleError

from ._inject import inject_file
from .conftest import free_port, require, run_worker

STAGES = (1, 2, 3)
ZERO12 = ("deepspeed.runtime.fp16.loss_scaler.LossScaler, deepspeed.runtime.zero.config.ZeroStageEnum, "
          "deepspeed.utils.tensor_fragment.fragment_address")  # fmt: skip
ZERO3 = "deepspeed.runtime.fp16.loss_scaler.LossScaler, deepspeed.runtime.zero.config.ZeroStageEnum"


@pytest.fixture(scope="session")
def ds2_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed2")
    run_worker("_ds2_worker.py", str(out), str(free_port()))
    return out


def facts(out: Path, stage: int, rank: int) -> dict[str, Any]:
    return json.loads((out / f"zero{stage}.rank{rank}.json").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_drop_tokens_and_the_stripped_folder_is_the_plain_models(ds2_out: Path, stage: int) -> None:
    for rank in (0, 1):
        ran = facts(ds2_out, stage, rank)
        # two wrapped layers, 3 steps: r = 8, 8, 16 of 32 tokens (min 8, max 32, 6 steps, multiples of 8)
        assert ran["kept"] == [8, 8, 8, 8, 16, 16]
        assert any(".random_ltd_layer." in name for name in ran["wrapped_names"])
        assert f"zero{stage}.stripped/global_step3/" in ran["loaded_from"]
        assert ran["loaded_equal"] and ran["global_steps"] == 3  # load_checkpoint into the unconverted model
    ran = facts(ds2_out, stage, 0)
    assert ran["strip"] == {"returncode": 0, "stderr": ""}  # the real CLI, without --trust-pickle
    fp32 = ran["fp32"]
    assert any(".random_ltd_layer." in name for name in fp32["orig_names"])
    assert not any("random_ltd_layer" in name for name in fp32["names"])
    assert fp32["equal"]  # zero_to_fp32(stripped) == zero_to_fp32(original), renamed: every tensor, in order
    if stage == 1:  # no DeepSpeed random-LTD block: the same tensors exactly
        assert fp32["extra"] == {}
    else:
        # DeepSpeed's own random-LTD saving strips `module` but not `buffer_names`, so zero_to_fp32 of its
        # original folder silently drops the wrapped block's buffer; after strip the names agree and it is back
        assert fp32["extra"] == {"transformer.h.1.scale": [2.0] * 32}
        assert "transformer.h.1.scale" not in fp32["orig_names"]
    assert fp32["strict"] == "<All keys matched successfully>"


@pytest.mark.parametrize("stage", STAGES)
def test_inspect_reports_the_allow_listed_engine_classes_per_file(ds2_out: Path, stage: int) -> None:
    info = inspect_checkpoint(ds2_out / f"zero{stage}")
    verdicts = {name: v.verdict for name, v in info.pickles.items()}
    optim = [f"global_step3/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    expected = ZERO3 if stage == 3 else ZERO12
    assert {verdicts[name] for name in optim} == {f"needs allow-listed engine classes: {expected}"}
    model_files = [name for name in verdicts if name.endswith("model_states.pt")]
    assert model_files and all(verdicts[n] == "safe to torch.load(weights_only=True)" for n in model_files)
    listed = info.to_dict()["pickles"][optim[0]]["globals"]
    assert {g["name"] for g in listed if g["allowed"] == "engine"} == set(expected.split(", "))
    assert all(g["allowed"] in ("torch", "engine") for g in listed)


def test_zero0_without_optimizer_strips_without_trust(ds2_out: Path, tmp_path: Path) -> None:
    report = strip_checkpoint(ds2_out / "zero0-noopt", tmp_path / "out")
    assert report.wrote
    info = inspect_checkpoint(tmp_path / "out")
    assert info.wrapped_layers == [] and all(v.short == "safe" for v in info.pickles.values())


def test_without_deepspeed_installed_strip_inspect_and_load_still_work(ds2_out: Path, tmp_path: Path) -> None:
    """strip and inspect only parse; load_state_dict builds stand-ins: none of them imports deepspeed."""
    path = ds2_out / "zero2" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    code = (
        "import sys, runpy\n"
        "sys.modules['deepspeed'] = None  # any import of it raises ImportError\n"
        "from random_ltd_cli.checkpoint import inspect_checkpoint, load_state_dict\n"
        "from random_ltd_cli.errors import CheckpointError\n"
        f"info = inspect_checkpoint({str(ds2_out / 'zero2')!r})\n"
        f"print(info.pickles[{path.relative_to(ds2_out / 'zero2').as_posix()!r}].short)\n"
        f"try:\n    load_state_dict({str(path)!r})\nexcept CheckpointError as e:\n    print(e)\n"
        f"sys.argv = ['random-ltd', 'strip', {str(ds2_out / 'zero2')!r}, '-o', {str(tmp_path / 'out')!r}]\n"
        "try:\n    runpy.run_module('random_ltd_cli', run_name='__main__')\nexcept SystemExit as e:\n"
        "    print('exit', e.code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "engine classes"
    # torch.load got through the whole pickle (loss scaler, ZeroStageEnum, fragment addresses) with
    # stand-ins; an optimizer-state file simply holds no model weights
    assert lines[1].endswith("holds no state dict (found ['optimizer_state_dict', 'ds_config', 'ds_version']); "
                             "expected tensors at the top level or under one of state_dict, module, model, "
                             "model_state_dict, current_model_state, model_state.")  # fmt: skip
    assert lines[2].startswith("Stripped 0 names (57 untouched, 50 other names)")  # side tables renamed
    assert lines[-1] in ("exit 0", lines[2]) and (tmp_path / "out" / "latest").is_file()


FOREIGN = ["os.system", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScalerX", "deepspeed.utils.tensor_fragment.os"]


@pytest.mark.parametrize("kind", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
@pytest.mark.parametrize("foreign", FOREIGN)
def test_one_foreign_global_in_a_deepspeed_file_is_refused(
    ds2_out: Path, tmp_path: Path, kind: str, foreign: str, untouched: Any
) -> None:
    folder = tmp_path / "zero2"
    shutil.copytree(ds2_out / "zero2", folder)
    target = folder / "global_step3" / kind
    inject_file(target, foreign)
    check = untouched(folder)
    message = (
        f"{target} needs Python globals that torch.load(weights_only=True) refuses: {foreign}. random-ltd never runs "
        "them, but such a file can run code when loaded with torch. Only if you trust its source, pass "
        "--trust-pickle (trust_pickle=True)."
    )
    for call in (lambda: strip_checkpoint(folder), lambda: inspect_checkpoint(folder)):
        with pytest.raises(UnsafePickleError) as err:
            call()
        assert str(err.value) == message
    check()
    assert not (tmp_path / "zero2.stripped").exists()
    if foreign == "os.system":  # the CLI: one Error: line, exit 1; --trust-pickle shows the verdict instead
        cli = subprocess.run([sys.executable, "-m", "random_ltd_cli", "strip", str(folder)], capture_output=True,
                             text=True)  # fmt: skip
        assert cli.returncode == 1 and cli.stderr == f"Error: {message}\n"
        shown = subprocess.run([sys.executable, "-m", "random_ltd_cli", "inspect", str(folder), "--json",
                                "--trust-pickle"], capture_output=True, text=True, check=True)  # fmt: skip
        verdict = json.loads(shown.stdout)["pickles"][f"global_step3/{kind}"]["verdict"]
        assert verdict == "unsafe: os.system"
        check()


def test_model_states_with_an_allow_listed_class_load_without_trust(ds2_out: Path, tmp_path: Path) -> None:
    """A model-states file that also pickles an allow-listed engine object loads its weights unchanged."""
    import torch

    from random_ltd_cli.checkpoint import load_state_dict

    folder = tmp_path / "zero2"
    shutil.copytree(ds2_out / "zero2", folder)
    target = folder / "global_step3" / "mp_rank_00_model_states.pt"
    want = load_state_dict(folder)
    inject_file(target, "deepspeed.runtime.zero.config.ZeroStageEnum")  # ZeroStageEnum() called on load
    assert inspect_checkpoint(folder).pickles["global_step3/mp_rank_00_model_states.pt"].verdict == (
        "needs allow-listed engine classes: deepspeed.runtime.zero.config.ZeroStageEnum"
    )
    got = load_state_dict(folder)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    inject_file(target, "os.system")
    with pytest.raises(UnsafePickleError, match="refuses: os.system"):
        load_state_dict(folder)
