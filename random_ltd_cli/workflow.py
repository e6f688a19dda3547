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


def _convert(
    model: Any, target: str, layer_type: str | None, layers: str, cfg: Any, scheduler: Any,
    seq_args: dict[str, str] | None = None, stack: str | None = None,
) -> ModelReport:
    """Convert ``model`` in place with the library's own selection and report its layer stack."""
    from .convert import _candidate_groups, convert_to_random_ltd, random_ltd_layers, unwrap_parallel

    root = unwrap_parallel(model)
    cls = _layer_type(layer_type)
    groups, shared = _candidate_groups(root, cls, None, stack)
    candidates = [c for g in groups for c in g]  # names before wrapping
    parameter_count = sum(p.numel() for p in root.parameters())
    convert_to_random_ltd(model, cls, layers=layers, ds_config=cfg, scheduler=scheduler, seq_args=seq_args,
                          stack=stack)
    wrappers = dict(random_ltd_layers(model))

    def is_wrapped(label: str) -> bool:  # a shared layer (ALBERT) drops in some of its calls only
        call = shared.get(label)
        if call is None:
            return label in wrappers
        w = wrappers.get(call.name)
        return w is not None and call.call in (w.calls or ())

    rows = [LayerRow(i, n, type(m).__name__, is_wrapped(n)) for i, (n, m) in enumerate(candidates)]
    return ModelReport(
        format="model",
        target=target,
        model_class=type(root).__name__,
        parameter_count=parameter_count,
        layer_class=", ".join(sorted({r.cls for r in rows})),
        layers=rows,
        wrapped_layers=[r.name for r in rows if r.wrapped],
    )


def _deepspeed(ds_config: str | None, batch_size: int) -> tuple[Any, Any]:
    """The parsed DeepSpeed block and its scheduler (batch size ``batch_size`` when the file has none)."""
    if not ds_config:
        return None, None
    from .deepspeed_config import read_deepspeed_config
    from .schedule import RandomLTDScheduler

    cfg = read_deepspeed_config(ds_config)
    return cfg, RandomLTDScheduler.from_config(cfg, global_batch_size=cfg.global_batch_size or batch_size)


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
    seq_args: dict[str, str] | None = None,
    stack: str | None = None,
) -> ModelReport:
    """The layer stack of the model ``target`` names, what would be wrapped, and a schedule's saving.

    The schedule is the DeepSpeed config's when given; otherwise ``min_value`` (default ``S/4``)
    to ``seq_len`` (default: the model config's maximum length) over ``require_steps`` (default
    ``steps``). ``estimate`` is ``None`` when the sequence length is unknown.
    """
    from .schedule import RandomLTDScheduler

    model = _build(target, init)
    cfg, sched = _deepspeed(ds_config, batch_size)
    report = _convert(model, target, layer_type, layers, cfg, sched, seq_args, stack)  # built for this report only
    if sched is None:
        s = seq_len or _max_length(model)
        if s is None:
            return report
        lo = min_value if min_value is not None else max(1, s // 4)
        sched = RandomLTDScheduler(lo, s, require_steps or steps, min(seq_per_step, lo),
                                   total_layer_num=len(report.layers),
                                   random_ltd_layer_num=len(report.wrapped_layers), global_batch_size=batch_size)
    report.estimate = {
        "steps": steps,
        "schedule": sched.settings(),
        "layer_tokens": sched.layer_tokens_at(steps),
        "baseline_layer_tokens": sched.baseline_layer_tokens(steps),
        "saving": sched.estimated_saving(steps),
    }
    return report


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
    seq_args: dict[str, str] | None = None,
    stack: str | None = None,
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
    cfg, sched = _deepspeed(ds_config, 1)  # the batch size only affects layer-token accounting
    report = _convert(model, target, layer_type, layers, cfg, sched, seq_args, stack)
    settings = {
        "random_ltd_version": __version__,
        "target": target,
        "model_class": report.model_class,
        "layer_class": report.layer_class,
        "wrapped_layers": report.wrapped_layers,
        "total_layer_num": len(report.layers),
        "schedule": sched.settings() if sched is not None else None,
    }
    result = ConvertResult(**{**asdict(report), "layers": report.layers}, dry_run=dry_run,
                           weights=str(weights) if weights is not None else None, settings=settings)
    if out_path is not None and not dry_run:
        from .checkpoint import save_state_dict

        save_state_dict(dict(model.state_dict()), out_path, metadata={METADATA_KEY: json.dumps(settings)})
        result.output, result.output_format = str(out_path), out_format
    return result


def _output_format(path: Path) -> str:
    from .checkpoint import TORCH_SUFFIXES

    if path.suffix.lower() in TORCH_SUFFIXES:
        return "torch"
    if path.suffix.lower() in (".safetensors", ""):
        return "safetensors"
    raise ConfigError(f"-o {str(path)!r}: unknown file type {path.suffix!r}; use .safetensors (default) or .pt.")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
