"""The independent reference for models whose layers are parallel lists of parts (XLM, FlauBERT).

No module of these models is a layer (``random_ltd_cli.parts``), so the reference is per *layer*
and runs the model's own loop: for wrapped layer ``i``, a plain copy of the model's stack module
with its four lists cut down to layer ``i``'s original parts (``n_layers = 1``) is fed the
converted model's input of layer ``i`` (``output_hidden_states``: a forward hook on the embedding
norm hands it over), and its attention's mask gets the non-kept keys disallowed (the kept indices
recorded from the wrapper's sampler; a query keeps itself). Its output, read at the kept rows, must
match the converted model's output of layer ``i``; the dropped rows must equal the input of the
layer exactly. No code of the library's gather/scatter or of its proxies is used here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from random_ltd_cli import random_ltd_layers

from .reference import ATOL, RTOL, Outcome, Recording

LISTS = ("attentions", "layer_norm1", "ffns", "layer_norm2")


def is_parts_model(model: nn.Module) -> bool:
    return any(getattr(w, "dropped", "input") == "zero" for _, w in random_ltd_layers(model))


def _inner(module: nn.Module) -> nn.Module:
    """The original module inside a wrapper or a proxy (read by attribute, nothing of the library called)."""
    return module._modules.get("random_ltd_layer", module)


def _stack_owner(model: nn.Module) -> tuple[str, nn.Module]:
    names = {n.rpartition(".")[0].rpartition(".")[0] for n, _ in random_ltd_layers(model)}
    assert len(names) == 1, f"wrapped attentions under several modules: {sorted(names)}"
    name = names.pop()
    return name, model.get_submodule(name)


def _sliced(owner: nn.Module, i: int) -> nn.Module:
    """A plain copy of the stack module (same class and config) running only layer ``i``'s original parts."""
    plain = type(owner)(owner.config)
    plain.load_state_dict({k: v for k, v in owner.state_dict().items() if not k.startswith(LISTS)}, strict=False)
    for name in LISTS:
        setattr(plain, name, nn.ModuleList([_inner(getattr(owner, name)[i])]))
    plain.n_layers = 1
    plain.layerdrop = 0.0
    return plain.eval()


def _restricted(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The attention's mask (``[B,S]`` keys or ``[B,S,S]``) as ``[B,S,S]`` with the non-kept keys disallowed."""
    b, s = mask.shape[0], mask.shape[-1]
    allowed = mask.bool() if mask.dim() == 3 else mask.bool()[:, None, :].expand(b, s, s)
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
    ok = kept[:, None, :] | torch.eye(s, dtype=torch.bool)[None]
    return (allowed & ok).to(mask.dtype)


def _kept_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, S, 1] bool: the kept rows of ``t [B, S, H]``."""
    return torch.zeros(t.shape[:2], dtype=torch.bool).scatter(1, idx, True)[..., None]


def masked_reference(owner: nn.Module, idx: dict[int, torch.Tensor], pre_norm: bool) -> list[Any]:
    """Hooks that turn an *unconverted* stack module into a differentiable reference for fixed kept indices
    (layer -> ``[B, r]``): every part runs on all tokens, the attention's keys restricted to the kept ones,
    and the dropped rows are selected away with ``torch.where``/a 0-1 factor on full tensors, so that
    autograd, not the library's gathers and scatters, gives the gradients. Returns the hook handles."""
    handles = []
    for i, kept_idx in idx.items():
        def restrict(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     _idx: torch.Tensor = kept_idx) -> tuple[Any, Any]:
            return (args[0], _restricted(args[1], _idx), *args[2:]), kwargs

        def zero_attention(_m: nn.Module, _a: tuple[Any, ...], out: Any, _idx: torch.Tensor = kept_idx) -> Any:
            return (torch.where(_kept_rows(out[0], _idx), out[0], 0.0), *out[1:])

        def zero_rows(_m: nn.Module, _a: tuple[Any, ...], out: torch.Tensor,
                      _idx: torch.Tensor = kept_idx) -> torch.Tensor:
            return torch.where(_kept_rows(out, _idx), out, 0.0)

        def identity_rows(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor,
                          _idx: torch.Tensor = kept_idx) -> torch.Tensor:
            return torch.where(_kept_rows(out, _idx), out, args[0])

        handles += [owner.attentions[i].register_forward_pre_hook(restrict, with_kwargs=True),
                    owner.attentions[i].register_forward_hook(zero_attention),
                    owner.ffns[i].register_forward_hook(zero_rows)]
        if not pre_norm:  # post-norm: the norms' dropped rows pass unchanged (pre-norm's feed only zeroed parts)
            handles += [owner.layer_norm1[i].register_forward_hook(identity_rows),
                        owner.layer_norm2[i].register_forward_hook(identity_rows)]
    return handles


def check_parts_exact(batches: list[dict[str, torch.Tensor]], model: nn.Module) -> Outcome:
    """Compare every wrapped layer of a converted parts model with the per-layer reference, on each batch.

    Raises:
        AssertionError: a layer differs from the reference (the message says where).
    """
    owner_name, owner = _stack_owner(model)
    layers = random_ltd_layers(model)
    outcome = Outcome(stack=f"{owner_name}.attentions",
                      layer_class=f"{type(_inner(layers[0][1])).__name__}; layer_norm1, ffns, layer_norm2 run on "
                                  "the kept tokens",
                      wrapped=[n for n, _ in layers])
    recorders = {}
    for name, wrapper in layers:
        rec = Recording(wrapper.sampler)
        wrapper.sampler = rec
        recorders[int(name.rpartition(".")[2])] = rec
    masks: dict[int, torch.Tensor] = {}
    for i in recorders:
        def keep_mask(_m: nn.Module, args: tuple[Any, ...], _i: int = i) -> None:
            masks[_i] = args[1]

        owner.attentions[i].register_forward_pre_hook(keep_mask)  # on the wrapper: the model's full-length mask
    for batch in batches:
        for rec in recorders.values():
            rec.calls.clear()
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        states = out.hidden_states
        assert len(states) == owner.n_layers + 1, f"{len(states)} hidden states for {owner.n_layers} layers"
        for i, rec in recorders.items():
            assert len(rec.calls) == 1, f"attentions.{i} drew {len(rec.calls)} times in one forward"
            diff = _compare_layer(owner, i, batch, states[i], states[i + 1], rec.calls[0], masks[i])
            outcome.max_diff = max(outcome.max_diff, diff)
    return outcome


def _compare_layer(owner: nn.Module, i: int, batch: dict[str, torch.Tensor], x: torch.Tensor, got: torch.Tensor,
                   idx: torch.Tensor, mask: torch.Tensor) -> float:
    ref_model = _sliced(owner, i)
    ref_model.layer_norm_emb.register_forward_hook(lambda *_: x.clone())  # layer i's input in the converted model
    restricted = _restricted(mask, idx)

    def restrict(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return (args[0], restricted, *args[2:]), kwargs

    handle = ref_model.attentions[0].register_forward_pre_hook(restrict, with_kwargs=True)  # on the original module
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "cache")}
    try:
        with torch.no_grad():
            ref = ref_model(**inputs).last_hidden_state
    finally:
        handle.remove()
    b, s = x.shape[:2]
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(got[~kept], x[~kept]), f"layer {i}: dropped tokens changed"
    torch.testing.assert_close(got[kept], ref[kept], atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"layer {i}: kept tokens differ from the reference: {m}")
    return float((got[kept] - ref[kept]).abs().max())
