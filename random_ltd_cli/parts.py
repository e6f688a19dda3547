"""Layers kept as parallel lists of parts (XLM, FlauBERT): the attention wrapped, the other parts proxied.

``XLMModel`` and ``FlaubertModel`` keep the parts of layer ``i`` in four parallel lists,
``attentions[i]``, ``layer_norm1[i]``, ``ffns[i]`` and ``layer_norm2[i]``, and combine them in the
model's own loop (then ``t *= pad_mask``)::

    post-norm (XLM; FlauBERT pre_norm=False):  t = ln1(t + attn(t)); t = ln2(t + ffn(t))
    pre-norm  (FlauBERT pre_norm=True):        t = t + attn(ln1(t)); t = t + ffn(ln2(t))

No module is the layer, so the parts are wrapped one by one, all reading the kept indices that
the layer's attention drew in this forward:

* ``attentions[i]`` becomes a :class:`~random_ltd_cli.RandomLayerTokenDrop` with
  ``dropped="zero"``: it draws ``r`` kept tokens as usual and returns **zeros** at the dropped
  rows, so the model's residual ``t + dropout(0)`` leaves them exactly as they were;
* ``layer_norm1[i]``, ``ffns[i]``, ``layer_norm2[i]`` become :class:`LayerPart` proxies holding the
  original as ``random_ltd_layer`` (checkpoint keys ``layer_norm1.3.random_ltd_layer.weight``). On
  the kept rows they run the original; a norm's dropped rows are its input, unchanged, an FFN's are
  zeros (the loop adds the residual). A part that runs before the attention (pre-norm's
  ``layer_norm1``, whose output feeds only the attention) and every part of a forward in which the
  attention did not drop (eval mode, ``r >= S``) run the original on all tokens.

Indices never outlive their forward: the module that owns the lists clears them at the start of
each of its forwards (a forward pre-hook), the layer's last part clears them after it runs, and a
part called out of the loop's order, or on states of another shape, is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._inner import InnerAttributes
from .errors import ConversionError, InputError
from .verify import PART_METHOD, LayerVerdict, isolated, tolerance_for

if TYPE_CHECKING:
    from .layer import RandomLayerTokenDrop

__all__ = ["ATTENTION", "LISTS", "LayerPart", "PartsLayout", "PartsSlot", "layout_of"]

ATTENTION = "attentions"
LISTS = (ATTENTION, "layer_norm1", "ffns", "layer_norm2")
CROSS = ("encoder_attn", "layer_norm15")  # a decoder's cross-attention parts: another loop, refused
NORM, RESIDUAL, BEFORE = "norm", "residual", "before"  # what a part's dropped rows get: input / zeros / all tokens


@dataclass(frozen=True)
class PartsLayout:
    """A module whose layers are parallel lists of parts, and its loop order."""

    owner: str  # qualified name of the module holding the lists ("transformer")
    pre_norm: bool
    size: int

    def roles(self) -> dict[str, str]:
        """What each proxied list's dropped rows get."""
        if self.pre_norm:
            return {"layer_norm1": BEFORE, "layer_norm2": NORM, "ffns": RESIDUAL}
        return {"layer_norm1": NORM, "ffns": RESIDUAL, "layer_norm2": NORM}

    def order(self) -> tuple[str, ...]:
        """The parts that run after the attention, in the loop's order (the last one clears the indices)."""
        return ("layer_norm2", "ffns") if self.pre_norm else ("layer_norm1", "ffns", "layer_norm2")


def layout_of(root: nn.Module, owner: str) -> PartsLayout | str | None:
    """The parts layout of the module ``owner``: a :class:`PartsLayout`, the reason it cannot be
    wrapped exactly (``str``), or ``None`` when it does not keep its layers as the four lists."""
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return None
    lists = {n: m for n, m in module.named_children() if isinstance(m, nn.ModuleList)}
    if not all(n in lists for n in LISTS):
        return None
    size = len(lists[ATTENTION])
    where = f"{type(module).__name__} ({owner or '<root>'})"
    if size == 0 or any(len(lists[n]) != size for n in LISTS):
        return f"{where} keeps parts of its layers in lists of different lengths ({_lengths(lists)})"
    cross = [n for n in CROSS if len(lists.get(n, ())) > 0]
    if cross:
        return (f"{where} has cross-attention parts ({', '.join(cross)}), a decoder loop whose order random-LTD "
                "does not know")
    other = [n for n, m in lists.items() if n not in LISTS and n not in CROSS and len(m) == size]
    if other:
        return (f"{where} keeps other per-layer parts ({', '.join(other)}) beside {', '.join(LISTS)}: its loop "
                "may use them in an order random-LTD does not know")
    pre_norm = getattr(module, "pre_norm", False)
    if not isinstance(pre_norm, bool):
        return f"{where}.pre_norm is {pre_norm!r}, not True or False: the loop order is unknown"
    return PartsLayout(owner, pre_norm, size)


def _lengths(lists: dict[str, nn.ModuleList]) -> str:
    return ", ".join(f"{n}: {len(lists[n])}" for n in LISTS)


class PartsSlot:
    """The kept indices one layer's attention drew in the current forward, and how far its parts have run."""

    def __init__(self, layout: PartsLayout, layer: int) -> None:
        self.layout, self.layer = layout, layer
        self.wrapper: RandomLayerTokenDrop | None = None  # the layer's attention (set at conversion)
        self.clear()

    def clear(self) -> None:
        self.idx: torch.Tensor | None = None
        self.shape: tuple[int, int] | None = None  # (B, S) of the attention's input
        self.stage = 0

    def publish(self, idx: torch.Tensor | None, batch: int = 0, seq_len: int = 0) -> None:
        """Called by the attention on each call: its kept indices ``[B, r]``, or ``None`` when it did not drop."""
        self.clear()
        if idx is not None:
            self.idx, self.shape = idx, (batch, seq_len)


class LayerPart(InnerAttributes, nn.Module):
    """One part of a layer kept in parallel lists (a norm or a per-token FFN), run on its layer's kept tokens.

    The original module is ``random_ltd_layer``; attribute reads fall through to it.
    """

    def __init__(self, part: nn.Module, slot: PartsSlot, list_name: str, role: str) -> None:
        from .layer import _accept_plain_keys

        super().__init__()
        self.random_ltd_layer = part
        self.list_name, self.role = list_name, role
        self.__dict__["_slot"] = slot  # shared with the attention and the other parts: not a submodule
        self._verified: set[Any] = set()
        self.register_load_state_dict_pre_hook(_accept_plain_keys)

    def extra_repr(self) -> str:
        return f"part={self.list_name}, layer={self._slot.layer}, dropped_rows={self.role}"

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        slot: PartsSlot = self._slot
        if slot.idx is None:
            return self.random_ltd_layer(hidden, *args, **kwargs)
        return self._on_kept(slot, hidden, args, kwargs)

    @torch.compiler.disable  # reads indices published by another module: always eager
    def _on_kept(self, slot: PartsSlot, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        order = slot.layout.order()
        expected = order[slot.stage] if slot.stage < len(order) else None
        if self.role == BEFORE or expected != self.list_name or args or kwargs:
            slot.clear()
            raise InputError(
                f"{self._label()} was called out of its layer's order (after the attention dropped tokens, "
                f"{', '.join(order)} must follow, each once, with the hidden states only; expected "
                f"{expected or 'no part'}): random-LTD cannot tell which tokens this call should keep. Call the model "
                "as a whole, or revert_random_ltd(model) to use its parts on their own."
            )
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != slot.shape:
            slot.clear()
            raise InputError(f"{self._label()} got states of shape {tuple(hidden.shape)}, but its layer's attention "
                             f"dropped tokens of [B,S]={list(slot.shape or ())}: call the model as a whole.")
        idx = slot.idx
        assert idx is not None
        out = run_on_kept(self.random_ltd_layer, hidden, idx, self.role)
        slot.stage += 1
        if slot.stage == len(order):
            slot.clear()  # the layer is done: no later call may use these indices
        self._maybe_verify(slot, hidden, idx, out)
        return out

    def _label(self) -> str:
        return f"{self.list_name}[{self._slot.layer}] ({type(self.random_ltd_layer).__name__})"

    def _maybe_verify(self, slot: PartsSlot, hidden: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        from .errors import VerificationError
        from .sampling import _in_backward

        wrapper = slot.wrapper
        if wrapper is None or _in_backward():
            return
        sink: list[LayerVerdict] | None = wrapper.__dict__.get("_verify_sink")
        key = (hidden.dtype, hidden.device.type)
        due = wrapper.verify == "always" or (wrapper.verify == "first" and key not in self._verified)
        if sink is None and not due:
            return
        verdict = check_part(self, hidden, idx, out)
        if sink is not None:
            sink.append(verdict)
            return
        if verdict.status == "exact":
            self._verified.add(key)
            return
        raise VerificationError(verdict.message())


def run_on_kept(part: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, role: str) -> torch.Tensor:
    """``part`` on the kept rows ``idx [B, r]`` of ``hidden [B,S,H]``; dropped rows: the input (``norm``) or zeros."""
    b, s, h = hidden.shape
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * s).reshape(-1)  # rows of [B*S, H]
    rows = hidden.reshape(b * s, h)
    kept = part(rows.index_select(0, flat).view(b, idx.shape[1], h))
    if not isinstance(kept, torch.Tensor) or kept.shape != (b, idx.shape[1], h):
        raise InputError(f"{type(part).__name__} returned {tuple(getattr(kept, 'shape', ()))} for kept states of "
                         f"{(b, idx.shape[1], h)}: a proxied part must return states of its input's shape.")
    base = rows.to(kept.dtype) if role == NORM else rows.new_zeros(rows.shape, dtype=kept.dtype)
    return base.index_copy(0, flat, kept.reshape(-1, h)).view(b, s, h)


def check_part(part: LayerPart, hidden: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> LayerVerdict:
    """Is ``part`` per token? Its output on the kept rows alone against its output on all tokens read at
    those rows (both deterministic: eval mode, no grad), and its dropped rows as the role says."""
    inner = part.random_ltd_layer
    slot: PartsSlot = part._slot
    verdict = LayerVerdict(slot.wrapper.__dict__.get("_ltd_name", "") if slot.wrapper is not None else "",
                           f"{type(inner).__name__} ({part.list_name}[{slot.layer}])", "exact", calls=1,
                           method=PART_METHOD)
    b, s = hidden.shape[:2]
    verdict.reserved_length, verdict.seq_len = int(idx.shape[1]), s
    verdict.tolerance, verdict.dtype = tolerance_for(hidden.dtype, hidden.device)
    kept = torch.zeros(b, s, dtype=torch.bool, device=idx.device).scatter(1, idx, True)
    dropped_ok = out.detach()[~kept]
    expected = hidden.detach()[~kept].to(out.dtype) if part.role == NORM else torch.zeros_like(dropped_ok)
    if not torch.equal(dropped_ok, expected):
        verdict.status = "wrong"
        verdict.cause = f"the dropped tokens of the part {part.list_name}[{slot.layer}] are not its {part.role} rows"
        return verdict
    from .verify_compare import error_of

    with isolated(inner):
        sub = run_on_kept(inner, hidden.detach(), idx, part.role)
        full = inner(hidden.detach())
    verdict.max_error = error_of(sub[kept], full[kept])
    if verdict.max_error > (verdict.tolerance or 0.0):
        verdict.status = "wrong"
        verdict.cause = (f"the part {part.list_name}[{slot.layer}] ({type(inner).__name__}) is not per token: on the "
                         "kept tokens alone it gives other values than on all tokens at those positions, so it mixes "
                         "tokens")
    return verdict


def proxies_for(root: nn.Module, layout: PartsLayout, layers: Sequence[int]) -> dict[int, list[tuple[str, LayerPart]]]:
    """One slot per chosen layer and the proxies of its parts ``(qualified name, proxy)`` (nothing changed yet)."""
    owner = root.get_submodule(layout.owner) if layout.owner else root
    out: dict[int, list[tuple[str, LayerPart]]] = {}
    for i in layers:
        slot = PartsSlot(layout, i)
        parts = []
        for name, role in layout.roles().items():
            module = getattr(owner, name)[i]
            if isinstance(module, LayerPart):
                raise ConversionError(f"{name}[{i}] of {layout.owner or '<root>'} is already a random-LTD part; "
                                      "revert_random_ltd(model) first.")
            parts.append((".".join(p for p in (layout.owner, name, str(i)) if p), LayerPart(module, slot, name, role)))
        out[i] = parts
    return out


@dataclass
class PartsPlan:
    """What conversion adds for the chosen layers kept as parts: a slot per wrapped attention, the proxies."""

    slots: dict[str, PartsSlot]  # qualified name of the attention -> its slot
    proxies: list[tuple[str, LayerPart]]
    owners: dict[str, list[PartsSlot]]  # qualified name of each module that owns lists -> its slots

    def attach(self, root: nn.Module, wrappers: dict[str, RandomLayerTokenDrop]) -> None:
        """Link each wrapped attention to its slot, put the proxies in place, clear the slots on each owner forward."""
        for name, slot in self.slots.items():
            slot.wrapper = wrappers[name]
            wrappers[name]._parts = slot
        for name, proxy in self.proxies:
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, attr, proxy)
        for owner in self.owners:
            (root.get_submodule(owner) if owner else root).register_forward_pre_hook(clear_slots)


def clear_slots(owner: nn.Module, *_: Any) -> None:
    """Forward pre-hook of the module that owns the lists: a new forward, no indices of an earlier one.
    (A module-level function that reads the slots from the module it is called on: a deep copy or a
    pickle of the model gets a hook that clears its own slots.)"""
    attentions = owner._modules.get(ATTENTION)
    for attention in attentions.children() if attentions is not None else ():
        slot = attention.__dict__.get("_parts")
        if slot is not None:
            slot.clear()


def plan_parts(root: nn.Module, names: Sequence[str]) -> PartsPlan:
    """Find the chosen layers (qualified names) that are attentions of a parts layout and plan their proxies.

    Raises:
        ConversionError: a chosen module is another part of such a layout (an FFN or a norm), or belongs to
            parallel lists that cannot be wrapped exactly (cross-attention parts, an unknown loop order).
    """
    chosen: dict[tuple[str, PartsLayout], list[tuple[int, str]]] = {}
    for name in names:
        path, _, index = name.rpartition(".")
        owner, _, list_name = path.rpartition(".")
        if list_name not in LISTS or not index.isdigit():
            continue
        layout = layout_of(root, owner)
        if layout is None:
            continue
        if isinstance(layout, str):
            raise ConversionError(f"cannot wrap {name!r}: {layout}; random-LTD cannot drop tokens in its layers "
                                  "exactly. The model is unchanged.")
        if list_name != ATTENTION:
            raise ConversionError(
                f"cannot wrap {name!r}: it is one part of a layer kept in parallel lists ({', '.join(LISTS)}); "
                f"random-LTD wraps the layer's attention ({owner + '.' if owner else ''}{ATTENTION}.{index}) and runs "
                "the other parts on its kept tokens. Convert without layer_type=/filter_fn= (or choose the attention "
                "list). The model is unchanged."
            )
        chosen.setdefault((owner, layout), []).append((int(index), name))
    plan = PartsPlan({}, [], {})
    for (owner, layout), members in chosen.items():
        parts = proxies_for(root, layout, [i for i, _ in members])
        for i, name in members:
            slot = parts[i][0][1]._slot
            plan.slots[name] = slot
            plan.proxies.extend(parts[i])
            plan.owners.setdefault(owner, []).append(slot)
    return plan


def detach_parts(root: nn.Module) -> None:
    """Put every proxied part's original back and remove the owners' hooks (``revert_random_ltd``)."""
    proxies = [(n, m) for n, m in root.named_modules() if isinstance(m, LayerPart)]
    for name, proxy in proxies:
        proxy._slot.clear()
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, proxy.random_ltd_layer)
    for module in root.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, fn in hooks.items() if fn is clear_slots]:
            del hooks[key]
