"""Adapters and refusals for layers of model libraries beyond transformers.

Recognised by structure (attributes and forward parameters), never by importing the library:

========================  ===============================================================
litgpt ``Block``          ``cos``/``sin`` ``[1|B,S,d]`` are gathered per sample; a
                          sliding-window layer builds its window from ``range(T)`` of
                          the tokens it sees, so the window is folded into a full-length
                          mask at the original positions, gathered, and the layer's own
                          window switched off during the call.
OLMo-core block           the rotary table is computed inside the attention for positions
                          ``0..n-1`` of what it receives: the table for all ``S``
                          positions is passed as ``pos_sin``/``pos_cos`` (a forward
                          argument of OLMo-core's attention) and gathered at the kept
                          positions. The table has no batch axis, so all samples of a
                          batch keep the same positions. Sliding windows and other rotary
                          kinds are refused.
Megatron-core layer       ``forward(*args, **kwargs)`` hands everything to
                          ``_forward_attention``, whose signature names the arguments;
                          sequence-first ``[s,b,h]``; ``rotary_pos_emb [s,1,1,d]`` is
                          gathered per sample to ``[r,b,1,d]`` (the layer broadcasts it);
                          ``packed_seq_params`` is refused at the call, sequence and
                          context parallelism at conversion.
Swin / ConvNeXt blocks    refused: shifted windows need the whole grid; convolutions are
                          refused by the token-mixer rule (:mod:`.mixers`).
``nn.MultiheadAttention`` a 2-D ``attn_mask``/``src_mask``/``tgt_mask`` is ``[L,L]``
blocks (torch, open_clip) (queries x keys, shared by the batch), not a ``[B,S]`` padding
                          mask: it is gathered per sample and laid out as
                          ``[B*heads, r, r]``, the 3-D form the module takes.
torchtitan blocks         ``positions`` gathered (``0..S-1`` when ``None``), the flex
                          ``BlockMask`` rebuilt; varlen attention refused
                          (:mod:`.library_torchtitan`).
========================  ===============================================================
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import LayerAdapter, _CustomAlignment
from .adapters import forward_params as _params
from .alignment import Alignment, gather_axes, parse_alignment
from .errors import InputError
from .library_torchtitan import torchtitan_adapter, torchtitan_refusal

__all__ = ["find_library_adapter", "library_refusal"]


# -- litgpt -----------------------------------------------------------------------------------


class _LitGPT(LayerAdapter):
    def __init__(self, attn: Any) -> None:
        self.attn = attn
        self.window = int(attn.config.sliding_window_size) if attn.apply_sliding_window_attention else None
        self.has_context = self.window is not None

    def alignments(self) -> dict[str, Alignment]:
        rope = parse_alignment("b s d", "cos")
        return {"cos": rope, "sin": rope}

    def prepare(self, call: Any, hidden: torch.Tensor, seq_len: int) -> None:
        if call.get("input_pos") is not None:
            raise InputError("litgpt's Block was called with input_pos (a key/value cache); random-LTD drops tokens "
                             "only in training forwards without a cache.")
        if self.window is None:
            return
        if call.get("mask") is not None:
            raise InputError("a litgpt sliding-window layer got a mask, which its own code replaces by the window; "
                             "random-LTD cannot tell which one the model means. Train without a mask.")
        pos = torch.arange(seq_len, device=hidden.device)
        dist = pos[:, None] - pos[None, :]  # query - key at the original positions
        allowed = (dist >= 0) & (dist < self.window)
        low = torch.tensor(float("-inf"), dtype=hidden.dtype, device=hidden.device)
        call.set("mask", torch.where(allowed, torch.zeros((), dtype=hidden.dtype), low)[None, None])

    @contextlib.contextmanager
    def around(self, idx: torch.Tensor, seq_len: int) -> Iterator[None]:
        if self.window is None:
            yield
            return
        self.attn.apply_sliding_window_attention = False  # the window is in the gathered mask
        try:
            yield
        finally:
            self.attn.apply_sliding_window_attention = True


def _litgpt(layer: nn.Module) -> LayerAdapter | None:
    attn = getattr(layer, "attn", None)
    params = _params(layer.forward)
    if attn is not None and hasattr(attn, "apply_sliding_window_attention") and {"cos", "sin"} <= params.keys():
        return _LitGPT(attn)
    return None


# -- OLMo-core ----------------------------------------------------------------------------------


class _OlmoRope(LayerAdapter):
    shared_indices = True  # pos_sin/pos_cos [S, d] have no batch axis

    def __init__(self, rope: Any) -> None:
        self.rope = rope

    def alignments(self) -> dict[str, Alignment]:
        table = parse_alignment("s d", "pos_sin")
        return {"pos_sin": table, "pos_cos": table}

    def prepare(self, call: Any, hidden: torch.Tensor, seq_len: int) -> None:
        if call.get("pos_sin") is None and call.get("pos_cos") is None:
            sin, cos = self.rope._get_rotary_embedding(seq_len, hidden.device)  # positions 0..S-1
            call.set("pos_sin", sin)
            call.set("pos_cos", cos)


def _olmo_attention(layer: nn.Module) -> Any:
    attn = getattr(layer, "attention", None)  # a module (OLMo-core), not a method (open_clip's blocks)
    if not isinstance(attn, nn.Module) or "pos_sin" not in _params(attn.forward) or not hasattr(attn, "rope"):
        return None
    return attn


def _olmo_core(layer: nn.Module) -> LayerAdapter | None:
    attn = _olmo_attention(layer)
    if attn is None or attn.rope is None or _olmo_refusal(layer) is not None:
        return None
    return _OlmoRope(attn.rope)


def _olmo_refusal(layer: nn.Module) -> str | None:
    attn = _olmo_attention(layer)
    if attn is None:
        return None
    if getattr(attn, "window_size", None) not in (None, (-1, -1), -1):
        return ("its sliding-window attention (OLMo-core window_size) counts the tokens it sees, not their "
                "positions; train the sliding-window layers without random-LTD")
    rope = attn.rope
    if rope is not None and not ({"pos_sin", "pos_cos"} <= _params(rope.forward).keys()
                                 and hasattr(rope, "_get_rotary_embedding")):
        return (f"its rotary embedding ({type(rope).__name__}) computes positions from the length it sees and "
                "takes no pos_sin/pos_cos table; use OLMo-core's default RoPE (RotaryEmbedding)")
    return None


# -- Megatron-core ------------------------------------------------------------------------------


class _Megatron(LayerAdapter):
    batch_first = False  # [s, b, h]

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def signature(self) -> inspect.Signature:
        return inspect.signature(self.layer._forward_attention)

    def alignments(self) -> dict[str, Alignment]:
        return {"rotary_pos_emb": parse_alignment("s b _ d", "rotary_pos_emb"),  # [s,1,1,d] -> [r,B,1,d]
                "context": parse_alignment("none", "context"),
                "padding_mask": parse_alignment("b s", "padding_mask")}


def _megatron(layer: nn.Module) -> LayerAdapter | None:
    fwd = _params(layer.forward)
    variadic = bool(fwd) and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in fwd.values())
    if variadic and "hidden_states" in _params(getattr(layer, "_forward_attention", None)):
        return _Megatron(layer)
    return None


def _megatron_refusal(layer: nn.Module) -> str | None:
    if _megatron(layer) is None:
        return None
    cfg = getattr(layer, "config", None)
    if getattr(cfg, "sequence_parallel", False):
        return ("Megatron-core sequence parallelism splits the sequence axis of its hidden states across the "
                "tensor-parallel ranks, so no rank holds a whole sample to draw tokens from; train with "
                "sequence_parallel=False")
    if int(getattr(cfg, "context_parallel_size", 1) or 1) > 1:
        return ("Megatron-core context parallelism splits the sequence across ranks; train with "
                "context_parallel_size=1")
    return None


# -- nn.MultiheadAttention blocks ---------------------------------------------------------------

MHA_SELF_MASKS = ("attn_mask", "src_mask", "tgt_mask")


class _MultiheadBlock(LayerAdapter):
    def __init__(self, heads: int, names: list[str]) -> None:
        self.heads, self.names = heads, names

    def alignments(self) -> dict[str, Alignment]:
        table: dict[str, Alignment] = {
            n: _CustomAlignment("nn.MultiheadAttention [L,L] | [B*heads,L,L]", self._gather) for n in self.names}
        table["memory_mask"] = _CustomAlignment("nn.MultiheadAttention [L,Sm] | [B*heads,L,Sm]", self._gather_rows)
        return table

    def _gather(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        return self._layout(value, idx, seq_len, name, ("q", "k"))

    def _gather_rows(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        return self._layout(value, idx, seq_len, name, ("q", "_"))

    def _layout(self, value: Any, idx: torch.Tensor, seq_len: int, name: str, axes: tuple[str, str]) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"cannot gather {name!r} of shape {shape}: nn.MultiheadAttention takes a 2-D [L,S] "
                             "or 3-D [B*heads,L,S] attention mask.")
        if value.dim() == 3:  # [B*heads, L, S], batch-major as nn.MultiheadAttention reads it
            return gather_axes(value, ("b", *axes), idx, seq_len, name)
        kept = gather_axes(value[None], ("b", *axes), idx, seq_len, name)  # [B, r, r|Sm]
        return kept.repeat_interleave(self.heads, dim=0)  # [B*heads, ...]: per-sample kept tokens


def _multihead(layer: nn.Module) -> LayerAdapter | None:
    mha = [m for m in layer.children() if isinstance(m, nn.MultiheadAttention)]
    if not mha:
        return None
    names = [n for n in MHA_SELF_MASKS if n in _params(layer.forward)]
    return _MultiheadBlock(int(mha[0].num_heads), names) if names else None


_FINDERS = (_litgpt, _olmo_core, _megatron, _multihead, torchtitan_adapter)


def find_library_adapter(layer: nn.Module) -> LayerAdapter | None:
    """The adapter a library layer needs (litgpt, OLMo-core, Megatron-core, nn.MultiheadAttention, torchtitan), or
    ``None``."""
    for finder in _FINDERS:
        adapter = finder(layer)
        if adapter is not None:
            return adapter
    return None


def library_refusal(layer: nn.Module) -> str | None:
    """Why a library layer cannot drop tokens exactly, or ``None``."""
    return _grid_refusal(layer) or _olmo_refusal(layer) or _megatron_refusal(layer) or torchtitan_refusal(layer)


def _grid_refusal(layer: nn.Module) -> str | None:
    """Swin-style shifted windows (timm's ``SwinTransformerBlock``); convolutions: :mod:`.mixers`."""
    owners = (layer, getattr(layer, "attn", None))
    if any(hasattr(o, "window_size") and hasattr(o, "shift_size") for o in owners if o is not None):
        return ("it partitions its tokens into (shifted) windows of the image grid (Swin-style window_size and "
                "shift_size); a subset of the tokens has no grid")
    return None
