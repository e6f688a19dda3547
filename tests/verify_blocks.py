"""Tiny user-written blocks for the verifier's tests: exact ones, and the two silent patterns.

* :class:`RopeBlock` with ``rope_from_length=True`` is the nanoGPT-style block that computes its
  rotary angles for ``arange(x.shape[1])`` itself (OLMo-core's ``TransformerBlock`` does the same);
* :class:`RopeBlock` with ``window`` builds its sliding-window mask with ``range(T)`` of what it
  receives (litgpt's sliding-window attention);
* with ``position_ids`` passed by the model, the same block is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

H, HEADS = 16, 2


def rotate(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``t [B, h, T, D]`` at positions ``pos [B, T]`` (float)."""
    d = t.shape[-1] // 2
    freq = 1.0 / (100.0 ** (torch.arange(d, dtype=torch.float32) / d))
    ang = (pos[:, None, :, None].float() * freq).to(t.dtype)  # (B, 1, T, d)
    a, b = t[..., :d], t[..., d:]
    return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)


class RopeBlock(nn.Module):
    """Pre-norm causal attention + MLP with rotary positions.

    forward(x [B,T,H], position_ids [B,T] | None, attention_mask [B,1,T,T] additive | None)
    """

    def __init__(self, *, kind: str = "sdpa", rope_from_length: bool = False, window: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.kind, self.rope_from_length, self.window = kind, rope_from_length, window
        self.norm1, self.norm2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.qkv, self.out = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, -1).transpose(1, 2) for z in self.qkv(self.norm1(x)).split(H, -1))
        if self.rope_from_length or position_ids is None:
            position_ids = torch.arange(t, device=x.device)[None].expand(b, t)  # the silent pattern
        q, k = rotate(q, position_ids), rotate(k, position_ids)
        i = torch.arange(t, device=x.device)
        ok = i[:, None] >= i[None, :]
        if self.window is not None:
            ok = ok & (i[:, None] - i[None, :] < self.window)  # a window over range(T) of what it receives
        bias = torch.zeros(t, t, dtype=x.dtype, device=x.device).masked_fill(~ok, torch.finfo(x.dtype).min)
        if attention_mask is not None:
            bias = bias + attention_mask
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                               dropout_p=0.1 if self.training else 0.0)
        else:
            att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
            y = self.drop(att.softmax(-1)) @ v
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(b, t, H)))
        return x + self.drop(self.mlp(self.norm2(x)))


class MlpBlock(nn.Module):
    """Token-wise only: no attention, no mask (the verifier cannot restrict anything)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class ExpAttentionBlock(nn.Module):
    """Attention normalised by hand (exp / sum, no softmax kernel) with an additive mask argument:
    only the mask-argument route can restrict its keys."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).split(H, -1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(H)
        if attention_mask is not None:
            scores = scores + attention_mask[:, 0]
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return x + self.out((e / e.sum(-1, keepdim=True)) @ v)


class TinyLM(nn.Module):
    """Embedding, a stack of blocks, a head: ``model(ids, position_ids=None, mask=None)`` -> logits."""

    def __init__(self, make: Any, layers: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, H)
        self.layers = nn.ModuleList(make() for _ in range(layers))
        self.head = nn.Linear(H, vocab)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            if isinstance(layer, MlpBlock) or getattr(layer, "random_ltd_layer", None).__class__ is MlpBlock:
                x = layer(x)
            elif isinstance(layer, ExpAttentionBlock) or isinstance(getattr(layer, "random_ltd_layer", None),
                                                                    ExpAttentionBlock):
                x = layer(x, attention_mask=attention_mask)
            else:
                x = layer(x, position_ids, attention_mask)
        return self.head(x)


def lm_loss(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    logits = model(ids, **kwargs)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class LitBlock(nn.Module):
    """litgpt-shaped: the model hands every block ``cos``/``sin`` ``[1, T, D]`` (declared with ``seq_args``);
    the block builds its sliding-window mask with ``range(T)`` of the tokens it receives."""

    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.qkv, self.out, self.window = nn.Linear(H, 3 * H), nn.Linear(H, H), window

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, -1).transpose(1, 2) for z in self.qkv(x).split(H, -1))
        d = q.shape[-1] // 2

        def rope(z: torch.Tensor) -> torch.Tensor:
            c, s = cos[:, None, :, :d], sin[:, None, :, :d]
            return torch.cat([z[..., :d] * c - z[..., d:] * s, z[..., :d] * s + z[..., d:] * c], -1)

        i = torch.arange(t, device=x.device)
        ok = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < self.window)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=ok)
        return x + self.out(y.transpose(1, 2).reshape(b, t, H))


class PaddingMaskBlock(nn.Module):
    """Attention normalised by hand (no kernel the verifier sees) that takes a ``[B,S]`` 1/0 padding mask,
    ``None`` when unpadded (as flash-attention layers do); ``rope_from_length`` adds the silent pattern."""

    def __init__(self, rope_from_length: bool = False) -> None:
        super().__init__()
        self.qkv, self.out, self.rope_from_length = nn.Linear(H, 3 * H), nn.Linear(H, H), rope_from_length

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, 1, H).transpose(1, 2) for z in self.qkv(x).split(H, -1))
        if self.rope_from_length:
            pos = torch.arange(t)[None].expand(b, t)
            q, k = rotate(q, pos), rotate(k, pos)
        scores = (q @ k.transpose(-1, -2))[:, 0] / math.sqrt(H)  # (B, T, T)
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9)
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return x + self.out((e / e.sum(-1, keepdim=True)) @ v[:, 0])
