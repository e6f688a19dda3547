"""Regression tests for what the all-format fuzz suite (``fuzz_all.py``) found: inputs that random-ltd
accepted and rewrote although torch (or pickle, for DCP metadata) cannot load them correctly."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.checkpoint._pickle import PickleError, parse
from random_ltd_cli.errors import CorruptCheckpointError

from .fuzz_folders import _dcp_templates, _unframed

STATE = {"h.0.random_ltd_layer.w": torch.arange(6, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float16)}


def _refused(path: Path, match: str) -> None:
    out = path.with_name("out" + path.suffix)
    with pytest.raises(CorruptCheckpointError, match=match):
        inspect_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match=match):
        strip_checkpoint(path, out)
    assert not out.exists() and not out.is_symlink()


# --- pickles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [b"\x80\x02\x88)R.", b"\x80\x02c__builtin__\nset\nNR.", b"\x80\x02)\x88\x81."])
def test_a_call_of_a_non_global_or_with_non_tuple_arguments_is_malformed(stream: bytes) -> None:
    """REDUCE of a bool (``'bool' object is not callable`` in pickle.load) was accepted in DCP metadata."""
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises: it cannot load these
        pickle.loads(stream)
    with pytest.raises(PickleError, match="only a global called with a tuple"):
        parse(stream)


def test_an_unknown_protocol_is_malformed() -> None:
    with pytest.raises(ValueError, match="unsupported pickle protocol"):
        pickle.loads(b"\x80\x06N.")
    with pytest.raises(PickleError, match="unsupported pickle protocol 6"):
        parse(b"\x80\x06N.")
    assert parse(b"\x80\x05N.").root is None


# --- DCP -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], "x"])
def test_dcp_metadata_without_a_state_dict_map_is_refused(tmp_path: Path, value: object) -> None:
    """dcp.load iterates over ``state_dict_metadata``; None was accepted and rewritten."""
    meta, files = _dcp_templates()[0]
    folder = tmp_path / "dcp"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    md = pickle.loads(meta)  # our own metadata, just written by dcp.save
    md.state_dict_metadata = value
    (folder / ".metadata").write_bytes(_unframed(md))
    _refused(folder, "has no state_dict_metadata map")
