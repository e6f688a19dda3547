"""Regression tests for what the all-format fuzz suite (``fuzz_all.py``) found: inputs that random-ltd
accepted and rewrote although torch (or pickle, for DCP metadata) cannot load them correctly."""

from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import pytest
import torch

from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.checkpoint._pickle import PickleError, parse
from random_ltd_cli.errors import MalformedCheckpointError

from .fuzz_folders import _dcp_templates, _unframed
from .hostile_files import raw_zip, write_zip, zip_entries, zip_torch_save

STATE = {"h.0.random_ltd_layer.w": torch.arange(6, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float16)}


def _refused(path: Path, match: str, *, trust: bool = False) -> None:
    out = path.with_name("out" + path.suffix)
    with pytest.raises(MalformedCheckpointError, match=match):
        inspect_checkpoint(path, trust_pickle=trust)
    with pytest.raises(MalformedCheckpointError, match=match):
        strip_checkpoint(path, out, trust_pickle=trust)
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


def test_dcp_tensor_sizes_must_be_integers(tmp_path: Path) -> None:
    """``torch.Size(((1,),))`` fails in pickle.load (dcp.load); it was accepted."""
    meta, files = _dcp_templates()[0]
    folder = tmp_path / "dcp"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    md = pickle.loads(meta)
    entry = next(iter(md.state_dict_metadata.values()))
    data = _unframed(md)
    size = _unframed(entry.size)[2:-1]  # the opcodes that build torch.Size((3, 2))
    assert data.count(size) >= 1
    bad = size.replace(b"K\x03K\x02\x86", b"K\x03\x85K\x02\x86")  # (3, 2) -> ((3,), 2)
    assert bad != size
    (folder / ".metadata").write_bytes(data.replace(size, bad, 1))
    with pytest.raises(TypeError):
        pickle.loads((folder / ".metadata").read_bytes())
    _refused(folder, "a tensor size is not a list of integers")


# --- torch ZIP archives: what torch.load itself requires or does not check -----------------------------


def _entries() -> list[tuple[str, bytes]]:
    return zip_entries(zip_torch_save(STATE))


def _changed(entries: list[tuple[str, bytes]], suffix: str, content: bytes | None) -> list[tuple[str, bytes]]:
    """``entries`` with the record ending in ``suffix`` replaced (or dropped for None)."""
    out = [(n, content if n.endswith(suffix) else c) for n, c in entries]
    return [(n, c) for n, c in out if c is not None]


@pytest.mark.parametrize(
    ("suffix", "content", "match"),
    [
        ("/data/0", None, "missing or does not hold exactly"),
        ("/byteorder", b"lit", "byteorder record is neither"),
        ("/byteorder", b"\x9f\x00", "byteorder record is neither"),
        ("/.storage_alignment", b"64\x00\x00", "storage_alignment record is not a number"),
        ("/version", None, "no version record"),
        ("/version", b"", "version record holds"),
        ("/version", b"x3", "version record holds"),
    ],
)
def test_records_torch_load_requires(tmp_path: Path, suffix: str, content: bytes | None, match: str) -> None:
    entries = _entries()
    if suffix == "/data/0":  # a storage record longer than its elements: torch checks the exact size
        entries = [(n, c + bytes(8) if n.endswith(suffix) else c) for n, c in entries]
    else:
        entries = _changed(entries, suffix, content)
        entries = _changed(entries, "/.data/version", None) if suffix == "/version" else entries
    path = write_zip(tmp_path / "m.pt", entries)
    with pytest.raises((RuntimeError, ValueError)):
        torch.load(path, weights_only=True)
    _refused(path, match)


def test_a_compressed_tensor_record_is_checked(tmp_path: Path) -> None:
    """torch.load inflates a tensor record without checking it: invalid deflate data loaded as garbage."""
    entries = _entries()
    records = [(n, 8 if n.endswith("/data/0") else 0, c, len(c), zlib.crc32(c)) for n, c in entries]
    path = raw_zip(tmp_path / "m.pt", records)  # declared deflated, stored as it is
    _refused(path, "'archive/data/0' is not valid deflate data|archive/data/0' is corrupted")
    good = write_zip(tmp_path / "good.pt", entries, deflate=tuple(n for n, _ in entries if "/data/" in n))
    assert inspect_checkpoint(good).tensor_count == 2  # deflated for real: read as torch reads it
    out = strip_checkpoint(good, tmp_path / "good.out.pt").output
    assert set(torch.load(out, weights_only=True)) == {"h.0.w", "b"}


SHORT_PID = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000t"  # ("storage", type, key)


@pytest.mark.parametrize("pid", [SHORT_PID, b"(X\x01\x00\x00\x00xt", b"N"])
def test_persistent_ids_torch_cannot_use_are_refused(tmp_path: Path, pid: bytes) -> None:
    """``("storage", type, key)`` (3 items) failed in torch.load's persistent_load; it was accepted."""
    entries = _entries()
    pkl = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
    name, clean = entries[pkl]
    entries[pkl] = (name, clean[:2] + pid + b"Q0" + clean[2:])  # BINPERSID, then POP
    path = write_zip(tmp_path / "m.pt", entries)
    _refused(path, "persistent id (that torch.load cannot use|is not a tensor storage)", trust=True)  # POP: trust
