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
from .errors import CheckpointError, ConfigError, TargetImportError
from .outputs import check_output, output_format, same_file, untied, write_folder

__all__ = ["ConvertResult", "ModelReport", "ScheduleOptions", "convert_target", "describe_target",
           "load_weights_strict"]

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
    parts: list[str] = field(default_factory=list)  # proxied parts of layers kept as parallel lists (XLM)

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


def _build_shapes_only(target: str, init: dict[str, Any] | None) -> Any:
    """The model on the meta device (shapes, no memory, no init time) when it builds there; else on CPU."""
    import torch

    if not Path(target).is_dir():
        try:
            with torch.device("meta"):
                return _build(target, init)
        except (TargetImportError, ConfigError):
            raise
        except Exception:  # a model that cannot be built without data: build it for real
            pass
    return _build(target, init)


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
        parts=proxied_parts(root),
    )


def proxied_parts(root: Any) -> list[str]:
    """The qualified names of the parts that run on their layer's kept tokens (see :mod:`random_ltd_cli.parts`)."""
    from .parts import LayerPart

    return [n for n, m in root.named_modules() if isinstance(m, LayerPart)]


def parts_text(report: ModelReport) -> str:
    """One line on the proxied parts of a report, or ``""``."""
    if not report.parts:
        return ""
    return (f"Layers kept as parallel lists of parts: each wrapped attention drops tokens for its whole layer, and "
            f"the other parts of those layers run on their attention's kept tokens ({len(report.parts)}): "
            f"{', '.join(report.parts)}.")


@dataclass
class ScheduleOptions:
    """The schedule flags shared by ``inspect`` and ``convert`` (``None``: the default)."""

    steps: int | None = None
    seq_len: int | None = None
    min_value: int | None = None
    require_steps: int | None = None
    seq_per_step: int | None = None
    batch_size: int | None = None

    def given(self) -> list[str]:
        names = ("seq_len", "min_value", "require_steps", "seq_per_step")
        return ["--" + n.replace("_", "-") for n in names if getattr(self, n) is not None]


def _read_ds(ds_config: str | None, opts: ScheduleOptions) -> Any:
    """The parsed DeepSpeed random_ltd block, or None; refuses schedule flags beside it."""
    if not ds_config:
        return None
    if opts.given():
        raise ConfigError(
            f"{', '.join(opts.given())} and --ds-config both set the schedule; the config's random_ltd block "
            "already has one. Drop one of them."
        )
    from .deepspeed_config import read_deepspeed_config

    return read_deepspeed_config(ds_config)


def _schedule(model: Any, report: ModelReport, cfg: Any, opts: ScheduleOptions) -> tuple[Any, str]:
    """The scheduler (None when S is unknown) and where its batch size came from."""
    from .schedule import RandomLTDScheduler

    if cfg is not None:
        batch, source = _batch(opts.batch_size, cfg.global_batch_size, "the DeepSpeed config's train_batch_size")
        return RandomLTDScheduler.from_config(cfg, global_batch_size=batch), source
    s = opts.seq_len or _max_length(model)
    if s is None:
        return None, ""
    lo = opts.min_value if opts.min_value is not None else max(1, s // 4)
    batch, source = _batch(opts.batch_size, None, "")
    sched = RandomLTDScheduler(lo, s, opts.require_steps or opts.steps or DEFAULT_STEPS,
                               opts.seq_per_step or min(16, lo), total_layer_num=len(report.layers),
                               random_ltd_layer_num=len(report.wrapped_layers), global_batch_size=batch)
    return sched, source


def _batch(flag: int | None, config: int | None, config_source: str) -> tuple[int, str]:
    if flag is not None:
        return flag, "--batch-size"
    if config:
        return config, config_source
    return 1, "assumed; pass --batch-size B for your global batch"


DEFAULT_STEPS = 10_000
"""Steps of the estimate and of the schedule when neither flags nor a DeepSpeed config say."""


def describe_target(
    target: str,
    *,
    init: dict[str, Any] | None = None,
    layer_type: str | None = None,
    layers: str = "middle",
    ds_config: str | None = None,
    steps: int | None = None,
    seq_len: int | None = None,
    min_value: int | None = None,
    require_steps: int | None = None,
    seq_per_step: int | None = None,
    batch_size: int | None = None,
    seq_args: dict[str, str] | None = None,
    stack: str | None = None,
) -> ModelReport:
    """The layer stack of the model ``target`` names, what would be wrapped, and a schedule's saving.

    The schedule is the DeepSpeed config's when given; otherwise ``min_value`` (default ``S/4``)
    to ``seq_len`` (default: the model config's maximum length) over ``require_steps`` (default
    ``steps``, else 10000). The estimate covers ``steps`` (default: the schedule's
    ``require_steps``) at ``batch_size`` sequences per step (default: the config's
    ``train_batch_size``, else 1; the saving does not depend on it). ``estimate`` is ``None``
    when the sequence length is unknown.

    Raises:
        ConfigError: schedule flags together with ``ds_config``, or an unusable setting.
    """
    opts = ScheduleOptions(steps, seq_len, min_value, require_steps, seq_per_step, batch_size)
    cfg = _read_ds(ds_config, opts)
    model = _build_shapes_only(target, init)
    report = _convert(model, target, layer_type, layers, cfg, None, seq_args, stack)  # built for this report only
    sched, source = _schedule(model, report, cfg, opts)
    if sched is None:
        return report
    horizon = steps or sched.require_steps
    report.estimate = {
        "steps": horizon,
        "batch_size": sched.global_batch_size,
        "batch_source": source,
        "schedule": sched.settings(),
        "layer_tokens": sched.layer_tokens_at(horizon),
        "baseline_layer_tokens": sched.baseline_layer_tokens(horizon),
        "saving": sched.estimated_saving(horizon),
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
    force: bool = False,
    schedule: ScheduleOptions | None = None,
    seq_args: dict[str, str] | None = None,
    stack: str | None = None,
) -> ConvertResult:
    """Build ``target``, load ``weights`` strictly, convert, and (unless ``dry_run``) save to ``output``.

    A Hugging Face folder in gives a folder out: ``config.json`` and the other non-weight files
    copied, the weights in ``model.safetensors`` as ``save_pretrained`` would write them (tied
    weights once). An import path gives one file: ``.safetensors``, or a torch file for
    ``.pt``/``.pth``/``.bin``/``.ckpt``. Either way the settings (wrapped layers, schedule, tied
    names) go into the metadata under ``"random_ltd"`` (a JSON string); the output is written
    atomically and an existing one is refused unless ``force``.

    Raises:
        TargetImportError, ConfigError, ConversionError, CheckpointError: nothing is written.
    """
    opts = schedule or ScheduleOptions()
    folder_in = Path(target).is_dir()
    if output is not None and weights is not None and same_file(Path(output), Path(weights)):
        raise CheckpointError(f"-o {str(output)!r} is the --weights file; write the converted state elsewhere.")
    out_path = check_output(Path(output), folder_in, force) if output is not None else None
    cfg = _read_ds(ds_config, opts)
    model = _build(target, init)
    if weights is not None:
        from .checkpoint import load_state_dict

        load_weights_strict(model, load_state_dict(weights, trust_pickle=trust_pickle), str(weights))
    report = _convert(model, target, layer_type, layers, cfg, None, seq_args, stack)
    sched, _ = _schedule(model, report, cfg, opts)
    state, tied = untied(model.state_dict())
    settings = {
        "random_ltd_version": __version__,
        "target": target,
        "model_class": report.model_class,
        "layer_class": report.layer_class,
        "wrapped_layers": report.wrapped_layers,
        "total_layer_num": len(report.layers),
        "schedule": sched.settings() if sched is not None else None,
        "tied_weights": tied,
        "seq_args": seq_args or {},
        "stack": stack,
    }
    result = ConvertResult(**{**asdict(report), "layers": report.layers}, dry_run=dry_run,
                           weights=str(weights) if weights is not None else None, settings=settings)
    if out_path is not None and not dry_run:
        metadata = {"format": "pt", METADATA_KEY: json.dumps(settings)}
        if folder_in:
            write_folder(Path(target), out_path, state, metadata)
            result.output_format = "hf-dir"
        else:
            from .checkpoint import save_state_dict

            save_state_dict(state, out_path, metadata=metadata)
            result.output_format = output_format(out_path)
        result.output = str(out_path)
    return result
