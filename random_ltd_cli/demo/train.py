"""One training run of the built-in GPT on the demo corpus, with or without random-LTD.

Used by ``random-ltd demo`` and by ``benchmarks/quality.py``. Every arm of a comparison
builds the model from the same seed and reads the same batches in the same order; the
only differences are the arm's settings (token dropping on or off, LR driven by steps or
by consumed layer-tokens).

Layer-tokens are counted as DeepSpeed counts them: per step, ``batch * (r * n_ltd +
S * (L - n_ltd))`` over all ``L`` blocks, so a baseline step costs ``batch * S * L``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from ..convert import convert_to_random_ltd, find_layer_stack, select_layers
from ..lr_schedule import LayerTokenLRScheduler
from ..model import GPT, GPTConfig
from ..schedule import RandomLTDScheduler
from .data import Corpus, get_batch

__all__ = ["Arm", "ArmResult", "ArmRun", "ArmTrainer", "EvalPoint", "TrainConfig", "evaluate", "train_arms"]

LRSchedule = Literal["step", "layer_token"]
StepCallback = Callable[[str, int, float], None]


@dataclass
class TrainConfig:
    """Model, optimisation, evaluation and random-LTD settings shared by all arms of a run.

    ``require_frac`` sets ``require_steps = round(require_frac * steps)``: the reserved length
    ``r`` grows from ``min_frac * seq_len`` to ``seq_len`` over that many steps, then stays.
    """

    n_layer: int = 6
    n_embd: int = 128
    n_head: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 200
    lr: float = 2e-3
    warmup_steps: int = 13
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 16
    eval_sequences: int = 64
    eval_batch_size: int = 32
    seed: int = 0
    layers: str = "middle"
    min_frac: float = 0.25
    require_frac: float = 1.0
    seq_per_step: int = 16

    @property
    def min_value(self) -> int:
        """``r`` at step 0 (before DeepSpeed's rounding to ``seq_per_step``)."""
        return max(1, round(self.min_frac * self.seq_len))

    @property
    def require_steps(self) -> int:
        return max(1, round(self.require_frac * self.steps))

    def model_config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=256, block_size=self.seq_len, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "min_value": self.min_value, "require_steps": self.require_steps}


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: a name, dropping on or off, and what drives the LR."""

    name: str
    random_ltd: bool
    lr_schedule: LRSchedule = "step"


@dataclass
class EvalPoint:
    """Full-length eval loss after ``step`` steps, with the layer-tokens and train time spent so far."""

    step: int
    layer_tokens: int
    train_seconds: float
    eval_loss: float


@dataclass
class ArmResult:
    """What an arm did. ``train_seconds`` excludes evaluation; ``history`` starts at step 0."""

    name: str
    random_ltd: bool
    lr_schedule: str
    steps: int
    final_eval_loss: float
    layer_tokens: int
    train_seconds: float
    eval_seconds: float
    history: list[EvalPoint] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    reserved_lengths: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArmRun:
    """An arm's result plus the trained model and its schedule (still converted if random-LTD)."""

    result: ArmResult
    model: GPT
    scheduler: RandomLTDScheduler


def make_scheduler(cfg: TrainConfig, n_ltd: int) -> RandomLTDScheduler:
    """The reserved-length schedule; with ``n_ltd == 0`` it only counts a baseline's layer-tokens."""
    lo = cfg.min_value if n_ltd else cfg.seq_len
    return RandomLTDScheduler(
        lo,
        cfg.seq_len,
        cfg.require_steps,
        cfg.seq_per_step,
        total_layer_num=cfg.n_layer,
        random_ltd_layer_num=n_ltd,
        global_batch_size=cfg.batch_size,
    )


def lr_factor(progress: float, warmup: float, total: float, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup``, then cosine to ``min_ratio`` at ``total`` (any unit)."""
    if progress < warmup:
        return progress / warmup
    p = 1.0 if total <= warmup else min(1.0, (progress - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _lr_scheduler(
    opt: torch.optim.Optimizer, sched: RandomLTDScheduler, cfg: TrainConfig, kind: LRSchedule
) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "layer_token":
        return LayerTokenLRScheduler(
            opt,
            sched,
            warmup_layer_tokens=sched.layer_tokens_at(cfg.warmup_steps),
            total_layer_tokens=sched.layer_tokens_at(cfg.steps),
            min_lr_ratio=cfg.min_lr_ratio,
            decay="cosine",
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: torch.Tensor, offsets: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean next-token loss over fixed full-length windows of ``tokens`` (eval mode: nothing dropped)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in offsets.split(cfg.eval_batch_size):
        x, y = get_batch(tokens, chunk, cfg.seq_len)
        _, loss = model(x, y)
        assert loss is not None
        total += float(loss) * chunk.numel()
    model.train(was_training)
    return total / offsets.numel()


def build_model(cfg: TrainConfig, arm: Arm) -> tuple[GPT, RandomLTDScheduler]:
    """The seeded model (converted for a random-LTD arm) and its schedule."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config())
    if not arm.random_ltd:
        return model, make_scheduler(cfg, 0)
    n_ltd = len(select_layers(find_layer_stack(model)[2], cfg.layers))
    sched = make_scheduler(cfg, n_ltd)
    convert_to_random_ltd(model, layers=cfg.layers, scheduler=sched, seed=cfg.seed)
    return model, sched


class ArmTrainer:
    """Trains one arm step by step: build with the shared batches, call :meth:`step` ``cfg.steps`` times.

    Evaluates at full length on ``eval_offsets`` at step 0, every ``cfg.eval_every`` steps
    and after the last step. ``offsets`` is ``int64 [steps, batch]`` (see ``batch_offsets``).
    """

    def __init__(
        self, cfg: TrainConfig, corpus: Corpus, arm: Arm, offsets: torch.Tensor, eval_offsets: torch.Tensor
    ) -> None:
        self.cfg, self.corpus, self.arm = cfg, corpus, arm
        self.offsets, self.eval_offsets = offsets, eval_offsets
        self.model, self.scheduler = build_model(cfg, arm)
        self.model.train()
        self.optimizer = _optimizer(self.model, cfg)
        self.lr_scheduler = _lr_scheduler(self.optimizer, self.scheduler, cfg, arm.lr_schedule)
        self.result = ArmResult(arm.name, arm.random_ltd, arm.lr_schedule, cfg.steps, math.nan, 0, 0.0, 0.0)
        self.steps_done = 0
        self._evaluate()

    def step(self) -> float:
        """One optimizer step on the next shared batch (timed, evaluation excluded); returns its train loss."""
        cfg, step = self.cfg, self.steps_done
        t0 = time.perf_counter()
        r = self.scheduler.step()
        x, y = get_batch(self.corpus.train, self.offsets[step], cfg.seq_len)
        _, loss = self.model(x, y)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        value = float(loss.detach())
        self.result.train_seconds += time.perf_counter() - t0
        self.result.train_losses.append(value)
        self.result.reserved_lengths.append(r)
        self.steps_done = step + 1
        if self.steps_done % cfg.eval_every == 0 or self.steps_done == cfg.steps:
            self._evaluate()
        return value

    def finish(self) -> ArmRun:
        """The result so far, with the model and its schedule."""
        self.result.steps = self.steps_done
        self.result.layer_tokens = self.scheduler.consumed_layer_tokens
        self.result.final_eval_loss = self.result.history[-1].eval_loss
        return ArmRun(self.result, self.model, self.scheduler)

    def _evaluate(self) -> None:
        if self.result.history and self.result.history[-1].step == self.steps_done:
            return
        t0 = time.perf_counter()
        loss = evaluate(self.model, self.corpus.eval, self.eval_offsets, self.cfg)
        self.result.eval_seconds += time.perf_counter() - t0
        tokens = self.scheduler.consumed_layer_tokens
        self.result.history.append(EvalPoint(self.steps_done, tokens, self.result.train_seconds, loss))


def train_arms(
    cfg: TrainConfig,
    corpus: Corpus,
    arms: list[Arm],
    offsets: torch.Tensor,
    eval_offsets: torch.Tensor,
    on_step: StepCallback | None = None,
) -> list[ArmRun]:
    """Train ``arms`` on the same batches, interleaved: step ``k`` of every arm, then step ``k + 1``.

    Interleaving makes load from other processes hit every arm alike, so wall-clock times
    compare fairly on a busy machine. ``on_step(arm_name, step, train_loss)`` follows each step.
    """
    trainers = [ArmTrainer(cfg, corpus, arm, offsets, eval_offsets) for arm in arms]
    for _ in range(cfg.steps):
        for trainer in trainers:
            loss = trainer.step()
            if on_step is not None:
                on_step(trainer.arm.name, trainer.steps_done, loss)
    return [trainer.finish() for trainer in trainers]
