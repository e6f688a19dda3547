"""Adapters for vision-transformer blocks of timm and open_clip (positions from the grid, mask layouts).

Recognised by structure (attributes and forward parameters), never by importing timm:

========================  ===============================================================
EVA / EVA-02 blocks       ``rope`` is a table for the patch tokens only, ``[S - p, d]``
(``EvaBlock``,            (``p`` = ``num_prefix_tokens``: class/register tokens), and the
``EvaBlockPostNorm``)     attention rotates ``q[:, :, p:]``/``k[:, :, p:]`` with it. The
                          ``p`` prefix tokens are always kept (so they stay at the front of
                          what the attention receives) and the table is gathered per sample
                          at the kept patch positions, ``[B, 1, r - p, d]``: timm's rotation
                          broadcasts a batch axis (its own patch dropout passes
                          ``[B, 1, N, d]``). Mixed-mode tables ``[heads, S - p, d]`` become
                          ``[B, heads, r - p, d]``; a table that already has a batch axis
                          (``[B, 1|heads, S - p, d]``) is gathered per sample.
BEiT blocks               the attention builds its relative position bias ``[1, H, S, S]``
(``timm.models.beit``)    for the whole patch grid inside the call (``_get_rel_pos_bias``):
                          during the call the bias is gathered to the kept queries x keys
                          (``[B, H, r, r]``); a shared bias ``[H, S, S]`` passed by the
                          model (``shared_rel_pos_bias``) is gathered the same way.
open_clip custom blocks   open_clip's own ``Attention`` takes masks in
                          ``nn.MultiheadAttention``'s convention: 2-D ``[L,L]`` (never a
                          ``[B,S]`` padding mask, even when B == L) or ``[B*heads,L,L]``.
========================  ===============================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import LayerAdapter, _CustomAlignment
from .adapters import forward_params as _params
from .alignment import Alignment, gather_axes
from .errors import InputError
from .tokens import gather_mask

__all__ = ["find_vision_adapter"]


# -- timm EVA / EVA-02: rope for the tokens after the prefix ----------------------------------


class _EvaRope(LayerAdapter):
    def __init__(self, prefix: int) -> None:
        self.keep_prefix = prefix

    def alignments(self) -> dict[str, Alignment]:
        return {"rope": _CustomAlignment("timm EVA rope [S-p,d] | [h,S-p,d] | [B,1|h,S-p,d]", self._gather)}

    def _gather(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        p = self.keep_prefix
        n = seq_len - p
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3, 4) or value.shape[-2] != n:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(
                f"cannot gather timm's {name!r} of shape {shape}: expected a rotary table for the {n} tokens after "
                f"the {p} prefix token(s), [{n}, d], [heads, {n}, d] or [B, 1|heads, {n}, d].")
        if p and not bool((idx[:, :p] == torch.arange(p, device=idx.device)).all()):
            raise InputError(f"timm's {name!r}: the {p} prefix token(s) must be kept (internal error).")
        patches = idx[:, p:] - p  # [B, r - p]: kept positions among the patch tokens
        table = value if value.dim() == 4 else (value[None, None] if value.dim() == 2 else value[None])
        return gather_axes(table, ("b", "h", "s", "d"), patches, n, name)  # [B, 1|heads, r - p, d]


def _eva(layer: nn.Module) -> LayerAdapter | None:
    attn = getattr(layer, "attn", None)
    prefix = getattr(attn, "num_prefix_tokens", None)
    takes_rope = "rope" in _params(layer.forward) and "rope" in _params(getattr(attn, "forward", None))
    if isinstance(prefix, int) and takes_rope:
        return _EvaRope(prefix)
    return None


# -- timm BEiT: relative position bias of the whole grid -------------------------------------


class _BeitBias(LayerAdapter):
    has_context = True

    def __init__(self, attn: Any) -> None:
        self.attn = attn

    def alignments(self) -> dict[str, Alignment]:
        return {"shared_rel_pos_bias": _CustomAlignment("timm BEiT [H,S,S] | [1|B,H,S,S]", self._gather)}

    def _gather(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() not in (3, 4):
            raise InputError(f"cannot gather timm BEiT's {name!r}: expected [H,S,S] or [1|B,H,S,S].")
        return gather_axes(value if value.dim() == 4 else value[None], ("b", "h", "q", "k"), idx, seq_len, name)

    @contextlib.contextmanager
    def around(self, idx: torch.Tensor, seq_len: int) -> Iterator[None]:
        attn = self.attn
        if getattr(attn, "relative_position_bias_table", None) is None:
            yield
            return
        full = type(attn)._get_rel_pos_bias

        def kept() -> torch.Tensor:
            bias = full(attn)  # [1, H, S, S] for the whole grid (+ class token)
            if bias.shape[-1] != seq_len:
                raise InputError(
                    f"timm BEiT's relative position bias covers {bias.shape[-1]} tokens, the layer got {seq_len}; "
                    "random-LTD gathers it only for the grid the model was built for.")
            return gather_mask(bias, idx, seq_len, "relative_position_bias")  # [B, H, r, r]

        attn.__dict__["_get_rel_pos_bias"] = kept
        try:
            yield
        finally:
            del attn.__dict__["_get_rel_pos_bias"]


def _beit(layer: nn.Module) -> LayerAdapter | None:
    attn = getattr(layer, "attn", None)
    if (callable(getattr(type(attn), "_get_rel_pos_bias", None)) and hasattr(attn, "relative_position_bias_table")
            and "shared_rel_pos_bias" in _params(layer.forward)):
        return _BeitBias(attn)
    return None


# -- open_clip's own attention: nn.MultiheadAttention's mask convention ---------------------------


def _open_clip_custom(layer: nn.Module) -> LayerAdapter | None:
    """open_clip's ``CustomResidualAttentionBlock``: its ``Attention`` (an ``in_proj_weight`` like
    ``nn.MultiheadAttention``'s) takes a 2-D ``[L,L]`` or 3-D ``[B*heads,L,L]`` mask, the module's convention."""
    from .library_adapters import _MultiheadBlock

    attn = getattr(layer, "attn", None)
    heads = getattr(attn, "num_heads", None)
    if (isinstance(attn, nn.Module) and not isinstance(attn, nn.MultiheadAttention)  # that one: _multihead
            and isinstance(getattr(attn, "in_proj_weight", None), nn.Parameter)
            and isinstance(heads, int) and "attn_mask" in _params(attn.forward)
            and "attn_mask" in _params(layer.forward)):
        return _MultiheadBlock(heads, ["attn_mask"])
    return None


def find_vision_adapter(layer: nn.Module) -> LayerAdapter | None:
    """The adapter a timm EVA or BEiT block or an open_clip custom block needs, or ``None``."""
    return _eva(layer) or _beit(layer) or _open_clip_custom(layer)
