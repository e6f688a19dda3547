"""A PyTorch Lightning ``Callback`` that drives the random-LTD schedule (needs ``pip install random-ltd[lightning]``).

Importing this module imports Lightning (``lightning.pytorch``, else the older ``pytorch_lightning``);
nothing else in the package does.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    from pytorch_lightning import Callback  # type: ignore[assignment]

from .integrations import fast_forward
from .schedule import RandomLTDScheduler

__all__ = ["RandomLTDLightningCallback"]


class RandomLTDLightningCallback(Callback):
    """Steps a :class:`RandomLTDScheduler` with ``lightning.Trainer``, logs it, and checkpoints it.

    * before every training batch: ``scheduler.update_seq(trainer.global_step)`` (the micro-batches
      of one optimizer step share it: the step is counted once);
    * logs ``random_ltd/reserved_length`` and ``random_ltd/consumed_layer_tokens`` on every step;
    * its state (the scheduler's ``state_dict()``) is saved in every ``.ckpt`` under
      ``checkpoint["callbacks"]`` and restored by ``trainer.fit(..., ckpt_path=...)``; a run resumed
      from a checkpoint without it is fast-forwarded from the step count.

    Args:
        scheduler: the scheduler the converted model's layers read.
        log: whether to log the two values through the LightningModule.
    """

    def __init__(self, scheduler: RandomLTDScheduler, *, log: bool = True) -> None:
        self.scheduler = scheduler
        self.log_values = log
        self._restored = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._restored:
            fast_forward(self.scheduler, int(trainer.global_step))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.scheduler.update_seq(int(trainer.global_step))
        if self.log_values:
            pl_module.log("random_ltd/reserved_length", float(self.scheduler.get_current_seq()), on_step=True)
            pl_module.log(
                "random_ltd/consumed_layer_tokens", float(self.scheduler.consumed_layer_tokens), on_step=True
            )

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scheduler.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)
        self._restored = True
