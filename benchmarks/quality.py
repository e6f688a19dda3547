"""Does random-LTD keep quality while spending fewer layer-tokens? Three arms on the stdlib source.

Trains the built-in GPT (6 blocks, hidden 256, S=256) on byte tokens of the Python
standard library's ``*.py`` files (the demo's corpus and training loop), for a fixed
number of steps, in three arms that share the model init and the batches:

* ``baseline``: every block sees every token; LR by steps (warm-up, cosine);
* ``random-LTD (step LR)``: the middle blocks keep ``r`` tokens, ``r`` growing from S/4 to
  S over all steps (DeepSpeed's ``fixed_linear``); same step-based LR as the baseline;
* ``random-LTD (LayerToken LR)``: the same dropping; the LR follows consumed layer-tokens
  (``LayerTokenLRScheduler``: warm-up and cosine over this arm's own layer-token total).

Each seed trains the three arms interleaved step by step, so machine load hits all alike. The torch
thread count is chosen as the demo chooses it (``random_ltd_cli.demo.threads``; ``--threads N`` overrides)
and recorded in the JSON.
Reports eval loss at full length at equal steps and at equal wall-clock, consumed
layer-tokens, wall time, and the layer-tokens each arm needs to reach the baseline's final
loss; plots eval loss against wall time and against layer-tokens; writes every number to JSON.

    python benchmarks/quality.py                # the measurement (about 25 minutes on 2 CPU cores)
    python benchmarks/quality.py --smoke        # a seconds-long check that it runs (writes to a temp dir)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, write_json

from random_ltd_cli.demo.data import batch_offsets, eval_windows, load_corpus
from random_ltd_cli.demo.plot import XAxis
from random_ltd_cli.demo.threads import choose_threads
from random_ltd_cli.demo.train import Arm, ArmResult, EvalPoint, TrainConfig, train_arms

ROOT = Path(__file__).resolve().parent.parent
ARMS = (
    Arm("baseline", random_ltd=False, lr_schedule="step"),
    Arm("random-LTD (step LR)", random_ltd=True, lr_schedule="step"),
    Arm("random-LTD (LayerToken LR)", random_ltd=True, lr_schedule="layer_token"),
)


def make_config(a: argparse.Namespace, seed: int) -> TrainConfig:
    if a.smoke:
        return TrainConfig(
            n_layer=4, n_embd=32, n_head=2, seq_len=32, batch_size=4, steps=a.steps or 6, lr=3e-3, warmup_steps=1,
            eval_every=3, eval_sequences=8, eval_batch_size=8, seed=seed, seq_per_step=4,
        )  # fmt: skip
    steps = a.steps
    return TrainConfig(
        n_layer=6, n_embd=256, n_head=8, seq_len=256, batch_size=a.batch, steps=steps, lr=a.lr,
        warmup_steps=max(1, steps // 15), min_lr_ratio=0.1, eval_every=max(1, steps // 15), eval_sequences=64,
        eval_batch_size=16, seed=seed, min_frac=0.25, require_frac=1.0, seq_per_step=16,
    )  # fmt: skip


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value at ``x`` of ``(x, y)`` points sorted by x (clamped at the ends)."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def first_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest x where the piecewise-linear curve of ``(x, loss)`` falls to ``target`` (None: never)."""
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y1 <= target:
            return x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def seed_rows(results: list[ArmResult]) -> dict[str, dict[str, Any]]:
    """Per-arm numbers of one seed; equal wall-clock is the fastest arm's total train time in this seed."""
    base = results[0]
    t_equal = min(r.train_seconds for r in results)
    rows = {}
    for r in results:
        by_time = [(p.train_seconds, p.eval_loss) for p in r.history]
        by_tokens = [(float(p.layer_tokens), p.eval_loss) for p in r.history]
        reach = first_reach(by_tokens, base.final_eval_loss)
        rows[r.name] = {
            "eval_loss_equal_steps": r.final_eval_loss,
            "eval_loss_equal_time": interpolate(by_time, t_equal),
            "equal_time_seconds": t_equal,
            "layer_tokens": r.layer_tokens,
            "train_seconds": r.train_seconds,
            "layer_tokens_to_baseline_loss": reach,
        }
    return rows


def summarize(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean over seeds (and min/max of the equal-steps loss); ratios against the baseline's means."""
    out: dict[str, dict[str, Any]] = {}
    for name in per_seed[0]:
        rows = [seed[name] for seed in per_seed]
        losses = [r["eval_loss_equal_steps"] for r in rows]
        reach = [r["layer_tokens_to_baseline_loss"] for r in rows]
        out[name] = {
            "eval_loss_equal_steps": statistics.fmean(losses),
            "eval_loss_equal_steps_min": min(losses),
            "eval_loss_equal_steps_max": max(losses),
            "eval_loss_equal_time": statistics.fmean(r["eval_loss_equal_time"] for r in rows),
            "layer_tokens": statistics.fmean(r["layer_tokens"] for r in rows),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rows),
            "layer_tokens_to_baseline_loss": None if None in reach else statistics.fmean(reach),
            "layer_tokens_to_baseline_loss_per_seed": reach,
        }
    base = out[ARMS[0].name]
    for row in out.values():
        row["loss_change_equal_steps"] = row["eval_loss_equal_steps"] / base["eval_loss_equal_steps"] - 1
        row["loss_change_equal_time"] = row["eval_loss_equal_time"] / base["eval_loss_equal_time"] - 1
        row["layer_token_saving"] = 1 - row["layer_tokens"] / base["layer_tokens"]
        row["wall_time_saving"] = 1 - row["train_seconds"] / base["train_seconds"]
    return out


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def markdown_table(summary: dict[str, dict[str, Any]], seeds: int) -> str:
    """One row per arm, means over seeds; changes are relative to the baseline's mean."""
    lines = [
        f"| arm (mean of {seeds} seeds) | eval loss, equal steps (min-max) | vs baseline | "
        "eval loss, equal wall-clock | vs baseline | layer-tokens | vs baseline | train time | vs baseline | "
        "layer-tokens to reach the same seed's baseline final loss (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (name, r) in enumerate(summary.items()):
        reach_text = " / ".join(
            "not reached" if x is None else _count(x) for x in r["layer_tokens_to_baseline_loss_per_seed"]
        )

        def change(key: str, sign: int = 1, digits: int = 1, r: dict[str, Any] = r, first: bool = i == 0) -> str:
            return "-" if first else f"{sign * r[key]:+.{digits}%}"

        lines.append(
            f"| {name} | {r['eval_loss_equal_steps']:.4f} ({r['eval_loss_equal_steps_min']:.4f}-"
            f"{r['eval_loss_equal_steps_max']:.4f}) | {change('loss_change_equal_steps', 1, 2)} | "
            f"{r['eval_loss_equal_time']:.4f} | {change('loss_change_equal_time', 1, 2)} | "
            f"{_count(r['layer_tokens'])} | {change('layer_token_saving', -1)} | "
            f"{r['train_seconds']:.1f}s | {change('wall_time_saving', -1)} | {reach_text} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, list[ArmResult]], img_dir: Path) -> list[str]:
    from random_ltd_cli.demo.plot import plot_eval_curves

    curves = list(results.values())
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        title = "Eval loss at full length (each line one seed)"
        for name in ("quality_loss_vs_time.png", "quality_loss_vs_layer_tokens.png"):
            x: XAxis = "train_seconds" if "time" in name else "layer_tokens"
            path = plot_eval_curves(curves, img_dir / name, x=x, title=title).resolve()
            written.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'random-ltd[plot]')", file=sys.stderr)
    return written


def train_all(a: argparse.Namespace, started: float) -> tuple[dict[str, list[ArmResult]], dict[str, Any]]:
    """Train the three arms for every seed; returns the results per arm and a description of the corpus."""
    corpus = load_corpus(max_bytes=400_000 if a.smoke else None)
    results: dict[str, list[ArmResult]] = {arm.name: [] for arm in ARMS}
    for seed in a.seeds:
        cfg = make_config(a, seed)
        offsets = batch_offsets(corpus.train.numel(), cfg.steps, cfg.batch_size, cfg.seq_len, seed)
        evals = eval_windows(corpus.eval, cfg.eval_sequences, cfg.seq_len)
        every = max(1, cfg.steps // 10)

        def progress(arm: str, step: int, loss: float, seed: int = seed, every: int = every) -> None:
            if step % every == 0:
                print(f"seed {seed} {arm}: step {step} loss {loss:.3f} ({time.perf_counter() - started:.0f}s)",
                      file=sys.stderr, flush=True)  # fmt: skip

        for run in train_arms(cfg, corpus, list(ARMS), offsets, evals, progress):
            results[run.result.name].append(run.result)
    about = {
        "root": str(corpus.root),
        "train_tokens": corpus.train.numel(),
        "eval_tokens": corpus.eval.numel(),
        "train_files": len(corpus.train_files),
        "eval_files": len(corpus.eval_files),
    }
    return results, about


def report(results: dict[str, list[ArmResult]], seeds: list[int], img_dir: Path) -> dict[str, Any]:
    """Per-seed rows, the summary, the markdown table and the plots, from the runs."""
    per_seed = [seed_rows([runs[i] for runs in results.values()]) for i in range(len(seeds))]
    summary = summarize(per_seed)
    return {
        "summary": summary,
        "per_seed": dict(zip(map(str, seeds), per_seed, strict=True)),
        "images": plot(results, img_dir),
        "table_markdown": markdown_table(summary, len(seeds)),
    }


def load_runs(payload: dict[str, Any]) -> dict[str, list[ArmResult]]:
    """The :class:`ArmResult` objects saved in a quality JSON."""
    out: dict[str, list[ArmResult]] = {}
    for name, runs in payload["runs"].items():
        out[name] = []
        for run in runs:
            history = [EvalPoint(**point) for point in run["history"]]
            out[name].append(ArmResult(**{**run, "history": history}))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="steps per arm (default 300; 6 with --smoke)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps, output to a temp dir")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (default: chosen as the demo chooses; see docs/demo.md)")
    p.add_argument("--json", dest="json_path", default=None, help="default benchmarks/results/local/quality.json")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default docs/img)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="no training: recompute the table and plots from the runs saved in PATH")  # fmt: skip
    a = p.parse_args(argv)
    if a.steps is None and not a.smoke:
        a.steps = 300
    scratch = Path(tempfile.mkdtemp(prefix="quality-smoke-")) if a.smoke else None
    json_path = a.json_path or (str(scratch / "quality.json") if scratch else a.from_json)
    img_dir = Path(a.img_dir) if a.img_dir else (scratch if scratch else ROOT / "docs" / "img")

    if a.from_json:
        payload = json.loads(Path(a.from_json).read_text())
        payload.update(report(load_runs(payload), payload["seeds"], img_dir))
    else:
        import torch

        cfg = make_config(a, a.seeds[0])
        threads = choose_threads(cfg.batch_size * cfg.seq_len * cfg.n_embd, a.threads)
        torch.set_num_threads(threads.threads)
        print(f"torch threads: {threads.threads} ({threads.reason})", file=sys.stderr, flush=True)
        started = time.perf_counter()
        results, about = train_all(a, started)
        payload = {
            "benchmark": "quality",
            "description": "eval loss at full length of the built-in GPT on the stdlib source: baseline vs random-LTD",
            "config": make_config(a, a.seeds[0]).to_dict(),
            "seeds": a.seeds,
            "corpus": about,
            "machine": {**machine("cpu"), "threads_reason": threads.reason},
            "smoke": a.smoke,
            "total_seconds": time.perf_counter() - started,
            "runs": {name: [r.to_dict() for r in runs] for name, runs in results.items()},
        }
        payload.update(report(results, a.seeds, img_dir))
    out = write_json("quality", _finite(payload), json_path)
    print(payload["table_markdown"])
    images = payload["images"]
    print(f"wrote {out}" + (f" and {', '.join(images)}" if images else ""), file=sys.stderr)
    return payload


def _finite(value: Any) -> Any:
    """NaN and infinities as None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    main()
