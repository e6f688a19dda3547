"""Read DeepSpeed's random-LTD settings (``data_efficiency.data_routing.random_ltd``) without torch.

DeepSpeed keeps random-LTD's settings in one JSON block::

    {"train_batch_size": 512,
     "data_efficiency": {"data_routing": {"random_ltd": {
         "enabled": true, "total_layer_num": 24, "random_ltd_layer_num": 22,
         "random_ltd_layer_id": [1, 2, ..., 22], "model_mask_name": "attention_mask",
         "model_type": "decoder", "hidden_state_order": "seq_batch_dim",
         "random_ltd_schedule": {"min_value": 128, "max_value": 2048, "schedule_type": "fixed_linear",
                                 "schedule_config": {"require_steps": 200000, "seq_per_step": 16}},
         "layer_token_lr_schedule": {"enabled": false}}}}}

:func:`read_deepspeed_config` accepts the whole config, any of the nested blocks, or the
path of a JSON file, checks every value, and returns a frozen :class:`RandomLTDConfig`.
The input dict is never modified. :func:`check_schedule_settings` holds the checks that
:class:`~random_ltd_cli.schedule.RandomLTDScheduler` shares, so that both report the same
messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Union

from .errors import ConfigError

__all__ = [
    "DECAY_TYPES",
    "SCHEDULE_TYPES",
    "WARMUP_TYPES",
    "LayerTokenLRConfig",
    "RandomLTDConfig",
    "check_schedule_settings",
    "read_deepspeed_config",
    "read_layer_token_lr_config",
]

#: Schedules of the kept length that are implemented (DeepSpeed implements only this one).
SCHEDULE_TYPES: tuple[str, ...] = ("fixed_linear",)
#: Warm-up shapes of the LayerToken learning-rate schedule (DeepSpeed's ``warmup_type`` names).
WARMUP_TYPES: tuple[str, ...] = ("linear", "log")
#: Decay shapes of the LayerToken learning-rate schedule after warm-up.
DECAY_TYPES: tuple[str, ...] = ("cosine", "linear", "constant")

_MODEL_TYPES = ("encoder", "decoder")
_HIDDEN_STATE_ORDERS = {"batch_seq_dim": True, "seq_batch_dim": False}
_BLOCK_PATH = "data_efficiency.data_routing.random_ltd"
_LR_KEYS = ("total_layer_tokens", "warmup_layer_tokens", "warmup_type")

ConfigSource = Union[Mapping[str, Any], str, "PathLike[str]"]


@dataclass(frozen=True)
class LayerTokenLRConfig:
    """The ``layer_token_lr_schedule`` block (only built when its ``enabled`` is true).

    DeepSpeed names: ``total_layer_tokens``, ``warmup_layer_tokens``, ``warmup_type``.
    Extensions of this project (DeepSpeed never implemented the schedule): ``decay``
    (``"cosine"``, ``"linear"`` or ``"constant"``, default ``"cosine"``) and ``min_lr_ratio``
    (final LR as a fraction of each group's initial LR, default ``0.0``).
    ``total_layer_tokens`` is ``None`` when the block leaves it out.
    """

    total_layer_tokens: int | None
    warmup_layer_tokens: int = 0
    warmup_type: str = "linear"
    decay: str = "cosine"
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class RandomLTDConfig:
    """DeepSpeed's random-LTD block, checked and typed.

    Attributes:
        enabled: ``random_ltd.enabled`` (``False`` when absent, as in DeepSpeed).
        total_layer_num: number of layers of the kind that is converted (e.g. 24 blocks).
        random_ltd_layer_num: how many of them drop tokens.
        random_ltd_layer_id: indices *among those layers* (0-based, sorted) that drop tokens, or
            ``None`` when the block does not list them. Unlike DeepSpeed these are not matched
            as substrings of module names.
        model_mask_name: name of the attention-mask argument, or ``None``.
        model_type: ``"encoder"``, ``"decoder"`` or ``None``.
        batch_first: ``True`` for ``hidden_state_order: batch_seq_dim``, ``False`` for
            ``seq_batch_dim``, ``None`` when absent (let the layer detect it).
        min_value, max_value, schedule_type, require_steps, seq_per_step: the kept-length schedule.
        global_batch_size: samples per optimizer step across all ranks (``train_batch_size``),
            or ``None`` when the source does not say.
        layer_token_lr: the ``layer_token_lr_schedule`` block when enabled, else ``None``.
        source: where the settings came from, for messages (``"file 'ds.json'"`` or ``"config dict"``).
    """

    enabled: bool
    total_layer_num: int
    random_ltd_layer_num: int
    random_ltd_layer_id: tuple[int, ...] | None
    model_mask_name: str | None
    model_type: str | None
    batch_first: bool | None
    min_value: int
    max_value: int
    schedule_type: str
    require_steps: int
    seq_per_step: int
    global_batch_size: int | None
    layer_token_lr: LayerTokenLRConfig | None
    source: str = "config dict"


# --------------------------------------------------------------------------- checks


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(name: str, value: object, minimum: int, hint: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}{name} must be an integer, got {value!r} ({type(value).__name__}): {hint}")
    if value < minimum:
        raise ConfigError(f"{where}{name} must be >= {minimum}, got {value}: {hint}")
    return value


def check_schedule_settings(
    *,
    min_value: object,
    max_value: object,
    require_steps: object,
    seq_per_step: object,
    total_layer_num: object,
    random_ltd_layer_num: object,
    global_batch_size: object,
    schedule_type: object,
    names: Mapping[str, str] | None = None,
    where: str = "",
    allow_missing_batch: bool = False,
) -> None:
    """Raise :class:`ConfigError` for the first setting that cannot work.

    Args:
        names: how to call each argument in messages (e.g. the JSON path of a key).
        where: a prefix naming the source, e.g. ``"file 'ds.json': "``.
        allow_missing_batch: accept ``global_batch_size=None`` (a config that does not say).

    Raises:
        ConfigError: naming the argument, its value and what to do.
    """
    n = dict(names or {})

    def name(key: str) -> str:
        return n.get(key, key)

    prefix = where
    lo = _int_at_least(
        name("min_value"),
        min_value,
        1,
        "set it to the number of tokens each random-LTD layer keeps at step 0 (e.g. 128)",
        prefix,
    )
    hi = _int_at_least(
        name("max_value"), max_value, 1, "set it to the full training sequence length (e.g. 2048)", prefix
    )
    if lo > hi:
        raise ConfigError(
            f"{prefix}{name('min_value')} ({lo}) is greater than {name('max_value')} ({hi}): the kept length grows "
            f"from {name('min_value')} up to {name('max_value')}; lower {name('min_value')} or set "
            f"{name('max_value')} to the training sequence length"
        )
    _int_at_least(
        name("require_steps"),
        require_steps,
        1,
        "set it to the number of optimizer steps over which the kept length grows from min_value to max_value",
        prefix,
    )
    _int_at_least(
        name("seq_per_step"),
        seq_per_step,
        1,
        "the kept length is rounded down to a multiple of it; use 8 or 16 (Tensor Core friendly), or 1 for no rounding",
        prefix,
    )
    total = _int_at_least(
        name("total_layer_num"),
        total_layer_num,
        1,
        "set it to the number of transformer layers of the converted kind (e.g. 24)",
        prefix,
    )
    n_ltd = _int_at_least(
        name("random_ltd_layer_num"),
        random_ltd_layer_num,
        0,
        "set it to the number of layers that drop tokens (usually total_layer_num - 2)",
        prefix,
    )
    if n_ltd > total:
        raise ConfigError(
            f"{prefix}{name('random_ltd_layer_num')} ({n_ltd}) is greater than {name('total_layer_num')} ({total}): "
            f"the layers that drop tokens are a subset of all layers; lower {name('random_ltd_layer_num')} "
            f"(usually {max(total - 2, 0)}) or fix {name('total_layer_num')}"
        )
    if not (global_batch_size is None and allow_missing_batch):
        _int_at_least(
            name("global_batch_size"),
            global_batch_size,
            1,
            "set it to the number of samples per optimizer step across all ranks (DeepSpeed's train_batch_size)",
            prefix,
        )
    if schedule_type not in SCHEDULE_TYPES:
        known = ", ".join(repr(s) for s in SCHEDULE_TYPES)
        raise ConfigError(
            f"{prefix}{name('schedule_type')} {schedule_type!r} is not supported; known schedule types: {known}"
        )


# --------------------------------------------------------------------------- loading


def _load(source: object) -> tuple[Mapping[str, Any], str]:
    """Return the parsed mapping and a description of where it came from."""
    if isinstance(source, Mapping):
        return source, ""
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        where = f"file '{path}': "
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{where}no such file: check the path of the DeepSpeed JSON config") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}cannot be read ({exc}): pass a readable UTF-8 JSON file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): fix the file; "
                "DeepSpeed configs are plain JSON (no comments, no trailing commas)"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}holds a JSON {type(data).__name__}, not an object: expected a DeepSpeed config")
        return data, where
    raise ConfigError(
        f"cannot read a DeepSpeed config from {type(source).__name__} {source!r}: "
        "pass a dict or the path of a JSON file"
    )


def _sub_dict(parent: Mapping[str, Any], key: str, path: str, where: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        raise ConfigError(
            f"{where}has no '{path}' block: random-LTD settings live in '{_BLOCK_PATH}' of a DeepSpeed config"
        )
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}'{path}' must be a JSON object, got {type(value).__name__} {value!r}")
    return value


def _find_block(data: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], str, Mapping[str, Any] | None]:
    """Return (random_ltd block, its dotted path, the whole config or None)."""
    if "data_efficiency" in data:
        de = _sub_dict(data, "data_efficiency", "data_efficiency", where)
        dr = _sub_dict(de, "data_routing", "data_efficiency.data_routing", where)
        return _sub_dict(dr, "random_ltd", _BLOCK_PATH, where), _BLOCK_PATH, data
    if "data_routing" in data:
        dr = _sub_dict(data, "data_routing", "data_routing", where)
        return _sub_dict(dr, "random_ltd", "data_routing.random_ltd", where), "data_routing.random_ltd", None
    if "random_ltd" in data:
        return _sub_dict(data, "random_ltd", "random_ltd", where), "random_ltd", None
    if any(k in data for k in ("random_ltd_schedule", "total_layer_num", "random_ltd_layer_num")):
        return data, "random_ltd", None
    seen = ", ".join(sorted(map(str, data))[:8]) or "none"
    raise ConfigError(
        f"{where}found no random-LTD settings (top-level keys: {seen}): expected a DeepSpeed config with "
        f"'{_BLOCK_PATH}', one of its sub-blocks, or the random_ltd block itself"
    )


def _choice(block: Mapping[str, Any], key: str, path: str, allowed: Sequence[str], where: str) -> str | None:
    value = block.get(key)
    if value is None:
        return None
    if value not in allowed:
        known = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{where}{path}.{key} is {value!r}; expected one of {known}")
    return str(value)


def _layer_ids(block: Mapping[str, Any], path: str, total: int, n_ltd: int, where: str) -> tuple[int, ...] | None:
    raw = block.get("random_ltd_layer_id")
    if raw is None:
        return None
    name = f"{path}.random_ltd_layer_id"
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not all(_is_int(i) for i in raw):
        raise ConfigError(f"{where}{name} must be a list of integers, got {raw!r}")
    ids = tuple(int(i) for i in raw)
    bad = [i for i in ids if not 0 <= i < total]
    if bad:
        raise ConfigError(
            f"{where}{name} has {bad}, outside 0..{total - 1}: ids are 0-based indices among the "
            f"{total} converted layers (total_layer_num)"
        )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}{name} lists a layer twice ({list(ids)}): give each index once")
    if len(ids) != n_ltd:
        raise ConfigError(f"{where}{name} lists {len(ids)} layers but random_ltd_layer_num is {n_ltd}: make them agree")
    return tuple(sorted(ids))


def _layer_token_lr(raw: object, lpath: str, where: str) -> LayerTokenLRConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}'{lpath}' must be a JSON object, got {type(raw).__name__} {raw!r}")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}{lpath}.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    total = raw.get("total_layer_tokens")
    if total is not None:
        total = _int_at_least(
            f"{lpath}.total_layer_tokens",
            total,
            1,
            "set it to the layer-tokens of the whole run (RandomLTDScheduler.layer_tokens_at(train_steps))",
            where,
        )
    warmup = _int_at_least(
        f"{lpath}.warmup_layer_tokens",
        raw.get("warmup_layer_tokens", 0),
        0,
        "set it to the layer-tokens consumed during warm-up (0 for none)",
        where,
    )
    if total is not None and warmup > total:
        raise ConfigError(
            f"{where}{lpath}.warmup_layer_tokens ({warmup}) is greater than total_layer_tokens ({total}): "
            "warm-up must end before the schedule does"
        )
    warmup_type = _choice(raw, "warmup_type", lpath, WARMUP_TYPES, where) or "linear"
    decay = _choice(raw, "decay", lpath, DECAY_TYPES, where) or "cosine"
    ratio = raw.get("min_lr_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"{where}{lpath}.min_lr_ratio must be a number in [0, 1], got {ratio!r}")
    return LayerTokenLRConfig(total, warmup, warmup_type, decay, float(ratio))


def _batch_size(
    top: Mapping[str, Any] | None, block: Mapping[str, Any], path: str, override: int | None, where: str
) -> int | None:
    if override is not None:
        return _int_at_least("global_batch_size", override, 1, "pass the samples per optimizer step", "")
    if top is not None and top.get("train_batch_size", "auto") != "auto":
        return _int_at_least(
            "train_batch_size",
            top["train_batch_size"],
            1,
            "set it to the samples per optimizer step across all ranks, or pass global_batch_size=",
            where,
        )
    if block.get("global_batch_size") is not None:  # DeepSpeed's engine writes it into the block
        return _int_at_least(f"{path}.global_batch_size", block["global_batch_size"], 1, "fix or remove it", where)
    return None


def read_deepspeed_config(source: ConfigSource, *, global_batch_size: int | None = None) -> RandomLTDConfig:
    """Read and check DeepSpeed's random-LTD block.

    Args:
        source: a whole DeepSpeed config dict, its ``data_efficiency``, ``data_routing`` or
            ``random_ltd`` block, or the path (``str``/``Path``) of a JSON file holding any of them.
        global_batch_size: overrides the batch size; otherwise the top-level
            ``train_batch_size`` (when not ``"auto"``) or a ``global_batch_size`` key in the block.

    Returns:
        A frozen :class:`RandomLTDConfig`. The input is not modified.

    Raises:
        ConfigError: unreadable file, invalid JSON, no random_ltd block, a missing key or a
            value of the wrong type or range; the message names the file and the key.
    """
    data, where = _load(source)
    block, path, top = _find_block(data, where)
    enabled = block.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}{path}.enabled must be true or false, got {enabled!r}")
    sched = _sub_dict(block, "random_ltd_schedule", f"{path}.random_ltd_schedule", where)
    sched_cfg = _sub_dict(sched, "schedule_config", f"{path}.random_ltd_schedule.schedule_config", where)
    spath, cpath = f"{path}.random_ltd_schedule", f"{path}.random_ltd_schedule.schedule_config"
    values = {
        "min_value": sched.get("min_value"),
        "max_value": sched.get("max_value"),
        "schedule_type": sched.get("schedule_type", "fixed_linear"),
        "require_steps": sched_cfg.get("require_steps"),
        "seq_per_step": sched_cfg.get("seq_per_step"),
        "total_layer_num": block.get("total_layer_num"),
        "random_ltd_layer_num": block.get("random_ltd_layer_num"),
    }
    names = {k: f"{spath}.{k}" for k in ("min_value", "max_value", "schedule_type")}
    names |= {k: f"{cpath}.{k}" for k in ("require_steps", "seq_per_step")}
    names |= {k: f"{path}.{k}" for k in ("total_layer_num", "random_ltd_layer_num")}
    for key, value in values.items():
        if value is None:
            raise ConfigError(f"{where}{names[key]} is missing: add it to the random_ltd block")
    batch = _batch_size(top, block, path, global_batch_size, where)
    check_schedule_settings(**values, global_batch_size=batch, names=names, where=where, allow_missing_batch=True)
    mask_name = block.get("model_mask_name")
    if mask_name is not None and not isinstance(mask_name, str):
        raise ConfigError(f"{where}{path}.model_mask_name must be a string, got {mask_name!r}")
    order = _choice(block, "hidden_state_order", path, tuple(_HIDDEN_STATE_ORDERS), where)
    return RandomLTDConfig(
        enabled=enabled,
        total_layer_num=values["total_layer_num"],
        random_ltd_layer_num=values["random_ltd_layer_num"],
        random_ltd_layer_id=_layer_ids(block, path, values["total_layer_num"], values["random_ltd_layer_num"], where),
        model_mask_name=mask_name,
        model_type=_choice(block, "model_type", path, _MODEL_TYPES, where),
        batch_first=None if order is None else _HIDDEN_STATE_ORDERS[order],
        min_value=values["min_value"],
        max_value=values["max_value"],
        schedule_type=values["schedule_type"],
        require_steps=values["require_steps"],
        seq_per_step=values["seq_per_step"],
        global_batch_size=batch,
        layer_token_lr=_layer_token_lr(block.get("layer_token_lr_schedule"), f"{path}.layer_token_lr_schedule", where),
        source=where.removesuffix(": ") or "config dict",
    )


def read_layer_token_lr_config(source: ConfigSource) -> LayerTokenLRConfig:
    """Read the ``layer_token_lr_schedule`` block (it must have ``"enabled": true``).

    Args:
        source: anything :func:`read_deepspeed_config` accepts, or the
            ``layer_token_lr_schedule`` block itself (a dict).

    Raises:
        ConfigError: the block is missing, not enabled, or has a bad value.
    """
    data, where = _load(source)
    if "random_ltd_schedule" not in data and any(k in data for k in _LR_KEYS):
        lpath = "layer_token_lr_schedule"
        parsed = _layer_token_lr(data, lpath, where)
    else:
        block, path, _ = _find_block(data, where)
        lpath = f"{path}.layer_token_lr_schedule"
        parsed = _layer_token_lr(block.get("layer_token_lr_schedule"), lpath, where)
    if parsed is None:
        raise ConfigError(
            f'{where}{lpath}.enabled is not true (or the block is missing): set "enabled": true in it, '
            "or build LayerTokenLRScheduler(...) directly"
        )
    return parsed
