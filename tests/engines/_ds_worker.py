"""DeepSpeed's engine on CPU (one gloo rank), run by test_deepspeed.py in a subprocess.

``python _ds_worker.py write OUT``: convert a tiny GPT, ``deepspeed.initialize`` it with ZeRO 2 and 3
(and the pipeline engine), train a few steps with tokens dropped, ``save_checkpoint`` under OUT, and
record facts as OUT/<name>.json. ``python _ds_worker.py reload OUT``: load the stripped folders into
engines built on the unconverted model and record what they hold.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from random_ltd_cli import RandomLTDScheduler, convert_to_random_ltd
from random_ltd_cli.layer import RandomLayerTokenDrop
from random_ltd_cli.model import GPT, GPTConfig

SEQ = 32
STEPS = 3
LTD = {  # DeepSpeed's own block, read by RandomLTDScheduler.from_deepspeed
    "enabled": True,
    "total_layer_num": 4,
    "random_ltd_layer_num": 2,
    "random_ltd_layer_id": [1, 2],
    "model_mask_name": "attention_mask",
    "model_type": "decoder",
    "hidden_state_order": "batch_seq_dim",
    "random_ltd_schedule": {
        "min_value": 8,
        "max_value": SEQ,
        "schedule_type": "fixed_linear",
        "schedule_config": {"require_steps": 6, "seq_per_step": 8},
    },
}


def ds_config(stage: int) -> dict[str, Any]:
    return {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "steps_per_print": 10_000,
        "zero_optimization": {"stage": stage},
        "data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": LTD}},
    }


def tiny() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=SEQ, n_layer=4, n_head=2, n_embd=32))
    # a persistent buffer inside a wrapped block: ZeRO-3 keeps buffers whole, parameters as placeholders
    model.transformer["h"][1].register_buffer("scale", torch.full((32,), 2.0))
    return model


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (2, SEQ), generator=g) for _ in range(n)]


def record_kept(model: nn.Module) -> list[int]:
    """The number of tokens each wrapped layer kept, call by call."""
    kept: list[int] = []
    for _, module in model.named_modules():
        if isinstance(module, RandomLayerTokenDrop):
            inner = module.sampler

            def sample(*args: Any, _inner: Any = inner, **kwargs: Any) -> torch.Tensor:
                idx = _inner(*args, **kwargs)
                kept.append(int(idx.shape[1]))
                return idx

            module.sampler = sample
    return kept


def write(out: Path) -> None:
    import deepspeed

    for stage in (2, 3):
        cfg = ds_config(stage)
        sched = RandomLTDScheduler.from_deepspeed(cfg)
        model = convert_to_random_ltd(tiny(), scheduler=sched, seed=0)
        kept = record_kept(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        losses = []
        for batch in batches(STEPS):
            sched.update_seq(engine.global_steps)
            _, loss = engine(batch, batch)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        engine.save_checkpoint(str(out / f"zero{stage}"))
        facts = {
            "losses": losses,
            "kept": kept,
            "ours": sched.state_dict(),
            "theirs": engine.random_ltd_scheduler.state_dict(),
            "names": list(model.state_dict()),
            "trained": _full_state(engine),
        }
        (out / f"zero{stage}.json").write_text(json.dumps(facts))
        del engine
    write_pipeline(out)


class Embed(nn.Module):
    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.wte, self.wpe = gpt.transformer["wte"], gpt.transformer["wpe"]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))


class Head(nn.Module):
    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f, self.head = gpt.transformer["ln_f"], nn.Linear(32, 50, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


def write_pipeline(out: Path) -> None:
    """The pipeline engine (one stage) saves one ``layer_XX-model_states.pt`` per layer."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    gpt = tiny()
    layers = nn.Sequential(Embed(gpt), *gpt.transformer["h"], Head(gpt))
    convert_to_random_ltd(layers, type(gpt.transformer["h"][0]), layers=[1, 2], reserved_length=16, seed=0)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    pipe = PipelineModule(layers=list(layers), num_stages=1, loss_fn=loss_fn, partition_method="uniform")
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10_000}
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=opt, config=cfg)
    data = iter([(b, b) for b in batches(2)])
    engine.train_batch(data_iter=data)
    engine.save_checkpoint(str(out / "pipe"))
    del engine


def _engine(model: nn.Module, stage: int) -> Any:
    import deepspeed

    cfg = ds_config(stage)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]


def _full_state(engine: Any) -> dict[str, list[float]]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params if engine.zero_optimization_stage() == 3 else []):
        return {k: v.detach().flatten()[:4].tolist() for k, v in engine.module.state_dict().items()}


def reload(out: Path) -> None:
    """Load each stripped folder into an engine on the unconverted model; record weights and the schedule."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for stage in (2, 3):
        folder = out / f"zero{stage}.stripped"
        engine = _engine(tiny(), stage)
        engine.load_checkpoint(str(folder))
        facts: dict[str, Any] = {"loaded": _full_state(engine), "theirs": engine.random_ltd_scheduler.state_dict()}
        # resume: our scheduler, built from the engine's config, takes DeepSpeed's saved state and continues
        sched = RandomLTDScheduler.from_deepspeed(ds_config(stage))
        sched.load_state_dict(engine.random_ltd_scheduler.state_dict())
        resumed = []
        for batch in batches(STEPS + 2)[STEPS:]:
            sched.update_seq(engine.global_steps)
            loss = engine(batch, batch)[1]
            engine.backward(loss)
            engine.step()
            resumed.append([sched.get_current_seq(), sched.consumed_layer_tokens])
        facts["resumed"] = resumed
        facts["theirs_after"] = engine.random_ltd_scheduler.state_dict()
        facts["ours_after"] = sched.state_dict()
        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(folder))
        facts["fp32_names"] = list(consolidated)
        plain = tiny()
        facts["strict"] = str(plain.load_state_dict(consolidated, strict=True))
        facts["fp32"] = {k: v.flatten()[:4].tolist() for k, v in plain.state_dict().items()}
        (out / f"reload{stage}.json").write_text(json.dumps(facts))
        del engine


def docs(out: Path) -> None:
    """Run the examples of docs/deepspeed.md: the training script, then the resume snippet on a new engine."""
    import re

    import deepspeed

    text = (Path(__file__).resolve().parents[2] / "docs" / "deepspeed.md").read_text()
    train, resume = re.findall(r"```python\n(.*?)```", text, re.S)
    os.chdir(out)
    ns: dict[str, Any] = {}
    exec(compile(train, "docs/deepspeed.md", "exec"), ns)
    cfg, trained = ns["ds_config"], ns["sched"].state_dict()
    sched = RandomLTDScheduler.from_deepspeed(cfg)
    model = convert_to_random_ltd(GPT(GPTConfig(vocab_size=50, block_size=SEQ, n_layer=4, n_embd=32, n_head=2)),
                                  ds_config=cfg, scheduler=sched)  # fmt: skip
    engine = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)[0]
    exec(compile(resume, "docs/deepspeed.md", "exec"), {"engine": engine, "sched": sched})
    now, then = engine.module.state_dict(), ns["engine"].module.state_dict()
    same = list(now) == list(then) and all(torch.equal(now[k], then[k]) for k in now)
    facts = {"trained": trained, "resumed": sched.state_dict(), "same_weights": same}
    (out / "docs.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_PORT", sys.argv[3] if len(sys.argv) > 3 else "29511")
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is torch
    # DeepSpeed compiles a shared-memory all-reduce kernel the first time its CPU backend starts
    # (80 s on an idle 2-core machine, 200 s on a busy one). Only inference_all_reduce uses it, never
    # training, and one rank never reaches it: the tests do without it.
    ds_comm.build_shm_op = lambda: None
    code = 0
    try:
        {"write": write, "reload": reload, "docs": docs}[sys.argv[1]](Path(sys.argv[2]))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown: gloo's threads may abort it after the work is done
