"""Two CPU processes with gloo: DDP sampling independence / shared seeds, and FSDP2 (fully_shard) training."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from random_ltd_cli import convert_to_random_ltd, random_ltd_layers
from random_ltd_cli.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny() -> GPT:
    torch.manual_seed(0)  # every rank builds the same model
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=4, n_head=2, n_embd=32))


def _batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 50, (2, 32), generator=g) for _ in range(steps)]


def _record(model: torch.nn.Module) -> list[list[list[int]]]:
    calls: list[list[list[int]]] = []
    for _, w in random_ltd_layers(model)[:1]:
        inner = w.sampler

        def rec(*a: Any, _inner: Any = inner, **k: Any) -> torch.Tensor:
            idx = _inner(*a, **k)
            calls.append(idx.tolist())
            return idx

        w.sampler = rec
    return calls


def _ddp_worker(rank: int, world: int, port: int, out: str, seed: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = convert_to_random_ltd(_tiny(), reserved_length=8, seed=seed)
        calls = _record(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model.train())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(0)  # ranks seeded alike, as Trainer.set_seed does
        losses = []
        for batch in _batches(2):
            _, loss = ddp(batch, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"calls": calls, "losses": losses}))
        del ddp, opt
    except BaseException:
        dist.destroy_process_group()
        raise
    _shutdown()


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = convert_to_random_ltd(_tiny(), reserved_length=8, seed=7)  # convert first, then shard
        for block in model.transformer["h"]:
            fully_shard(block)
        fully_shard(model)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"losses": _train(model.train(), 3)}))
        del model
    except BaseException:
        dist.destroy_process_group()
        raise
    _shutdown()


def _shutdown() -> None:
    # Wait for the other rank, tear gloo down, and leave without the interpreter's teardown: gloo's
    # background threads occasionally abort a process at exit ("terminate called without an active
    # exception") after all its work is done and its results are written.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train(model: torch.nn.Module, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for batch in _batches(steps):  # every rank gets the same batch: the mean gradient equals one process's
        _, loss = model(batch, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _spawn(fn: Any, tmp_path: Path, *args: Any) -> list[dict[str, Any]]:
    mp.spawn(fn, args=(2, _free_port(), str(tmp_path), *args), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_ranks_sample_independently_by_default(tmp_path: Path) -> None:
    r0, r1 = _spawn(_ddp_worker, tmp_path, None)
    assert len(r0["calls"]) == 2 and all(len(row) == 8 for call in r0["calls"] for row in call)
    assert r0["calls"] != r1["calls"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))


def test_ddp_ranks_share_indices_with_a_shared_seed(tmp_path: Path) -> None:
    # what tensor-parallel groups need: the same seed draws the same indices on every rank
    r0, r1 = _spawn(_ddp_worker, tmp_path, 11)
    assert r0["calls"] == r1["calls"]
    assert r0["losses"] == r1["losses"]


def test_fsdp2_fully_shard_trains_like_one_process(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2 is available)

    r0, r1 = _spawn(_fsdp_worker, tmp_path)
    reference = _train(convert_to_random_ltd(_tiny(), reserved_length=8, seed=7).train(), 3)
    assert r0["losses"] == pytest.approx(reference, rel=1e-5)
    assert r1["losses"] == pytest.approx(reference, rel=1e-5)
