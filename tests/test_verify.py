"""The built-in verifier: the two silent patterns stop at the first training step, exact layers pass,
unverifiable layers are refused, and verification leaves training untouched."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from verify_blocks import ExpAttentionBlock, H, MlpBlock, RopeBlock, TinyLM, lm_loss

from random_ltd_cli import (
    ConfigError,
    RandomLayerTokenDrop,
    UnverifiableLayerError,
    VerificationError,
    convert_to_random_ltd,
    verify_random_ltd,
)
from random_ltd_cli import verify as verify_module

S, R = 12, 6


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (batch, S), generator=torch.Generator().manual_seed(seed))


def _positions(batch: int = 2) -> torch.Tensor:
    return torch.arange(S)[None].expand(batch, S)


def _lm(seed: int = 0, **block: Any) -> nn.Module:
    torch.manual_seed(seed)
    return TinyLM(lambda: RopeBlock(**block))


# -- (a) the two silent patterns, caught by default at the first training step -------------------------


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_rope_from_the_input_length_stops_the_first_training_step(kind: str) -> None:
    model = convert_to_random_ltd(_lm(kind=kind, rope_from_length=True), RopeBlock, reserved_length=R)
    with pytest.raises(VerificationError, match=r"layers\.1 \(RopeBlock\).*max error .* > tolerance .*"
                       r"Likely cause: positions derived from the length of its input.*verify='off'"):
        lm_loss(model, _ids(), position_ids=_positions()).backward()


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_a_window_over_range_t_stops_the_first_training_step(kind: str) -> None:
    model = convert_to_random_ltd(_lm(kind=kind, window=3), RopeBlock, reserved_length=R)
    with pytest.raises(VerificationError, match="Likely cause: a window or block counted in kept tokens"):
        lm_loss(model, _ids(), position_ids=_positions()).backward()


def test_the_same_blocks_with_their_positions_passed_train_exactly() -> None:
    model = convert_to_random_ltd(_lm(kind="sdpa", dropout=0.1), RopeBlock, reserved_length=R)
    loss = lm_loss(model, _ids(), position_ids=_positions())
    loss.backward()
    verdicts = verify_random_ltd(model, _ids(), position_ids=_positions())
    assert [(v.name, v.status, v.method, v.calls) for v in verdicts] == [
        ("layers.1", "exact", "sdpa", 1), ("layers.2", "exact", "sdpa", 1)]
    assert all(v.max_error is not None and v.max_error <= 1e-5 and v.tolerance == 1e-4 for v in verdicts)


def test_a_verdict_names_the_layer_error_tolerance_and_cause() -> None:
    model = convert_to_random_ltd(_lm(rope_from_length=True), RopeBlock, reserved_length=R, verify="off")
    v = verify_random_ltd(model, _ids(), position_ids=_positions())[0]
    assert (v.name, v.layer_class, v.status, v.method, v.reserved_length, v.seq_len) == (
        "layers.1", "RopeBlock", "wrong", "sdpa", R, S)
    assert v.max_error is not None and v.tolerance is not None and v.max_error > 100 * v.tolerance
    assert v.cause.startswith("positions derived from the length of its input")


# -- when verification runs ------------------------------------------------------------------------------


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = verify_module.check_call

    def counting(wrapper: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(type(wrapper.random_ltd_layer).__name__)
        return real(wrapper, *args, **kwargs)

    monkeypatch.setattr(verify_module, "check_call", counting)
    return seen


def test_first_verifies_once_per_argument_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _count_checks(monkeypatch)
    model = convert_to_random_ltd(_lm(), RopeBlock, reserved_length=R)
    for _ in range(3):
        lm_loss(model, _ids(), position_ids=_positions())
    assert len(seen) == 2  # two wrapped layers, first step only
    mask = torch.zeros(2, 1, S, S)
    lm_loss(model, _ids(), position_ids=_positions(), attention_mask=mask)  # a mask appears: a new signature
    lm_loss(model, _ids(), position_ids=_positions(), attention_mask=mask)
    assert len(seen) == 4
    model.eval()
    lm_loss(model, _ids(), position_ids=_positions())  # no dropping in eval: nothing to verify
    assert len(seen) == 4


@pytest.mark.parametrize(("mode", "checks"), [("always", 6), ("off", 0)])
def test_always_and_off(monkeypatch: pytest.MonkeyPatch, mode: str, checks: int) -> None:
    seen = _count_checks(monkeypatch)
    model = convert_to_random_ltd(_lm(), RopeBlock, reserved_length=R, verify=mode)
    for _ in range(3):
        lm_loss(model, _ids(), position_ids=_positions())
    assert len(seen) == checks


def test_off_trains_a_wrong_layer_at_the_users_risk() -> None:
    model = convert_to_random_ltd(_lm(rope_from_length=True), RopeBlock, reserved_length=R, verify="off")
    assert torch.isfinite(lm_loss(model, _ids(), position_ids=_positions()))


def test_a_bad_verify_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="verify='sometimes' must be one of 'first', 'always', 'off'"):
        convert_to_random_ltd(_lm(), RopeBlock, reserved_length=R, verify="sometimes")
    with pytest.raises(ConfigError, match="verify="):
        RandomLayerTokenDrop(RopeBlock(), reserved_length=R, verify="never")  # type: ignore[arg-type]


def test_verification_skips_activation_checkpoint_recomputes(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.checkpoint import checkpoint

    seen = _count_checks(monkeypatch)
    layer = RandomLayerTokenDrop(RopeBlock(), reserved_length=R, verify="always")
    x = torch.randn(2, S, H, requires_grad=True)
    checkpoint(layer, x, _positions(), use_reentrant=False).sum().backward()
    assert len(seen) == 1 and x.grad is not None


# -- verification leaves training untouched -----------------------------------------------------------------


def _train_step(verify: str) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    model = convert_to_random_ltd(_lm(dropout=0.2), RopeBlock, reserved_length=R, verify=verify)
    torch.manual_seed(123)
    loss = lm_loss(model, _ids(), position_ids=_positions())
    loss.backward()
    after = torch.rand(3)  # the global RNG continues where it would have without verification
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, after


def test_verification_on_or_off_gives_the_same_loss_gradients_and_rng() -> None:
    loss_on, grads_on, rng_on = _train_step("always")
    loss_off, grads_off, rng_off = _train_step("off")
    assert loss_on == loss_off and torch.equal(rng_on, rng_off)
    assert grads_on.keys() == grads_off.keys()
    assert all(torch.equal(grads_on[n], grads_off[n]) for n in grads_on)


def test_verify_random_ltd_restores_flags_buffers_and_generators() -> None:
    model = convert_to_random_ltd(_lm(dropout=0.2), RopeBlock, reserved_length=R, seed=7).eval()
    model.register_buffer("steps", torch.zeros(()))
    before = [w.sampler._generators for _, w in []]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    verdicts = verify_random_ltd(model, _ids(), position_ids=_positions(), reserved_length=4)
    assert [v.status for v in verdicts] == ["exact", "exact"] and verdicts[0].reserved_length == 4
    assert not any(m.training for m in model.modules()) and before == []
    assert torch.equal(torch.get_rng_state(), state)
    assert all(w.reserved_length == R for w in model.modules() if isinstance(w, RandomLayerTokenDrop))
    # the private generators continue from where they were: the next draw equals a fresh model's
    fresh = convert_to_random_ltd(_lm(dropout=0.2), RopeBlock, reserved_length=R, seed=7).train()
    model.train()
    torch.manual_seed(0)
    model(_ids(), _positions())
    torch.manual_seed(0)
    fresh(_ids(), _positions())
    assert all(torch.equal(a.last_indices, b.last_indices) for a, b in zip(  # type: ignore[arg-type]
        [m for m in model.modules() if isinstance(m, RandomLayerTokenDrop)],
        [m for m in fresh.modules() if isinstance(m, RandomLayerTokenDrop)], strict=True))


def test_a_layer_that_does_not_drop_is_not_called() -> None:
    model = convert_to_random_ltd(_lm(), RopeBlock, reserved_length=S)
    assert [v.status for v in verify_random_ltd(model, _ids(), position_ids=_positions())] == ["not called"] * 2
    with pytest.raises(ConfigError, match="has no random-LTD layers"):
        verify_random_ltd(_lm(), _ids())


# -- unverifiable and failing references -----------------------------------------------------------------


def test_an_mlp_only_block_is_unverifiable_and_refused_by_default() -> None:
    torch.manual_seed(0)
    model = convert_to_random_ltd(TinyLM(MlpBlock), MlpBlock, reserved_length=R)
    with pytest.raises(UnverifiableLayerError, match=r"cannot verify layers\.1 \(MlpBlock\).*no attention kernel.*"
                       r"takes no attention mask.*verify='off'"):
        lm_loss(model, _ids())
    v = verify_random_ltd(model, _ids())[0]
    assert (v.status, v.max_error, v.method) == ("unverifiable", None, "")
    off = convert_to_random_ltd(TinyLM(MlpBlock), MlpBlock, reserved_length=R, verify="off")
    assert torch.isfinite(lm_loss(off, _ids()))


def test_a_mask_argument_restricts_keys_when_no_kernel_is_seen() -> None:
    torch.manual_seed(0)
    model = convert_to_random_ltd(TinyLM(ExpAttentionBlock), ExpAttentionBlock, reserved_length=R)
    pad = torch.zeros(2, 1, S, S)
    pad[1, :, :, -3:] = torch.finfo(torch.float32).min  # right padding of the second sample
    verdicts = verify_random_ltd(model, _ids(), attention_mask=pad)
    assert [(v.status, v.method) for v in verdicts] == [("exact", "mask:attention_mask")] * 2
    verdicts = verify_random_ltd(model, _ids())  # mask None: no way to restrict
    assert [v.status for v in verdicts] == ["unverifiable"] * 2
    assert "its attention mask 'attention_mask' was NoneType" in verdicts[0].cause


class _Fussy(RopeBlock):
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] > R:
            raise RuntimeError(f"at most {R} tokens")
        return super().forward(x, position_ids, attention_mask)


def test_a_failing_reference_is_the_librarys_error() -> None:
    layer = RandomLayerTokenDrop(_Fussy(), reserved_length=R)
    with pytest.raises(VerificationError, match=r"could not verify _Fussy \(r=6 of S=12\): the reference call "
                       r"\(the unwrapped _Fussy on all 12 tokens\) failed: RuntimeError: at most 6 tokens"):
        layer(torch.randn(2, S, H), _positions())


# -- torch's own attention modules, cross-attention, flex ------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_layers_verify_through_multi_head_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(H, 2, 32, dropout=0.1, batch_first=batch_first), 4,
                                enable_nested_tensor=False)
    convert_to_random_ltd(enc, nn.TransformerEncoderLayer, reserved_length=R, batch_first=batch_first)
    x = torch.randn(2, S, H) if batch_first else torch.randn(S, 2, H)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[1, -3:] = True
    for kwargs in ({}, {"src_key_padding_mask": pad}):
        verdicts = verify_random_ltd(enc, x, **kwargs)
        assert [(v.status, v.method) for v in verdicts] == [("exact", "mha")] * 2, (kwargs, verdicts)
    enc.train()
    enc(x, src_key_padding_mask=pad).sum().backward()  # verified by default at the first step


class _Decoderish(nn.Module):
    """Causal self-attention, then cross-attention to ``encoder_hidden_states`` (any length, here S too)."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(H, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(H, 2, batch_first=True)

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        x = x + self.self_attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        return x + self.cross(x, encoder_hidden_states, encoder_hidden_states, need_weights=False)[0]


def test_cross_attention_to_a_sequence_of_the_same_length_is_left_alone() -> None:
    torch.manual_seed(0)
    layer = RandomLayerTokenDrop(_Decoderish(), reserved_length=R)
    v = verify_random_ltd(layer, torch.randn(2, S, H), torch.randn(2, S, H))[0]
    assert (v.name, v.status, v.method) == ("", "exact", "mha")


class _FlexBlock(nn.Module):
    """Causal attention through flex_attention; with ``window``, a sliding window over range(T)."""

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.qkv, self.window = nn.Linear(H, 3 * H), window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        b, t, _ = x.shape
        q, k, v = (z.view(b, t, 2, -1).transpose(1, 2) for z in self.qkv(x).split(H, -1))
        w = self.window or t

        def mask_mod(_b: Any, _h: Any, qi: Any, kv: Any) -> Any:
            return (qi >= kv) & (qi - kv < w)

        block = create_block_mask(mask_mod, None, None, t, t, device="cpu")
        return x + flex_attention(q, k, v, block_mask=block).transpose(1, 2).reshape(b, t, H)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_is_restricted_and_a_flex_window_over_range_t_is_caught() -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    exact = verify_random_ltd(RandomLayerTokenDrop(_FlexBlock(), reserved_length=R), torch.randn(2, S, H))[0]
    assert (exact.status, exact.method) == ("exact", "flex"), exact
    wrong = verify_random_ltd(RandomLayerTokenDrop(_FlexBlock(window=3), reserved_length=R), torch.randn(2, S, H))[0]
    assert wrong.status == "wrong" and wrong.cause.startswith("a window or block counted in kept tokens"), wrong


# -- dtypes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tolerance_passes_exact_layers_and_catches_wrong_ones(dtype: torch.dtype) -> None:
    ids = _ids(4)
    exact = convert_to_random_ltd(_lm(kind="eager"), RopeBlock, reserved_length=R).to(dtype)
    verdicts = verify_random_ltd(exact, ids, position_ids=_positions(4))
    assert [v.status for v in verdicts] == ["exact", "exact"], verdicts
    assert verdicts[0].dtype == str(dtype).replace("torch.", "") and verdicts[0].tolerance == (
        verify_module.TOLERANCES[dtype])
    wrong = convert_to_random_ltd(_lm(kind="eager", rope_from_length=True), RopeBlock, reserved_length=R).to(dtype)
    assert [v.status for v in verify_random_ltd(wrong, ids, position_ids=_positions(4))] == ["wrong", "wrong"]


def test_autocast_uses_the_tolerance_of_its_dtype() -> None:
    model = convert_to_random_ltd(_lm(kind="eager"), RopeBlock, reserved_length=R)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        verdicts = verify_random_ltd(model, _ids(), position_ids=_positions())
    assert [(v.status, v.dtype) for v in verdicts] == [("exact", "bfloat16")] * 2


def test_the_demo_model_verifies_exact() -> None:
    from random_ltd_cli.demo.train import Arm, TrainConfig, build_model

    cfg = TrainConfig(n_layer=4, n_embd=32, n_head=2, seq_len=32, batch_size=2, seq_per_step=8)
    model, _ = build_model(cfg, Arm("random-LTD", random_ltd=True))
    ids = torch.randint(0, 50, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    verdicts = verify_random_ltd(model, ids, ids)
    assert verdicts and all(v.status == "exact" for v in verdicts), verdicts


def test_compiled_regions_are_never_verified_and_compile_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import MaskedAttentionLayer
    from torch._dynamo.utils import counters

    seen = _count_checks(monkeypatch)
    stats = []
    for mode in ("always", "off"):
        torch.manual_seed(0)
        wrapper = RandomLayerTokenDrop(MaskedAttentionLayer(hidden=16), reserved_length=R, verify=mode).train()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(wrapper, backend="eager", fullgraph=True)  # fullgraph: a break is an error
        for _ in range(2):
            compiled(torch.randn(2, S, 16)).sum()
        stats.append((int(counters["stats"]["unique_graphs"]), sum(counters["graph_break"].values())))
    torch._dynamo.reset()
    assert stats[0] == stats[1] and stats[0][1] == 0
    assert seen == []  # verification runs eagerly only
    eager = RandomLayerTokenDrop(MaskedAttentionLayer(hidden=16), reserved_length=R, verify="always").train()
    eager(torch.randn(2, S, 16))
    assert len(seen) == 1


def test_an_olmo_core_shaped_call_without_positions_is_caught() -> None:
    # the model calls block(h): the block's rotary module computes positions 0..n-1 of what it receives
    torch.manual_seed(0)
    layer = RandomLayerTokenDrop(RopeBlock(), reserved_length=R)
    with pytest.raises(VerificationError, match="Likely cause: positions derived from the length of its input"):
        layer(torch.randn(2, S, H))


def test_a_litgpt_shaped_window_is_caught_after_declaring_cos_and_sin() -> None:
    from verify_blocks import LitBlock

    torch.manual_seed(0)
    layer = RandomLayerTokenDrop(LitBlock(), reserved_length=R, seq_args={"cos": "b s d", "sin": "b s d"})
    angles = torch.arange(S, dtype=torch.float32)[:, None] / (10.0 ** torch.arange(8.0))[None]
    with pytest.raises(VerificationError, match="Likely cause: a window or block counted in kept tokens"):
        layer(torch.randn(2, S, H), angles.cos()[None], angles.sin()[None])


def test_a_verdict_converts_to_json() -> None:
    import json

    model = convert_to_random_ltd(_lm(), RopeBlock, reserved_length=R)
    data = json.loads(json.dumps([v.to_dict() for v in verify_random_ltd(model, _ids(), _positions())]))
    assert [(d["name"], d["status"], d["method"], d["calls"], d["seq_len"]) for d in data] == [
        ("layers.1", "exact", "sdpa", 1, S), ("layers.2", "exact", "sdpa", 1, S)]


def test_with_several_ranks_first_means_the_first_dropping_call_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _count_checks(monkeypatch)
    monkeypatch.setattr(verify_module, "_distributed", lambda: True)  # as under torch.distributed, world > 1
    model = convert_to_random_ltd(_lm(), RopeBlock, reserved_length=R)
    lm_loss(model, _ids(), position_ids=_positions())
    lm_loss(model, _ids(), position_ids=_positions(), attention_mask=torch.zeros(2, 1, S, S))  # new signature
    assert len(seen) == 2  # not again: a signature seen by one rank only would leave collectives unmatched


def test_a_built_padding_mask_can_prove_a_layer_exact_but_never_accuses_it() -> None:
    from verify_blocks import PaddingMaskBlock

    torch.manual_seed(0)
    exact = verify_random_ltd(RandomLayerTokenDrop(PaddingMaskBlock(), reserved_length=R), torch.randn(2, S, H))[0]
    assert (exact.status, exact.method) == ("exact", "built mask:attention_mask"), exact
    doubt = RandomLayerTokenDrop(PaddingMaskBlock(rope_from_length=True), reserved_length=R)
    v = verify_random_ltd(doubt, torch.randn(2, S, H))[0]
    assert (v.status, v.max_error) == ("unverifiable", None) and "not proof of a mistake" in v.cause, v
    given = torch.ones(2, S, dtype=torch.long)  # with a real mask argument the same layer is judged wrong
    assert verify_random_ltd(doubt, torch.randn(2, S, H), given)[0].status == "wrong"


# -- a layer that cannot run on fewer tokens: the first step names the layer and the cause -------------------


class _BiasTableBlock(nn.Module):
    """Attention with a learned ``[S,S]`` bias table (timm's relative-position ViTs, LeViT): it runs on ``S`` tokens
    only, so on ``r`` kept tokens the bias does not broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H)
        self.bias = nn.Parameter(torch.randn(S, S) * 0.1)

    def forward(self, x: torch.Tensor, position_ids: Any = None, attention_mask: Any = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


def _bias_table_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyLM(_BiasTableBlock)


def test_a_layer_that_fails_on_the_kept_tokens_only_is_named_at_the_first_step() -> None:
    model = convert_to_random_ltd(_bias_table_model(), _BiasTableBlock, reserved_length=R)
    with pytest.raises(VerificationError, match=r"cannot drop tokens in layers\.1 \(_BiasTableBlock\) \(r=6 of "
                       r"S=12\): on the 6 kept tokens it fails \(RuntimeError: .*\), on all 12 tokens it runs.*"
                       r"layer_type=") as err:
        lm_loss(model, _ids())
    assert isinstance(err.value.__cause__, RuntimeError)  # the torch error stays attached for debugging
    plain = _bias_table_model()
    plain.train()
    lm_loss(plain, _ids())  # the unconverted model runs: it is the dropping that breaks the layer


def test_a_layer_that_fails_on_all_tokens_too_raises_its_own_error() -> None:
    model = convert_to_random_ltd(_bias_table_model(), _BiasTableBlock, reserved_length=R)
    with pytest.raises(RuntimeError) as err:  # a batch of another length: the layer's own mistake, not random-LTD's
        lm_loss(model, torch.randint(0, 50, (2, S + 2)))
    assert not isinstance(err.value, VerificationError)


def test_with_verification_off_the_layer_error_is_not_rewritten() -> None:
    model = convert_to_random_ltd(_bias_table_model(), _BiasTableBlock, reserved_length=R, verify="off")
    with pytest.raises(RuntimeError) as err:
        lm_loss(model, _ids())
    assert not isinstance(err.value, VerificationError)
