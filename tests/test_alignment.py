"""Sequence alignment of layer arguments, unknown-argument refusal, full-length outputs, stacks, refusals, MoE."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import FixedSampler
from torch import nn

from random_ltd_cli import (
    ConfigError,
    ConversionError,
    InputError,
    RandomLayerTokenDrop,
    VerificationError,
    convert_to_random_ltd,
    revert_random_ltd,
)
from random_ltd_cli.alignment import parse_alignment
from random_ltd_cli.convert import random_ltd_layers
from random_ltd_cli.recorders import dropped_rows

torch.set_num_threads(1)
B, S, H = 2, 6, 8
IDX = torch.tensor([[0, 2, 5], [1, 3, 4]])


class BiasLayer(nn.Module):
    """Adds a per-(query, key) bias in attention; returns (hidden, bias) like T5 hands it on."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H)

    def forward(self, hidden_states: torch.Tensor, my_bias: torch.Tensor | None = None) -> tuple[Any, ...]:
        q, k, v = self.qkv(hidden_states).chunk(3, -1)
        att = q @ k.transpose(-1, -2)
        if my_bias is not None:
            att = att + my_bias[:, 0]
        return hidden_states + att.softmax(-1) @ v, my_bias


def _reference(layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The unwrapped layer on all S tokens, keys restricted to the kept ones, read at the kept rows."""
    keep = torch.zeros(B, S, dtype=torch.bool)
    keep[torch.arange(B)[:, None], IDX] = True
    out = layer(hidden, bias + torch.where(keep[:, None, None, :], 0.0, float("-inf")))[0]
    return torch.stack([out[b, IDX[b]] for b in range(B)])


def _wrap(layer: nn.Module, **kw: Any) -> RandomLayerTokenDrop:
    w = RandomLayerTokenDrop(layer, reserved_length=3, **kw).train()
    w.sampler = FixedSampler(IDX)
    return w


def test_declared_bias_is_gathered_on_both_axes_and_returned_full_length() -> None:
    torch.manual_seed(0)
    layer = BiasLayer()
    hidden, bias = torch.randn(B, S, H), torch.randn(B, 1, S, S)
    w = _wrap(layer, seq_args={"my_bias": "b h q k"})
    out, bias_out = w(hidden, my_bias=bias)
    assert bias_out is bias  # the next layer gets the full-length original, not the r x r copy
    got = torch.stack([out[b, IDX[b]] for b in range(B)])
    torch.testing.assert_close(got, _reference(layer, hidden, bias))


def test_unknown_sequence_argument_is_refused_with_the_remedy() -> None:
    w = _wrap(BiasLayer())
    with pytest.raises(InputError, match=r"BiasLayer.forward got 'my_bias' of shape \(2, 1, 6, 6\), which has the "
                                         r"sequence length 6 on an axis.*seq_args=\{'my_bias': 'b h q k'\}.*"
                                         r"on_unsupported='passthrough'"):
        w(torch.randn(B, S, H), my_bias=torch.randn(B, 1, S, S))


def test_unknown_relative_position_table_is_refused() -> None:
    class RelLayer(nn.Module):
        def forward(self, hidden_states: torch.Tensor, pos_emb: torch.Tensor | None = None) -> torch.Tensor:
            return hidden_states

    w = _wrap(RelLayer())
    with pytest.raises(InputError, match=r"RelLayer.forward got 'pos_emb' of shape \(11, 2, 8\), which has an axis of "
                                         r"length 11 \(a relative-position table for the sequence length 6\?\)"):
        w(torch.randn(B, S, H), pos_emb=torch.randn(2 * S - 1, B, H))


def test_unknown_argument_passthrough_runs_all_tokens() -> None:
    layer = BiasLayer()
    w = _wrap(layer, on_unsupported="passthrough")
    hidden, bias = torch.randn(B, S, H), torch.randn(B, 1, S, S)
    torch.testing.assert_close(w(hidden, my_bias=bias)[0], layer(hidden, bias)[0])


def test_none_alignment_passes_unchanged() -> None:
    w = _wrap(BiasLayer(), seq_args={"my_bias": "none"}, verify="off")
    with pytest.raises(RuntimeError):  # the layer itself now sees r x r scores + an S x S bias
        w(torch.randn(B, S, H), my_bias=torch.randn(B, 1, S, S))
    checked = _wrap(BiasLayer(), seq_args={"my_bias": "none"})  # verify="first": the verifier names the cause
    with pytest.raises(VerificationError, match=r"cannot drop tokens in BiasLayer .*on all 6 tokens it runs") as err:
        checked(torch.randn(B, S, H), my_bias=torch.randn(B, 1, S, S))
    assert isinstance(err.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("text", "shape", "expected"),
    [
        # alibi [B*H, 1, S]: the batch axis holds batch x heads
        ("b _ k | b h _ k", (B * 2, 1, S), lambda t: torch.stack([t[i][:, IDX[i // 2]] for i in range(B * 2)])),
        ("b h q _", (B, 2, S, 5), lambda t: torch.stack([t[b][:, IDX[b]] for b in range(B)])),  # cross mask
        ("b q k", (1, S, S), lambda t: torch.stack([t[0][IDX[b]][:, IDX[b]] for b in range(B)])),  # shared batch
        ("... s d", (3, B, S, 4), lambda t: torch.stack([t[:, b, IDX[b]] for b in range(B)], 1)),  # leading axes
    ],
)
def test_axes_gather_matches_brute_force(text: str, shape: tuple[int, ...], expected: Any) -> None:
    t = torch.randn(shape)
    if text.startswith("..."):
        got = parse_alignment("... b s d").gather(t, IDX, S, "x")
    else:
        got = parse_alignment(text).gather(t, IDX, S, "x")
    torch.testing.assert_close(got, expected(t))


@pytest.mark.parametrize("text", ["", "b h | ", "b b q", "b ... q", "q-k"])
def test_unreadable_alignment_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="alignment"):
        RandomLayerTokenDrop(BiasLayer(), reserved_length=3, seq_args={"my_bias": text})


def test_wrong_length_axis_names_the_argument() -> None:
    w = _wrap(BiasLayer(), seq_args={"my_bias": "b h q k"})
    with pytest.raises(InputError, match=r"cannot gather 'my_bias' of shape \(2, 1, 6, 7\): axis 3"):
        w(torch.randn(B, S, H), my_bias=torch.randn(B, 1, S, 7))


def test_router_rows_for_dropped_tokens_rotate_and_are_near_uniform() -> None:
    rows = dropped_rows(8, 4, torch.zeros(1))
    top = rows.topk(2, dim=1).indices
    assert torch.bincount(top.flatten(), minlength=4).tolist() == [4, 4, 4, 4]
    assert float(rows.softmax(-1).max() - rows.softmax(-1).min()) < 0.05


# -- transformers families ------------------------------------------------------------------------

T = pytest.importorskip("transformers")


def _t5() -> Any:
    cfg = T.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=4, num_decoder_layers=4, num_heads=2,
                     decoder_start_token_id=0, dropout_rate=0.0)
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize(("stack", "prefix", "count"), [(None, "encoder.", 2), ("encoder", "encoder.", 2),
                                                        ("decoder", "decoder.", 2), ("both", "", 4)])
def test_encoder_decoder_stack_choice(stack: str | None, prefix: str, count: int) -> None:
    model = convert_to_random_ltd(_t5(), reserved_length=3, stack=stack)
    names = [n for n, _ in random_ltd_layers(model)]
    assert len(names) == count and all(n.startswith(prefix) for n in names)
    batch = {"input_ids": torch.randint(3, 50, (2, 8)), "decoder_input_ids": torch.randint(3, 50, (2, 7))}
    model.train()(**batch, labels=batch["decoder_input_ids"]).loss.backward()


def test_stack_on_a_decoder_only_model_is_refused() -> None:
    cfg = T.GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2)
    model = T.GPT2LMHeadModel(cfg)
    with pytest.raises(ConversionError, match="stack='decoder': GPT2LMHeadModel has no decoder stack of layers"):
        convert_to_random_ltd(model, reserved_length=3, stack="decoder")
    assert not random_ltd_layers(model)


def test_first_t5_layer_gets_its_bias_for_all_tokens() -> None:
    """layers='all' wraps the layer that computes the relative bias: it is computed for S and gathered."""
    model = _t5().train()
    convert_to_random_ltd(model, reserved_length=5, layers="all")
    batch = {"input_ids": torch.randint(3, 50, (2, 8)), "decoder_input_ids": torch.randint(3, 50, (2, 7))}
    assert torch.isfinite(model(**batch).logits).all()


def test_swin_is_refused_at_conversion_and_left_untouched() -> None:
    cfg = T.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1], window_size=2)
    model = T.SwinModel(cfg)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ConversionError, match=r"cannot drop tokens in SwinStage exactly: it partitions its tokens "
                                              r"into 2-D windows"):
        convert_to_random_ltd(model, reserved_length=3)
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize(("model", "message"), [
    (lambda: T.LongformerModel(T.LongformerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                  num_attention_heads=2, intermediate_size=32, attention_window=4)),
     "LongformerLayer exactly: its sliding-window attention cuts the sequence"),
    (lambda: T.BigBirdModel(T.BigBirdConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                            intermediate_size=32, attention_type="block_sparse", block_size=2)),
     r"BigBirdLayer exactly: its block-sparse attention .* set attention_type='original_full'"),
    (lambda: T.LongT5Model(T.LongT5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2,
                                          local_radius=2)),
     "LongT5Block exactly: its local attention splits the sequence it sees into blocks"),
])
def test_length_derived_attention_is_refused_at_conversion(model: Any, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        convert_to_random_ltd(model(), reserved_length=3)


def test_albert_shared_layer_drops_in_its_middle_calls_only() -> None:
    cfg = T.AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=5, num_attention_heads=2,
                         intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = T.AlbertForMaskedLM(cfg).train()
    ids = torch.randint(3, 50, (2, 9))
    full = model(input_ids=ids, output_hidden_states=True).hidden_states
    convert_to_random_ltd(model, reserved_length=4)
    (name, wrapper), = random_ltd_layers(model)
    assert name == "albert.encoder.albert_layer_groups.0.albert_layers.0" and wrapper.calls == {1, 2, 3}
    drops: list[bool] = []
    wrapper.register_forward_pre_hook(lambda m, a: setattr(m, "last_indices", None))
    wrapper.register_forward_hook(lambda m, a, o: drops.append(m.last_indices is not None))
    for _ in range(2):  # the call count starts again with every forward
        drops.clear()
        out = model(input_ids=ids, output_hidden_states=True)
        assert drops == [False, True, True, True, False]
    torch.testing.assert_close(out.hidden_states[1], full[1])  # call 0 saw every token
    assert not torch.allclose(out.hidden_states[2], full[2])
    revert_random_ltd(model)
    assert not model.albert.encoder._forward_pre_hooks


def test_moe_router_logits_are_full_length_on_a_padded_batch() -> None:
    cfg = T.MixtralConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                          output_router_logits=True)
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(cfg).train()
    convert_to_random_ltd(model, reserved_length=4)
    ids = torch.randint(3, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert [tuple(r.shape) for r in out.router_logits] == [(16, 4)] * 4
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.loss)
    out.loss.backward()
    wrapped = random_ltd_layers(model)[0][1]
    flat = (wrapped.last_indices + torch.arange(2)[:, None] * 8).flatten()
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[flat] = False
    torch.testing.assert_close(out.router_logits[1][dropped], dropped_rows(16, 4, out.router_logits[1])[dropped])


# -- refusals of some layers, shared-layer settings, CLI ----------------------------------------------


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.lin(hidden_states)


class Windowed(Plain):
    def forward(self, hidden_states: torch.Tensor, input_dimensions: Any = None) -> torch.Tensor:  # type: ignore[override]
        return hidden_states + self.lin(hidden_states)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Plain(), Windowed(), Plain(), Windowed()])


def test_mixed_stack_names_the_refused_layers_and_the_compatible_ones() -> None:
    model = Mixed()
    with pytest.raises(ConversionError, match=r"cannot drop tokens exactly in layers 1 \(layers.1\) of Windowed: it "
                                              r"partitions .* The model is unchanged; wrap only the compatible ones, "
                                              r"e.g. layers=\[2\]"):
        convert_to_random_ltd(model, layer_type=(Plain,), layers="middle", reserved_length=2)
    assert not random_ltd_layers(model)
    convert_to_random_ltd(model, layer_type=(Plain,), layers=[2], reserved_length=2)
    assert [n for n, _ in random_ltd_layers(model)] == ["layers.2"]


@pytest.mark.parametrize(("calls", "per", "message"), [
    ([1], None, "calls= and calls_per_forward= go together"),
    ([5], 5, r"calls=\[5\]: call 5 is outside 0..4"),
])
def test_shared_call_settings_are_checked(calls: Any, per: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RandomLayerTokenDrop(Plain(), reserved_length=2, calls=calls, calls_per_forward=per)


def test_cli_seq_arg_and_stack() -> None:
    from typer.testing import CliRunner

    from random_ltd_cli.cli import app

    init = '{"vocab_size": 50, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 4, "num_heads": 2}'
    ok = CliRunner().invoke(app, ["inspect", "transformers:T5ForConditionalGeneration", "--init", init, "--json",
                                  "--stack", "decoder", "--seq-arg", "my_bias=b h q k"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["wrapped_layers"] == ["decoder.block.1", "decoder.block.2"]
    bad = CliRunner().invoke(app, ["inspect", "transformers:T5ForConditionalGeneration", "--init", init,
                                   "--seq-arg", "my_bias"])
    assert bad.exit_code == 1
    assert bad.stderr.strip() == ("Error: --seq-arg 'my_bias' must read NAME=AXES, e.g. --seq-arg "
                                  "my_bias='b h q k'.")


def test_adapted_layer_under_hf_gradient_checkpointing_gives_the_same_gradients() -> None:
    """BEiT's bias is gathered inside the call: a recompute in the backward pass must run inside it too."""
    import copy

    cfg = T.BeitConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=2, use_relative_position_bias=True, drop_path_rate=0.0)
    torch.manual_seed(0)
    plain = T.BeitForImageClassification(cfg).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pixels = torch.randn(2, 3, 8, 8)
    grads = []
    for model in (plain, checkpointed):
        convert_to_random_ltd(model, reserved_length=9)
        torch.manual_seed(1)
        (model(pixel_values=pixels).logits ** 2).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_token_axis_before_the_batch_axis_is_gathered_per_sample() -> None:
    """Sequence-first arguments ("s b _ d", Megatron-core's rotary_pos_emb [s,1,1,d]): sample j keeps its own rows."""
    s, b, d = 6, 3, 4
    table = torch.randn(s, 1, 1, d)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4], [0, 1, 2]])
    got = parse_alignment("s b _ d").gather(table, idx, s, "rotary_pos_emb")
    assert got.shape == (3, b, 1, d)
    for j in range(b):
        assert torch.equal(got[:, j], table[idx[j], 0])
    per_sample = torch.randn(s, b, d)
    got = parse_alignment("s b d").gather(per_sample, idx, s, "x")
    for j in range(b):
        assert torch.equal(got[:, j], per_sample[idx[j], j])
