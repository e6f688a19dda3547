"""One verification: the wrapper's computation against the reference, and the likely cause of a mismatch.

The error measure is ``|got - ref| / (rms(ref) + |ref|)``, elementwise over the kept tokens that
the model's own mask does not mask completely (padding queries), maximum over them: relative to
the output's scale for ordinary elements, relative to the element for outliers (massive
activations), so one tolerance per dtype fits layers of any width and magnitude.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .alignment import Alignment, parse_alignment
from .verify import LayerVerdict, run_reference, tolerance_for
from .verify_kernels import Kernels
from .verify_masks import restrict_mask, rows_attending

if TYPE_CHECKING:
    from torch import nn

    from .layer import RandomLayerTokenDrop

__all__ = ["compare_call", "error_of"]

BUILT = "built mask:"  # a method that can prove a layer exact, never accuse it (the mask's convention is a guess)
ALL_PADDING = "every kept token is a padding token in this batch (nothing to compare)"
KERNELS_TEXT = ("no attention kernel (scaled_dot_product_attention, multi_head_attention_forward, flex_attention, "
                "or a softmax over [..., S, S] scores) ran while it processed all {S} tokens")


def compare_call(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any], idx: torch.Tensor,
                 verdict: LayerVerdict) -> None:
    """Fill ``verdict`` for one dropping call (runs inside :func:`random_ltd_cli.verify.isolated`)."""
    from .layer import CACHE_NAMES, _Arguments

    inner = wrapper.random_ltd_layer
    call = _Arguments(wrapper._positional_names, args, kwargs)
    hidden = call.get(wrapper._hidden_name)
    batch, seq = wrapper._shape(hidden)
    idx = idx.expand(batch, -1) if idx.shape[0] == 1 else idx
    keep = int(idx.shape[1])
    verdict.reserved_length, verdict.seq_len = keep, seq
    verdict.tolerance, verdict.dtype = tolerance_for(hidden.dtype, hidden.device)
    ref_call = _Arguments(wrapper._positional_names, args, kwargs)
    for name in CACHE_NAMES:
        if ref_call.get(name) is not None:
            ref_call.set(name, None)
    if ref_call.has("use_cache"):
        ref_call.set("use_cache", False)
    watch = Kernels(keep, batch)
    try:
        with watch:
            got = wrapper._dropped_output(args, kwargs, idx)
    except Exception as exc:
        verdict.own_failure = exc
        if _runs_on_all_tokens(inner, ref_call.args, ref_call.kwargs):  # dropping breaks it: the verifier says so
            verdict.dropping_breaks = True
            return _fail(verdict, f"on the {keep} kept tokens it fails ({type(exc).__name__}: {_line(exc)}), on all "
                                  f"{seq} tokens it runs: it builds something for the full token count (a relative-"
                                  "position table or bias of the grid, a token-mixing MLP, a window layout)")
        # the training call fails the same way, with its own error: the verifier stays out
        return _fail(verdict, f"the wrapped layer failed on the kept tokens: {type(exc).__name__}: {_line(exc)}")
    kept = torch.zeros(batch, seq, dtype=torch.bool, device=idx.device).scatter(1, idx, True)
    allowed = kept[:, None, :] | torch.eye(seq, dtype=torch.bool, device=idx.device)  # dropped rows keep themselves
    try:
        ref, rows, method, why = _reference(wrapper, ref_call, watch, allowed, kept, batch, seq)
    except Exception as exc:
        return _fail(verdict, f"the reference call (the unwrapped {type(inner).__name__} on all {seq} tokens) "
                              f"failed: {type(exc).__name__}: {_line(exc)}")
    verdict.method = method
    if why and not method.startswith(BUILT):
        verdict.status, verdict.cause = "unverifiable", why
        return None
    _judge(wrapper, args, kwargs, idx, hidden, got, ref, kept & rows.to(kept.device), watch, verdict)
    if method.startswith(BUILT) and verdict.status != "exact" and not verdict.cause.startswith("the dropped"):
        verdict.status = "unverifiable"
        verdict.cause = (f"{why}; with a [B,S] padding mask built to hide the dropped tokens its output still "
                         f"differs (max error {verdict.max_error or float('nan'):.3g}), and a built mask may not be in "
                         "the layer's convention, so this is not proof of a mistake")
        verdict.max_error = None
    return None


def _reference(wrapper: RandomLayerTokenDrop, call: Any, watch: Kernels, allowed: torch.Tensor, kept: torch.Tensor,
               batch: int, seq: int) -> tuple[Any, torch.Tensor, str, str]:
    """(output, [B,S] rows to compare, method, why unverifiable or "")."""
    inner = wrapper.random_ltd_layer
    self_calls = [k.q_len == watch.length and k.k_len == watch.length for k in watch.calls]
    kernels = Kernels(seq, batch, allowed, self_calls)
    ref = run_reference(inner, call.args, call.kwargs, kernels)
    if [k.kind for k in kernels.calls] != [k.kind for k in watch.calls]:  # other code paths: decide by shape
        kernels = Kernels(seq, batch, allowed, None)
        ref = run_reference(inner, call.args, call.kwargs, kernels)
    if kernels.unmapped:
        return ref, kept, "", (f"it calls an attention kernel whose batch layout the verifier cannot read "
                               f"({kernels.unmapped[0]})")
    if kernels.restricted:
        watch.reference_own = kernels.own
        rows = kernels.own.any(-1) if kernels.own is not None else torch.ones_like(kept)
        return ref, rows, "+".join(sorted({k.kind for k in kernels.calls if k.restricted})), ""
    names = [*wrapper._mask_names, *(n for n, a in wrapper._alignments.items() if a.kind == "mask")]
    present = [n for n in dict.fromkeys(names) if call.has(n)]
    for name in present:
        mask = call.get(name)
        if not isinstance(mask, torch.Tensor):
            continue
        restricted = restrict_mask(mask, allowed, kept, name)
        if restricted is None:
            continue
        call.set(name, restricted)
        ref = run_reference(inner, call.args, call.kwargs, Kernels(seq, batch))
        return ref, rows_attending(mask, batch, seq, name), f"mask:{name}", ""
    why = KERNELS_TEXT.format(S=seq)
    if present:
        why += f", and its attention mask {present[0]!r} was {type(call.get(present[0])).__name__}"
    else:
        why += ", and it takes no attention mask to restrict the keys through"
    why += " (a state-space, convolutional or MLP-only block?)"
    accepted = [n for n in wrapper._mask_names if n in wrapper._params]
    if accepted and call.get(accepted[0]) is None:  # e.g. flash attention, unpadded: try a [B,S] padding mask
        call.set(accepted[0], kept.long())
        try:
            ref = run_reference(inner, call.args, call.kwargs, Kernels(seq, batch))
        except Exception as exc:
            return ref, kept, "", f"{why}; a [B,S] padding mask built to hide the dropped tokens fails: {_line(exc)}"
        return ref, torch.ones_like(kept), f"{BUILT}{accepted[0]}", why
    return ref, kept, "", why


def _judge(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any], idx: torch.Tensor,
           hidden: torch.Tensor, got: Any, ref: Any, compared: torch.Tensor, watch: Kernels,
           verdict: LayerVerdict) -> None:
    x, g, r = (_bsh(t, wrapper.batch_first) for t in (hidden, _first(got), _first(ref)))
    if g.shape != x.shape or r.shape != x.shape:
        what = "wrapped layer" if g.shape != x.shape else "reference"
        bad = g if g.shape != x.shape else r
        return _fail(verdict, f"the {what}'s output has shape {tuple(bad.shape)}, not the input's {tuple(x.shape)}")
    kept = torch.zeros(x.shape[:2], dtype=torch.bool, device=idx.device).scatter(1, idx, True)
    dropped = ~kept
    gd, xd = g[dropped], x[dropped]
    if wrapper.dropped == "zero":  # a part whose caller adds the residual: its dropped rows are zeros
        xd = torch.zeros_like(gd)
    if not bool(((gd == xd) | (gd.isnan() & xd.isnan())).all()):  # NaN in the input stays NaN
        verdict.status, verdict.max_error = "wrong", error_of(gd, xd)
        verdict.cause = ("the dropped tokens changed: the layer's output is not written back exactly at the kept "
                         "positions (a scatter mistake, or a hook that changes the wrapper's output)")
        return None
    if not bool(compared.any()):
        verdict.status, verdict.cause = "unverifiable", ALL_PADDING
        return None
    if not bool(torch.isfinite(r[compared]).all()):
        return _fail(verdict, "the reference output has non-finite values at kept tokens")
    verdict.max_error = error_of(g[compared], r[compared])
    if verdict.max_error <= (verdict.tolerance or 0.0):
        return None
    verdict.status = "wrong"
    from .verify_cause import diagnose

    verdict.cause = diagnose(wrapper, args, kwargs, idx, g, r, compared, watch, verdict)
    return None


def error_of(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / (rms(ref) + |ref|)`` (0 for empty input; inf where ``got`` is not finite)."""
    if got.numel() == 0:
        return 0.0
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    g, r = got.to(dtype), ref.to(dtype)
    scale = r.pow(2).mean().sqrt()
    err = (g - r).abs() / (scale + r.abs() + torch.finfo(dtype).tiny)
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    return float(err.max())


def output_of(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any],
              idx: torch.Tensor) -> torch.Tensor:
    """The wrapper's (``[B,S,H]``) output for ``idx``, for the diagnosis runs."""
    with Kernels(int(idx.shape[1]), int(idx.shape[0])):
        return _bsh(_first(wrapper._dropped_output(args, kwargs, idx)), wrapper.batch_first)


@contextlib.contextmanager
def aligned_as(wrapper: RandomLayerTokenDrop, name: str, alignment: Alignment) -> Iterator[None]:
    """The wrapper with ``name`` gathered by ``alignment`` for the duration."""
    table = wrapper._alignments
    had, old = name in table, table.get(name)
    table[name] = alignment
    try:
        yield
    finally:
        if had:
            table[name] = old  # type: ignore[assignment]
        else:
            del table[name]


def axes_text(value: Any, batch: int, seq: int) -> str | None:
    """An alignment pattern for a tensor (or the first tensor of a tuple) with ``S``-long axes: ``"b h q k"``..."""
    t = value if isinstance(value, torch.Tensor) else next(
        (v for v in value if isinstance(v, torch.Tensor)), None) if isinstance(value, (tuple, list)) else None
    if t is None or seq not in t.shape:
        return None
    axes = []
    seq_axes = [i for i, d in enumerate(t.shape) if d == seq]
    for i, d in enumerate(t.shape):
        if i == 0 and d in (1, batch) and i not in seq_axes[-2:]:
            axes.append("b")
        elif i in seq_axes[-2:]:
            axes.append("s" if len(seq_axes) == 1 else ("q" if i == seq_axes[-2] else "k"))
        else:
            axes.append("_")
    return " ".join(axes) if "b" in axes else None


def parse_axes(text: str, name: str) -> Alignment:
    return parse_alignment(text, name)


def _bsh(t: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return t if batch_first else t.transpose(0, 1)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _runs_on_all_tokens(inner: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Does the unwrapped layer run on the call's own (all-token) arguments (no cache)?"""
    from .recorders import call_unrecorded

    try:
        call_unrecorded(inner, list(args), dict(kwargs))
    except Exception:
        return False
    return True


def _fail(verdict: LayerVerdict, reason: str) -> None:
    verdict.status, verdict.cause = "error", reason


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
