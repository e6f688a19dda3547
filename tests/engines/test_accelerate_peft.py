"""Accelerate (prepare, save_state, strip, load_state into the plain model) and PEFT LoRA adapters, on CPU."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from random_ltd_cli import convert_to_random_ltd, random_ltd_layers, revert_random_ltd
from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.errors import CheckpointError
from random_ltd_cli.keys import strip_key
from random_ltd_cli.model import GPT, GPTConfig

from .conftest import ROOT, require


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=4, n_head=2, n_embd=32))


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    require("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_accelerate_prepare_trains_and_save_state_strips_into_the_plain_model(tmp_path: Path, fresh_accelerate) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = convert_to_random_ltd(tiny(), reserved_length=8, seed=0)
    kept: list[int] = []
    _, layer = random_ltd_layers(model)[0]
    inner = layer.sampler
    layer.sampler = lambda *a, **k: kept.append(int((idx := inner(*a, **k)).shape[1])) or idx
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        batch = torch.randint(0, 50, (2, 32), generator=g)
        acc.backward(model(batch, batch)[1])
        opt.step()
        opt.zero_grad()
    assert kept == [8, 8]  # tokens really dropped
    acc.save_state(str(tmp_path / "state"))
    trained = {strip_key(k): v.clone() for k, v in model.state_dict().items()}
    report = strip_checkpoint(tmp_path / "state", tmp_path / "plain")
    assert report.format == "hf-dir" and report.renamed_count == 24
    assert inspect_checkpoint(tmp_path / "plain").wrapped_layers == []

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)  # a new run: the plain model is its first (and only) model
    plain = tiny(seed=9)
    plain, opt2 = acc.prepare(plain, torch.optim.AdamW(plain.parameters(), lr=1e-2))
    acc.load_state(str(tmp_path / "plain"))
    for name, value in plain.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert opt2.state_dict()["state"][0]["step"] == 2  # optimizer moments came along


def _lora(order: str):  # type: ignore[no-untyped-def]
    require("peft")
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_hf_model  # the suite's tiny Hugging Face models
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    base = tiny_hf_model("gpt2")
    if order == "convert-then-peft":
        return get_peft_model(convert_to_random_ltd(base, reserved_length=8, seed=0), config), tiny_hf_model
    return convert_to_random_ltd(get_peft_model(base, config), reserved_length=8, seed=0), tiny_hf_model


@pytest.mark.parametrize("order", ["convert-then-peft", "peft-then-convert"])
def test_lora_adapter_trains_strips_and_loads_into_the_plain_base_model(tmp_path: Path, order: str) -> None:
    model, tiny_hf_model = _lora(order)
    from peft import PeftModel

    assert len(random_ltd_layers(model)) == 2
    kept: list[int] = []
    _, layer = random_ltd_layers(model)[0]
    inner = layer.sampler
    layer.sampler = lambda *a, **k: kept.append(int((idx := inner(*a, **k)).shape[1])) or idx
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert kept == [8, 8]  # 8 of 16 tokens, one call per step
    model.save_pretrained(str(tmp_path / "adapter"))
    assert any(".random_ltd_layer." in t.name for t in inspect_checkpoint(tmp_path / "adapter").tensors)
    strip_checkpoint(tmp_path / "adapter", tmp_path / "plain")
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(tiny_hf_model("gpt2"), str(tmp_path / "plain")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the other way to plain names: unwrap, then save
    revert_random_ltd(model)
    model.save_pretrained(str(tmp_path / "reverted"))
    assert not any(".random_ltd_layer." in t.name for t in inspect_checkpoint(tmp_path / "reverted").tensors)
    again = PeftModel.from_pretrained(tiny_hf_model("gpt2"), str(tmp_path / "reverted")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=0, atol=0)


def test_adapter_config_naming_wrapped_modules_is_refused(tmp_path: Path, untouched) -> None:
    model, _ = _lora("convert-then-peft")
    model.save_pretrained(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["target_modules"] = ["transformer.h.1.random_ltd_layer.attn.c_attn"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    check = untouched(tmp_path / "adapter")
    with pytest.raises(CheckpointError) as err:
        strip_checkpoint(tmp_path / "adapter")
    assert str(err.value) == (
        f"{tmp_path / 'adapter' / 'adapter_config.json'} names modules inside 'random_ltd_layer' "
        "(target_modules); strip does not rewrite adapter configs. Save the adapter after revert_random_ltd(model), "
        "or edit adapter_config.json, then retry."
    )
    check()
    assert not (tmp_path / "adapter.stripped").exists()
