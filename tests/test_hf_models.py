"""Hugging Face models (tiny, from configs): BERT, GPT-2, Llama, Qwen2, ViT convert and train correctly."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import RecordingSampler, tiny_hf_model
from torch import nn

from random_ltd_cli import RandomLayerTokenDrop, convert_to_random_ltd, random_ltd_layers

pytest.importorskip("transformers")

TEXT = ["bert", "gpt2", "llama", "qwen2"]
ALL = [*TEXT, "vit"]
DECODERS = ["gpt2", "llama", "qwen2"]
S = 12


class FixedSchedule:
    def __init__(self, r: int) -> None:
        self.r = r

    def get_current_seq(self) -> int:
        return self.r


def _inputs(name: str, padded: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 90, (2, S), generator=g)
    batch = {"input_ids": ids}
    if padded:
        mask = torch.ones(2, S, dtype=torch.long)
        if name == "bert":
            mask[1, 8:] = 0  # right padding
        else:
            mask[1, :4] = 0  # left padding: without a mask the pads would leak into later tokens
        batch["attention_mask"] = mask
    return batch


def _loss(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if name == "vit":
        return model(**batch, labels=torch.tensor([0, 1])).loss
    return model(**batch, labels=batch["input_ids"]).loss


def _convert(model: nn.Module, r: int = 6, **kw: Any) -> list[RandomLayerTokenDrop]:
    convert_to_random_ltd(model, scheduler=FixedSchedule(r), **kw)
    wrappers = [w for _, w in random_ltd_layers(model)]
    for w in wrappers:
        w.sampler = RecordingSampler(w.sampler)
    return wrappers


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_trains_with_finite_loss_and_gradients(name: str, attn: str) -> None:
    model = tiny_hf_model(name, attn).train()
    wrappers = _convert(model)
    assert len(wrappers) == 2  # 4 layers: the middle two
    loss = _loss(name, model, _inputs(name, padded=name != "vit"))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(len(w.sampler.calls) == 1 and w.sampler.calls[0].shape[1] == 6 for w in wrappers)


@pytest.mark.parametrize("name", ALL)
def test_dropped_tokens_skip_the_layer(name: str) -> None:
    model = tiny_hf_model(name).train()
    wrappers = _convert(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.append((args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach()))

    for w in wrappers:
        w.register_forward_hook(hook)
    _loss(name, model, _inputs(name))
    for (x, y), w in zip(seen, wrappers, strict=True):
        idx = w.sampler.calls[-1]
        kept = torch.zeros(x.shape[:2], dtype=torch.bool).scatter(1, idx, True)
        assert torch.equal(y[~kept], x[~kept])
        assert not torch.equal(y[kept], x[kept])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rotary_layers_use_original_positions(name: str) -> None:
    # running the layer on the kept tokens must equal running it on all tokens with keys restricted to the kept ones
    model = tiny_hf_model(name, "eager").train()
    wrappers = _convert(model)
    captured: dict[str, Any] = {}

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.setdefault("args", (args, kwargs))

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        captured.setdefault("out", out[0] if isinstance(out, tuple) else out)

    wrappers[0].register_forward_pre_hook(pre, with_kwargs=True)
    wrappers[0].register_forward_hook(post)
    with torch.no_grad():
        model(**_inputs(name))
    (args, kwargs), out = captured["args"], captured["out"]
    hidden = args[0]
    idx = wrappers[0].sampler.calls[-1]
    b, s = hidden.shape[:2]
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & kept[:, None, :]  # (B, S, S)
    mask = torch.zeros(b, 1, s, s).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    ref_kwargs = dict(kwargs, attention_mask=mask, cache=None, use_cache=False)
    with torch.no_grad():
        ref = wrappers[0].random_ltd_layer(hidden, **ref_kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out[kept], ref[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TEXT)
def test_padding_is_masked_after_gathering(name: str) -> None:
    model = tiny_hf_model(name).train()
    _convert(model, r=7)
    batch = _inputs(name, padded=True)
    other = {k: v.clone() for k, v in batch.items()}
    pads = batch["attention_mask"] == 0
    other["input_ids"][pads] = 5  # different pad content
    torch.manual_seed(0)
    a = model(**batch).logits
    torch.manual_seed(0)
    b = model(**other).logits
    torch.testing.assert_close(a[~pads], b[~pads], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_output_hidden_states_are_full_length(name: str) -> None:
    model = tiny_hf_model(name).train()
    wrappers = _convert(model)
    outs: list[torch.Tensor] = []
    for w in wrappers:
        w.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    batch = _inputs(name)
    result = model(**batch, output_hidden_states=True)
    states = result.hidden_states
    assert len(states) == 5
    full = states[0].shape
    assert all(h.shape == full for h in states)
    # the wrapped layers (1 and 2) report exactly what they returned
    assert torch.equal(states[2], outs[0]) and torch.equal(states[3], outs[1])


@pytest.mark.parametrize("name", ALL)
def test_gradient_checkpointing_gives_same_gradients(name: str) -> None:
    base = tiny_hf_model(name).train()
    ckpt = copy.deepcopy(base)
    _convert(base)
    _convert(ckpt)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _inputs(name, padded=name != "vit")
    grads = []
    for m in (base, ckpt):
        torch.manual_seed(0)
        _loss(name, m, batch).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_eval_output_identical_to_unconverted(name: str) -> None:
    plain = tiny_hf_model(name).eval()
    model = copy.deepcopy(plain)
    _convert(model)
    model.eval()
    batch = _inputs(name, padded=name != "vit")
    with torch.no_grad():
        a, b = plain(**batch), model(**batch)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("name", DECODERS)
def test_generation_identical_to_unconverted(name: str) -> None:
    plain = tiny_hf_model(name).eval()
    model = copy.deepcopy(plain)
    _convert(model)
    model.eval()
    ids = _inputs(name)["input_ids"][:, :5]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.generate(ids, **kw), model.generate(ids, **kw))
