"""The LayerToken learning-rate schedule (Yao et al. 2022, §4): warm-up and decay driven by consumed layer-tokens."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch.optim.lr_scheduler import LRScheduler

from .deepspeed_config import DECAY_TYPES, WARMUP_TYPES, ConfigSource, read_layer_token_lr_config
from .errors import ConfigError

__all__ = ["LayerTokenLRScheduler", "LayerTokenSource"]


class LayerTokenSource(Protocol):
    """Anything that reports consumed layer-tokens (e.g. :class:`RandomLTDScheduler`)."""

    @property
    def consumed_layer_tokens(self) -> int: ...


class LayerTokenLRScheduler(LRScheduler):
    """Learning rate driven by consumed layer-tokens instead of steps (the paper's LayerToken LR).

    A random-LTD step processes fewer layer-tokens than a full one, so a step-based schedule
    would warm up and decay too early for the compute spent. This one reads ``t =
    scheduler.consumed_layer_tokens`` and sets each param group's LR to
    ``initial_lr * factor(t)``, with ``W = warmup_layer_tokens``, ``T = total_layer_tokens``,
    ``m = min_lr_ratio``:

    - warm-up, ``t < W``: ``factor = t / W`` (``warmup="linear"``) or
      ``log(1 + t) / log(1 + W)`` (``warmup="log"``);
    - then, with ``p = min(1, (t - W) / (T - W))`` (``p = 1`` when ``T == W``):
      ``cosine``: ``m + (1 - m) * (1 + cos(pi * p)) / 2``; ``linear``: ``m + (1 - m) * (1 - p)``;
      ``constant``: ``1``.

    A baseline run (no dropping; e.g. a :class:`RandomLTDScheduler` with ``min_value == max_value``)
    and a random-LTD run thus have the same LR whenever they have consumed the same layer-tokens.

    Order in the loop: ``ltd.step()`` at the start of a step (counts its layer-tokens), then
    ``optimizer.step(); lr_scheduler.step()``, so the LR of step ``k + 1`` follows the layer-tokens
    of steps ``0 .. k``; at construction the LR is ``factor(t)`` of the current count (0 for a new run).

    ``state_dict()`` holds this object's settings and last LRs, not the RandomLTDScheduler: save
    and load that one too.

    Args:
        optimizer: a ``torch.optim.Optimizer``; each group's ``lr`` at construction is its initial LR.
        scheduler: the source of ``consumed_layer_tokens`` (a :class:`RandomLTDScheduler`).
        warmup_layer_tokens: ``W >= 0``.
        total_layer_tokens: ``T >= W`` and ``T >= 1``; e.g. ``scheduler.layer_tokens_at(train_steps)``.
        min_lr_ratio: ``m`` in ``[0, 1]``.
        decay: ``"cosine"``, ``"linear"`` or ``"constant"``.
        warmup: ``"linear"`` or ``"log"`` (DeepSpeed's ``warmup_type`` names).
        last_epoch: as in torch (``-1`` for a new run).

    Raises:
        ConfigError: a setting that cannot work.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: LayerTokenSource,
        *,
        warmup_layer_tokens: int,
        total_layer_tokens: int,
        min_lr_ratio: float = 0.0,
        decay: str = "cosine",
        warmup: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        _check_lr_settings(warmup_layer_tokens, total_layer_tokens, min_lr_ratio, decay, warmup)
        if not hasattr(scheduler, "consumed_layer_tokens"):
            raise ConfigError(
                f"scheduler must report consumed_layer_tokens (a RandomLTDScheduler), got {type(scheduler).__name__}"
            )
        self.random_ltd_scheduler = scheduler
        self.warmup_layer_tokens = warmup_layer_tokens
        self.total_layer_tokens = total_layer_tokens
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay = decay
        self.warmup = warmup
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_deepspeed(
        cls,
        optimizer: torch.optim.Optimizer,
        scheduler: LayerTokenSource,
        cfg: ConfigSource,
        *,
        total_layer_tokens: int | None = None,
        last_epoch: int = -1,
    ) -> LayerTokenLRScheduler:
        """Build from the ``layer_token_lr_schedule`` block of a DeepSpeed config (it must be enabled).

        Keys: ``total_layer_tokens``, ``warmup_layer_tokens`` (default 0), ``warmup_type``
        (``"linear"``/``"log"``, default linear) as DeepSpeed names them, plus this project's
        ``decay`` (default ``"cosine"``) and ``min_lr_ratio`` (default 0.0).

        Args:
            cfg: anything :func:`~random_ltd_cli.deepspeed_config.read_deepspeed_config` accepts,
                or the ``layer_token_lr_schedule`` block itself.
            total_layer_tokens: used when the block has none (or to override it).

        Raises:
            ConfigError: the block is missing or disabled, a bad value, or no total layer-tokens.
        """
        lr_cfg = read_layer_token_lr_config(cfg)
        total = total_layer_tokens if total_layer_tokens is not None else lr_cfg.total_layer_tokens
        if total is None:
            raise ConfigError(
                "layer_token_lr_schedule.total_layer_tokens is missing: add it to the config, or pass "
                "total_layer_tokens=random_ltd_scheduler.layer_tokens_at(train_steps)"
            )
        return cls(
            optimizer,
            scheduler,
            warmup_layer_tokens=lr_cfg.warmup_layer_tokens,
            total_layer_tokens=total,
            min_lr_ratio=lr_cfg.min_lr_ratio,
            decay=lr_cfg.decay,
            warmup=lr_cfg.warmup_type,
            last_epoch=last_epoch,
        )

    def lr_factor(self, layer_tokens: int) -> float:
        """``factor(t)`` of the class docstring: the multiplier of each group's initial LR."""
        t, w, total, m = layer_tokens, self.warmup_layer_tokens, self.total_layer_tokens, self.min_lr_ratio
        if t < w:
            if self.warmup == "log":
                return math.log1p(t) / math.log1p(w)
            return t / w
        if self.decay == "constant":
            return 1.0
        p = 1.0 if total <= w else min(1.0, (t - w) / (total - w))
        if self.decay == "linear":
            return m + (1.0 - m) * (1.0 - p)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))

    def get_lr(self) -> list[Any]:
        """Each group's initial LR times ``lr_factor(consumed_layer_tokens)``."""
        factor = self.lr_factor(int(self.random_ltd_scheduler.consumed_layer_tokens))
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """torch's scheduler state without the optimizer and the RandomLTDScheduler reference."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "random_ltd_scheduler")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the RandomLTDScheduler reference is kept."""
        state = {k: v for k, v in state_dict.items() if k not in ("optimizer", "random_ltd_scheduler")}
        super().load_state_dict(state)


def _check_lr_settings(warmup: object, total: object, ratio: object, decay: object, warmup_type: object) -> None:
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(
            f"warmup_layer_tokens must be an integer >= 0, got {warmup!r}: the layer-tokens of the warm-up (0 for none)"
        )
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise ConfigError(
            f"total_layer_tokens must be an integer >= 1, got {total!r}: use "
            "random_ltd_scheduler.layer_tokens_at(train_steps)"
        )
    if warmup > total:
        raise ConfigError(
            f"warmup_layer_tokens ({warmup}) is greater than total_layer_tokens ({total}): warm-up must end "
            "before the schedule does"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must be a number in [0, 1], got {ratio!r}: the final LR / initial LR")
    if decay not in DECAY_TYPES:
        raise ConfigError(f"decay {decay!r} is not supported; known: {', '.join(map(repr, DECAY_TYPES))}")
    if warmup_type not in WARMUP_TYPES:
        raise ConfigError(f"warmup {warmup_type!r} is not supported; known: {', '.join(map(repr, WARMUP_TYPES))}")
