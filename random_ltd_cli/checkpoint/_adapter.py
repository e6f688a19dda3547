"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``): what strip may not rewrite.

The adapter's weights are renamed like any Hugging Face folder's. Its config names modules by
suffix (``target_modules: ["c_attn"]``), which a converted and a plain model share; a config
that names a module *inside* a ``random_ltd_layer`` (a full path or a regex) would not match the
plain model after the weights were renamed, so such a folder is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..keys import SEGMENT
from ._fs import path_exists
from ._jsonio import load_file

__all__ = ["ADAPTER_CONFIG", "check_adapter_config"]

ADAPTER_CONFIG = "adapter_config.json"
MAX_CONFIG = 16 << 20  # bytes; real adapter configs have a few KiB


def _mentions(value: Any) -> bool:
    if isinstance(value, str):
        return SEGMENT in value
    if isinstance(value, dict):
        return any(_mentions(k) or _mentions(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_mentions(v) for v in value)
    return False


def check_adapter_config(root: Path) -> None:
    """Refuse a PEFT adapter folder whose config names modules inside ``random_ltd_layer``.

    Raises:
        CheckpointError: such a config.
        MalformedCheckpointError, LimitExceededError: a config that is not JSON, or too large or deep.
        UnsupportedFileTypeError: a FIFO, device or folder under its name.
    """
    path = root / ADAPTER_CONFIG
    if not path_exists(path):
        return
    config = load_file(path, MAX_CONFIG, "adapter config")  # bounded size, depth and memory
    fields = [str(k) for k, v in config.items()] if isinstance(config, dict) else []
    named = [k for k in fields if _mentions(config[k])]
    if named:
        raise CheckpointError(
            f"{path} names modules inside {SEGMENT!r} ({', '.join(named)}); strip does not rewrite adapter "
            "configs. Save the adapter after revert_random_ltd(model), or edit adapter_config.json, then retry."
        )
