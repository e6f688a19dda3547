"""Index sampling: distinct sorted uniform draws, seeds, ranks, and activation-checkpoint safety."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MaskedAttentionLayer, RecordingSampler
from torch.utils.checkpoint import checkpoint

from random_ltd_cli import RandomLayerTokenDrop, TokenSampler, sample_indices


def test_indices_sorted_distinct_in_range() -> None:
    idx = sample_indices(64, 50, 17)
    assert idx.shape == (64, 17) and idx.dtype == torch.int64
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    assert int(idx.min()) >= 0 and int(idx.max()) < 50


def test_marginals_are_uniform() -> None:
    torch.manual_seed(0)
    b, s, r = 20_000, 10, 3
    counts = torch.bincount(sample_indices(b, s, r).flatten(), minlength=s).double()
    expected = b * r / s
    sigma = (b * (r / s) * (1 - r / s)) ** 0.5
    assert float((counts - expected).abs().max()) < 5 * sigma


def test_pairs_are_uniform() -> None:
    # every unordered pair of positions is kept together equally often (uniform subsets)
    torch.manual_seed(1)
    b, s, r = 30_000, 5, 2
    idx = sample_indices(b, s, r)
    codes = torch.bincount(idx[:, 0] * s + idx[:, 1], minlength=s * s).double()
    pairs = codes[codes > 0]
    assert pairs.numel() == s * (s - 1) // 2
    expected = b / pairs.numel()
    assert float((pairs - expected).abs().max()) < 5 * expected**0.5


def test_priority_positions_always_kept() -> None:
    pri = torch.zeros(1, 12, dtype=torch.bool)
    pri[0, [0, 5]] = True
    for _ in range(20):
        idx = sample_indices(8, 12, 4, priority=pri)
        assert bool((idx == 0).any(1).all()) and bool((idx == 5).any(1).all())


def test_global_rng_reproducible_with_manual_seed() -> None:
    torch.manual_seed(3)
    a = sample_indices(4, 30, 10)
    torch.manual_seed(3)
    assert torch.equal(a, sample_indices(4, 30, 10))


def test_seeded_samplers_agree_like_tensor_parallel_ranks() -> None:
    x = torch.zeros(4, 30, 8)
    ranks = [TokenSampler(seed=7, layer_id=2) for _ in range(2)]  # two ranks of one TP group
    for _ in range(3):
        a, b = (s(x, 4, 30, 10) for s in ranks)
        assert torch.equal(a, b)
    other_layer = TokenSampler(seed=7, layer_id=3)
    assert not torch.equal(TokenSampler(seed=7, layer_id=2)(x, 4, 30, 10), other_layer(x, 4, 30, 10))


def test_seeded_sampler_does_not_touch_global_rng() -> None:
    state = torch.get_rng_state()
    TokenSampler(seed=1)(torch.zeros(1), 2, 10, 3)
    assert torch.equal(state, torch.get_rng_state())


def test_rank_decorrelation(monkeypatch: pytest.MonkeyPatch) -> None:
    s = TokenSampler()
    draws = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(0)  # ranks seeded alike
        draws.append(s(torch.zeros(1), 16, 64, 8))
    assert not torch.equal(draws[0], draws[1])
    shared = TokenSampler(decorrelate_ranks=False)
    torch.manual_seed(0)
    first = shared(torch.zeros(1), 16, 64, 8)
    torch.manual_seed(0)
    assert torch.equal(first, shared(torch.zeros(1), 16, 64, 8))


@pytest.mark.parametrize("seed", [None, 123], ids=["global-rng", "seeded"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpoint_recompute_sees_same_indices(seed: int | None, reentrant: bool) -> None:
    torch.manual_seed(0)
    base = MaskedAttentionLayer()
    x0 = torch.randn(3, 12, 16)
    mask = torch.ones(12, 12, dtype=torch.bool).tril().expand(3, 1, 12, 12)

    def run(use_checkpoint: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        layer = RandomLayerTokenDrop(copy.deepcopy(base), reserved_length=5, seed=seed).train()
        layer.sampler = RecordingSampler(layer.sampler)
        x = x0.clone().requires_grad_()
        torch.manual_seed(42)
        if use_checkpoint:
            # two checkpointed calls in one graph: the second layer's input is recomputed
            h = checkpoint(layer, x, mask, use_reentrant=reentrant)
            h = checkpoint(layer, h, mask, use_reentrant=reentrant)
        else:
            h = layer(layer(x, mask), mask)
        h.square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        return x.grad, grads, torch.stack(layer.sampler.calls[:2])

    gx_ref, gp_ref, idx_ref = run(False)
    gx, gp, idx = run(True)
    assert torch.equal(idx, idx_ref)  # the forward draws are the same
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gp, gp_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_cuda_sampling_has_no_host_sync() -> None:
    x = torch.zeros(8, 512, 16, device="cuda")
    sampler = TokenSampler(seed=5)
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx = sample_indices(8, 512, 256, device="cuda")
        idx2 = sampler(x, 8, 512, 256)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert idx.device.type == "cuda" and idx2.device.type == "cuda"
