"""Model conversion: find a model's transformer layers, wrap them in place, unwrap them, rename state dicts.

``convert_to_random_ltd`` validates everything before it touches the model: if any check
fails, the model is left exactly as it was.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .adapters import find_adapter, refusal
from .alignment import parse_seq_args
from .deepspeed_config import ConfigSource, RandomLTDConfig, read_deepspeed_config
from .errors import ConfigError, ConversionError
from .keys import SEGMENT, rename_keys, strip_key
from .layer import RandomLayerTokenDrop, ReservedLength
from .mixers import classify, warn_mixed_stack
from .parts import detach_parts, plan_parts
from .schedule import RandomLTDScheduler
from .stacks import STACKS, SharedCall, candidates_text, find_layer_stack, find_layer_stacks, kind, shared_calls
from .verify import check_verify_mode

__all__ = [
    "convert_to_random_ltd",
    "find_layer_stack",
    "find_layer_stacks",
    "match_layers",
    "parse_layer_spec",
    "random_ltd_layers",
    "random_ltd_scheduler",
    "remove_random_ltd_state_dict",
    "revert_random_ltd",
    "save_without_random_ltd",
    "select_layers",
]

LayerSpec = str | int | Sequence[int] | range
FilterFn = Callable[[nn.Module, str], bool]


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside ``DataParallel`` / ``DistributedDataParallel`` (or the model itself)."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, parallel):
        model = model.module
    return model


def random_ltd_layers(model: nn.Module) -> list[tuple[str, RandomLayerTokenDrop]]:
    """The wrapped layers of ``model`` as ``(qualified name, wrapper)`` pairs, in module order."""
    return [(n, m) for n, m in unwrap_parallel(model).named_modules() if isinstance(m, RandomLayerTokenDrop)]


def random_ltd_scheduler(model: nn.Module) -> ReservedLength | None:
    """The scheduler the model's random-LTD layers read (the first one's), or ``None``."""
    return next((w.scheduler for _, w in random_ltd_layers(model) if w.scheduler is not None), None)


def parse_layer_spec(spec: LayerSpec) -> str | list[int]:
    """Normalise a layer selection: ``"middle"``, ``"all"``, ``"1-10"``, ``"1,3,5"``, an int, a list or range.

    Ranges in strings are inclusive (``"1-3"`` is layers 1, 2 and 3).

    Raises:
        ConfigError: the text is none of these forms.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("middle", "all", "attention"):
            return text
        out: list[int] = []
        for part in text.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*|\s*(-?\d+)\s*", part)
            if match is not None and match.group(1) is not None and int(match.group(2)) < int(match.group(1)):
                lo, hi = match.group(2), match.group(1)
                raise ConfigError(
                    f"layers={spec!r}: the range {part.strip()!r} is reversed (it ends before it starts); "
                    f"write it low-high, e.g. '{lo}-{hi}'."
                )
            if match is None:
                raise ConfigError(
                    f"layers={spec!r} is not a layer selection: use 'middle', 'attention', 'all', a range such as "
                    "'1-10' or a list such as '1,3,5' (indices among the matched layers)."
                )
            if match.group(1) is not None:
                out.extend(range(int(match.group(1)), int(match.group(2)) + 1))
            else:
                out.append(int(match.group(3)))
        return out
    if isinstance(spec, bool):
        raise ConfigError(f"layers={spec!r} is not a layer selection.")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (range, Sequence)):
        values: list[int] = []
        for v in spec:
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"layers={spec!r} must hold integer indices among the matched layers.")
            values.append(v)
        return values
    raise ConfigError(f"layers={spec!r} is not a layer selection: use 'middle', 'all', an int, a list or a range.")


def select_layers(candidates: Sequence[tuple[str, nn.Module]], layers: LayerSpec) -> list[int]:
    """Indices into ``candidates`` chosen by ``layers`` (see :func:`parse_layer_spec`).

    ``"middle"`` is every layer but the first and the last, as the paper recommends; ``"attention"``
    selects the same positions (:func:`convert_to_random_ltd` then keeps only the attention layers).
    """
    spec = parse_layer_spec(layers)
    if spec == "attention":
        spec = "middle"
    n = len(candidates)
    if spec == "all":
        return list(range(n))
    if spec == "middle":
        if n < 3:
            raise ConversionError(
                f"layers='middle' selects nothing: only {n} matching layer(s) were found, and the first and the "
                "last always see every token. Use layers='all' or explicit indices."
            )
        return list(range(1, n - 1))
    assert not isinstance(spec, str)
    chosen: list[int] = []
    for i in spec:
        if not -n <= i < n:
            kind = type(candidates[0][1]).__name__ if candidates else "layer"
            raise ConversionError(
                f"layer index {i} is out of range: the model has {n} matching layers ({kind}) at indices 0..{n - 1}."
            )
        j = i % n
        if j not in chosen:
            chosen.append(j)
    if not chosen:
        raise ConversionError(f"layers={layers!r} selects no layer.")
    return sorted(chosen)


def convert_to_random_ltd(
    model: nn.Module,
    layer_type: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    *,
    layers: LayerSpec = "middle",
    filter_fn: FilterFn | None = None,
    scheduler: ReservedLength | None = None,
    batch_first: bool | None = None,
    seed: int | None = None,
    reserved_length: int | None = None,
    hidden_name: str | None = None,
    mask_names: Iterable[str] | None = None,
    keep_prefix: int = 0,
    keep_document_starts: bool = True,
    on_unsupported: str = "error",
    ds_config: ConfigSource | RandomLTDConfig | None = None,
    stack: str | None = None,
    seq_args: Mapping[str, str] | None = None,
    verify: str = "first",
) -> nn.Module:
    """Wrap the chosen layers of ``model`` in :class:`RandomLayerTokenDrop`, in place.

    Args:
        model: any ``nn.Module`` (``DataParallel``/``DistributedDataParallel`` are unwrapped).
        layer_type: the layer class (or tuple of classes) to wrap. ``None`` finds the model's
            stack of transformer layers (the repeated class in its largest ``nn.ModuleList``;
            the encoder's in an encoder-decoder model, see ``stack``). A model that keeps its layers
            as parallel lists of parts (XLM, FlauBERT: ``attentions``, ``layer_norm1``, ``ffns``,
            ``layer_norm2``) gets its attention list wrapped with ``dropped="zero"`` and the other
            parts of each chosen layer proxied to run on its kept tokens (:mod:`random_ltd_cli.parts`).
        layers: which of the matched layers to wrap: ``"middle"`` (all but the first and the
            last, of each stack; layers matched by ``layer_type``/``filter_fn`` in several
            containers of three or more, such as CLIP's two towers, count as one stack each),
            ``"attention"`` (the middle layers whose token mixing is attention, in a hybrid
            stack; see :mod:`random_ltd_cli.mixers`), ``"all"``, indices (list, range, ``"1-10"``, ``"1,3,5"``;
            with ``stack="both"`` they count the encoder's layers first, then the decoder's).
        filter_fn: ``(module, qualified_name) -> bool`` to restrict (or, without
            ``layer_type``, define) the matched layers.
        scheduler: gives the reserved length (``get_current_seq()``); shared by all layers.
        batch_first: layout of the hidden states; ``None`` reads the layer's own
            ``batch_first`` attribute when it has one, else assumes ``[B,S,H]``.
        seed: ``None`` samples from the global RNG; an int gives each layer a private
            generator (identical indices on every rank with the same seed).
        reserved_length: a fixed ``r`` instead of a scheduler.
        hidden_name: the forward parameter holding the hidden states (default: found by name).
        mask_names: forward parameters holding attention masks (default: the usual names).
        keep_prefix: always keep the first ``k`` tokens (e.g. ``[CLS]``).
        keep_document_starts: always keep tokens whose ``position_ids`` are 0.
        on_unsupported: ``"error"`` or ``"passthrough"`` for arguments that cannot be gathered.
        ds_config: a DeepSpeed config (dict, JSON path, its ``random_ltd`` block or a parsed
            :class:`RandomLTDConfig`): supplies ``random_ltd_layer_id`` (as ``layers``, when
            ``layers`` is left at ``"middle"``), ``model_mask_name``, ``hidden_state_order`` and,
            when no ``scheduler`` is given, the schedule (which needs ``train_batch_size``).
            Explicit arguments win. ``total_layer_num`` must equal the number of matched layers.
        stack: in an encoder-decoder model (T5, BART...), ``"encoder"`` (the default),
            ``"decoder"`` (self-attention queries and keys are the kept tokens; cross-attention
            reads every encoder token) or ``"both"``.
        seq_args: how the layers' own arguments line up with the sequence, e.g.
            ``{"my_bias": "b h q k"}`` (see :class:`RandomLayerTokenDrop`).
        verify: ``"first"`` (default: each wrapped layer is checked against the verifier's
            reference on its first dropping call, and again when its argument signature changes),
            ``"always"`` (every dropping call) or ``"off"``; see :mod:`random_ltd_cli.verify`.

    Returns:
        ``model`` itself, converted.

    Raises:
        ConversionError: no layer matches, an index is out of range, a layer has no
            hidden-state argument, a chosen layer cannot drop tokens exactly (e.g. Swin's
            windowed layers; the message names them and the compatible indices), or the model
            is already converted. The model is unchanged.
        ConfigError: a setting that cannot work.
    """
    root = unwrap_parallel(model)
    existing = random_ltd_layers(root)
    if existing:
        names = ", ".join(n or "<root>" for n, _ in existing[:4])
        raise ConversionError(
            f"{type(root).__name__} is already converted ({len(existing)} random-LTD layers: {names}"
            f"{', ...' if len(existing) > 4 else ''}); call revert_random_ltd(model) first to convert it again."
        )
    user_args = parse_seq_args(seq_args)
    check_verify_mode(verify)
    groups, shared = _candidate_groups(root, layer_type, filter_fn, stack)
    candidates = [c for group in groups for c in group]
    if ds_config is not None:
        cfg = ds_config if isinstance(ds_config, RandomLTDConfig) else read_deepspeed_config(ds_config)
        layers, mask_names, batch_first, scheduler = _apply_deepspeed(
            cfg, len(candidates), layers, mask_names, batch_first, scheduler
        )
    refused, mixers = classify([layer for _, layer in candidates], refusal)
    if refused and len(refused) == len(candidates):
        _, first = candidates[0]
        raise ConversionError(
            f"random-LTD cannot drop tokens in {type(first).__name__} exactly: {next(iter(refused.values()))}. "
            f"The model is unchanged; train {type(root).__name__} without random-LTD."
        )
    chosen = _select(groups, layers)
    if parse_layer_spec(layers) == "attention":
        chosen = [i for i in chosen if i not in mixers]
        if not chosen:
            raise ConversionError(
                f"layers='attention' selects nothing in {type(root).__name__}: none of the middle layers of its "
                "stack mixes tokens with attention. The model is unchanged."
            )
    _check_refused(candidates, chosen, refused, mixers)
    plans: dict[str, tuple[nn.Module, list[int], SharedCall | None]] = {}
    for i in chosen:  # a shared layer (ALBERT) is wrapped once, dropping in its chosen calls
        label, layer = candidates[i]
        call = shared.get(label)
        plans.setdefault(call.name if call else label, (layer, [], call))[1].append(call.call if call else 0)
    parts = plan_parts(root, list(plans))  # layers kept as parallel lists of parts (XLM): attention + proxies
    wrappers: list[tuple[str, RandomLayerTokenDrop, SharedCall | None]] = []
    for layer_id, (name, (layer, calls, call)) in enumerate(plans.items()):
        bf = batch_first if batch_first is not None else _layer_batch_first(layer)
        try:
            wrapper = RandomLayerTokenDrop(
                layer, scheduler=scheduler, reserved_length=reserved_length, batch_first=bf,
                hidden_name=hidden_name, mask_names=mask_names, keep_prefix=keep_prefix,
                keep_document_starts=keep_document_starts, seed=seed, layer_id=layer_id,
                on_unsupported=on_unsupported,  # type: ignore[arg-type]
                seq_args=user_args, verify=verify,  # type: ignore[arg-type]
                calls=calls if call else None, calls_per_forward=call.calls_per_forward if call else None,
                dropped="zero" if name in parts.slots else "input",
            )
        except (ConversionError, ConfigError) as exc:
            raise type(exc)(f"cannot wrap {name!r}: {exc}") from None
        wrapper.__dict__["_ltd_name"] = name  # for the verifier's messages
        wrappers.append((name, wrapper, call))
    for name, wrapper, _ in wrappers:  # every check passed: now mutate
        _set_submodule(root, name, wrapper)
    parts.attach(root, {n: w for n, w, _ in wrappers})
    if layer_type is None and filter_fn is None:  # a stack conversion found (an explicit choice needs no warning)
        warn_mixed_stack(candidates, chosen)
    _count_shared_calls(root, [(w, c) for _, w, c in wrappers if c is not None])
    return model


def _count_shared_calls(root: nn.Module, shared: list[tuple[RandomLayerTokenDrop, SharedCall]]) -> None:
    """Each forward of the module that runs a shared layer's calls restarts the wrappers' call count."""
    owners: dict[str, list[RandomLayerTokenDrop]] = {}
    for wrapper, call in shared:
        owners.setdefault(call.owner, []).append(wrapper)
    for owner, members in owners.items():
        def reset(*_: Any, _members: list[RandomLayerTokenDrop] = members) -> None:
            for w in _members:
                w.reset_calls()

        handle = root.get_submodule(owner).register_forward_pre_hook(reset)
        for w in members:
            w.__dict__["_reset_hook"] = handle


def revert_random_ltd(model: nn.Module) -> nn.Module:
    """Unwrap every random-LTD layer in place; the layers (and their parameters) are the same objects.

    A model with no random-LTD layers is returned unchanged.
    """
    root = unwrap_parallel(model)
    for name, wrapper in random_ltd_layers(root):
        hook = wrapper.__dict__.pop("_reset_hook", None)
        if hook is not None:
            hook.remove()
        inner = wrapper.random_ltd_layer
        if name:
            _set_submodule(root, name, inner)
        else:
            raise ConversionError(
                "the model itself is a RandomLayerTokenDrop; use model.random_ltd_layer to get the wrapped layer."
            )
    detach_parts(root)
    return model


def remove_random_ltd_state_dict(state_dict: Mapping[str, Any]) -> collections.OrderedDict[str, Any]:
    """Rename keys by removing the whole ``random_ltd_layer`` segment; values and order kept, nothing deleted.

    ``a.random_ltd_layer.w -> a.w``; ``a.random_ltd_layers.w`` and ``a.my_random_ltd_layer.w`` are untouched.
    The torch ``_metadata`` attribute of a state dict is renamed alike.

    Raises:
        KeyCollisionError: two keys would become one (e.g. both ``a.w`` and ``a.random_ltd_layer.w``).
    """
    names = rename_keys(state_dict.keys())
    out = collections.OrderedDict((names[k], v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
            (strip_key(k) if k else k, v) for k, v in metadata.items() if k != SEGMENT
        )
    return out


def save_without_random_ltd(model: nn.Module) -> collections.OrderedDict[str, Any]:
    """The model's state dict with plain (unwrapped) keys, as if it had never been converted."""
    return remove_random_ltd_state_dict(unwrap_parallel(model).state_dict())


# -- private helpers -----------------------------------------------------------------------


def _apply_deepspeed(
    cfg: RandomLTDConfig,
    n_matched: int,
    layers: LayerSpec,
    mask_names: Iterable[str] | None,
    batch_first: bool | None,
    scheduler: ReservedLength | None,
) -> tuple[LayerSpec, Iterable[str] | None, bool | None, ReservedLength | None]:
    """Fill the settings a DeepSpeed random_ltd block provides and the caller left open."""
    if cfg.total_layer_num != n_matched:
        raise ConfigError(
            f"{cfg.source}: total_layer_num={cfg.total_layer_num} but the model has {n_matched} matching layers; "
            "set total_layer_num to the number of transformer layers (or choose the layers with layer_type=)."
        )
    if layers == "middle" and cfg.random_ltd_layer_id is not None:
        layers = list(cfg.random_ltd_layer_id)
    if mask_names is None and cfg.model_mask_name:
        mask_names = [cfg.model_mask_name]
    if batch_first is None:
        batch_first = cfg.batch_first
    if scheduler is None:
        scheduler = RandomLTDScheduler.from_config(cfg)
    return layers, mask_names, batch_first, scheduler


def _candidate_groups(
    root: nn.Module,
    layer_type: type[nn.Module] | tuple[type[nn.Module], ...] | None,
    filter_fn: FilterFn | None,
    stack: str | None,
) -> tuple[list[list[tuple[str, nn.Module]]], dict[str, SharedCall]]:
    """The candidate layers, one list per stack (several only with ``stack="both"``), and for a model
    that shares layers between calls (ALBERT) one candidate per call with its :class:`SharedCall`."""
    if layer_type is None and filter_fn is None:
        try:
            return [members for _, _, members in find_layer_stacks(root, stack)], {}
        except ConversionError:
            found = shared_calls(root) if stack is None else None
            if found is None:
                raise
            return [found[0]], found[1]
    matched = match_layers(root, layer_type, filter_fn)
    if stack is None:
        return _by_container(matched), {}
    if stack not in STACKS:
        raise ConfigError(f"stack={stack!r} must be 'encoder', 'decoder' or 'both' (or None for the default).")
    wanted = ("encoder", "decoder") if stack == "both" else (stack,)
    groups = [[(n, m) for n, m in matched if kind(n) == k] for k in wanted]
    groups = [g for g in groups if g]
    if not groups:
        raise ConversionError(f"stack={stack!r}: none of the matched layers is under an {stack} path.")
    return groups, {}


def _by_container(matched: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Matched layers grouped by the container holding them (CLIP's two towers), so that ``"middle"`` leaves the
    first and last layer of each stack whole; one group unless every container holds three or more."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in matched:
        groups.setdefault(name.rpartition(".")[0], []).append((name, module))
    if len(groups) > 1 and all(len(g) >= 3 for g in groups.values()):
        return list(groups.values())
    return [matched]


def _select(groups: list[list[tuple[str, nn.Module]]], layers: LayerSpec) -> list[int]:
    """Indices among the concatenated groups; ``"middle"`` is the middle of each group."""
    if len(groups) == 1 or parse_layer_spec(layers) not in ("middle", "attention"):
        return select_layers([c for g in groups for c in g], layers)
    chosen: list[int] = []
    offset = 0
    for group in groups:
        chosen.extend(offset + i for i in select_layers(group, layers))
        offset += len(group)
    return chosen


def _check_refused(candidates: list[tuple[str, nn.Module]], chosen: list[int], refused: dict[int, str],
                   mixers: dict[int, str]) -> None:
    bad = [i for i in chosen if i in refused]
    if not bad:
        return
    names = ", ".join(f"{i} ({candidates[i][0]})" for i in bad[:6]) + (", ..." if len(bad) > 6 else "")
    fine = [i for i in chosen if i not in refused]
    remedy = (f"wrap only the compatible ones, e.g. layers={fine}" if fine
              else "choose other layers with layers= or filter_fn=")
    if fine and all(i in mixers for i in bad):
        kept = ", ".join(sorted({type(candidates[i][1]).__name__ for i in fine}))
        remedy = (f"this stack mixes attention layers with other token mixers: layers='attention' wraps only its "
                  f"middle attention layers (indices {fine}, {kept})")
    raise ConversionError(
        f"random-LTD cannot drop tokens exactly in layers {names} of {type(candidates[bad[0]][1]).__name__}: "
        f"{refused[bad[0]]}. The model is unchanged; {remedy}."
    )


def match_layers(
    root: nn.Module,
    layer_type: type[nn.Module] | tuple[type[nn.Module], ...] | None,
    filter_fn: FilterFn | None,
) -> list[tuple[str, nn.Module]]:
    """The candidate layers ``(qualified name, module)`` for ``layer_type``/``filter_fn`` (or the layer stack).

    Raises:
        ConversionError: nothing matches (the message lists the repeated classes found).
    """
    if layer_type is None and filter_fn is None:
        return find_layer_stack(root)[2]
    if layer_type is not None:
        types = layer_type if isinstance(layer_type, tuple) else (layer_type,)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise ConfigError(f"layer_type={layer_type!r} must be an nn.Module subclass or a tuple of them.")
    matched: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(m + ".") for m, _ in matched):
            continue  # the model itself, or inside an already matched layer: keep the outermost
        if layer_type is not None and not isinstance(module, layer_type):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        matched.append((name, module))
    if not matched:
        what = f"layer_type={_type_names(layer_type)}" if layer_type is not None else "filter_fn"
        if layer_type is not None and filter_fn is not None:
            what += " and filter_fn"
        raise ConversionError(f"no layer of {type(root).__name__} matches {what}; {candidates_text(root)}.")
    return matched


def _layer_batch_first(layer: nn.Module) -> bool:
    """The layout a layer declares (``nn.TransformerEncoderLayer`` keeps it on its attention, open_clip's
    blocks on ``attn``; Megatron-core's layers are sequence-first, see its adapter), else ``True``."""
    adapter = find_adapter(layer)
    if adapter is not None and adapter.batch_first is not None:
        return adapter.batch_first
    for owner in (layer, getattr(layer, "self_attn", None), getattr(layer, "attn", None)):
        value = getattr(owner, "batch_first", None)
        if isinstance(value, bool):
            return value
    return True


def _type_names(layer_type: Any) -> str:
    types = layer_type if isinstance(layer_type, tuple) else (layer_type,)
    return ", ".join(t.__name__ for t in types)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)
