"""torch.save files: nestings, zip and legacy layouts, record offsets, ZIP64, unsafe pickles, bad files."""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from random_ltd_cli.checkpoint import detect_format, inspect_checkpoint, load_state_dict, strip_checkpoint
from random_ltd_cli.checkpoint._zip import read_directory
from random_ltd_cli.errors import CheckpointError, KeyCollisionError, UnsafePickleError

from .ckpt_helpers import WRAPPED, assert_bitwise_equal, leftovers, load_strict, wrap_keys

LAYOUTS = [pytest.param(False, id="zip"), pytest.param(True, id="legacy")]


def save(obj: Any, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def nested(kind: str, state: OrderedDict) -> dict[str, Any]:
    """The common ways checkpoints nest a state dict."""
    if kind == "bare":
        return state  # type: ignore[return-value]
    if kind == "lightning":
        return {
            "epoch": 3,
            "global_step": 30,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": state,
            "optimizer_states": [{"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1}]}],
        }
    if kind == "swa":
        return {"state_dict": state, "callbacks": {"SWA": {"current_model_state": state}}}
    return {kind: state, "iteration": 7}


def weights(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "module", "model", "model_state_dict", "current_model_state"):
        if isinstance(obj, dict) and key in obj:
            return obj[key]
    return obj


@pytest.mark.parametrize("legacy", LAYOUTS)
@pytest.mark.parametrize("kind", ["bare", "lightning", "model", "module", "model_state_dict", "swa"])
def test_round_trip_every_nesting(tmp_path: Path, wrapped_state, plain_state, untouched, kind: str, legacy) -> None:
    src = save(nested(kind, wrapped_state), tmp_path / "ckpt.pt", legacy)
    check = untouched(src)
    report = strip_checkpoint(src)
    assert report.format == "torch" and report.output == tmp_path / "ckpt.stripped.pt"
    assert report.renamed_count == sum(k.startswith(tuple(p + "." for p in WRAPPED)) for k in plain_state)
    loaded = torch.load(report.output, weights_only=True)
    load_strict(weights(loaded), plain_state)
    if kind == "lightning":
        assert loaded["epoch"] == 3 and loaded["optimizer_states"][0]["param_groups"] == [{"lr": 0.1}]
    if kind == "swa":
        load_strict(loaded["callbacks"]["SWA"]["current_model_state"], plain_state)
    check()


@pytest.mark.parametrize("legacy", LAYOUTS)
def test_module_metadata_and_tied_storage(tmp_path: Path, wrapped_state, plain_state, legacy) -> None:
    src = save(wrapped_state, tmp_path / "w.pt", legacy)
    out = strip_checkpoint(src).output
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == list(plain_state)
    meta = loaded._metadata
    assert not [k for k in meta if "random_ltd_layer" in k]
    assert set(meta) == set(plain_state._metadata)
    # lm_head.weight and transformer.wte.weight still share one storage record
    assert (
        loaded["lm_head.weight"].untyped_storage().data_ptr()
        == loaded["transformer.wte.weight"].untyped_storage().data_ptr()
    )


def test_zip_records_keep_offsets_and_mmap_works(tmp_path: Path, wrapped_state, plain_state, monkeypatch) -> None:
    src = save(wrapped_state, tmp_path / "w.pt")
    out = strip_checkpoint(src).output
    with open(src, "rb") as a, open(out, "rb") as b:
        before, after = read_directory(a.fileno()), read_directory(b.fileno())
    assert list(before) == list(after)
    for name, rec in before.items():
        if not name.endswith("data.pkl"):
            assert after[name].data_offset == rec.data_offset and after[name].crc == rec.crc
    assert zipfile.ZipFile(out).testzip() is None
    # torch's fast path computes storage offsets from the miniz layout; it must still hold
    from torch.utils.serialization import config

    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # asserts computed offsets == real ones
    config.load.calculate_storage_offsets = True
    try:
        load_strict(torch.load(out, weights_only=True, mmap=True), plain_state)
    finally:
        config.load.calculate_storage_offsets = False


def test_zip64_archive_without_descriptors(tmp_path: Path, wrapped_state, plain_state) -> None:
    """A ZIP written by Python's zipfile with ZIP64 records (and sizes in local headers) is rewritten too."""
    src = save(wrapped_state, tmp_path / "w.pt")
    z64 = tmp_path / "w64.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(z64, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            with zout.open(info.filename, "w", force_zip64=True) as f:
                f.write(zin.read(info.filename))
    load_strict(torch.load(strip_checkpoint(z64).output, weights_only=True), plain_state)


def test_many_renames_leave_a_gap_when_the_header_cannot_hold_them(tmp_path: Path) -> None:
    state = OrderedDict((f"blocks.{i}.random_ltd_layer.w", torch.full((1,), float(i))) for i in range(4000))
    src = save(state, tmp_path / "many.pt")
    out = strip_checkpoint(src).output
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == [f"blocks.{i}.w" for i in range(4000)]
    assert loaded["blocks.3999.w"].item() == 3999.0
    assert zipfile.ZipFile(out).testzip() is None


def test_protocol_4_pickle(tmp_path: Path, wrapped_state, plain_state) -> None:
    """torch.load(weights_only=True) does not read protocol-4 opcodes: refused, unless trusted (issue 18)."""
    src = tmp_path / "p4.pt"
    torch.save(dict(wrapped_state), src, pickle_protocol=4)
    with pytest.raises(UnsafePickleError, match="opcodes that torch.load\\(weights_only=True\\) does not read: FRAME"):
        strip_checkpoint(src)
    out = strip_checkpoint(src, trust_pickle=True).output
    load_strict(torch.load(out, weights_only=False), plain_state)  # our own test file: trusted


def test_inspect_without_loading(tmp_path: Path, wrapped_state, plain_state) -> None:
    src = save(
        {"state_dict": wrapped_state, "epoch": 2, "random_ltd": {"random_ltd": '{"schedule": {"r": 4}}'}},
        tmp_path / "i.ckpt",
    )
    info = inspect_checkpoint(src)
    assert info.format == "torch" and detect_format(src) == "torch"
    assert info.tensor_count == len(plain_state)
    assert info.parameter_count == sum(v.numel() for v in plain_state.values())
    assert info.dtypes == {"float32": len(plain_state)}
    assert info.wrapped_layers == list(WRAPPED)
    assert info.metadata == {"epoch": 2, "random_ltd": {"schedule": {"r": 4}}}
    assert [t.shape for t in info.tensors] == [tuple(v.shape) for v in plain_state.values()]


def test_collision_is_refused(tmp_path: Path) -> None:
    src = save({"model": {"a.random_ltd_layer.w": torch.ones(1), "a.w": torch.ones(1)}}, tmp_path / "c.pt")
    with pytest.raises(KeyCollisionError, match=r"would both become 'a\.w'"):
        strip_checkpoint(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


class Evil:
    """Unpickling this runs code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("legacy", LAYOUTS)
def test_malicious_pickle_never_runs(tmp_path: Path, legacy, untouched) -> None:
    marker = tmp_path / "pwned"
    src = save({"h.random_ltd_layer.w": torch.ones(2), "payload": Evil(marker)}, tmp_path / "evil.pt", legacy)
    check = untouched(src)
    with pytest.raises(UnsafePickleError, match=r"builtins\.exec.*--trust-pickle"):
        strip_checkpoint(src)
    with pytest.raises(UnsafePickleError, match=r"builtins\.exec"):
        load_state_dict(src)
    with pytest.raises(UnsafePickleError):
        inspect_checkpoint(src)
    # Trusting the file lets strip rewrite it, but random-ltd still never runs the payload.
    report = strip_checkpoint(src, trust_pickle=True)
    assert report.renamed == [("h.random_ltd_layer.w", "h.w")]
    inspect_checkpoint(report.output, trust_pickle=True)
    assert not marker.exists()
    check()


def test_torch_allowlist_agrees_with_torch() -> None:
    from torch._weights_only_unpickler import _get_allowed_globals

    from random_ltd_cli.checkpoint._torch import is_safe_global

    assert [g for g in _get_allowed_globals() if not is_safe_global(g)] == []
    for unsafe in (
        "builtins.exec",
        "os.system",
        "posix.system",
        "torch.load",
        "torch._utils._rebuild_xla_tensor",
        "collections.defaultdict",
        "numpy.core.multiarray._reconstruct",
        "__builtin__.eval",
    ):
        assert not is_safe_global(unsafe), unsafe


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupted"),  # truncated zip
        (
            lambda b: b.replace(
                b"transformer.h.0.random_ltd_layer.ln_1.weight", b"transformer.h.0.random_ltd_layer.ln_1.weighX", 1
            ),
            "CRC-32",
        ),  # flipped pickle byte
        (lambda b: b"\x80\x02}q\x00.", "plain pickle"),  # a pickle that is not a torch file
    ],
)
def test_bad_torch_files(tmp_path: Path, wrapped_state, make, message) -> None:
    good = save(wrapped_state, tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make(good.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        strip_checkpoint(bad)
    assert not (tmp_path / "bad.stripped.pt").exists() and not leftovers(tmp_path)


def test_truncated_legacy_file(tmp_path: Path, wrapped_state) -> None:
    good = save(wrapped_state, tmp_path / "good.pt", legacy=True)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        strip_checkpoint(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match="TorchScript"):
        strip_checkpoint(path)


def test_load_state_dict_unwraps_and_maps(tmp_path: Path, wrapped_state, plain_state) -> None:
    src = save({"state_dict": wrap_keys(plain_state), "epoch": 1}, tmp_path / "l.ckpt")
    got = load_state_dict(src)
    assert_bitwise_equal(got, wrap_keys(plain_state))
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_state_dict(save({"epoch": 1}, tmp_path / "empty.pt"))
    assert os.path.getsize(src) > 0


@pytest.mark.parametrize("legacy", LAYOUTS)
def test_in_place_replaces_the_file_atomically(tmp_path: Path, wrapped_state, plain_state, legacy) -> None:
    src = save(wrapped_state, tmp_path / "w.pth", legacy)
    src.chmod(0o640)
    report = strip_checkpoint(src, in_place=True)
    assert report.wrote and report.output == src
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]
    assert src.stat().st_mode & 0o777 == 0o640  # permissions kept
    load_strict(torch.load(src, weights_only=True), plain_state)
