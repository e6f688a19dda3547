"""DeepSpeed checkpoint folders: tags, model states and ZeRO optimizer states.

Layout written by ``engine.save_checkpoint(dir)``::

    dir/latest                                  text: the newest tag, e.g. "global_step100"
    dir/global_step100/mp_rank_00_model_states.pt          {"module": state dict, "param_shapes": ...}
    dir/global_step100/zero_pp_rank_0_mp_rank_00_optim_states.pt   {"optimizer_state_dict": {...}}
    dir/global_step100/layer_01-model_00-model_states.pt   (pipeline parallel: one state dict per layer)
    dir/zero_to_fp32.py

Every ``*model_states.pt`` and ``*optim_states.pt`` of every tag is rewritten (the names they
hold are listed in :mod:`._torch_names`); all other files are copied unchanged. The folder
may also be a Hugging Face Trainer checkpoint (``checkpoint-500/``) with weights at the top.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["deepspeed_files", "is_deepspeed_dir", "model_state_files", "tag_dirs"]

_STATE_FILE = re.compile(r".*(model_states|optim_states)\.pt")
_MODEL_FILE = re.compile(r".*model_states\.pt")


def _has_states(folder: Path) -> bool:
    return any(p.is_file() and _STATE_FILE.fullmatch(p.name) for p in folder.iterdir())


def _natural(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.name)
    return (int(digits[-1]) if digits else -1, path.name)


def tag_dirs(root: Path) -> list[Path]:
    """Folders holding DeepSpeed state files: ``root`` itself (a tag folder) or its sub-folders (by step)."""
    if _has_states(root):
        return [root]
    tags = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _has_states(p)]
    return sorted(tags, key=_natural)


def is_deepspeed_dir(root: Path) -> bool:
    """Whether ``root`` is a DeepSpeed checkpoint folder or one of its tag folders."""
    return bool(tag_dirs(root))


def deepspeed_files(root: Path) -> list[str]:
    """Paths (relative to ``root``) of every model- and optimizer-state file, tag by tag."""
    files = []
    for tag in tag_dirs(root):
        for path in sorted(tag.iterdir()):
            if path.is_file() and _STATE_FILE.fullmatch(path.name):
                files.append(path.relative_to(root).as_posix())
    return files


def model_state_files(root: Path) -> list[str]:
    """The model-state files of the newest tag: the one ``latest`` names, else the last in order."""
    tags = tag_dirs(root)
    latest = root / "latest"
    if latest.is_file() and tags != [root]:
        name = latest.read_text(encoding="utf-8").strip()
        chosen = [t for t in tags if t.name == name]
        if not chosen:
            raise CheckpointError(
                f"{latest} names the tag {name!r}, but {root} has no such folder with state files; "
                "fix 'latest' or copy the missing tag."
            )
        tags = chosen
    if not tags:
        return []
    tag = tags[-1]
    return [p.relative_to(root).as_posix() for p in sorted(tag.iterdir()) if _MODEL_FILE.fullmatch(p.name)]
