"""Helpers for checkpoint tests: a tiny GPT-2, key wrapping, bitwise comparison (imported by tests and conftest)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WRAPPED = ("transformer.h.0", "transformer.h.1")
"""Layers that carry the random-LTD wrapper in the 'converted' checkpoints."""


class Wrapper(nn.Module):
    """Stands in for RandomLayerTokenDrop: keeps the layer under ``random_ltd_layer``, like the real wrapper."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.random_ltd_layer = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.random_ltd_layer(*args, **kwargs)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def wrap_key(key: str) -> str:
    """``transformer.h.1.attn.w`` -> ``transformer.h.1.random_ltd_layer.attn.w`` for the WRAPPED layers."""
    for prefix in WRAPPED:
        if key.startswith(prefix + "."):
            return f"{prefix}.random_ltd_layer.{key[len(prefix) + 1 :]}"
    return key


def wrap_keys(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    return OrderedDict((wrap_key(k), v) for k, v in state.items())


def assert_bitwise_equal(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (NaN-safe)."""
    assert list(got) == list(want) or set(got) == set(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
        b = expected.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name


def load_strict(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` strictly into a fresh, unconverted model and check every tensor against ``reference``."""
    model = tiny_gpt2(seed=1)
    result = model.load_state_dict(dict(state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_bitwise_equal(model.state_dict(), reference)


def compare_snapshots(now: dict[str, bytes], before: dict[str, bytes]) -> None:
    assert now.keys() == before.keys()
    for key in before:
        assert now[key] == before[key], key


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a failed write could have left (our temp names start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


@dataclass
class FragmentAddress:
    """Stands in for DeepSpeed's ``fragment_address`` (a class outside torch's weights_only allowlist)."""

    numel: int
    start: int
