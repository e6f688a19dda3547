"""The sweep's reference can fail: it catches wrong positions, a leaking pad and changed dropped tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from random_ltd_cli import random_ltd_layers

from .reference import check_exact, convert
from .zoo import BY_NAME, S, build


def _converted(name: str) -> nn.Module:
    torch.set_num_threads(1)
    return convert(build(name, "eager"), BY_NAME[name])


def test_consecutive_positions_are_caught() -> None:
    # the kept tokens get the rotary angles of positions 0..r-1 instead of their own
    model = _converted("llama")
    full: dict[str, Any] = {}
    for _, wrapper in random_ltd_layers(model):
        def keep_full(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            full["pe"] = kwargs["position_embeddings"]

        def consecutive(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            r = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
            cos, sin = full["pe"]
            return args, dict(kwargs, position_embeddings=(cos[:, :r].expand(2, -1, -1), sin[:, :r].expand(2, -1, -1)))

        wrapper.register_forward_pre_hook(keep_full, with_kwargs=True)
        wrapper.random_ltd_layer.register_forward_pre_hook(consecutive, with_kwargs=True)
    with pytest.raises(AssertionError, match="kept tokens differ from the reference"):
        check_exact(BY_NAME["llama"], model)


def test_a_pad_leaking_into_kept_tokens_is_caught() -> None:
    model = _converted("bert")  # right-padded second sample

    def unmasked(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args[0].shape[1] == S:  # the reference's call: leave it alone
            return None
        return args[:1], {k: v for k, v in kwargs.items() if k != "attention_mask"}

    for _, wrapper in random_ltd_layers(model):
        wrapper.random_ltd_layer.register_forward_pre_hook(unmasked, with_kwargs=True)
    with pytest.raises(AssertionError, match="kept tokens differ from the reference"):
        check_exact(BY_NAME["bert"], model)


def test_a_changed_dropped_token_is_caught() -> None:
    model = _converted("gpt2")
    for _, wrapper in random_ltd_layers(model):
        wrapper.register_forward_hook(lambda mod, args, out: (out[0] + 1e-3, *out[1:]) if isinstance(out, tuple)
                                      else out + 1e-3)
    with pytest.raises(AssertionError, match="dropped tokens changed"):
        check_exact(BY_NAME["gpt2"], model)
