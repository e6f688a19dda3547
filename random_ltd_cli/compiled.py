"""``torch.compile`` support: the reserved length ``r`` enters compiled graphs as a dynamic size.

Dynamo treats an ``int`` read from an attribute reachable from a module (the scheduler's ``r``)
as a constant: every distinct ``r`` would be a new graph, and after ``recompile_limit`` (8)
graphs dynamo silently runs the frame eagerly. So a scheduler also publishes ``r`` as the
first size of an empty ``[r, 0]`` tensor (the *length carrier*, no storage) that is marked
dynamic; while compiling, the wrapper reads ``r`` from that size. Tensor sizes marked dynamic
become symbols, so one graph serves every ``r`` (and a second one the last value, ``r = S``,
where the layer stops dropping). In eager mode nothing here runs.

A scheduler without a carrier (e.g. DeepSpeed's own), or a wrapped layer whose code turns ``r``
back into a constant (``if hidden.shape[1] == 128``, ``int(x.shape[1])`` used as a Python
number), gets a graph per ``r``: the wrapper warns once, while compiling, naming the layer and
how many recompiles to expect, and what dynamo does when its limit is reached.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any

import torch

__all__ = [
    "CARRIER_ATTR", "length_carrier", "prepare_scheduler", "publish_length", "traced_reserved_length", "warn_if_static",
]

# Attribute of a scheduler that holds its length carrier (read by the wrapper while compiling).
CARRIER_ATTR = "reserved_length_carrier"


def length_carrier(value: int) -> torch.Tensor:
    """An empty ``[value, 0]`` CPU tensor whose size 0 is marked dynamic for dynamo."""
    carrier = torch.empty(int(value), 0)
    if "torch._dynamo" in sys.modules:
        torch._dynamo.maybe_mark_dynamic(carrier, 0)
    else:  # what maybe_mark_dynamic records, without importing dynamo (seconds) into eager-only runs
        carrier._dynamo_weak_dynamic_indices = {0}  # type: ignore[attr-defined]
        carrier._has_dynamo_dim_marking = True  # type: ignore[attr-defined]
    return carrier


def publish_length(owner: Any, value: int) -> None:
    """Set ``owner``'s carrier to ``value`` (eager code only: a scheduler's update, a layer's set-up)."""
    current = getattr(owner, CARRIER_ATTR, None)
    if current is None or current.shape[0] != value:
        setattr(owner, CARRIER_ATTR, length_carrier(value))


def traced_reserved_length(scheduler: Any) -> Any:
    """``r`` while dynamo traces: the carrier's (symbolic) size, else the scheduler's int (a constant)."""
    carrier = getattr(scheduler, CARRIER_ATTR, None)
    if isinstance(carrier, torch.Tensor):
        return carrier.shape[0]
    return int(scheduler.get_current_seq())


def warn_if_static(layer: Any, keep: Any) -> None:
    """While dynamo traces ``layer``'s call with reserved length ``keep``: warn once if ``keep`` is a constant.

    Runs at compile time only (``comptime``), so compiled steps pay nothing and nothing breaks the graph.
    """
    from torch._dynamo.comptime import comptime

    comptime(_check_traced_length)


def _check_traced_length(ctx: Any) -> None:
    var = ctx.get_local("keep")
    keep = var.as_python_constant() if var.is_python_constant() else var.as_fake()
    layer = ctx.get_local("layer")._i_will_not_complain_if_bc_breaks_VariableTracker().value
    if layer.reserved_length is not None or layer.scheduler is None:  # a fixed r: one graph, nothing to warn
        return
    if _is_symbolic(keep) or int(keep) <= 1:  # dynamo always specialises sizes 0 and 1
        return
    scheduler = layer.scheduler
    has_carrier = isinstance(getattr(scheduler, CARRIER_ATTR, None), torch.Tensor)
    inner = type(layer.random_ltd_layer).__name__
    if not _first_time(scheduler, layer, inner if has_carrier else "<scheduler>"):
        return
    why = (
        f"{inner} (random-LTD layer {layer.layer_id}; warned once per layer class) makes the reserved length a "
        f"constant in its code (e.g. compares or converts hidden_states.shape[...] to a Python int)"
        if has_carrier
        else f"its scheduler {type(scheduler).__name__} gives r as a Python int, which dynamo treats as a constant "
        f"(random-LTD layer {layer.layer_id}, {inner}; warned once per scheduler)"
    )
    expected = _expected_recompiles(scheduler)
    limit = getattr(getattr(torch._dynamo, "config", None), "recompile_limit", None)
    warnings.warn(
        f"torch.compile: {why}, so every distinct reserved length r is a new graph: expect {expected}. "
        f"Dynamo runs a frame eagerly once it reaches torch._dynamo.config.recompile_limit ({limit}): raise that "
        "limit above the number of distinct r, use a coarser seq_per_step, or use random_ltd_cli's "
        "RandomLTDScheduler (it passes r as a dynamic size).",
        UserWarning,
        stacklevel=2,
    )


# scheduler -> what was warned about (layer class names, "<scheduler>"); not on the modules, whose
# attributes dynamo guards on.
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _first_time(scheduler: Any, layer: Any, what: str) -> bool:
    try:
        seen = _WARNED.setdefault(scheduler, set())
    except TypeError:  # a scheduler that cannot be weakly referenced or hashed: remember per layer
        seen = layer.__dict__.setdefault("_random_ltd_compile_warned", set())
    if what in seen:
        return False
    seen.add(what)
    return True


def _is_symbolic(value: Any) -> bool:
    if not isinstance(value, torch.SymInt):
        return False
    import sympy

    return not isinstance(value.node.expr, sympy.Integer)


def _expected_recompiles(scheduler: Any) -> str:
    lo, hi, step = (getattr(scheduler, n, None) for n in ("min_value", "max_value", "seq_per_step"))
    if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(step, int) and min(lo, hi, step) > 0):
        return "one recompile per distinct r of the schedule"
    distinct = len(set(range(lo - lo % step, hi, step)) | {hi})
    return f"about {distinct} compilations ({distinct} distinct r from {lo} to {hi} in steps of {step})"


def prepare_scheduler(scheduler: Any) -> None:
    """Publish the carrier of a scheduler that keeps one (it has the attribute) but was made before torch loaded."""
    if scheduler is not None and hasattr(scheduler, CARRIER_ATTR) and hasattr(scheduler, "get_current_seq"):
        publish_length(scheduler, int(scheduler.get_current_seq()))
