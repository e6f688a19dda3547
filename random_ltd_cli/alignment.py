"""How each argument of a layer lines up with the sequence: which axes are token axes.

A wrapped layer sees only the ``r`` kept tokens, so every argument that has a sequence axis
must be gathered with the same kept positions ``idx [B, r]``. An *alignment* says how:

* an axes pattern such as ``"b h q k"``: one letter per axis, from the first axis (or after a
  leading ``...``). ``b`` is the batch axis (size ``B``, ``1`` -- expanded -- or ``B*k`` such as
  ``B*heads``, batch-major); ``q`` is a query axis and ``k`` a key axis (both gathered: the
  kept tokens are the queries *and* the keys); ``s`` is a token axis (gathered). Any other
  name (``h``, ``d``, ``_``, ``1``...) is an axis left alone, e.g. the encoder axis of a
  cross-attention mask ``"b h q _"``. Alternatives for tensors of different rank are
  separated by ``|``: ``"b _ k | b h _ k"``.
* ``"mask"``: an attention mask in any of the forms of :func:`~random_ltd_cli.tokens.gather_mask`.
* ``"none"``: not sequence-aligned; passed unchanged.

A tuple or list of tensors (rotary ``(cos, sin)``) is gathered element by element.
Built-in alignments cover the arguments transformers layers pass (see :data:`BUILTIN`);
users declare their own with ``seq_args={"my_bias": "b h q k"}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, InputError
from .tokens import gather_mask, gather_position_embeddings, gather_position_ids

__all__ = ["BUILTIN", "Alignment", "parse_alignment", "parse_seq_args", "resolve_alignments", "unknown_argument"]

GATHERED = ("q", "k", "s")
_AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")


@dataclass(frozen=True)
class Alignment:
    """How one argument lines up with the sequence (see the module docstring).

    ``kind`` is ``"axes"`` (``patterns`` hold one axes tuple per accepted rank), ``"mask"``,
    ``"position_ids"``, ``"rotary"`` or ``"none"``; ``text`` is how it was written.
    """

    kind: str
    text: str
    patterns: tuple[tuple[str, ...], ...] = ()

    @property
    def aligned(self) -> bool:
        return self.kind != "none"

    def gather(self, value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
        """``value`` at the kept tokens ``idx [B, r]`` (``None`` stays ``None``)."""
        if value is None or self.kind == "none":
            return value
        if self.kind == "mask":
            return gather_mask(value, idx, seq_len, name)
        if self.kind == "position_ids" and isinstance(value, torch.Tensor) and value.dim() == 2:
            return gather_position_ids(value, idx, seq_len, name)
        if self.kind == "rotary" and isinstance(value, (tuple, list)) and all(
            isinstance(v, torch.Tensor) and v.dim() == 3 for v in value
        ):
            return gather_position_embeddings(value, idx, seq_len, name)
        if isinstance(value, (tuple, list)):
            return type(value)(self.gather(v, idx, seq_len, name) for v in value)
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"cannot gather {name!r} of type {type(value).__name__}: its declared alignment {self.text!r} needs "
                "a tensor (or a tuple of tensors)."
            )
        for pattern in self.patterns:
            if _rank_fits(pattern, value.dim()):
                return gather_axes(value, _expand_pattern(pattern, value.dim()), idx, seq_len, name)
        raise InputError(
            f"cannot gather {name!r} of shape {tuple(value.shape)}: its alignment {self.text!r} expects "
            f"{_ranks_text(self.patterns)}; declare the right axes with seq_args={{{name!r}: '...'}}."
        )


def _rank_fits(pattern: tuple[str, ...], rank: int) -> bool:
    if pattern and pattern[0] == "...":
        return rank >= len(pattern) - 1
    return rank == len(pattern)


def _expand_pattern(pattern: tuple[str, ...], rank: int) -> tuple[str, ...]:
    if pattern and pattern[0] == "...":
        return ("_",) * (rank - len(pattern) + 1) + pattern[1:]
    return pattern


def _ranks_text(patterns: tuple[tuple[str, ...], ...]) -> str:
    return " or ".join(f"{len(p)}-D [{', '.join(p)}]" for p in patterns)


def gather_axes(t: torch.Tensor, pattern: tuple[str, ...], idx: torch.Tensor, seq_len: int, name: str) -> torch.Tensor:
    """Gather every ``q``/``k``/``s`` axis of ``t`` at ``idx [B, r]``, per sample along the ``b`` axis."""
    axes = [d for d, a in enumerate(pattern) if a in GATHERED]
    if not axes:
        return t
    for d in axes:
        if t.shape[d] != seq_len:
            raise InputError(
                f"cannot gather {name!r} of shape {tuple(t.shape)}: axis {d} ({pattern[d]!r} in {' '.join(pattern)!r}) "
                f"has size {t.shape[d]}, not the sequence length {seq_len}; declare its axes with seq_args."
            )
    batch, keep = idx.shape
    if "b" not in pattern:
        if not bool((idx == idx[:1]).all()):
            raise InputError(
                f"{name!r} of shape {tuple(t.shape)} has no batch axis ('b' in its alignment "
                f"{' '.join(pattern)!r}), so it cannot follow per-sample kept tokens; pass it with a batch axis."
            )
        for d in axes:
            t = t.index_select(d, idx[0])
        return t
    bd = pattern.index("b")
    rows = t.shape[bd]
    if rows == 1:
        t = t.expand(*t.shape[:bd], batch, *t.shape[bd + 1:])
        per = idx
    elif rows % batch == 0:
        per = idx if rows == batch else idx.repeat_interleave(rows // batch, dim=0)  # B*k rows, batch-major
    else:
        raise InputError(
            f"{name!r} of shape {tuple(t.shape)} has {rows} rows on its batch axis {bd}; expected the batch size "
            f"{batch}, 1 or a multiple of {batch} (batch x heads)."
        )
    for d in axes:
        shape = [1] * t.dim()
        shape[bd], shape[d] = per.shape[0], keep
        src = per if bd < d else per.t()  # a token axis before the batch axis (sequence-first, "s b _ d")
        index = src.reshape(shape).expand(*[keep if i == d else n for i, n in enumerate(t.shape)])
        t = t.gather(d, index)
    return t


def parse_alignment(text: str, name: str = "argument") -> Alignment:
    """Read an alignment written as ``"b h q k"``, ``"b _ k | b h _ k"``, ``"mask"`` or ``"none"``.

    Raises:
        ConfigError: empty text, an axis name that is not a word, ``...`` not first, or two batch axes.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"the alignment of {name!r} must be a text such as 'b h q k', 'mask' or 'none'; got {text!r}."
        )
    clean = text.strip().lower()
    if clean in ("none", "mask"):
        return Alignment(clean, clean)
    patterns = []
    for part in clean.split("|"):
        axes = tuple(a for a in re.split(r"[\s,]+", part.strip()) if a)
        bad = [a for i, a in enumerate(axes) if not (_AXIS.fullmatch(a) or (a == "..." and i == 0))]
        if not axes or bad or axes.count("b") > 1:
            raise ConfigError(
                f"cannot read the alignment {text!r} of {name!r}: write one name per axis, e.g. 'b h q k' "
                "(b: batch, q: query tokens, k: key tokens, s: tokens, anything else: an axis left alone), "
                "'...' only first, alternatives separated by '|'; or 'mask' / 'none'."
            )
        patterns.append(axes)
    return Alignment("axes", clean, tuple(patterns))


def parse_seq_args(spec: Mapping[str, str | Alignment] | None) -> dict[str, Alignment]:
    """``{"my_bias": "b h q k"}`` -> ``{name: Alignment}``; also accepts ``Alignment`` values.

    Raises:
        ConfigError: a value that :func:`parse_alignment` cannot read.
    """
    out: dict[str, Alignment] = {}
    for name, value in (spec or {}).items():
        out[str(name)] = value if isinstance(value, Alignment) else parse_alignment(value, str(name))
    return out


def _builtin(text: str) -> Alignment:
    return parse_alignment(text)


MASK = Alignment("mask", "mask")
NONE = Alignment("none", "none")
BUILTIN: dict[str, Alignment] = {
    # attention masks: [B,S], [B,S,S], [B,h,S,S], [B,h,1,S]
    **{n: MASK for n in ("attention_mask", "attn_mask", "mask", "src_mask", "src_key_padding_mask",
                         "key_padding_mask", "padding_mask")},
    # flex-attention BlockMasks under the names torchtitan and flex code use (rebuilt for the kept tokens)
    **{n: MASK for n in ("attention_masks", "block_mask")},
    # positions keep their original values: [1|B,S] (or mrope [3,B,S]); rotary (cos, sin) [1|B,S,D]
    "position_ids": Alignment("position_ids", "b s | _ b s", (("b", "s"), ("_", "b", "s"))),
    "position_embeddings": Alignment("rotary", "b s d | b _ s d", (("b", "s", "d"), ("b", "_", "s", "d"))),
    # alibi: a bias per key (BLOOM [B*H,1,S], Falcon [B,H,1,S])
    "alibi": _builtin("b _ k | b h _ k"),
    # relative-position biases over queries x keys (T5, MPNet [1|B,H,S,S]; WavLM [B*H,S,S])
    "position_bias": _builtin("b h q k | b q k"),
    # RoFormer's sinusoidal positions [1,1,S,D]
    "sinusoidal_pos": _builtin("b _ s d | b s d"),
    # cross-attention: decoder queries are gathered, encoder keys are left alone
    "encoder_attention_mask": _builtin("b h q _ | b q _ | b _"),
    "encoder_decoder_position_bias": _builtin("b h q _"),
    "cross_attn_head_mask": NONE,
    # hidden-state-like extras (DeBERTa's query_states [B,S,H])
    "query_states": _builtin("b s d"),
    # per-token inputs of each layer (Gemma-4's per_layer_input [B,S,d])
    "per_layer_input": _builtin("b s d"),
    # not per token
    **{n: NONE for n in ("encoder_hidden_states", "rel_embeddings", "head_mask", "layer_head_mask",
                         "cache_position", "output_attentions", "output_router_logits")},
}


def resolve_alignments(mask_names: tuple[str, ...] | None, seq_args: Mapping[str, Alignment]) -> dict[str, Alignment]:
    """The alignment table of one layer: built-ins, then ``mask_names`` (masks, replacing the built-in
    masks when given), then the user's ``seq_args`` (which win)."""
    table = dict(BUILTIN)
    if mask_names is not None:
        for n, a in BUILTIN.items():
            if a is MASK:
                del table[n]
        table.update({n: MASK for n in mask_names})
    table.update(seq_args)
    return table


def unknown_argument(name: str, value: Any, batch: int, seq_len: int, owner: str) -> InputError | None:
    """The error for a tensor argument with no alignment that has an axis of length ``S`` (or ``2S``/``2S-1``,
    the length of a relative-position table); else ``None``."""
    tensors = [value] if isinstance(value, torch.Tensor) else (
        [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else [])
    for t in tensors:
        if seq_len in t.shape:
            what = f"which has the sequence length {seq_len} on an axis"
        elif seq_len > 1 and (2 * seq_len in t.shape or 2 * seq_len - 1 in t.shape):
            what = f"which has an axis of length {2 * seq_len if 2 * seq_len in t.shape else 2 * seq_len - 1} " \
                   f"(a relative-position table for the sequence length {seq_len}?)"
        else:
            continue
        return InputError(
            f"{owner}.forward got {name!r} of shape {tuple(t.shape)}, {what}, and random-LTD does not know how it "
            f"lines up with the tokens. Declare it, e.g. seq_args={{{name!r}: 'b h q k'}} (axes: b batch, q/k "
            f"query/key tokens, s tokens, others left alone; CLI: --seq-arg {name}='b h q k') or {{{name!r}: 'none'}} "
            "if it is not per token; or create the layer with on_unsupported='passthrough' to run such calls on all "
            "tokens."
        )
    return None
