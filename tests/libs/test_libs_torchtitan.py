"""torchtitan: the built-in verifier agrees with the sweep, both catch the silent errors the adapter prevents,
the CLI reaches a torchtitan model through a file path, and (in every environment) a torchtitan-shaped toy
block shows the adapter's rules without torchtitan installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from random_ltd_cli import ConversionError, convert_to_random_ltd, random_ltd_layers, verify_random_ltd

from .reference import restricted_sdpa, result
from .test_libs_sweep import _need
from .zoo import BY_NAME, R

ROOT = Path(__file__).resolve().parents[2]
TITAN = "torchtitan-llama3"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _converted(**kwargs: Any) -> nn.Module:
    return convert_to_random_ltd(BY_NAME[TITAN].build(), reserved_length=R, **kwargs).train()


@pytest.mark.tv
def test_the_builtin_verifier_finds_every_layer_exact_on_every_batch() -> None:
    _need(TITAN)
    model = _converted()
    for batch in BY_NAME[TITAN].batches():
        verdicts = verify_random_ltd(model, **batch)
        assert [v.status for v in verdicts] == ["exact", "exact"], [v.message() for v in verdicts]
        assert {v.method for v in verdicts} == {"flex"}


@pytest.mark.tv
def test_training_forwards_pass_the_default_verifier() -> None:
    """verify="first" (the default) checks each argument signature once and raises on a mismatch."""
    _need(TITAN)
    model = _converted()
    with torch.no_grad():  # flex attention has no CPU backward
        for batch in BY_NAME[TITAN].batches():
            model(**batch)
    for _, wrapper in random_ltd_layers(model):
        assert wrapper.last_indices is not None and wrapper.last_indices.shape == (2, R)
        assert len(wrapper._verified) == 2  # positions as a tensor, and None


def _mutated(monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    from random_ltd_cli import library_torchtitan, tokens

    if which == "positions":  # the blocks get positions=None: the RoPE reads 0..r-1 of the kept tokens
        monkeypatch.setattr(library_torchtitan._Torchtitan, "prepare", lambda self, call, hidden, seq_len: None)
    else:  # the BlockMask asks about kept-token numbers: document boundaries land elsewhere

        def naive(mask: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
            return create_block_mask(mask.mask_mod, idx.shape[0], None, idx.shape[1], idx.shape[1],
                                     device=idx.device)

        monkeypatch.setattr(tokens, "_rebuild_block_mask", naive)


@pytest.mark.tv
@pytest.mark.parametrize(("which", "batch"), [("positions", 2), ("block-mask", 0)])
def test_both_references_catch_the_silent_error_without_the_adapter(
        which: str, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _need(TITAN)
    _mutated(monkeypatch, which)
    result.cache_clear()
    try:
        res = result(TITAN)
    finally:
        result.cache_clear()
    assert res.status == "FAIL" and "differ from the reference" in res.detail, res.detail
    verdicts = verify_random_ltd(_converted(verify="off"), **BY_NAME[TITAN].batches()[batch])
    assert "wrong" in {v.status for v in verdicts}, [v.message() for v in verdicts]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "random_ltd_cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.tv
def test_cli_checks_a_torchtitan_model_and_refuses_varlen() -> None:
    _need(TITAN)
    target = "tests/libs/zoo_titan.py:TitanStep"
    done = _cli("check", target, "--vocab-size", "97", "--seq-len", "12", "--r", "6", "--json")
    assert done.returncode == 0, done.stderr
    layers = json.loads(done.stdout)["layers"]
    assert [(v["layer_class"], v["status"], v["method"]) for v in layers] == [
        ("Llama3TransformerBlock", "exact", "flex")] * 2
    refused = _cli("inspect", target, "--init", '{"attn_backend": "varlen"}')
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("Error: random-LTD cannot drop tokens in Llama3TransformerBlock exactly: its "
                                     "varlen attention (torchtitan VarlenAttention)"), refused.stderr
    assert "attn_backend='flex'" in refused.stderr


# -- a torchtitan-shaped block without torchtitan (every environment) -------------------------------------------


class RopeBlock(nn.Module):
    """``forward(x, attention_masks, positions)`` as torchtitan 0.3's blocks: causal SDPA (no masks), rotary
    angles at ``positions``, or at ``0..L-1`` of the ``L`` tokens it receives when they are ``None``."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def attend(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:  # angles [1|B, L, d/2]
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = angles[:, None].cos(), angles[:, None].sin()

        def rope(t: torch.Tensor) -> torch.Tensor:
            a, c = t.chunk(2, dim=-1)
            return torch.cat([a * cos - c * sin, a * sin + c * cos], dim=-1)

        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(b, s, d))

    def forward(self, x: torch.Tensor, attention_masks: Any, positions: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(x.shape[1])[None] if positions is None else positions
        return self.attend(x, pos[..., None].float() / 100.0 ** (torch.arange(4) / 4))


class TableBlock(RopeBlock):
    """torchtitan 0.2's form, ``forward(x, freqs_cis, attention_masks, positions)``: the whole angle table
    ``[max_seq_len, d/2]``, sliced to ``[:L]`` without positions, indexed by them otherwise."""

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, attention_masks: Any,  # type: ignore[override]
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, freqs_cis[None, : x.shape[1]] if positions is None else freqs_cis[positions])


class VarlenAttention(nn.Module):  # the name torchtitan's varlen inner attention has
    pass


class Toy(nn.Module):
    def __init__(self, table: bool = False, varlen: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = table
        self.layers = nn.ModuleDict({str(i): (TableBlock if table else RopeBlock)() for i in range(4)})
        if varlen:
            for block in self.layers.values():
                block.inner_attention = VarlenAttention()

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        freqs = torch.arange(x.shape[1])[:, None].float() / 100.0 ** (torch.arange(4) / 4)  # max_seq_len = S
        for layer in self.layers.values():
            x = layer(x, freqs, None, positions) if self.table else layer(x, None, positions)
        return x


PACKED = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])


@pytest.mark.parametrize("table", [False, True], ids=["positions", "freqs_cis"])
@pytest.mark.parametrize("positions", [None, PACKED], ids=["none", "packed"])
def test_a_torchtitan_shaped_block_keeps_its_original_positions(table: bool, positions: torch.Tensor | None) -> None:
    model = convert_to_random_ltd(Toy(table), reserved_length=4).train()  # verify="first": also the verifier
    wrapper = random_ltd_layers(model)[0][1]
    assert wrapper.seq_args["positions"] == "b s"
    x = torch.randn(2, 10, 16)
    call = (x, torch.arange(10)[:, None].float() / 100.0 ** (torch.arange(4) / 4)) if table else (x,)
    with torch.no_grad():
        out = wrapper(*call, None, positions)
        idx = wrapper.last_indices
        assert idx is not None
        kept = torch.zeros(2, 10, dtype=torch.bool).scatter(1, idx, True)
        with restricted_sdpa(kept, [0]):
            ref = wrapper.random_ltd_layer(*call, None, positions)
    torch.testing.assert_close(out[kept], ref[kept], atol=2e-5, rtol=1e-4)
    assert torch.equal(out[~kept], x[~kept])
    starts = torch.arange(10)[None].expand(2, 10) == 0 if positions is None else positions == 0
    assert kept[starts].all()  # keep_document_starts: the positions at 0 (document starts) are always kept


def test_converted_blocks_under_torchtitans_activation_checkpointing_train_as_without_it() -> None:
    """torchtitan's parallelize_fn wraps each block of ``model.layers`` in torch's ``CheckpointWrapper``: on a
    converted model that wraps the random-LTD wrappers, and the recompute in the backward pass runs on the same
    kept tokens as the forward (the same gradients as without checkpointing)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    x = torch.randn(2, 10, 16)
    grads = []
    for ac in (False, True):
        model = convert_to_random_ltd(Toy(), reserved_length=4).train()
        if ac:
            for key in list(model.layers.keys()):
                model.layers[key] = checkpoint_wrapper(model.layers[key])
        torch.manual_seed(0)
        model(x, PACKED).pow(2).mean().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_a_block_already_inside_a_checkpoint_wrapper_is_refused() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = Toy()
    for key in list(model.layers.keys()):
        model.layers[key] = checkpoint_wrapper(model.layers[key])
    with pytest.raises(ConversionError, match=r"CheckpointWrapper.forward has no recognisable hidden-state .*"
                                              r"activation-checkpoint wrapper around RopeBlock: convert the model "
                                              r"before applying activation checkpointing"):
        convert_to_random_ltd(model, reserved_length=4)
    assert not random_ltd_layers(model)


class WindowedFlexBlock(nn.Module):
    """gpt-oss's block form: ``attention_masks`` is a dict of flex ``BlockMask``s, one per window kind, and
    each block picks its own (gpt-oss itself does not run on CPU: its experts compute in bfloat16)."""

    def __init__(self, key: str, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.key, self.heads, self.qkv, self.out = key, heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attention_masks: dict[str, Any], positions: Any = None) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = flex_attention(q, k, v, block_mask=attention_masks[self.key])
        return x + self.out(y.transpose(1, 2).reshape(b, s, d))


def _window_masks(b: int, s: int, kept: torch.Tensor | None = None) -> dict[str, Any]:
    """Causal and causal-window-4 masks, optionally restricted to the ``kept [B,S]`` keys (plus each query)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(bi: Any, h: Any, q: Any, kv: Any) -> Any:
        ok = q >= kv
        return ok if kept is None else ok & (kept[bi, kv] | (q == kv))

    def window(bi: Any, h: Any, q: Any, kv: Any) -> Any:
        return causal(bi, h, q, kv) & (q - kv < 4)

    return {name: create_block_mask(mod, b, None, s, s, device="cpu")
            for name, mod in (("basic_mask", causal), ("sliding_window_mask", window))}


def test_a_dict_of_block_masks_is_rebuilt_mask_by_mask() -> None:
    layers = nn.ModuleDict({str(i): WindowedFlexBlock(("sliding_window_mask", "basic_mask")[i % 2]) for i in range(4)})
    torch.manual_seed(0)
    model = convert_to_random_ltd(nn.Sequential(layers), reserved_length=6).train()
    x, masks = torch.randn(2, 12, 16), _window_masks(2, 12)
    for _, wrapper in random_ltd_layers(model):
        assert isinstance(wrapper.random_ltd_layer, WindowedFlexBlock)
        with torch.no_grad():
            out = wrapper(x, masks)
            idx = wrapper.last_indices
            assert idx is not None
            kept = torch.zeros(2, 12, dtype=torch.bool).scatter(1, idx, True)
            ref = wrapper.random_ltd_layer(x, _window_masks(2, 12, kept))
        torch.testing.assert_close(out[kept], ref[kept], atol=2e-5, rtol=1e-4)
        assert torch.equal(out[~kept], x[~kept])


def test_a_torchtitan_shaped_block_with_varlen_attention_is_refused_untouched() -> None:
    model = Toy(varlen=True)
    with pytest.raises(ConversionError, match=r"RopeBlock exactly: its varlen attention \(torchtitan "
                                              r"VarlenAttention\).*attn_backend='flex'") as info:
        convert_to_random_ltd(model, reserved_length=4)
    assert "The model is unchanged" in str(info.value) and not random_ltd_layers(model)
