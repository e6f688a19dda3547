"""PyTorch Lightning on CPU: the callback steps the schedule, checkpoints it, resumes it; .ckpt files strip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from random_ltd_cli import RandomLTDScheduler, convert_to_random_ltd, random_ltd_layers
from random_ltd_cli.checkpoint import load_state_dict, strip_checkpoint
from random_ltd_cli.keys import strip_key
from random_ltd_cli.model import GPT, GPTConfig

from .conftest import require

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def make_module(scheduler: RandomLTDScheduler | None) -> Any:
    pl = require("lightning.pytorch")

    class LitGPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gpt = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=4, n_head=2, n_embd=32))
            self.kept: list[int] = []
            if scheduler is not None:
                convert_to_random_ltd(self.gpt, scheduler=scheduler, seed=0)
                for _, layer in random_ltd_layers(self.gpt)[:1]:
                    layer.sampler = self._recording(layer.sampler)

        def _recording(self, inner: Any) -> Any:
            def sample(*args: Any, **kwargs: Any) -> torch.Tensor:
                idx = inner(*args, **kwargs)
                self.kept.append(int(idx.shape[1]))
                return idx

            return sample

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.gpt(batch, batch)[1]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return LitGPT()


def scheduler() -> RandomLTDScheduler:
    return RandomLTDScheduler(min_value=8, max_value=32, require_steps=4, seq_per_step=8, total_layer_num=4,
                              random_ltd_layer_num=2, global_batch_size=2)  # fmt: skip


def fit(module: Any, callback: Any, steps: int, ckpt_path: Path | None = None) -> Any:
    pl = require("lightning.pytorch")
    data = torch.randint(0, 50, (2 * steps, 32), generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer.fit(module, loader, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer


def test_callback_steps_the_schedule_saves_it_and_resumes(tmp_path: Path) -> None:
    from random_ltd_cli.lightning import RandomLTDLightningCallback

    sched = scheduler()
    module = make_module(sched)
    trainer = fit(module, RandomLTDLightningCallback(sched), 3)
    assert module.kept == [8, 8, 16]  # r(g) for g = 0, 1, 2 with min 8, max 32, 4 steps, multiples of 8
    assert trainer.callback_metrics["random_ltd/reserved_length"] == 16
    trainer.save_checkpoint(str(tmp_path / "last.ckpt"))

    resumed_sched = scheduler()  # a fresh process: the state comes from the checkpoint
    resumed = make_module(resumed_sched)
    fit(resumed, RandomLTDLightningCallback(resumed_sched), 5, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.kept == [24]  # steps 3 and 4 as an uninterrupted run: r = 24, then r = 32 = S (nothing dropped)
    reference = scheduler()
    for g in range(5):
        reference.update_seq(g)
    assert resumed_sched.state_dict() == reference.state_dict()

    # the .ckpt strips and its weights load into the plain model
    report = strip_checkpoint(tmp_path / "last.ckpt")
    assert report.renamed_count == 24
    plain = make_module(None)
    plain.load_state_dict(load_state_dict(report.output), strict=True)
    trained = {strip_key(k): v for k, v in module.state_dict().items()}
    for name, value in plain.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_callback_is_exported_lazily() -> None:
    require("lightning.pytorch")
    import random_ltd_cli
    from random_ltd_cli.lightning import RandomLTDLightningCallback

    assert random_ltd_cli.RandomLTDLightningCallback is RandomLTDLightningCallback
