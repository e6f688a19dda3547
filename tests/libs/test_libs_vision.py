"""timm and open_clip beyond the sweep's rows (second environment, ``pytest -m tv``): the CLI's refusal for
timm's grid models, the EVA/BEiT adapters' mistakes caught by both references, prefix tokens, CLIP's towers."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from random_ltd_cli import VerificationError, convert_to_random_ltd, random_ltd_layers

from . import zoo_vision as zv
from .reference import result
from .test_libs_sweep import _need
from .zoo import BY_NAME, R

pytestmark = pytest.mark.tv
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


SWIN = {"model_name": "swin_tiny_patch4_window7_224", "img_size": 32, "patch_size": 4, "window_size": 4,
        "depths": [2, 4], "num_heads": [2, 2], "embed_dim": 16}
CONVNEXT = {"model_name": "convnext_atto", "depths": [2, 2, 4, 2], "dims": [8, 16, 16, 16]}


@pytest.mark.parametrize(("init", "text"), [
    (SWIN, "SwinTransformerBlock exactly: it partitions its tokens into (shifted) windows of the image grid"),
    (CONVNEXT, "ConvNeXtStage exactly: its token mixing is not attention"),
])
def test_inspect_reports_the_refusal_of_timm_grid_models(init: dict[str, Any], text: str, tmp_path: Path) -> None:
    _need("timm-swin")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "random_ltd_cli", "inspect", "timm:create_model", "--init",
                          json.dumps(init), "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert text in json.loads(run.stdout)["error"]
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0], run.stderr


EVA = {"model_name": "eva02_tiny_patch14_224", "img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32,
       "num_heads": 2}
CLIP_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "heads": 2, "mlp_ratio": 2.0,
               "output_dim": 16}


@pytest.mark.parametrize(("target", "init", "code", "text"), [
    ("timm:create_model", EVA, 0, "Eva: 2 wrapped EvaBlock layers, verified on images [2, 3, 32, 32]"),
    ("open_clip.transformer:VisionTransformer", CLIP_VISION, 0,
     "VisionTransformer: 2 wrapped ResidualAttentionBlock layers, verified on images [2, 3, 32, 32]"),
    ("timm:create_model", SWIN, 1, "SwinTransformer: conversion refused (2 SwinTransformerBlock layers)"),
    ("timm:create_model", CONVNEXT, 1, "Error: random-LTD cannot drop tokens in ConvNeXtStage exactly: its token"),
])
def test_check_feeds_images_to_plain_vision_models_and_reports_refusals(
        target: str, init: dict[str, Any], code: int, text: str, tmp_path: Path) -> None:
    """`random-ltd check` reads a plain vision transformer's image size (timm's patch_embed.img_size, open_clip's
    image_size); a model it cannot feed but that conversion refuses gets the refusal, not "which input?"."""
    _need("timm-eva02")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "random_ltd_cli", "check", target, "--init", json.dumps(init)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == code, run.stdout + run.stderr
    assert text in run.stdout + run.stderr
    if code == 0:
        assert run.stdout.count(" exact ") == 2, run.stdout


def _mutated(name: str) -> str:
    result.cache_clear()
    try:
        res = result(name)
    finally:
        result.cache_clear()
    assert res.status == "FAIL", res.detail
    return res.detail


def _verifier_catches(name: str) -> None:
    case = BY_NAME[name]
    model = convert_to_random_ltd(case.build(), reserved_length=R).train()  # verify="first" (default)
    torch.manual_seed(0)
    with pytest.raises(VerificationError, match="random-LTD changes the output of"):
        model(**case.batches()[-1])


def test_eva_rope_gathered_at_the_wrong_positions_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the prefix offset the table rows of the kept patches are off by one (positions of the
    neighbours): the sweep's reference and the built-in verifier both see it."""
    _need("timm-eva02")
    from random_ltd_cli import vision_adapters

    def shifted(self: Any, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        return value[None, None].expand(idx.shape[0], 1, *value.shape)[:, :, : idx.shape[1] - 1]

    monkeypatch.setattr(vision_adapters._EvaRope, "_gather", shifted)
    assert "differ from the reference" in _mutated("timm-eva02")
    _verifier_catches("timm-eva02")


def test_beit_bias_of_the_wrong_tokens_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bias for the first r tokens of the grid (what the layer would use if it built it for the tokens it
    sees) differs from the reference."""
    _need("timm-beit")
    from random_ltd_cli import vision_adapters
    from random_ltd_cli.tokens import gather_mask

    def first_tokens(self: Any, idx: torch.Tensor, seq_len: int) -> Any:
        attn, full = self.attn, type(self.attn)._get_rel_pos_bias
        first = torch.arange(idx.shape[1])[None].expand_as(idx)
        attn.__dict__["_get_rel_pos_bias"] = lambda: gather_mask(full(attn), first, seq_len)
        try:
            yield
        finally:
            del attn.__dict__["_get_rel_pos_bias"]

    monkeypatch.setattr(vision_adapters._BeitBias, "around", contextlib.contextmanager(first_tokens))
    assert "differ from the reference" in _mutated("timm-beit")
    _verifier_catches("timm-beit")


@pytest.mark.parametrize(("name", "always_first"), [
    ("timm-eva02", True),  # its rope skips the class token: kept, at the front
    ("timm-eva02-no-cls", False),  # no prefix: every token is drawn
    ("timm-vit", False),  # the class token is drawn like any token (random-LTD's uniform draw)
])
def test_eva_keeps_its_class_token_and_other_tokens_are_drawn_uniformly(name: str, always_first: bool) -> None:
    _need(name)
    model = convert_to_random_ltd(BY_NAME[name].build(), reserved_length=R).train()
    firsts = []
    for seed in range(6):
        torch.manual_seed(seed)
        model(zv.images(seed))
        for _, wrapper in random_ltd_layers(model):
            idx = wrapper.last_indices
            assert idx is not None and idx.shape == (zv.BATCH, R)
            firsts.append(bool((idx[:, 0] == 0).all()))
    assert all(firsts) if always_first else not all(firsts)


def test_clip_default_wraps_the_text_tower_and_each_tower_converts_on_its_own() -> None:
    _need("open-clip-clip")
    model = zv.ClipLogits()
    convert_to_random_ltd(model, reserved_length=R)
    assert {n.rpartition(".")[0] for n, _ in random_ltd_layers(model)} == {"clip.transformer.resblocks"}
    both = zv.ClipLogits()
    convert_to_random_ltd(both.clip.visual, reserved_length=R)
    convert_to_random_ltd(both.clip.transformer, reserved_length=R)
    wrapped = {n.rpartition(".")[0] for n, _ in random_ltd_layers(both)}
    assert wrapped == {"clip.visual.transformer.resblocks", "clip.transformer.resblocks"}
    torch.manual_seed(0)
    logits = both.train()(**zv.clip_batches()[0])  # verify="first" checks every wrapped layer of both towers
    assert logits.shape == (zv.BATCH, zv.BATCH) and bool(torch.isfinite(logits).all())


def test_eva_prefix_tokens_that_do_not_fit_in_r_are_an_input_error() -> None:
    _need("timm-eva02")
    from random_ltd_cli import InputError

    model = convert_to_random_ltd(zv.timm_model("eva02_tiny_patch14_224", num_reg_tokens=4), reserved_length=4)
    with pytest.raises(InputError, match=r"EvaBlock always keeps its 5 prefix token\(s\), which cannot fit in the "
                                         r"reserved length r=4"):
        model.train()(zv.images())


def test_eva_rope_table_of_another_length_is_an_input_error() -> None:
    _need("timm-eva02")
    from random_ltd_cli import InputError

    model = convert_to_random_ltd(BY_NAME["timm-eva02"].build(), reserved_length=R).train()
    wrapper = random_ltd_layers(model)[0][1]
    x, rope = torch.randn(2, 17, 32), model.rope.get_embed()  # rope for the 16 patches: right
    assert wrapper(x, rope=rope).shape == x.shape
    with pytest.raises(InputError, match=r"cannot gather timm's 'rope' of shape \(17, 32\): expected a rotary table "
                                         r"for the 16 tokens after the 1 prefix token\(s\)"):
        wrapper(x, rope=torch.cat([rope, rope[:1]]))


@pytest.mark.parametrize("name", ["timm-eva02", "timm-beit"])
def test_timm_activation_checkpointing_gives_the_same_gradients(name: str) -> None:
    """timm's ``set_grad_checkpointing`` recomputes each block (the wrapper) in the backward pass: the recompute
    draws the same tokens and runs inside the adapter again (EVA's rope, BEiT's bias), so the gradients equal
    the ones without checkpointing."""
    _need(name)
    grads = []
    for checkpointing in (False, True):
        model = convert_to_random_ltd(BY_NAME[name].build(), reserved_length=R, seed=3).train()
        model.set_grad_checkpointing(checkpointing)
        model(zv.images()).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_clip_both_towers_in_one_call_take_the_middle_of_each() -> None:
    _need("open-clip-clip")
    from open_clip.transformer import ResidualAttentionBlock

    model = zv.ClipLogits()
    convert_to_random_ltd(model, ResidualAttentionBlock, reserved_length=R, verify="always")
    assert [n for n, _ in random_ltd_layers(model)] == [
        "clip.visual.transformer.resblocks.1", "clip.visual.transformer.resblocks.2",
        "clip.transformer.resblocks.1", "clip.transformer.resblocks.2"]
    torch.manual_seed(0)
    logits = model.train()(**zv.clip_batches()[0])  # verify="always": every wrapped block of both towers checked
    logits.sum().backward()
    assert bool(torch.isfinite(logits).all())
