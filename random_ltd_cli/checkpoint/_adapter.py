"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``): what strip may not rewrite.

The adapter's weights are renamed like any Hugging Face folder's. Its config names modules by
suffix (``target_modules: ["c_attn"]``), which a converted and a plain model share; a config
that names a module *inside* a ``random_ltd_layer`` (a full path or a regex) would not match the
plain model after the weights were renamed, so such a folder is refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..keys import SEGMENT

__all__ = ["ADAPTER_CONFIG", "check_adapter_config"]

ADAPTER_CONFIG = "adapter_config.json"


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
        CheckpointError: such a config, or one that is not JSON.
    """
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or remove it, then retry.") from exc
    fields = [str(k) for k, v in config.items()] if isinstance(config, dict) else []
    named = [k for k in fields if _mentions(config[k])]
    if named:
        raise CheckpointError(
            f"{path} names modules inside {SEGMENT!r} ({', '.join(named)}); strip does not rewrite adapter "
            "configs. Save the adapter after revert_random_ltd(model), or edit adapter_config.json, then retry."
        )
