"""The independent reference for a wrapped layer, and the checks the sweep runs on each family.

For every call of a wrapped layer during a forward of the converted model, the layer's real
call arguments (full length) and the kept indices the wrapper drew are captured. The reference
runs the *unwrapped* layer on all ``S`` tokens with its self-attention restricted to the kept
keys: ``False`` / a large negative value on the non-kept key columns of its 4-D mask (a mask
is built from scratch when the layer received ``None``). Its output read at the kept positions
must equal the wrapped layer's output there; the dropped positions must equal the input. No
code of the library's gather/scatter path is used here.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from random_ltd_cli import ConversionError, InputError, convert_to_random_ltd, random_ltd_layers

from .zoo import BY_NAME, Family, R, batch_for, build

SELF_MASKS = ("attention_mask", "attn_mask", "mask", "self_attn_mask")
ATOL, RTOL = 2e-5, 1e-4


class Recording:
    """Wraps a layer's sampler and keeps every index tensor it returns (fixes nothing, just records)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        idx = self.inner(*args, **kwargs)
        self.calls.append(idx)
        return idx


@dataclass
class Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any = None
    draws: int = 0  # the sampler's draw count when the call started
    idx: torch.Tensor | None = None  # the kept indices, when this call dropped tokens


@dataclass
class Outcome:
    """What the sweep found for one family and attention kind."""

    stack: str = ""
    layer_class: str = ""
    wrapped: list[str] = field(default_factory=list)
    max_diff: float = 0.0
    seq_args: list[str] = field(default_factory=list)  # sequence-aligned tensor arguments besides the states
    partial: list[str] = field(default_factory=list)  # wrapped layers that drop in some of their calls only
    shared_indices: bool = False  # one set of kept positions for the whole batch (instead of one per sample)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # first mask each layer got


def convert(model: nn.Module, fam: Family, verify: str = "off") -> nn.Module:
    """Convert for the sweep. Its own reference judges; the built-in verifier (default ``"first"`` for users) is
    off here except in the training step, which checks that it raises no false alarm on the first step."""
    return convert_to_random_ltd(model, reserved_length=R, verify=verify, **fam.convert)


def stack_of(model: nn.Module) -> tuple[str, str, list[str]]:
    """(container, layer class, wrapped layer names) of a converted model."""
    layers = random_ltd_layers(model)
    names = [n for n, _ in layers]
    parents = sorted({n.rpartition(".")[0] for n in names})
    classes = sorted({type(w.random_ltd_layer).__name__ for _, w in layers})
    return ", ".join(parents), ", ".join(classes), names


def _named(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    params = list(inspect.signature(layer.forward).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = dict(zip(positional, args, strict=False))
    named.update(kwargs)
    return named, [p.name for p in params]


def _convention(mask: torch.Tensor, inverted: bool) -> str:
    """How a mask encodes "may attend": ``keep`` (True/1 = attend), ``blocked`` (True = masked, MPT) or
    ``additive`` (0 = attend, a large negative value = masked). A float mask of 0s and 1s is a keep mask
    (DeBERTa builds one when no mask is passed); an additive one never holds 1."""
    if mask.dtype == torch.bool:
        return "blocked" if inverted else "keep"
    if mask.dtype.is_floating_point:
        binary = bool(((mask == 0) | (mask == 1)).all()) and bool((mask == 1).any())
        return "keep" if binary else "additive"
    return "keep"


def _encode(ok: torch.Tensor, like: torch.Tensor, convention: str) -> torch.Tensor:
    if convention == "blocked":
        return ~ok
    if convention == "additive":
        return torch.zeros(ok.shape, dtype=like.dtype).masked_fill(~ok, torch.finfo(like.dtype).min)
    return ok.to(like.dtype)


def _restrict(mask: torch.Tensor, key_ok: torch.Tensor, s: int, inverted: bool = False) -> torch.Tensor:
    """``mask`` with the non-kept key columns disallowed; key_ok is [B, S(query), S(key)]."""
    convention = _convention(mask, inverted)
    if mask.dim() == 2:  # [B, S] key padding: keep only the kept keys (no per-query diagonal possible)
        ok = key_ok.all(1)  # a key allowed for every query is a kept one (the diagonal adds one query each)
    else:
        ok = key_ok[:, None] if mask.dim() == 4 else key_ok
        assert mask.shape[-1] == s, f"mask {tuple(mask.shape)} has no key axis of length {s}"
        shape = (*ok.shape[:1], *mask.shape[1:-2], s, s) if mask.dim() == 4 else (ok.shape[0], s, s)
        mask = mask.expand(*shape) if mask.shape[0] in (1, shape[0]) else mask
    if convention == "additive":
        return mask.masked_fill(~ok, torch.finfo(mask.dtype).min)
    if convention == "blocked":
        return mask | ~ok
    return mask & ok if mask.dtype == torch.bool else mask * ok.to(mask.dtype)


def _from_scratch(key_ok: torch.Tensor, causal: bool, like: torch.Tensor | None, inverted: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """A mask for a layer that got ``None``, in the form the same layer got on the padded batch."""
    s = key_ok.shape[-1]
    allowed = key_ok & (torch.ones(s, s, dtype=torch.bool).tril() if causal else True)  # (B, Sq, Sk)
    if like is None:
        return _encode(allowed[:, None], torch.zeros((), dtype=dtype), "additive")
    convention = _convention(like, inverted)
    if like.dim() == 2:
        return _encode(key_ok.all(1), like, convention)
    return _encode(allowed[:, None] if like.dim() == 4 else allowed, like, convention)


def _allowed_rows(mask: torch.Tensor, b: int, s: int, inverted: bool = False) -> torch.Tensor:
    """[B, S] bool: query rows the model's own mask lets attend to some key (padding rows may be fully masked)."""
    if mask.dim() != 4 or mask.shape[-2] != s:
        return torch.ones(b, s, dtype=torch.bool)
    convention = _convention(mask, inverted)
    if convention == "additive":
        ok = mask > torch.finfo(mask.dtype).min / 2
    elif convention == "blocked":
        ok = ~mask
    else:
        ok = mask != 0
    return ok.any(-1).all(1).expand(b, s)


def reference_output(
    layer: nn.Module, call: Call, idx: torch.Tensor, causal: bool, inverted: bool = False,
    like: torch.Tensor | None = None, maskless: bool = False,
) -> tuple[Any, torch.Tensor]:
    """The unwrapped layer on all S tokens, keys restricted to the kept ones.

    Returns:
        (the layer's full output, [B, S] bool of the query rows to compare: rows that the mask, restricted
        to the kept keys, masks completely -- padding queries -- are garbage in any implementation and skipped).
    """
    args, kwargs = list(call.args), dict(call.kwargs)
    named, params = _named(layer, call.args, call.kwargs)
    positional = params[: len(args)]

    def put(name: str, value: Any) -> None:
        if name in positional:
            args[positional.index(name)] = value
        else:
            kwargs[name] = value

    hidden = named[params[0] if params[0] in named else "hidden_states"]
    b, s = hidden.shape[:2]
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
    key_ok = kept[:, None, :] | torch.eye(s, dtype=torch.bool)[None]  # (B, Sq, Sk); dropped rows keep themselves
    rows = torch.ones(b, s, dtype=torch.bool)
    name = next((n for n in SELF_MASKS if n in params or n in named), None)
    if name is None and "kwargs" in params:
        name = "attention_mask"
    if name is None and not maskless:  # nothing restricts the keys: no independent reference
        raise AssertionError(f"{type(layer).__name__} takes no attention mask: the reference cannot restrict its "
                             "keys (running it on the kept tokens would only repeat the wrapper)")
    if name is None:  # hand-vetted position-free attention without a mask (Data2Vec-Vision): run on the kept tokens
        others = seq_aligned(call, layer, s)
        assert not others, f"{type(layer).__name__} takes no attention mask but gets {others}: no reference"
        sub = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        put(params[0], sub)
        out = layer(*args, **kwargs)
        full = hidden.clone()
        full.scatter_(1, idx[..., None].expand(-1, -1, hidden.shape[-1]), _first(out))
        return ((full, *out[1:]) if isinstance(out, tuple) else full), rows
    mask = named.get(name)
    if isinstance(mask, torch.Tensor):
        restricted = _restrict(mask, key_ok, s, inverted)
        # a padding query whose every allowed key was dropped (a bidirectional window) attends to nothing: skip it
        rows = _allowed_rows(restricted, b, s, inverted) if restricted.dim() == 4 else _allowed_rows(mask, b, s,
                                                                                                     inverted)
        put(name, restricted)
    elif mask is None:
        put(name, _from_scratch(key_ok, causal, like, inverted, hidden.dtype))
    else:
        raise AssertionError(f"{type(layer).__name__} got a {type(mask).__name__} {name!r}: no reference")
    for cache in ("past_key_value", "past_key_values", "layer_past", "cache"):
        if named.get(cache) is not None:
            put(cache, None)
    if "use_cache" in named:
        put("use_cache", False)
    return layer(*args, **kwargs), rows


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def capture(model: nn.Module) -> list[tuple[str, Any, list[Call], Recording]]:
    """Record every call of every wrapped layer (full-length arguments) and the indices it drew."""
    records = []
    for name, wrapper in random_ltd_layers(model):
        calls: list[Call] = []
        rec = Recording(wrapper.sampler)
        wrapper.sampler = rec

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _calls: list[Call] = calls,
                _rec: Recording = rec) -> None:
            _calls.append(Call(args, dict(kwargs), draws=len(_rec.calls)))

        def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                 _calls: list[Call] = calls, _rec: Recording = rec) -> None:
            call = next(c for c in reversed(_calls) if c.out is None)
            call.out = out
            if len(_rec.calls) > call.draws:
                call.idx = _rec.calls[-1]

        wrapper.register_forward_pre_hook(pre, with_kwargs=True)
        wrapper.register_forward_hook(post, with_kwargs=True)
        records.append((name, wrapper, calls, rec))
    return records


def seq_aligned(call: Call, layer: nn.Module, s: int) -> list[str]:
    """Names of the tensor arguments (besides the hidden states) with an axis of length S."""
    named, _ = _named(layer, call.args, call.kwargs)
    out = []
    for n, v in list(named.items())[1:]:
        values = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(t, torch.Tensor) and s in tuple(t.shape) for t in values):
            out.append(n)
    return out


def check_exact(fam: Family, model: nn.Module) -> Outcome:
    """Compare every wrapped layer of the converted ``model`` with the reference.

    Two forwards: the padded batch, then (where the family takes a padding mask) the same batch
    without a mask, so that layers also meet ``None`` masks (e.g. sdpa's implicit causal mask).

    Raises:
        AssertionError: a wrapped layer differs from the reference (the message says where).
    """
    from .parts_reference import check_parts_exact, is_parts_model

    padded = batch_for(fam)
    batches = [padded]
    if any("attention_mask" in k for k in padded):
        batches.append({k: v for k, v in padded.items() if "attention_mask" not in k})
    if is_parts_model(model):  # layers kept as parallel lists of parts (XLM): a per-layer reference
        return check_parts_exact(batches, model)
    outcome = Outcome()
    outcome.stack, outcome.layer_class, outcome.wrapped = stack_of(model)
    records = capture(model)
    assert records, "no layer was wrapped"
    for batch in batches:
        for _, _, calls, rec in records:
            calls.clear()
            rec.calls.clear()
        torch.manual_seed(0)
        with torch.no_grad():
            model(**batch)
        for name, wrapper, calls, _ in records:
            _check_layer(fam, name, wrapper.random_ltd_layer, calls, outcome)
    return outcome


def _check_layer(fam: Family, name: str, inner: nn.Module, calls: list[Call], outcome: Outcome) -> None:
    dropping = [c for c in calls if c.idx is not None]
    assert dropping, f"{name} dropped no tokens in {len(calls)} call(s)"
    note = f"{name}: {len(dropping)} of {len(calls)} calls"
    if len(dropping) < len(calls) and note not in outcome.partial:
        outcome.partial.append(note)
    for call in calls:
        if call.idx is None:  # a call that does not drop runs the layer on the very same arguments
            with torch.no_grad():
                plain = inner(*call.args, **call.kwargs)
            assert torch.equal(_first(call.out), _first(plain)), f"{name}: a call without dropping differs"
            continue
        outcome.shared_indices |= call.idx.shape[0] == 1
        causal = fam.kind == "decoder" or ".decoder." in f".{name}."
        named, params = _named(inner, call.args, call.kwargs)
        mask = next((named[n] for n in SELF_MASKS if isinstance(named.get(n), torch.Tensor)), None)
        if mask is not None:
            outcome.masks.setdefault(name, mask)  # the form of this layer's mask, for calls that get None
        like = outcome.masks.get(name)
        diff = _compare(name, inner, call, call.idx, causal, fam.inverted_mask, like, fam.group != "Generated")
        outcome.max_diff = max(outcome.max_diff, diff)
        s = named[params[0] if params[0] in named else "hidden_states"].shape[1]
        outcome.seq_args += [a for a in seq_aligned(call, inner, s) if a not in outcome.seq_args]


def _compare(
    name: str, inner: nn.Module, call: Call, idx: torch.Tensor, causal: bool, inverted: bool,
    like: torch.Tensor | None, maskless: bool = False,
) -> float:
    named, params = _named(inner, call.args, call.kwargs)
    hidden = named[params[0] if params[0] in named else "hidden_states"]
    b, s = hidden.shape[:2]
    assert idx.shape in ((b, R), (1, R)), f"{name}: indices {tuple(idx.shape)}"
    idx = idx.expand(b, R)  # one row: the same kept positions for every sample (MPT)
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
    with torch.no_grad():
        ref, rows = reference_output(inner, call, idx, causal, inverted, like, maskless)
    got = _first(call.out)
    assert got.shape == hidden.shape, f"{name}: output {tuple(got.shape)} != input {tuple(hidden.shape)}"
    assert torch.equal(got[~kept], hidden[~kept]), f"{name}: dropped tokens changed"
    compared = kept & rows
    diff = float((got[compared] - _first(ref)[compared]).abs().max())
    torch.testing.assert_close(got[compared], _first(ref)[compared], atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{name}: kept tokens differ from the reference: {m}")
    _check_extra_outputs(name, call, ref)
    return diff


def _check_extra_outputs(name: str, call: Call, ref: Any) -> None:
    """An input the layer hands back in its output (e.g. T5's ``position_bias``) comes back full-length."""
    if not isinstance(ref, (tuple, list)):
        return
    got = call.out
    assert isinstance(got, (tuple, list)) and len(got) == len(ref), f"{name}: output structure differs"
    inputs = [v for v in (*call.args, *call.kwargs.values()) if isinstance(v, torch.Tensor)]
    for i, r in enumerate(ref[1:], start=1):
        if isinstance(r, torch.Tensor) and any(r is v for v in inputs):
            g = got[i]
            assert isinstance(g, torch.Tensor) and g.shape == r.shape and torch.equal(g, r), (
                f"{name}: output element {i} (an input handed on) is "
                f"{tuple(g.shape) if isinstance(g, torch.Tensor) else g}, not the full-length {tuple(r.shape)}")


def loss_of(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None:
        loss = _first(out if isinstance(out, tuple) else out.to_tuple()).float().pow(2).mean()
    return loss


def check_training_step(fam: Family, attn: str) -> float:
    """One training step of the converted model on a padded batch: finite loss (and load-balancing
    loss, for MoE models with ``output_router_logits=True``), finite gradients, an optimizer step."""
    model = convert(build(fam.name, attn), fam, verify="first")  # the product's default: verified on this step
    records = capture(model)
    torch.manual_seed(0)
    out = model(**batch_for(fam, labels=True))
    loss = loss_of(out)
    assert torch.isfinite(loss), f"loss {loss}"
    aux = getattr(out, "aux_loss", None)
    if getattr(model.config, "output_router_logits", False):
        assert aux is not None and torch.isfinite(aux), f"load-balancing loss {aux}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "non-finite gradients"
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert all(torch.isfinite(p).all() for p in model.parameters()), "non-finite parameters after the step"
    for name, _, calls, _ in records:
        assert any(c.idx is not None for c in calls), f"{name} did not drop tokens"
    return float(loss.detach())


def check_checkpointing(fam: Family, attn: str) -> bool:
    """With Hugging Face gradient checkpointing, one training step gives the same loss and gradients.

    Returns:
        False when the model class does not support gradient checkpointing (nothing checked).
    """
    grads = []
    for checkpointing in (False, True):
        model = convert(build(fam.name, attn), fam, verify="first")  # verified, and recomputes are not
        if checkpointing:
            if not model.supports_gradient_checkpointing:
                return False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        loss_of(model(**batch_for(fam, labels=True))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys(), "checkpointing changed which parameters get gradients"
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=n: f"gradient of {n} differs under checkpointing: {m}")
    return True


def check_eval_identical(fam: Family, attn: str) -> None:
    """In eval mode the converted model's outputs equal the unconverted model's bitwise (adapters included)."""
    plain = build(fam.name, attn).eval()
    model = convert(build(fam.name, attn), fam).eval()
    batch = batch_for(fam)
    with torch.no_grad():
        a, b = plain(**batch), model(**batch)
    a_out = a.to_tuple() if hasattr(a, "to_tuple") else a
    b_out = b.to_tuple() if hasattr(b, "to_tuple") else b
    assert torch.equal(_first(a_out), _first(b_out)), "eval outputs differ from the unconverted model's"


def snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


@dataclass
class Result:
    """The status the sweep found: ``exact``, ``refused`` (with the library's message) or ``FAIL``."""

    status: str
    detail: str = ""
    outcome: Outcome | None = None


@functools.cache
def result(name: str, attn: str) -> Result:
    """Convert the family's model and classify it (cached: the tests and the docs page share one run)."""
    fam = BY_NAME[name]
    model = build(name, attn)
    before = snapshot(model)
    try:
        convert(model, fam)
    except (ConversionError, InputError) as exc:
        after = snapshot(model)
        untouched = before[0] == after[0] and before[1].keys() == after[1].keys() and all(
            torch.equal(before[1][k], after[1][k]) for k in before[1])
        if not untouched:
            return Result("FAIL", f"refused but the model was changed: {exc}")
        return Result("refused", str(exc))
    except Exception as exc:  # a raw error: the sweep reports it as a failure
        return Result("FAIL", f"conversion raised {type(exc).__name__}: {_line(exc)}")
    try:
        outcome = check_exact(fam, model)
    except AssertionError as exc:
        return Result("FAIL", _line(exc))
    except Exception as exc:
        return Result("FAIL", f"{type(exc).__name__}: {_line(exc)}")
    return Result("exact", f"max abs diff {outcome.max_diff:.1e}", outcome)


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
