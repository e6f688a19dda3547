"""Run folders and the files trainers leave beside the weights (no torch here).

A *run folder* holds several checkpoints that must never be merged into one model: a
``transformers.Trainer`` ``output_dir`` (``checkpoint-500/``, ``checkpoint-1000/``...), a
Lightning ``checkpoints/`` folder (``last.ckpt``, ``epoch=0-step=25.ckpt``), an Accelerate
``checkpoints/`` folder (``checkpoint_0/``...) or any folder of standalone weights files
without a shard index. Its *entries* are those checkpoints, each inspected and stripped on
its own. Files that are not weights (optimizer, scheduler, RNG states, training arguments,
configs, tokenizers) get a *role* for display and are copied unchanged.

``kind`` names what wrote a checkpoint folder, from its files: ``trainer-checkpoint``,
``accelerate-checkpoint``, ``peft-adapter``, ``lightning-checkpoints``, ``hf-model``,
``deepspeed`` or ``run``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ._common import TORCH_SUFFIXES
from ._deepspeed_dir import is_deepspeed_dir
from ._hf_dir import INDEX_SUFFIX, indexes

__all__ = [
    "STRIPPED",
    "checkpoint_default_output",
    "file_role",
    "folder_kind",
    "is_hf_weights_dir",
    "natural_key",
    "run_entries",
    "side_files",
]

STRIPPED = ".stripped"

_ROLES: tuple[tuple[str, str], ...] = (
    (r"optimizer(_\d+)?\.(pt|bin|pth)", "optimizer state"),
    (r"scheduler(_\d+)?\.(pt|bin|pth)", "LR scheduler state"),
    (r"rng_state(_\d+)?\.pth|random_states_\d+\.pkl", "RNG state"),
    (r"scaler\.pt", "grad scaler state"),
    (r"sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin", "data sampler state"),
    (r"custom_checkpoint_\d+\.pkl", "custom state (Accelerate)"),
    (r"training_args\.bin", "training arguments"),
    (r"trainer_state\.json", "trainer state"),
    (r"random_ltd_scheduler\.json", "random-LTD scheduler state"),
    (r"adapter_config\.json", "adapter config (PEFT)"),
    (r"config\.json|generation_config\.json|model_index\.json", "model config"),
    (r"tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|.*\.model|added_tokens\.json|chat_template.*",
     "tokenizer"),
    (r"latest|latest_universal", "DeepSpeed tag pointer"),
    (r"zero_to_fp32\.py", "DeepSpeed script"),
    (r"hparams\.yaml|events\.out\.tfevents\..*|metrics\.csv|README\.md|results\.json", "run log or notes"),
)
_ROLE_RES = [(re.compile(pattern), role) for pattern, role in _ROLES]
_TRAINER_NAME = re.compile(r"checkpoint-\d+")  # transformers.Trainer: glob "checkpoint-*", regex checkpoint-(\d+)
_ACCELERATE_NAME = re.compile(r"checkpoint_\d+")  # Accelerate's automatic checkpoint naming


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders digits by value: ``h.2`` before ``h.10``, ``checkpoint-5`` before ``checkpoint-40``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def file_role(name: str) -> str | None:
    """What a non-weights file in a checkpoint folder is (``None``: it may hold weights)."""
    for pattern, role in _ROLE_RES:
        if pattern.fullmatch(name):
            return role
    return None


def _is_weights_file(path: Path) -> bool:
    """A top-level file that may hold one model's weights on its own (not a known side file)."""
    if not path.is_file() or file_role(path.name) is not None or path.name.endswith(INDEX_SUFFIX):
        return False
    return path.suffix == ".safetensors" or path.suffix.lower() in TORCH_SUFFIXES


def _is_checkpoint_folder(path: Path) -> bool:
    """A sub-folder that holds checkpoints at its top level (one model, or several standalone files)."""
    if not path.is_dir() or path.is_symlink():
        return False
    return is_deepspeed_dir(path) or any(_is_weights_file(p) for p in path.iterdir()) or bool(indexes(path))


def is_hf_weights_dir(root: Path) -> bool:
    """One model's Hugging Face weights: a shard index, or exactly one weights file and no checkpoint sub-folders."""
    if indexes(root):
        return True
    files = [p for p in root.iterdir() if _is_weights_file(p)]
    if len(files) != 1 or any(p.is_dir() and _is_checkpoint_folder(p) for p in root.iterdir()):
        return False
    name = files[0].name
    return name.endswith(".safetensors") or (name.endswith(".bin") and name.startswith(("pytorch_model",
                                                                                      "adapter_model")))


def run_entries(root: Path) -> list[Path]:
    """The checkpoints a run folder holds (sub-folders and standalone files), in natural order; [] if none."""
    if is_deepspeed_dir(root) or is_hf_weights_dir(root):
        return []
    entries = [p for p in root.iterdir() if _is_weights_file(p) or _is_checkpoint_folder(p)]
    return sorted(entries, key=lambda p: natural_key(p.name))


def side_files(root: Path, weights: list[str]) -> dict[str, str]:
    """Top-level files of ``root`` that are not in ``weights``, with their role ("other" if unknown)."""
    skip = set(weights)
    return {
        p.name: file_role(p.name) or "other"
        for p in sorted(root.iterdir(), key=lambda p: natural_key(p.name))
        if p.is_file() and p.name not in skip and not p.name.endswith(INDEX_SUFFIX)
    }


def folder_kind(root: Path, fmt: str) -> str:
    """What wrote the folder ``root`` of format ``fmt``, judged from its files (see the module docstring)."""
    names = {p.name for p in root.iterdir()}
    if "trainer_state.json" in names:
        return "trainer-checkpoint"
    if any(re.fullmatch(r"random_states_\d+\.pkl", n) for n in names) or _ACCELERATE_NAME.fullmatch(root.name):
        return "accelerate-checkpoint"
    if "adapter_config.json" in names and any(n.startswith("adapter_model") for n in names):
        return "peft-adapter"
    if fmt == "deepspeed-dir":
        return "deepspeed"
    if fmt == "hf-dir":
        return "hf-model"
    if any(n.endswith(".ckpt") for n in names):
        return "lightning-checkpoints"
    return "run"


def checkpoint_default_output(src: Path) -> Path | None:
    """For a checkpoint that a trainer manages, a default output outside the folder it rotates; else None.

    ``out/checkpoint-500`` (transformers.Trainer) -> ``out.stripped/checkpoint-500``;
    ``ckpts/checkpoint_3`` (Accelerate) -> ``ckpts.stripped/checkpoint_3``;
    ``checkpoints/last.ckpt`` (Lightning) -> ``checkpoints.stripped/last.ckpt``. The Trainer's
    rotation globs ``checkpoint-*``, Accelerate's deletes every entry of its folder, and
    Lightning's resume looks for ``last*`` files in its own folder: none of them sees these.
    """
    is_managed = _TRAINER_NAME.fullmatch(src.name) or _ACCELERATE_NAME.fullmatch(src.name) or (
        src.suffix == ".ckpt" and src.is_file()
    )
    if not is_managed:
        return None
    parent = src.parent
    if parent.name in ("", ".", ".."):
        parent = src.absolute().parent
        if not parent.name:
            return None
    return parent.with_name(parent.name + STRIPPED) / src.name
