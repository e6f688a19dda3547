"""The verifier's view of the attention kernels a layer calls (see :mod:`random_ltd_cli.verify`).

:class:`Kernels` is a ``TorchFunctionMode``: while a layer runs under it, every call of

* ``torch.nn.functional.scaled_dot_product_attention`` (``"sdpa"``),
* ``torch.nn.functional.multi_head_attention_forward`` (``"mha"``, what ``nn.MultiheadAttention``
  and ``nn.Transformer*Layer`` call),
* ``torch.nn.attention.flex_attention.flex_attention`` (``"flex"``; its operator, which it calls
  directly while the mode is active; ``torch.compile``'d functions run eagerly under the mode),
* ``softmax`` over the last axis of a ``[..., L, L]`` tensor (``F.softmax``, ``torch.softmax``,
  ``Tensor.softmax``, ``nn.Softmax``: the eager pattern, ``"softmax"``)

is recorded with its query and key lengths and the model's own "may attend" pattern. With a
restriction (``allowed [B, S, S]``), the self-attention calls among them are run with the keys
each query may see narrowed to ``allowed``: composed into the kernel's mask (sdpa, mha), its
``score_mod`` (flex) or written into the scores before the softmax. Dropout functions become the
identity under the mode, so both verification runs are deterministic.

Which calls are self-attention is decided by the run on the kept tokens: a kernel whose key
length shrank to ``r`` there reads its keys from the dropped sequence; one whose key length did
not change (an encoder output of any length, even ``S``) is cross-attention and is left alone.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Kernel", "Kernels", "lead_rows"]


@dataclass
class Kernel:
    """One attention kernel call: kind, query and key lengths, and the model's own pattern."""

    kind: str
    q_len: int
    k_len: int
    own: torch.Tensor | None = None  # [B, L, L] bool: may attend, by the model's own mask (self-attention only)
    restricted: bool = False


def lead_rows(allowed: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor | None:
    """``allowed [B, L, K]`` laid out for a kernel whose leading axes are ``lead`` (batch-major: ``B``, ``B*h``,
    ``(B, h)``...); ``None`` when the leading axes do not start with the batch."""
    b = allowed.shape[0]
    n = 1
    for d in lead:
        n *= int(d)
    if n == 0:
        return None
    if n % b == 0:
        rows = allowed.repeat_interleave(n // b, dim=0) if n != b else allowed
    elif bool((allowed == allowed[:1]).all()):  # one pattern for every sample: any layout works
        rows = allowed[:1].expand(n, *allowed.shape[1:])
    else:
        return None
    return rows.reshape(*lead, *allowed.shape[1:])


def _batch_pattern(ok: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``[..., L, L]`` bool -> ``[B, L, L]`` (a pair is allowed when every head allows it)."""
    length = ok.shape[-1]
    flat = ok.reshape(-1, ok.shape[-2], length)
    n = flat.shape[0]
    if n == 1:
        return flat.expand(batch, -1, -1)
    if n % batch != 0:
        return None
    return flat.view(batch, n // batch, ok.shape[-2], length).all(1)


def _allowed_by_mask(mask: torch.Tensor | None, block: bool) -> torch.Tensor | None:
    """A kernel mask as bool "may attend" (``block``: bool masks hold True where attention is blocked)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask if block else mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min / 2
    return mask != 0


class Kernels(TorchFunctionMode):
    """Record (and, with ``allowed``, restrict) the attention kernels a layer calls.

    Args:
        length: the sequence length the layer sees (``S`` for the reference, ``r`` on the kept tokens).
        batch: ``B``.
        allowed: ``[B, S, S]`` bool, which keys each query may see; ``None`` only records.
        self_calls: for the reference run, which kernel calls (by order) are self-attention, as read
            from the run on the kept tokens; ``None`` decides by shape (query and key length ``S``).
    """

    def __init__(self, length: int, batch: int, allowed: torch.Tensor | None = None,
                 self_calls: list[bool] | None = None) -> None:
        super().__init__()
        self.length, self.batch, self.allowed, self.self_calls = length, batch, allowed, self_calls
        self.calls: list[Kernel] = []
        self.unmapped: list[str] = []  # self-attention kernels whose batch layout could not be read
        self.reference_own: torch.Tensor | None = None  # set on the kept-token run: the reference's own pattern

    def __enter__(self) -> Kernels:
        # flex_attention outside torch.compile normally compiles its operator call (eager backend), which
        # hides it from this mode; its debug switch runs the very same unfused operator directly.
        flex = sys.modules.get("torch.nn.attention.flex_attention")
        self._flex_flag = getattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", None)
        if flex is not None and self._flex_flag is not None:
            flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True  # type: ignore[attr-defined]
        # a layer may call a torch.compile'd kernel (torchtitan compiles flex_attention): run it eagerly, so
        # that this mode sees the operator and the restricted call does not need a kernel of its own
        self._stance = torch.compiler.set_stance("force_eager")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._stance.__exit__(None, None, None)  # the stance before __enter__
        flex = sys.modules.get("torch.nn.attention.flex_attention")
        if flex is not None and self._flex_flag is not None:
            flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = self._flex_flag  # type: ignore[attr-defined]

    @property
    def restricted(self) -> int:
        return sum(k.restricted for k in self.calls)

    @property
    def own(self) -> torch.Tensor | None:
        """The model's own pattern of the first self-attention kernel, ``[B, L, L]`` bool."""
        return next((k.own for k in self.calls if k.own is not None), None)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _handlers().get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, func, args, kwargs)

    # -- bookkeeping --------------------------------------------------------------------------

    def _is_self(self, kernel: Kernel) -> bool:
        """Whether this call is self-attention over the layer's tokens (and gets restricted)."""
        square = kernel.q_len == self.length and kernel.k_len == self.length
        if self.self_calls is None or len(self.calls) >= len(self.self_calls):
            return square
        return square and self.self_calls[len(self.calls)]

    def _record(self, kernel: Kernel, own: Callable[[], torch.Tensor | None]) -> bool:
        """Record the call; returns whether to restrict it."""
        selfish = self._is_self(kernel)
        if selfish and not any(k.own is not None for k in self.calls):
            try:
                kernel.own = own()
            except Exception:  # the pattern is for diagnosis only
                kernel.own = None
        self.calls.append(kernel)
        return selfish and self.allowed is not None

    def _rows(self, lead: tuple[int, ...], kind: str) -> torch.Tensor | None:
        assert self.allowed is not None
        rows = lead_rows(self.allowed, lead)
        if rows is None:
            self.unmapped.append(f"{kind} with leading axes {lead} (batch {self.batch})")
        return rows


# -- handlers -------------------------------------------------------------------------------------


def _softmax(mode: Kernels, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or dim is None or int(dim) % x.dim() != x.dim() - 1:
        return func(*args, **kwargs)
    if x.shape[-1] != x.shape[-2]:  # not square: cross-attention (or no attention) is left alone
        mode.calls.append(Kernel("softmax", int(x.shape[-2]), int(x.shape[-1])))
        return func(*args, **kwargs)
    kernel = Kernel("softmax", int(x.shape[-2]), int(x.shape[-1]))
    if mode._record(kernel, lambda: _batch_pattern(_allowed_by_mask(x, False), mode.batch)):  # type: ignore[arg-type]
        rows = mode._rows(tuple(x.shape[:-2]), "softmax")
        if rows is not None:
            x = x.masked_fill(~rows.to(x.device), torch.finfo(x.dtype).min)
            kernel.restricted = True
            args = (x, *args[1:]) if args else args
            if not args:
                kwargs = dict(kwargs, input=x)
    return func(*args, **kwargs)


def _sdpa(mode: Kernels, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bound = _bind(func, args, kwargs)
    q, k = bound["query"], bound["key"]
    bound["dropout_p"] = 0.0
    kernel = Kernel("sdpa", int(q.shape[-2]), int(k.shape[-2]))
    mask, causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))

    def own() -> torch.Tensor | None:
        ok = _allowed_by_mask(mask, False)
        ok = torch.ones(1, kernel.q_len, kernel.k_len, dtype=torch.bool, device=q.device) if ok is None else ok
        if causal:
            ok = ok & torch.ones(kernel.q_len, kernel.k_len, dtype=torch.bool, device=q.device).tril()
        return _batch_pattern(ok, mode.batch)

    if mode._record(kernel, own):
        rows = mode._rows(tuple(q.shape[:-2]), "sdpa")
        if rows is not None:
            allowed = rows.to(q.device)
            if causal:
                allowed = allowed & torch.ones(kernel.q_len, kernel.k_len, dtype=torch.bool, device=q.device).tril()
            bound["attn_mask"] = _compose(mask, allowed, block=False)
            bound["is_causal"] = False
            kernel.restricted = True
    return func(**bound)


def _mha(mode: Kernels, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bound = _bind(func, args, kwargs)
    q, k = bound["query"], bound["key"]
    kernel = Kernel("mha", int(q.shape[0]), int(k.shape[0]))
    if q.dim() != 3:  # unbatched [L, E]: leave alone (a layer's tokens always come batched here)
        mode.calls.append(kernel)
        return func(**bound)
    heads, batch = int(bound["num_heads"]), int(q.shape[1])
    mask, pad = bound.get("attn_mask"), bound.get("key_padding_mask")

    def own() -> torch.Tensor | None:
        ok = _allowed_by_mask(mask, True)
        ok = torch.ones(1, kernel.q_len, kernel.k_len, dtype=torch.bool, device=q.device) if ok is None else ok
        pattern = _batch_pattern(ok, batch)
        keys = _allowed_by_mask(pad, True)
        return pattern if keys is None or pattern is None else pattern & keys[:, None, :]

    if mode._record(kernel, own):
        rows = mode._rows((batch,), "mha")
        if rows is not None:
            allowed = rows.to(q.device).repeat_interleave(heads, dim=0)  # [B*heads, L, L], batch-major
            bound["attn_mask"] = _compose(mask, allowed, block=True)
            bound["is_causal"] = False  # the causal pattern is in attn_mask (is_causal is only a hint there)
            kernel.restricted = True
    return func(**bound)


def _flex(mode: Kernels, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The flex-attention operator: ``(query, key, value, score_mod, block_mask tuple, scale, options, ...)``."""
    q, k = args[0], args[1]
    kernel = Kernel("flex", int(q.shape[-2]), int(k.shape[-2]))
    score_mod, block = args[3], args[4]

    def own() -> torch.Tensor | None:
        from torch.nn.attention.flex_attention import create_mask

        mask_mod = block[-1] if isinstance(block, tuple) and block and callable(block[-1]) else None
        if mask_mod is None:
            return torch.ones(mode.batch, kernel.q_len, kernel.k_len, dtype=torch.bool, device=q.device)
        m = create_mask(mask_mod, int(q.shape[0]), 1, kernel.q_len, kernel.k_len, device=q.device)
        return _batch_pattern(m, mode.batch)

    if mode._record(kernel, own):
        rows = mode._rows((int(q.shape[0]),), "flex")
        if rows is not None:
            allowed = rows.to(q.device)
            low = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)

            def restricted(score: torch.Tensor, b: Any, h: Any, qi: Any, kv: Any, *extra: Any) -> torch.Tensor:
                s = score if score_mod is None else score_mod(score, b, h, qi, kv, *extra)
                return torch.where(allowed[b, qi, kv], s, low)

            args = (*args[:3], restricted, *args[4:])
            kernel.restricted = True
    return func(*args, **kwargs)


def _dropout(mode: Kernels, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs["input"]  # both verification runs are deterministic


def _compose(mask: torch.Tensor | None, allowed: torch.Tensor, *, block: bool) -> torch.Tensor:
    """The kernel's own mask with the pairs outside ``allowed`` masked too, in the kernel's convention
    (``block``: bool masks hold True where attention is blocked)."""
    if mask is None:
        return ~allowed if block else allowed
    shape = torch.broadcast_shapes(mask.shape, allowed.shape)
    if mask.dtype == torch.bool:
        return (mask.expand(shape) | ~allowed) if block else (mask.expand(shape) & allowed)
    return mask.expand(shape).masked_fill(~allowed, torch.finfo(mask.dtype).min)


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _sdpa_signature(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> None:
    """The signature of ``F.scaled_dot_product_attention`` (a builtin without one)."""


def _bind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    sig = _SIGNATURES.get(func)
    if sig is None:
        try:
            sig = inspect.signature(func)
        except ValueError:
            sig = inspect.signature(_sdpa_signature)
        _SIGNATURES[func] = sig
    bound = sig.bind(*args, **kwargs)
    return dict(bound.arguments)


_HANDLERS: dict[Any, Callable[..., Any]] = {}


def _handlers() -> dict[Any, Callable[..., Any]]:
    if _HANDLERS:
        return _HANDLERS
    table: dict[Any, Callable[..., Any]] = {
        F.softmax: _softmax, torch.softmax: _softmax, torch.Tensor.softmax: _softmax,
        F.scaled_dot_product_attention: _sdpa, F.multi_head_attention_forward: _mha,
        F.dropout: _dropout, F.dropout1d: _dropout, F.dropout2d: _dropout, F.dropout3d: _dropout,
        F.alpha_dropout: _dropout, F.feature_alpha_dropout: _dropout, torch.dropout: _dropout,
    }
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_operator
    except ImportError:  # an older torch without flex attention
        pass
    else:
        table[flex_operator] = _flex
    _HANDLERS.update(table)
    return _HANDLERS
