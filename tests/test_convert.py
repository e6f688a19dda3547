"""convert_to_random_ltd / revert_random_ltd / state dicts on the built-in GPT and custom modules."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import MaskedAttentionLayer
from torch import nn

from random_ltd_cli import (
    ConfigError,
    ConversionError,
    KeyCollisionError,
    RandomLayerTokenDrop,
    convert_to_random_ltd,
    random_ltd_layers,
    remove_random_ltd_state_dict,
    revert_random_ltd,
    save_without_random_ltd,
)
from random_ltd_cli.convert import find_layer_stack, parse_layer_spec
from random_ltd_cli.model import GPT, Block, GPTConfig


def tiny_gpt(n_layer: int = 4) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=n_layer, n_head=2, n_embd=32))


def test_default_wraps_middle_layers_of_the_stack() -> None:
    model = convert_to_random_ltd(tiny_gpt(), reserved_length=8)
    names = [n for n, _ in random_ltd_layers(model)]
    assert names == ["transformer.h.1", "transformer.h.2"]
    assert [w.layer_id for _, w in random_ltd_layers(model)] == [0, 1]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ("middle", [1, 2, 3, 4]),  # all but first and last
        ("all", [0, 1, 2, 3, 4, 5]),
        ("1-3", [1, 2, 3]),  # inclusive text range
        ("1,3,5", [1, 3, 5]),
        ([0, 2], [0, 2]),
        (range(2, 4), [2, 3]),
        (-1, [5]),  # negative index counts from the end
    ],
)
def test_layer_selection(layers: Any, expected: list[int]) -> None:
    model = convert_to_random_ltd(tiny_gpt(6), layers=layers, reserved_length=4)
    got = [int(n.rsplit(".", 1)[1]) for n, _ in random_ltd_layers(model)]
    assert got == expected


def test_layer_type_and_filter() -> None:
    model = convert_to_random_ltd(tiny_gpt(), Block, layers="all", reserved_length=4,
                                  filter_fn=lambda m, name: name.endswith(("0", "3")))
    assert [n for n, _ in random_ltd_layers(model)] == ["transformer.h.0", "transformer.h.3"]


def test_parameters_shared_not_copied_and_revert_restores_objects() -> None:
    model = tiny_gpt()
    before = {n: p for n, p in model.named_parameters()}
    blocks = list(model.transformer["h"])
    convert_to_random_ltd(model, reserved_length=4)
    assert model.transformer["h"][1].random_ltd_layer is blocks[1]
    revert_random_ltd(model)
    assert list(model.transformer["h"]) == blocks
    assert {n: p for n, p in model.named_parameters()} == before


def test_converted_eval_output_is_identical() -> None:
    model = tiny_gpt()
    ref = copy.deepcopy(model).eval()
    convert_to_random_ltd(model, reserved_length=4).eval()
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(idx)[0], ref(idx)[0])


def test_training_drops_and_trains() -> None:
    model = convert_to_random_ltd(tiny_gpt(), reserved_length=8).train()
    idx = torch.randint(0, 50, (4, 32))
    _, loss = model(idx, idx)
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_state_dict_keys_and_strict_load_of_both_forms() -> None:
    plain = tiny_gpt()
    model = convert_to_random_ltd(copy.deepcopy(plain), reserved_length=4)
    keys = list(model.state_dict())
    assert "transformer.h.1.random_ltd_layer.attn.c_attn.weight" in keys
    assert "transformer.h.0.attn.c_attn.weight" in keys
    # plain keys load strictly into the converted model, wrapped keys too
    model.load_state_dict(plain.state_dict(), strict=True)
    model.load_state_dict(model.state_dict(), strict=True)
    # and stripped keys load strictly into the plain model, bit-identical
    stripped = save_without_random_ltd(model)
    assert list(stripped) == list(plain.state_dict())
    fresh = GPT(copy.deepcopy(plain.config))
    fresh.load_state_dict(stripped, strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_remove_state_dict_is_segment_exact_ordered_and_refuses_collisions() -> None:
    sd = {"a.random_ltd_layer.w": 1, "a.random_ltd_layers.w": 2, "a.my_random_ltd_layer.w": 3, "b": 4}
    out = remove_random_ltd_state_dict(sd)
    assert list(out.items()) == [("a.w", 1), ("a.random_ltd_layers.w", 2), ("a.my_random_ltd_layer.w", 3), ("b", 4)]
    with pytest.raises(KeyCollisionError, match="'a.w'"):
        remove_random_ltd_state_dict({"a.w": 1, "a.random_ltd_layer.w": 2})


def test_data_parallel_is_unwrapped() -> None:
    model = nn.DataParallel(tiny_gpt())
    convert_to_random_ltd(model, reserved_length=4)
    assert len(random_ltd_layers(model)) == 2
    assert all(not k.startswith("module.") for k in save_without_random_ltd(model))


def test_custom_module_with_masks_and_positions() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([MaskedAttentionLayer() for _ in range(3)])

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(x.shape[1])[None]
            for b in self.blocks:
                x = b(x, attention_mask=mask, position_ids=pos)
            return x

    net = convert_to_random_ltd(Net(), reserved_length=3).train()
    out = net(torch.randn(2, 8, 16), torch.ones(2, 8))
    assert out.shape == (2, 8, 16)


def test_torch_transformer_encoder_is_sequence_first() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    convert_to_random_ltd(enc, reserved_length=2)
    (_, w), = random_ltd_layers(enc)
    assert w.batch_first is False
    out = enc.train()(torch.randn(5, 2, 8))
    assert out.shape == (5, 2, 8)


# --- bad input: one clear error, model unchanged -------------------------------------------


def _snapshot(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layer_type": nn.GRU}, ConversionError, r"no layer of GPT matches layer_type=GRU; candidate classes found: "
                                                  r".*Block x4"),  # no match lists candidates and counts
        ({"layers": [7]}, ConversionError, r"layer index 7 is out of range: the model has 4 matching layers \(Block\) "
                                           r"at indices 0\.\.3"),
        ({"layers": "1-x"}, ConfigError, "is not a layer selection"),
        ({"reserved_length": 0}, ConfigError, "cannot wrap 'transformer.h.1': reserved_length=0"),
        ({"mask_names": ["bias_mask"]}, ConfigError, "mask name 'bias_mask' is not a parameter"),
        ({"layer_type": int}, ConfigError, "must be an nn.Module subclass"),
    ],
)
def test_bad_conversion_leaves_model_unchanged(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = tiny_gpt()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        convert_to_random_ltd(model, **kwargs)
    assert _snapshot(model) == before


def test_convert_twice_is_an_error() -> None:
    model = convert_to_random_ltd(tiny_gpt(), reserved_length=4)
    before = _snapshot(model)
    with pytest.raises(ConversionError, match=r"already converted \(2 random-LTD layers: transformer.h.1, "
                                              r"transformer.h.2\); call revert_random_ltd"):
        convert_to_random_ltd(model, reserved_length=4)
    assert _snapshot(model) == before


def test_layer_without_hidden_argument() -> None:
    class KwOnly(nn.Module):
        def forward(self, **kw: Any) -> Any:
            return kw

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([KwOnly() for _ in range(3)])

    net = Net()
    with pytest.raises(ConversionError, match="cannot wrap 'layers.1': KwOnly.forward has no recognisable hidden"):
        convert_to_random_ltd(net)
    assert not random_ltd_layers(net)


def test_no_stack_found() -> None:
    with pytest.raises(ConversionError, match="could not find a stack of transformer layers"):
        convert_to_random_ltd(nn.Linear(2, 2))


def test_middle_of_two_layers_is_empty() -> None:
    with pytest.raises(ConversionError, match="layers='middle' selects nothing: only 2 matching"):
        convert_to_random_ltd(tiny_gpt(2))


def test_find_layer_stack_and_spec_parsing() -> None:
    name, cls, members = find_layer_stack(tiny_gpt())
    assert (name, cls, len(members)) == ("transformer.h", Block, 4)
    assert parse_layer_spec(" 0-2 , 5") == [0, 1, 2, 5]
    assert isinstance(RandomLayerTokenDrop, type)


# --- DeepSpeed config ----------------------------------------------------------------------


def _ds(**block: Any) -> dict[str, Any]:
    rltd = {
        "enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 3],
        "model_mask_name": "attention_mask", "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
        "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 10, "seq_per_step": 8}},
    }
    rltd.update(block)
    return {"train_batch_size": 4, "data_efficiency": {"data_routing": {"random_ltd": rltd}}}


def test_deepspeed_config_supplies_layers_mask_and_schedule() -> None:
    from random_ltd_cli import random_ltd_scheduler

    model = convert_to_random_ltd(tiny_gpt(), ds_config=_ds())
    wrapped = random_ltd_layers(model)
    assert [n for n, _ in wrapped] == ["transformer.h.1", "transformer.h.3"]
    sched = random_ltd_scheduler(model)
    assert sched is not None and sched.get_current_seq() == 8
    assert all(w.scheduler is sched for _, w in wrapped)


def test_deepspeed_config_layer_count_must_match() -> None:
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="total_layer_num=6 but the model has 4 matching layers"):
        convert_to_random_ltd(model, ds_config=_ds(total_layer_num=6, random_ltd_layer_id=[1, 2]))
    assert not random_ltd_layers(model)


def test_deepspeed_mask_name_missing_from_forward() -> None:
    with pytest.raises(ConfigError, match="mask name 'input_mask' is not a parameter of Block.forward"):
        convert_to_random_ltd(tiny_gpt(), ds_config=_ds(model_mask_name="input_mask"))


class _TwoTowers(nn.Module):
    """Two stacks of one block class in two containers (CLIP's image and text towers)."""

    def __init__(self, image: int = 4, text: int = 4) -> None:
        super().__init__()
        cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
        self.visual = nn.Module()
        self.visual.blocks = nn.ModuleList(Block(cfg) for _ in range(image))
        self.text = nn.ModuleList(Block(cfg) for _ in range(text))


def _wrapped_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, RandomLayerTokenDrop)]


def test_layer_type_in_two_towers_takes_the_middle_of_each() -> None:
    model = convert_to_random_ltd(_TwoTowers(), Block, reserved_length=4)
    assert _wrapped_names(model) == ["visual.blocks.1", "visual.blocks.2", "text.1", "text.2"]
    explicit = convert_to_random_ltd(_TwoTowers(), Block, reserved_length=4, layers=[0, 4])  # indices: concatenated
    assert _wrapped_names(explicit) == ["visual.blocks.0", "text.0"]


def test_layer_type_in_containers_of_two_stays_one_stack() -> None:
    model = convert_to_random_ltd(_TwoTowers(image=2, text=2), Block, reserved_length=4)
    assert _wrapped_names(model) == ["visual.blocks.1", "text.0"]  # the middle of all four, as before
