"""What does the built-in verification cost? Once on the first step, and nothing after it?

A GPT-2-like model (Hugging Face ``GPT2LMHeadModel``, SDPA, dropout 0) is converted twice from the same
weights, ``verify="first"`` (the default: each wrapped layer checked against the reference on its first
dropping call) and ``verify="off"``, with the middle layers at a fixed ``r``. A training step is
forward + cross-entropy + backward + SGD step. Measured side by side, interleaved, in one run:

* **first step**: ``trials`` times, a fresh conversion of each kind runs its first step (the order of
  the two alternates between trials); ratio of medians ``first(verify) / first(off)``;
* **steady state**: the two converted models, and a second ``verify="off"`` model as a control, then take
  ``steps`` more steps in rotation; ratio of median step times ``verify / off`` (expected 1.00 within
  noise: no verification after the first step) beside the control's ``off / off`` (the noise itself).

    python benchmarks/verify_cost.py                 # the full measurement (a few minutes on 2 cores)
    python benchmarks/verify_cost.py --smoke         # a seconds-long check that it runs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import finish, interleaved, median, sync

from random_ltd_cli import convert_to_random_ltd


def make_model(layers: int, hidden: int, heads: int, seq: int, vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=hidden, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg)


def make_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def converted(base: torch.nn.Module, verify: str, keep: int) -> torch.nn.Module:
    """A fresh copy of ``base`` (same weights), converted with ``verify``."""
    model = copy.deepcopy(base).train()
    convert_to_random_ltd(model, reserved_length=keep, verify=verify, seed=0)
    return model


def floor(base: Any, ids: torch.Tensor, keep: int) -> Callable[[], None]:
    """What verification cannot do without: each wrapped (middle) block once on all S tokens and once on
    the r kept ones, no grad (the reference and the wrapper's own result, without any checking around them)."""
    blocks = list(base.transformer.h)[1:-1]
    hidden = int(base.config.n_embd)
    x_full = torch.randn(ids.shape[0], ids.shape[1], hidden, device=ids.device)
    x_kept = x_full[:, :keep].contiguous()

    def run() -> None:
        with torch.no_grad():
            for block in blocks:
                block(x_full)
                block(x_kept)

    return run


def first_steps(
    base: torch.nn.Module, ids: torch.Tensor, keep: int, trials: int, device: str
) -> dict[str, list[float]]:
    """``trials`` first steps of fresh conversions of each kind, alternating which goes first, and the floor."""
    times: dict[str, list[float]] = {"first": [], "off": [], "floor": []}
    run_floor = floor(base, ids, keep)
    for t in range(trials):
        order = ("first", "off") if t % 2 == 0 else ("off", "first")
        for verify in order:
            step = make_step(converted(base, verify, keep), ids)
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[verify].append(time.perf_counter() - t0)
        sync(device)
        t0 = time.perf_counter()
        run_floor()
        sync(device)
        times["floor"].append(time.perf_counter() - t0)
    return times


def quartiles(xs: list[float]) -> list[float]:
    """[25th, 50th, 75th] percentiles (the values themselves when there are fewer than 4)."""
    if len(xs) < 4:
        return sorted(xs)
    return statistics.quantiles(xs, n=4)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--keep", type=int, default=None, help="reserved length r (default S/2)")
    p.add_argument("--trials", type=int, default=7, help="fresh conversions of each kind for the first step")
    p.add_argument("--steps", type=int, default=20, help="steady-state steps of each model after the first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a couple of repeats")
    p.add_argument("--json", dest="json_path", default=None, help="where to write the JSON (default results/local/)")
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.hidden, a.heads, a.seq, a.batch, a.vocab, a.trials, a.steps = 4, 32, 2, 32, 2, 64, 2, 2
    keep = a.keep or a.seq // 2
    torch.manual_seed(0)
    base = make_model(a.layers, a.hidden, a.heads, a.seq, a.vocab).to(a.device)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)

    first = first_steps(base, ids, keep, a.trials, a.device)
    # Steady state: one model of each kind, past its first step, stepping alternately.
    steps = {}
    for name, verify in (("first", "first"), ("off", "off"), ("control", "off")):
        steps[name] = make_step(converted(base, verify, keep), ids)
        steps[name]()  # the first step (verification for "first")
    steady = interleaved(steps, a.steps, warmup=1, device=a.device)
    control = median(steady["control"]) / median(steady["off"])

    f_on, f_off = median(first["first"]), median(first["off"])
    s_on, s_off = median(steady["first"]), median(steady["off"])
    steady_q = quartiles([x / y for x, y in zip(steady["first"], steady["off"], strict=True)])
    result = {
        "benchmark": "verify_cost",
        "config": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "seq": a.seq, "batch": a.batch,
                   "vocab": a.vocab, "keep": keep, "wrapped_layers": max(0, a.layers - 2), "trials": a.trials,
                   "steps": a.steps},
        "first_step_s": {"verify_first": first["first"], "verify_off": first["off"]},
        "steady_step_s": {"verify_first": steady["first"], "verify_off": steady["off"],
                          "verify_off_control": steady["control"]},
        "median_s": {"first_step_verify": f_on, "first_step_off": f_off, "steady_verify": s_on, "steady_off": s_off},
        "ratio_first_step": f_on / f_off,
        "first_step_extra_s": f_on - f_off,
        "floor_s": median(first["floor"]),  # no-grad runs of the wrapped blocks at S and at r
        "first_step_extra_over_floor": (f_on - f_off) / median(first["floor"]),
        "ratio_steady_state": s_on / s_off,
        # a second verify="off" model in the same rotation: how far apart two identical models measure here
        "ratio_control_off_over_off": control,
        # the spread of the paired ratios (step i with / step i without) shows the noise of this machine
        "steady_pair_ratio_quartiles": steady_q,
        "first_pair_ratio_quartiles": quartiles([x / y for x, y in zip(first["first"], first["off"], strict=True)]),
        "target_steady_state": "1.00 within noise",
    }
    title = (f"verification cost: GPT-2 {a.layers} layers H={a.hidden}, B={a.batch}, S={a.seq}, r={keep}, "
             f"{max(0, a.layers - 2)} wrapped, on {a.device}")
    rows = [
        ("first step, verify=first", f"{f_on * 1e3:.1f} ms"), ("first step, verify=off", f"{f_off * 1e3:.1f} ms"),
        ("ratio first step", f"{f_on / f_off:.3f}"),
        ("floor: blocks at S and at r", f"{median(first['floor']) * 1e3:.1f} ms"),
        ("extra first step / floor", f"{(f_on - f_off) / median(first['floor']):.2f}"),
        ("steady step, verify=first", f"{s_on * 1e3:.1f} ms"), ("steady step, verify=off", f"{s_off * 1e3:.1f} ms"),
        ("ratio steady state", f"{s_on / s_off:.3f}"),
        ("steady pair ratios, quartiles", " / ".join(f"{q:.2f}" for q in steady_q)),
        ("control: off / off", f"{control:.3f}"),
        ("target (steady)", "1.00 +- noise"),
    ]
    return finish("verify_cost", title, rows, result, argv, a.smoke, a.json_path, a.device)


if __name__ == "__main__":
    main()
