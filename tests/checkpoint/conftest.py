"""Fixtures for checkpoint tests: the tiny GPT-2, its plain and random-LTD-wrapped state dicts, snapshots."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from .ckpt_helpers import WRAPPED, Wrapper, compare_snapshots, tiny_gpt2


@pytest.fixture(scope="session")
def model() -> nn.Module:
    return tiny_gpt2()


@pytest.fixture(scope="session")
def plain_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The unconverted model's state dict (lm_head.weight is tied to transformer.wte.weight)."""
    return model.state_dict()


@pytest.fixture(scope="session")
def wrapped_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The state dict of the same model with WRAPPED layers inside a Wrapper (with its ``_metadata``)."""
    wrapped = copy.deepcopy(model)
    for prefix in WRAPPED:
        index = int(prefix.rsplit(".", 1)[1])
        wrapped.transformer.h[index] = Wrapper(wrapped.transformer.h[index])
    state = wrapped.state_dict()
    assert any(".random_ltd_layer." in k for k in state)
    return state


@pytest.fixture
def untouched(tmp_path: Path) -> Callable[[Path], Callable[[], None]]:
    """``check = untouched(path)`` records a file's or folder's bytes; ``check()`` asserts nothing changed."""

    def snapshot(path: Path) -> dict[str, bytes]:
        if path.is_file():
            return {"": path.read_bytes()}
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

    def record(path: Path) -> Callable[[], None]:
        before = snapshot(path)
        return lambda: compare_snapshots(snapshot(path), before)

    return record


@pytest.fixture
def cwd(tmp_path: Path) -> Iterator[Path]:
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)
