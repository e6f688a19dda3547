"""The library call behind ``random-ltd check TARGET``: is every wrapped layer of a model exact?

``check_target`` builds the model a target names (real tensors, the model's own random
initialisation unless ``weights`` are given), converts it as ``random-ltd convert`` would, feeds
synthetic batches (:mod:`.synthetic`) and runs the verifier (:func:`random_ltd_cli.verify.verify_random_ltd`)
once per batch and reserved length ``r``. Each wrapped layer gets one row: ``exact`` (max error),
``wrong`` (max error, likely cause), ``unverifiable`` (why), ``error`` (the reference call failed),
``not called``, or ``refused`` when conversion refuses the model. Nothing is written anywhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConversionError, RandomLTDError
from .synthetic import Batch, InputPlan, make_batches, plan_inputs

__all__ = ["CheckReport", "LayerCheck", "check_target", "default_reserved_lengths"]

# Worst first: the status a layer gets is the worst over its runs ("not called" only if never called).
_SEVERITY = {"error": 0, "wrong": 1, "unverifiable": 2, "not called": 3, "exact": 4}


@dataclass
class LayerCheck:
    """One wrapped (or refused) layer: the worst verdict over every batch and ``r``."""

    name: str
    layer_class: str
    status: str  # exact | wrong | unverifiable | error | not called | refused
    max_error: float | None = None
    tolerance: float | None = None
    cause: str = ""
    method: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)  # one per (batch, r) that called the layer


@dataclass
class CheckReport:
    target: str
    model_class: str
    layer_class: str
    settings: dict[str, Any]
    layers: list[LayerCheck]
    refused: str | None = None  # the conversion's message when it refused the model
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.layers) and self.refused is None and all(r.status == "exact" for r in self.layers)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.layers:
            out[row.status] = out.get(row.status, 0) + 1
        return out

    def summary(self) -> str:
        """One sentence: how many layers are not exact, by status, with their first names."""
        if self.refused is not None:
            return f"conversion refused {self.model_class}: {self.refused}"
        bad = [r for r in self.layers if r.status != "exact"]
        if not bad:
            return f"all {len(self.layers)} wrapped layers of {self.model_class} are exact."
        hint = {"wrong": "each row names the likely cause", "unverifiable": "each row says why",
                "error": "each row says what failed",
                "not called": "the forward never reached them: check the input"}
        parts = []
        for status in sorted({r.status for r in bad}, key=_SEVERITY.__getitem__):
            names = [r.name for r in bad if r.status == status]
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{len(names)} {status} ({shown})")
        worst = min((r.status for r in bad), key=_SEVERITY.__getitem__)
        return (f"{len(bad)} of {len(self.layers)} wrapped layers of {self.model_class} are not exact: "
                f"{'; '.join(parts)}; {hint[worst]}. What to do: docs/verification.md.")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (a non-finite error, e.g. NaN outputs, is the string ``"nan"`` or ``"inf"``)."""
        data = _finite(asdict(self))
        data["ok"] = self.ok
        data["counts"] = self.counts()
        return data


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def default_reserved_lengths(seq_len: int) -> list[int]:
    """``S/4``, ``S/2`` and ``S-1`` (those that are at least 1 and below ``S``)."""
    return sorted({r for r in (seq_len // 4, seq_len // 2, seq_len - 1) if 1 <= r < seq_len})


def check_target(
    target: str,
    *,
    init: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    layer_type: str | None = None,
    layers: str = "middle",
    ds_config: str | None = None,
    seq_args: dict[str, str] | None = None,
    stack: str | None = None,
    shape: tuple[int, ...] | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    reserved_lengths: list[int] | None = None,
    seed: int = 0,
) -> CheckReport:
    """Build, convert and verify the model ``target`` names (see the module docstring).

    Raises:
        TargetImportError, ConfigError: the target or a flag is unusable; the model's forward
            fails on the synthetic batch (the message says which batch and what to pass instead).
        ConversionError: the model has no layer stack to convert.
    """
    import torch

    from .workflow import _build, _layer_type, load_weights_strict

    torch.manual_seed(seed)
    with _no_progress_bars(Path(target).is_dir()):
        try:
            model = _build(target, init)
        except RandomLTDError:
            raise
        except Exception as exc:  # the user's constructor or factory raised
            raise ConfigError(f"building the model {target!r} failed: {type(exc).__name__}: {_first_line(exc)}; "
                              "check --init and the model code.") from exc
    if weights is not None:
        from .checkpoint import load_state_dict

        load_weights_strict(model, load_state_dict(weights, trust_pickle=trust_pickle), str(weights))
    cls = _layer_type(layer_type)
    cfg = None
    if ds_config:
        from .deepspeed_config import read_deepspeed_config

        cfg = read_deepspeed_config(ds_config)
    try:
        plan = plan_inputs(model, shape=shape, vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size)
    except ConfigError:
        _convert(model, cls, layers, cfg, seq_args, stack)  # a refusal says more than "which input?" (ConvNeXt)
        raise
    report = CheckReport(target, type(model).__name__, "", _settings(plan, layers, layer_type, stack, seq_args), [],
                         notes=list(plan.notes))
    try:
        _convert(model, cls, layers, cfg, seq_args, stack)
    except ConversionError as exc:
        report.refused = str(exc)
        report.layers = _refused_rows(model, cls, layers, stack, str(exc))
        if not report.layers:
            raise
        report.layer_class = ", ".join(sorted({r.layer_class for r in report.layers}))
        return report
    batches = make_batches(plan, seed)
    lengths = _probe(model, batches)
    report.layers = _verify_all(model, batches, lengths, reserved_lengths, report.settings)
    report.layer_class = ", ".join(sorted({r.layer_class for r in report.layers}))
    return report


@contextlib.contextmanager
def _no_progress_bars(folder: bool) -> Iterator[None]:
    """No "Loading weights" bar from transformers on stderr while a folder loads (stderr is for the Error line)."""
    if not folder:  # an import path builds with Cls(config): no bar (and no transformers import for plain models)
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _settings(
    plan: InputPlan, layers: str, layer_type: str | None, stack: str | None, seq_args: dict[str, str] | None
) -> dict[str, Any]:
    return {**plan.settings(), "layers": layers, "layer_type": layer_type, "stack": stack,
            "seq_args": seq_args or {}}


def _convert(model: Any, cls: Any, layers: str, cfg: Any, seq_args: dict[str, str] | None, stack: str | None) -> None:
    from .convert import convert_to_random_ltd

    # verify="off": the check runs the verifier itself, on every batch and r, and reads its verdicts
    options: dict[str, Any] = {"layers": layers, "ds_config": cfg, "seq_args": seq_args, "stack": stack,
                               "verify": "off"}
    if cfg is None:
        options["reserved_length"] = 1  # replaced by each verification's own r
    convert_to_random_ltd(model, cls, **options)


def _refused_rows(model: Any, cls: Any, layers: str, stack: str | None, message: str) -> list[LayerCheck]:
    """One ``refused`` row per layer the conversion would have wrapped, with its own reason when it has one."""
    from .adapters import refusal
    from .convert import _candidate_groups, _select, unwrap_parallel

    try:
        groups, _ = _candidate_groups(unwrap_parallel(model), cls, None, stack)
    except RandomLTDError:
        return []
    candidates = [c for g in groups for c in g]
    try:
        chosen = _select(groups, layers)
    except RandomLTDError:
        chosen = list(range(len(candidates)))
    rows = []
    for i in chosen:
        name, layer = candidates[i]
        rows.append(LayerCheck(name, type(layer).__name__, "refused", cause=refusal(layer) or message))
    return rows


def _probe(model: Any, batches: list[Batch]) -> dict[str, int]:
    """Run the model once per batch without dropping; the sequence length each wrapped layer sees."""
    import torch

    from .convert import random_ltd_layers
    from .layer import _Arguments

    lengths: dict[str, int] = {}
    handles = []
    for name, wrapper in random_ltd_layers(model):
        def record(module: Any, args: Any, kwargs: Any, _name: str = name) -> None:
            hidden = _Arguments(module._positional_names, args, kwargs).get(module._hidden_name)
            if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
                lengths.setdefault(_name, int(hidden.shape[1 if module.batch_first else 0]))

        handles.append(wrapper.register_forward_pre_hook(record, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return lengths


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _run(model: Any, batch: Batch) -> Any:
    try:
        return model(*batch.args, **batch.kwargs)
    except RandomLTDError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{type(model).__name__}'s forward failed on the synthetic batch ({batch.description}): "
            f"{type(exc).__name__}: {_first_line(exc)}. Pass --shape, --vocab-size or --seq-len to feed it "
            "something it takes."
        ) from exc


def _verify_all(
    model: Any, batches: list[Batch], lengths: dict[str, int], reserved: list[int] | None, settings: dict[str, Any]
) -> list[LayerCheck]:
    from .convert import random_ltd_layers
    from .verify import verify_random_ltd

    wrapped = random_ltd_layers(model)
    s = min(lengths.values()) if lengths else None
    rs = _reserved(reserved, s)
    settings.update(reserved_lengths=rs, tokens_at_wrapped_layers=s, batches=[b.description for b in batches])
    found: dict[str, list[tuple[str, int, Any]]] = {name: [] for name, _ in wrapped}
    for batch in batches:
        for r in rs:
            try:
                verdicts = verify_random_ltd(model, *batch.args, reserved_length=r, **batch.kwargs)
            except RandomLTDError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"{type(model).__name__}'s forward failed while dropping to r={r} tokens on the {batch.name} "
                    f"batch ({batch.description}): {type(exc).__name__}: {_first_line(exc)}"
                ) from exc
            for verdict in verdicts:
                if verdict.name in found and verdict.status != "not called":
                    found[verdict.name].append((batch.name, r, verdict))
    return [_row(name, type(w.random_ltd_layer).__name__, found[name]) for name, w in wrapped]


def _reserved(reserved: list[int] | None, s: int | None) -> list[int]:
    if not reserved:
        return default_reserved_lengths(s) if s else []
    bad = [r for r in reserved if r < 1 or (s is not None and r >= s)]
    if bad:
        raise ConfigError(f"--r {bad[0]} is not between 1 and {s - 1 if s else 'S-1'}: the wrapped layers see "
                          f"{s if s else 'S'} tokens and drop only with r below that; pass smaller values.")
    return sorted(set(reserved))


def _row(name: str, layer_class: str, runs: list[tuple[str, int, Any]]) -> LayerCheck:
    """One layer's verdicts over every batch and r: the worst status, the largest error, the cause where it was."""
    row = LayerCheck(name, layer_class, "not called")
    row.runs = [{"batch": b, "r": r, "status": v.status, "max_error": v.max_error, "calls": v.calls}
                for b, r, v in runs]
    if not runs:
        return row
    worst = min(_SEVERITY.get(v.status, 0) for _, _, v in runs)
    b, r, v = max((x for x in runs if _SEVERITY.get(x[2].status, 0) == worst), key=lambda x: _num(x[2].max_error))
    row.status, row.method, row.cause = v.status, v.method, v.cause
    if v.status in ("wrong", "error") and v.cause:
        row.cause = f"{v.cause} (r={r}, {b} batch)"
    errors = [x[2] for x in runs if x[2].max_error is not None]
    if errors:
        top = max(errors, key=lambda x: _num(x.max_error))
        row.max_error, row.tolerance = float(top.max_error), top.tolerance
    return row


def _num(x: float | None) -> float:
    """Sort key for errors: NaN above everything, None below."""
    if x is None:
        return -1.0
    return math.inf if math.isnan(x) else float(x)
