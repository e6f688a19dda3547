"""The reserved-length schedule of random-LTD and its layer-token accounting.

:class:`RandomLTDScheduler` reproduces DeepSpeed's ``fixed_linear`` schedule value for value,
with DeepSpeed's method names and state-dict keys, so a DeepSpeed checkpoint's scheduler
state loads here and the other way round. The LayerToken learning-rate schedule is in
:mod:`random_ltd_cli.lr_schedule`.

The schedule, with global step ``g`` (one optimizer step, however many micro-batches)::

    F    = floor((g / require_steps) * (max_value - min_value) + min_value)   # float maths, as DeepSpeed
    r(g) = min(F - F % seq_per_step, max_value)

``r(0)`` can be below ``min_value`` when ``min_value`` is not a multiple of ``seq_per_step``
(100, 512, 1000, 16 gives 96): DeepSpeed's rounding, kept on purpose.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from .deepspeed_config import (
    ConfigSource,
    RandomLTDConfig,
    check_schedule_settings,
    read_deepspeed_config,
)
from .errors import ConfigError

__all__ = ["STATE_KEYS", "RandomLTDScheduler"]

#: The keys of :meth:`RandomLTDScheduler.state_dict`, the same as DeepSpeed's.
STATE_KEYS: tuple[str, ...] = ("consumed_layer_tokens", "current_steps", "current_value", "min_value", "max_value")


def _check_step(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class RandomLTDScheduler:
    """How many tokens (``r``) each random-LTD layer keeps, step by step, and the layer-tokens consumed.

    Step it once per optimizer step (global step), at the start of the step, before the forward
    passes: that is where DeepSpeed's engine calls ``update_seq(global_steps)``. Gradient
    accumulation does not change this (calling ``update_seq`` again with the same step counts
    nothing twice)::

        for batch in loader:
            sched.step()                 # same as sched.update_seq(global_step), global_step = 0, 1, ...
            loss = model(batch).loss     # layers read sched.get_current_seq()
            loss.backward(); optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()

    State (DeepSpeed's): ``current_value`` starts at ``min_value``, ``current_steps`` at ``-1``,
    ``consumed_layer_tokens`` at 0. ``update_seq(g)`` first sets ``current_value = r(g)`` unless it
    has already reached ``max_value`` (then it stays), and then, only if ``g`` differs from the
    last step seen, adds ``global_batch_size * (r * random_ltd_layer_num + max_value *
    (total_layer_num - random_ltd_layer_num))`` to ``consumed_layer_tokens`` and records ``g``.

    Args:
        min_value: kept tokens at step 0 (before DeepSpeed's rounding), ``>= 1``.
        max_value: the full sequence length, ``>= min_value``.
        require_steps: steps over which ``r`` grows from ``min_value`` to ``max_value``, ``>= 1``.
        seq_per_step: ``r`` is rounded down to a multiple of this (``>= 1``; default 16).
        total_layer_num: layers of the converted kind in the model (``>= 1``).
        random_ltd_layer_num: how many of them drop tokens (``0..total_layer_num``).
        global_batch_size: samples per optimizer step across all ranks (``>= 1``).
        schedule_type: ``"fixed_linear"`` (the only schedule DeepSpeed implements).

    Raises:
        ConfigError: a setting that cannot work; the message names it and says what to do.
    """

    def __init__(
        self,
        min_value: int,
        max_value: int,
        require_steps: int,
        seq_per_step: int = 16,
        *,
        total_layer_num: int,
        random_ltd_layer_num: int,
        global_batch_size: int,
        schedule_type: str = "fixed_linear",
    ) -> None:
        check_schedule_settings(
            min_value=min_value,
            max_value=max_value,
            require_steps=require_steps,
            seq_per_step=seq_per_step,
            total_layer_num=total_layer_num,
            random_ltd_layer_num=random_ltd_layer_num,
            global_batch_size=global_batch_size,
            schedule_type=schedule_type,
        )
        self.min_value = min_value
        self.max_value = max_value
        self.require_steps = require_steps
        self.seq_per_step = seq_per_step
        self.total_layer_num = total_layer_num
        self.random_ltd_layer_num = random_ltd_layer_num
        self.global_batch_size = global_batch_size
        self.schedule_type = schedule_type
        self.reserved_length_carrier: Any = None  # r as a tensor size, for compiled layers (compiled.py)
        self._set_value(min_value)
        self._current_steps = -1
        self._consumed = 0

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_config(cls, config: RandomLTDConfig, *, global_batch_size: int | None = None) -> RandomLTDScheduler:
        """Build from a :class:`~random_ltd_cli.deepspeed_config.RandomLTDConfig` (``enabled`` is not checked).

        Without a known global batch size (a bare ``random_ltd`` block has none) the schedule is
        the same, and the layer-token accounting counts one sample per step, with a warning.
        """
        batch = global_batch_size if global_batch_size is not None else config.global_batch_size
        if batch is None:
            warnings.warn(
                f"{config.source}: the global batch size is unknown (no train_batch_size), so consumed layer-tokens "
                "are counted per sample; pass global_batch_size= (samples per optimizer step across all ranks)",
                UserWarning,
                stacklevel=3,
            )
            batch = 1
        return cls(
            config.min_value,
            config.max_value,
            config.require_steps,
            config.seq_per_step,
            total_layer_num=config.total_layer_num,
            random_ltd_layer_num=config.random_ltd_layer_num,
            global_batch_size=batch,
            schedule_type=config.schedule_type,
        )

    @classmethod
    def from_deepspeed(
        cls,
        cfg: ConfigSource,
        *,
        global_batch_size: int | None = None,
        require_enabled: bool = False,
    ) -> RandomLTDScheduler:
        """Build from DeepSpeed's JSON settings.

        Args:
            cfg: a whole DeepSpeed config dict, its ``data_efficiency``, ``data_routing`` or
                ``random_ltd`` block, or the path of a JSON file (see
                :func:`~random_ltd_cli.deepspeed_config.read_deepspeed_config`). Not modified.
            global_batch_size: overrides the config's top-level ``train_batch_size``.
            require_enabled: refuse a block whose ``enabled`` is not ``true`` (DeepSpeed would
                not use random-LTD with it); by default the block's settings are used as they are.

        Raises:
            ConfigError: bad or missing settings, or (with ``require_enabled``) a disabled block.
        """
        config = read_deepspeed_config(cfg, global_batch_size=global_batch_size)
        if require_enabled and not config.enabled:
            raise ConfigError(
                f"{config.source}: random_ltd.enabled is not true, so DeepSpeed would not use random-LTD: "
                'set "enabled": true in the random_ltd block, or pass require_enabled=False'
            )
        return cls.from_config(config)

    # ------------------------------------------------------------------ the schedule

    def value_at(self, global_step: int) -> int:
        """``r`` of the ``fixed_linear`` formula at ``global_step`` (pure; the state is not touched).

        It ignores the "stays at max" rule of :meth:`update_seq`; for a run stepped 0, 1, 2, ...
        the two agree, except that a scheduler with ``min_value == max_value`` never changes.
        """
        g = _check_step("global_step", global_step, 0)
        lo, hi = self.min_value, self.max_value
        # Same float expression and order as DeepSpeed, so that the floor agrees bit for bit.
        f = math.floor((float(g) / self.require_steps) * (hi - lo) + lo)
        return min(f - f % self.seq_per_step, hi)

    def update_seq(self, global_step: int) -> int:
        """Move to ``global_step`` (DeepSpeed's method): update ``r`` and count the step's layer-tokens.

        ``r`` is recomputed only while it is below ``max_value``; the layer-tokens of a step are
        counted once, when ``global_step`` differs from the previous call's. Returns ``r``.
        """
        g = _check_step("global_step", global_step, 0)
        if self._current_value < self.max_value:
            self._set_value(self.value_at(g))
        if g != self._current_steps:
            self._consumed += self.layer_tokens_per_step(self._current_value)
            self._current_steps = g
        return self._current_value

    def step(self) -> int:
        """Advance one global step: ``update_seq(current_steps + 1)``; the first call is step 0. Returns ``r``."""
        return self.update_seq(self._current_steps + 1)

    def _set_value(self, value: int) -> None:
        self._current_value = value
        if "torch" in sys.modules:  # compiled layers read r from the carrier's size; no torch, no layers
            from .compiled import publish_length

            publish_length(self, value)

    def get_current_seq(self) -> int:
        """``r``: the number of tokens each random-LTD layer keeps now (DeepSpeed's name)."""
        return self._current_value

    @property
    def reserved_length(self) -> int:
        """Alias of :meth:`get_current_seq` (the name DeepSpeed's layer uses)."""
        return self._current_value

    @property
    def current_value(self) -> int:
        return self._current_value

    @property
    def current_steps(self) -> int:
        """The last global step passed to :meth:`update_seq` (``-1`` before the first)."""
        return self._current_steps

    @property
    def consumed_layer_tokens(self) -> int:
        """Sum over the steps seen so far of ``global_batch_size * (tokens each layer processed)``."""
        return self._consumed

    def settings(self) -> dict[str, Any]:
        """The constructor arguments, as a JSON-friendly dict (recorded in converted checkpoints)."""
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "require_steps": self.require_steps,
            "seq_per_step": self.seq_per_step,
            "total_layer_num": self.total_layer_num,
            "random_ltd_layer_num": self.random_ltd_layer_num,
            "global_batch_size": self.global_batch_size,
            "schedule_type": self.schedule_type,
        }

    def get_random_ltd_layer_num(self) -> int:
        """DeepSpeed's name for :attr:`random_ltd_layer_num`."""
        return self.random_ltd_layer_num

    # ------------------------------------------------------------------ accounting

    def layer_tokens_per_step(self, r: int) -> int:
        """Layer-tokens of one global step with kept length ``r``: ``B * (r * n_ltd + max * (L - n_ltd))``."""
        full_layers = self.total_layer_num - self.random_ltd_layer_num
        return self.global_batch_size * (r * self.random_ltd_layer_num + self.max_value * full_layers)

    def layer_tokens_at(self, steps: int) -> int:
        """Layer-tokens a fresh run consumes over global steps ``0 .. steps - 1`` (the state is not touched).

        Exact (it equals stepping a new scheduler ``steps`` times) and fast: ``r`` is piecewise
        constant, so each piece is found by bisection instead of visiting every step.
        """
        n = _check_step("steps", steps, 0)
        full = self.global_batch_size * self.max_value * (self.total_layer_num - self.random_ltd_layer_num)
        return n * full + self.global_batch_size * self.random_ltd_layer_num * self._sum_r(n)

    def baseline_layer_tokens(self, steps: int) -> int:
        """Layer-tokens of the same number of steps without dropping: ``steps * B * L * max_value``."""
        n = _check_step("steps", steps, 0)
        return n * self.global_batch_size * self.total_layer_num * self.max_value

    def estimated_saving(self, steps: int) -> float:
        """Fraction of layer-tokens saved over ``steps`` steps: ``1 - layer_tokens_at / baseline`` (0.0 for 0 steps).

        Layer-tokens stand for compute: attention's quadratic part and the unchanged first and
        last layers make real savings differ somewhat.
        """
        base = self.baseline_layer_tokens(steps)
        return 0.0 if base == 0 else 1.0 - self.layer_tokens_at(steps) / base

    def get_total_layer_tokens(self, train_iters: int) -> int:
        """DeepSpeed's name for :meth:`layer_tokens_at`; unlike DeepSpeed's it does not step this scheduler."""
        return self.layer_tokens_at(train_iters)

    def _sum_r(self, steps: int) -> int:
        """Sum of ``r`` over steps ``0 .. steps - 1`` of a fresh run."""
        if self.min_value >= self.max_value:  # never updated: r stays min_value
            return self.min_value * steps
        total, g = 0, 0
        while g < steps:
            r = self.value_at(g)
            if r >= self.max_value:
                return total + r * (steps - g)
            lo, hi = g + 1, steps  # first step in (g, steps) whose r is larger; value_at is monotone
            while lo < hi:
                mid = (lo + hi) // 2
                if self.value_at(mid) > r:
                    hi = mid
                else:
                    lo = mid + 1
            total += r * (lo - g)
            g = lo
        return total

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, int]:
        """DeepSpeed's five keys: ``consumed_layer_tokens``, ``current_steps``, ``current_value``,
        ``min_value``, ``max_value`` (plain ints, JSON-friendly)."""
        return {
            "consumed_layer_tokens": self._consumed,
            "current_steps": self._current_steps,
            "current_value": self._current_value,
            "min_value": self.min_value,
            "max_value": self.max_value,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also DeepSpeed's). Everything is checked before anything changes.

        As in DeepSpeed, ``min_value`` and ``max_value`` come from the state dict. Extra keys are ignored.

        Raises:
            ConfigError: not a mapping, a missing key, or a value that is not a valid integer.
        """
        if not isinstance(state_dict, Mapping):
            raise ConfigError(
                f"state_dict must be a mapping from RandomLTDScheduler.state_dict(), got {type(state_dict).__name__}"
            )
        missing = [k for k in STATE_KEYS if k not in state_dict]
        if missing:
            raise ConfigError(
                f"state_dict is missing {', '.join(map(repr, missing))} (it has {sorted(map(str, state_dict))}): "
                "pass the dict saved from RandomLTDScheduler.state_dict() or DeepSpeed's scheduler"
            )
        sd = {k: state_dict[k] for k in STATE_KEYS}
        for key, minimum in (("consumed_layer_tokens", 0), ("current_steps", -1), ("current_value", 1)):
            _check_step(f"state_dict[{key!r}]", sd[key], minimum)
        check_schedule_settings(
            min_value=sd["min_value"],
            max_value=sd["max_value"],
            require_steps=self.require_steps,
            seq_per_step=self.seq_per_step,
            total_layer_num=self.total_layer_num,
            random_ltd_layer_num=self.random_ltd_layer_num,
            global_batch_size=self.global_batch_size,
            schedule_type=self.schedule_type,
            names={"min_value": "state_dict['min_value']", "max_value": "state_dict['max_value']"},
        )
        if sd["current_value"] > sd["max_value"]:
            raise ConfigError(
                f"state_dict['current_value'] ({sd['current_value']}) is greater than state_dict['max_value'] "
                f"({sd['max_value']}): the state dict is corrupt or from another schedule"
            )
        self._consumed = sd["consumed_layer_tokens"]
        self._current_steps = sd["current_steps"]
        self._set_value(sd["current_value"])
        self.min_value = sd["min_value"]
        self.max_value = sd["max_value"]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(min_value={self.min_value}, max_value={self.max_value}, "
            f"require_steps={self.require_steps}, seq_per_step={self.seq_per_step}, "
            f"total_layer_num={self.total_layer_num}, random_ltd_layer_num={self.random_ltd_layer_num}, "
            f"global_batch_size={self.global_batch_size}, schedule_type={self.schedule_type!r}; "
            f"current_steps={self._current_steps}, current_value={self._current_value}, "
            f"consumed_layer_tokens={self._consumed})"
        )
