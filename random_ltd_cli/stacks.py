"""Finding a model's transformer layers: repeated-layer stacks, encoder/decoder stacks, shared layers.

Nothing here changes the model; :mod:`random_ltd_cli.convert` wraps what these functions find.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError, ConversionError

__all__ = ["STACKS", "SharedCall", "candidates_text", "find_layer_stack", "find_layer_stacks", "kind", "shared_calls"]

STACKS = ("encoder", "decoder", "both")


def _stacks(model: nn.Module) -> list[tuple[tuple[int, int, int], str, type[nn.Module], list[tuple[str, nn.Module]]]]:
    """Every ``ModuleList``/``ModuleDict``/``Sequential`` holding two or more layers of one class, with a rank
    (torchtitan and OLMo-core keep their blocks in an ``nn.ModuleDict`` keyed by layer number)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            continue
        children = list(module.named_children())
        counts = collections.Counter(type(child) for _, child in children)
        if not counts:
            continue
        cls, count = counts.most_common(1)[0]
        if count < 2 or cls in (nn.ModuleList, nn.ModuleDict, nn.Sequential):
            continue
        mixed = isinstance(module, nn.ModuleList) and all(_same_kind(type(c), cls) for _, c in children)
        members = [(f"{name}.{n}" if name else n, c) for n, c in children if type(c) is cls or mixed]
        params = sum(p.numel() for _, c in members for p in c.parameters())
        listed = isinstance(module, (nn.ModuleList, nn.ModuleDict))
        found.append(((int(listed), count, params), name, cls, members))
    return found


def _side_tower(name: str) -> bool:
    """A stack under a vision/audio tower of a multimodal model (``git.image_encoder.vision_model...``)."""
    return any(w in s for s in name.lower().split(".") for w in ("vision", "image", "visual", "audio"))


def _same_kind(a: type[nn.Module], b: type[nn.Module]) -> bool:
    """Two layer classes of one mixed stack (``JambaAttentionDecoderLayer``, ``JambaMambaDecoderLayer``)."""
    if a is b:
        return True
    suffix = next((w for w in ("Layer", "Block") if b.__name__.endswith(w)), None)
    return suffix is not None and a.__name__.endswith(suffix) and a.__module__ == b.__module__


_Found = tuple[tuple[int, int, int], str, type[nn.Module], list[tuple[str, nn.Module]]]


def _parallel_lists(model: nn.Module, found: list[_Found], chosen: _Found) -> _Found:
    """A stack that is one of several parallel lists of layer parts (XLM: ``attentions``, ``ffns``...): the
    attention list when the lists are a layout :mod:`random_ltd_cli.parts` wraps exactly, else refused."""
    from .parts import ATTENTION, LISTS, layout_of

    parent = chosen[1].rpartition(".")[0]
    siblings = [f for f in found if f[1] != chosen[1] and f[1].rpartition(".")[0] == parent
                and len(f[3]) == len(chosen[3]) and f[2] is not chosen[2]]
    if not siblings:
        return chosen
    layout = layout_of(model, parent)
    if layout is not None and not isinstance(layout, str) and chosen[1].rpartition(".")[2] in LISTS:
        attention = ".".join(p for p in (parent, ATTENTION) if p)
        stack = next((f for f in [chosen, *siblings] if f[1] == attention), None)
        if stack is not None:
            return stack
    names = ", ".join(f"{f[1]} ({f[2].__name__})" for f in [chosen, *siblings])
    why = f" ({layout})" if isinstance(layout, str) else ""
    raise ConversionError(
        f"no module of this model is a whole transformer layer: it keeps the parts of its layers in parallel lists "
        f"({names}) and adds their residuals and norms in the model's own loop{why}, so no module can be wrapped for "
        "the dropped tokens to pass through a layer unchanged (wrapping one list would change them). Train it "
        "without random-LTD, or restructure it into one module per layer."
    )


def kind(name: str) -> str | None:
    """``"decoder"``/``"encoder"`` when a segment of the stack's path says so (``model.decoder.layers``)."""
    segments = name.lower().split(".")
    if any("decoder" in s for s in segments):
        return "decoder"
    if any("encoder" in s for s in segments):
        return "encoder"
    return None


Stack = tuple[str, type[nn.Module], list[tuple[str, nn.Module]]]


def find_layer_stacks(model: nn.Module, stack: str | None = None) -> list[Stack]:
    """The model's stack(s) of transformer layers, each ``(container name, layer class, members)``.

    Without ``stack``: the repeated class in the largest ``nn.ModuleList`` (or ``nn.ModuleDict``); in an encoder-decoder
    model (stacks under an ``encoder`` and a ``decoder`` path) the encoder's, as in the random-LTD
    paper, which drops tokens in the layers that read the input. ``stack="encoder"``,
    ``"decoder"`` or ``"both"`` chooses explicitly (``"both"``: the encoder's, then the decoder's).

    Raises:
        ConversionError: no stack, or no stack of the kind asked for.
        ConfigError: ``stack`` is not one of ``encoder``, ``decoder``, ``both``.
    """
    if stack is not None and stack not in STACKS:
        raise ConfigError(f"stack={stack!r} must be 'encoder', 'decoder' or 'both' (or None for the default).")
    found = _stacks(model)
    if not found:
        raise ConversionError(
            "could not find a stack of transformer layers (an nn.ModuleList or nn.ModuleDict of repeated layers) in "
            f"{type(model).__name__}; {candidates_text(model)}. "
            "Pass layer_type= or filter_fn= to choose the layers."
        )
    by_kind = {k: max((f for f in found if kind(f[1]) == k), key=lambda f: f[0], default=None)
               for k in ("encoder", "decoder")}
    enc, dec = by_kind["encoder"], by_kind["decoder"]
    if stack is None:
        text = [f for f in found if not _side_tower(f[1])] or found  # a multimodal LM: its text stack
        chosen = [enc] if enc is not None and dec is not None else [max(text, key=lambda f: f[0])]
    else:
        wanted = ["encoder", "decoder"] if stack == "both" else [stack]
        missing = [k for k in wanted if by_kind[k] is None]
        if missing:
            names = ", ".join(f"{f[1]} ({f[2].__name__})" for f in found[:6])
            raise ConversionError(
                f"stack={stack!r}: {type(model).__name__} has no {missing[0]} stack of layers (stacks found: {names}); "
                "stack= chooses between the encoder and the decoder of an encoder-decoder model."
            )
        chosen = [f for k in wanted if (f := by_kind[k]) is not None]
    chosen = [_parallel_lists(model, found, f) for f in chosen]
    return [(f[1], f[2], f[3]) for f in chosen]


def find_layer_stack(model: nn.Module) -> tuple[str, type[nn.Module], list[tuple[str, nn.Module]]]:
    """Find the model's stack of transformer layers (see :func:`find_layer_stacks`; the default stack).

    Returns:
        ``(container name, layer class, [(qualified name, layer), ...])``.

    Raises:
        ConversionError: no ``ModuleList`` (or ``Sequential``) holds two or more layers of one class.
    """
    return find_layer_stacks(model)[0]


@dataclass(frozen=True)
class SharedCall:
    """One call of a layer shared between several layer calls (ALBERT): the module's name, which of
    its calls in one model forward this is, how many calls it gets per forward, and the module that
    runs the calls (its forward starts a new count)."""

    name: str
    call: int
    calls_per_forward: int
    owner: str


def shared_calls(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], dict[str, SharedCall]] | None:
    """ALBERT-style sharing (``config.num_hidden_groups`` groups of ``inner_group_num`` layers serve
    ``num_hidden_layers`` calls): one candidate per *call*, named ``"<layer> (call i)"``, in call order.

    ``None`` when the model does not share layers this way.
    """
    cfg = getattr(model, "config", None)
    groups_n, calls_n = getattr(cfg, "num_hidden_groups", None), getattr(cfg, "num_hidden_layers", None)
    if not (isinstance(groups_n, int) and isinstance(calls_n, int) and 0 < groups_n < calls_n):
        return None
    for owner_name, owner in model.named_modules():
        for list_name, groups in owner.named_children():
            if not isinstance(groups, nn.ModuleList) or len(groups) != groups_n:
                continue
            inner = [_inner_layers(g) for g in groups]
            if any(not layers for layers in inner):
                continue
            per_group = calls_n / groups_n
            candidates: list[tuple[str, nn.Module]] = []
            info: dict[str, SharedCall] = {}
            counts: collections.Counter[str] = collections.Counter()
            for i in range(calls_n):
                g = int(i / per_group)
                for sub, layer in inner[g]:
                    name = ".".join(p for p in (owner_name, list_name, str(g), sub) if p)
                    label = f"{name} (call {i})"
                    info[label] = SharedCall(name, counts[name], 0, owner_name)
                    counts[name] += 1
                    candidates.append((label, layer))
            info = {k: SharedCall(v.name, v.call, counts[v.name], v.owner) for k, v in info.items()}
            return candidates, info
    return None


def _inner_layers(group: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of one shared group: the members of its single ``ModuleList`` of one class."""
    lists = [(n, m) for n, m in group.named_children() if isinstance(m, nn.ModuleList) and len(m)]
    if len(lists) != 1:
        return []
    list_name, modules = lists[0]
    if len({type(m) for m in modules}) != 1:
        return []
    return [(f"{list_name}.{i}", m) for i, m in enumerate(modules)]


def candidates_text(model: nn.Module) -> str:
    counts = collections.Counter(
        type(m).__name__ for m in model.modules() if not isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict))
    )
    repeated = [(n, c) for n, c in counts.most_common() if c >= 2][:8]
    if not repeated:
        return "the model has no repeated module classes"
    return "candidate classes found: " + ", ".join(f"{n} x{c}" for n, c in repeated)
