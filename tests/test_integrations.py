"""Training integrations: a plain PyTorch loop, the transformers Trainer callback, and torch.compile."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import RecordingSampler, tiny_hf_model

from random_ltd_cli import RandomLTDScheduler, convert_to_random_ltd, random_ltd_layers
from random_ltd_cli.model import GPT, GPTConfig


def _sched(**kw: Any) -> RandomLTDScheduler:
    args = dict(min_value=8, max_value=32, require_steps=4, seq_per_step=8, total_layer_num=4,
                random_ltd_layer_num=2, global_batch_size=2)
    args.update(kw)
    return RandomLTDScheduler(**args)  # type: ignore[arg-type]


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=4, n_head=2, n_embd=32))


def _record(model: torch.nn.Module) -> RecordingSampler:
    (_, w), *_ = random_ltd_layers(model)
    w.sampler = RecordingSampler(w.sampler)
    return w.sampler


def test_plain_loop_follows_the_schedule() -> None:
    sched = _sched()
    model = convert_to_random_ltd(_tiny_gpt(), scheduler=sched).train()
    rec = _record(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(6):
        sched.step()  # once per optimizer step, before the forward
        idx = torch.randint(0, 50, (2, 32))
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    # r = 8, 14->8, 20->16, 26->24, then 32 = S (no dropping, so no draw)
    assert [c.shape[1] for c in rec.calls] == [8, 8, 16, 24]
    assert sched.consumed_layer_tokens == sched.layer_tokens_at(6)


def test_trainer_callback_steps_logs_and_saves(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from random_ltd_cli import RandomLTDCallback

    model = tiny_hf_model("gpt2").train()
    sched = _sched(min_value=4, max_value=12, require_steps=4, seq_per_step=2, global_batch_size=2)
    convert_to_random_ltd(model, scheduler=sched)
    rec = _record(model)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(3, 90, (12,), generator=g)), "labels": ids} for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=1, save_steps=2,
        report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[RandomLTDCallback(sched)])
    trainer.train()
    assert [c.shape[1] for c in rec.calls] == [4, 6, 8, 10]  # one value per optimizer step
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["random_ltd/reserved_length"] for h in logged] == [4, 6, 8, 10]
    assert logged[-1]["random_ltd/consumed_layer_tokens"] == sched.layer_tokens_at(4)
    saved = json.loads((tmp_path / "checkpoint-4" / "random_ltd_scheduler.json").read_text())
    assert saved == sched.state_dict()


def test_fast_forward_matches_stepping() -> None:
    from random_ltd_cli.integrations import fast_forward

    stepped, resumed = _sched(), _sched()
    for _ in range(3):
        stepped.step()
    fast_forward(resumed, 3)
    assert resumed.state_dict() == stepped.state_dict()
    assert resumed.step() == stepped.step()


def _compile_and_train(backend: str) -> list[float]:
    sched = _sched()
    model = convert_to_random_ltd(_tiny_gpt(), scheduler=sched).train()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        sched.step()
        idx = torch.randint(0, 50, (2, 32))
        _, loss = compiled(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_torch_compile_trains() -> None:
    # aot_eager traces the wrapper with dynamo and AOT autograd without C++ code generation (fast in CI)
    losses = _compile_and_train("aot_eager")
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.skipif(os.environ.get("RANDOM_LTD_SLOW") != "1", reason="inductor compiles C++ (minutes on 2 cores); "
                    "set RANDOM_LTD_SLOW=1")
def test_torch_compile_inductor_trains() -> None:
    losses = _compile_and_train("inductor")
    assert all(torch.isfinite(torch.tensor(losses)))
