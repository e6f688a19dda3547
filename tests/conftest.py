"""Shared fixtures: tiny layers and tiny Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class RecordingSampler:
    """Wraps a layer's sampler and keeps every index tensor it returns."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        idx = self.inner(*args, **kwargs)
        self.calls.append(idx)
        return idx


class FixedSampler:
    """Always returns the same indices (for gradcheck and exact references)."""

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.idx


class MaskedAttentionLayer(nn.Module):
    """A small pre-norm attention + MLP block with an additive or bool mask and position ids.

    forward(hidden_states [B,S,H], attention_mask=None [B,1,S,S]/[B,1,1,S]/[B,S] , position_ids=None [B,S])
    """

    def __init__(self, hidden: int = 16, heads: int = 2, max_pos: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.pos = nn.Embedding(max_pos, hidden)
        self.attention_type = "full_attention"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        past_key_value: Any = None,
    ) -> torch.Tensor:
        self.last_call = {"use_cache": use_cache, "past_key_value": past_key_value}
        x = hidden_states
        if position_ids is not None:
            x = x + self.pos(position_ids)
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, S, hs)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(h // self.heads)
        if attention_mask is not None:
            m = attention_mask
            if m.dim() == 2:  # [B,S] key padding, 1 = keep
                m = m[:, None, None, :]
            if m.dtype == torch.bool:
                att = att.masked_fill(~m, torch.finfo(att.dtype).min)
            elif m.dtype.is_floating_point:
                att = att + m
            else:
                att = att.masked_fill(m == 0, torch.finfo(att.dtype).min)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
        x = hidden_states + self.proj(y)
        return x + self.mlp(x)


class TupleLayer(nn.Module):
    """Returns (hidden, attention-like extra) like older Hugging Face layers."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y = x + torch.tanh(self.lin(x))
        return y, y.sum(-1)


def tiny_hf_config(name: str) -> Any:
    """A 4-layer, hidden-32 config of a Hugging Face architecture (no downloads)."""
    import transformers as T

    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    if name == "bert":
        return T.BertConfig(**common, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    if name == "gpt2":
        return T.GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=2, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if name == "llama":
        return T.LlamaConfig(**common, num_key_value_heads=1, max_position_embeddings=64)
    if name == "qwen2":
        return T.Qwen2Config(**common, num_key_value_heads=1, max_position_embeddings=64)
    if name == "vit":
        return T.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=4, num_channels=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    raise KeyError(name)


def tiny_hf_model(name: str, attn: str = "sdpa", seed: int = 0) -> Any:
    import transformers as T

    torch.manual_seed(seed)
    cfg = tiny_hf_config(name)
    cls = {
        "bert": T.BertForMaskedLM,
        "gpt2": T.GPT2LMHeadModel,
        "llama": T.LlamaForCausalLM,
        "qwen2": T.Qwen2ForCausalLM,
        "vit": T.ViTForImageClassification,
    }[name]
    model = cls(cfg)
    model.config._attn_implementation = attn
    return model
