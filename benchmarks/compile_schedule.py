"""Does a compiled random-LTD model compile once for a whole schedule of reserved lengths?

A stack of GPT-2-small-shaped blocks (H=768, 12 heads, SDPA; the middle blocks wrapped by
``RandomLayerTokenDrop`` and driven by a ``RandomLTDScheduler``) is compiled with inductor and
stepped (forward + backward) through a schedule of 12 distinct reserved lengths, the last one
``r = S`` (no dropping). The script reports, in one run:

* ``compilations``: dynamo's graph count over the whole schedule (target: <= 2);
* ``compile time``: the first step at each ``r`` minus a steady step, summed over the schedule,
  and the same for a static-shape compile at one ``r`` (for scale);
* steady-state step time at one ``r`` of the schedule, interleaved: the dynamic-shape model, the
  same stack compiled with a fixed ``reserved_length=r`` (static shapes), and eager
  (target: dynamic / static <= 1.10).

The defaults (4 blocks, B=4, S=128) keep a run at a few minutes on 2 CPU cores; a real model has
more blocks and a longer S, which scales compile and step time but not the number of graphs.

    python benchmarks/compile_schedule.py                 # the full measurement (inductor)
    python benchmarks/compile_schedule.py --smoke         # seconds: tiny sizes, aot_eager backend
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import finish, interleaved, median

from random_ltd_cli import RandomLayerTokenDrop, RandomLTDScheduler


class BlockStack(torch.nn.Module):
    """``blocks`` GPT-2 blocks; all but the first and the last wrapped (scheduler or fixed ``r``)."""

    def __init__(self, blocks: int, hidden: int, heads: int, seq: int) -> None:
        super().__init__()
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        cfg = GPT2Config(n_embd=hidden, n_head=heads, n_positions=seq, resid_pdrop=0.0, attn_pdrop=0.0,
                         embd_pdrop=0.0)
        cfg._attn_implementation = "sdpa"
        self.h = torch.nn.ModuleList(GPT2Block(cfg, layer_idx=i) for i in range(blocks))

    def wrap(self, **how: object) -> BlockStack:
        for i in range(1, len(self.h) - 1):
            self.h[i] = RandomLayerTokenDrop(self.h[i], layer_id=i - 1, **how)  # type: ignore[arg-type]
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            out = block(x)
            x = out[0] if isinstance(out, tuple) else out
        return x


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--values", type=int, default=12, help="distinct r in the schedule (the last is r = S)")
    p.add_argument("--keep", type=int, default=None, help="r for the steady-state comparison (default ~S/2)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse inductor's on-disk cache (default: a fresh one, so compile times are cold)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, aot_eager, a couple of repeats")
    p.add_argument("--json", dest="json_path", default=None, help="where to write the JSON (default results/)")
    a = p.parse_args(argv)
    if a.smoke:
        a.blocks, a.batch, a.seq, a.hidden, a.heads, a.repeats, a.warmup, a.values = 3, 2, 48, 32, 2, 2, 1, 6
        a.backend = "aot_eager"
    from torch._dynamo.utils import counters

    cold = None if a.warm_cache else tempfile.TemporaryDirectory(prefix="compile_schedule_")
    if cold is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold.name  # read by inductor at each compile

    step = max(1, a.seq // 16)  # r = S - (n-1)*step, ..., S - step, S
    lo = a.seq - (a.values - 1) * step
    if lo <= 0:
        p.error(f"--values {a.values} do not fit below S={a.seq} in steps of {step}")
    sched = RandomLTDScheduler(min_value=lo, max_value=a.seq, require_steps=a.values - 1, seq_per_step=step,
                               total_layer_num=a.blocks, random_ltd_layer_num=a.blocks - 2, global_batch_size=a.batch)
    schedule = [sched.value_at(g) for g in range(a.values)]
    if len(set(schedule)) != a.values or schedule[-1] != a.seq:
        p.error(f"the schedule {schedule} does not have {a.values} distinct values ending at S={a.seq}")
    keep = a.keep or min(schedule, key=lambda v: abs(v - a.seq // 2))
    torch.manual_seed(0)
    base = BlockStack(a.blocks, a.hidden, a.heads, a.seq).train()
    dyn_model = copy.deepcopy(base).wrap(scheduler=sched)
    static_model = copy.deepcopy(base).wrap(reserved_length=keep)
    eager_model = copy.deepcopy(base).wrap(reserved_length=keep)
    x = torch.randn(a.batch, a.seq, a.hidden)

    def step_of(model: torch.nn.Module) -> float:
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        return time.perf_counter() - t0

    torch._dynamo.reset()
    counters.clear()
    dyn = torch.compile(dyn_model, backend=a.backend)
    first: dict[int, float] = {}
    for g, r in enumerate(schedule):  # one pass over the schedule: the first call at each r compiles, if anything
        sched.update_seq(g)
        first[r] = step_of(dyn)
        step_of(dyn)  # a second call at this r: a graph that recompiles per r would show here only once
    compilations = int(counters["stats"]["unique_graphs"])
    sched.load_state_dict({**sched.state_dict(), "current_value": keep})  # back to r = keep for steady timing

    static = torch.compile(static_model, backend=a.backend)
    static_first = step_of(static)
    static_compilations = int(counters["stats"]["unique_graphs"]) - compilations

    times = interleaved({"dynamic": lambda: step_of(dyn), "static": lambda: step_of(static),
                         "eager": lambda: step_of(eager_model)}, a.repeats, a.warmup, "cpu")
    t_dyn, t_static, t_eager = median(times["dynamic"]), median(times["static"]), median(times["eager"])
    compile_s = sum(first.values()) - len(first) * t_dyn
    static_compile_s = static_first - t_static
    result = {
        "benchmark": "compile_schedule",
        "config": {"blocks": a.blocks, "wrapped_blocks": a.blocks - 2, "batch": a.batch, "seq": a.seq,
                   "hidden": a.hidden, "heads": a.heads, "backend": a.backend, "schedule": schedule, "keep": keep,
                   "repeats": a.repeats, "cold_cache": cold is not None},
        "compilations": compilations,
        "static_compilations": static_compilations,
        "compile_s": {"dynamic_whole_schedule": compile_s, "static_one_r": static_compile_s},
        "first_step_s": {str(r): t for r, t in first.items()},
        "median_step_s": {"dynamic": t_dyn, "static": t_static, "eager": t_eager},
        "ratio_dynamic_over_static": t_dyn / t_static,
        "ratio_dynamic_over_eager": t_dyn / t_eager,
        "targets": {"compilations": 2, "ratio_dynamic_over_static": 1.10},
    }
    title = (f"compile over a schedule: {a.blocks} GPT-2 blocks H={a.hidden}, B={a.batch}, S={a.seq}, "
             f"{len(schedule)} values of r ({schedule[0]}..{schedule[-1]}), {a.backend} on cpu")
    rows = [("compilations (schedule)", f"{compilations}"), ("compile time, schedule", f"{compile_s:.1f} s"),
            ("compile time, static one r", f"{static_compile_s:.1f} s"),
            (f"step at r={keep}: dynamic", f"{t_dyn * 1e3:.1f} ms"), ("step: static", f"{t_static * 1e3:.1f} ms"),
            ("step: eager", f"{t_eager * 1e3:.1f} ms"), ("ratio dynamic / static", f"{t_dyn / t_static:.3f}"),
            ("ratio dynamic / eager", f"{t_dyn / t_eager:.3f}"), ("targets", "<= 2 graphs, <= 1.10")]
    if cold is not None:
        cold.cleanup()
    return finish("compile_schedule", title, rows, result, argv, a.smoke, a.json_path, "cpu")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
