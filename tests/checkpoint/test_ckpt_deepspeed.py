"""DeepSpeed folders: model states with side tables, ZeRO optimizer states, tags, loading."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from random_ltd_cli.checkpoint import detect_format, inspect_checkpoint, load_state_dict, strip_checkpoint
from random_ltd_cli.errors import CheckpointError, UnsafePickleError

from .ckpt_helpers import WRAPPED, FragmentAddress, load_strict, wrap_key

TAG = "global_step10"


def model_states(wrapped_state: OrderedDict) -> dict[str, Any]:
    names = [k for k in wrapped_state if k != "lm_head.weight"]
    return {
        "module": wrapped_state,
        "buffer_names": [wrap_key("transformer.h.1.attn.masked_bias"), "transformer.wpe.buffer"],
        "param_shapes": [OrderedDict((k, torch.Size(wrapped_state[k].shape)) for k in reversed(names))],
        "frozen_param_shapes": OrderedDict([(wrap_key("transformer.h.0.ln_1.bias"), torch.Size([32]))]),
        "shared_params": {
            "lm_head.weight": "transformer.wte.weight",
            wrap_key("transformer.h.1.ln_2.weight"): wrap_key("transformer.h.0.ln_2.weight"),
        },
        "frozen_param_fragments": {wrap_key("transformer.h.0.ln_1.bias"): torch.zeros(32)},
        "optimizer": None,
        "lr_scheduler": None,
        "ds_config": {"train_batch_size": 8, "data_efficiency": {"enabled": True}},
        "ds_version": "0.16.0",
        "global_steps": 10,
        "dp_world_size": 1,
        "mp_world_size": 1,
    }


def optim_states(wrapped_state: OrderedDict) -> dict[str, Any]:
    mappings = OrderedDict((k, FragmentAddress(v.numel(), i)) for i, (k, v) in enumerate(wrapped_state.items()))
    return {
        "optimizer_state_dict": {
            "zero_stage": 2,
            "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]},
            "single_partition_of_fp32_groups": [torch.ones(3)],
            "param_slice_mappings": [mappings],
        },
        "ds_config": {"train_batch_size": 8},
        "ds_version": "0.16.0",
    }


def make_ds_dir(root: Path, wrapped_state: OrderedDict, *, optim: bool = True) -> Path:
    tag = root / TAG
    tag.mkdir(parents=True)
    (root / "latest").write_text(TAG)
    (root / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")
    torch.save(model_states(wrapped_state), tag / "mp_rank_00_model_states.pt")
    if optim:
        torch.save(optim_states(wrapped_state), tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return root


def stripped(key: str) -> str:
    return key.replace(".random_ltd_layer", "")


def test_model_states_and_side_tables(tmp_path: Path, wrapped_state, plain_state, untouched) -> None:
    src = make_ds_dir(tmp_path / "ds", wrapped_state, optim=False)
    assert detect_format(src) == "deepspeed-dir"
    check = untouched(src)
    report = strip_checkpoint(src)
    assert report.format == "deepspeed-dir" and report.output == tmp_path / "ds.stripped"
    assert report.side_renamed_count > 0
    out = report.output
    assert (out / "latest").read_text() == TAG and (out / "zero_to_fp32.py").exists()
    new = torch.load(out / TAG / "mp_rank_00_model_states.pt", weights_only=True)
    old = model_states(wrapped_state)
    load_strict(new["module"], plain_state)
    assert new["buffer_names"] == [stripped(k) for k in old["buffer_names"]]
    assert [list(g) for g in new["param_shapes"]] == [[stripped(k) for k in g] for g in old["param_shapes"]]
    assert list(new["param_shapes"][0].values()) == list(old["param_shapes"][0].values())
    assert list(new["frozen_param_shapes"]) == ["transformer.h.0.ln_1.bias"]
    assert new["shared_params"] == {
        "lm_head.weight": "transformer.wte.weight",
        "transformer.h.1.ln_2.weight": "transformer.h.0.ln_2.weight",
    }
    assert list(new["frozen_param_fragments"]) == ["transformer.h.0.ln_1.bias"]
    assert {k: new[k] for k in ("ds_config", "ds_version", "global_steps")} == {
        k: old[k] for k in ("ds_config", "ds_version", "global_steps")
    }
    load_strict(load_state_dict(out), plain_state)
    check()


def test_zero_optimizer_states_need_trust(tmp_path: Path, wrapped_state) -> None:
    src = make_ds_dir(tmp_path / "ds", wrapped_state)
    with pytest.raises(UnsafePickleError, match=r"ckpt_helpers\.FragmentAddress.*--trust-pickle"):
        strip_checkpoint(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    report = strip_checkpoint(src, trust_pickle=True)
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    new = torch.load(report.output / TAG / name, weights_only=False)  # our own test file
    mappings = new["optimizer_state_dict"]["param_slice_mappings"][0]
    assert list(mappings) == [stripped(k) for k in wrapped_state]
    assert [m.start for m in mappings.values()] == list(range(len(wrapped_state)))
    assert torch.equal(new["optimizer_state_dict"]["single_partition_of_fp32_groups"][0], torch.ones(3))


def test_tag_folder_and_inspect(tmp_path: Path, wrapped_state, plain_state) -> None:
    src = make_ds_dir(tmp_path / "ds", wrapped_state, optim=False)
    info = inspect_checkpoint(src)
    assert info.format == "deepspeed-dir" and info.tensor_count == len(wrapped_state)
    assert info.wrapped_layers == list(WRAPPED)
    assert info.files == [f"{TAG}/mp_rank_00_model_states.pt"]
    assert info.metadata["ds_version"] == "0.16.0"
    report = strip_checkpoint(src / TAG, tmp_path / "tag-out")  # pointing at the tag folder itself
    load_strict(torch.load(report.output / "mp_rank_00_model_states.pt", weights_only=True)["module"], plain_state)


def test_latest_must_name_a_tag(tmp_path: Path, wrapped_state) -> None:
    src = make_ds_dir(tmp_path / "ds", wrapped_state, optim=False)
    (src / "latest").write_text("global_step99")
    with pytest.raises(CheckpointError, match="names the tag 'global_step99'"):
        inspect_checkpoint(src)


def test_zero3_placeholders_are_explained(tmp_path: Path) -> None:
    root = tmp_path / "z3"
    (root / TAG).mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.empty(0), "b": torch.empty(0)}, "param_shapes": [{"w": torch.Size([4])}]},
        root / TAG / "mp_rank_00_model_states.pt",
    )
    with pytest.raises(CheckpointError, match="zero_to_fp32.py"):
        load_state_dict(root)
