"""Load a plain state dict from any supported checkpoint, and save one atomically (imports torch)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafePickleError
from ._allowlist import torch_stand_ins
from ._atomic import atomic_file, atomic_path
from ._common import TORCH_SUFFIXES
from ._dcp import CONSOLIDATE_HINT
from ._deepspeed_dir import ZERO3_HINT, is_zero3, model_state_files
from ._detect import detect_format, file_format
from ._hf_dir import hf_weight_files, indexes
from ._safetensors import read_header
from ._torch import canonical, read_torch
from ._torch_names import CONTAINER_KEYS

__all__ = ["load_state_dict", "save_state_dict"]

def _has_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """The model's weights inside a loaded torch checkpoint (bare, or under a known nesting key)."""
    if _has_tensors(obj):
        return obj if isinstance(obj, dict) else dict(obj)
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if _has_tensors(obj.get(key)):
                inner = obj[key]
                return inner if isinstance(inner, dict) else dict(inner)
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path} holds no state dict (found {keys}); expected tensors at the top level or under one of "
        f"{', '.join(CONTAINER_KEYS)}."
    )


def _load_torch_file(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    tf = read_torch(path, trust_pickle=trust_pickle)  # refuses unsafe globals before torch sees the file
    # allow-listed engine classes (e.g. a ZeRO loss scaler) are built as inert stand-ins: the engine's
    # package is never imported, and only torch's own allowlist and EngineRecord can be called
    stand_ins = torch_stand_ins(canonical(g.qualname) for g in tf.globals)
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=tf.kind == "zip")
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"torch.load(weights_only=True) refused {path}: {str(exc).splitlines()[0]} "
            "Only if you trust its source, pass --trust-pickle (trust_pickle=True)."
        ) from exc
    except RuntimeError as exc:
        raise CheckpointError(f"torch could not read {path}: {str(exc).splitlines()[0]}") from exc
    return _unwrap(path, obj)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    names = read_header(path).tensor_names  # checked, in file order
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in names}


def _load_file(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if file_format(path) == "safetensors":
        return _load_safetensors(path)
    return _load_torch_file(path, trust_pickle=trust_pickle)


def load_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Implementation of :func:`random_ltd_cli.checkpoint.load_state_dict`."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "run-dir":
        from ._run import run_entries

        names = [p.name for p in run_entries(path)]
        raise CheckpointError(
            f"{path} holds {len(names)} separate checkpoints ({', '.join(names[:4])}{'...' if len(names) > 4 else ''}),"
            " not one model; pass one of them."
        )
    if fmt == "dcp-dir":
        raise CheckpointError(
            f"{path} is a torch.distributed.checkpoint folder, sharded over .distcp files; "
            f"{CONSOLIDATE_HINT.replace('DIR', str(path))}, then pass OUT.pt."
        )
    files = model_state_files(path) if fmt == "deepspeed-dir" else [path.name]
    if fmt in ("deepspeed-dir", "torch") and is_zero3(files):  # buffers whole, parameters empty placeholders
        folder = path if fmt == "deepspeed-dir" else path.parent.parent
        raise CheckpointError(
            f"{path} is a DeepSpeed ZeRO stage-3 checkpoint: its model states hold only placeholders for the "
            f"parameters; {ZERO3_HINT.replace('DIR', str(folder))}, then pass that file."
        )
    if fmt == "deepspeed-dir":
        if len(files) != 1:
            raise CheckpointError(
                f"{path} holds {len(files)} model-state files ({', '.join(files[:4])}...); merging tensor- or "
                "pipeline-parallel shards is not supported. Consolidate the checkpoint first."
            )
        module = _load_file(path / files[0], trust_pickle=trust_pickle)
        if module and all(t.numel() == 0 for t in module.values() if isinstance(t, torch.Tensor)):
            raise CheckpointError(
                f"{path} is a ZeRO stage-3 checkpoint whose model states hold only placeholders; "
                "run its zero_to_fp32.py to gather the weights, then load that file."
            )
        return module
    if fmt == "hf-dir":
        found = indexes(path)
        names = [s for index in found for s in index.shards] if found else hf_weight_files(path, found)
        state: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(names):
            part = _load_file(path / name, trust_pickle=trust_pickle)
            clash = state.keys() & part.keys()
            if clash:
                raise CheckpointError(f"{path}: {sorted(clash)[0]!r} appears in more than one weights file.")
            state.update(part)
        return state
    return _load_file(path, trust_pickle=trust_pickle)


def _for_safetensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with a private copy for every tensor whose memory another one already uses."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"safetensors stores only tensors under string names; {name!r} is a {type(value).__name__}. "
                "Save to a .pt file instead."
            )
        tensor = value.detach()
        ptr = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if tensor.numel() and ptr in seen:
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # tied weights: an independent copy
        seen.add(ptr)
        out[name] = tensor.contiguous().cpu()
    return out


def save_state_dict(
    state: Mapping[str, Any], path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None
) -> None:
    """Implementation of :func:`random_ltd_cli.checkpoint.save_state_dict`."""
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("metadata must map strings to strings (store settings as a JSON string).")
    if path.suffix.lower() in TORCH_SUFFIXES:
        obj: Any = {"state_dict": state, "random_ltd": dict(metadata)} if metadata else state
        with atomic_file(path) as fd, os.fdopen(os.dup(fd), "wb") as f:
            torch.save(obj, f)
        return
    from safetensors.torch import save_file

    tensors = _for_safetensors(state)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
