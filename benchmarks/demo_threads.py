"""How many torch threads should the demo use? 1 vs all cores, side by side, quiet or under load.

For each of the demo's model sizes (``tiny``: 4 blocks, hidden 32, S=32; ``default``: 6 blocks,
hidden 128, S=128), one baseline/random-LTD pair of trainers is built per thread count (the demo's
own ``ArmTrainer``, same init, same batches, ``r`` from S/4 to S over ``--steps``). The pairs are
trained in alternating blocks of ``--block`` steps: a block of the 1-thread pair, a block of the
N-thread pair, then the other order, ... (inside a block the two arms alternate step by step, as in
the demo). Load that comes and goes during the run so hits every thread count and both arms alike;
each pair ends with the demo's two time columns (train time per arm, evaluation excluded) for its
thread count.

``--load K`` starts K CPU-bound busy loops beside the measurement (each stops by itself after
``--load-seconds``, and all are killed when the run ends), to measure the "busy machine" case on
purpose; the 1-minute load average before and after the run is recorded either way.

    python benchmarks/demo_threads.py                       # both sizes, as the machine is now
    python benchmarks/demo_threads.py --load 2              # the same beside two busy loops
    python benchmarks/demo_threads.py --smoke --json /tmp/t.json   # a seconds-long check that it runs

Results go to ``benchmarks/results/local/demo_threads.json`` unless ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _timing import machine, write_json

from random_ltd_cli.demo.data import batch_offsets, eval_windows, load_corpus
from random_ltd_cli.demo.run import ARMS, DemoConfig
from random_ltd_cli.demo.threads import available_cpus, choose_threads
from random_ltd_cli.demo.train import ArmTrainer

BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_loops(count: int, seconds: float) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` CPU-bound processes that stop by themselves after ``seconds``; killed on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)]) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def measure_size(size: str, steps: int, thread_counts: list[int], block: int) -> dict[str, Any]:
    """Train one baseline/random-LTD pair per thread count in alternating blocks; the demo's time columns."""
    config = DemoConfig.tiny(steps) if size == "tiny" else DemoConfig.default(steps)
    cfg = config.train
    cfg.eval_every = steps  # evaluate at step 0 and after the last step only (not timed anyway)
    corpus = load_corpus(config.corpus_root, max_bytes=config.max_bytes)
    offsets = batch_offsets(corpus.train.numel(), cfg.steps, cfg.batch_size, cfg.seq_len, cfg.seed)
    evals = eval_windows(corpus.eval, cfg.eval_sequences, cfg.seq_len)
    pairs = {}
    for t in thread_counts:
        torch.set_num_threads(t)
        pairs[t] = [ArmTrainer(cfg, corpus, arm, offsets, evals) for arm in ARMS]
    order = list(thread_counts)
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for t in order:
            torch.set_num_threads(t)
            for _ in range(n):
                for trainer in pairs[t]:
                    trainer.step()
        done += n
        order.reverse()
    rows = {}
    for t, trainers in pairs.items():
        torch.set_num_threads(t)
        base, ltd = (trainer.finish().result for trainer in trainers)
        rows[str(t)] = {
            "baseline_train_s": base.train_seconds,
            "random_ltd_train_s": ltd.train_seconds,
            "both_train_s": base.train_seconds + ltd.train_seconds,
            "time_saving": 1 - ltd.train_seconds / base.train_seconds,
            "layer_token_saving": 1 - ltd.layer_tokens / base.layer_tokens,
            "final_eval_loss": {"baseline": base.final_eval_loss, "random-LTD": ltd.final_eval_loss},
        }
    one = rows[str(thread_counts[0])]["both_train_s"]
    for row in rows.values():
        row["time_vs_first"] = row["both_train_s"] / one
    return {"model": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "seq_len", "batch_size")},
            "steps": steps, "block": block, "threads": rows}


def work(size: str) -> int:
    cfg = (DemoConfig.tiny() if size == "tiny" else DemoConfig.default()).train
    return cfg.batch_size * cfg.seq_len * cfg.n_embd


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=["tiny", "default"], default=["tiny", "default"])
    p.add_argument("--steps", type=int, default=None, help="steps per arm (default: 60 tiny, 40 default)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all CPUs)")
    p.add_argument("--block", type=int, default=5, help="steps per block before switching thread count")
    p.add_argument("--load", type=int, default=0, help="CPU-bound busy loops to run beside the measurement")
    p.add_argument("--load-seconds", type=float, default=900.0, help="each busy loop stops by itself after this")
    p.add_argument("--smoke", action="store_true", help="tiny size, 4 steps")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args(argv)
    cpus = available_cpus()
    threads = a.threads or sorted({1, cpus})
    sizes = ["tiny"] if a.smoke else a.sizes
    load_before = os.getloadavg()
    chosen = {size: choose_threads(work(size), env={}) for size in sizes}
    started = time.perf_counter()
    with busy_loops(a.load, a.load_seconds):
        results = {}
        for size in sizes:
            steps = 4 if a.smoke else (a.steps or (60 if size == "tiny" else 40))
            results[size] = measure_size(size, steps, threads, 2 if a.smoke else a.block)
            print(f"{size}: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
        load_after = os.getloadavg()
    payload = {
        "benchmark": "demo_threads",
        "description": "demo training time per arm at 1 vs N torch threads, pairs trained in alternating blocks",
        "busy_loops": a.load,
        "loadavg_1min_before": load_before[0],
        "loadavg_1min_after": load_after[0],
        "available_cpus": cpus,
        "rule_would_choose": {size: {"threads": c.threads, "reason": c.reason} for size, c in chosen.items()},
        "results": results,
        "total_seconds": time.perf_counter() - started,
        "machine": machine("cpu"),
        "command": "python benchmarks/demo_threads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"demo training time by torch threads ({cpus} CPUs available, {a.load} busy loops beside; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    print("| model | threads | baseline | random-LTD | time saved | layer-tokens saved | both arms vs first |")
    print("|---|---|---|---|---|---|---|")
    for size, res in results.items():
        for t, row in res["threads"].items():
            print(f"| {size} ({res['steps']} steps) | {t} | {row['baseline_train_s']:.2f}s | "
                  f"{row['random_ltd_train_s']:.2f}s | {row['time_saving']:.1%} | {row['layer_token_saving']:.1%} | "
                  f"{row['time_vs_first']:.2f}x |")
    print(f"json: {write_json('demo_threads', payload, a.json_path)}")
    return payload


if __name__ == "__main__":
    main()
