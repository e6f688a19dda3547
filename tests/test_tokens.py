"""gather_mask / positions against a brute-force per-sample reference, for every supported form."""

from __future__ import annotations

import pytest
import torch

from random_ltd_cli import InputError
from random_ltd_cli.sampling import sample_indices
from random_ltd_cli.tokens import gather_mask, gather_position_embeddings, gather_position_ids

B, S, R = 3, 9, 4


def _reference(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(B):
        m = mask[b if mask.shape[0] == B else 0]
        if m.dim() == 1:  # [S]
            out.append(m[idx[b]])
            continue
        rows = m[..., idx[b], :] if m.shape[-2] == S else m
        out.append(rows[..., idx[b]])
    return torch.stack(out)


@pytest.mark.parametrize(
    "shape",
    [
        (B, S),  # key padding
        (1, S),  # shared key padding
        (B, S, S),  # 3-D
        (B, 1, S, S),  # the usual 4-D
        (1, 1, S, S),  # shared 4-D (expanded without a copy)
        (B, 2, S, S),  # per-head
        (1, 2, S, S),  # shared per-head
        (B, 1, 1, S),  # broadcast query row
        (1, 2, 1, S),  # shared per-head broadcast row
    ],
)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.long])
def test_gather_mask_matches_brute_force(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    mask = (torch.rand(shape) > 0.3).to(dtype)
    idx = sample_indices(B, S, R)
    got = gather_mask(mask, idx, S)
    assert got.dtype == dtype
    assert torch.equal(got, _reference(mask, idx))


def test_non_contiguous_mask() -> None:
    mask = torch.rand(B, 1, S, S).transpose(-1, -2) > 0.5
    idx = sample_indices(B, S, R)
    assert torch.equal(gather_mask(mask, idx, S), _reference(mask, idx))


def test_positions_keep_original_values() -> None:
    idx = sample_indices(B, S, R)
    pos = torch.arange(S)[None]
    assert torch.equal(gather_position_ids(pos, idx, S), idx)
    cos = torch.randn(1, S, 6)
    sin = torch.randn(1, S, 6)
    gc, gs = gather_position_embeddings((cos, sin), idx, S)
    assert torch.equal(gc, cos[0][idx]) and torch.equal(gs, sin[0][idx])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.ones(2, S), "attention_mask has batch size 2"),  # wrong batch
        (torch.ones(B, 1, S, S + 2), r"cannot gather attention_mask of shape \(3, 1, 9, 11\)"),  # cache-length keys
        (torch.ones(B, 1, 2, S), r"cannot gather attention_mask of shape \(3, 1, 2, 9\)"),  # neither 1 nor S rows
        ([1, 2], "cannot gather attention_mask of type list"),  # not a tensor
    ],
)
def test_unsupported_masks(value: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        gather_mask(value, sample_indices(B, S, R), S)
