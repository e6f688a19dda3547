"""Reading DeepSpeed's random-LTD JSON block (torch-free)."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from random_ltd_cli.deepspeed_config import (
    LayerTokenLRConfig,
    RandomLTDConfig,
    read_deepspeed_config,
    read_layer_token_lr_config,
)
from random_ltd_cli.errors import ConfigError


def _block(**over: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "enabled": True,
        "total_layer_num": 24,
        "random_ltd_layer_num": 22,
        "random_ltd_layer_id": list(range(1, 23)),
        "model_mask_name": "attention_mask",
        "model_type": "decoder",
        "hidden_state_order": "seq_batch_dim",
        "random_ltd_schedule": {
            "min_value": 128,
            "max_value": 2048,
            "schedule_type": "fixed_linear",
            "schedule_config": {"require_steps": 200000, "seq_per_step": 16},
        },
        "layer_token_lr_schedule": {"enabled": False},
    }
    block.update(over)
    return block


def _full(block: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": 512,
        "data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": block or _block()}},
    }
    cfg.update(top)
    return cfg


EXPECTED = RandomLTDConfig(
    enabled=True,
    total_layer_num=24,
    random_ltd_layer_num=22,
    random_ltd_layer_id=tuple(range(1, 23)),
    model_mask_name="attention_mask",
    model_type="decoder",
    batch_first=False,
    min_value=128,
    max_value=2048,
    schedule_type="fixed_linear",
    require_steps=200000,
    seq_per_step=16,
    global_batch_size=512,
    layer_token_lr=None,
)


def test_whole_config() -> None:
    cfg = _full()
    before = copy.deepcopy(cfg)
    assert read_deepspeed_config(cfg) == EXPECTED
    assert cfg == before  # the input is not modified


@pytest.mark.parametrize(
    "pick",
    [
        lambda c: c["data_efficiency"],  # the data_efficiency block
        lambda c: c["data_efficiency"]["data_routing"],  # the data_routing block
        lambda c: c["data_efficiency"]["data_routing"]["random_ltd"],  # the random_ltd block itself
        lambda c: {"random_ltd": c["data_efficiency"]["data_routing"]["random_ltd"]},  # a dict holding random_ltd
    ],
)
def test_sub_blocks_have_no_batch_size(pick: Any) -> None:
    cfg = pick(_full())
    got = read_deepspeed_config(cfg)
    assert got.global_batch_size is None
    assert got == dataclasses.replace(EXPECTED, global_batch_size=None)
    assert read_deepspeed_config(cfg, global_batch_size=64).global_batch_size == 64


def test_json_file_str_and_path(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_full()))
    for source in (path, str(path)):
        got = read_deepspeed_config(source)
        assert got.total_layer_num == 24 and got.global_batch_size == 512
        assert got.source == f"file '{path}'"


@pytest.mark.parametrize(
    ("cfg", "override", "expected"),
    [
        (_full(), None, 512),  # top-level train_batch_size
        (_full(), 32, 32),  # keyword override wins
        (_full(train_batch_size="auto"), None, None),  # HF's "auto": unknown
        (_full(_block(global_batch_size=96), train_batch_size="auto"), None, 96),  # DeepSpeed's engine-written key
        (_full(_block(global_batch_size=96)), None, 512),  # train_batch_size beats the block key
    ],
)
def test_global_batch_size_sources(cfg: dict[str, Any], override: int | None, expected: int | None) -> None:
    assert read_deepspeed_config(cfg, global_batch_size=override).global_batch_size == expected


def test_optional_keys_default() -> None:
    block = _block()
    for key in ("random_ltd_layer_id", "model_mask_name", "model_type", "hidden_state_order", "enabled"):
        del block[key]
    del block["random_ltd_schedule"]["schedule_type"]
    got = read_deepspeed_config(block)
    assert got.random_ltd_layer_id is None and got.model_mask_name is None and got.model_type is None
    assert got.batch_first is None and got.schedule_type == "fixed_linear"
    assert got.enabled is False  # DeepSpeed's default


def test_batch_seq_dim_and_sorted_ids() -> None:
    got = read_deepspeed_config(
        _block(hidden_state_order="batch_seq_dim", random_ltd_layer_id=[3, 1, 2]) | {"random_ltd_layer_num": 3}
    )
    assert got.batch_first is True and got.random_ltd_layer_id == (1, 2, 3)


def test_layer_token_lr_block() -> None:
    lr = {"enabled": True, "total_layer_tokens": 1000, "warmup_layer_tokens": 100, "warmup_type": "log"}
    got = read_deepspeed_config(_block(layer_token_lr_schedule=lr))
    assert got.layer_token_lr == LayerTokenLRConfig(1000, 100, "log", "cosine", 0.0)
    assert read_layer_token_lr_config(_full(_block(layer_token_lr_schedule=lr))) == got.layer_token_lr
    # the block on its own, with this project's extensions
    alone = {"enabled": True, "total_layer_tokens": 50, "decay": "linear", "min_lr_ratio": 0.1}
    assert read_layer_token_lr_config(alone) == LayerTokenLRConfig(50, 0, "linear", "linear", 0.1)


def _with(path: str, value: Any) -> dict[str, Any]:
    """A whole config with one key of the random_ltd block (dotted path) set; DELETE removes it."""
    cfg = _full()
    node = cfg["data_efficiency"]["data_routing"]["random_ltd"]
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


DELETE = object()
RL = "data_efficiency.data_routing.random_ltd"
SCHED = f"{RL}.random_ltd_schedule"


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        # missing required keys name their full path
        (_with("total_layer_num", DELETE), rf"{RL}\.total_layer_num is missing"),
        (_with("random_ltd_schedule.min_value", DELETE), rf"{SCHED}\.min_value is missing"),
        (
            _with("random_ltd_schedule.schedule_config.seq_per_step", DELETE),
            rf"{SCHED}\.schedule_config\.seq_per_step is missing",
        ),
        (_with("random_ltd_schedule", DELETE), rf"has no '{SCHED}' block"),
        (_with("random_ltd_schedule.schedule_config", 5), r"schedule_config' must be a JSON object, got int 5"),
        # wrong types
        (_with("random_ltd_schedule.min_value", "128"), r"min_value must be an integer, got '128' \(str\)"),
        (_with("random_ltd_schedule.max_value", 2048.0), r"max_value must be an integer, got 2048\.0 \(float\)"),
        (_with("total_layer_num", True), r"total_layer_num must be an integer, got True \(bool\)"),
        (_with("enabled", "yes"), rf"{RL}\.enabled must be true or false, got 'yes'"),
        (_with("model_mask_name", 3), r"model_mask_name must be a string, got 3"),
        (_with("random_ltd_layer_id", "1,2"), r"random_ltd_layer_id must be a list of integers, got '1,2'"),
        # values out of range, with the JSON path in the message
        (_with("random_ltd_schedule.min_value", 0), rf"{SCHED}\.min_value must be >= 1, got 0"),
        (_with("random_ltd_schedule.min_value", 4096), rf"{SCHED}\.min_value \(4096\) is greater than"),
        (_with("random_ltd_layer_num", 30), r"random_ltd_layer_num \(30\) is greater than .*total_layer_num \(24\)"),
        (_with("random_ltd_schedule.schedule_type", "cosine"), r"'cosine' is not supported; known .*'fixed_linear'"),
        (_with("model_type", "seq2seq"), r"model_type is 'seq2seq'; expected one of 'encoder', 'decoder'"),
        (_with("hidden_state_order", "bsh"), r"hidden_state_order is 'bsh'; expected one of 'batch_seq_dim'"),
        # layer ids: indices among the converted layers
        (_with("random_ltd_layer_id", [*range(1, 22), 24]), r"has \[24\], outside 0\.\.23"),
        (_with("random_ltd_layer_id", [1] * 22), r"lists a layer twice"),
        (_with("random_ltd_layer_id", [1, 2]), r"lists 2 layers but random_ltd_layer_num is 22"),
        # batch size
        ({**_full(), "train_batch_size": 0}, r"train_batch_size must be >= 1, got 0"),
        ({**_full(), "train_batch_size": "big"}, r"train_batch_size must be an integer, got 'big'"),
        # where the block is missing
        ({"train_batch_size": 8}, r"found no random-LTD settings \(top-level keys: train_batch_size\)"),
        ({"data_efficiency": {"data_routing": {}}}, rf"has no '{RL}' block"),
        ({"data_efficiency": []}, r"'data_efficiency' must be a JSON object, got list"),
        # layer_token_lr_schedule
        (_with("layer_token_lr_schedule", {"enabled": 1}), r"layer_token_lr_schedule\.enabled must be true or false"),
        (
            _with("layer_token_lr_schedule", {"enabled": True, "warmup_type": "cubic"}),
            r"warmup_type is 'cubic'; expected one of 'linear', 'log'",
        ),
        (
            _with("layer_token_lr_schedule", {"enabled": True, "total_layer_tokens": 5, "warmup_layer_tokens": 9}),
            r"warmup_layer_tokens \(9\) is greater than total_layer_tokens \(5\)",
        ),
        (
            _with("layer_token_lr_schedule", {"enabled": True, "min_lr_ratio": 2}),
            r"min_lr_ratio must be a number in \[0, 1\], got 2",
        ),
    ],
)
def test_bad_config(cfg: dict[str, Any], match: str) -> None:
    before = copy.deepcopy(cfg)
    with pytest.raises(ConfigError, match=match):
        read_deepspeed_config(cfg)
    assert cfg == before


def test_bad_batch_override() -> None:
    with pytest.raises(ConfigError, match=r"global_batch_size must be >= 1, got 0"):
        read_deepspeed_config(_full(), global_batch_size=0)


def test_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"file '.*nope\.json': no such file"):
        read_deepspeed_config(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_batch_size": 8,\n}')
    with pytest.raises(ConfigError, match=r"file '.*broken\.json': is not valid JSON \(line 2, column 1"):
        read_deepspeed_config(broken)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json': holds a JSON list, not an object"):
        read_deepspeed_config(listing)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin\.json': cannot be read"):
        read_deepspeed_config(binary)
    with pytest.raises(ConfigError, match=r"file '.*': cannot be read"):
        read_deepspeed_config(tmp_path)  # a directory
    with pytest.raises(ConfigError, match=r"cannot read a DeepSpeed config from int 5"):
        read_deepspeed_config(5)  # type: ignore[arg-type]


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_with("random_ltd_schedule.min_value", -1)))
    with pytest.raises(ConfigError, match=rf"^file '.*ds\.json': {SCHED}\.min_value must be >= 1, got -1"):
        read_deepspeed_config(path)


def test_layer_token_lr_disabled_or_missing() -> None:
    with pytest.raises(ConfigError, match=r"layer_token_lr_schedule\.enabled is not true"):
        read_layer_token_lr_config(_full())
    with pytest.raises(ConfigError, match=r"layer_token_lr_schedule\.enabled is not true"):
        read_layer_token_lr_config({"total_layer_tokens": 10})  # standalone block without enabled


def test_module_does_not_import_torch() -> None:
    code = "import random_ltd_cli.deepspeed_config, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
