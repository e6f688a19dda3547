"""`random-ltd check TARGET` end to end (issue 16, items 3 and 5e): a tiny GPT-2 folder, user modules
written into a temporary package (exact, rope from the received length, MLP-only, hidden states),
a refused family, bad input; CliRunner for each path and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from random_ltd_cli.cli import app

transformers = pytest.importorskip("transformers")
runner = CliRunner()

USER_PKG = '''
"""Small user models: nanoGPT-style blocks (exact), rope from the received length (wrong), MLP-only."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 48
    block_size: int = 32
    n_embd: int = 16
    n_head: int = 2
    n_layer: int = 4


def rope(x, positions):
    """Rotary embedding of x [B, nh, T, hs] at integer positions [T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angle = positions[:, None].float() * freq[None, :]  # (T, hs/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, use_rope=False, window=0):
        super().__init__()
        self.n_head, self.use_rope, self.window = cfg.n_head, use_rope, window
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.use_rope:  # positions of the tokens this block received: 0..T-1, whatever they were in the model
            pos = torch.arange(x.shape[1])
            q, k = rope(q, pos), rope(k, pos)
        if self.window:  # a sliding window counted over the tokens this block received (litgpt-style range(T))
            i = torch.arange(T)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg, use_rope=False, attention=True, window=0):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg, use_rope, window) if attention else None
        d = cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, use_rope=False, attention=True, window=0, **kw):
        super().__init__()
        self.config = cfg = Config(**kw)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, use_rope, attention, window) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + (0 if self.h[0].attn is not None and self.h[0].attn.use_rope
                             else self.wpe(torch.arange(idx.shape[1])))
        for block in self.h:
            x = block(x)
        return self.lm_head(x)


def nano():
    print("building nano")  # model code that prints: stdout must still hold only the report
    return GPT()


def rope_gpt():
    return GPT(use_rope=True)


def mlp_only():
    return GPT(attention=False)


def window_gpt():
    return GPT(window=4)


class Blocks(nn.Module):
    """A stack that takes hidden states [B, S, H] (no embedding): --shape B,S,H."""

    def __init__(self):
        super().__init__()
        cfg = Config()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def broken():
    raise RuntimeError("no such checkpoint on this machine")


class FixedLengthBlock(Block):
    """Reshapes to the length it was built for: fine on all tokens, fails on r kept tokens."""

    def forward(self, x):
        return super().forward(x.reshape(x.shape[0], 32, x.shape[-1]))


def fixed_length():
    model = GPT()
    model.h = nn.ModuleList(FixedLengthBlock(model.config) for _ in range(3))
    return model


class TwoInputs(nn.Module):
    """Its forward needs a second argument the synthetic batch does not give."""

    def __init__(self):
        super().__init__()
        cfg = Config()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(3))

    def forward(self, idx, segments):
        x = self.wte(idx) + segments
        for block in self.h:
            x = block(x)
        return x
'''


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``chk_user_pkg/models.py`` in a temporary folder that is on ``sys.path`` for these tests."""
    root = tmp_path_factory.mktemp("user")
    (root / "chk_user_pkg").mkdir()
    (root / "chk_user_pkg" / "__init__.py").write_text("")
    (root / "chk_user_pkg" / "models.py").write_text(USER_PKG)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name in ("chk_user_pkg.models", "chk_user_pkg"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def _run(*args: str) -> object:
    return runner.invoke(app, ["check", *args])


def _error_line(result: object) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    assert lines[0].startswith("Error: ")
    return lines[0]


def _rows(stdout: str) -> dict[str, str]:
    """Plain-text rows (CliRunner's stdout is not a terminal): layer name -> the whole line."""
    return {line.split()[0]: line for line in stdout.splitlines()[2:] if line and not line.startswith("Note:")}


def test_gpt2_folder_every_wrapped_layer_exact(gpt2_folder: Path) -> None:
    r = _run(str(gpt2_folder))
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert r.stderr == ""
    rows = _rows(r.stdout)
    assert set(rows) == {"transformer.h.1", "transformer.h.2"}  # the middle layers of 4
    for name in ("transformer.h.1", "transformer.h.2"):
        assert " exact " in rows[name]
    title = r.stdout.splitlines()[0]
    assert "GPT2LMHeadModel: 2 wrapped GPT2Block layers" in title
    assert "token ids [2, 32], unpadded and padded at r = 8, 16, 31 of S = 32" in title


def test_gpt2_json_shape(gpt2_folder: Path) -> None:
    r = _run(str(gpt2_folder), "--json", "--r", "5", "--r", "20", "--layers", "all")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] is True and data["refused"] is None
    assert data["counts"] == {"exact": 4}
    assert data["settings"]["reserved_lengths"] == [5, 20]
    assert data["settings"]["input"] == "tokens" and data["settings"]["vocab_size"] == 64
    assert [b.split(" ", 1)[0] for b in data["settings"]["batches"]] == ["input_ids", "input_ids"]
    assert [row["name"] for row in data["layers"]] == [f"transformer.h.{i}" for i in range(4)]
    for row in data["layers"]:
        assert row["status"] == "exact" and row["layer_class"] == "GPT2Block"
        assert row["max_error"] is not None and row["max_error"] <= row["tolerance"]
        # every layer verified at both r on both batches (unpadded, padded)
        assert {(run["batch"], run["r"]) for run in row["runs"]} == {
            ("unpadded", 5), ("unpadded", 20), ("padded", 5), ("padded", 20)}


def test_deepspeed_config_selects_the_layers(gpt2_folder: Path, tmp_path: Path) -> None:
    ltd = {"enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 1, "random_ltd_layer_id": [2],
           "model_mask_name": "attention_mask", "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
           "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                                   "schedule_config": {"require_steps": 100, "seq_per_step": 8}}}
    cfg = {"train_batch_size": 8, "data_efficiency": {"enabled": True, "data_routing": {"enabled": True,
                                                                                         "random_ltd": ltd}}}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    r = _run(str(gpt2_folder), "--ds-config", str(tmp_path / "ds.json"), "--r", "8", "--json")
    assert r.exit_code == 0, r.stderr
    assert [(row["name"], row["status"]) for row in json.loads(r.stdout)["layers"]] == [("transformer.h.2", "exact")]


def test_user_nanogpt_block_exact(user_pkg: Path) -> None:
    r = _run("chk_user_pkg.models:nano", "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert r.stderr == "building nano\n"  # what the model printed went to stderr
    data = json.loads(r.stdout)
    assert [(row["name"], row["status"]) for row in data["layers"]] == [("h.1", "exact"), ("h.2", "exact")]
    assert data["settings"]["vocab_size"] == 48 and data["settings"]["seq_len"] == 32  # from model.config
    assert data["settings"]["padded_batch"] is False  # its forward takes no attention_mask


def test_user_block_with_rope_of_its_own_length_is_wrong(user_pkg: Path) -> None:
    r = _run("chk_user_pkg.models:rope_gpt")
    assert r.exit_code == 1
    rows = _rows(r.stdout)
    for name in ("h.1", "h.2"):
        assert " wrong " in rows[name], r.stdout
        assert "position" in rows[name].lower()  # the likely cause is named
    line = _error_line(r)
    assert "2 of 2 wrapped layers of GPT are not exact: 2 wrong (h.1, h.2)" in line
    data = json.loads(_run("chk_user_pkg.models:rope_gpt", "--json").stdout)
    assert data["ok"] is False and data["exit_code"] == 1 and data["error"] in line
    assert all(row["max_error"] > row["tolerance"] for row in data["layers"])


def test_user_block_with_window_over_received_tokens_is_wrong(user_pkg: Path) -> None:
    # the litgpt pattern of issue 16: a sliding-window mask built with arange(T) over the tokens received
    r = _run("chk_user_pkg.models:window_gpt", "--json")
    assert r.exit_code == 1
    rows = json.loads(r.stdout)["layers"]
    assert [row["status"] for row in rows] == ["wrong", "wrong"]
    assert all("window" in row["cause"] for row in rows)


def test_mlp_only_block_is_unverifiable(user_pkg: Path) -> None:
    r = _run("chk_user_pkg.models:mlp_only", "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert {row["status"] for row in data["layers"]} == {"unverifiable"}
    assert all(row["cause"] for row in data["layers"])  # why
    assert "unverifiable" in _error_line(r)


def test_terminal_gets_a_rich_table(user_pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from random_ltd_cli.cli import check as check_cli

    monkeypatch.setattr(check_cli, "_terminal", lambda: True)
    r = _run("chk_user_pkg.models:rope_gpt", "--r", "8")
    assert r.exit_code == 1
    assert "┃ layer" in r.stdout and "│ h.1 " in r.stdout and "wrong" in r.stdout
    assert _error_line(r).startswith("Error: 2 of 2 wrapped layers of GPT are not exact")


def test_layer_that_fails_on_kept_tokens_is_an_error_row(user_pkg: Path) -> None:
    r = _run("chk_user_pkg.models:fixed_length")  # reshapes to 32 tokens: fails on r kept ones
    assert r.exit_code == 1
    row = _rows(r.stdout)["h.1"]
    assert " error " in row and "on the 8 kept tokens it fails (RuntimeError" in row and "on all" in row
    assert "1 error (h.1); each row says what failed" in _error_line(r)


def test_hidden_state_module_with_shape(user_pkg: Path) -> None:
    r = _run("chk_user_pkg.models:Blocks", "--shape", "2,12,16", "--r", "3", "--r", "6")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "randn [2, 12, 16] at r = 3, 6 of S = 12" in r.stdout.splitlines()[0]
    assert " exact " in _rows(r.stdout)["layers.1"]


def test_refused_family_is_a_row_and_exit_1() -> None:
    init = {"depths": [2], "num_heads": [2], "embed_dim": 16, "image_size": 16, "patch_size": 4, "window_size": 2}
    r = _run("transformers:SwinModel", "--init", json.dumps(init), "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["refused"] and "SwinLayer" in data["refused"]
    assert [row["status"] for row in data["layers"]] == ["refused", "refused"]
    assert "windows" in data["layers"][0]["cause"]
    assert _error_line(r).startswith("Error: conversion refused SwinModel: random-LTD cannot drop tokens")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_pkg_t16.models:Net"], "cannot import module 'no_such_pkg_t16.models'"),  # unimportable
        (["chk_user_pkg.models:TwoInputs"], "TwoInputs's forward failed on the synthetic batch"),  # forward fails
        (["chk_user_pkg.models:Blocks"], "cannot tell what input Blocks takes"),  # neither tokens nor --shape
        (["chk_user_pkg.models:broken"], "building the model 'chk_user_pkg.models:broken' failed: RuntimeError"),
        (["chk_user_pkg.models:GPT", "--shape", "2,x"], "--shape '2,x' must be positive integers"),
        (["chk_user_pkg.models:GPT", "--seq-len", "64"], "--seq-len 64 is longer than GPT's maximum length 32"),
        (["chk_user_pkg.models:GPT", "--r", "8", "--r", "32"], "--r 32 is not between 1 and 31"),  # r=S: no drop
    ],
)
def test_bad_input_one_error_line(user_pkg: Path, args: list[str], message: str) -> None:
    r = _run(*args)
    assert r.exit_code == 1
    assert message in _error_line(r)
    assert "Traceback" not in r.stdout + r.stderr
    j = _run(*args, "--json")
    assert j.exit_code == 1 and message in json.loads(j.stdout)["error"]


def test_real_subprocess_from_the_package_folder(user_pkg: Path) -> None:
    # the console entry point in a fresh process, the target importable from the working folder only
    p = subprocess.run([sys.executable, "-m", "random_ltd_cli", "check", "chk_user_pkg.models:rope_gpt", "--r", "8"],
                       cwd=user_pkg, capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("Error: 2 of 2 wrapped layers of GPT are not exact") and p.stderr.count("\n") == 1
    assert " wrong " in p.stdout


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}
