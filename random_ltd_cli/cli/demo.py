"""``random-ltd demo``: train the built-in GPT with and without random-LTD on the stdlib source, compare.

Torch (through ``random_ltd_cli.demo``) is imported inside the command, so ``--help`` stays lean.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._app import JsonOption, app, fail, note, sigterm_as_interrupt, user_errors
from ._render import print_table, stdout_console

if TYPE_CHECKING:
    from ..demo.run import DemoResult


@app.command()
def demo(
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="Training steps per arm (default 200; 20 with --tiny).", metavar="N"),
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for the checkpoints, the plot and results.json.", metavar="DIR"),
    ] = Path("random-ltd-demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model init, the batches and the dropping.")] = 0,
    tiny: Annotated[
        bool,
        typer.Option("--tiny", help="A seconds-long run on a tiny model and 400 kB of text (a smoke test)."),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, metavar="N",
                     help="Torch threads (default: 1 for --tiny or on a busy machine, else the free CPUs)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Train a small GPT twice on the Python stdlib's source, without and with random-LTD, and compare.

    Both runs see identical batches in identical order. Prints final eval loss, consumed layer-tokens
    and wall time; writes a loss-vs-layer-tokens plot; saves the random-LTD checkpoint, inspects it,
    strips it and checks that the stripped weights load strictly into an unconverted model.
    Defaults take 1 to 3 minutes on 2 CPU cores (the header says how many torch threads it chose
    and why: one on a busy machine, where more threads only wait for each other); --tiny takes seconds.
    The files appear in --out only when everything has finished: Ctrl-C leaves nothing behind (exit 130).
    """
    from ..demo.run import DemoConfig, run_demo
    from ..demo.threads import choose_threads

    with user_errors(as_json, interrupted=f"nothing was written to {out} (outputs are moved there only at the end)"):
        config = DemoConfig.tiny(steps, seed) if tiny else DemoConfig.default(steps, seed)
        cfg = config.train
        choice = choose_threads(cfg.batch_size * cfg.seq_len * cfg.n_embd, threads)
        note(
            f"demo: GPT with {cfg.n_layer} blocks, hidden {cfg.n_embd}, S={cfg.seq_len}, batch {cfg.batch_size}, "
            f"{cfg.steps} steps per arm; random-LTD on the middle blocks, r from {cfg.min_value} to {cfg.seq_len} "
            f"over {cfg.require_steps} steps; {os.cpu_count()} CPU cores."
        )
        override = "" if threads is not None else "; --threads N to override"
        note(f"torch threads: {choice.threads} ({choice.reason}{override}).")
        with sigterm_as_interrupt(), _Progress(cfg.steps) as progress:
            result = run_demo(config, out, on_step=progress.update, on_note=note, threads=choice)
    if as_json:
        sys.stdout.write(json.dumps(result.summary(), indent=2) + "\n")
    else:
        _render(result)
    if not result.proof.ok:
        detail = result.proof.load_error or f"tensors that differ: {', '.join(result.proof.mismatched[:4])}"
        fail(f"the stripped checkpoint {result.proof.stripped} did not load back identically: {detail}")


PLAIN_EVERY_S = 30.0
"""Without a terminal, a plain progress line at least this often (and every tenth of the steps)."""


class _Progress:
    """Progress on stderr: one rich bar per arm on a terminal, else plain lines (step, loss, elapsed)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.tty = sys.stderr.isatty()
        self.every = max(1, steps // 10)
        self.started = self.last_line = 0.0  # set at the first step: the elapsed time is training time
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, arm: str, step: int, loss: float) -> None:
        if not self.tty:
            now = time.monotonic()
            if not self.started:
                self.started = self.last_line = now
            if step % self.every == 0 or step == self.steps or now - self.last_line >= PLAIN_EVERY_S:
                self.last_line = now
                note(f"{arm}: step {step}/{self.steps}, loss {loss:.3f}, {now - self.started:.0f}s elapsed")
            return
        if self.progress is None:  # only once training runs: an early error leaves stderr clean
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self.progress.start()
        if arm not in self.tasks:
            self.tasks[arm] = self.progress.add_task(escape(arm), total=self.steps, loss="-")
        self.progress.update(self.tasks[arm], completed=step, loss=f"{loss:.3f}")


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _render(result: DemoResult) -> None:
    console = stdout_console(soft_wrap=True)
    base = result.baseline
    table = Table(
        caption="time: training wall time, evaluation excluded; layer-tokens count all blocks",
        caption_justify="left",
    )
    for name in ("arm", "eval loss", "vs base", "layer-tokens", "saved", "time", "saved"):
        table.add_column(name, justify="left" if name == "arm" else "right", no_wrap=True, min_width=6)
    for arm in (result.baseline, result.random_ltd):
        is_base = arm is base
        table.add_row(
            escape(arm.name),
            f"{arm.final_eval_loss:.4f}",
            "-" if is_base else f"{arm.final_eval_loss / base.final_eval_loss - 1:+.2%}",
            _count(arm.layer_tokens),
            "-" if is_base else f"{result.layer_token_saving:.1%}",
            f"{arm.train_seconds:.1f}s",
            "-" if is_base else f"{result.wall_time_saving:.1%}",
        )
    print_table(console, table, "random-LTD demo: eval loss at full length after the last step")
    proof = result.proof
    console.print(f"checkpoint: {escape(str(proof.checkpoint))} ({proof.tensor_count} tensors, "
                  f"{len(proof.wrapped_layers)} wrapped layers)")  # fmt: skip
    console.print(f"stripped:   {escape(str(proof.stripped))} ({proof.renamed} keys renamed)")
    console.print(f"plot:       {escape(str(result.plot)) if result.plot else 'skipped (matplotlib is missing)'}")
    verdict = "OK" if proof.ok else "FAILED"
    console.print(
        f"load-back:  {verdict}: stripped weights loaded strictly into an unconverted GPT, "
        f"{proof.identical_tensors}/{proof.compared_tensors} tensors identical"
    )
    console.print(f"total:      {result.total_seconds:.1f}s wall (both arms, evaluation, plot, checkpoints)")
