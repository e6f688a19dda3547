"""The built-in verifier: every wrapped layer checked against a reference that needs no catalogue.

**The reference** for one dropping call of a wrapped layer (kept indices ``idx [B, r]``): the
*unwrapped* layer on all ``S`` tokens, every other argument as the model passed it (a key/value
cache left out), its self-attention restricted so that each kept query sees only the kept keys
(and what the model's own mask allows), read at the kept positions. The wrapper's result at the
kept positions must match it within a tolerance for the dtype; the dropped positions must equal
the input exactly. Keys are restricted without knowing the family:

* by intercepting the attention kernels the layer calls while the reference runs
  (:mod:`random_ltd_cli.verify_kernels`: ``scaled_dot_product_attention``,
  ``multi_head_attention_forward``, ``flex_attention``, ``softmax`` over ``[..., S, S]`` scores);
* else through the layer's attention-mask argument, in its own convention
  (:mod:`random_ltd_cli.verify_masks`).

A layer where neither applies (no attention kernel seen, no mask: state-space, convolutional,
MLP-only blocks) is *unverifiable*, never reported exact.

Both runs are deterministic and leave training untouched: the inner layer in eval mode (dropout
off) with dropout functions bypassed, under ``torch.no_grad()``, with the layer's output recorders
held back, and with the global RNG state (CPU and CUDA) saved and restored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError, UnverifiableLayerError, VerificationError
from .recorders import _capture_wrapper, _is_capture_hook, call_unrecorded
from .verify_kernels import Kernels

if TYPE_CHECKING:
    from .layer import RandomLayerTokenDrop

__all__ = ["VERIFY_MODES", "LayerVerdict", "check_call", "tolerance_for", "verify_random_ltd"]

VERIFY_MODES = ("first", "always", "off")
PART_METHOD = "per-token part"  # a proxied part of a layer kept as parallel lists (parts.py)
STATUSES = ("exact", "not called", "unverifiable", "error", "wrong")  # worst last
# Tolerance on the error measure (|got - ref| / (rms(ref) + |ref|), max over kept tokens), by compute dtype.
TOLERANCES = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    "tf32": 1e-2,  # float32 with reduced-precision matmuls (TF32, bf16x3)
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}
WHAT_TO_DO = (
    "Declare the layer's own sequence-aligned arguments with seq_args=, give the layer its original positions "
    "(an adapter), or convert with verify='off' at your own risk; please report it (docs/verification.md)."
)


@dataclass
class LayerVerdict:
    """What the verifier found for one wrapped layer (the worst of its verified calls)."""

    name: str  # qualified name of the wrapper in the model ("" for a bare wrapper)
    layer_class: str  # class name of the inner layer
    status: str  # "exact" | "wrong" | "unverifiable" | "error" | "not called"
    max_error: float | None = None
    tolerance: float | None = None
    cause: str = ""  # likely cause (wrong), why (unverifiable), the reason (error); "" when exact
    method: str = ""  # how keys were restricted: "sdpa", "softmax", "flex", "mha", "mask:<name>" (joined by "+")
    calls: int = 0  # dropping calls verified
    reserved_length: int | None = None  # r of the worst call
    seq_len: int | None = None  # S of the worst call
    dtype: str = ""  # the compute dtype the tolerance was chosen for
    own_failure: BaseException | None = field(default=None, repr=False, compare=False)  # the wrapped call's error
    dropping_breaks: bool = False  # own_failure happens on the kept tokens only (the layer runs on all tokens)

    def to_dict(self) -> dict[str, Any]:
        """The verdict as plain JSON-ready values (for ``--json`` output)."""
        return {"name": self.name, "layer_class": self.layer_class, "status": self.status,
                "max_error": self.max_error, "tolerance": self.tolerance, "cause": self.cause, "method": self.method,
                "calls": self.calls, "reserved_length": self.reserved_length, "seq_len": self.seq_len,
                "dtype": self.dtype}

    @property
    def label(self) -> str:
        return f"{self.name} ({self.layer_class})" if self.name else self.layer_class

    def message(self) -> str:
        """The user-facing text for a verdict that is not exact."""
        size = f" (r={self.reserved_length} of S={self.seq_len})" if self.reserved_length else ""
        if self.status == "wrong" and self.method == PART_METHOD:
            return (f"random-LTD cannot run a part of {self.label}{size} on the kept tokens only: {self.cause} "
                    f"(max error {self.max_error or 0.0:.3g} > tolerance {self.tolerance or 0.0:.3g}, {self.dtype}, "
                    "between the part on the kept tokens and on all tokens). Train this model without random-LTD, or "
                    "convert with verify='off' at your own risk (docs/architectures.md, layers kept as parts).")
        if self.status == "wrong":
            return (f"random-LTD changes the output of {self.label}{size}: max error {self.max_error:.3g} > tolerance "
                    f"{self.tolerance:.3g} ({self.dtype}) against the reference (the unwrapped layer on all tokens, "
                    f"keys restricted to the kept ones; method {self.method or 'none'}). Likely cause: {self.cause}. "
                    f"{WHAT_TO_DO}")
        if self.status == "unverifiable":
            return (f"cannot verify {self.label}{size}: {self.cause}. random-LTD checks every wrapped layer against "
                    "its output on all tokens with the attention keys restricted to the kept ones, and found no way "
                    "to restrict them here, so it cannot tell whether dropping tokens is exact. To proceed at your "
                    "own risk: convert with verify='off'; or wrap only attention layers.")
        if self.status == "error" and self.dropping_breaks:
            return (f"random-LTD cannot drop tokens in {self.label}{size}: {self.cause}. Train these layers without "
                    "random-LTD (convert with layer_type= or filter_fn= choosing other layers), or keep their full "
                    "length with reserved_length >= S.")
        if self.status == "error":
            return f"could not verify {self.label}{size}: {self.cause}"
        return f"{self.label}: {self.status}"


def check_verify_mode(value: Any) -> str:
    if value not in VERIFY_MODES:
        raise ConfigError(f"verify={value!r} must be one of {', '.join(repr(m) for m in VERIFY_MODES)}.")
    return str(value)


def tolerance_for(dtype: torch.dtype, device: torch.device) -> tuple[float, str]:
    """The tolerance for outputs computed in ``dtype`` on ``device`` (autocast and TF32 taken into account)."""
    compute = dtype
    if torch.is_autocast_enabled(device.type):
        fast = torch.get_autocast_dtype(device.type)
        if TOLERANCES.get(fast, 0) > TOLERANCES.get(compute, 0):
            compute = fast
    if compute == torch.float32 and _reduced_fp32(device):
        return TOLERANCES["tf32"], "float32 (TF32 matmuls)"
    return TOLERANCES.get(compute, TOLERANCES[torch.bfloat16]), str(compute).replace("torch.", "")


def _reduced_fp32(device: torch.device) -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return True
    return device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)


# -- one call ---------------------------------------------------------------------------------------


def check_call(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any], idx: torch.Tensor,
               name: str = "") -> LayerVerdict:
    """Verify one dropping call of ``wrapper`` (its full-length ``args``/``kwargs`` and kept ``idx [B, r]``)."""
    from .verify_compare import compare_call

    verdict = LayerVerdict(name, type(wrapper.random_ltd_layer).__name__, "exact", calls=1)
    with isolated(wrapper.random_ltd_layer):
        compare_call(wrapper, args, kwargs, idx, verdict)
    return verdict


@contextlib.contextmanager
def isolated(inner: nn.Module) -> Iterator[None]:
    """Deterministic, invisible runs of ``inner``: eval mode (flags restored), no grad, RNG restored,
    capture hooks of its submodules held back (the layer's own are held back by ``call_unrecorded``)."""
    flags = [(m, m.training) for m in inner.modules()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    held = []
    for m in inner.modules():
        if m is inner:
            continue
        hooks, wrapped = m._forward_hooks, _capture_wrapper(m)
        if any(_is_capture_hook(h) for h in hooks.values()):
            m._forward_hooks = type(hooks)((k, h) for k, h in hooks.items() if not _is_capture_hook(h))
        if wrapped is not None:
            del m.__dict__["forward"]
        held.append((m, hooks, wrapped))
    inner.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training
        for m, hooks, wrapped in held:
            m._forward_hooks = hooks
            if wrapped is not None:
                m.__dict__["forward"] = wrapped
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_reference(inner: nn.Module, args: list[Any], kwargs: dict[str, Any], kernels: Kernels) -> Any:
    with kernels:
        return call_unrecorded(inner, args, kwargs)


# -- the training-time policy -------------------------------------------------------------------------


def on_dropping_call(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any],
                     idx: torch.Tensor) -> None:
    """Called by the wrapper (eagerly) on each dropping call: verify it when the policy says so.

    ``"first"`` verifies each argument signature once (under ``torch.distributed`` with several ranks,
    only the layer's first dropping call, so that every rank re-runs its layer on the same step).
    """
    from .sampling import _in_backward

    if _in_backward():  # an activation-checkpoint recompute repeats a verified forward
        return
    sink: list[LayerVerdict] | None = wrapper.__dict__.get("_verify_sink")
    key = _signature(args, kwargs) if not _distributed() else "first"
    due = wrapper.verify == "always" or (wrapper.verify == "first" and key not in wrapper._verified)
    if sink is None and not due:
        return
    verdict = check_call(wrapper, args, kwargs, idx, wrapper.__dict__.get("_ltd_name", ""))
    if sink is not None:
        sink.append(verdict)
        return
    if verdict.status == "exact" or key == "first":  # several ranks: once, whatever this rank's batch held
        wrapper._verified.add(key)
    if verdict.status == "exact":
        return
    if verdict.dropping_breaks:
        raise VerificationError(verdict.message()) from verdict.own_failure
    if verdict.own_failure is not None:
        return  # the wrapped call itself fails: training raises that error right after (not the verifier's)
    if verdict.status == "unverifiable" and verdict.cause.startswith("every kept token is a padding"):
        return  # nothing to compare in this batch: verified on a later call
    if verdict.status == "unverifiable":
        raise UnverifiableLayerError(verdict.message())
    raise VerificationError(verdict.message())


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Argument names, which are None, tensor ranks and dtypes: a new one is verified again."""
    def kind(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dim(), v.dtype)
        if isinstance(v, (tuple, list)):
            return tuple(kind(x) for x in v)
        return "none" if v is None else type(v).__name__

    return (tuple(kind(a) for a in args), tuple((k, kind(v)) for k, v in sorted(kwargs.items())))


def _distributed() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


# -- the whole model ---------------------------------------------------------------------------------


def verify_random_ltd(model: nn.Module, *args: Any, reserved_length: int | None = None,
                      **kwargs: Any) -> list[LayerVerdict]:
    """Verify every wrapped layer of a converted ``model`` on one batch.

    Runs ``model(*args, **kwargs)`` once in training mode under ``torch.no_grad()``, with every
    wrapped layer verified on each of its dropping calls. The model's training flags, buffers, the
    global RNG state and the layers' private generators are restored afterwards, so the training
    trajectory is unchanged. Nothing is raised for a layer that is not exact: read the verdicts.

    Args:
        model: a model converted with :func:`~random_ltd_cli.convert_to_random_ltd` (or holding
            :class:`~random_ltd_cli.RandomLayerTokenDrop` layers).
        *args, **kwargs: the batch, as the model's forward takes it.
        reserved_length: ``r`` for this call only (default: each layer's fixed ``r`` or scheduler's).

    Returns:
        One :class:`LayerVerdict` per wrapped layer, in module order (the worst over its calls;
        ``"not called"`` for a layer that dropped no tokens in this forward).

    Raises:
        ConfigError: the model has no random-LTD layers, or ``reserved_length`` is not positive.
    """
    from .convert import random_ltd_layers, unwrap_parallel

    layers = random_ltd_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no random-LTD layers; convert it with convert_to_random_ltd "
                          "first.")
    if reserved_length is not None and int(reserved_length) <= 0:
        raise ConfigError(f"reserved_length={reserved_length} must be a positive number of tokens.")
    root = unwrap_parallel(model)
    flags = [(m, m.training) for m in root.modules()]
    buffers = [(b, b.detach().clone()) for b in root.buffers()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    saved = [_wrapper_state(w) for _, w in layers]
    sinks: list[list[LayerVerdict]] = []
    for name, w in layers:
        sinks.append([])
        w.__dict__["_verify_sink"] = sinks[-1]
        w.__dict__["_ltd_name"] = name
        if reserved_length is not None:
            w.reserved_length = int(reserved_length)
    failure: Exception | None = None
    try:
        root.train()
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:
        if not any(sinks):  # the batch itself fails: the model's own error
            raise
        failure = exc  # a wrapped layer's call failed after its verification recorded why
    finally:
        for (_, w), state in zip(layers, saved, strict=True):
            _restore_wrapper(w, state)
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    verdicts = [_worst(name, w, sink) for (name, w), sink in zip(layers, sinks, strict=True)]
    if failure is not None:
        for v in verdicts:
            if v.status == "not called":
                v.cause = f"the forward stopped before this layer: {type(failure).__name__}: {failure}"[:400]
    return verdicts


def _wrapper_state(w: RandomLayerTokenDrop) -> dict[str, Any]:
    sampler = w.sampler
    gens = dict(getattr(sampler, "_generators", {}))
    user = getattr(sampler, "_user_generator", None)
    return {
        "reserved_length": w.reserved_length, "last_indices": w.last_indices,
        "name": w.__dict__.get("_ltd_name"), "gens": gens,
        "gen_states": {k: g.get_state() for k, g in gens.items()},
        "user": None if user is None else user.get_state(),
    }


def _restore_wrapper(w: RandomLayerTokenDrop, state: dict[str, Any]) -> None:
    w.__dict__.pop("_verify_sink", None)
    if state["name"] is None:
        w.__dict__.pop("_ltd_name", None)
    w.reserved_length, w.last_indices = state["reserved_length"], state["last_indices"]
    sampler = w.sampler
    if hasattr(sampler, "_generators"):
        sampler._generators.clear()
        sampler._generators.update(state["gens"])
        for k, g in state["gens"].items():
            g.set_state(state["gen_states"][k])
    user = getattr(sampler, "_user_generator", None)
    if state["user"] is not None and user is not None:
        user.set_state(state["user"])


def _worst(name: str, w: RandomLayerTokenDrop, verdicts: list[LayerVerdict]) -> LayerVerdict:
    cls = type(w.random_ltd_layer).__name__
    if not verdicts:
        return LayerVerdict(name, cls, "not called", cause="the layer dropped no tokens in this forward (eval mode, "
                            "no reserved length, or r >= S)")
    worst = max(verdicts, key=lambda v: (STATUSES.index(v.status), _num(v.max_error)))
    worst.name, worst.calls = name, len(verdicts)
    methods = sorted({m for v in verdicts for m in v.method.split("+") if m})
    worst.method = "+".join(methods)
    return worst


def _num(x: float | None) -> float:
    return -math.inf if x is None else x
