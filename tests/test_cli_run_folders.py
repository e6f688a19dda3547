"""Run folders as trainers leave them: a real transformers.Trainer output_dir, Accelerate save_state, PEFT
adapters, Lightning-style .ckpt folders and folders of standalone files (issue 10, problems 2 and 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from random_ltd_cli.checkpoint import default_output, detect_format, inspect_checkpoint, load_state_dict
from random_ltd_cli.cli import app
from random_ltd_cli.errors import CheckpointError

runner = CliRunner()
transformers = pytest.importorskip("transformers")


def run(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def tiny_lm() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A real Trainer (save_total_limit=1) on a converted tiny GPT-2 after one step: out/checkpoint-1."""
    from random_ltd_cli import RandomLTDScheduler, convert_to_random_ltd
    from random_ltd_cli.integrations import RandomLTDCallback

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trainer") / "out"
    model = tiny_lm()
    sched = RandomLTDScheduler(4, 16, 4, 2, total_layer_num=4, random_ltd_layer_num=2, global_batch_size=2)
    convert_to_random_ltd(model, scheduler=sched)
    rows = torch.randint(0, 64, (4, 16))
    args = transformers.TrainingArguments(
        str(out), max_steps=1, save_steps=1, save_total_limit=1, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
                                   callbacks=[RandomLTDCallback(sched)])
    trainer.train()
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    return trainer, out


def test_trainer_rotation_leaves_the_stripped_copy(trainer_run: tuple[Any, Path]) -> None:
    # Problem 2: the default output used to be out/checkpoint-1.stripped, which the Trainer's
    # rotation (glob checkpoint-*, regex checkpoint-(\d+)) counted as a checkpoint and deleted.
    from transformers.trainer_utils import get_last_checkpoint

    trainer, out = trainer_run
    result = run("strip", out / "checkpoint-1")
    assert result.exit_code == 0, result.stderr
    stripped = out.parent / "out.stripped" / "checkpoint-1"
    assert result.stdout.strip().endswith(str(stripped))
    assert not list(out.glob("checkpoint-1?*"))  # nothing beside the checkpoints the Trainer manages
    names = ("optimizer.pt", "rng_state.pth", "training_args.bin", "random_ltd_scheduler.json", "config.json")
    side = {name: (out / "checkpoint-1" / name).read_bytes() for name in names}
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    # resume, save checkpoint-2 and rotate (save_total_limit=1) with the real Trainer
    trainer.args.max_steps = 2
    trainer.train(resume_from_checkpoint=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")
    assert (stripped / "model.safetensors").is_file()
    plain = transformers.GPT2LMHeadModel.from_pretrained(str(stripped))  # plain names: loads without warnings
    assert torch.equal(plain.transformer.h[1].attn.c_attn.weight,
                       weights["transformer.h.1.random_ltd_layer.attn.c_attn.weight"])
    for name in names:  # the non-weight files are copied unchanged
        assert (stripped / name).read_bytes() == side[name], name


@pytest.mark.parametrize(
    ("src", "want"),
    [
        ("out/checkpoint-500", "out.stripped/checkpoint-500"),  # transformers.Trainer
        ("proj/checkpoints/checkpoint_3", "proj/checkpoints.stripped/checkpoint_3"),  # Accelerate
        ("logs/checkpoints/last.ckpt", "logs/checkpoints.stripped/last.ckpt"),  # Lightning resume looks for last*
        ("logs/checkpoints/epoch=0-step=25.ckpt", "logs/checkpoints.stripped/epoch=0-step=25.ckpt"),
        ("models/model.safetensors", "models/model.stripped.safetensors"),  # not managed by a trainer
        ("models/gpt2", "models/gpt2.stripped"),
    ],
)
def test_default_outputs_stay_out_of_trainer_folders(tmp_path: Path, src: str, want: str) -> None:
    path = tmp_path / src
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix:
        path.write_bytes(b"")
    else:
        path.mkdir()
    assert default_output(path) == tmp_path / want


def test_inspect_trainer_output_dir_lists_each_checkpoint(trainer_run: tuple[Any, Path]) -> None:
    # Problem 3: "inspect out" failed with "a folder without checkpoint files"
    _, out = trainer_run
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "run-dir"
    entries = {Path(c["path"]).name: c for c in data["checkpoints"]}
    assert entries[last.name]["kind"] == "trainer-checkpoint"
    assert entries[last.name]["wrapped_layers"] == ["transformer.h.1", "transformer.h.2"]
    human = run("inspect", last)
    assert human.exit_code == 0, human.stderr
    text = " ".join(human.stdout.split())
    for shown in ("rng_state.pth (RNG state)", "training_args.bin (training arguments)",
                  "random_ltd_scheduler.json (random-LTD scheduler state)", "optimizer.pt (optimizer state)"):
        assert shown in text
    assert "unreadable" not in text


def test_folder_of_standalone_files_is_never_merged(tmp_path: Path) -> None:
    # Problem 3: two standalone files were taken for one sharded model (tensors double-counted)
    state = {f"h.{i}.random_ltd_layer.w": torch.full((2,), float(i)) for i in (1, 2, 10)}
    folder = tmp_path / "demo-out"
    folder.mkdir()
    save_file(state, str(folder / "a.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(folder / "b.safetensors"))
    (folder / "results.json").write_text("{}")
    assert detect_format(folder) == "run-dir"
    info = inspect_checkpoint(folder)
    assert [e.tensor_count for e in info.entries] == [3, 3]
    assert info.wrapped_layers == ["h.1", "h.2", "h.10"]  # natural order, not h.1, h.10, h.2
    with pytest.raises(CheckpointError, match=r"holds 2 separate checkpoints \(a.safetensors, b.safetensors\)"):
        load_state_dict(folder)
    dry = run("strip", folder, "--dry-run")
    assert dry.exit_code == 0 and not (tmp_path / "demo-out.stripped").exists()
    assert "Dry run: " in dry.stderr and "holds 2 checkpoints" in dry.stderr
    result = run("strip", folder)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "demo-out.stripped"
    assert list(load_file(out / "a.safetensors")) == ["h.1.w", "h.10.w", "h.2.w"]
    assert torch.equal(load_file(out / "b.safetensors")["h.2.w"], state["h.2.random_ltd_layer.w"] + 1)
    assert (out / "results.json").read_text() == "{}"


def test_strip_several_paths_checks_all_first(tmp_path: Path) -> None:
    good = tmp_path / "a.safetensors"
    save_file({"h.1.random_ltd_layer.w": torch.ones(2)}, str(good))
    bad = tmp_path / "b.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run("strip", good, bad)
    assert result.exit_code == 1 and "b.pt is not a checkpoint" in result.stderr
    assert not (tmp_path / "a.stripped.safetensors").exists()  # nothing written: b was checked first
    target = tmp_path / "plain"
    target.mkdir()
    torch.save({"h.2.random_ltd_layer.w": torch.ones(2)}, bad)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"h.3.random_ltd_layer.w": torch.ones(2)}, str(folder / "model.safetensors"))
    result = run("strip", good, bad, folder, "-o", target)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["a.safetensors", "b.pt", "hf"]
    assert list(load_file(target / "hf" / "model.safetensors")) == ["h.3.w"]


def test_accelerate_save_state_folder(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    from random_ltd_cli import convert_to_random_ltd

    model = convert_to_random_ltd(tiny_lm(), layers="middle")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    acc.save_state(str(tmp_path / "state"))
    info = inspect_checkpoint(tmp_path / "state")
    assert info.kind == "accelerate-checkpoint" and info.wrapped_layers == ["transformer.h.1", "transformer.h.2"]
    assert info.side_files["optimizer.bin"] == "optimizer state"
    assert info.side_files["random_states_0.pkl"] == "RNG state"
    result = run("strip", tmp_path / "state", "-o", tmp_path / "plain")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "plain" / "random_states_0.pkl").read_bytes() == (
        tmp_path / "state" / "random_states_0.pkl").read_bytes()


def test_peft_adapter_folder(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_lm(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    model.save_pretrained(str(tmp_path / "adapter"))
    info = inspect_checkpoint(tmp_path / "adapter")
    assert info.format == "hf-dir" and info.kind == "peft-adapter"
    assert info.side_files["adapter_config.json"] == "adapter config (PEFT)"


def test_lightning_checkpoints_folder(tmp_path: Path) -> None:
    # Problem 3: "inspect checkpoints/" on last.ckpt + epoch=0-step=25.ckpt failed
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    state = {"layers.1.random_ltd_layer.w": torch.ones(2), "layers.0.w": torch.zeros(2)}
    for name in ("last.ckpt", "epoch=0-step=25.ckpt"):
        torch.save({"state_dict": state, "epoch": 0, "global_step": 25, "pytorch-lightning_version": "2.6.6"},
                   folder / name)
    data = json.loads(run("inspect", folder, "--json").stdout)
    assert data["format"] == "run-dir" and data["kind"] == "lightning-checkpoints"
    assert [Path(c["path"]).name for c in data["checkpoints"]] == ["epoch=0-step=25.ckpt", "last.ckpt"]
    assert all(c["wrapped_layers"] == ["layers.1"] for c in data["checkpoints"])
    result = run("strip", folder / "last.ckpt")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=25.ckpt", "last.ckpt"]  # no last*.ckpt added
    assert (tmp_path / "checkpoints.stripped" / "last.ckpt").is_file()


def test_inspect_here_without_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("inspect", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"].startswith("no checkpoints found in ")


def test_an_unreadable_checkpoint_does_not_hide_the_others(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    save_file({"h.1.random_ltd_layer.w": torch.ones(2)}, str(folder / "good.safetensors"))
    (folder / "bad.pt").write_bytes(b"\x80\x04not a pickle")
    result = run("inspect", folder)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "good.safetensors │ safetensors" in text and "bad.pt │ unreadable" in text
    assert "bad.pt: " in text
