"""safetensors: round trip, header padding, in-place header rewrite, metadata aliases, bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from random_ltd_cli.checkpoint import detect_format, inspect_checkpoint, strip_checkpoint
from random_ltd_cli.errors import CheckpointError, KeyCollisionError

from .ckpt_helpers import assert_bitwise_equal, leftovers, load_strict, wrap_keys


def save_wrapped(path: Path, plain_state: dict, **kwargs) -> Path:
    save_file({k: v.clone() for k, v in wrap_keys(plain_state).items()}, str(path), **kwargs)
    return path


def header_of(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def test_round_trip_loads_strictly_and_bitwise(tmp_path: Path, plain_state, untouched) -> None:
    src = save_wrapped(tmp_path / "model.safetensors", plain_state, metadata={"format": "pt"})
    check = untouched(src)
    report = strip_checkpoint(src)
    assert report.format == "safetensors" and report.wrote
    assert report.output == tmp_path / "model.stripped.safetensors"
    assert report.renamed_count == sum(k.startswith(("transformer.h.0.", "transformer.h.1.")) for k in plain_state)
    assert report.untouched_count == len(plain_state) - report.renamed_count
    load_strict(load_file(report.output), plain_state)
    check()  # input bytes unchanged
    with safe_open(str(report.output), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_header_keeps_its_length_and_data_its_bytes(tmp_path: Path, plain_state) -> None:
    src = save_wrapped(tmp_path / "m.safetensors", plain_state)
    out = strip_checkpoint(src, tmp_path / "out.safetensors").output
    assert out is not None
    n_old, old = header_of(src)
    n_new, new = header_of(out)
    assert n_new == n_old  # padded with spaces: the data keeps its offset
    assert src.read_bytes()[8 + n_old :] == out.read_bytes()[8 + n_new :]
    assert out.read_bytes()[8 : 8 + n_new].endswith(b" ")
    assert [k.replace(".random_ltd_layer", "") for k in old] == list(new)  # order kept


def test_in_place_rewrites_only_the_header(tmp_path: Path, plain_state) -> None:
    src = save_wrapped(tmp_path / "m.safetensors", plain_state)
    before, inode = src.read_bytes(), src.stat().st_ino
    report = strip_checkpoint(src, in_place=True)
    assert report.wrote and report.in_place and report.output == src
    after = src.read_bytes()
    n, _ = header_of(src)
    assert len(after) == len(before) and after[8 + n :] == before[8 + n :]
    assert src.stat().st_ino == inode  # patched, not replaced
    load_strict(load_file(src), plain_state)
    assert strip_checkpoint(src, in_place=True).wrote is False  # idempotent: nothing left to strip


def test_metadata_aliases_are_renamed(tmp_path: Path) -> None:
    # save_model drops a tied duplicate and records {"removed name": "kept name"} in __metadata__.
    model = torch.nn.Module()
    model.random_ltd_layer = torch.nn.Linear(2, 2)
    model.head = torch.nn.Linear(2, 2)
    model.head.weight = model.random_ltd_layer.weight
    outer = torch.nn.Module()
    outer.h = model
    src = tmp_path / "tied.safetensors"
    save_model(outer, str(src))
    with safe_open(str(src), "pt") as f:
        assert "h.random_ltd_layer.weight" in f.metadata().values() or "h.random_ltd_layer.weight" in f.metadata()
    report = strip_checkpoint(src)
    with safe_open(str(report.output), "pt") as f:
        meta = f.metadata()
    assert all("random_ltd_layer" not in k and "random_ltd_layer" not in v for k, v in meta.items())
    assert report.side_renamed_count >= 1


def test_inspect_reads_header_and_random_ltd_settings(tmp_path: Path, plain_state) -> None:
    settings = {"wrapped_layers": ["transformer.h.0", "transformer.h.1"], "schedule": {"min_value": 4}}
    src = save_wrapped(tmp_path / "m.safetensors", plain_state, metadata={"random_ltd": json.dumps(settings)})
    info = inspect_checkpoint(src)
    assert info.format == "safetensors" and detect_format(src) == "safetensors"
    assert info.tensor_count == len(plain_state)
    assert info.parameter_count == sum(v.numel() for v in plain_state.values())
    assert info.dtypes == {"float32": len(plain_state)}
    assert info.wrapped_layers == ["transformer.h.0", "transformer.h.1"]
    assert info.metadata["random_ltd"] == settings
    assert info.files == ["m.safetensors"]


def test_collision_is_refused_before_writing(tmp_path: Path) -> None:
    src = tmp_path / "c.safetensors"
    save_file({"a.random_ltd_layer.w": torch.ones(1), "a.w": torch.zeros(1)}, str(src))
    with pytest.raises(
        KeyCollisionError, match=r"'a\.random_ltd_layer\.w' and 'a\.w'|'a\.w' and 'a\.random_ltd_layer\.w'"
    ):
        strip_checkpoint(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[: len(b) // 2], "ends at byte|claims"),  # truncated data
        (lambda b: b[:20], "claims"),  # truncated header
        (lambda b: b[:8] + b"{" + b"x" * (len(b) - 9), "not JSON"),  # garbage header
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "claims"),  # absurd header length
        (lambda b: b[:3], "only 3 bytes|not a checkpoint"),  # shorter than the length prefix
    ],
)
def test_corrupted_files_are_refused(tmp_path: Path, plain_state, mutate, message) -> None:
    good = save_wrapped(tmp_path / "good.safetensors", plain_state)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        strip_checkpoint(bad)
    assert not (tmp_path / "bad.stripped.safetensors").exists() and not leftovers(tmp_path)


def test_tensor_bytes_must_match_shape(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "short.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match="has 8 bytes, not the 16"):
        inspect_checkpoint(bad)


def test_bitwise_with_nan_and_bf16(tmp_path: Path) -> None:
    state = {"x.random_ltd_layer.a": torch.tensor([float("nan"), 1.0]).to(torch.bfloat16), "b": torch.arange(3)}
    src = tmp_path / "n.safetensors"
    save_file(state, str(src))
    out = strip_checkpoint(src).output
    assert_bitwise_equal(load_file(out), {"x.a": state["x.random_ltd_layer.a"], "b": state["b"]})


def test_header_length_that_looks_like_a_pickle(tmp_path: Path) -> None:
    """A header of 0x280 bytes starts the file with 0x80 0x02, a pickle's first bytes: still safetensors."""
    header = json.dumps({"a.random_ltd_layer.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x280 - len(header))
    path = tmp_path / "odd.bin"
    path.write_bytes(struct.pack("<Q", 0x280) + header + struct.pack("<f", 1.5))
    assert path.read_bytes()[:2] == b"\x80\x02" and detect_format(path) == "safetensors"
    assert load_file(strip_checkpoint(path).output)["a.w"].item() == 1.5
