"""The library calls behind ``random-ltd convert`` and ``random-ltd inspect TARGET`` for models.

``convert_target`` builds a model from a target, optionally loads plain weights strictly,
converts it and writes the converted state dict with the random-LTD settings recorded in
the file's metadata. ``describe_target`` lists a model's layer stack, what would be wrapped,
and the estimated saving of a schedule. Both validate everything before writing anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CheckpointError, ConfigError

__all__ = ["ConvertResult", "ModelReport", "convert_target", "describe_target", "load_weights_strict"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
METADATA_KEY = "random_ltd"


@dataclass
class LayerRow:
    index: int
    name: str
    cls: str
    wrapped: bool


@dataclass
class ModelReport:
    """What a model's layer stack looks like and what conversion would wrap."""

    format: str
    target: str
    model_class: str
    parameter_count: int
    layer_class: str
    layers: list[LayerRow]
    wrapped_layers: list[str]
    estimate: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConvertResult(ModelReport):
    output: str | None = None
    output_format: str | None = None
    dry_run: bool = False
    weights: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _layer_type(spec: str | None) -> Any:
    if spec is None:
        return None
    from torch import nn

    from .target import load_attribute

    cls = load_attribute(spec)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"--layer-type {spec!r} is a {type(cls).__name__}, not an nn.Module class.")
    return cls


def _build(target: str, init: dict[str, Any] | None) -> Any:
    from .target import resolve_model

    return resolve_model(target, init)


def load_weights_strict(model: Any, state: dict[str, Any], source: str) -> None:
    """Load ``state`` into ``model`` strictly, with a short error naming the first mismatches.

    A tied weight (a tensor the model registers under two names, such as a language-model head
    tied to the embedding) may be present under either name: files saved by
    ``save_pretrained`` keep only one of them.
    """
    expected = model.state_dict()
    aliases: dict[int, list[str]] = {}
    for key, value in expected.items():
        if hasattr(value, "data_ptr") and value.numel():
            aliases.setdefault(value.data_ptr(), []).append(key)
    tied = {k: names for names in aliases.values() if len(names) > 1 for k in names}
    missing = [k for k in expected if k not in state and not any(n in state for n in tied.get(k, []))]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (first: {shapes[0]})")
        hint = (
            " The file holds converted keys: strip it first (random-ltd strip)."
            if any(".random_ltd_layer." in k for k in unexpected)
            else " Check that --weights belongs to this model and --init."
        )
        raise CheckpointError(f"weights {source!r} do not match the model: {'; '.join(parts)}.{hint}")
    # Every name is accounted for; names absent from the file are tied to one that is present.
    model.load_state_dict(state, strict=False)


def _plan(
    model: Any, target: str, layer_type: str | None, layers: str, ds_config: str | None
) -> tuple[ModelReport, dict[str, Any]]:
    """Convert a deep copy of nothing: compute what would be wrapped without touching ``model``."""
    from .convert import match_layers, select_layers, unwrap_parallel
    from .deepspeed_config import read_deepspeed_config

    root = unwrap_parallel(model)
    cls = _layer_type(layer_type)
    candidates = match_layers(root, cls, None)
    spec: Any = layers
    cfg = read_deepspeed_config(ds_config) if ds_config else None
    if cfg is not None and layers == "middle" and cfg.random_ltd_layer_id is not None:
        spec = list(cfg.random_ltd_layer_id)
    chosen = set(select_layers(candidates, spec))
    rows = [LayerRow(i, n, type(m).__name__, i in chosen) for i, (n, m) in enumerate(candidates)]
    report = ModelReport(
        format="model",
        target=target,
        model_class=type(root).__name__,
        parameter_count=sum(p.numel() for p in root.parameters()),
        layer_class=", ".join(sorted({r.cls for r in rows})),
        layers=rows,
        wrapped_layers=[r.name for r in rows if r.wrapped],
    )
    return report, {"layer_type": cls, "layers": spec, "ds_config": cfg}


def describe_target(
    target: str,
    *,
    init: dict[str, Any] | None = None,
    layer_type: str | None = None,
    layers: str = "middle",
    ds_config: str | None = None,
    steps: int = 10_000,
    seq_len: int | None = None,
    min_value: int | None = None,
    require_steps: int | None = None,
    seq_per_step: int = 16,
    batch_size: int = 1,
) -> ModelReport:
    """The layer stack of the model ``target`` names, what would be wrapped, and a schedule's saving.

    The schedule is the DeepSpeed config's when given; otherwise ``min_value`` (default ``S/4``)
    to ``seq_len`` (default: the model config's maximum length) over ``require_steps`` (default
    ``steps``). ``estimate`` is ``None`` when the sequence length is unknown.
    """
    model = _build(target, init)
    report, plan = _plan(model, target, layer_type, layers, ds_config)
    report.estimate = _estimate(model, report, plan, steps, seq_len, min_value, require_steps, seq_per_step,
                                batch_size)
    return report


def _estimate(
    model: Any, report: ModelReport, plan: dict[str, Any], steps: int, seq_len: int | None,
    min_value: int | None, require_steps: int | None, seq_per_step: int, batch_size: int,
) -> dict[str, Any] | None:
    from .schedule import RandomLTDScheduler

    cfg = plan["ds_config"]
    n_total, n_ltd = len(report.layers), len(report.wrapped_layers)
    if cfg is not None:
        sched = RandomLTDScheduler(cfg.min_value, cfg.max_value, cfg.require_steps, cfg.seq_per_step,
                                   total_layer_num=cfg.total_layer_num, random_ltd_layer_num=cfg.random_ltd_layer_num,
                                   global_batch_size=cfg.global_batch_size or batch_size)
    else:
        s = seq_len or _max_length(model)
        if s is None:
            return None
        lo = min_value if min_value is not None else max(1, s // 4)
        sched = RandomLTDScheduler(lo, s, require_steps or steps, min(seq_per_step, lo), total_layer_num=n_total,
                                   random_ltd_layer_num=n_ltd, global_batch_size=batch_size)
    return {
        "steps": steps,
        "schedule": {"min_value": sched.min_value, "max_value": sched.max_value,
                     "require_steps": sched.require_steps, "seq_per_step": sched.seq_per_step,
                     "total_layer_num": sched.total_layer_num, "random_ltd_layer_num": sched.random_ltd_layer_num,
                     "global_batch_size": sched.global_batch_size},
        "layer_tokens": sched.layer_tokens_at(steps),
        "baseline_layer_tokens": sched.baseline_layer_tokens(steps),
        "saving": sched.estimated_saving(steps),
    }


def _max_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "block_size", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def convert_target(
    target: str,
    *,
    output: str | Path | None = None,
    init: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    layer_type: str | None = None,
    layers: str = "middle",
    ds_config: str | None = None,
    dry_run: bool = False,
    trust_pickle: bool = False,
) -> ConvertResult:
    """Build ``target``, load ``weights`` strictly, convert, and (unless ``dry_run``) save to ``output``.

    The output is ``.safetensors`` unless its suffix is ``.pt``/``.pth``/``.bin``/``.ckpt``; the
    settings go into its metadata under ``"random_ltd"`` (a JSON string). Written atomically.

    Raises:
        TargetImportError, ConfigError, ConversionError, CheckpointError: nothing is written.
    """
    out_path = Path(output) if output is not None else None
    if out_path is not None and out_path.suffix == "":
        out_path = out_path.with_suffix(".safetensors")
    out_format = _output_format(out_path) if out_path is not None else None
    if out_path is not None and weights is not None and _same_file(out_path, Path(weights)):
        raise CheckpointError(f"-o {str(out_path)!r} is the --weights file; write the converted state elsewhere.")
    model = _build(target, init)
    if weights is not None:
        from .checkpoint import load_state_dict

        load_weights_strict(model, load_state_dict(weights, trust_pickle=trust_pickle), str(weights))
    report, plan = _plan(model, target, layer_type, layers, ds_config)
    from .convert import convert_to_random_ltd, random_ltd_layers

    scheduler = None
    cfg = plan["ds_config"]
    if cfg is not None and cfg.global_batch_size is None:
        from .schedule import RandomLTDScheduler

        scheduler = RandomLTDScheduler.from_config(cfg, global_batch_size=1)  # the batch only affects accounting
    convert_to_random_ltd(model, plan["layer_type"], layers=plan["layers"], ds_config=cfg, scheduler=scheduler)
    wrapped = [n for n, _ in random_ltd_layers(model)]
    settings = _settings(report, wrapped, cfg, target)
    result = ConvertResult(**{**asdict(report), "layers": report.layers}, dry_run=dry_run,
                           weights=str(weights) if weights is not None else None, settings=settings)
    result.wrapped_layers = wrapped
    if out_path is not None and not dry_run:
        from .checkpoint import save_state_dict

        save_state_dict(dict(model.state_dict()), out_path, metadata={METADATA_KEY: json.dumps(settings)})
        result.output, result.output_format = str(out_path), out_format
    return result


def _settings(report: ModelReport, wrapped: list[str], cfg: Any, target: str) -> dict[str, Any]:
    schedule = None
    if cfg is not None:
        schedule = {"min_value": cfg.min_value, "max_value": cfg.max_value, "schedule_type": cfg.schedule_type,
                    "require_steps": cfg.require_steps, "seq_per_step": cfg.seq_per_step,
                    "total_layer_num": cfg.total_layer_num, "random_ltd_layer_num": cfg.random_ltd_layer_num}
    return {
        "random_ltd_version": __version__,
        "target": target,
        "model_class": report.model_class,
        "layer_class": report.layer_class,
        "wrapped_layers": wrapped,
        "total_layer_num": len(report.layers),
        "schedule": schedule,
    }


def _output_format(path: Path) -> str:
    if path.suffix in TORCH_SUFFIXES:
        return "torch"
    if path.suffix in (".safetensors", ""):
        return "safetensors"
    raise ConfigError(f"-o {str(path)!r}: unknown file type {path.suffix!r}; use .safetensors (default) or .pt.")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
