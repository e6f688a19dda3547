"""RandomLayerTokenDrop: passthrough exactness, gather/scatter correctness, masks, positions, errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import FixedSampler, MaskedAttentionLayer, RecordingSampler, TupleLayer
from torch import nn

from random_ltd_cli import ConfigError, ConversionError, InputError, RandomLayerTokenDrop


class FixedSchedule:
    def __init__(self, r: int) -> None:
        self.r = r

    def get_current_seq(self) -> int:
        return self.r


def _wrap(layer: nn.Module, r: int | None = 4, **kw: Any) -> RandomLayerTokenDrop:
    # the wrapper's mechanics on toy layers, most without attention (unverifiable): verification is
    # tested in test_verify.py
    kw.setdefault("verify", "off")
    w = RandomLayerTokenDrop(layer, reserved_length=r, **kw)
    w.sampler = RecordingSampler(w.sampler)
    return w.train()


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.stack([t[b, idx[b]] for b in range(idx.shape[0])])


def _bool_causal(b: int, s: int) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)


# --- passthrough ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup",
    [
        "eval",  # eval mode never drops
        "no_schedule",  # nothing attached
        "r_equals_s",  # r == S
        "r_above_s",  # r > S
    ],
)
def test_passthrough_is_bitwise_identical(setup: str) -> None:
    torch.manual_seed(0)
    layer = MaskedAttentionLayer()
    x = torch.randn(3, 8, 16)
    mask = _bool_causal(3, 8)
    r = {"eval": 4, "no_schedule": None, "r_equals_s": 8, "r_above_s": 20}[setup]
    wrapped = RandomLayerTokenDrop(copy.deepcopy(layer), reserved_length=r)
    wrapped.train(setup != "eval")
    layer.train(setup != "eval")
    torch.manual_seed(1)
    expected = layer(x, mask, position_ids=torch.arange(8)[None])
    torch.manual_seed(1)
    got = wrapped(x, mask, position_ids=torch.arange(8)[None])
    assert torch.equal(got, expected)


def test_passthrough_gradients_identical() -> None:
    torch.manual_seed(0)
    layer = MaskedAttentionLayer()
    wrapped = RandomLayerTokenDrop(copy.deepcopy(layer), scheduler=FixedSchedule(8)).train()
    x1 = torch.randn(2, 8, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    layer(x1).square().sum().backward()
    wrapped(x2).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    for p, q in zip(layer.parameters(), wrapped.random_ltd_layer.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


# --- dropping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_kind",
    [
        "none",  # no mask
        "bool_causal_4d",  # [B,1,S,S] bool
        "float_additive_4d",  # [B,1,S,S] float -inf style
        "padding_2d",  # [B,S] 0/1 key padding
        "bool_1s_4d",  # [B,1,1,S] bool key padding
        "batch1_4d",  # [1,1,S,S] expanded to B
    ],
)
def test_kept_tokens_equal_bare_layer_on_gathered_tokens(mask_kind: str) -> None:
    torch.manual_seed(0)
    b, s, h, r = 3, 10, 16, 4
    layer = MaskedAttentionLayer(hidden=h).train()
    wrapped = _wrap(copy.deepcopy(layer), r)
    x = torch.randn(b, s, h)
    pos = torch.arange(s)[None].expand(b, s)
    pad = torch.ones(b, s, dtype=torch.long)
    pad[1, 7:] = 0
    masks: dict[str, torch.Tensor | None] = {
        "none": None,
        "bool_causal_4d": _bool_causal(b, s),
        "float_additive_4d": torch.zeros(b, 1, s, s).masked_fill(~_bool_causal(b, s), torch.finfo(torch.float).min),
        "padding_2d": pad,
        "bool_1s_4d": pad.bool()[:, None, None, :],
        "batch1_4d": _bool_causal(1, s),
    }
    mask = masks[mask_kind]
    out = wrapped(x, mask, pos)
    idx = wrapped.sampler.calls[-1]
    assert idx.shape == (b, r)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
    # dropped tokens: bit-identical to the input
    assert torch.equal(out[~kept], x[~kept])
    # kept tokens: the bare layer run on the gathered tokens, mask and positions
    if mask is None:
        ref_mask = None
    elif mask.dim() == 2:
        ref_mask = _gather(mask, idx)
    else:
        m = mask.expand(b, *mask.shape[1:])
        if m.shape[2] == s:
            m = torch.stack([m[i][:, idx[i]][:, :, idx[i]] for i in range(b)])
        else:
            m = torch.stack([m[i][..., idx[i]] for i in range(b)])
        ref_mask = m
    ref = layer(_gather(x, idx), ref_mask, _gather(pos, idx))
    torch.testing.assert_close(_gather(out, idx), ref, rtol=0, atol=1e-6)
    if mask is not None:
        assert wrapped.sampler.calls  # mask dtype kept: layer would have failed on a wrong dtype


def test_mask_dtype_kept_and_gathered_shape() -> None:
    seen: dict[str, Any] = {}

    class Spy(nn.Module):
        def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
            seen["mask"] = attention_mask
            return hidden_states * 2

    w = _wrap(Spy(), 3)
    for mask in [_bool_causal(2, 6), torch.zeros(2, 1, 6, 6, dtype=torch.bfloat16), torch.ones(2, 6).long()]:
        w(torch.randn(2, 6, 4), mask)
        assert seen["mask"].dtype == mask.dtype
        assert seen["mask"].shape[-1] == 3


def test_positional_and_keyword_shape_is_kept() -> None:
    seen: dict[str, Any] = {}

    class Spy(nn.Module):
        def forward(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: Any = None,
                    use_cache: bool = True, **kwargs: Any) -> torch.Tensor:
            seen.update(cache=cache, mask=attention_mask, use_cache=use_cache, kwargs=kwargs)
            return hidden_states + 1

    w = _wrap(Spy(), 2)
    # GPT2Block style: the mask is the third positional argument, after the cache
    out = w(torch.zeros(2, 5, 4), object(), torch.ones(2, 1, 5, 5, dtype=torch.bool), position_ids=None)
    assert seen["cache"] is None and seen["use_cache"] is False
    assert seen["mask"].shape == (2, 1, 2, 2)
    assert "position_ids" in seen["kwargs"]
    assert out.shape == (2, 5, 4)
    assert int((out == 1).all(-1).sum()) == 4  # 2 kept tokens per sample


def test_cache_dropped_while_dropping_only() -> None:
    layer = MaskedAttentionLayer()
    w = _wrap(layer, 4)
    cache = object()
    w(torch.randn(2, 8, 16), None, None, True, cache)
    assert layer.last_call == {"use_cache": False, "past_key_value": None}
    w.eval()
    w(torch.randn(2, 8, 16), None, None, True, cache)
    assert layer.last_call == {"use_cache": True, "past_key_value": cache}


def test_tuple_output_scatters_element_zero() -> None:
    torch.manual_seed(0)
    w = _wrap(TupleLayer(8), 3)
    x = torch.randn(2, 7, 8)
    out, extra = w(x)
    assert out.shape == x.shape
    assert extra.shape == (2, 3)  # extras are returned as the layer gave them


def test_sequence_first_layout() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=False)
    w = _wrap(copy.deepcopy(layer), 3, batch_first=False, hidden_name="src")
    x = torch.randn(6, 2, 8)  # (S, B, H)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 5] = True
    out = w(x, src_key_padding_mask=pad)
    idx = w.sampler.calls[-1]
    kept = torch.zeros(2, 6, dtype=torch.bool).scatter(1, idx, True).t()  # (S, B)
    assert torch.equal(out[~kept], x[~kept])
    xb = torch.stack([x[idx[b], b] for b in range(2)], dim=1)  # (r, B, H)
    ref = layer.train()(xb, src_key_padding_mask=torch.stack([pad[b, idx[b]] for b in range(2)]))
    got = torch.stack([out[idx[b], b] for b in range(2)], dim=1)
    torch.testing.assert_close(got, ref)


def test_scheduler_drives_reserved_length() -> None:
    sched = FixedSchedule(3)
    w = RandomLayerTokenDrop(TupleLayer(4), scheduler=sched, verify="off").train()
    w.sampler = RecordingSampler(w.sampler)
    w(torch.randn(2, 9, 4))
    sched.r = 5
    w(torch.randn(2, 9, 4))
    assert [c.shape[1] for c in w.sampler.calls] == [3, 5]


def test_keep_prefix_always_kept() -> None:
    w = _wrap(TupleLayer(4), 3, keep_prefix=1)
    for _ in range(20):
        w(torch.randn(4, 12, 4))
    assert all(bool((c[:, 0] == 0).all()) for c in w.sampler.calls)


def test_document_starts_kept_from_position_ids() -> None:
    layer = MaskedAttentionLayer()
    w = _wrap(layer, 4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]])  # three packed documents
    for _ in range(10):
        w(torch.randn(1, 10, 16), None, pos)
        idx = w.sampler.calls[-1][0].tolist()
        assert {0, 3, 7} <= set(idx)


def test_attribute_reads_fall_through() -> None:
    w = RandomLayerTokenDrop(MaskedAttentionLayer())
    assert w.attention_type == "full_attention"
    assert w.heads == 2
    with pytest.raises(AttributeError):
        _ = w.no_such_attribute


def test_plain_keys_load_into_wrapper() -> None:
    layer = MaskedAttentionLayer()
    w = RandomLayerTokenDrop(MaskedAttentionLayer())
    w.load_state_dict(layer.state_dict(), strict=True)
    assert all(k.startswith("random_ltd_layer.") for k in w.state_dict())
    for k, v in layer.state_dict().items():
        assert torch.equal(w.state_dict()["random_ltd_layer." + k], v)


# --- gradients -----------------------------------------------------------------------------


def test_gradients_dropped_identity_kept_through_layer() -> None:
    torch.manual_seed(0)
    layer = TupleLayer(4).double()
    idx = torch.tensor([[0, 2], [1, 3]])
    w = RandomLayerTokenDrop(layer, reserved_length=2, verify="off").train()
    w.sampler = FixedSampler(idx)
    x = torch.randn(2, 5, 4, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 5, 4, dtype=torch.double)
    w(x)[0].backward(g)
    kept = torch.zeros(2, 5, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(x.grad[~kept], g[~kept])
    xk = _gather(x.detach(), idx).requires_grad_()
    layer(xk)[0].backward(_gather(g, idx))
    torch.testing.assert_close(_gather(x.grad, idx), xk.grad)


@pytest.mark.parametrize("batch_first", [True, False])
def test_gradcheck_float64(batch_first: bool) -> None:
    torch.manual_seed(0)

    class Mix(nn.Module):  # mixes tokens so that a wrong gather would show
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq_dim = 1 if batch_first else 0
            return x + torch.tanh(self.lin(x)) * x.mean(seq_dim, keepdim=True)

    idx = torch.tensor([[1, 3], [0, 4]])
    w = RandomLayerTokenDrop(Mix(), reserved_length=2, batch_first=batch_first, verify="off").train()
    w.sampler = FixedSampler(idx)
    shape = (2, 5, 3) if batch_first else (5, 2, 3)
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(w, (x,))


# --- bad input -----------------------------------------------------------------------------


def test_wrong_layout_is_a_clear_error() -> None:
    w = _wrap(TupleLayer(4), 2)
    with pytest.raises(InputError, match=r"expected the hidden states 'x' as a 3-D tensor \[B,S,H\], got \(5, 4\)"):
        w(torch.randn(5, 4))


def test_mask_batch_mismatch_names_the_layout() -> None:
    w = _wrap(MaskedAttentionLayer(), 2)
    with pytest.raises(InputError, match="attention_mask has batch size 3 .* batch_first"):
        w(torch.randn(2, 6, 16), torch.ones(3, 6))


def test_block_mask_is_refused_or_passed_through() -> None:
    class BlockMaskLike:
        pass

    class Spy(nn.Module):
        def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
            return hidden_states + 1

    w = _wrap(Spy(), 2)
    with pytest.raises(InputError, match="cannot gather attention_mask of type BlockMaskLike.*passthrough"):
        w(torch.zeros(1, 4, 2), BlockMaskLike())
    p = _wrap(Spy(), 2, on_unsupported="passthrough")
    assert torch.equal(p(torch.zeros(1, 4, 2), BlockMaskLike()), torch.ones(1, 4, 2))


def test_unsupported_mask_shape() -> None:
    w = _wrap(MaskedAttentionLayer(), 2)
    with pytest.raises(InputError, match=r"cannot gather attention_mask of shape \(2, 1, 6, 9\)"):
        w(torch.randn(2, 6, 16), torch.ones(2, 1, 6, 9, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reserved_length": 0}, ConfigError, "reserved_length=0 must be a positive"),  # r <= 0
        ({"reserved_length": -3}, ConfigError, "reserved_length=-3"),  # r < 0
        ({"mask_names": ["attn_bias"]}, ConfigError, "mask name 'attn_bias' is not a parameter"),  # config names
        ({"hidden_name": "nope"}, ConfigError, "hidden_name='nope' is not a parameter"),  # wrong hidden name
        ({"keep_prefix": -1}, ConfigError, "keep_prefix=-1"),  # negative prefix
        ({"on_unsupported": "ignore"}, ConfigError, "on_unsupported='ignore'"),  # unknown mode
    ],
)
def test_bad_settings(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RandomLayerTokenDrop(MaskedAttentionLayer(), **kwargs)


def test_scheduler_giving_zero_is_an_input_error() -> None:
    w = RandomLayerTokenDrop(TupleLayer(4), scheduler=FixedSchedule(0)).train()
    with pytest.raises(InputError, match="reserved length r=0 must be positive"):
        w(torch.randn(1, 5, 4))


def test_keep_prefix_longer_than_r() -> None:
    w = _wrap(TupleLayer(4), 2, keep_prefix=3)
    with pytest.raises(InputError, match="keep_prefix=3 tokens cannot fit in the reserved length r=2"):
        w(torch.randn(1, 5, 4))


def test_no_hidden_argument_and_double_wrap() -> None:
    class KwOnly(nn.Module):
        def forward(self, **kwargs: Any) -> Any:
            return kwargs

    with pytest.raises(ConversionError, match="no recognisable hidden-state argument"):
        RandomLayerTokenDrop(KwOnly())
    with pytest.raises(ConversionError, match="already wrapped"):
        RandomLayerTokenDrop(RandomLayerTokenDrop(TupleLayer()))


def test_packed_flash_kwargs_refused() -> None:
    class Spy(nn.Module):
        def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return hidden_states

    w = _wrap(Spy(), 2)
    with pytest.raises(InputError, match="packed flash-attention batch"):
        w(torch.zeros(1, 6, 2), cu_seq_lens_q=torch.tensor([0, 3, 6]))


# --- precision and devices -----------------------------------------------------------------


def test_autocast_bf16_cpu() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 8))
    w = _wrap(layer, 3)
    x = torch.randn(2, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = w(x)
    assert out.dtype == torch.bfloat16
    idx = w.sampler.calls[-1]
    kept = torch.zeros(2, 6, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(out[~kept], x.detach().to(torch.bfloat16)[~kept])
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_cuda_matches_reference() -> None:
    torch.manual_seed(0)
    layer = MaskedAttentionLayer().cuda().train()
    w = _wrap(copy.deepcopy(layer), 5)
    x = torch.randn(4, 12, 16, device="cuda", requires_grad=True)
    mask = _bool_causal(4, 12).cuda()
    out = w(x, mask)
    idx = w.sampler.calls[-1]
    assert idx.device.type == "cuda"
    kept = torch.zeros(4, 12, dtype=torch.bool, device="cuda").scatter(1, idx, True)
    assert torch.equal(out[~kept], x[~kept])
    ref_mask = torch.stack([mask[i][:, idx[i]][:, :, idx[i]] for i in range(4)])
    torch.testing.assert_close(_gather(out, idx), layer(_gather(x, idx), ref_mask))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        w(x, mask).float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_deepspeed_init_config_and_last_indices() -> None:
    block = {
        "enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2, "model_mask_name": "attention_mask",
        "hidden_state_order": "seq_batch_dim",
        "random_ltd_schedule": {"min_value": 2, "max_value": 8, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 4, "seq_per_step": 2}},
    }
    w = RandomLayerTokenDrop(MaskedAttentionLayer())
    sched = FixedSchedule(3)
    w.init_config({"random_ltd": block}, sched, 1)
    assert w.random_ltd_scheduler is sched and w.layer_id == 1 and w.batch_first is False
    bad = dict(block, model_mask_name="input_mask")
    with pytest.raises(ConfigError, match="model_mask_name='input_mask' is not a parameter"):
        RandomLayerTokenDrop(MaskedAttentionLayer()).init_config(bad, sched, 0)
    w2 = RandomLayerTokenDrop(TupleLayer(4), reserved_length=2, verify="off").train()
    assert w2.last_indices is None
    x = torch.randn(3, 6, 4)
    out, _ = w2(x)
    changed = (out != x).any(-1)
    assert torch.equal(changed.nonzero()[:, 1].view(3, 2), w2.last_indices)


class _Const(nn.Module):
    """Ignores its input: the wrapper must still pass the dropped tokens' gradient through."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) + self.bias


def test_gradient_when_layer_ignores_its_input() -> None:
    w = _wrap(_Const(), 2)
    x = torch.randn(2, 5, 4, requires_grad=True)
    g = torch.randn(2, 5, 4)
    w(x).backward(g)
    kept = torch.zeros(2, 5, dtype=torch.bool).scatter(1, w.sampler.calls[-1], True)
    assert torch.equal(x.grad[~kept], g[~kept])
    assert torch.equal(x.grad[kept], torch.zeros_like(x.grad[kept]))


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_gradients_equal_plain_autograd_reference(autocast: bool) -> None:
    # the wrapper's fused backward against gather/scatter written with ordinary differentiable indexing
    torch.manual_seed(0)
    layer = TupleLayer(8)
    idx = torch.tensor([[0, 3, 4], [1, 2, 6]])
    w = RandomLayerTokenDrop(layer, reserved_length=3, verify="off").train()
    w.sampler = FixedSampler(idx)
    x = torch.randn(2, 7, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out, extra = w(x)
        loss = out.float().square().sum() + extra.float().sum()
        kept_in = torch.stack([xr[b, idx[b]] for b in range(2)])
        k_out, k_extra = layer(kept_in)
        ref = xr.to(k_out.dtype).clone()
        ref = torch.stack([ref[b].index_put((idx[b],), k_out[b]) for b in range(2)])
        ref_loss = ref.float().square().sum() + k_extra.float().sum()
    loss.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref_loss.backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    for a, p in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(4, 6), nn.Conv1d(4, 4, kernel_size=2)],  # changes the feature size / the sequence length
    ids=["hidden-size", "length"],
)
def test_layer_that_changes_shape_is_an_input_error(layer: nn.Module) -> None:
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) if isinstance(self.inner, nn.Linear) else self.inner(x.transpose(1, 2)).transpose(1, 2)

    w = _wrap(Wrap(), 3)
    for requires_grad in (True, False):
        with pytest.raises(InputError, match=r"returned hidden states of shape .* for 6 kept tokens of input"):
            w(torch.randn(2, 5, 4, requires_grad=requires_grad))
