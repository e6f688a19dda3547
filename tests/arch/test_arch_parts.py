"""Layers kept as parallel lists of parts (XLM, FlauBERT): the attention list wrapped, the other parts proxied.

Exactness is judged by the per-layer reference of ``parts_reference.py`` (the model's own
loop cut down to one layer's original parts, keys restricted to the kept ones), never by the library.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from random_ltd_cli import (
    ConversionError,
    InputError,
    RandomLayerTokenDrop,
    VerificationError,
    convert_to_random_ltd,
    random_ltd_layers,
    revert_random_ltd,
    save_without_random_ltd,
)
from random_ltd_cli.parts import LayerPart

transformers = pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache, EncoderDecoderCache  # noqa: E402

from .parts_reference import check_parts_exact, masked_reference  # noqa: E402

S, R = 12, 6
VARIANTS = {  # name: (model class, config class, config settings)
    "xlm": ("XLMWithLMHeadModel", "XLMConfig", {}),
    "xlm-causal": ("XLMWithLMHeadModel", "XLMConfig", {"causal": True}),  # [B,S,S] attention masks
    "flaubert-post-norm": ("FlaubertWithLMHeadModel", "FlaubertConfig", {"pre_norm": False}),
    "flaubert-pre-norm": ("FlaubertWithLMHeadModel", "FlaubertConfig", {"pre_norm": True}),
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def build(name: str, **extra: Any) -> nn.Module:
    model_cls, config_cls, settings = VARIANTS[name]
    values = dict(vocab_size=99, emb_dim=32, n_layers=4, n_heads=4, max_position_embeddings=64, dropout=0.0,
                  attention_dropout=0.0)
    cfg = getattr(transformers, config_cls)(**{**values, **settings, **extra})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).train()


class _IndexableCache(EncoderDecoderCache):
    """transformers 5.25's FlauBERT pre-norm loop indexes its cache (``cache[i]``), which its own
    ``EncoderDecoderCache`` does not allow: the unconverted model fails too. The tests pass this one
    (``cache[i]`` is ``None``: no cache for the attention) so that the pre-norm loop can run at all."""

    def __getitem__(self, i: int) -> None:
        return None


def batches(name: str, model: nn.Module) -> list[dict[str, Any]]:
    """The padded batch, then the same ids without a mask (XLM builds its own from the pad index)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 90, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    out: list[dict[str, Any]] = [{"input_ids": ids.masked_fill(mask == 0, 2), "attention_mask": mask},
                                 {"input_ids": ids}]
    if name == "flaubert-pre-norm":
        for b in out:
            b["cache"] = _IndexableCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    return out


def _slots(model: nn.Module) -> list[Any]:
    return [w._parts for _, w in random_ltd_layers(model)]


# -- structure ---------------------------------------------------------------------------------------------------


def test_the_attention_list_is_wrapped_and_the_other_parts_are_proxies() -> None:
    model = convert_to_random_ltd(build("xlm"), reserved_length=R)
    t = model.transformer
    assert [n for n, _ in random_ltd_layers(model)] == ["transformer.attentions.1", "transformer.attentions.2"]
    assert all(w.dropped == "zero" for _, w in random_ltd_layers(model))
    for name in ("layer_norm1", "ffns", "layer_norm2"):
        assert [type(m) is LayerPart for m in getattr(t, name)] == [False, True, True, False], name
    assert t.ffns[1].role == "residual" and t.layer_norm1[1].role == "norm"
    assert t.ffns[1].lin1 is t.ffns[1].random_ltd_layer.lin1  # attribute reads fall through
    keys = model.state_dict().keys()
    assert "transformer.layer_norm1.1.random_ltd_layer.weight" in keys
    assert "transformer.ffns.2.random_ltd_layer.lin1.weight" in keys
    assert "transformer.attentions.1.random_ltd_layer.q_lin.weight" in keys
    assert "transformer.ffns.0.lin1.weight" in keys  # the first and the last layer are untouched


# -- exactness against the independent per-layer reference -------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_wrapped_layer_equals_the_reference_padded_and_unpadded(name: str) -> None:
    model = convert_to_random_ltd(build(name), reserved_length=R)
    outcome = check_parts_exact(batches(name, model), model)
    assert outcome.wrapped == ["transformer.attentions.1", "transformer.attentions.2"]
    assert all(s.idx is None for s in _slots(model))  # nothing outlives the forward


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_is_bitwise_the_unconverted_model_and_a_training_step_is_finite(name: str) -> None:
    plain = build(name).eval()
    model = convert_to_random_ltd(build(name), reserved_length=R)  # verify="first": checked on the step below
    batch = batches(name, model)[0]
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert model.transformer.ffns[1].random_ltd_layer.lin1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_equal_a_masked_full_length_reference(name: str) -> None:
    """With fixed kept indices, the converted model's loss and gradients equal those of the unconverted model
    whose wrapped layers run on all tokens with the keys restricted and the dropped rows selected away by
    ``torch.where`` (``masked_reference``): autograd through the library's gathers and scatters against
    autograd through full-length tensors."""
    idx = {1: torch.tensor([[0, 2, 3, 6, 7, 9], [1, 2, 5, 7, 8, 11]]), 2: torch.tensor([[1, 3, 4, 5, 8, 10]] * 2)}
    model = convert_to_random_ltd(build(name), reserved_length=R, verify="off")
    for layer, wrapper in random_ltd_layers(model):
        wrapper.sampler = lambda *_, _idx=idx[int(layer.rpartition(".")[2])], **__: _idx
    plain = build(name)
    masked_reference(plain.transformer, idx, pre_norm=bool(getattr(plain.transformer, "pre_norm", False)))
    batch = batches(name, model)[0]
    losses, grads = [], []
    for m in (model, plain):
        m.zero_grad()
        loss = m(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        losses.append(loss)
        grads.append({n.replace(".random_ltd_layer", ""): p.grad for n, p in m.named_parameters()
                      if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert grads[0]["transformer.ffns.1.lin1.weight"].abs().sum() > 0


def test_the_masked_reference_catches_a_wrong_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    from random_ltd_cli import parts

    real = parts.run_on_kept

    def leaky(part: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, role: str) -> torch.Tensor:
        out = real(part, hidden, idx, role)
        return out + 1e-3 * (hidden - hidden.detach())  # same values, a gradient that leaks to every row

    monkeypatch.setattr(parts, "run_on_kept", leaky)
    with pytest.raises(AssertionError):
        test_gradients_equal_a_masked_full_length_reference("xlm")


def test_flaubert_layerdrop_skips_whole_layers_and_leaves_no_indices_behind() -> None:
    model = convert_to_random_ltd(build("flaubert-pre-norm", layerdrop=0.5), reserved_length=R)
    torch.manual_seed(3)
    for _ in range(6):
        batch = batches("flaubert-pre-norm", model)[0]
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert all(s.idx is None for s in _slots(model))


def test_the_reference_catches_a_dropped_row_that_is_not_zero() -> None:
    model = convert_to_random_ltd(build("xlm"), reserved_length=R, verify="off")
    random_ltd_layers(model)[0][1].dropped = "input"  # the plain wrapper's rows: the residual doubles them
    with pytest.raises(AssertionError, match="layer 1: dropped tokens changed"):
        check_parts_exact(batches("xlm", model), model)


class TokenMixer(nn.Module):
    """An FFN that also reads the other tokens (a mistake to catch, not a real family)."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x) + x.mean(1, keepdim=True)


def _with_mixer(name: str) -> nn.Module:
    model = build(name)
    model.transformer.ffns[2] = TokenMixer(model.transformer.ffns[2])
    return model


def test_the_reference_catches_a_part_that_mixes_tokens() -> None:
    model = convert_to_random_ltd(_with_mixer("xlm"), reserved_length=R, verify="off")
    with pytest.raises(AssertionError, match="layer 2: kept tokens differ from the reference"):
        check_parts_exact(batches("xlm", model), model)


# -- the run-time verifier ------------------------------------------------------------------------------------------


def test_the_verifier_stops_a_part_that_mixes_tokens_at_the_first_step() -> None:
    model = convert_to_random_ltd(_with_mixer("flaubert-post-norm"), reserved_length=R)
    batch = batches("flaubert-post-norm", model)[0]
    with pytest.raises(VerificationError, match=r"cannot run a part of transformer.attentions.2 \(TokenMixer "
                                                r"\(ffns\[2\]\)\).*is not per token"):
        model(**batch)


def test_the_verifier_checks_the_attention_s_zero_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from random_ltd_cli.tokens import TokenRoute

    monkeypatch.setattr(TokenRoute, "merge_zero", TokenRoute.merge)  # a broken mode: dropped rows = the input
    model = convert_to_random_ltd(build("xlm"), reserved_length=R)
    with pytest.raises(VerificationError, match="the dropped tokens changed"):
        model(**batches("xlm", model)[0])


def test_verify_random_ltd_reports_the_parts_in_their_layer_s_verdict() -> None:
    from random_ltd_cli import verify_random_ltd

    good = convert_to_random_ltd(build("xlm-causal"), reserved_length=R)
    verdicts = verify_random_ltd(good, **batches("xlm-causal", good)[0])
    assert [v.status for v in verdicts] == ["exact", "exact"]
    assert all("per-token part" in v.method for v in verdicts)
    bad = convert_to_random_ltd(_with_mixer("xlm"), reserved_length=R)
    verdicts = verify_random_ltd(bad, **batches("xlm", bad)[0])
    assert [v.status for v in verdicts] == ["exact", "wrong"]
    assert "ffns[2] (TokenMixer) is not per token" in verdicts[1].cause


# -- stale indices, order, revert, checkpoints -------------------------------------------------------------------


def test_a_part_called_out_of_its_layer_s_order_is_an_error() -> None:
    model = convert_to_random_ltd(build("xlm"), reserved_length=R, verify="off")
    t = model.transformer
    x = torch.randn(2, S, 32)
    assert torch.equal(t.ffns[1](x), t.ffns[1].random_ltd_layer(x))  # nothing published: the original on all tokens
    mask = torch.ones(2, S)
    t.attentions[1](x, mask)  # drops: publishes its indices for layer_norm1[1], ffns[1], layer_norm2[1]
    with pytest.raises(InputError, match=r"ffns\[1\] \(TransformerFFN\) was called out of its layer's order"):
        t.ffns[1](x)  # post-norm: layer_norm1 comes first
    assert all(s.idx is None for s in _slots(model))  # the error cleared them
    t.attentions[1](x, mask)
    with pytest.raises(InputError, match="got states of shape"):
        t.layer_norm1[1](torch.randn(2, S + 1, 32))
    t.attentions[1](x, mask)
    model(input_ids=torch.randint(5, 90, (2, S)))  # a new model forward clears what a broken one left
    assert all(s.idx is None for s in _slots(model))


def test_a_new_forward_clears_indices_a_broken_one_left_also_in_a_deep_copy() -> None:
    original = convert_to_random_ltd(build("flaubert-pre-norm"), reserved_length=R, verify="off")
    model = copy.deepcopy(original)
    batch = batches("flaubert-pre-norm", model)[0]
    for m in (original, model):  # a forward that stopped after layer 1's attention dropped
        m.transformer.attentions[1](torch.randn(2, S, 32), torch.ones(2, S))
    with pytest.raises(InputError, match=r"layer_norm1\[1\] \(LayerNorm\) was called out of its layer's order"):
        model.transformer.layer_norm1[1](torch.randn(2, S, 32))  # pre-norm: runs before its attention
    model.transformer.attentions[1](torch.randn(2, S, 32), torch.ones(2, S))
    model(**batch)  # the copy's own hook cleared the copy's slots before layer 1's layer_norm1 ran
    assert original.transformer.attentions[1]._parts.idx is not None  # and left the original's alone
    original(**batch)
    revert_random_ltd(model)
    assert not model.transformer._forward_pre_hooks and original.transformer._forward_pre_hooks


def test_revert_restores_the_original_modules_and_removes_the_hooks() -> None:
    model = build("flaubert-post-norm")
    before = {n: m for n, m in model.named_modules()}
    hooks = dict(model.transformer._forward_pre_hooks)
    convert_to_random_ltd(model, reserved_length=R)
    revert_random_ltd(model)
    assert {n: m for n, m in model.named_modules()}.keys() == before.keys()
    assert all(m is before[n] for n, m in model.named_modules())
    assert dict(model.transformer._forward_pre_hooks) == hooks
    convert_to_random_ltd(model, reserved_length=R)  # and it converts again
    assert len(random_ltd_layers(model)) == 2


def test_plain_keys_load_into_the_plain_model_and_back() -> None:
    model = convert_to_random_ltd(build("xlm"), reserved_length=R)
    plain = build("xlm")
    for p in plain.parameters():
        nn.init.zeros_(p)
    plain.load_state_dict(save_without_random_ltd(model), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 save_without_random_ltd(model).values(), strict=True))
    again = convert_to_random_ltd(build("xlm"), reserved_length=R)
    again.load_state_dict(plain.state_dict())  # plain keys accepted by the wrappers and the proxies
    assert torch.equal(again.transformer.ffns[1].random_ltd_layer.lin1.weight, plain.transformer.ffns[1].lin1.weight)


# -- refusals ---------------------------------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def test_cross_attention_parts_are_refused_and_the_model_is_untouched() -> None:
    model = build("xlm")
    t = model.transformer
    t.encoder_attn = copy.deepcopy(t.attentions)
    t.layer_norm15 = copy.deepcopy(t.layer_norm1)
    before = _snapshot(model)
    with pytest.raises(ConversionError, match=r"has cross-attention parts \(encoder_attn, layer_norm15\)"):
        convert_to_random_ltd(model, reserved_length=R)
    assert _snapshot(model) == before


def test_an_unknown_loop_order_is_refused() -> None:
    model = build("flaubert-post-norm")
    model.transformer.pre_norm = "sometimes"
    with pytest.raises(ConversionError, match="pre_norm is 'sometimes', not True or False"):
        convert_to_random_ltd(model, reserved_length=R)
    assert not random_ltd_layers(model)


def test_wrapping_another_part_of_such_a_layer_is_refused() -> None:
    model = build("xlm")
    ffn = type(model.transformer.ffns[0])
    with pytest.raises(ConversionError, match=r"cannot wrap 'transformer.ffns.1': it is one part of a layer kept in "
                                              r"parallel lists .*wraps the layer's attention "
                                              r"\(transformer.attentions.1\)"):
        convert_to_random_ltd(model, ffn, reserved_length=R)
    assert not random_ltd_layers(model)


def test_an_explicit_layer_type_on_the_attention_gets_the_parts_too() -> None:
    model = build("xlm")
    convert_to_random_ltd(model, type(model.transformer.attentions[0]), reserved_length=R)
    assert isinstance(model.transformer.attentions[1], RandomLayerTokenDrop)
    assert isinstance(model.transformer.ffns[1], LayerPart)
    check_parts_exact(batches("xlm", model), model)


# -- torch.compile and the CLI -----------------------------------------------------------------------------------


def test_torch_compile_runs_the_parts_eagerly_with_the_same_values() -> None:
    import warnings

    eager = convert_to_random_ltd(build("xlm"), reserved_length=R, seed=3, verify="off")
    compiled = torch.compile(convert_to_random_ltd(build("xlm"), reserved_length=R, seed=3, verify="off"))
    batch = batches("xlm", eager)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the second call: new indices, no stale ones
            torch.testing.assert_close(compiled(**batch).logits, eager(**batch).logits, atol=1e-5, rtol=1e-4)


def test_cli_convert_names_the_parts_and_strip_loads_into_the_plain_model(tmp_path: Path) -> None:
    model = build("xlm")
    model.save_pretrained(tmp_path / "xlm")
    cli = [sys.executable, "-m", "random_ltd_cli"]
    r = subprocess.run([*cli, "convert", str(tmp_path / "xlm"), "-o", str(tmp_path / "ltd"), "--seq-len", "32"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "2 of 4 MultiHeadAttention layers wrapped" in r.stdout
    assert "the other parts of those layers run on their attention's kept tokens (6): transformer.layer_norm1.1, " \
           "transformer.layer_norm1.2, transformer.ffns.1" in r.stdout.replace("\n", " ")
    r = subprocess.run([*cli, "inspect", str(tmp_path / "ltd"), "--json"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    wrapped = json.loads(r.stdout)["wrapped_layers"]  # every module that carries the random_ltd_layer segment
    assert {"transformer.attentions.1", "transformer.ffns.1", "transformer.layer_norm2.2"} <= set(wrapped), wrapped
    r = subprocess.run([*cli, "strip", str(tmp_path / "ltd")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    plain = transformers.XLMWithLMHeadModel.from_pretrained(str(tmp_path / "ltd.stripped"))
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
