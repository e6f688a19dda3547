"""The checkpoint round trip of the demo: save converted, inspect, strip, load strictly into a plain GPT.

The proof holds when the stripped file loads with ``strict=True`` into a model that was
never converted, and every tensor of that model equals the trained model's own tensor
(compared under the trained model's plain names, from ``save_without_random_ltd``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import inspect_checkpoint, load_state_dict, save_state_dict, strip_checkpoint
from ..convert import random_ltd_layers, save_without_random_ltd
from ..model import GPT
from ..schedule import RandomLTDScheduler

__all__ = ["CheckpointProof", "random_ltd_metadata", "save_and_prove"]


@dataclass
class CheckpointProof:
    """What the round trip wrote and checked.

    Attributes:
        checkpoint: the converted checkpoint (keys with ``random_ltd_layer``).
        stripped: the stripped copy (plain keys).
        tensor_count: tensors in the converted checkpoint.
        wrapped_layers: prefixes that ``inspect_checkpoint`` found wrapped.
        recorded_settings: the random-LTD settings read back from the checkpoint's metadata.
        renamed: keys that ``strip_checkpoint`` renamed.
        loaded_strict: the stripped weights loaded with ``strict=True`` into an unconverted GPT.
        identical_tensors: tensors equal (``torch.equal``) to the trained model's.
        compared_tensors: how many tensors were compared.
        mismatched: names that differ or are missing (empty when the proof holds).
        load_error: the first line of the strict load's error, if it failed.
    """

    checkpoint: Path
    stripped: Path
    tensor_count: int
    wrapped_layers: list[str]
    recorded_settings: dict[str, Any]
    renamed: int
    loaded_strict: bool
    identical_tensors: int
    compared_tensors: int
    mismatched: list[str] = field(default_factory=list)
    load_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.loaded_strict and not self.mismatched and self.identical_tensors == self.compared_tensors

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "stripped": str(self.stripped),
            "tensor_count": self.tensor_count,
            "wrapped_layers": self.wrapped_layers,
            "recorded_settings": self.recorded_settings,
            "renamed": self.renamed,
            "loaded_strict": self.loaded_strict,
            "identical_tensors": self.identical_tensors,
            "compared_tensors": self.compared_tensors,
            "mismatched": self.mismatched,
            "load_error": self.load_error,
            "ok": self.ok,
        }


def random_ltd_metadata(model: torch.nn.Module, scheduler: RandomLTDScheduler, seed: int) -> dict[str, Any]:
    """The settings a converted checkpoint records: layers, schedule, its state, the sampling seed."""
    return {
        "wrapped_layers": [name for name, _ in random_ltd_layers(model)],
        "schedule": scheduler.settings(),
        "state": scheduler.state_dict(),
        "seed": seed,
    }


def save_and_prove(
    model: GPT, scheduler: RandomLTDScheduler, seed: int, checkpoint: Path, stripped: Path
) -> CheckpointProof:
    """Save ``model`` (converted) with its settings, inspect it, strip it, and load the result back.

    Raises:
        CheckpointError: a file cannot be written or read (from the checkpoint functions).
    """
    settings = random_ltd_metadata(model, scheduler, seed)
    metadata = {"random_ltd": json.dumps(settings), "model_config": json.dumps(model.config.to_dict())}
    save_state_dict(model.state_dict(), checkpoint, metadata=metadata)
    info = inspect_checkpoint(checkpoint)
    report = strip_checkpoint(checkpoint, stripped)
    plain = GPT(dataclasses.replace(model.config))  # never converted
    load_error = None
    try:
        plain.load_state_dict(load_state_dict(stripped), strict=True)
    except RuntimeError as exc:  # missing or unexpected keys, or a shape mismatch
        load_error = str(exc).splitlines()[0]
    reference = save_without_random_ltd(model)
    got = plain.state_dict()
    mismatched = sorted(set(reference) ^ set(got))
    identical = 0
    for name in reference.keys() & got.keys():
        if torch.equal(reference[name], got[name]):
            identical += 1
        else:
            mismatched.append(name)
    recorded = info.metadata.get("random_ltd", {})
    return CheckpointProof(
        checkpoint=checkpoint,
        stripped=stripped,
        tensor_count=info.tensor_count,
        wrapped_layers=list(info.wrapped_layers),
        recorded_settings=recorded if isinstance(recorded, dict) else {"raw": recorded},
        renamed=report.renamed_count,
        loaded_strict=load_error is None,
        load_error=load_error,
        identical_tensors=identical,
        compared_tensors=len(reference),
        mismatched=mismatched,
    )
