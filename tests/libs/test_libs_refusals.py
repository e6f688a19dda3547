"""Refusals at conversion, the escape hatches, and mutation checks of the library sweep's reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from random_ltd_cli import ConversionError, InputError, RandomLayerTokenDrop, convert_to_random_ltd, random_ltd_layers

from .reference import result
from .test_libs_sweep import _need
from .zoo import BY_NAME, R, megatron_batches, megatron_gpt, megatron_process_group

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -- grid blocks (timm's Swin and ConvNeXt are built like these; timm itself does not install here) ------------


class ConvBlock(nn.Module):
    """A ConvNeXt-style block on [B, S, C] tokens: a depthwise convolution over the sequence, then an MLP."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.dw(x.transpose(1, 2)).transpose(1, 2))


class WindowBlock(nn.Module):
    """A Swin-style block: attention inside shifted windows of the token grid (window_size, shift_size)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.window_size, self.shift_size = 4, 2
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.roll(x, self.shift_size, 1))


class Net(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): block() for i in range(4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks.values():
            x = b(x)
        return x


@pytest.mark.parametrize(("block", "text"), [
    (ConvBlock, "a convolution over neighbouring tokens (nn.Conv1d, kernel 3)"),
    (WindowBlock, "(shifted) windows of the image grid (Swin-style window_size and shift_size)"),
])
def test_grid_blocks_are_refused_at_conversion_and_the_model_is_untouched(block: type[nn.Module], text: str) -> None:
    model = Net(block)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match=r"cannot drop tokens in \w+ exactly") as info:
        convert_to_random_ltd(model, reserved_length=4)
    assert text in str(info.value) and "The model is unchanged" in str(info.value)
    assert not random_ltd_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inspect_lists_the_refusal_for_a_convolutional_stack(tmp_path: Path) -> None:
    (tmp_path / "gridnet.py").write_text(
        "from tests.libs.test_libs_refusals import ConvBlock, Net\n\ndef build():\n    return Net(ConvBlock)\n")
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cli = "from random_ltd_cli.cli import main; main()"
    run = subprocess.run([sys.executable, "-c", cli, "inspect", "gridnet:build", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "a convolution over neighbouring tokens (nn.Conv1d, kernel 3)" in json.loads(run.stdout)["error"]
    assert run.stderr.startswith("Error: random-LTD cannot drop tokens in ConvBlock exactly")


def test_a_kwargs_forward_takes_hidden_name() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.lin(kwargs["hidden_states"])

    # an MLP-only toy layer has no attention to restrict: the built-in verifier would refuse it as unverifiable
    wrapper = RandomLayerTokenDrop(Layer(), reserved_length=3, hidden_name="hidden_states", verify="off").train()
    x = torch.randn(2, 6, 8)
    out = wrapper(hidden_states=x)
    idx = wrapper.last_indices
    assert idx is not None and idx.shape == (2, 3)
    kept = torch.zeros(2, 6, dtype=torch.bool).scatter(1, idx, True)
    torch.testing.assert_close(out[kept], wrapper.random_ltd_layer.lin(x)[kept])
    assert torch.equal(out[~kept], x[~kept])


# -- OLMo-core, litgpt: the sweep's reference catches the silent errors the adapters fix -------------------------


def test_olmo_core_sliding_window_layers_are_refused() -> None:
    _need("olmo-core-llama")
    from olmo_core.nn.attention import SlidingWindowAttentionConfig

    from .zoo import _olmo

    model = _olmo(sliding_window=SlidingWindowAttentionConfig(pattern=[4, -1]))
    with pytest.raises(ConversionError, match=r"sliding-window attention \(OLMo-core window_size\)") as info:
        convert_to_random_ltd(model, reserved_length=R)
    assert "e.g. layers=[2]" in str(info.value)
    assert not random_ltd_layers(model)


@pytest.mark.parametrize(("name", "target"), [
    ("olmo-core-llama", "_OlmoRope"),  # without it: rotary for positions 0..r-1 of the kept tokens
    ("litgpt-mistral-window", "_LitGPT"),  # without it: the window counts kept tokens (range(T))
])
def test_the_reference_catches_the_silent_error_without_the_adapter(
        name: str, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _need(name)
    from random_ltd_cli import library_adapters

    cls = getattr(library_adapters, target)
    monkeypatch.setattr(cls, "prepare", lambda self, call, hidden, seq_len: None)
    if target == "_LitGPT":
        monkeypatch.setattr(cls, "has_context", False, raising=False)
        monkeypatch.setattr(cls, "__init__", lambda self, attn: setattr(self, "window", None))
    result.cache_clear()
    try:
        res = result(name)
    finally:
        result.cache_clear()
    assert res.status == "FAIL" and "differ from the reference" in res.detail, res.detail


def test_the_reference_catches_a_block_mask_rebuilt_in_kept_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BlockMask whose mask_mod reads kept-token numbers instead of original positions (the window would
    count kept tokens) differs from the reference."""
    from torch.nn.attention.flex_attention import create_block_mask

    from random_ltd_cli import tokens

    def naive(mask: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        return create_block_mask(mask.mask_mod, idx.shape[0], None, idx.shape[1], idx.shape[1], device=idx.device)

    monkeypatch.setattr(tokens, "_rebuild_block_mask", naive)
    result.cache_clear()
    try:
        res = result("torch-flex")
    finally:
        result.cache_clear()
    assert res.status == "FAIL" and "differ from the reference" in res.detail, res.detail


# -- Megatron-core -------------------------------------------------------------------------------------------


def test_megatron_escape_hatch_hidden_name_and_batch_first() -> None:
    _need("megatron-gpt")
    with megatron_process_group():
        model = convert_to_random_ltd(megatron_gpt(), reserved_length=R, hidden_name="hidden_states",
                                      batch_first=False).train()
        torch.manual_seed(0)
        out = model(**megatron_batches()[0])
        assert out.shape[:2] == (2, 12)
        assert all(w.last_indices is not None and w.last_indices.shape == (2, R) for _, w in random_ltd_layers(model))


def test_megatron_packed_sequences_are_refused_at_the_call() -> None:
    _need("megatron-gpt")
    from megatron.core.packed_seq_params import PackedSeqParams

    with megatron_process_group():
        model = convert_to_random_ltd(megatron_gpt(), reserved_length=R).train()
        wrapper = random_ltd_layers(model)[0][1]
        hidden = torch.randn(12, 2, 32)
        with pytest.raises(InputError, match="'packed_seq_params' .packed flash-attention batch."):
            wrapper(hidden_states=hidden, attention_mask=megatron_batches()[1]["attention_mask"],
                    packed_seq_params=PackedSeqParams(qkv_format="thd"))


def test_megatron_sequence_parallelism_is_refused_at_conversion() -> None:
    """Sequence parallelism cannot be built on CPU (torch LayerNorm refuses it), so the flag is set on the
    layers' shared config of a built model: the refusal reads it there."""
    _need("megatron-gpt")
    with megatron_process_group():
        model = megatron_gpt()
        model.config.sequence_parallel = True
        with pytest.raises(ConversionError, match="sequence parallelism splits the sequence axis") as info:
            convert_to_random_ltd(model, reserved_length=R)
        assert "The model is unchanged" in str(info.value) and not random_ltd_layers(model)


def test_the_library_cases_cover_the_issue_targets() -> None:
    assert {"litgpt-llama", "litgpt-pythia", "litgpt-mistral-window", "olmo-core-llama", "megatron-gpt"} <= set(BY_NAME)
