"""Gather and scatter of hidden states, attention masks and positions by kept indices.

All functions take ``idx``: an ``int64`` tensor ``[B, r]`` of sorted kept positions
(see :mod:`random_ltd_cli.sampling`). Gathers copy; nothing here modifies its inputs.
Gradients are exact: a gathered row's gradient flows back to its source row, and
:func:`scatter_tokens` passes the incoming gradient of dropped rows through unchanged
while kept rows get the gradient of the layer output.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError

__all__ = [
    "TokenRoute",
    "flat_index",
    "gather_mask",
    "gather_position_embeddings",
    "gather_position_ids",
    "gather_tokens",
    "scatter_tokens",
]


def flat_index(idx: torch.Tensor, seq_len: int, batch_first: bool) -> torch.Tensor:
    """Row numbers of the kept tokens in the hidden states viewed as ``[B*S, H]`` (or ``[S*B, H]``).

    Batch-first rows are ordered ``(b, j)``; sequence-first rows ``(j, b)``, matching the
    ``[B, r, H]`` and ``[r, B, H]`` layouts of the gathered tokens.
    """
    batch = idx.shape[0]
    ar = torch.arange(batch, device=idx.device)
    if batch_first:
        return (idx + (ar * seq_len)[:, None]).reshape(-1)  # (B*r,)
    return (idx.t() * batch + ar[None, :]).reshape(-1)  # (r*B,)


def gather_tokens(hidden: torch.Tensor, flat: torch.Tensor, keep: int, batch_first: bool) -> torch.Tensor:
    """``[B,S,H] -> [B,r,H]`` (or ``[S,B,H] -> [r,B,H]``) at the rows ``flat`` from :func:`flat_index`."""
    b_or_s, s_or_b = hidden.shape[0], hidden.shape[1]
    rows = hidden.reshape(b_or_s * s_or_b, *hidden.shape[2:]).index_select(0, flat)
    if batch_first:
        return rows.view(b_or_s, keep, *hidden.shape[2:])
    return rows.view(keep, s_or_b, *hidden.shape[2:])


def scatter_tokens(hidden: torch.Tensor, kept_out: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """A copy of ``hidden`` whose kept rows (``flat``) are replaced by ``kept_out``.

    ``hidden``: the layer input ``[B,S,H]`` / ``[S,B,H]``; ``kept_out``: the layer output on the
    kept tokens ``[B,r,H]`` / ``[r,B,H]``. If the layer changed the dtype (autocast), the
    dropped tokens are cast to the output dtype, as the layer's own output would be.
    """
    _check_kept_output(hidden, kept_out, flat)
    base = hidden if hidden.dtype == kept_out.dtype else hidden.to(kept_out.dtype)
    lead = hidden.shape[0] * hidden.shape[1]
    out = base.reshape(lead, *hidden.shape[2:]).index_copy(0, flat, kept_out.reshape(-1, *hidden.shape[2:]))
    return out.view(hidden.shape)


def _check_kept_output(hidden: torch.Tensor, kept_out: torch.Tensor, flat: torch.Tensor) -> None:
    if kept_out.shape[2:] != hidden.shape[2:] or kept_out.shape[0] * kept_out.shape[1] != flat.numel():
        raise InputError(
            f"the wrapped layer returned hidden states of shape {tuple(kept_out.shape)} for "
            f"{flat.numel()} kept tokens of input {tuple(hidden.shape)}: random-LTD needs a layer whose output "
            "has its input's shape; wrap only layers that keep the sequence length and the hidden size."
        )


class _Link:
    """Carries the merged output's gradient from :class:`_Merge` to :class:`_Split` (same call)."""

    grad_out: torch.Tensor | None = None


class _Split(torch.autograd.Function):
    """Forward: gather the kept rows. Backward: the input's whole gradient in one buffer.

    The gradient of ``hidden`` is the merged output's gradient with the kept rows replaced by
    the gradient that came back through the layer: one copy instead of autograd's
    zero-fill + index-add + index-fill + add of two full-size buffers.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, flat: torch.Tensor, keep: int, batch_first: bool,
                link: _Link) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(flat)
        ctx.link, ctx.shape, ctx.dtype = link, hidden.shape, hidden.dtype
        token = hidden.new_zeros(0)  # ties _Merge to this node so that backward always reaches it
        return gather_tokens(hidden, flat, keep, batch_first), token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_kept: torch.Tensor | None, _grad_token: Any) -> tuple[Any, ...]:
        (flat,) = ctx.saved_tensors
        lead, rest = ctx.shape[0] * ctx.shape[1], ctx.shape[2:]
        grad_out, ctx.link.grad_out = ctx.link.grad_out, None
        if grad_out is None:
            grad = torch.zeros(lead, *rest, dtype=ctx.dtype, device=flat.device)
        else:
            grad = grad_out.reshape(lead, *rest).to(ctx.dtype, copy=True)
        if grad_kept is not None:
            grad.index_copy_(0, flat, grad_kept.reshape(-1, *rest).to(ctx.dtype))
        else:
            grad.index_fill_(0, flat, 0)
        return grad.view(ctx.shape), None, None, None, None


class _Merge(torch.autograd.Function):
    """Forward: a copy of ``hidden`` with the kept rows replaced. Backward: hands the gradient to _Split."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, kept_out: torch.Tensor, token: torch.Tensor, flat: torch.Tensor,
                link: _Link) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(flat)
        ctx.link, ctx.kept_shape, ctx.token_dtype = link, kept_out.shape, token.dtype
        return scatter_tokens(hidden.detach(), kept_out.detach(), flat)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor | None) -> tuple[Any, ...]:
        (flat,) = ctx.saved_tensors
        ctx.link.grad_out = grad_out
        grad_kept = None
        if grad_out is not None:
            rest = grad_out.shape[2:]
            grad_kept = grad_out.reshape(-1, *rest).index_select(0, flat).view(ctx.kept_shape)
        return None, grad_kept, flat.new_zeros(0, dtype=ctx.token_dtype), None, None


class TokenRoute:
    """Gather the kept tokens of one call and merge the layer's output back, with a fused backward.

    ``kept = route.split(hidden)`` then ``out = route.merge(layer_output)``; gradients are the same
    as with :func:`gather_tokens` and :func:`scatter_tokens`, computed with fewer full-size passes.
    Under ``torch.compile`` it uses those two functions directly.
    """

    def __init__(self, hidden: torch.Tensor, flat: torch.Tensor, keep: int, batch_first: bool) -> None:
        self.hidden, self.flat, self.keep, self.batch_first = hidden, flat, keep, batch_first
        self._fused = not torch.compiler.is_compiling() and torch.is_grad_enabled() and hidden.requires_grad
        self._link = _Link()
        self._token: torch.Tensor | None = None

    def split(self) -> torch.Tensor:
        if not self._fused:
            return gather_tokens(self.hidden, self.flat, self.keep, self.batch_first)
        kept, self._token = _Split.apply(self.hidden, self.flat, self.keep, self.batch_first, self._link)
        return kept

    def merge(self, kept_out: torch.Tensor) -> torch.Tensor:
        if not self._fused or not kept_out.requires_grad:
            return scatter_tokens(self.hidden, kept_out, self.flat)
        _check_kept_output(self.hidden, kept_out, self.flat)
        return _Merge.apply(self.hidden, kept_out, self._token, self.flat, self._link)

    def merge_zero(self, kept_out: torch.Tensor) -> torch.Tensor:
        """Zeros with the kept rows replaced by ``kept_out`` (a part whose caller adds the residual itself).
        The dropped rows get no gradient from here (with the fused split: zeros, as no merge hands one on)."""
        _check_kept_output(self.hidden, kept_out, self.flat)
        lead, rest = self.hidden.shape[0] * self.hidden.shape[1], self.hidden.shape[2:]
        zeros = kept_out.new_zeros(lead, *rest)
        return zeros.index_copy(0, self.flat, kept_out.reshape(-1, *rest)).view(self.hidden.shape)


def _expand_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    _check_batch(t, batch, what)
    return t if t.shape[0] == batch else t.expand(batch, *t.shape[1:])


def _check_batch(t: torch.Tensor, batch: int, what: str) -> None:
    if t.shape[0] in (1, batch):
        return
    raise InputError(
        f"{what} has batch size {t.shape[0]} but the hidden states have batch size {batch}; pass a "
        f"{what} with batch size {batch} or 1 (or check the layer's batch_first setting)."
    )


def gather_mask(mask: Any, idx: torch.Tensor, seq_len: int, name: str = "attention_mask") -> Any:
    """Gather an attention mask to the kept tokens, keeping its dtype.

    Supported forms (``B`` may be 1 and is expanded):

    * ``None`` -> ``None`` (a causal mask among sorted kept tokens is still causal);
    * ``[B, S]`` key-padding mask -> ``[B, r]``;
    * ``[B, S, S]`` -> ``[B, r, r]``;
    * ``[B, h, S, S]`` -> ``[B, h, r, r]`` (rows and columns);
    * ``[B, h, 1, S]`` -> ``[B, h, 1, r]`` (last dim only).

    * a flex-attention ``BlockMask`` (self-attention, ``S x S``) -> rebuilt for the kept tokens from its
      ``mask_mod`` at the original positions (``[B, H|1, r, r]``).

    Raises:
        InputError: any other object or shape.
    """
    if mask is None:
        return None
    if _is_block_mask(mask):
        return _rebuild_block_mask(mask, idx, seq_len, name)
    if not isinstance(mask, torch.Tensor):
        raise InputError(
            f"cannot gather {name} of type {type(mask).__name__}: random-LTD gathers tensor masks of shape "
            "[B,S], [B,S,S], [B,h,S,S] or [B,h,1,S]. Use an attention implementation that passes tensor masks "
            "(e.g. attn_implementation='sdpa' or 'eager'), or create the layer with on_unsupported='passthrough' "
            "to run such calls without dropping."
        )
    batch, keep = idx.shape
    if mask.dim() == 2 and mask.shape[1] == seq_len:
        mask = _expand_batch(mask, batch, name)
        return mask.gather(1, idx)
    if mask.dim() in (3, 4) and mask.shape[-1] == seq_len and mask.shape[-2] in (1, seq_len):
        squeeze = mask.dim() == 3
        m = mask.unsqueeze(1) if squeeze else mask
        _check_batch(m, batch, name)
        heads = m.shape[1]
        # rows are queries (keep the kept ones, one row copy each), or a single broadcast row
        m = _gather_query_rows(m, idx, seq_len) if m.shape[2] == seq_len else _expand_batch(m, batch, name)
        m = m.gather(3, idx[:, None, None, :].expand(batch, heads, m.shape[2], keep))
        return m.squeeze(1) if squeeze else m
    raise InputError(
        f"cannot gather {name} of shape {tuple(mask.shape)} for sequence length {seq_len}: expected "
        f"[B,{seq_len}], [B,{seq_len},{seq_len}], [B,h,{seq_len},{seq_len}] or [B,h,1,{seq_len}]. "
        "A key/value cache makes the mask longer than the sequence: train without a cache."
    )


def _is_block_mask(mask: Any) -> bool:
    return type(mask).__name__ == "BlockMask" and hasattr(mask, "mask_mod") and hasattr(mask, "seq_lengths")


def _rebuild_block_mask(mask: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
    """A flex-attention ``BlockMask`` for the kept tokens: its ``mask_mod`` evaluated at the original positions.

    The new mask asks the original ``mask_mod(b, h, q, kv)`` about ``idx[b, q]`` and ``idx[b, kv]``, so
    causal, sliding-window and document masks stay exact; it has one row per sample (``[B, H|1, r, r]``).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if tuple(mask.seq_lengths) != (seq_len, seq_len):
        raise InputError(
            f"cannot rebuild the flex-attention BlockMask {name!r} for sequence length {seq_len}: it was made for "
            f"{tuple(mask.seq_lengths)} (queries, keys); random-LTD rebuilds self-attention masks only."
        )
    original = mask.mask_mod
    heads = int(mask.shape[1])

    def kept_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return original(b, h, idx[b, q], idx[b, kv])

    batch, keep = idx.shape
    return create_block_mask(kept_mod, batch, heads if heads > 1 else None, keep, keep, device=idx.device)


def _gather_query_rows(m: torch.Tensor, idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[1|B, h, S, S] -> [B, h, r, S]``: the kept query rows, read once (no expanded copy of a shared mask)."""
    batch, keep = idx.shape
    src_batch, heads = m.shape[0], m.shape[1]
    b = torch.arange(batch, device=idx.device) if src_batch == batch else torch.zeros(batch, dtype=torch.long,
                                                                                      device=idx.device)
    h = torch.arange(heads, device=idx.device)
    rows = (b[:, None, None] * heads + h[None, :, None]) * seq_len + idx[:, None, :]  # (B, h, r)
    table = m.reshape(src_batch * heads * seq_len, m.shape[3])
    return table.index_select(0, rows.reshape(-1)).view(batch, heads, keep, m.shape[3])


def gather_position_ids(position_ids: Any, idx: torch.Tensor, seq_len: int, name: str = "position_ids") -> Any:
    """``[1|B, S] -> [B, r]``: kept tokens keep their original positions. ``None`` stays ``None``."""
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[1] != seq_len:
        shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise InputError(
            f"cannot gather {name} of shape {shape}: expected a tensor of shape [B,{seq_len}] or [1,{seq_len}]."
        )
    return _expand_batch(position_ids, idx.shape[0], name).gather(1, idx)


def gather_position_embeddings(
    embeddings: Any, idx: torch.Tensor, seq_len: int, name: str = "position_embeddings"
) -> Any:
    """Rotary ``(cos, sin)`` each ``[1|B, S, D] -> [B, r, D]``. ``None`` stays ``None``."""
    if embeddings is None:
        return None
    if isinstance(embeddings, torch.Tensor):
        return _gather_rows(embeddings, idx, seq_len, name)
    if isinstance(embeddings, (tuple, list)):
        return type(embeddings)(_gather_rows(e, idx, seq_len, name) for e in embeddings)
    raise InputError(f"cannot gather {name} of type {type(embeddings).__name__}: expected (cos, sin) tensors.")


def _gather_rows(t: torch.Tensor, idx: torch.Tensor, seq_len: int, name: str) -> torch.Tensor:
    if t.dim() != 3 or t.shape[1] != seq_len:
        raise InputError(
            f"cannot gather {name} of shape {tuple(t.shape)}: expected [B,{seq_len},D] or [1,{seq_len},D]."
        )
    t = _expand_batch(t, idx.shape[0], name)
    return t.gather(1, idx[:, :, None].expand(idx.shape[0], idx.shape[1], t.shape[2]))
