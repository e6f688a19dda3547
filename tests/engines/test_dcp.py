"""torch.distributed.checkpoint folders written by FSDP2 (two gloo ranks) and ``dcp.save``: detect, inspect, strip."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from random_ltd_cli import convert_to_random_ltd
from random_ltd_cli.checkpoint import detect_format, inspect_checkpoint, load_state_dict, strip_checkpoint
from random_ltd_cli.errors import CheckpointError, KeyCollisionError, UnsafePickleError
from random_ltd_cli.keys import strip_key
from random_ltd_cli.model import GPT, GPTConfig

from .conftest import free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=4, n_head=2, n_embd=32))


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = convert_to_random_ltd(tiny(), reserved_length=8, seed=7)
        for block in model.transformer["h"]:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            batch = torch.randint(0, 50, (2, 32), generator=g)
            model(batch, batch)[1].backward()
            opt.step()
            opt.zero_grad()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=os.path.join(out, "fsdp"))
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(out, "full.pt"))
        del model, opt
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may abort the interpreter's teardown after the work is done


def _fsdp_load_worker(rank: int, world: int, port: int, out: str) -> None:
    """Load the stripped folder into the UNCONVERTED model, sharded by FSDP2 on two ranks, with its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny(seed=5)
        for block in model.transformer["h"]:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(out, "plain"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        steps = [float(s["step"]) for s in opt.state.values()]
        if rank == 0:
            torch.save({"model": full, "steps": steps}, os.path.join(out, "loaded.pt"))
        del model, opt
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


def plain_dcp(folder: Path, state: dict[str, Any]) -> Path:
    dcp.save(state, checkpoint_id=str(folder))  # one process, no process group
    return folder


def test_fsdp2_folder_is_detected_inspected_stripped_and_loads_into_the_plain_model(fsdp_dir: Path, untouched) -> None:
    src = fsdp_dir / "fsdp"
    assert sorted(p.name for p in src.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert detect_format(src) == "dcp-dir"
    full = torch.load(fsdp_dir / "full.pt")
    info = inspect_checkpoint(src)
    assert info.wrapped_layers == ["model.transformer.h.1", "model.transformer.h.2", "optim.state.transformer.h.1",
                                   "optim.state.transformer.h.2"]  # fmt: skip
    model_tensors = {t.name: t for t in info.tensors if t.name.startswith("model.")}
    assert {k: tuple(v.shape) for k, v in full.items()} == {k[6:]: t.shape for k, t in model_tensors.items()}
    assert {t.dtype for t in info.tensors} == {"float32"}
    check = untouched(src)
    report = strip_checkpoint(src, fsdp_dir / "plain")
    check()
    assert report.format == "dcp-dir" and report.wrote
    pair = ("model.transformer.h.1.random_ltd_layer.attn.c_attn.weight", "model.transformer.h.1.attn.c_attn.weight")
    assert pair in report.renamed
    for name in ("__0_0.distcp", "__1_0.distcp"):  # data files: the same bytes
        assert (fsdp_dir / "plain" / name).read_bytes() == (src / name).read_bytes()
    assert inspect_checkpoint(fsdp_dir / "plain").wrapped_layers == []
    # dcp.load into the unconverted model: every weight equals the trained, gathered one
    plain = tiny(seed=1)
    state = {"model": plain.state_dict()}
    dcp.load(state, checkpoint_id=str(fsdp_dir / "plain"))
    plain.load_state_dict(state["model"])
    want = {strip_key(k): v for k, v in full.items()}
    assert set(plain.state_dict()) == set(want)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, want[name]), name
    # and into the unconverted model sharded by FSDP2 on two ranks, optimizer included
    mp.spawn(_fsdp_load_worker, args=(2, free_port(), str(fsdp_dir)), nprocs=2, join=True)
    loaded = torch.load(fsdp_dir / "loaded.pt")
    assert loaded["steps"] and set(loaded["steps"]) == {2.0}  # AdamW's step count came back with the moments
    assert set(loaded["model"]) == set(want)
    for name, value in loaded["model"].items():
        assert torch.equal(value, want[name]), name


def test_dcp_to_torch_save_of_a_stripped_folder_gives_plain_keys(fsdp_dir: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    stripped = strip_checkpoint(fsdp_dir / "fsdp", tmp_path / "plain").output
    dcp_to_torch_save(str(stripped), str(tmp_path / "one.pt"))
    saved = torch.load(tmp_path / "one.pt")
    plain = tiny(seed=1)
    plain.load_state_dict(saved["model"], strict=True)
    assert not any(".random_ltd_layer" in k for k in saved["optim"]["state"])
    full = torch.load(fsdp_dir / "full.pt")
    assert torch.equal(saved["model"]["transformer.h.1.attn.c_attn.weight"],
                       full["transformer.h.1.random_ltd_layer.attn.c_attn.weight"])  # fmt: skip


def test_dcp_save_of_a_plain_state_dict(tmp_path: Path, untouched) -> None:
    model = convert_to_random_ltd(tiny(), reserved_length=8)
    src = plain_dcp(tmp_path / "ckpt", {"model": model.state_dict(), "step": 7})
    info = inspect_checkpoint(src)
    assert info.format == "dcp-dir" and info.tensor_count == len(model.state_dict())
    assert info.metadata["non_tensor_entries"] == ["step"]
    assert "dcp_to_torch" in info.metadata["note"]
    dry = strip_checkpoint(src, dry_run=True)
    assert not dry.wrote and dry.renamed_count == 24 and not (tmp_path / "ckpt.stripped").exists()
    check = untouched(src)
    strip_checkpoint(src, in_place=False)
    check()
    report = strip_checkpoint(src, in_place=True)
    assert report.wrote and sorted(p.name for p in src.iterdir()) == [".metadata", "__0_0.distcp"]
    plain = tiny(seed=5)
    state: dict[str, Any] = {"model": plain.state_dict(), "step": 0}
    dcp.load(state, checkpoint_id=str(src))
    assert state["step"] == 7
    for name, value in state["model"].items():
        assert torch.equal(value, model.state_dict()[name.replace("h.1.", "h.1.random_ltd_layer.").replace(
            "h.2.", "h.2.random_ltd_layer.")]), name  # fmt: skip


def test_inspect_reads_no_tensor_bytes(tmp_path: Path) -> None:
    model = convert_to_random_ltd(tiny(), reserved_length=8)
    src = plain_dcp(tmp_path / "ckpt", {"model": model.state_dict()})
    before = inspect_checkpoint(src).to_dict(tensors=True)
    data = src / "__0_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)  # data unreadable as tensors: the report cannot change
    assert inspect_checkpoint(src).to_dict(tensors=True) == before


def test_full_weights_are_refused_with_the_consolidation_tool(tmp_path: Path) -> None:
    src = plain_dcp(tmp_path / "ckpt", {"model": tiny().state_dict()})
    with pytest.raises(CheckpointError) as err:
        load_state_dict(src)
    assert str(err.value) == (
        f"{src} is a torch.distributed.checkpoint folder, sharded over .distcp files; consolidate it with torch's "
        f"tool (python -m torch.distributed.checkpoint.format_utils dcp_to_torch {src} OUT.pt), then pass OUT.pt."
    )


def test_collisions_missing_data_and_foreign_globals_are_refused(tmp_path: Path, untouched) -> None:
    w = torch.ones(2)
    src = plain_dcp(tmp_path / "clash", {"a.random_ltd_layer.w": w, "a.w": w})
    check = untouched(src)
    with pytest.raises(KeyCollisionError, match=r"keys 'a.random_ltd_layer.w' and 'a.w' would both become 'a.w'"):
        strip_checkpoint(src)
    check()
    assert not (tmp_path / "clash.stripped").exists()

    gone = plain_dcp(tmp_path / "gone", {"a.random_ltd_layer.w": w})
    (gone / "__0_0.distcp").rename(gone / "__9_9.distcp")
    with pytest.raises(CheckpointError) as err:
        strip_checkpoint(gone)
    assert str(err.value) == (
        f"{gone / '.metadata'} needs the data file __0_0.distcp, which is missing; copy the whole checkpoint folder "
        "and retry."
    )

    nested = plain_dcp(tmp_path / "nested", {"a": {"random_ltd_layer": {"w": w}}})
    with pytest.raises(CheckpointError) as err:
        strip_checkpoint(nested)
    assert str(err.value) == (
        f"{nested / '.metadata'}: the entry 'a.random_ltd_layer.w' nests a dict under the key 'random_ltd_layer'; "
        "strip cannot rename a nesting level. Load the checkpoint, rename it in Python, and save it again."
    )
    assert not (tmp_path / "nested.stripped").exists()

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo owned",))

    evil = plain_dcp(tmp_path / "evil", {"a.random_ltd_layer.w": w})
    (evil / ".metadata").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UnsafePickleError, match=r"names Python globals that DCP metadata does not use: posix.system"):
        inspect_checkpoint(evil)
    with pytest.raises(UnsafePickleError):
        strip_checkpoint(evil)
    assert not (tmp_path / "evil.stripped").exists()


def test_dcp_sub_folders_of_a_run_folder_are_stripped(tmp_path: Path) -> None:
    # Accelerate's FSDP SHARDED_STATE_DICT: save_state writes DCP sub-folders beside its side files
    model = convert_to_random_ltd(tiny(), reserved_length=8)
    state = tmp_path / "state"
    plain_dcp(state / "pytorch_model_fsdp_0", {"model": model.state_dict()})
    (state / "random_states_0.pkl").write_bytes(pickle.dumps({"step": 1}))
    assert detect_format(state) == "run-dir"
    report = strip_checkpoint(state, tmp_path / "plain")
    assert report.renamed_count == 24 and report.wrote
    assert detect_format(tmp_path / "plain" / "pytorch_model_fsdp_0") == "dcp-dir"
    assert inspect_checkpoint(tmp_path / "plain").wrapped_layers == []
    assert (tmp_path / "plain" / "random_states_0.pkl").read_bytes() == (state / "random_states_0.pkl").read_bytes()
