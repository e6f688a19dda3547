"""Issue 19's small items, as a new user meets them: convert without --weights says so, inspect of a
folder with nothing readable fails, table titles never wrap outside a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from random_ltd_cli.cli import app
from random_ltd_cli.model import GPT, GPTConfig

runner = CliRunner()
TARGET = "random_ltd_cli.model:GPT"
INIT = json.dumps({"vocab_size": 50, "block_size": 32, "n_layer": 4, "n_head": 2, "n_embd": 32})
NOTE = "no --weights: saving the model's initial weights"


# -- convert without --weights ---------------------------------------------------------------------


def test_convert_without_weights_notes_initial_weights(tmp_path: Path) -> None:
    out = tmp_path / "ltd.safetensors"
    r = runner.invoke(app, ["convert", TARGET, "--init", INIT, "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert NOTE in r.stderr and "--weights CKPT" in r.stderr
    assert NOTE not in r.stdout and out.is_file()


def test_convert_dry_run_without_weights_says_would(tmp_path: Path) -> None:
    r = runner.invoke(app, ["convert", TARGET, "--init", INIT, "-o", str(tmp_path / "x.pt"), "--dry-run"])
    assert r.exit_code == 0, r.stderr
    assert "no --weights: would save the model's initial weights" in r.stderr


@pytest.mark.parametrize(
    "case",
    [
        "weights",  # --weights given: the trained weights are saved, nothing to say
        "no-output",  # nothing is saved at all
        "hf-folder",  # a Hugging Face folder brings its own weights
    ],
)
def test_no_initial_weights_note(tmp_path: Path, case: str) -> None:
    torch.manual_seed(0)
    args = ["convert", TARGET, "--init", INIT]
    if case == "weights":
        torch.save(GPT(GPTConfig(**json.loads(INIT))).state_dict(), tmp_path / "plain.pt")
        args += ["--weights", str(tmp_path / "plain.pt"), "-o", str(tmp_path / "ltd.safetensors")]
    elif case == "hf-folder":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=32)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
        args = ["convert", str(tmp_path / "gpt2"), "-o", str(tmp_path / "gpt2-ltd")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert "no --weights" not in r.stderr


# -- inspect: nothing readable ----------------------------------------------------------------------


def _corrupt_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"garbage\n")
    (folder / "b.pt").write_bytes(b"\x80\x04not a pickle")
    return folder


def test_inspect_folder_with_nothing_readable_exits_1(tmp_path: Path) -> None:
    folder = _corrupt_folder(tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    r = runner.invoke(app, ["inspect", str(folder)])
    assert r.exit_code == 1
    assert r.stdout == ""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert errors == [
        f"Error: nothing readable in {str(folder)!r}: all 2 candidate files failed to read (reasons above). "
        "Pass a checkpoint file or folder that random-ltd can read."
    ]
    assert "a.safetensors: " in r.stderr and "b.pt: " in r.stderr  # each file's own reason
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before  # untouched


def test_inspect_nothing_readable_json(tmp_path: Path) -> None:
    r = runner.invoke(app, ["inspect", str(_corrupt_folder(tmp_path)), "--json"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)  # one object: the error, not a listing followed by it
    assert data["exit_code"] == 1 and data["error"].startswith("nothing readable in ")


def test_inspect_one_readable_file_among_corrupt_ones_still_lists(tmp_path: Path) -> None:
    folder = _corrupt_folder(tmp_path)
    save_file({"h.1.random_ltd_layer.w": torch.ones(2)}, str(folder / "good.safetensors"))
    r = runner.invoke(app, ["inspect", str(folder)])
    assert r.exit_code == 0, r.stderr
    assert "good.safetensors" in r.stdout and "unreadable" in r.stdout


# -- table titles outside a terminal -----------------------------------------------------------------


def _env_without_columns() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


def test_long_titles_and_cells_do_not_wrap_in_a_pipe(tmp_path: Path) -> None:
    # a real subprocess with stdout on a pipe: the title is longer than the table and than 80 columns
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "checkpoint-with-a-long-name.safetensors"
    deep.parent.mkdir(parents=True)
    names = {f"transformer.h.{i}.random_ltd_layer.attn.weight": torch.ones(2) for i in range(1, 13)}
    save_file(names, str(deep))
    cmd = [sys.executable, "-m", "random_ltd_cli", "inspect", str(deep)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_columns(), check=True)
    lines = p.stdout.splitlines()
    assert lines[0] == f"{deep} (safetensors)"  # the title, whole, on its own line
    row = next(ln for ln in lines if "wrapped layers" in ln)
    assert ", ".join(f"transformer.h.{i}" for i in range(1, 13)) in row  # 200 characters, one line


def test_layer_table_title_is_one_line_under_clirunner() -> None:
    r = CliRunner(env={"COLUMNS": None}).invoke(app, ["inspect", TARGET, "--init", INIT, "--layer-type",
                                                      "random_ltd_cli.model:Block", "--steps", "10"])
    assert r.exit_code == 0, r.stderr
    title = r.stdout.splitlines()[0]
    assert title == "GPT (" + title.split("(", 1)[1]
    assert title.endswith("4 Block layers, 2 would be wrapped")
