"""``RandomLayerTokenDrop``: run a layer on a random, sorted subset of the tokens.

In training, with a reserved length ``r`` below the sequence length ``S``, the wrapper

1. draws ``r`` sorted positions per sample (:mod:`random_ltd_cli.sampling`);
2. gathers the hidden states ``[B,S,H] -> [B,r,H]`` (or ``[S,B,H] -> [r,B,H]``) and every
   sequence-aligned argument with the same indices, as its alignment says
   (:mod:`random_ltd_cli.alignment`: attention masks, ``position_ids``, rotary
   ``position_embeddings``, alibi and relative-position biases, cross-attention masks, and
   the user's ``seq_args``); a key/value cache is passed as ``None`` and ``use_cache=False``;
   a tensor argument of unknown alignment with an axis of length ``S`` is an error;
3. calls the wrapped layer, with its arguments in the shape they came (positional stays
   positional, keyword stays keyword);
4. scatters element 0 of the output back into a copy of the input; the other
   ``S - r`` tokens leave the layer exactly as they entered it. Other output elements that
   are gathered arguments (T5 hands its ``position_bias`` to the next layer this way) come
   back as the full-length originals.

Families whose layers derive positions or windows from the length they see get an adapter
(:mod:`random_ltd_cli.adapters`).

Otherwise (eval mode, no reserved length, ``r >= S``) it calls the wrapped layer with the
very same arguments, so the output is bitwise identical to the unwrapped layer's.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import nn

from . import compiled
from ._inner import InnerAttributes
from .adapters import LayerAdapter, find_adapter
from .alignment import Alignment, parse_seq_args, resolve_alignments, unknown_argument
from .errors import ConfigError, ConversionError, InputError
from .keys import SEGMENT
from .recorders import SubmoduleRecords, call_unrecorded, replay_recorders
from .sampling import TokenSampler, _in_backward
from .tokens import TokenRoute, flat_index
from .verify import check_verify_mode, on_dropping_call

__all__ = ["HIDDEN_NAMES", "MASK_NAMES", "RandomLayerTokenDrop"]

HIDDEN_NAMES = ("hidden_states", "hidden_state", "hidden", "x", "src", "tgt", "inputs", "input", "h")
MASK_NAMES = (
    "attention_mask", "attn_mask", "mask", "src_mask", "src_key_padding_mask", "key_padding_mask", "padding_mask"
)
POSITION_ID_NAMES = ("position_ids", "positions")  # positions: torchtitan's blocks
CACHE_NAMES = ("past_key_value", "past_key_values", "cache", "layer_past")
# Keyword arguments that describe packed (varlen) flash-attention batches: their boundaries
# are in token counts, which dropping would invalidate.
PACKED_NAMES = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "cu_seqlens_q", "cu_seqlens_k",
                "cu_doc_lens", "cu_doc_lens_q", "cu_doc_lens_k", "packed_seq_params")


class ReservedLength(Protocol):
    """Anything with DeepSpeed's scheduler method (e.g. :class:`~random_ltd_cli.RandomLTDScheduler`)."""

    def get_current_seq(self) -> int: ...


class _Arguments:
    """A view of one call's ``*args, **kwargs`` by parameter name that keeps their shape."""

    def __init__(self, positional_names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._names = positional_names
        self.args = list(args)
        self.kwargs = dict(kwargs)

    def _position(self, name: str) -> int | None:
        try:
            i = self._names.index(name)
        except ValueError:
            return None
        return i if i < len(self.args) else None

    def has(self, name: str) -> bool:
        return self._position(name) is not None or name in self.kwargs

    def get(self, name: str, default: Any = None) -> Any:
        i = self._position(name)
        if i is not None:
            return self.args[i]
        return self.kwargs.get(name, default)

    def set(self, name: str, value: Any) -> None:
        i = self._position(name)
        if i is not None:
            self.args[i] = value
        else:
            self.kwargs[name] = value


class RandomLayerTokenDrop(InnerAttributes, nn.Module):
    """Wrap ``layer`` so that, in training, it processes only ``r`` random sorted tokens per sample.

    The wrapped layer is kept as the attribute ``random_ltd_layer`` (checkpoint keys read
    ``prefix.random_ltd_layer.rest``, as in DeepSpeed). Attribute reads the wrapper does not
    have fall through to the wrapped layer.

    Args:
        layer: the transformer layer. Its forward takes the hidden states (``[B,S,H]``, or
            ``[S,B,H]`` with ``batch_first=False``) and returns them (or a tuple whose element
            0 they are).
        scheduler: an object with ``get_current_seq()`` giving ``r`` (a :class:`RandomLTDScheduler`).
        reserved_length: a fixed ``r`` instead of a scheduler.
        batch_first: layout of the hidden states.
        hidden_name: the forward parameter holding the hidden states (default: found by name,
            else the first parameter).
        mask_names: forward parameters holding attention masks (default: the usual names,
            e.g. ``attention_mask``).
        seq_args: how the layer's own arguments line up with the sequence, by name, e.g.
            ``{"my_bias": "b h q k", "my_ids": "b s", "enc_mask": "b h q _", "scale": "none"}``
            (one letter per axis: ``b`` batch, ``q``/``k`` query/key tokens, ``s`` tokens,
            anything else an axis left alone; ``"mask"``; ``"none"`` for not per token). They
            override the built-in alignments (see :mod:`random_ltd_cli.alignment`).
        keep_prefix: always keep the first ``k`` tokens (e.g. ``[CLS]``).
        keep_document_starts: when ``position_ids`` (torchtitan: ``positions``) are passed, always keep
            tokens whose position is 0 (the start of each packed document; for an unpacked sequence, its
            first token), so document boundaries survive dropping.
        seed: ``None`` samples from the global RNG; an int uses a private generator (see
            :class:`~random_ltd_cli.sampling.TokenSampler`).
        generator: a private ``torch.Generator`` to sample from (overrides ``seed``).
        layer_id: index of this layer among the wrapped ones (mixed into ``seed``).
        calls: for a layer that one model forward calls several times (ALBERT's shared layer),
            which of its calls drop tokens (0-based, e.g. ``range(1, 11)`` of 12); the other
            calls run on all tokens. Needs ``calls_per_forward``.
        calls_per_forward: how many times one model forward calls the layer; the count starts
            again after that many calls (and whenever :meth:`reset_calls` is called).
        on_unsupported: ``"error"`` (default) raises :class:`InputError` on an argument that
            cannot be gathered (e.g. a flex-attention ``BlockMask``, or a tensor of unknown
            alignment with an axis of length ``S``); ``"passthrough"`` runs that call on all
            tokens instead.
        verify: check the layer against the verifier's reference (:mod:`random_ltd_cli.verify`):
            ``"first"`` (default) on its first dropping call and again when its argument signature
            changes, ``"always"`` on every dropping call (debugging), ``"off"`` never. A mismatch
            raises :class:`~random_ltd_cli.errors.VerificationError`, a layer whose keys cannot be
            restricted :class:`~random_ltd_cli.errors.UnverifiableLayerError`.
        dropped: what the dropped tokens' rows of the output hold: ``"input"`` (default: the
            input, unchanged) or ``"zero"`` (zeros, for a part whose caller adds the residual
            itself, as XLM's attention list: see :mod:`random_ltd_cli.parts`).

    Raises:
        ConfigError: a setting that cannot work (``reserved_length <= 0``, a mask name the
            forward does not accept, ``keep_prefix < 0``...).
        ConversionError: ``layer`` is not a module or has no hidden-state argument, or is
            already wrapped.
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        scheduler: ReservedLength | None = None,
        reserved_length: int | None = None,
        batch_first: bool = True,
        hidden_name: str | None = None,
        mask_names: Iterable[str] | None = None,
        keep_prefix: int = 0,
        keep_document_starts: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        layer_id: int = 0,
        on_unsupported: Literal["error", "passthrough"] = "error",
        seq_args: Mapping[str, str | Alignment] | None = None,
        calls: Iterable[int] | None = None,
        calls_per_forward: int | None = None,
        verify: Literal["first", "always", "off"] = "first",
        dropped: Literal["input", "zero"] = "input",
    ) -> None:
        adapter = find_adapter(layer) if isinstance(layer, nn.Module) else None
        plan = _plan_arguments(layer, hidden_name, mask_names, adapter.signature() if adapter else None)
        user_args = parse_seq_args(seq_args)
        call_set = _check_calls(calls, calls_per_forward)
        _check_settings(reserved_length, keep_prefix, on_unsupported)
        verify_mode = check_verify_mode(verify)
        if dropped not in ("input", "zero"):
            raise ConfigError(f"dropped={dropped!r} must be 'input' (the dropped tokens pass unchanged) or 'zero'.")
        super().__init__()
        self.random_ltd_layer = layer
        self.scheduler = scheduler
        self.reserved_length = reserved_length
        self.batch_first = bool(batch_first)
        self.keep_prefix = int(keep_prefix)
        self.keep_document_starts = bool(keep_document_starts)
        self.on_unsupported = on_unsupported
        self.layer_id = int(layer_id)
        self.sampler = TokenSampler(seed, generator=generator, layer_id=layer_id)
        compiled.prepare_scheduler(scheduler)
        self.last_indices: torch.Tensor | None = None  # [B, r] of the latest dropping call, for inspection
        self._positional_names, self._hidden_name, self._mask_names, self._accepts_kwargs, self._params = plan
        self._user_args = user_args
        self._adapter = adapter
        self._alignments = self._resolve(mask_names is not None)
        self._records = SubmoduleRecords(layer)
        self._calls, self._period, self._count = call_set, int(calls_per_forward or 0), 0
        self.verify: str = verify_mode
        self._verified: set[Any] = set()  # argument signatures verified (verify="first")
        self.dropped: str = dropped
        self._parts: Any = None  # a parts.PartsSlot: the layer's other parts read this call's indices from it
        self.register_load_state_dict_pre_hook(_accept_plain_keys)

    @property
    def calls(self) -> frozenset[int] | None:
        """For a shared layer, the calls (per model forward) that drop tokens; ``None`` otherwise."""
        return self._calls

    def reset_calls(self) -> None:
        """Start counting the calls of a shared layer again (a new model forward begins)."""
        self._count = 0

    def _this_call_drops(self) -> bool:
        if _in_backward():
            raise InputError(
                "a shared layer wrapped with calls= was recomputed by activation checkpointing; random-LTD cannot "
                "tell which of its calls the recompute repeats. Train it without activation checkpointing."
            )
        call, self._count = self._count % self._period, self._count + 1
        return call in self._calls  # type: ignore[operator]

    def _resolve(self, explicit_masks: bool) -> dict[str, Alignment]:
        family = self._adapter.alignments() if self._adapter is not None else {}
        return resolve_alignments(self._mask_names if explicit_masks else None, {**family, **self._user_args})

    @property
    def seq_args(self) -> dict[str, str]:
        """The alignment of every argument name this layer knows (built-in, family and user), as text."""
        return {n: a.text for n, a in self._alignments.items()}

    # -- configuration -------------------------------------------------------------------

    def init_config(self, config: Any, scheduler: ReservedLength, random_ltd_layer_id: int) -> None:
        """DeepSpeed's set-up call: attach ``scheduler`` and read ``config`` (the ``random_ltd`` block,
        or a whole DeepSpeed config) for the mask name and the hidden-state order."""
        from .deepspeed_config import RandomLTDConfig, read_deepspeed_config

        cfg = config if isinstance(config, RandomLTDConfig) else read_deepspeed_config(config)
        masks = self._mask_names
        if cfg.model_mask_name:
            if cfg.model_mask_name not in self._params and not self._accepts_kwargs:
                raise ConfigError(
                    f"model_mask_name={cfg.model_mask_name!r} is not a parameter of "
                    f"{type(self.random_ltd_layer).__name__}.forward; set it to one of {sorted(self._params)}."
                )
            masks = (cfg.model_mask_name,)
            self._mask_names = masks
            self._alignments = self._resolve(True)
        if cfg.batch_first is not None:
            self.batch_first = cfg.batch_first
        self.scheduler = scheduler
        compiled.prepare_scheduler(scheduler)
        self.layer_id = int(random_ltd_layer_id)
        self.sampler.layer_id = self.layer_id

    @property
    def random_ltd_scheduler(self) -> ReservedLength | None:
        """DeepSpeed's name for :attr:`scheduler`."""
        return self.scheduler

    def current_reserved_length(self) -> int | None:
        """``r`` for the next call: the fixed value, else the scheduler's, else ``None``.

        While ``torch.compile`` traces, a scheduler's ``r`` is read from its length carrier, a
        dynamic size (:mod:`random_ltd_cli.compiled`), so one graph serves every ``r``.
        """
        if self.reserved_length is not None:
            return int(self.reserved_length)
        if self.scheduler is not None:
            if torch.compiler.is_compiling():  # r as a dynamic size, not a constant (compiled.py)
                return compiled.traced_reserved_length(self.scheduler)
            return int(self.scheduler.get_current_seq())
        return None

    def extra_repr(self) -> str:
        r = self.reserved_length if self.reserved_length is not None else (
            "scheduler" if self.scheduler is not None else None)
        zero = ", dropped=zero" if self.dropped == "zero" else ""
        return f"reserved_length={r}, batch_first={self.batch_first}, layer_id={self.layer_id}{zero}"

    # -- forward ---------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._parts is not None:
            return self._forward_publishing(*args, **kwargs)
        return self._forward(*args, **kwargs)

    @torch.compiler.disable  # publishes its indices to the layer's other parts: always eager
    def _forward_publishing(self, *args: Any, **kwargs: Any) -> Any:
        self._parts.publish(None)  # a call that does not drop leaves no indices behind
        return self._forward(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.random_ltd_layer
        if self._calls is not None and not self._this_call_drops():
            return layer(*args, **kwargs)
        keep = self.current_reserved_length() if self.training else None
        if keep is None:
            return layer(*args, **kwargs)
        call = _Arguments(self._positional_names, args, kwargs)
        hidden = call.get(self._hidden_name)
        batch, seq_len = self._shape(hidden)
        if keep >= seq_len:
            return layer(*args, **kwargs)
        adapter = self._adapter
        try:
            if adapter is not None:
                adapter.prepare(call, hidden, seq_len)
            priority = self._priority(call, batch, seq_len, keep, hidden.device)
            if adapter is not None and adapter.shared_indices:  # one draw for the batch (no batch axis)
                shared = priority if priority is None else priority.any(0, keepdim=True)
                idx = self.sampler(hidden, 1, seq_len, keep, shared).expand(batch, keep)
            else:
                idx = self.sampler(hidden, batch, seq_len, keep, priority)  # (B, r) sorted
            swaps = self._gather_arguments(call, idx, batch, seq_len)
        except InputError:
            if self.on_unsupported == "passthrough":
                return layer(*args, **kwargs)
            raise
        if not torch.compiler.is_compiling():  # never inside a compiled region (no graphs or breaks added)
            self.last_indices = idx
            if self._parts is not None:
                self._parts.publish(idx, batch, seq_len)
            if self.verify != "off" or "_verify_sink" in self.__dict__:
                on_dropping_call(self, args, kwargs, idx)
        route = TokenRoute(hidden, flat_index(idx, seq_len, self.batch_first), keep, self.batch_first)
        call.set(self._hidden_name, route.split())
        records = self._records.hold(route.flat, batch * seq_len)  # router logits & co. come back full length
        if records is None:
            out = _call_inner(layer, adapter, call, idx, seq_len)
        else:
            with records:
                out = _call_inner(layer, adapter, call, idx, seq_len)
            records.replay()
        if torch.compiler.is_compiling():
            compiled.warn_if_static(self, keep)  # at compile time: did r stay a symbol?
        out = self._merge_output(route, out, swaps)
        return replay_recorders(layer, args, kwargs, out)

    def _dropped_output(self, args: tuple[Any, ...], kwargs: dict[str, Any], idx: torch.Tensor) -> Any:
        """The wrapper's computation for given kept indices ``idx [B, r]`` (no sampling, no recorders):
        gather, call the inner layer, scatter. For the verifier."""
        call = _Arguments(self._positional_names, args, kwargs)
        hidden = call.get(self._hidden_name)
        batch, seq_len = self._shape(hidden)
        if self._adapter is not None:
            self._adapter.prepare(call, hidden, seq_len)
        swaps = self._gather_arguments(call, idx, batch, seq_len)
        route = TokenRoute(hidden, flat_index(idx, seq_len, self.batch_first), idx.shape[1], self.batch_first)
        call.set(self._hidden_name, route.split())
        out = _call_inner(self.random_ltd_layer, self._adapter, call, idx, seq_len)
        return self._merge_output(route, out, swaps)

    def _shape(self, hidden: Any) -> tuple[int, int]:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            layout = "[B,S,H]" if self.batch_first else "[S,B,H]"
            raise InputError(
                f"random-LTD expected the hidden states {self._hidden_name!r} as a 3-D tensor {layout}, got {got}; "
                "pass hidden_name= to name the right argument, or batch_first= to fix the layout."
            )
        if self.batch_first:
            return int(hidden.shape[0]), int(hidden.shape[1])
        return int(hidden.shape[1]), int(hidden.shape[0])

    def _priority(
        self, call: _Arguments, batch: int, seq_len: int, keep: int, device: torch.device
    ) -> torch.Tensor | None:
        if keep <= 0:
            raise InputError(f"reserved length r={keep} must be positive; check the scheduler's min_value.")
        if self.keep_prefix > keep:
            raise InputError(
                f"keep_prefix={self.keep_prefix} tokens cannot fit in the reserved length r={keep}; "
                "lower keep_prefix or raise the schedule's min_value."
            )
        priority = None
        prefix = max(self.keep_prefix, self._adapter.keep_prefix if self._adapter is not None else 0)
        if prefix > keep:
            raise InputError(
                f"{type(self.random_ltd_layer).__name__} always keeps its {prefix} prefix token(s), which cannot fit "
                f"in the reserved length r={keep}; raise the schedule's min_value."
            )
        if prefix:
            priority = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
            priority[:, :prefix] = True
        if self.keep_document_starts:
            for name in POSITION_ID_NAMES:
                pos = call.get(name)
                if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == seq_len:
                    starts = pos.to(device) == 0
                    priority = starts if priority is None else (priority | starts)
        if priority is not None and priority.shape[0] not in (1, batch):
            raise InputError(f"position_ids batch size {priority.shape[0]} does not match the hidden states' {batch}.")
        return priority

    def _gather_arguments(
        self, call: _Arguments, idx: torch.Tensor, batch: int, seq_len: int
    ) -> list[tuple[Any, Any]]:
        """Gather every argument of the call by its alignment; returns ``(gathered, original)`` pairs."""
        swaps: list[tuple[Any, Any]] = []
        names = [*self._positional_names[: len(call.args)], *call.kwargs]
        for name in names:
            if name == self._hidden_name:
                continue
            value = call.get(name)
            if value is None or isinstance(value, (bool, int, float, str)):
                continue
            if name in CACHE_NAMES:
                call.set(name, None)
                continue
            if name in PACKED_NAMES:
                raise InputError(
                    f"the layer was called with {name!r} (packed flash-attention batch); random-LTD cannot drop "
                    "tokens of packed varlen batches. Pad the batch instead, or use on_unsupported='passthrough'."
                )
            align = self._alignments.get(name)
            if align is None:
                error = unknown_argument(name, value, batch, seq_len, type(self.random_ltd_layer).__name__)
                if error is not None:
                    raise error
                continue
            gathered = align.gather(value, idx, seq_len, name)
            if gathered is not value:
                call.set(name, gathered)
                swaps.append((gathered, value))
        if call.has("use_cache") or "use_cache" in self._params:
            call.set("use_cache", False)
        return swaps

    def _merge_output(self, route: TokenRoute, out: Any, swaps: list[tuple[Any, Any]]) -> Any:
        merge = route.merge_zero if self.dropped == "zero" else route.merge
        if isinstance(out, torch.Tensor):
            return merge(out)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            first = merge(out[0])
            rest = [_restore(o, swaps) for o in out[1:]] if swaps else list(out[1:])
            if hasattr(out, "_fields"):  # namedtuple
                return type(out)(first, *rest)
            return type(out)([first, *rest])
        raise InputError(
            f"the wrapped {type(self.random_ltd_layer).__name__} returned {type(out).__name__}; random-LTD needs a "
            "tensor or a tuple whose element 0 is the hidden states."
        )


def _call_inner(
    layer: nn.Module, adapter: LayerAdapter | None, call: _Arguments, idx: torch.Tensor, seq_len: int
) -> Any:
    if adapter is None:
        return call_unrecorded(layer, call.args, call.kwargs)  # recorders must see full-length states
    return _call_adapted(layer, adapter, call, idx, seq_len)


def _call_adapted(layer: nn.Module, adapter: LayerAdapter, call: _Arguments, idx: torch.Tensor, seq_len: int) -> Any:
    """The inner call inside the adapter's context. A Hugging Face layer with gradient checkpointing on would
    recompute its forward in the backward pass outside that context (silently other values), so the
    wrapper checkpoints the whole adapted call itself and switches the layer's own checkpointing off."""

    own = adapter.has_context and layer.__dict__.get("gradient_checkpointing") and torch.is_grad_enabled()

    def run(*_: Any) -> Any:
        if own:
            layer.__dict__["gradient_checkpointing"] = False
        try:
            with adapter.around(idx, seq_len):
                return call_unrecorded(layer, call.args, call.kwargs)
        finally:
            if own:
                layer.__dict__["gradient_checkpointing"] = True

    if own:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(run, *[a for a in call.args if isinstance(a, torch.Tensor)], use_reentrant=False)
    return run()


def _restore(value: Any, swaps: list[tuple[Any, Any]]) -> Any:
    """The full-length original of an output element that is a gathered argument (else the element)."""
    for gathered, original in swaps:
        if value is gathered:
            return original
    return value


def _plan_arguments(
    layer: nn.Module, hidden_name: str | None, mask_names: Iterable[str] | None,
    signature: inspect.Signature | None = None,
) -> tuple[list[str], str, tuple[str, ...], bool, frozenset[str]]:
    """Read the layer's forward signature (or ``signature``, the one a ``forward(*args, **kwargs)``
    hands its arguments to): positional order, hidden-state and mask parameters."""
    if not isinstance(layer, nn.Module):
        raise ConversionError(f"RandomLayerTokenDrop wraps an nn.Module, got {type(layer).__name__}.")
    if isinstance(layer, RandomLayerTokenDrop):
        raise ConversionError(
            f"this {type(layer.random_ltd_layer).__name__} is already wrapped by RandomLayerTokenDrop; "
            "wrap each layer once (revert_random_ltd() undoes a conversion)."
        )
    try:
        own = list(inspect.signature(layer.forward).parameters.values())
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"cannot read the forward signature of {type(layer).__name__}: {exc}") from exc
    params = list(signature.parameters.values()) if signature is not None else own
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in params if p.kind in kinds]
    named = [p.name for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in (*params, *own))
    if hidden_name is None:
        hidden_name = next((n for n in HIDDEN_NAMES if n in named), positional[0] if positional else None)
        if hidden_name is None:
            inner = layer.__dict__.get("_modules", {}).get("_checkpoint_wrapped_module")
            way_out = (f"it is torch's activation-checkpoint wrapper around {type(inner).__name__}: convert the model "
                       "before applying activation checkpointing (e.g. before torchtitan's parallelize_fn)"
                       if inner is not None else "pass hidden_name= naming the argument that holds [B,S,H] states")
            raise ConversionError(
                f"{type(layer).__name__}.forward has no recognisable hidden-state argument (signature: "
                f"{_signature_text(params)}); {way_out}."
            )
    elif hidden_name not in named and not accepts_kwargs:
        raise ConfigError(
            f"hidden_name={hidden_name!r} is not a parameter of {type(layer).__name__}.forward "
            f"({_signature_text(params)}); name one of {named}."
        )
    if mask_names is None:
        masks = tuple(n for n in MASK_NAMES if n in named)
    else:
        masks = tuple(mask_names)
        missing = [n for n in masks if n not in named]
        if missing and not accepts_kwargs:
            raise ConfigError(
                f"mask name {missing[0]!r} is not a parameter of {type(layer).__name__}.forward "
                f"({_signature_text(params)}); set the mask name (DeepSpeed: model_mask_name) to one of {named}."
            )
    return positional, hidden_name, masks, accepts_kwargs, frozenset(named)


def _check_calls(calls: Iterable[int] | None, per_forward: int | None) -> frozenset[int] | None:
    if calls is None and per_forward is None:
        return None
    if calls is None or per_forward is None or int(per_forward) <= 0:
        raise ConfigError("calls= and calls_per_forward= go together (calls_per_forward a positive count).")
    out = frozenset(int(c) for c in calls)
    bad = sorted(c for c in out if not 0 <= c < int(per_forward))
    if bad:
        raise ConfigError(f"calls={sorted(out)}: call {bad[0]} is outside 0..{int(per_forward) - 1}.")
    return out


def _check_settings(reserved_length: int | None, keep_prefix: int, on_unsupported: str) -> None:
    if reserved_length is not None and int(reserved_length) <= 0:
        raise ConfigError(f"reserved_length={reserved_length} must be a positive number of tokens (or None).")
    if keep_prefix < 0:
        raise ConfigError(f"keep_prefix={keep_prefix} must be >= 0.")
    if on_unsupported not in ("error", "passthrough"):
        raise ConfigError(f"on_unsupported={on_unsupported!r} must be 'error' or 'passthrough'.")


def _signature_text(params: list[inspect.Parameter]) -> str:
    return "(" + ", ".join(str(p) for p in params)[:200] + ")"


def _accept_plain_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Load-state-dict pre-hook: accept keys without the ``random_ltd_layer`` segment too."""
    inner_prefix = prefix + SEGMENT + "."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner_prefix)]:
        new = inner_prefix + key[len(prefix):]
        if new not in state_dict:
            state_dict[new] = state_dict.pop(key)

