"""DeepSpeed's engine on CPU with two gloo ranks, run by test_deepspeed_2ranks.py in one launch.

``python _ds2_worker.py OUT PORT``: two processes. For ZeRO stages 1, 2 and 3 each: convert the tiny GPT,
train a few steps with tokens dropped, ``save_checkpoint`` under OUT/zero<stage>; rank 0 runs the real
``random-ltd strip`` (no ``--trust-pickle``) and compares ``zero_to_fp32`` of the stripped folder with that
of the original; then both ranks ``load_checkpoint`` the stripped folder into an engine built on the
unconverted model. A ZeRO-0 folder saved without an optimizer is written too. Facts go to OUT/*.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from random_ltd_cli import RandomLTDScheduler, convert_to_random_ltd
from random_ltd_cli.keys import strip_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ds_worker import _full_state, ds_config, record_kept, tiny

WORLD = 2
STEPS = 3


def config(stage: int) -> dict[str, Any]:
    """ZeRO-2 and 3 with DeepSpeed's own random-LTD block (it then strips ``module`` but not its side tables
    when saving); ZeRO-1 without it (the engine sees only our wrapped model)."""
    cfg = ds_config(stage)
    cfg["train_batch_size"] = 2 * WORLD  # 2 sequences per rank
    if stage == 1:
        del cfg["data_efficiency"]
    return cfg


def batches(rank: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [torch.randint(0, 50, (2, 32), generator=g) for _ in range(n)]


def _strip(folder: Path) -> dict[str, Any]:
    cli = subprocess.run(
        [sys.executable, "-m", "random_ltd_cli", "strip", str(folder), "-o", f"{folder}.stripped"],
        capture_output=True, text=True,
    )  # fmt: skip
    return {"returncode": cli.returncode, "stderr": cli.stderr[-2000:]}


def _fp32(folder: Path, stripped: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    orig = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    new = get_fp32_state_dict_from_zero_checkpoint(str(stripped))
    renamed = {strip_key(k): v for k, v in orig.items()}
    plain = tiny()
    return {
        "orig_names": list(orig),
        "names": list(new),
        "extra": {k: v.tolist() for k, v in new.items() if k not in renamed},  # found only after strip
        "equal": [k for k in new if k in renamed] == list(renamed)
        and all(torch.equal(new[k], renamed[k]) for k in renamed),
        "strict": str(plain.load_state_dict(new, strict=True)),
    }


def run_stage(rank: int, stage: int, out: Path) -> None:
    import deepspeed
    import deepspeed.comm as dist

    cfg = config(stage)
    sched = RandomLTDScheduler.from_deepspeed(ds_config(stage))
    model = convert_to_random_ltd(tiny(), scheduler=sched, seed=0)
    kept = record_kept(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]
    for batch in batches(rank, STEPS):
        sched.update_seq(engine.global_steps)
        loss = engine(batch, batch)[1]
        engine.backward(loss)
        engine.step()
    folder = out / f"zero{stage}"
    engine.save_checkpoint(str(folder))
    trained = {strip_key(k): v for k, v in _full_state(engine).items()}
    facts: dict[str, Any] = {"kept": kept, "wrapped_names": list(model.state_dict())}
    del engine
    dist.barrier()
    if rank == 0:
        facts["strip"] = _strip(folder)
        if facts["strip"]["returncode"] == 0:
            facts["fp32"] = _fp32(folder, Path(f"{folder}.stripped"))
    dist.barrier()
    stripped = Path(f"{folder}.stripped")
    if stripped.is_dir():  # both ranks: the stripped folder into an engine on the unconverted model
        plain = tiny()
        engine = deepspeed.initialize(
            model=plain, optimizer=torch.optim.AdamW(plain.parameters(), lr=1e-3), config=config(stage)
        )[0]
        path, _ = engine.load_checkpoint(str(stripped))
        facts["loaded_from"] = path
        facts["loaded_equal"] = _full_state(engine) == trained
        facts["global_steps"] = engine.global_steps
        del engine
    (out / f"zero{stage}.rank{rank}.json").write_text(json.dumps(facts))
    dist.barrier()


def run_plain_zero0(rank: int, out: Path) -> None:
    """ZeRO-0 without an optimizer: model states only."""
    import deepspeed

    engine = deepspeed.initialize(model=convert_to_random_ltd(tiny(), reserved_length=8, seed=0), config=config(0))[0]
    engine.save_checkpoint(str(out / "zero0-noopt"))
    del engine


def worker(rank: int, out: str, port: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))  # fmt: skip
    torch.set_num_threads(1)
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # see _ds_worker.py: training never needs it
    ds_comm.build_shm_op = lambda: None
    import deepspeed

    code = 0
    try:
        deepspeed.init_distributed(dist_backend="gloo")
        for stage in (1, 2, 3):
            run_stage(rank, stage, Path(out))
        run_plain_zero0(rank, Path(out))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown: gloo's threads may abort it after the work is done


if __name__ == "__main__":
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, sys.argv[1], int(sys.argv[2]))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    codes = [p.exitcode for p in procs]
    print("exit codes", codes)
    sys.exit(0 if codes == [0] * WORLD else 1)
