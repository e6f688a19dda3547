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

Inspecting reads the newest tag's model states: ZeRO stage 3 (``zero_pp_rank_*_model_states.pt``)
keeps parameters as empty placeholders, so their shapes come from the ``param_shapes`` side table
and the folder is flagged (``metadata["zero_stage"] = 3``); pipeline-engine layer files
(``layer_02-model_states.pt``) hold names relative to their layer, reported under the layer's index
(``2.random_ltd_layer.attn...``) as ``PipelineModule.state_dict()`` names them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import MalformedCheckpointError
from ..keys import strip_key
from ._common import TensorInfo, plain_metadata
from ._fs import read_file, require_file
from ._pickle import mapping_items
from ._torch import read_torch, scan, wrapped_side_names
from ._torch_names import size_shape

__all__ = [
    "ZERO3_HINT",
    "deepspeed_files",
    "is_deepspeed_dir",
    "is_zero3",
    "model_state_files",
    "pipeline_prefix",
    "scan_deepspeed",
    "tag_dirs",
]

_STATE_FILE = re.compile(r".*(model_states|optim_states)\.pt")
_MODEL_FILE = re.compile(r".*model_states\.pt")
_ZERO3_MODEL = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")
_LAYER_FILE = re.compile(r"layer_(\d+)-model(?:_\d+-model)?_states\.pt")
_LATEST_LIMIT = 4096  # bytes: a tag name
ZERO3_HINT = "run its zero_to_fp32.py (python DIR/zero_to_fp32.py DIR OUT) to gather the full weights"


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
        name = _read_latest(latest)
        chosen = [t for t in tags if t.name == name]
        if not chosen:
            raise MalformedCheckpointError(
                f"{latest} names the tag {name!r}, but {root} has no such folder with state files; "
                "fix 'latest' or copy the missing tag."
            )
        tags = chosen
    if not tags:
        return []
    tag = tags[-1]
    files = [p for p in sorted(tag.iterdir()) if _MODEL_FILE.fullmatch(p.name)]
    for path in files:  # a folder, FIFO or device under a model-states name: refused, never opened
        require_file(path, what="model-states file")
    return [p.relative_to(root).as_posix() for p in files]


def _read_latest(latest: Path) -> str:
    """The tag that DeepSpeed's ``latest`` file names (a short UTF-8 text)."""
    raw = read_file(latest, _LATEST_LIMIT, "DeepSpeed 'latest' file")
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise MalformedCheckpointError(
            f"{latest} is not UTF-8 text; it should name the newest tag (e.g. global_step100). Fix or remove it."
        ) from None
    if not name or "\0" in name or "/" in name or name in (".", ".."):
        raise MalformedCheckpointError(
            f"{latest} names the tag {name!r}, which is not a folder name; it should name the newest tag "
            "(e.g. global_step100). Fix or remove it."
        )
    return name


def is_zero3(files: list[str]) -> bool:
    """Whether these model-state files are ZeRO stage 3's (parameters partitioned, placeholders in ``module``)."""
    return any(_ZERO3_MODEL.fullmatch(Path(rel).name) for rel in files)


def pipeline_prefix(rel: str) -> str:
    """``"2."`` for a pipeline layer file ``layer_02-model_states.pt``, else ``""``."""
    match = _LAYER_FILE.fullmatch(Path(rel).name)
    return f"{int(match.group(1))}." if match else ""


def _param_shapes(path: Path, *, trust_pickle: bool) -> dict[str, tuple[int, ...]]:
    """The ``param_shapes`` side table (a dict, or a list of dicts per parameter group): name -> shape."""
    root = read_torch(path, trust_pickle=trust_pickle).parsed.root
    table = dict(mapping_items(root) or ()).get("param_shapes")
    groups = [table] if mapping_items(table) is not None else table if isinstance(table, list) else []
    shapes: dict[str, tuple[int, ...]] = {}
    for group in groups:
        for name, size in mapping_items(group) or ():
            if isinstance(name, str):
                shapes[strip_key(str(name))] = size_shape(size)  # DeepSpeed may have stripped only ``module``
    return shapes


def scan_deepspeed(
    root: Path, *, trust_pickle: bool
) -> tuple[list[TensorInfo], dict[str, Any], list[str], list[str]]:
    """Tensors, metadata, files read, and wrapped names in side tables, of the newest tag's model states."""
    files = model_state_files(root)
    zero3 = is_zero3(files)
    if zero3:  # every data-parallel rank saves the same placeholders and side tables: read one
        files = files[:1]
    tensors: list[TensorInfo] = []
    metadata: dict[str, Any] = {}
    side: list[str] = []
    for rel in files:
        file_tensors, file_metadata = scan(root / rel, trust_pickle=trust_pickle)
        prefix = pipeline_prefix(rel)
        if zero3:
            shapes = _param_shapes(root / rel, trust_pickle=trust_pickle)
            file_tensors = [
                TensorInfo(t.name, t.dtype, shapes[strip_key(t.name)])
                if t.numel == 0 and strip_key(t.name) in shapes
                else t
                for t in file_tensors
            ]
        tensors += [TensorInfo(prefix + t.name, t.dtype, t.shape) for t in file_tensors]
        side += [prefix + name for name in wrapped_side_names(root / rel, trust_pickle=trust_pickle)]
        for key, value in file_metadata.items():
            metadata.setdefault(key, value)
    if zero3:
        metadata["zero_stage"] = 3
        metadata["note"] = f"ZeRO stage 3: parameters are partitioned in the optimizer states; {ZERO3_HINT}."
    return tensors, plain_metadata(metadata), files, list(dict.fromkeys(side))
