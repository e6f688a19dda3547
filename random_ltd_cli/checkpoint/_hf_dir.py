"""Hugging Face checkpoint folders: which files hold weights, and the shard index.

A folder holds one weights file (``model.safetensors``, ``pytorch_model.bin``) or shards
listed by an index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``):
``{"metadata": {...}, "weight_map": {tensor name: shard file}}``. Stripping renames the
``weight_map`` keys, keeps ``metadata`` and every other key, and copies other files
(``config.json``, tokenizer files...) unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import KeyCollisionError, MalformedCheckpointError
from ..keys import rename_keys
from ._fs import path_exists, require_file
from ._jsonio import load_file

__all__ = ["Index", "check_shard_name", "hf_weight_files", "indexes", "is_hf_dir", "renamed_index"]

INDEX_SUFFIX = ".index.json"
MAX_INDEX = 100_000_000  # bytes; a shard index of 100,000 tensors has about 10 MB
_BIN_PREFIXES = ("pytorch_model", "adapter_model")


@dataclass
class Index:
    """A shard index: its file name (relative to the folder) and parsed JSON."""

    name: str
    data: dict[str, Any]

    @property
    def weight_map(self) -> dict[str, str]:
        return dict(self.data["weight_map"])

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.data["weight_map"].values()))


def check_shard_name(index: Path, shard: Any) -> str:
    """Return ``shard`` if it names a file inside the index's folder, else raise MalformedCheckpointError.

    Refused: non-strings, empty names, absolute paths, drive letters, backslashes, and any
    ``..`` or ``.`` segment (so no shard name can reach outside the folder).
    """
    bad = not isinstance(shard, str) or not shard or "\\" in shard or "\0" in shard or ":" in shard
    parts = PurePosixPath(shard).parts if isinstance(shard, str) else ()
    if bad or shard.startswith("/") or any(p in ("", ".", "..") for p in parts) or "//" in shard:
        raise MalformedCheckpointError(
            f"{index} names the shard {shard!r}, which is not a plain file name inside its folder; "
            "refusing to open it. Fix the index's weight_map (shard names must be relative, without '..')."
        )
    return shard


def _read_index(root: Path, name: str) -> Index | None:
    path = root / name
    data = load_file(path, MAX_INDEX, "shard index")
    if not isinstance(data, dict) or "weight_map" not in data:
        return None  # some other *.index.json
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise MalformedCheckpointError(f"{path}: weight_map must map tensor names to shard files.")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise MalformedCheckpointError(
                f"{path}: weight_map maps {key!r} to {shard!r}, not to a shard file name. Fix the index."
            )
    for shard in dict.fromkeys(weight_map.values()):
        check_shard_name(path, shard)
        if path_exists(root / shard):
            require_file(root / shard, what="shard")  # a FIFO or folder under a shard's name: refused
        else:
            raise MalformedCheckpointError(
                f"{path} lists the shard {shard!r}, which is missing from {root}. "
                "Copy or download the missing shard, then retry."
            )
    return Index(name, data)


def indexes(root: Path) -> list[Index]:
    """The folder's shard indexes (top level only), checked: safe shard names that all exist."""
    found = []
    for path in sorted(root.iterdir()):
        if path.name.endswith(INDEX_SUFFIX) and path.is_file():
            index = _read_index(root, path.name)
            if index is not None:
                found.append(index)
    return found


def _is_weights_name(name: str) -> bool:
    return name.endswith(".safetensors") or (name.endswith(".bin") and name.startswith(_BIN_PREFIXES))


def hf_weight_files(root: Path, found: list[Index]) -> list[str]:
    """Weight files to rewrite: every indexed shard, plus top-level ``*.safetensors`` and ``pytorch_model*.bin``."""
    names: dict[str, None] = {}
    for index in found:
        names.update(dict.fromkeys(index.shards))
    for path in sorted(root.iterdir()):
        if path.is_file() and _is_weights_name(path.name):
            names.setdefault(path.name, None)
    return list(names)


def is_hf_dir(root: Path) -> bool:
    """Whether the folder holds Hugging Face weights (a weights file or an index) at its top level."""
    return any(p.is_file() and (_is_weights_name(p.name) or p.name.endswith(INDEX_SUFFIX)) for p in root.iterdir())


def renamed_index(root: Path, index: Index) -> tuple[bytes, dict[str, str]]:
    """The index with stripped ``weight_map`` keys (order and everything else kept), and the renames.

    Raises:
        KeyCollisionError: two tensor names, possibly in different shards, would become one.
    """
    try:
        names = rename_keys(index.data["weight_map"])
    except KeyCollisionError as exc:
        raise KeyCollisionError(f"{root / index.name}: {exc}") from exc
    data = dict(index.data)
    data["weight_map"] = {names[k]: v for k, v in index.data["weight_map"].items()}
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), names
