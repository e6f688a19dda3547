"""The likely cause of a mismatch, found by re-running the wrapped call under hypotheses.

In order (the first that explains the wrapper's result wins):

1. an argument with a sequence axis that reached the layer whole: gathering it at the kept
   positions would give the reference -> "argument X is not gathered" (with the ``seq_args``
   declaration that fixes it);
2. a gathered argument that behaves as if it held the values of positions ``0..r-1`` (and that
   matters: other positions change the result) -> positions / mask / bias of the first ``r``
   tokens instead of the kept ones;
3. the attention pattern the layer used on the kept tokens differs from its pattern at their
   positions: with a window or blocks in the layer's own mask -> "a window or block counted in
   kept tokens", else a mask built from the length of its input;
4. the patterns agree and no argument that carries positions changes the result -> "positions
   derived from the length of its input" (rotary/ALiBi/relative positions ``0..r-1`` for what it gets);
5. otherwise "unknown".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .alignment import Alignment
from .verify import LayerVerdict
from .verify_compare import aligned_as, axes_text, error_of, output_of, parse_axes
from .verify_kernels import Kernels

if TYPE_CHECKING:
    from .layer import RandomLayerTokenDrop

__all__ = ["diagnose"]

SKIP = ("use_cache", "past_key_value", "past_key_values", "cache", "layer_past")


class _Reindexed(Alignment):
    """An argument's own alignment, but gathered at other indices (a hypothesis)."""

    def __init__(self, inner: Alignment, idx: torch.Tensor) -> None:
        super().__init__(inner.kind, inner.text, inner.patterns)
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_idx", idx)

    def gather(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        return self._inner.gather(value, self._idx, seq_len, name)  # type: ignore[attr-defined]


def diagnose(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any], idx: torch.Tensor,
             got: torch.Tensor, ref: torch.Tensor, compared: torch.Tensor, watch: Kernels,
             verdict: LayerVerdict) -> str:
    """The likely cause of ``got != ref`` at the ``compared [B,S]`` tokens, in words."""
    tol = verdict.tolerance or 0.0
    relevant = _position_arguments(wrapper, args, kwargs, idx.shape[0], int(compared.shape[1]))
    try:
        found, relevant = _arguments(wrapper, args, kwargs, idx, got, ref, compared, tol)
        if found:
            return found
        found = _pattern(watch, idx, compared)
        if found:
            return found
    except Exception:  # a hypothesis that cannot even run explains nothing
        pass
    if not relevant:  # no position argument that matters reaches the layer
        return ("positions derived from the length of its input: the layer computes positions (rotary, ALiBi, a "
                "relative bias) for the r tokens it receives, 0..r-1, instead of their own")
    return "unknown (no argument, mask or position pattern explains the difference)"


def _named(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    named = dict(zip(wrapper._positional_names, args, strict=False))
    named.update(kwargs)
    named.pop(wrapper._hidden_name, None)
    return {n: v for n, v in named.items() if n not in SKIP}


def _sequence_args(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int,
                   seq: int) -> list[tuple[str, Any, str | None]]:
    out = []
    for name, value in _named(wrapper, args, kwargs).items():
        text = axes_text(value, batch, seq)
        tensors = [value] if isinstance(value, torch.Tensor) else (
            [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else [])
        if any(seq in t.shape for t in tensors):
            out.append((name, value, text))
    return out


def _arguments(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any], idx: torch.Tensor,
               got: torch.Tensor, ref: torch.Tensor, compared: torch.Tensor, tol: float) -> tuple[str, list[str]]:
    """(cause or "", the gathered non-mask arguments that change the result)."""
    batch, seq = compared.shape
    keep = int(idx.shape[1])
    first = torch.arange(keep, device=idx.device).expand(batch, keep)
    last = torch.arange(seq - keep, seq, device=idx.device).expand(batch, keep)
    relevant: list[str] = []
    for name, _, text in _sequence_args(wrapper, args, kwargs, batch, seq):
        align = wrapper._alignments.get(name)
        if align is None or not align.aligned:
            if text is None:
                continue
            with aligned_as(wrapper, name, parse_axes(text, name)):
                fixed = output_of(wrapper, args, kwargs, idx)
            if error_of(fixed[compared], ref[compared]) <= tol:
                return (f"argument {name!r} is not gathered: it has the sequence length {seq} on an axis but reaches "
                        f"the layer whole; gathered at the kept tokens it gives the reference (declare it: "
                        f"seq_args={{{name!r}: {text!r}}})"), relevant
            continue
        with aligned_as(wrapper, name, _Reindexed(align, last)):
            as_last = output_of(wrapper, args, kwargs, idx)
        if error_of(as_last[compared], got[compared]) <= tol:
            continue  # the argument does not change the result here
        if align.kind != "mask":
            relevant.append(name)
        with aligned_as(wrapper, name, _Reindexed(align, first)):
            as_first = output_of(wrapper, args, kwargs, idx)
        if error_of(as_first[compared], got[compared]) > tol:
            continue
        if align.kind in ("position_ids", "rotary"):
            return (f"positions 0..r-1: the kept tokens get the positions of the first r tokens instead of their own "
                    f"(argument {name!r} is not gathered at the kept positions)"), relevant
        if align.kind == "mask":
            return (f"the attention mask {name!r} is the one of the first r tokens, not of the kept ones (a mask "
                    "not gathered at the kept positions)"), relevant
        return (f"argument {name!r} holds the values of the first r tokens, not of the kept ones (a relative bias or "
                "position table not gathered at the kept positions)"), relevant
    return "", relevant


def _pattern(watch: Kernels, idx: torch.Tensor, compared: torch.Tensor) -> str:
    own_g, own_ref = watch.own, watch.reference_own
    if own_g is None or own_ref is None:
        return ""
    batch, keep = idx.shape
    seq = own_ref.shape[-1]
    at_kept = own_ref.gather(1, idx[:, :, None].expand(batch, keep, seq).to(own_ref.device))
    at_kept = at_kept.gather(2, idx[:, None, :].expand(batch, keep, keep).to(own_ref.device))
    rows = compared.gather(1, idx).to(own_g.device)
    if bool((own_g.to(at_kept.device) == at_kept)[rows].all()):
        return ""
    if _windowed(own_ref):
        return ("a window or block counted in kept tokens: the layer lays its attention window (or blocks) over the "
                "r tokens it receives, not over their positions")
    return ("a mask built from the length of its input: the attention pattern the layer uses on the kept tokens "
            "is not its pattern at their positions")


def _windowed(own: torch.Tensor) -> bool:
    """Whether the model's own ``[B,S,S]`` pattern masks an earlier real key of a real query (a window)."""
    real = own.diagonal(dim1=-2, dim2=-1)
    seq = own.shape[-1]
    lower = torch.ones(seq, seq, dtype=torch.bool, device=own.device).tril(-1)
    return bool((~own & lower & real[:, :, None] & real[:, None, :]).any())


def _position_arguments(wrapper: RandomLayerTokenDrop, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int,
                        seq: int) -> list[str]:
    """Sequence-aligned arguments other than masks (positions, biases)."""
    out = []
    for name, _, _ in _sequence_args(wrapper, args, kwargs, batch, seq):
        align = wrapper._alignments.get(name)
        if align is None or align.kind != "mask":
            out.append(name)
    return out
