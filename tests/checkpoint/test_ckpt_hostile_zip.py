"""Torch ZIP archives validated as torch reads them, and the pickle reader's limits, one rule at a time (issue 18)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from random_ltd_cli.checkpoint import _pickle, _torch_legacy, inspect_checkpoint, strip_checkpoint
from random_ltd_cli.checkpoint._pickle import Instance, PickleError, PickleLimitError, PickleTruncatedError, parse
from random_ltd_cli.checkpoint._pickle_tree import describe
from random_ltd_cli.checkpoint._torch_names import tensor_meta, walk
from random_ltd_cli.errors import CheckpointError, LimitExceededError, MalformedCheckpointError

from .hostile_files import legacy_bytes, raw_zip, write_zip, zip_entries, zip_torch_save

STATE = {"h.0.random_ltd_layer.w": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float16)}


@pytest.fixture(scope="module")
def entries() -> list[tuple[str, bytes]]:
    """The records of a real torch.save archive, in order."""
    return zip_entries(zip_torch_save(STATE))


def _stored(entries: list[tuple[str, bytes]]) -> list[tuple[str, int, bytes, int, int]]:
    return [(name, 0, body, len(body), zlib.crc32(body)) for name, body in entries]


# --- names ----------------------------------------------------------------------------------------------

BAD_NAMES = {
    "parent": "archive/../../evil",
    "absolute": "/etc/evil",
    "backslash": "archive\\..\\evil",
    "dot": "archive/./data/0",
    "empty part": "archive//x",
    "drive": "C:/evil",
    "directory": "archive/dir/",
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_names_must_be_plain_relative_paths(tmp_path: Path, entries: list[tuple[str, bytes]], case: str) -> None:
    path = write_zip(tmp_path / "bad.pt", [*entries, (BAD_NAMES[case], b"x")])
    with pytest.raises(MalformedCheckpointError, match="is not a plain relative path"):
        inspect_checkpoint(path)


def test_every_record_lies_in_the_archive_folder(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    path = write_zip(tmp_path / "stray.pt", [*entries, ("other/data", b"x")])
    with pytest.raises(MalformedCheckpointError, match="'other/data' lies outside the archive folder 'archive/'"):
        inspect_checkpoint(path)


# --- headers, sizes, methods ---------------------------------------------------------------------------


def test_a_stored_pickle_declared_deflated_is_a_clean_error(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    """Was a raw ``zlib.error``."""
    records = _stored(entries)
    records[0] = (records[0][0], 8, *records[0][2:])
    assert records[0][0].endswith("data.pkl")
    path = raw_zip(tmp_path / "lie.pt", records)
    with pytest.raises(MalformedCheckpointError, match="'archive/data.pkl' is not valid deflate data"):
        inspect_checkpoint(path)


ZIP_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "encrypted": ({"flags": 1}, "is encrypted"),
    "local name differs": ({"local_names": {"archive/version": "archive/versioN"}}, "local header disagrees"),
    "count too high": ({"count_delta": 1}, "corrupted central directory"),
    "count too low": ({"count_delta": -1}, "holds more bytes than its entries"),
    "no zip64 records": ({"zip64": False}, None),  # a plain (non-ZIP64) archive is fine
}


@pytest.mark.parametrize("case", list(ZIP_CASES))
def test_zip_structure_rules(tmp_path: Path, entries: list[tuple[str, bytes]], case: str) -> None:
    options, message = ZIP_CASES[case]
    path = raw_zip(tmp_path / "z.pt", _stored(entries), **options)
    if message is None:
        assert inspect_checkpoint(path).tensor_count == 2
        return
    with pytest.raises(MalformedCheckpointError, match=message):
        inspect_checkpoint(path)


def test_unknown_method_and_unequal_stored_sizes(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    records = _stored(entries)
    name, _, body, usize, crc = records[1]
    path = raw_zip(tmp_path / "bz.pt", [records[0], (name, 12, body, usize, crc), *records[2:]])
    with pytest.raises(MalformedCheckpointError, match="compression method 12"):
        inspect_checkpoint(path)
    path = raw_zip(tmp_path / "sz.pt", [records[0], (name, 0, body, usize + 1, crc), *records[2:]])
    with pytest.raises(MalformedCheckpointError, match="stored uncompressed but its two sizes differ"):
        inspect_checkpoint(path)


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    path.write_bytes(zip_torch_save(STATE) + b"\0")
    with pytest.raises(MalformedCheckpointError, match="bytes follow the end-of-archive record"):
        inspect_checkpoint(path)


def test_a_record_inside_another_is_refused(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    """A record whose bytes another record also claims (the trick of overlapping ZIP bombs)."""
    records = _stored(entries)
    inner_name, inner_body = "archive/version", b"3\n"
    inner = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0x21, zlib.crc32(inner_body), 2, 2, len(inner_name), 0
    ) + inner_name.encode() + inner_body  # fmt: skip
    outer = ("archive/extra", 0, inner, len(inner), zlib.crc32(inner))
    kept = [r for r in records if r[0] != inner_name]
    path = raw_zip(tmp_path / "nested.pt", [outer, *kept, (inner_name, 0, inner_body, 2, zlib.crc32(inner_body))])
    data = bytearray(path.read_bytes())
    entry = bytes(data).rindex(b"PK\x01\x02", 0, bytes(data).rindex(inner_name.encode()))
    struct.pack_into("<I", data, entry + 42, 30 + len("archive/extra"))  # inside archive/extra's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(MalformedCheckpointError, match="overlap"):
        inspect_checkpoint(path)


# --- valid variants torch accepts ----------------------------------------------------------------------


def test_deflated_records_are_read_as_torch_reads_them(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    storage = next(name for name, _ in entries if "/data/" in name)
    path = write_zip(tmp_path / "d.pt", entries, deflate=("archive/data.pkl", storage))
    assert set(torch.load(path, weights_only=True)) == set(STATE)
    info = inspect_checkpoint(path)
    assert (info.tensor_count, info.wrapped_layers) == (2, ["h.0"])
    out = tmp_path / "out.pt"
    with pytest.raises(CheckpointError, match="'archive/data.pkl' is compressed; strip rewrites it only stored"):
        strip_checkpoint(path, out)
    assert not out.exists()


def test_cli_one_error_line_and_nothing_written(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    path = write_zip(tmp_path / "bad.pt", [*entries, ("archive/../x", b"x")])
    before = path.read_bytes()
    out = tmp_path / "out.pt"
    for args in (["inspect", str(path)], ["strip", str(path), "-o", str(out)], ["strip", str(path), "--json"]):
        proc = subprocess.run([sys.executable, "-m", "random_ltd_cli", *args], capture_output=True, text=True)
        assert proc.returncode == 1, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {path} is a truncated or corrupted"), args
        if "--json" in args:
            assert json.loads(proc.stdout)["exit_code"] == 1
    assert not out.exists() and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


# --- legacy storages -----------------------------------------------------------------------------------


def test_legacy_storage_of_unknown_type_is_refused(tmp_path: Path) -> None:
    main = (
        b"\x80\x02}X\x01\x00\x00\x00w(X\x07\x00\x00\x00storagectorch\nEvilStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x03NtQs."
    )
    path = tmp_path / "l.pt"
    path.write_bytes(legacy_bytes(main, [("0", 3, b"\0" * 12)]))
    for trust in (False, True):  # the name passes the allowlist's pattern, the storage walk does not know it
        with pytest.raises(MalformedCheckpointError, match="storage '0' has type 'EvilStorage' and 3 elements"):
            inspect_checkpoint(path, trust_pickle=trust)


def test_legacy_pickle_window_grows_and_stops_at_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main pickle is read through a window that grows; past MAX_PICKLE the file is refused."""
    import io

    state = {f"layer.{i}.random_ltd_layer.weight": torch.zeros(1) for i in range(2000)}  # about 250 KB of pickle
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    path = tmp_path / "big.pt"
    path.write_bytes(buf.getvalue())
    assert inspect_checkpoint(path).tensor_count == 2000
    monkeypatch.setattr(_torch_legacy, "MAX_PICKLE", 100 << 10)
    with pytest.raises(LimitExceededError, match="longer than 102400 bytes"):
        inspect_checkpoint(path)


# --- the pickle reader's own rules ---------------------------------------------------------------------


def test_budgets_are_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    spam = b"\x80\x04(" + b"}" * 5000 + b"l."
    assert len(parse(spam).root) == 5000
    monkeypatch.setattr(_pickle, "MAX_OPS", 1000)
    with pytest.raises(PickleLimitError, match="more than 1000 opcodes"):
        parse(spam)
    monkeypatch.setattr(_pickle, "MAX_OPS", 10**6)
    monkeypatch.setattr(_pickle, "MAX_COST", 100_000)
    with pytest.raises(PickleLimitError, match="more than 0 MiB of objects"):
        parse(spam)


def test_colliding_integer_keys_are_limited() -> None:
    """Python hashes ints modulo 2**61 - 1: keys i * (2**61 - 1) all collide and make a dict quadratic."""
    modulus = (1 << 61) - 1
    items = b"".join(b"\x8a\x0a" + (i * modulus).to_bytes(10, "little", signed=True) + b"N" for i in range(1, 1100))
    with pytest.raises(PickleLimitError, match="more than 1000 huge integers as dict keys"):
        parse(b"\x80\x04}(" + items + b"u.")
    small = b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(5000))
    assert len(parse(b"\x80\x04}(" + small + b"u.").root) == 5000  # ordinary int keys are unlimited


def test_truncated_and_malformed_streams() -> None:
    with pytest.raises(PickleTruncatedError):
        parse(b"\x80\x04}")
    with pytest.raises(PickleTruncatedError):
        parse(b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"abc.")
    with pytest.raises(PickleError, match="stack underflow"):
        parse(b"\x80\x04.")
    with pytest.raises(PickleError, match="memo index"):
        parse(b"\x80\x02]p99999999999\n.")
    with pytest.raises(PickleError, match="unsupported pickle construct"):
        parse(b"\x80\x02\x82\x01.")


def test_setitems_on_a_record_and_cycles() -> None:
    """Items set on an OrderedDict record accumulate in place; a list that contains itself is walked once."""
    body = b"ccollections\nOrderedDict\n)R" + b"".join(b"X\x01\x00\x00\x00" + bytes([97 + i % 26]) + b"Ns"
                                                      for i in range(20000))  # fmt: skip
    root = parse(b"\x80\x02" + body + b".").root
    assert isinstance(root, Instance) and root.items is not None and len(root.items) == 20000
    cyclic = parse(b"\x80\x02]\x94h\x00a.").root  # L = []; L.append(L)
    assert cyclic[0] is cyclic and list(walk(cyclic)) == [cyclic]
    assert describe(cyclic) == "a list of 1 items" and repr(root) == "<reduce of collections.OrderedDict>"


def test_a_long_parameter_chain_does_not_recurse() -> None:
    node: Any = Instance(_pickle.Global("torch._utils", "_rebuild_tensor_v2"), ())
    for _ in range(100_000):
        node = Instance(_pickle.Global("torch._utils", "_rebuild_parameter"), (node, False, None))
    assert tensor_meta(node) == ("unknown", ())


def test_metadata_values_are_plain_and_short(tmp_path: Path) -> None:
    nested: Any = "leaf"
    for _ in range(200):
        nested = [nested]
    path = tmp_path / "meta.pt"
    torch.save({"state_dict": STATE, "random_ltd": nested, "step": 2**2000, "name": "x"}, path)
    info = inspect_checkpoint(path)
    assert info.metadata["random_ltd"] == "a list of 1 items"
    assert info.metadata["step"] == "an integer of 2001 bits" and info.metadata["name"] == "x"
    json.dumps(info.to_dict())


# --- what torch.load checks besides the ZIP structure ---------------------------------------------------


def _with_record(entries: list[tuple[str, bytes]], name: str, body: bytes | None) -> list[tuple[str, bytes]]:
    """``entries`` with the record ``name`` replaced by ``body`` (dropped if None)."""
    return [(n, body if n == name else c) for n, c in entries if n != name or body is not None]


RECORD_CASES = {
    "no version": ("archive/version", None, "has no version record"),
    "version not a number": ("archive/version", b"x\n", "version record holds b'x'"),
    "byteorder": ("archive/byteorder", b"middle", "neither 'little' nor 'big'"),
    "serialization id": ("archive/.data/serialization_id", b"\xff\xfe", "serialization_id record is not UTF-8"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_small_records_torch_reads(tmp_path: Path, entries: list[tuple[str, bytes]], case: str) -> None:
    name, body, message = RECORD_CASES[case]
    assert any(n == name for n, _ in entries)
    path = write_zip(tmp_path / "r.pt", _with_record(entries, name, body))
    with pytest.raises(Exception):  # noqa: B017  (torch's own error types vary: RuntimeError, ValueError...)
        torch.load(path, weights_only=True)
    with pytest.raises(MalformedCheckpointError, match=message):
        inspect_checkpoint(path)


def test_entries_marked_as_folders_and_unknown_flags(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    path = raw_zip(tmp_path / "f.pt", _stored(entries))
    data = bytearray(path.read_bytes())
    entry = bytes(data).index(b"PK\x01\x02")
    struct.pack_into("<I", data, entry + 38, 0x10)  # MS-DOS folder attribute on archive/data.pkl
    path.write_bytes(bytes(data))
    with pytest.raises(MalformedCheckpointError, match="marked as a folder"):
        inspect_checkpoint(path)
    path = raw_zip(tmp_path / "g.pt", _stored(entries), flags=0x4000)
    with pytest.raises(MalformedCheckpointError, match="ZIP features torch does not read"):
        inspect_checkpoint(path)


def _patched_pickle(tmp_path: Path, entries: list[tuple[str, bytes]], old: bytes, new: bytes) -> Path:
    pkl = dict(entries)["archive/data.pkl"]
    assert pkl.count(old) == 1, old
    return write_zip(tmp_path / "p.pt", _with_record(entries, "archive/data.pkl", pkl.replace(old, new)))


def test_tensor_records_are_checked_as_torch_does(tmp_path: Path, entries: list[tuple[str, bytes]]) -> None:
    pkl = dict(entries)["archive/data.pkl"]
    assert b"K\x06\x85" in pkl  # the 6-element float tensor's size (6,)
    cases = {
        b"K\x06\x85": (b"K\x07\x85", "reaches past its storage of 6 elements"),  # size 7 in a storage of 6
        b"X\x07\x00\x00\x00storage": (b"X\x07\x00\x00\x00storagf", "persistent id is not a tensor storage"),
    }
    for old, (new, message) in cases.items():
        path = _patched_pickle(tmp_path, entries, old, new)
        with pytest.raises(Exception):  # noqa: B017
            torch.load(path, weights_only=True)
        with pytest.raises(MalformedCheckpointError, match=message):
            inspect_checkpoint(path)


def test_rebuild_arity_is_checked(tmp_path: Path) -> None:
    main = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
        b"FloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x03NtQK\x00K\x03\x85K\x01\x85tRs."
    )  # _rebuild_tensor_v2(storage, 0, (3,), (1,)): two arguments short
    path = tmp_path / "l.pt"
    path.write_bytes(legacy_bytes(main, [("0", 3, b"\0" * 12)]))
    with pytest.raises(MalformedCheckpointError, match="_rebuild_tensor_v2 has 4 arguments"):
        inspect_checkpoint(path)
