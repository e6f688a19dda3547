"""Hostile and corrupt safetensors files, shard indexes, configs and folders (issue 18, in-process).

Each row is one finding of the fuzz campaign or one rule of the safetensors format: the library
refuses it with its named error, before anything is written, and leaves the input as it was; the
valid edge cases next to them are accepted and their output loads with safetensors.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.cli._plain import json_ready, text
from random_ltd_cli.errors import (
    CheckpointError,
    LimitExceededError,
    MalformedCheckpointError,
    OutputExistsError,
    UnsupportedFileTypeError,
)

from .ckpt_helpers import leftovers
from .test_ckpt_deepspeed import make_ds_dir

W = "a.random_ltd_layer.w"  # a name strip renames, so every valid file below is rewritten


def st_file(path: Path, header: bytes | str | dict, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (JSON text or a dict) and data."""
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(dtype: str = "U8", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": [4] if shape is None else shape, "data_offsets": offsets or [0, 4]}


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# (header, data, error class, message)
BAD_SAFETENSORS = [
    ({W: entry(offsets=[1, 5])}, b"x" * 5, MalformedCheckpointError, "leaves a gap of 1 bytes"),
    ({W: entry(), "b": entry(offsets=[2, 6])}, b"x" * 6, MalformedCheckpointError, "overlaps"),
    ({W: entry()}, b"x" * 6, MalformedCheckpointError, "cover 4 bytes of data, but the file holds 6"),
    ({W: entry(dtype="f32")}, b"x" * 4, MalformedCheckpointError, "unknown dtype 'f32'"),
    ({W: entry(dtype="")}, b"x" * 4, MalformedCheckpointError, "unknown dtype ''"),
    ({W: entry(dtype="F32", shape=[2])}, b"x" * 4, MalformedCheckpointError, "has 4 bytes, not the 8"),
    ({W: entry(shape=[True, 4])}, b"x" * 4, MalformedCheckpointError, "not a list of non-negative integers"),
    ({W: entry(shape=[4.0])}, b"x" * 4, MalformedCheckpointError, "not a list of non-negative integers"),
    ({W: entry(offsets=[-1, 3])}, b"x" * 4, MalformedCheckpointError, "not two non-negative integers"),
    ({W: entry(offsets=[4, 0])}, b"x" * 4, MalformedCheckpointError, "end before they begin"),
    ({W: {"dtype": "U8"}}, b"", MalformedCheckpointError, "lacks dtype, shape or data_offsets"),
    ({W: entry(dtype="F4", shape=[4], offsets=[0, 3])}, b"x" * 3, MalformedCheckpointError, "not the 2"),
    ({W: entry(dtype="F4", shape=[0, 3], offsets=[0, 0])}, b"", MalformedCheckpointError, "whole bytes"),  # fuzz
    ({W: entry(dtype="F4", shape=[], offsets=[0, 0])}, b"", MalformedCheckpointError, "whole bytes"),
    ({"__metadata__": {"k": 1}, W: entry()}, b"x" * 4, MalformedCheckpointError, "map strings to strings"),
    ('{"' + W + '": 1, "' + W + '": 2}', b"", MalformedCheckpointError, "duplicate key"),
    ('{"\\ud800": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', b"x" * 4, MalformedCheckpointError,
     "lone surrogate"),  # a tensor name safetensors cannot decode and strip could not write back
    ('{"__metadata__": {"k": "\\udfff"}}', b"", MalformedCheckpointError, "lone surrogate"),
    (b'{"\xff": 1}', b"", MalformedCheckpointError, "not valid UTF-8"),
    ("[]", b"", MalformedCheckpointError, "not a JSON object"),
    ("{} x", b"", MalformedCheckpointError, "not JSON"),
    ('{"a": ' + deep(100) + "}", b"", LimitExceededError, "nested deeper than 64"),
    ('{"a": ' + deep(50_000) + "}", b"", LimitExceededError, "nested deeper than 64"),  # RecursionError before
    ('{"a": [' + "{}," * 1_000_000 + "{}]}", b"", LimitExceededError, "MiB of memory"),  # 2.3 GiB at 95 MB before
]


@pytest.mark.parametrize(("header", "data", "error", "message"), BAD_SAFETENSORS)
def test_invalid_safetensors_are_refused(tmp_path: Path, header, data, error, message, untouched) -> None:
    src = st_file(tmp_path / "m.safetensors", header, data)
    check = untouched(src)
    with pytest.raises(error, match=message):
        inspect_checkpoint(src)
    with pytest.raises(error, match=message):
        strip_checkpoint(src, tmp_path / "out.safetensors")
    check()
    assert not (tmp_path / "out.safetensors").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "length",
    [0, 1, 100_000_001, 2**64 - 1],  # too short for '{}', over the format's limit, absurd
)
def test_header_length_bounds(tmp_path: Path, length: int) -> None:
    src = tmp_path / "m.safetensors"
    src.write_bytes(struct.pack("<Q", length) + b"{}" + b" " * 30)
    with pytest.raises((MalformedCheckpointError, LimitExceededError), match="claims|more than"):
        inspect_checkpoint(src)


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ({W: entry(), "z": entry(shape=[0], offsets=[4, 4]), "e": entry(shape=[0], offsets=[4, 4])}, b"x" * 4),
        ({W: entry(dtype="F4", shape=[4], offsets=[0, 2])}, b"x" * 2),  # sub-byte dtype, whole bytes
        ({"__metadata__": None, W: entry(dtype="F8_E5M2FNUZ")}, b"x" * 4),
        ({W: entry(), "b": entry(dtype="BF16", shape=[1, 2], offsets=[4, 8])}, b"x" * 8),
        ({W: {**entry(), "extra": 1}}, b"x" * 4),  # unknown keys in an entry: safetensors accepts them too
    ],
)
def test_valid_edge_cases_are_stripped_and_load(tmp_path: Path, header, data) -> None:
    src = st_file(tmp_path / "m.safetensors", header, data)
    out = tmp_path / "out.safetensors"
    strip_checkpoint(src, out)
    with safe_open(str(out), "np") as f:
        names = list(f.keys())
        assert W not in names and "a.w" in names


def test_random_ltd_metadata_too_deep_is_kept_as_text(tmp_path: Path) -> None:
    nested = deep(5000)
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1)}, str(src), metadata={"random_ltd": nested, "other": '{"a": 1}'})
    info = inspect_checkpoint(src)
    assert info.metadata["random_ltd"] == nested  # not parsed: deeper than 64 levels (RecursionError before)


def make_sharded(root: Path, weight_map: object, index_text: str | None = None) -> Path:
    root.mkdir()
    save_file({W: torch.ones(2)}, str(root / "model-1.safetensors"))
    text_ = index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    (root / "model.safetensors.index.json").write_text(text_, encoding="utf-8", errors="surrogatepass")
    return root


@pytest.mark.parametrize(
    ("weight_map", "index_text", "error", "message"),
    [
        ({W: ["model-1.safetensors"]}, None, MalformedCheckpointError, "not to a shard file name"),  # TypeError
        ({W: {"a": 1}}, None, MalformedCheckpointError, "not to a shard file name"),
        (None, '{"weight_map": ' + deep(3000) + "}", LimitExceededError, "nested deeper"),  # RecursionError
        (None, '{"weight_map": {"\\ud800": "model-1.safetensors"}}', MalformedCheckpointError, "lone surrogate"),
        (None, '{"weight_map": {}, "weight_map": {}}', MalformedCheckpointError, "duplicate key"),
    ],
)
def test_bad_shard_index(tmp_path: Path, weight_map, index_text, error, message) -> None:
    root = make_sharded(tmp_path / "m", weight_map, index_text)
    with pytest.raises(error, match=message):
        strip_checkpoint(root, tmp_path / "out")
    with pytest.raises(error, match=message):
        inspect_checkpoint(root)
    assert not (tmp_path / "out").exists()


def test_shard_index_not_utf8(tmp_path: Path) -> None:
    root = make_sharded(tmp_path / "m", {W: "model-1.safetensors"})
    (root / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "model-1.safetensors"}}')
    with pytest.raises(MalformedCheckpointError, match="not valid UTF-8"):
        inspect_checkpoint(root)


def test_shard_that_is_a_folder_or_fifo(tmp_path: Path) -> None:
    root = make_sharded(tmp_path / "m", {W: "model-2.safetensors"})
    (root / "model-2.safetensors").mkdir()
    with pytest.raises(UnsupportedFileTypeError, match="is a folder"):
        inspect_checkpoint(root)
    (root / "model-2.safetensors").rmdir()
    os.mkfifo(root / "model-2.safetensors")
    with pytest.raises(UnsupportedFileTypeError, match="FIFO"):
        inspect_checkpoint(root)


def test_adapter_config_too_deep(tmp_path: Path) -> None:
    root = tmp_path / "adapter"
    root.mkdir()
    save_file({"base_model.model.h.0.random_ltd_layer.lora_A.weight": torch.ones(2)},
              str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text('{"target_modules": ' + deep(3000) + "}")
    with pytest.raises(LimitExceededError, match="nested deeper"):
        strip_checkpoint(root, tmp_path / "out")
    (root / "adapter_config.json").write_bytes(b'{"target_modules": "\xff"}')
    with pytest.raises(MalformedCheckpointError, match="UTF-8"):
        strip_checkpoint(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_deepspeed_latest_not_utf8(tmp_path: Path, wrapped_state) -> None:
    root = make_ds_dir(tmp_path / "ds", wrapped_state, optim=False)
    (root / "global_step11").mkdir()  # two tags, so 'latest' is read
    (root / "global_step11" / "mp_rank_00_model_states.pt").write_bytes((root / "global_step10" /
                                                                          "mp_rank_00_model_states.pt").read_bytes())
    (root / "latest").write_bytes(b"global_step\xff")
    with pytest.raises(MalformedCheckpointError, match="not UTF-8"):
        inspect_checkpoint(root)


@pytest.mark.parametrize("make", [os.mkdir, os.mkfifo])
def test_deepspeed_model_states_not_a_file(tmp_path: Path, wrapped_state, make) -> None:
    """A folder (IsADirectoryError before) or FIFO (a hang before) under a model-states name."""
    root = make_ds_dir(tmp_path / "ds", wrapped_state, optim=False)
    make(root / "global_step10" / "zz_model_states.pt")
    with pytest.raises(UnsupportedFileTypeError, match="is a folder|FIFO"):
        inspect_checkpoint(root)


def test_path_too_long(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 300 + ".safetensors")  # ENAMETOOLONG before
    with pytest.raises(CheckpointError, match="too long"):
        inspect_checkpoint(long)
    src = st_file(tmp_path / "m.safetensors", {W: entry()}, b"x" * 4)
    with pytest.raises(CheckpointError, match="too long"):
        strip_checkpoint(src, long)


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_input_files_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "m.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    with pytest.raises(UnsupportedFileTypeError, match="FIFO|socket"):
        inspect_checkpoint(path)  # without blocking: the FIFO has no writer
    with pytest.raises(UnsupportedFileTypeError):
        strip_checkpoint(path, tmp_path / "out.safetensors")


def _valid(tmp_path: Path) -> Path:
    return st_file(tmp_path / "m.safetensors", {W: entry()}, b"abcd")


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src, out = _valid(tmp_path), tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        strip_checkpoint(src, out)
    with pytest.raises(OutputExistsError):
        strip_checkpoint(src, out, dry_run=True)  # a dry run predicts the refusal
    assert out.read_bytes() == b"keep me"
    strip_checkpoint(src, out, overwrite=True)
    with safe_open(str(out), "np") as f:
        assert list(f.keys()) == ["a.w"]


@pytest.mark.parametrize("link_to", ["missing.safetensors", "other.safetensors"])
def test_symlink_output_is_refused(tmp_path: Path, link_to: str) -> None:
    src, out = _valid(tmp_path), tmp_path / "out.safetensors"
    (tmp_path / "other.safetensors").write_bytes(b"other")
    out.symlink_to(link_to)
    for overwrite in (False, True):
        with pytest.raises(UnsupportedFileTypeError, match="symbolic link"):
            strip_checkpoint(src, out, overwrite=overwrite)
    assert out.is_symlink() and os.readlink(out) == link_to
    assert (tmp_path / "other.safetensors").read_bytes() == b"other"


def test_fifo_output_is_never_replaced(tmp_path: Path) -> None:
    src, out = _valid(tmp_path), tmp_path / "out.safetensors"
    os.mkfifo(out)
    with pytest.raises(UnsupportedFileTypeError, match="FIFO"):
        strip_checkpoint(src, out, overwrite=True)
    assert out.is_fifo() and not leftovers(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_device_output_is_never_replaced(tmp_path: Path) -> None:
    """``-o /dev/null`` as root replaced the device node; here a null device made in tmp_path."""
    import stat

    src, out = _valid(tmp_path), tmp_path / "null"
    os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(UnsupportedFileTypeError, match="character device"):
        strip_checkpoint(src, out, overwrite=True)
    assert stat.S_ISCHR(os.lstat(out).st_mode)


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "hf"
    root.mkdir()
    save_file({W: torch.ones(2)}, str(root / "model.safetensors"))
    (root / "config.json").write_text("{}")
    return root


def test_folder_link_outside_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside contents")
    (root / "notes.txt").symlink_to(secret)  # absolute
    with pytest.raises(UnsupportedFileTypeError, match="outside"):
        strip_checkpoint(root, tmp_path / "out")
    (root / "notes.txt").unlink()
    (root / "notes.txt").symlink_to("../secret.txt")  # relative, leaving the folder
    with pytest.raises(UnsupportedFileTypeError, match="outside"):
        strip_checkpoint(root, tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists()


def test_folder_link_inside_is_copied_as_a_link(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "cfg.json").symlink_to("config.json")
    strip_checkpoint(root, tmp_path / "out")
    assert (tmp_path / "out" / "cfg.json").is_symlink() and os.readlink(tmp_path / "out" / "cfg.json") == "config.json"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        assert list(f.keys()) == ["a.w"]


def test_folder_with_a_fifo_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    os.mkfifo(root / "pipe")
    with pytest.raises(UnsupportedFileTypeError, match="FIFO"):
        strip_checkpoint(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_json_ready_bounds_what_is_printed() -> None:
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    shared = list(range(100))
    dag = [shared] * 100
    for _ in range(10):
        dag = [dag] * 10  # 10^12 paths through shared lists
    ready = json_ready({"big": 1 << 20_000, "nan": float("nan"), (1, 2): "\ud800", "deep": nested, "dag": dag})
    out = json.dumps(ready)  # RecursionError / ValueError before
    assert "nested deeper than 32 levels" in out and "more than 200000 values" in out
    assert ready["big"] == "<integer of 20001 bits>" and ready["nan"] == "nan"
    assert ready["<tuple>"] == "\\ud800" and text("ok \ud800").encode("utf-8")
