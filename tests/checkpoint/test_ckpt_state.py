"""load_state_dict / save_state_dict: every format, tied weights, the random_ltd metadata convention."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from random_ltd_cli.checkpoint import inspect_checkpoint, load_state_dict, save_state_dict
from random_ltd_cli.errors import CheckpointError, UnsafePickleError

from .ckpt_helpers import assert_bitwise_equal, leftovers, load_strict

SETTINGS = {"wrapped_layers": ["transformer.h.0"], "schedule": {"min_value": 4, "max_value": 16}}


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "m.bin", "weights"])
@pytest.mark.parametrize("with_metadata", [False, True])
def test_save_then_load_round_trip(tmp_path: Path, plain_state, name: str, with_metadata: bool) -> None:
    path = tmp_path / name
    metadata = {"random_ltd": json.dumps(SETTINGS)} if with_metadata else None
    save_state_dict(plain_state, path, metadata=metadata)  # lm_head.weight is tied to transformer.wte.weight
    loaded = load_state_dict(path)
    if name.endswith((".pt", ".bin")):
        assert list(loaded) == list(plain_state)  # (the safetensors writer sorts its header)
    load_strict(loaded, plain_state)
    info = inspect_checkpoint(path)
    assert info.format == ("torch" if name.endswith((".pt", ".bin")) else "safetensors")
    assert info.tensor_count == len(plain_state)
    assert (info.metadata.get("random_ltd") == SETTINGS) is with_metadata
    if name.endswith(".pt"):
        raw = torch.load(path, weights_only=True)
        assert (set(raw) == {"state_dict", "random_ltd"}) is with_metadata
    assert not leftovers(tmp_path)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="metadata must map strings to strings"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "a.safetensors", metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="safetensors stores only tensors.*'step' is a int"):
        save_state_dict({"w": torch.ones(1), "step": 3}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CheckpointError, match="No space left on device.*free some space"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_views_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.t(), "row": base[1], "base": base}
    save_state_dict(state, tmp_path / "v.safetensors")
    assert_bitwise_equal(load_state_dict(tmp_path / "v.safetensors"), {k: v.contiguous() for k, v in state.items()})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_legacy_and_protocol_4_files(tmp_path: Path, plain_state) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save(dict(plain_state), legacy, _use_new_zipfile_serialization=False)
    load_strict(load_state_dict(legacy), plain_state)
    p4 = tmp_path / "p4.pt"
    torch.save(dict(plain_state), p4, pickle_protocol=4)
    with pytest.raises(UnsafePickleError, match="weights_only=True.*--trust-pickle"):
        load_state_dict(p4)
    load_strict(load_state_dict(p4, trust_pickle=True), plain_state)


# --- issue 10, problem 7: the safetensors save path --------------------------------------


@pytest.mark.parametrize("name", ["x.safetensors", "x.pt"])
def test_saved_files_follow_the_umask(tmp_path: Path, name: str) -> None:
    # safetensors outputs were created 0600 while .pt outputs followed the umask
    old = os.umask(0o022)
    try:
        save_state_dict({"a": torch.zeros(3)}, tmp_path / name)
        save_state_dict({"a": torch.zeros(3)}, tmp_path / name)  # replacing keeps the rule
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


def test_the_renamed_safetensors_file_is_the_fsynced_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # save_file replaces the temporary path with a new inode: the fsync must reach that one
    from random_ltd_cli.checkpoint import _atomic

    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    save_state_dict({"a": torch.ones(4)}, tmp_path / "x.safetensors")
    assert os.stat(tmp_path / "x.safetensors").st_ino in synced
