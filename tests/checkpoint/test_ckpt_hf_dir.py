"""Hugging Face folders: single file and shards, safetensors and .bin, index renaming, unsafe shard names."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from random_ltd_cli.checkpoint import detect_format, inspect_checkpoint, load_state_dict, strip_checkpoint
from random_ltd_cli.errors import CheckpointError, KeyCollisionError

from .ckpt_helpers import WRAPPED, Wrapper, assert_bitwise_equal, leftovers

INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}


def wrapped_model(model: nn.Module) -> nn.Module:
    wrapped = copy.deepcopy(model)
    for prefix in WRAPPED:
        index = int(prefix.rsplit(".", 1)[1])
        wrapped.transformer.h[index] = Wrapper(wrapped.transformer.h[index])
    return wrapped


def to_bin(folder: Path) -> None:
    """Turn a safetensors HF folder into the .bin layout (transformers 5 only writes safetensors)."""
    index = folder / INDEX["safetensors"]
    renames = {}
    for shard in sorted(folder.glob("*.safetensors")):
        name = shard.name.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin")
        torch.save(load_file(shard), folder / name)
        renames[shard.name] = name
        shard.unlink()
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: renames[v] for k, v in data["weight_map"].items()}
        (folder / INDEX["bin"]).write_text(json.dumps(data, indent=2))
        index.unlink()


def make_hf_dir(path: Path, model: nn.Module, *, sharded: bool, kind: str) -> Path:
    wrapped_model(model).save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
    if kind == "bin":
        to_bin(path)
    return path


CASES = [(sharded, kind) for sharded in (False, True) for kind in ("safetensors", "bin")]
IDS = [f"{'sharded' if s else 'single'}-{k}" for s, k in CASES]


@pytest.mark.parametrize(("sharded", "kind"), CASES, ids=IDS)
def test_stripped_folder_loads_with_from_pretrained(tmp_path: Path, model, sharded, kind, untouched) -> None:
    from transformers import GPT2LMHeadModel

    src = make_hf_dir(tmp_path / "ckpt", model, sharded=sharded, kind=kind)
    assert detect_format(src) == "hf-dir"
    check = untouched(src)
    report = strip_checkpoint(src)
    out = tmp_path / "ckpt.stripped"
    assert report.output == out and report.wrote and report.format == "hf-dir"
    assert report.renamed_count > 0
    loaded, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_bitwise_equal(loaded.state_dict(), model.state_dict())
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    if sharded:
        old, new = (json.loads((d / INDEX[kind]).read_text()) for d in (src, out))
        assert new["metadata"] == old["metadata"]
        assert list(new["weight_map"].values()) == list(old["weight_map"].values())
        assert list(new["weight_map"]) == [k.replace(".random_ltd_layer", "") for k in old["weight_map"]]
    check()
    assert not leftovers(tmp_path)


def test_in_place_folder(tmp_path: Path, model) -> None:
    from transformers import GPT2LMHeadModel

    src = make_hf_dir(tmp_path / "ckpt", model, sharded=True, kind="safetensors")
    report = strip_checkpoint(src, in_place=True)
    assert report.wrote and report.output == src
    loaded, info = GPT2LMHeadModel.from_pretrained(src, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_bitwise_equal(loaded.state_dict(), model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert strip_checkpoint(src, in_place=True).renamed_count == 0


def test_output_folder_must_not_exist(tmp_path: Path, model) -> None:
    src = make_hf_dir(tmp_path / "ckpt", model, sharded=False, kind="safetensors")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        strip_checkpoint(src, tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="inside the input folder"):
        strip_checkpoint(src, src / "sub")


def test_inspect_and_load_folder(tmp_path: Path, model) -> None:
    src = make_hf_dir(tmp_path / "ckpt", model, sharded=True, kind="bin")
    info = inspect_checkpoint(src)
    state = model.state_dict()
    saved = [k for k in state if k != "lm_head.weight"]  # transformers does not save the tied head
    assert info.format == "hf-dir" and info.tensor_count == len(saved)
    assert info.parameter_count == sum(state[k].numel() for k in saved)
    assert info.wrapped_layers == list(WRAPPED)
    assert info.metadata["total_size"] > 0
    assert info.files[0] == INDEX["bin"]
    loaded = load_state_dict(src)
    assert sorted(k.replace(".random_ltd_layer", "") for k in loaded) == sorted(saved)


def write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    index = folder / INDEX["safetensors"]
    index.write_text(json.dumps({"metadata": {"total_size": 8}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize(
    "shard",
    [
        "../outside.safetensors",  # climbs out of the folder
        "/etc/passwd",  # absolute
        "sub/../../outside.safetensors",  # climbs out through a sub-folder
        "a\\..\\..\\b.safetensors",  # Windows separators
        "C:evil.safetensors",  # drive letter
        "",  # empty
    ],
)
def test_unsafe_shard_names_are_refused(tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "ckpt"
    write_index(folder, {"a.random_ltd_layer.w": shard})
    (tmp_path / "outside.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a plain file name inside its folder"):
        strip_checkpoint(folder)
    assert not (tmp_path / "ckpt.stripped").exists()


def test_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    write_index(folder, {"a.random_ltd_layer.w": "model-00001-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match="lists the shard 'model-00001-of-00002.safetensors', which is missing"):
        strip_checkpoint(folder)


def test_collision_across_shards(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    write_index(folder, {"a.random_ltd_layer.w": "s1.safetensors", "a.w": "s2.safetensors"})
    save_file({"a.random_ltd_layer.w": torch.ones(1)}, str(folder / "s1.safetensors"))
    save_file({"a.w": torch.ones(1)}, str(folder / "s2.safetensors"))
    with pytest.raises(KeyCollisionError, match="would both become 'a.w'"):
        strip_checkpoint(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_plain_folder_is_copied_only_when_asked(tmp_path: Path, model) -> None:
    src = tmp_path / "plain"
    model.save_pretrained(src)
    report = strip_checkpoint(src)
    assert report.renamed_count == 0 and not report.wrote and report.output is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
    copy = strip_checkpoint(src, tmp_path / "copy")
    assert copy.wrote and sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in src.iterdir())
    for path in src.iterdir():
        assert (tmp_path / "copy" / path.name).read_bytes() == path.read_bytes()
