"""Training-loop integrations: a Hugging Face ``TrainerCallback`` that drives the random-LTD schedule.

In a plain PyTorch loop nothing more than the scheduler is needed: call
``scheduler.step()`` once per optimizer step, before that step's forward passes
(see :class:`~random_ltd_cli.schedule.RandomLTDScheduler`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback

from .schedule import RandomLTDScheduler

__all__ = ["SCHEDULER_FILE", "RandomLTDCallback", "fast_forward"]

SCHEDULER_FILE = "random_ltd_scheduler.json"


def fast_forward(scheduler: RandomLTDScheduler, global_step: int) -> None:
    """Put a fresh-run scheduler where it would be after stepping ``0 .. global_step - 1``.

    For resumed runs whose scheduler state was not saved: the reserved length and the
    consumed layer-tokens are recomputed exactly from the schedule.
    """
    if global_step <= 0 or scheduler.current_steps >= global_step - 1:
        return
    last = global_step - 1
    scheduler.load_state_dict(
        {
            "consumed_layer_tokens": scheduler.layer_tokens_at(global_step),
            "current_steps": last,
            "current_value": scheduler.value_at(last),
            "min_value": scheduler.min_value,
            "max_value": scheduler.max_value,
        }
    )


class RandomLTDCallback(TrainerCallback):
    """Steps a :class:`RandomLTDScheduler` with ``transformers.Trainer`` and logs it.

    * at the beginning of every optimizer step: ``scheduler.update_seq(state.global_step)``
      (micro-batches of one step share it: the step is counted once);
    * on every log: ``random_ltd/reserved_length`` and ``random_ltd/consumed_layer_tokens``;
    * on every checkpoint save: the scheduler's state as ``random_ltd_scheduler.json`` in the
      checkpoint folder; on a resumed run the schedule is restored from the step count
      (or from that file, when ``resume_from`` names the checkpoint folder).

    Args:
        scheduler: the scheduler the converted model's layers read.
        resume_from: optional checkpoint folder whose ``random_ltd_scheduler.json`` to load.
    """

    def __init__(self, scheduler: RandomLTDScheduler, resume_from: str | os.PathLike[str] | None = None) -> None:
        self.scheduler = scheduler
        self.resume_from = resume_from

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.resume_from is not None:
            path = os.path.join(os.fspath(self.resume_from), SCHEDULER_FILE)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    self.scheduler.load_state_dict(json.load(f))
        fast_forward(self.scheduler, int(state.global_step))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.scheduler.update_seq(int(state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        extra = {
            "random_ltd/reserved_length": self.scheduler.get_current_seq(),
            "random_ltd/consumed_layer_tokens": self.scheduler.consumed_layer_tokens,
        }
        logs.update(extra)
        if state.log_history:  # the Trainer recorded the entry before calling us
            state.log_history[-1].update(extra)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            tmp = os.path.join(folder, SCHEDULER_FILE + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.scheduler.state_dict(), f)
            os.replace(tmp, os.path.join(folder, SCHEDULER_FILE))
