"""The independent reference for the library sweep.

For every call of a wrapped layer, the layer's real (full-length) arguments and the kept indices
are captured (``tests.arch.reference.capture``). The reference runs the *unwrapped* layer on all
``S`` tokens with its self-attention restricted to the kept keys (each dropped query keeps itself):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` is intercepted during the call and
  given a mask that also blocks the non-kept keys (on top of the layer's own mask or causal flag),
  so whatever the layer derives from the length it sees (positions, windows) is derived for all
  ``S`` tokens, as in the unconverted model;
* ``softmax``: the same for a softmax over ``[B, ..., S, S]`` scores (the eager ``softmax(q k^T)``
  path of timm's attention), the blocked keys set to ``-inf`` before it;
* ``megatron-mask``: Megatron-core's ``attention_mask [b,1,s,s]`` (True = masked) also masks them.

The output at the kept positions must equal the wrapped layer's; the dropped positions must equal
the input. Nothing of the library's gather/scatter code is used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from random_ltd_cli import ConversionError, InputError, convert_to_random_ltd, random_ltd_layers

from .zoo import BY_NAME, Case, R

ATOL, RTOL = 2e-5, 1e-4


@contextlib.contextmanager
def restricted_sdpa(kept: torch.Tensor, counter: list[int]) -> Iterator[None]:
    """Within the context, SDPA on ``S x S`` attention also blocks the keys not in ``kept [B,S]``."""
    original = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: Any = None, **kw: Any) -> torch.Tensor:
        b, s = kept.shape
        assert q.shape[0] == b and q.shape[-2] == s and k.shape[-2] == s, (
            f"SDPA on {tuple(q.shape)} x {tuple(k.shape)}: not the full-length self-attention of {b} x {s}")
        ok = kept[:, None, None, :] | torch.eye(s, dtype=torch.bool)[None, None]  # [B,1,S,S]
        if is_causal:
            ok = ok & torch.ones(s, s, dtype=torch.bool).tril()
        if attn_mask is None:
            mask: torch.Tensor = ok
        elif attn_mask.dtype == torch.bool:
            mask = attn_mask & ok
        else:
            mask = attn_mask.masked_fill(~ok, float("-inf"))
        counter[0] += 1
        return original(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=False, scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def restricted_softmax(kept: torch.Tensor, counter: list[int]) -> Iterator[None]:
    """Within the context, a softmax over the last axis of ``[B, ..., S, S]`` scores (the eager
    ``softmax(q k^T)`` pattern, timm's ``fused_attn=False``) also blocks the keys not in ``kept [B,S]``."""
    originals = (torch.Tensor.softmax, F.softmax, torch.softmax)

    def restrict(x: torch.Tensor, dim: Any) -> torch.Tensor:
        b, s = kept.shape
        if dim in (-1, x.dim() - 1) and x.dim() >= 3 and x.shape[-2:] == (s, s) and x.shape[0] == b:
            ok = kept[:, None, :] | torch.eye(s, dtype=torch.bool)[None]  # [B, S, S]
            counter[0] += 1
            return x.masked_fill(~ok.view(b, *([1] * (x.dim() - 3)), s, s), float("-inf"))
        return x

    def tensor_softmax(x: torch.Tensor, dim: Any = None, *a: Any, **kw: Any) -> torch.Tensor:
        return originals[0](restrict(x, dim), dim, *a, **kw)

    def f_softmax(x: torch.Tensor, dim: Any = None, *a: Any, **kw: Any) -> torch.Tensor:
        return originals[1](restrict(x, dim), dim, *a, **kw)

    def torch_softmax(x: torch.Tensor, dim: Any = None, *a: Any, **kw: Any) -> torch.Tensor:
        return originals[2](restrict(x, dim), dim, *a, **kw)

    torch.Tensor.softmax, F.softmax, torch.softmax = tensor_softmax, f_softmax, torch_softmax  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.softmax, F.softmax, torch.softmax = originals  # type: ignore[method-assign,assignment]


@dataclass
class Call:
    """One call of a wrapped layer: its full-length arguments, its output and the kept indices it drew."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any = None
    draws: int = 0
    idx: torch.Tensor | None = None


class Recording:
    """Wraps a layer's sampler and keeps every index tensor it returns."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        idx = self.inner(*args, **kwargs)
        self.calls.append(idx)
        return idx


def capture(model: nn.Module) -> list[tuple[str, Any, list[Call], Recording]]:
    """Record every call of every wrapped layer (full-length arguments) and the indices it drew."""
    records = []
    for name, wrapper in random_ltd_layers(model):
        calls: list[Call] = []
        rec = Recording(wrapper.sampler)
        wrapper.sampler = rec

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _calls: list[Call] = calls,
                _rec: Recording = rec) -> None:
            _calls.append(Call(args, dict(kwargs), draws=len(_rec.calls)))

        def post(_m: nn.Module, _a: Any, _k: Any, out: Any, _calls: list[Call] = calls,
                 _rec: Recording = rec) -> None:
            call = next(c for c in reversed(_calls) if c.out is None)
            call.out = out
            if len(_rec.calls) > call.draws:
                call.idx = _rec.calls[-1]

        wrapper.register_forward_pre_hook(pre, with_kwargs=True)
        wrapper.register_forward_hook(post, with_kwargs=True)
        records.append((name, wrapper, calls, rec))
    return records


def stack_of(model: nn.Module) -> tuple[str, str, list[str]]:
    """(container, layer class, wrapped layer names) of a converted model."""
    layers = random_ltd_layers(model)
    names = [n for n, _ in layers]
    parents = sorted({n.rpartition(".")[0] for n in names})
    return ", ".join(parents), ", ".join(sorted({type(w.random_ltd_layer).__name__ for _, w in layers})), names


def seq_aligned(call: Call, size: int) -> list[str]:
    """Names of the tensor arguments besides the first (the hidden states) with an axis of length ``size``."""
    params = [*(f"#{i}" for i in range(len(call.args))), *call.kwargs]
    values = [*call.args, *call.kwargs.values()]
    out = []
    for n, v in list(zip(params, values, strict=True))[1:]:
        items = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(t, torch.Tensor) and size in tuple(t.shape) for t in items):
            out.append(n)
    return out


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden(case: Case, call: Call) -> torch.Tensor:
    hidden = call.args[0] if call.args else next(iter(call.kwargs.values()))
    assert isinstance(hidden, torch.Tensor) and hidden.dim() == 3, f"hidden states {type(hidden)}"
    return hidden if case.batch_first else hidden.transpose(0, 1)  # [B, S, H]


def reference(case: Case, layer: nn.Module, call: Call, kept: torch.Tensor) -> torch.Tensor:
    """The unwrapped layer on all tokens, keys restricted to ``kept``; its output as ``[B, S, H]``."""
    args, kwargs = list(call.args), dict(call.kwargs)
    if case.kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        mask = kwargs.get("attention_masks", args[1] if len(args) > 1 else None)
        original, (b, s) = mask.mask_mod, kept.shape

        def restricted(bi: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return original(bi, h, q, kv) & (kept[bi, kv] | (q == kv))

        full = create_block_mask(restricted, b, None, s, s, device=kept.device)
        if "attention_masks" in kwargs:
            kwargs["attention_masks"] = full
        else:
            args[1] = full
        out = _first(layer(*args, **kwargs))
        return out
    if case.kernel == "megatron-mask":
        mask = kwargs["attention_mask"]
        s = kept.shape[1]
        blocked = ~(kept[:, None, :] | torch.eye(s, dtype=torch.bool)[None])  # [B, Sq, Sk]
        kwargs["attention_mask"] = mask | blocked[:, None]
        out = _first(layer(*args, **kwargs))
    else:
        counter = [0]
        restricted = restricted_softmax if case.kernel == "softmax" else restricted_sdpa
        with restricted(kept, counter):
            out = _first(layer(*args, **kwargs))
        assert counter[0] > 0, f"{type(layer).__name__} did not call {case.kernel}: the reference restricted nothing"
    return out if case.batch_first else out.transpose(0, 1)


@dataclass
class Outcome:
    stack: str = ""
    layer_class: str = ""
    wrapped: list[str] = field(default_factory=list)
    max_diff: float = 0.0
    seq_args: list[str] = field(default_factory=list)
    shared_indices: bool = False


def check_exact(case: Case, model: nn.Module) -> Outcome:
    """Every wrapped layer's every dropping call equals the reference, on every batch of the case."""
    outcome = Outcome()
    outcome.stack, outcome.layer_class, outcome.wrapped = stack_of(model)
    records = capture(model)
    model.train()
    for batch in case.batches():
        for _, _, calls, rec in records:
            calls.clear()
            rec.calls.clear()
        torch.manual_seed(0)
        with torch.no_grad():
            model(**batch)
        for name, wrapper, calls, _ in records:
            dropping = [c for c in calls if c.idx is not None]
            assert dropping, f"{name} dropped no tokens"
            for call in dropping:
                _compare(case, name, wrapper.random_ltd_layer, call, outcome)
    return outcome


def _compare(case: Case, name: str, inner: nn.Module, call: Call, outcome: Outcome) -> None:
    assert call.idx is not None
    hidden = _hidden(case, call)
    b, s, _ = hidden.shape
    outcome.shared_indices |= call.idx.shape[0] == 1
    idx = call.idx.expand(b, R)
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
    with torch.no_grad():
        ref = reference(case, inner, call, kept)
    got = _first(call.out)
    got = got if case.batch_first else got.transpose(0, 1)
    assert got.shape == hidden.shape, f"{name}: output {tuple(got.shape)} != input {tuple(hidden.shape)}"
    assert torch.equal(got[~kept], hidden[~kept]), f"{name}: dropped tokens changed"
    outcome.max_diff = max(outcome.max_diff, float((got[kept] - ref[kept]).abs().max()))
    torch.testing.assert_close(got[kept], ref[kept], atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{name}: kept tokens differ from the reference: {m}")
    names = _names(inner, call)
    outcome.seq_args += [names.get(a, a) for a in seq_aligned(call, s) if names.get(a, a) not in outcome.seq_args]


def _names(inner: nn.Module, call: Call) -> dict[str, str]:
    """Positional slots ``#i`` of a call by parameter name."""
    import inspect

    try:
        params = [p.name for p in inspect.signature(inner.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return {f"#{i}": params[i] for i in range(min(len(call.args), len(params)))}


def check_training_step(case: Case) -> float:
    """One training step of the converted model: finite loss and gradients, every wrapped layer dropped."""
    with case.setup():
        model = convert_to_random_ltd(case.build(), reserved_length=R).train()
        records = capture(model)
        torch.manual_seed(0)
        loss = _first(model(**case.batches()[0])).float().pow(2).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), "no or non-finite gradients"
        for name, _, calls, _ in records:
            assert any(c.idx is not None for c in calls), f"{name} did not drop tokens"
        return float(loss.detach())


def check_eval_identical(case: Case) -> None:
    """In eval mode the converted model equals the unconverted one bitwise."""
    with case.setup():
        plain = case.build().eval()
        model = convert_to_random_ltd(case.build(), reserved_length=R).eval()
        batch = case.batches()[0]
        with torch.no_grad():
            assert torch.equal(_first(plain(**batch)), _first(model(**batch))), "eval outputs differ"


def snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})


@dataclass
class Result:
    status: str  # "exact", "refused" or "FAIL"
    detail: str = ""
    outcome: Outcome | None = None


@functools.cache
def result(name: str) -> Result:
    """Convert the case's model with default arguments and classify it (cached for the tests and the page)."""
    case = BY_NAME[name]
    with case.setup():
        model = case.build()
        before = snapshot(model)
        try:
            # verify="off": this sweep judges by its own reference (the built-in verifier runs in the
            # training-step check and must never be the only judge of itself)
            convert_to_random_ltd(model, reserved_length=R, verify="off")
        except (ConversionError, InputError) as exc:
            after = snapshot(model)
            untouched = before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
            return Result("refused" if untouched else "FAIL", str(exc))
        except Exception as exc:
            return Result("FAIL", f"conversion raised {type(exc).__name__}: {_line(exc)}")
        try:
            outcome = check_exact(case, model)
        except AssertionError as exc:
            return Result("FAIL", _line(exc))
        except Exception as exc:
            return Result("FAIL", f"{type(exc).__name__}: {_line(exc)}")
        return Result("exact", f"max abs diff {outcome.max_diff:.1e}", outcome)


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
