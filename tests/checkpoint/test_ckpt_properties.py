"""Property: for any set of keys, strip keeps values and order, is idempotent, and renames only whole segments."""

from __future__ import annotations

import json
import struct
import tempfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from random_ltd_cli.checkpoint import strip_checkpoint
from random_ltd_cli.errors import KeyCollisionError
from random_ltd_cli.keys import SEGMENT, strip_key

SEGMENTS = st.sampled_from(
    ["h", "0", "1", "attn", "w", "bias", SEGMENT, "random_ltd_layers", "my_random_ltd_layer", "random_ltd", "é"]
)
KEYS = st.lists(st.lists(SEGMENTS, min_size=1, max_size=5).map(".".join), min_size=1, max_size=12, unique=True)


def header_keys(path: Path) -> list[str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]


def check_strip(src: Path, keys_in_file_order: list[str], read: object) -> None:
    expected = [strip_key(k) for k in keys_in_file_order]
    if len(set(expected)) < len(expected):
        with pytest.raises(KeyCollisionError):
            strip_checkpoint(src, dry_run=True)
        return
    report = strip_checkpoint(src, src.with_name("out" + src.suffix))
    assert report.renamed == [(k, e) for k, e in zip(keys_in_file_order, expected, strict=True) if k != e]
    assert all(f".{SEGMENT}." not in f".{e}." or e == k for k, e in zip(keys_in_file_order, expected, strict=True))
    stripped = read(src.with_name("out" + src.suffix))  # type: ignore[operator]
    assert list(stripped) == expected
    for key, new in zip(keys_in_file_order, expected, strict=True):
        assert stripped[new].item() == float(hash(key) % 1000)  # the value that key had
    again = strip_checkpoint(src.with_name("out" + src.suffix), dry_run=True)
    assert again.renamed == []  # idempotent
    for key in keys_in_file_order:
        if SEGMENT not in key.split("."):
            assert strip_key(key) == key  # e.g. random_ltd_layers, my_random_ltd_layer: untouched


@settings(max_examples=50, deadline=None)
@given(keys=KEYS, legacy=st.booleans())
def test_torch_strip_properties(keys: list[str], legacy: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "in.pt"
        state = OrderedDict((k, torch.tensor([float(hash(k) % 1000)])) for k in keys)
        torch.save(state, src, _use_new_zipfile_serialization=not legacy)
        check_strip(src, keys, lambda p: torch.load(p, weights_only=True))


@settings(max_examples=50, deadline=None)
@given(keys=KEYS)
def test_safetensors_strip_properties(keys: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "in.safetensors"
        save_file({k: torch.tensor([float(hash(k) % 1000)]) for k in keys}, str(src))
        order = header_keys(src)  # the safetensors writer chooses the order; strip must keep it
        check_strip(src, order, lambda p: OrderedDict((k, load_file(p)[k]) for k in header_keys(p)))
