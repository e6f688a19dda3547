"""The demo, end to end: train a baseline and a random-LTD GPT on the stdlib source, compare, and prove
that the random-LTD checkpoint strips back to plain weights.

``run_demo(DemoConfig.default(), out_dir)`` is what ``random-ltd demo`` calls; tests use
``DemoConfig.tiny()``, a seconds-long version with a tiny model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .data import batch_offsets, eval_windows, load_corpus
from .proof import CheckpointProof, save_and_prove
from .threads import ThreadChoice
from .train import Arm, ArmResult, StepCallback, TrainConfig, train_arms

__all__ = ["ARMS", "DEFAULT_STEPS", "FILES", "DemoConfig", "DemoResult", "machine", "prepare_out_dir", "run_demo"]

#: The two arms: identical model, data and LR schedule; only token dropping differs.
ARMS: tuple[Arm, Arm] = (Arm("baseline", random_ltd=False), Arm("random-LTD", random_ltd=True))

#: What the demo writes into its output folder.
FILES: dict[str, str] = {
    "checkpoint": "random_ltd.safetensors",
    "stripped": "stripped.safetensors",
    "plot": "loss_vs_layer_tokens.png",
    "results": "results.json",
}

#: Steps per arm at defaults: about 75 s of training for both arms on 2 idle CPU cores.
DEFAULT_STEPS = 200

NoteCallback = Callable[[str], None]


@dataclass
class DemoConfig:
    """The demo's training settings and where its corpus comes from (``None``: the stdlib)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    corpus_root: Path | None = None
    max_bytes: int | None = None

    @classmethod
    def default(cls, steps: int | None = None, seed: int = 0) -> DemoConfig:
        """6 blocks, hidden 128, S=128, batch 16, 200 steps; ``r`` from S/4 to S over all steps."""
        return cls(_with_steps(TrainConfig(seed=seed), DEFAULT_STEPS if steps is None else steps))

    @classmethod
    def tiny(cls, steps: int | None = None, seed: int = 0) -> DemoConfig:
        """A seconds-long run for tests: 4 blocks, hidden 32, S=32, batch 4, 20 steps, 400 kB of text."""
        base = TrainConfig(
            n_layer=4, n_embd=32, n_head=2, seq_len=32, batch_size=4, steps=20, lr=3e-3, warmup_steps=2,
            eval_every=5, eval_sequences=8, eval_batch_size=8, seed=seed, seq_per_step=4,
        )  # fmt: skip
        return cls(_with_steps(base, steps) if steps is not None else base, max_bytes=400_000)


def _with_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    """``cfg`` for another step count: warm-up and eval spacing scale with it."""
    if steps < 1:
        raise ConfigError(f"steps={steps} must be at least 1.")
    cfg.steps = steps
    cfg.warmup_steps = max(1, steps // 15)
    cfg.eval_every = max(1, steps // 12)
    return cfg


@dataclass
class DemoResult:
    """The two arms' results, the files written and the checkpoint proof."""

    config: DemoConfig
    out_dir: Path
    corpus: dict[str, Any]
    baseline: ArmResult
    random_ltd: ArmResult
    proof: CheckpointProof
    plot: Path | None
    plot_skipped: str | None
    total_seconds: float
    threads: ThreadChoice | None = None

    @property
    def layer_token_saving(self) -> float:
        """``1 - random-LTD layer-tokens / baseline layer-tokens``."""
        return 1.0 - self.random_ltd.layer_tokens / self.baseline.layer_tokens

    @property
    def wall_time_saving(self) -> float:
        """``1 - random-LTD train time / baseline train time`` (evaluation excluded)."""
        return 1.0 - self.random_ltd.train_seconds / max(self.baseline.train_seconds, 1e-9)

    @property
    def eval_loss_change(self) -> float:
        """``random-LTD final eval loss / baseline's - 1`` (negative: random-LTD is better)."""
        return self.random_ltd.final_eval_loss / self.baseline.final_eval_loss - 1.0

    def summary(self) -> dict[str, Any]:
        """The table's numbers."""
        return {
            "arms": {
                arm.name: {
                    "final_eval_loss": arm.final_eval_loss,
                    "layer_tokens": arm.layer_tokens,
                    "train_seconds": arm.train_seconds,
                    "steps": arm.steps,
                }
                for arm in (self.baseline, self.random_ltd)
            },
            "layer_token_saving": self.layer_token_saving,
            "wall_time_saving": self.wall_time_saving,
            "eval_loss_change": self.eval_loss_change,
            "files": {
                "checkpoint": str(self.proof.checkpoint),
                "stripped": str(self.proof.stripped),
                "plot": None if self.plot is None else str(self.plot),
            },
            "plot_skipped": self.plot_skipped,
            "load_back": {
                "ok": self.proof.ok,
                "strict": self.proof.loaded_strict,
                "identical_tensors": self.proof.identical_tensors,
                "compared_tensors": self.proof.compared_tensors,
            },
            "total_seconds": self.total_seconds,
            "threads": None if self.threads is None else {"count": self.threads.threads, "reason": self.threads.reason},
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: the summary plus settings, corpus, per-arm histories and the proof."""
        return {
            **self.summary(),
            "config": self.config.train.to_dict(),
            "corpus": self.corpus,
            "history": {arm.name: arm.to_dict() for arm in (self.baseline, self.random_ltd)},
            "proof": self.proof.to_dict(),
            "machine": {**machine(), "threads_reason": None if self.threads is None else self.threads.reason},
        }


def machine() -> dict[str, Any]:
    """What the timings were measured on: CPU count, torch threads, platform, CPU model."""
    import platform

    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(),
    }


def prepare_out_dir(path: Path | str) -> Path:
    """Create ``path`` if needed and check that files can be written there (before any training).

    Raises:
        ConfigError: ``path`` is a file, or cannot be created or written to.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".random-ltd-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(
            f"--out {str(out)!r} cannot be a folder: {exc.strerror}: {exc.filename}. Choose another folder path."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"--out {str(out)!r} is not writable ({exc.strerror or exc}); choose a folder you can write to."
        ) from None
    return out


def run_demo(
    config: DemoConfig,
    out_dir: Path | str,
    *,
    on_step: StepCallback | None = None,
    on_note: NoteCallback | None = None,
    threads: ThreadChoice | None = None,
) -> DemoResult:
    """Train both arms on identical batches, plot, save, inspect, strip and reload; write ``results.json``.

    Args:
        config: e.g. :meth:`DemoConfig.default` or :meth:`DemoConfig.tiny`.
        out_dir: the folder for the files in :data:`FILES` (created if needed). They are written
            into a temporary folder inside it and moved into place at the end: an error or
            Ctrl-C leaves ``out_dir`` as it was (and removes it if this call created it).
        on_step: ``(arm name, step, train loss)`` after each step of each arm.
        on_note: receives lines for people (e.g. why the plot was skipped).
        threads: torch's thread count for this call (e.g. ``choose_threads(...)`` from
            :mod:`random_ltd_cli.demo.threads`), restored afterwards; ``None``: leave torch as it is.

    Raises:
        ConfigError: an unusable setting or output folder (checked before training).
        CheckpointError: a checkpoint cannot be written or read.
    """
    started = time.perf_counter()
    created = not Path(out_dir).exists()
    out = prepare_out_dir(out_dir)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".random-ltd-demo-", suffix=".tmp"))
    try:
        with _torch_threads(threads):
            result = _run(config, out, stage, on_step, on_note)
            result.threads = threads
            result.total_seconds = time.perf_counter() - started
            _publish(stage, out, result)
    except BaseException:  # an error or Ctrl-C: leave nothing behind, not even a folder we made
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return result


@contextlib.contextmanager
def _torch_threads(choice: ThreadChoice | None) -> Iterator[None]:
    """Run the block on ``choice.threads`` torch threads, then restore the count it had."""
    import torch

    before = torch.get_num_threads()
    if choice is not None:
        torch.set_num_threads(choice.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _publish(stage: Path, out: Path, result: DemoResult) -> None:
    """Move the finished files from ``stage`` into ``out`` (each an atomic rename), results.json last."""
    for key in ("checkpoint", "stripped", "plot"):
        if (stage / FILES[key]).exists():
            os.replace(stage / FILES[key], out / FILES[key])
    result.proof = dataclasses.replace(result.proof, checkpoint=out / FILES["checkpoint"],
                                       stripped=out / FILES["stripped"])
    result.plot = None if result.plot is None else out / FILES["plot"]
    result.out_dir = out
    (stage / FILES["results"]).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    os.replace(stage / FILES["results"], out / FILES["results"])


def _run(
    config: DemoConfig, out: Path, stage: Path, on_step: StepCallback | None, on_note: NoteCallback | None
) -> DemoResult:
    """Train, plot, save and prove, writing every file into ``stage``."""
    cfg = config.train
    corpus = load_corpus(config.corpus_root, max_bytes=config.max_bytes)
    if on_note is not None:
        on_note(
            f"corpus: {len(corpus.train_files)} train files ({corpus.train.numel() / 1e6:.1f} MB) and "
            f"{len(corpus.eval_files)} held-out files ({corpus.eval.numel() / 1e6:.2f} MB) under {corpus.root}"
        )
    offsets = batch_offsets(corpus.train.numel(), cfg.steps, cfg.batch_size, cfg.seq_len, cfg.seed)
    eval_offsets = eval_windows(corpus.eval, cfg.eval_sequences, cfg.seq_len)
    base_run, ltd_run = train_arms(cfg, corpus, list(ARMS), offsets, eval_offsets, on_step)
    plot_path, skipped = _plot(stage, base_run.result, ltd_run.result)
    if skipped and on_note is not None:
        on_note(skipped)
    proof = save_and_prove(
        ltd_run.model, ltd_run.scheduler, cfg.seed, stage / FILES["checkpoint"], stage / FILES["stripped"]
    )
    result = DemoResult(
        config=config,
        out_dir=out,
        corpus={
            "root": str(corpus.root),
            "train_files": len(corpus.train_files),
            "eval_files": len(corpus.eval_files),
            "train_tokens": corpus.train.numel(),
            "eval_tokens": corpus.eval.numel(),
        },
        baseline=base_run.result,
        random_ltd=ltd_run.result,
        proof=proof,
        plot=plot_path,
        plot_skipped=skipped,
        total_seconds=0.0,
    )
    return result


def _plot(out: Path, baseline: ArmResult, random_ltd: ArmResult) -> tuple[Path | None, str | None]:
    try:
        from .plot import plot_eval_curves

        path = plot_eval_curves([baseline, random_ltd], out / FILES["plot"], x="layer_tokens")
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "matplotlib":
            raise
        from .plot import MISSING_MATPLOTLIB

        return None, MISSING_MATPLOTLIB
    return path, None
