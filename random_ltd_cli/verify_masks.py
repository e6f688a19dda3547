"""Key restriction through a layer's own attention-mask argument (the verifier's second method).

Used when no attention kernel could be intercepted. The mask's convention is read from the mask
itself, never from the family:

* bool: *keep* (True = may attend) or *block* (True = masked, e.g. ``nn.MultiheadAttention``'s
  ``key_padding_mask``): a query x key mask is *keep* when it allows most of its diagonal, a
  padding mask when most of its entries are True;
* integer: keep (1 = attend, 0 = padding);
* float: keep when it holds only 0s and 1s (and some 1), else additive (0 = attend, a large
  negative value = masked).

Shapes: ``[B, S]`` (key padding), ``[S, S]``, ``[B, S, S]``, ``[B, h, S, S]``, ``[B, h, 1, S]``
(a padding row broadcast over the queries). Key-padding forms can only hide the dropped keys from
every query (no per-query diagonal); the dropped query rows are not compared anyway.
"""

from __future__ import annotations

import torch

__all__ = ["convention", "restrict_mask", "rows_attending"]


def _is_padding(mask: torch.Tensor, batch: int, seq: int, name: str) -> bool:
    """Whether a 2-D mask is ``[B, S]`` key padding (rather than ``[S, S]``)."""
    if mask.dim() != 2:
        return False
    if tuple(mask.shape) == (seq, seq) and (batch != seq or "padding" not in name):
        return False
    return mask.shape[-1] == seq and mask.shape[0] in (1, batch)


def convention(mask: torch.Tensor, padding: bool) -> str:
    """``"keep"``, ``"block"`` or ``"additive"`` for this mask (see the module docstring)."""
    if mask.dtype == torch.bool:
        if padding or mask.shape[-2] == 1:
            share = mask.float().mean()
        else:
            share = mask.diagonal(dim1=-2, dim2=-1).float().mean()
        return "keep" if float(share) >= 0.5 else "block"
    if mask.is_floating_point():
        binary = bool(((mask == 0) | (mask == 1)).all()) and bool((mask == 1).any())
        return "keep" if binary else "additive"
    return "keep"


def _apply(mask: torch.Tensor, ok: torch.Tensor, conv: str) -> torch.Tensor:
    if conv == "additive":
        return mask.masked_fill(~ok, torch.finfo(mask.dtype).min)
    if conv == "block":
        return mask | ~ok
    return mask & ok if mask.dtype == torch.bool else mask * ok.to(mask.dtype)


def restrict_mask(mask: torch.Tensor, allowed: torch.Tensor, kept: torch.Tensor, name: str) -> torch.Tensor | None:
    """``mask`` with the non-kept keys masked for the kept queries, in the mask's own convention.

    Args:
        mask: the layer's mask argument.
        allowed: ``[B, S, S]`` bool, the keys each query may see (kept keys; dropped rows see themselves).
        kept: ``[B, S]`` bool, the kept tokens.
        name: the argument's name.

    Returns:
        The restricted mask, or ``None`` for a shape this cannot restrict.
    """
    batch, seq = kept.shape
    device = mask.device
    if _is_padding(mask, batch, seq, name):
        return _apply(mask.expand(batch, seq), kept.to(device), convention(mask, True))
    if mask.dim() == 4 and mask.shape[-2] == 1 and mask.shape[-1] == seq and mask.shape[0] in (1, batch):
        full = mask.expand(batch, mask.shape[1], 1, seq)
        return _apply(full, kept.to(device)[:, None, None, :], convention(mask, True))
    if mask.dim() not in (2, 3, 4) or tuple(mask.shape[-2:]) != (seq, seq):
        return None
    conv = convention(mask, False)
    if mask.dim() == 2:
        return _apply(mask.expand(batch, seq, seq), allowed.to(device), conv)
    if mask.shape[0] not in (1, batch):
        return None
    if mask.dim() == 3:
        return _apply(mask.expand(batch, seq, seq), allowed.to(device), conv)
    return _apply(mask.expand(batch, *mask.shape[1:]), allowed.to(device)[:, None], conv)


def rows_attending(mask: torch.Tensor, batch: int, seq: int, name: str) -> torch.Tensor:
    """``[B, S]`` bool: query rows the model's own mask lets attend to some key (padding queries of a
    query x key mask are masked completely and hold garbage in any implementation: not compared)."""
    if _is_padding(mask, batch, seq, name) or mask.dim() not in (3, 4) or tuple(mask.shape[-2:]) != (seq, seq):
        return torch.ones(batch, seq, dtype=torch.bool)
    conv = convention(mask, False)
    if conv == "additive":
        ok = mask > torch.finfo(mask.dtype).min / 2
    elif conv == "block":
        ok = ~mask
    else:
        ok = mask != 0
    rows = ok.any(-1)
    rows = rows.all(1) if rows.dim() == 3 else rows
    return rows.expand(batch, seq).cpu()
