"""Lightning, Accelerate and DCP checkpoints strip and inspect without --trust-pickle; one foreign global
injected into any of their pickles is refused (DeepSpeed's files: test_deepspeed_2ranks.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from random_ltd_cli import convert_to_random_ltd
from random_ltd_cli.checkpoint import inspect_checkpoint, strip_checkpoint
from random_ltd_cli.errors import UnsafePickleError
from random_ltd_cli.model import GPT, GPTConfig

from ._inject import inject_file
from .conftest import require

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
FOREIGN = ["os.system", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScalerX", "deepspeed.utils.tensor_fragment.os"]
SAFE = "safe to torch.load(weights_only=True)"


def tiny() -> GPT:
    torch.manual_seed(0)
    return convert_to_random_ltd(GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=4, n_head=2, n_embd=32)),
                                 reserved_length=8, seed=0)  # fmt: skip


def _lightning(out: Path) -> Path:
    pl = require("lightning.pytorch")

    class Lit(pl.LightningModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()  # hyper_parameters in the .ckpt
            self.gpt = tiny()

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = self.gpt(batch, batch)[1]
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(out), monitor="loss", every_n_train_steps=1)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt, pl.callbacks.EarlyStopping("loss")])  # fmt: skip
    data = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(1))
    trainer.fit(Lit(), torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(str(out / "last.ckpt"))
    return out / "last.ckpt"


def _accelerate(out: Path) -> Path:
    require("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        acc = Accelerator(cpu=True)
        model = tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        batch = torch.randint(0, 50, (2, 32), generator=torch.Generator().manual_seed(3))
        acc.backward(model(batch, batch)[1])
        opt.step()
        acc.save_state(str(out), safe_serialization=False)  # pytorch_model.bin: a pickle strip reads
    finally:
        AcceleratorState._reset_state(True)
    return out


def _dcp(out: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.zeros(2, 32, dtype=torch.long), torch.zeros(2, 32, dtype=torch.long))[1].backward()
    opt.step()
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(out))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint per engine: (what strip is given, the pickle inside it to tamper with)."""
    root = tmp_path_factory.mktemp("engines")
    return {
        "lightning": _lightning(root / "lightning"),
        "accelerate": _accelerate(root / "accelerate"),
        "dcp": _dcp(root / "dcp"),
    }


PICKLE = {"lightning": "", "accelerate": "pytorch_model.bin", "dcp": ".metadata"}


@pytest.mark.parametrize("engine", ["lightning", "accelerate", "dcp"])
def test_engine_checkpoints_strip_and_inspect_without_trust(written: dict[str, Path], tmp_path: Path,
                                                            engine: str) -> None:  # fmt: skip
    src = written[engine]
    report = strip_checkpoint(src, tmp_path / f"out{src.suffix}")
    assert report.wrote and report.renamed_count == 24  # 2 wrapped blocks x 12 tensors
    info = inspect_checkpoint(src)
    name = PICKLE[engine] or src.name
    assert list(info.pickles) == [name]
    verdict = info.pickles[name]
    if engine == "dcp":  # DCP's own metadata classes; dcp.load unpickles .metadata without torch's allowlist
        assert verdict.verdict.startswith("torch.distributed.checkpoint metadata classes only")
        assert "torch.distributed.checkpoint.metadata.Metadata" in verdict.globals
    else:
        assert verdict.verdict == SAFE and set(verdict.globals.values()) == {"torch"}


@pytest.mark.parametrize("foreign", FOREIGN)
@pytest.mark.parametrize("engine", ["lightning", "accelerate", "dcp"])
def test_one_foreign_global_is_refused(written: dict[str, Path], tmp_path: Path, engine: str, foreign: str,
                                       untouched: Any) -> None:  # fmt: skip
    src = tmp_path / written[engine].name
    (shutil.copytree if written[engine].is_dir() else shutil.copy)(written[engine], src)
    target = src / PICKLE[engine] if PICKLE[engine] else src
    inject_file(target, foreign)
    check = untouched(src)
    for call in (lambda: strip_checkpoint(src), lambda: inspect_checkpoint(src)):
        with pytest.raises(UnsafePickleError) as err:
            call()
        if engine == "dcp":  # the DCP reader's own wording
            assert re.fullmatch(rf"{re.escape(str(target))} .*: {re.escape(foreign)}\. .*--trust-pickle\.?",
                                str(err.value))  # fmt: skip
        else:
            assert str(err.value) == (
                f"{target} needs Python globals that torch.load(weights_only=True) refuses: {foreign}. random-ltd "
                "never runs them, but such a file can run code when loaded with torch. Only if you trust its source, "
                "pass --trust-pickle (trust_pickle=True)."
            )
    check()
    assert not any(p.name.endswith(".stripped") or ".stripped." in p.name for p in tmp_path.iterdir())


def test_cli_inspect_shows_the_verdict_column_and_row(written: dict[str, Path]) -> None:
    shown = subprocess.run([sys.executable, "-m", "random_ltd_cli", "inspect", str(written["accelerate"])],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert "pickle safety" in shown.stdout and "safe to torch.load(weights_only=True)" in shown.stdout
