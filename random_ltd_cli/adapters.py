"""Per-family adapters for layers that derive positions or windows from the length they see.

A layer that builds a bias or a window from the number of tokens it is given would, on the
``r`` kept tokens, count kept tokens instead of original positions. Where a small adapter
makes such a layer exact it lives here; where none is natural, :func:`refusal` gives the
reason and :func:`~random_ltd_cli.convert_to_random_ltd` refuses the layer before touching
the model. Families are recognised by structure (attributes and forward parameters), not
by version strings.

========================  ===============================================================
GPT-Neo local attention   the window is a causal buffer indexed by the seen length: the
                          window is folded into the full-length mask (original positions)
                          and the buffer is swapped for a plain causal one during the call.
MPT                       the alibi bias ``[H,1,L]`` has no batch axis and the layer keeps
                          its last columns: all samples of a batch keep the same positions
                          and the bias is gathered at them.
BEiT / Data2Vec-Vision    each layer builds its relative position bias for the full patch
                          grid: the bias is gathered to the kept queries x keys.
T5 family                 the first layer computes the relative bias from the seen length:
                          it is computed for all ``S`` tokens and gathered.
DeBERTa-v2                ``relative_pos [1,S,S]`` is gathered per sample and laid out as
                          ``[1, B*heads, r, r]``, a form its attention reads per row.
DeBERTa (v1)              the relative span comes from the seen length: during the call the
                          span is the one for all ``S`` tokens; ``relative_pos`` is gathered.
UMT5                      every layer computes its relative bias from the seen length: the
                          bias is computed for ``S`` tokens and gathered.
========================  ===============================================================
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .alignment import Alignment, gather_axes, parse_alignment
from .errors import InputError
from .tokens import gather_mask

__all__ = ["LayerAdapter", "find_adapter", "forward_params", "refusal"]


def forward_params(fn: Any) -> dict[str, inspect.Parameter]:
    """The parameters of ``fn`` by name (``{}`` when its signature cannot be read)."""
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


class LayerAdapter:
    """Hooks a family needs around one dropping call. The base class does nothing."""

    #: draw one set of kept positions for the whole batch (for arguments without a batch axis)
    shared_indices = False
    #: :meth:`around` changes something: an activation-checkpoint recompute must run inside it too
    has_context = False
    #: the layout of the family's hidden states when the caller does not say (``None``: the usual rules)
    batch_first: bool | None = None
    #: the first ``k`` tokens are always kept (prefix tokens the layer treats apart, e.g. timm EVA's class token)
    keep_prefix = 0

    def signature(self) -> inspect.Signature | None:
        """The signature that names the arguments of a ``forward(*args, **kwargs)`` (``None``: the forward's own)."""
        return None

    def alignments(self) -> dict[str, Alignment]:
        """Family-specific alignments; they replace the built-ins (the user's ``seq_args`` still win)."""
        return {}

    def prepare(self, call: Any, hidden: torch.Tensor, seq_len: int) -> None:
        """Fill in full-length arguments before they are gathered (``call`` has ``get``/``set``)."""

    @contextlib.contextmanager
    def around(self, idx: torch.Tensor, seq_len: int) -> Iterator[None]:
        """A context around the inner call on the kept tokens."""
        yield


class _CustomAlignment(Alignment):
    def __init__(self, text: str, fn: Any) -> None:
        super().__init__("custom", text)
        object.__setattr__(self, "_fn", fn)

    def gather(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        return None if value is None else self._fn(value, idx, seq_len, name)  # type: ignore[attr-defined]


# -- GPT-Neo local attention ----------------------------------------------------------------


class _LocalWindow(LayerAdapter):
    has_context = True

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        bias: Any = attn.bias
        self.window = int(bias[0, 0, -1].sum())  # the last row of a banded causal buffer has `window` ones
        self._causal: torch.Tensor | None = None

    def prepare(self, call: Any, hidden: torch.Tensor, seq_len: int) -> None:
        mask = call.get("attention_mask")
        pos = torch.arange(seq_len, device=hidden.device)
        dist = pos[:, None] - pos[None, :]  # query - key, original positions
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise InputError(f"GPT-Neo local attention needs a tensor attention_mask, got {type(mask).__name__}.")
        dtype = mask.dtype if mask is not None and mask.dtype.is_floating_point else hidden.dtype
        low = torch.finfo(dtype).min
        if mask is None:
            allowed = (dist >= 0) & (dist < self.window)
            call.set("attention_mask", torch.where(allowed, 0.0, low).to(dtype)[None, None])
        elif mask.dtype == torch.bool:
            call.set("attention_mask", mask & (dist < self.window))
        else:
            call.set("attention_mask", mask + torch.where(dist < self.window, 0.0, low).to(mask.dtype))

    @contextlib.contextmanager
    def around(self, idx: torch.Tensor, seq_len: int) -> Iterator[None]:
        bias: Any = self.attn.bias
        if self._causal is None or self._causal.device != bias.device:
            self._causal = torch.tril(torch.ones_like(bias))
        self.attn._buffers["bias"] = self._causal  # kept tokens are sorted: causal among them is causal
        try:
            yield
        finally:
            self.attn._buffers["bias"] = bias


def _gpt_neo_local(layer: nn.Module) -> LayerAdapter | None:
    attn = getattr(getattr(layer, "attn", None), "attention", None)
    bias = getattr(attn, "bias", None)
    if getattr(attn, "attention_type", None) == "local" and isinstance(bias, torch.Tensor) and bias.dim() == 4:
        return _LocalWindow(attn)  # type: ignore[arg-type]
    return None


# -- MPT alibi ------------------------------------------------------------------------------


def _gather_mpt_bias(value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[-1] < seq_len:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"cannot gather MPT's {name!r} of shape {shape}: expected [heads, 1, L >= {seq_len}].")
    full = value[..., value.shape[-1] - seq_len:]  # the columns the layer would use for all S tokens
    return full.index_select(-1, idx[0])  # the same kept positions for every sample (shared_indices)


class _MptAlibi(LayerAdapter):
    shared_indices = True

    def alignments(self) -> dict[str, Alignment]:
        return {"position_bias": _CustomAlignment("mpt alibi [H,1,L]: key columns", _gather_mpt_bias)}


def _mpt(layer: nn.Module) -> LayerAdapter | None:
    if any(c.__name__ == "MptBlock" for c in type(layer).__mro__):
        return _MptAlibi()
    return None


# -- BEiT relative position bias --------------------------------------------------------------


class _GridBias(LayerAdapter):
    has_context = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @contextlib.contextmanager
    def around(self, idx: torch.Tensor, seq_len: int) -> Iterator[None]:
        def full_size(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            return args, {**kwargs, "dim_size": seq_len}

        def kept(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return gather_mask(out, idx, seq_len, "relative_position_bias")  # [1,H,S,S] -> [B,H,r,r]

        handles = [self.module.register_forward_pre_hook(full_size, with_kwargs=True),
                   self.module.register_forward_hook(kept)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _beit(layer: nn.Module) -> LayerAdapter | None:
    module = getattr(layer, "relative_position_bias", None)
    if not isinstance(module, nn.Module):
        return None
    params = inspect.signature(module.forward).parameters
    if "window_size" in params and "dim_size" in params:
        return _GridBias(module)
    return None


# -- T5 relative bias ---------------------------------------------------------------------------


class _T5Bias(LayerAdapter):
    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.self_attn = layer.layer[0].SelfAttention
        # UMT5 layers take no position_bias: each computes its own from the length it sees
        self.own_bias = "position_bias" not in inspect.signature(layer.forward).parameters
        self.has_context = self.own_bias

    @contextlib.contextmanager
    def around(self, idx: torch.Tensor, seq_len: int) -> Iterator[None]:
        attn = self.self_attn
        if not (self.own_bias and attn.has_relative_attention_bias):
            yield
            return
        compute = attn.compute_bias

        def full_then_kept(query_length: int, key_length: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            kwargs.pop("past_seen_tokens", None)  # training: no cache
            return gather_mask(compute(seq_len, seq_len, *args[:1], **kwargs), idx, seq_len, "position_bias")

        attn.compute_bias = full_then_kept
        try:
            yield
        finally:
            del attn.compute_bias

    def prepare(self, call: Any, hidden: torch.Tensor, seq_len: int) -> None:
        attn = self.self_attn
        if self.own_bias:
            return
        if call.get("position_bias") is None and attn.has_relative_attention_bias:
            call.set("position_bias", attn.compute_bias(seq_len, seq_len, device=hidden.device))
        enc = call.get("encoder_hidden_states")
        if isinstance(enc, torch.Tensor) and call.get("encoder_decoder_position_bias") is None:
            heads = self.layer.layer[1].EncDecAttention.n_heads
            bias = torch.zeros(1, heads, seq_len, enc.shape[1], device=hidden.device, dtype=hidden.dtype)
            call.set("encoder_decoder_position_bias", bias)  # as T5 builds it, but for all S queries


def _t5(layer: nn.Module) -> LayerAdapter | None:
    blocks = getattr(layer, "layer", None)
    attn = getattr(blocks[0], "SelfAttention", None) if isinstance(blocks, nn.ModuleList) and len(blocks) else None
    if attn is not None and hasattr(attn, "compute_bias") and hasattr(attn, "has_relative_attention_bias"):
        return _T5Bias(layer)
    return None


# -- DeBERTa-v2 relative positions ----------------------------------------------------------------


class _DebertaV2(LayerAdapter):
    def __init__(self, heads: int, relative: bool) -> None:
        self.heads, self.relative = heads, relative

    def alignments(self) -> dict[str, Alignment]:
        return {"relative_pos": _CustomAlignment("deberta-v2 [1|B,S,S] -> [1,B*heads,r,r]", self._gather)}

    def prepare(self, call: Any, hidden: torch.Tensor, seq_len: int) -> None:
        if self.relative and call.get("relative_pos") is None:
            raise InputError(
                "this DeBERTa-v2 layer uses relative attention but was called without relative_pos; it would build "
                "the positions from the kept tokens. Call it through its encoder (which passes relative_pos)."
            )

    def _gather(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
            raise InputError(f"cannot gather DeBERTa-v2's {name!r}: expected [1|B,S,S] or [S,S].")
        v = value if value.dim() == 3 else value[None]
        kept = gather_axes(v, ("b", "q", "k"), idx, seq_len, name)  # [B, r, r]
        batch, keep = idx.shape
        # the attention reads a 4-D relative_pos as [1, B*heads, q, k] (query layers are [B*heads, q, d])
        return kept[:, None].expand(batch, self.heads, keep, keep).reshape(1, batch * self.heads, keep, keep)


def _deberta_v2(layer: nn.Module) -> LayerAdapter | None:
    attn = getattr(getattr(layer, "attention", None), "self", None)
    if attn is not None and hasattr(attn, "pos_ebd_size") and hasattr(attn, "num_attention_heads"):
        return _DebertaV2(int(attn.num_attention_heads), bool(getattr(attn, "relative_attention", False)))
    return None


class _DebertaSpan(LayerAdapter):
    """DeBERTa (v1): the relative-attention span is ``min(seen length, max_relative_positions)``; during
    the call the module's span function answers for all ``S`` tokens."""

    has_context = True

    def __init__(self, attn: nn.Module) -> None:
        self.module: Any = sys.modules[type(attn).__module__]

    def alignments(self) -> dict[str, Alignment]:
        return {"relative_pos": parse_alignment("b q k | b h q k", "relative_pos")}

    @contextlib.contextmanager
    def around(self, idx: torch.Tensor, seq_len: int) -> Iterator[None]:
        span = self.module.compute_attention_span
        self.module.compute_attention_span = lambda q, k, max_rel: torch.tensor(min(seq_len, int(max_rel)))
        try:
            yield
        finally:
            self.module.compute_attention_span = span


def _deberta(layer: nn.Module) -> LayerAdapter | None:
    attn = getattr(getattr(layer, "attention", None), "self", None)
    relative = getattr(attn, "relative_attention", False) is True and hasattr(attn, "max_relative_positions")
    if relative and hasattr(sys.modules.get(type(attn).__module__), "compute_attention_span"):
        return _DebertaSpan(attn)  # type: ignore[arg-type]
    return None


_FINDERS = (_gpt_neo_local, _mpt, _beit, _t5, _deberta_v2, _deberta)


def find_adapter(layer: nn.Module) -> LayerAdapter | None:
    """The adapter ``layer``'s family needs, or ``None`` (transformers families here, other libraries in
    :mod:`random_ltd_cli.library_adapters` and :mod:`random_ltd_cli.vision_adapters`)."""
    from .library_adapters import find_library_adapter
    from .vision_adapters import find_vision_adapter

    for finder in _FINDERS:
        adapter = finder(layer)
        if adapter is not None:
            return adapter
    return find_vision_adapter(layer) or find_library_adapter(layer)


def refusal(layer: nn.Module) -> str | None:
    """Why random-LTD cannot drop tokens in ``layer`` exactly, or ``None`` if it can."""
    from .library_adapters import library_refusal

    try:
        params = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        return library_refusal(layer)
    if "input_dimensions" in params:
        return ("it partitions its tokens into 2-D windows of the image grid (Swin-style input_dimensions); a "
                "subset of the tokens has no grid")
    if "is_index_masked" in params:
        return ("its sliding-window attention cuts the sequence it sees into fixed chunks (Longformer-style), so on "
                "r kept tokens the windows would count kept tokens, not positions")
    if getattr(layer, "attention_type", None) == "block_sparse":
        return ("its block-sparse attention groups the tokens it sees into fixed blocks (BigBird); set "
                "attention_type='original_full' to train it with random-LTD")
    if any(hasattr(m, "block_len") and hasattr(m, "local_radius") for m in layer.modules()):
        return ("its local attention splits the sequence it sees into blocks of fixed length (LongT5-style), so on "
                "r kept tokens the blocks would count kept tokens, not positions")
    if "global_hidden_states" in params:
        return ("its local attention splits the sequence it sees into fixed blocks beside global tokens "
                "(PEGASUS-X-style), so on r kept tokens the blocks would count kept tokens, not positions")
    if any(isinstance(getattr(m, "expert_capacity", None), int) for m in layer.modules()):
        return ("its experts take a fixed number of tokens per batch (expert_capacity), so which tokens overflow "
                "depends on how many tokens the layer sees")
    if any(hasattr(m, "keep_window_size") for m in layer.modules()):
        return ("its dynamic-mask attention keeps a fixed number of keys per query among the tokens it sees "
                "(Doge-style keep_window_size), so on r kept tokens it would choose among kept tokens only")
    if any(hasattr(m, "num_chunks_before") and hasattr(m, "chunk_length") for m in layer.modules()):
        return ("its local attention splits the sequence it sees into chunks of fixed length (Reformer-style), so on "
                "r kept tokens the chunks would count kept tokens, not positions")
    if any(hasattr(m, "num_landmarks") for m in layer.modules()):
        return ("its Nystrom attention averages fixed segments of the sequence it sees into landmarks, which a "
                "subset of the tokens does not have")
    attn = getattr(getattr(layer, "attention", None), "self", None)
    if getattr(attn, "relative_attention", False) is True and find_adapter(layer) is None and hasattr(
        attn, "max_relative_positions"
    ):
        return ("its relative-attention span is computed from the number of tokens it sees (DeBERTa-style), so on "
                "r kept tokens distances beyond r would be clipped")
    return library_refusal(layer)
