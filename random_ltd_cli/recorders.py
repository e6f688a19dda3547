"""Output recorders on a wrapped layer must see full-length hidden states.

Hugging Face records ``output_hidden_states`` on the layer *class*, so the recorder sits on the
layer the wrapper holds and would see the ``r`` kept tokens. Two mechanisms exist:

* transformers 5: forward hooks (``register_forward_hook``) on the layer;
* transformers 4.5x: ``check_model_inputs`` replaces the layer's ``forward`` attribute, for the
  duration of one model call, with a ``make_capture_wrapper`` closure.

:func:`call_unrecorded` runs the layer on the kept tokens with both held back, and
:func:`replay_recorders` then gives them the call's full-length arguments and merged output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["SubmoduleRecords", "call_unrecorded", "dropped_rows", "replay_recorders"]

def _capture_wrapper(layer: Any) -> Callable[..., Any] | None:
    """The transformers 4.5x capture wrapper installed on ``layer.forward``, if any.

    It is recognised by its code (``functools.wraps`` copies the layer's own names onto it), so
    other instance-level ``forward`` patches, such as accelerate's device hooks, are left alone.
    """
    patched = layer.__dict__.get("forward")
    code = getattr(patched, "__code__", None)
    if code is None or code.co_name != "wrapped_forward":
        return None
    if not code.co_filename.replace("\\", "/").endswith("transformers/utils/generic.py"):
        return None
    return patched


def call_unrecorded(layer: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``layer(*args, **kwargs)`` with its forward hooks and capture wrapper held back (restored after)."""
    hooks = layer._forward_hooks
    capture = _capture_wrapper(layer)
    if not hooks and capture is None:
        return layer(*args, **kwargs)
    layer._forward_hooks = OrderedDict()
    if capture is not None:
        del layer.__dict__["forward"]
    try:
        return layer(*args, **kwargs)
    finally:
        layer._forward_hooks = hooks
        if capture is not None:
            layer.__dict__["forward"] = capture


def replay_recorders(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """Run the held-back recorders with the call's full-length ``args``/``kwargs`` and merged ``out``."""
    capture = _capture_wrapper(layer)
    if capture is not None:
        out = _replay_capture(capture, args, kwargs, out)
    for hook_id, hook in list(layer._forward_hooks.items()):
        if hook_id in layer._forward_hooks_with_kwargs:
            result = hook(layer, args, kwargs, out)
        else:
            result = hook(layer, args, out)
        if result is not None:
            out = result
    return out


def _replay_capture(capture: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """Call the capture wrapper with its inner forward swapped for one that returns ``out``."""
    inner = getattr(capture, "__wrapped__", None)
    cell = next((c for c in capture.__closure__ or () if _holds(c, inner)), None)
    if inner is None or cell is None:
        return out  # an unknown shape of wrapper: leave it unrecorded rather than record r-length states
    cell.cell_contents = lambda *a, **k: out
    try:
        return capture(*args, **kwargs)
    finally:
        cell.cell_contents = inner


def _holds(cell: Any, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


class SubmoduleRecords:
    """Recorders on modules *inside* a wrapped layer (transformers' router-logit recorders on a MoE
    router) would see ``B*r`` token rows while unwrapped layers report ``B*S``. During a dropping
    call their hooks are held back; afterwards they get the outputs with every token-row tensor
    scattered back to ``B*S`` rows. Dropped tokens were not routed in this layer: their rows are
    filled by :func:`dropped_rows`.

    ``with records.hold(flat, total):`` around the call (``flat``: the kept rows among ``total``
    token rows), then ``records.replay()``.
    """

    def __init__(self, layer: Any) -> None:
        self._inner = [m for m in layer.modules() if m is not layer]
        self._held: list[tuple[Any, OrderedDict[int, Any], list[tuple[Any, Any]]]] = []
        self._flat: Any = None
        self._total = 0

    def hold(self, flat: Any, total: int) -> SubmoduleRecords | None:
        """``self`` set up for one call, or ``None`` when no module inside has a capture hook (nothing to hold;
        the common case, and the one ``torch.compile`` traces without a graph break)."""
        if not any(_is_capture_hook(h) for m in self._inner for h in m._forward_hooks.values()):
            return None
        self._flat, self._total = flat, total
        return self

    def __enter__(self) -> SubmoduleRecords:
        self._held = []
        for module in self._inner:
            hooks = module._forward_hooks
            if not hooks or not any(_is_capture_hook(h) for h in hooks.values()):
                continue
            calls: list[tuple[Any, Any]] = []
            module._forward_hooks = OrderedDict((k, h) for k, h in hooks.items() if not _is_capture_hook(h))
            module.register_forward_hook(lambda _m, a, o, _calls=calls: _calls.append((a, o)))  # gone on exit
            self._held.append((module, hooks, calls))
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, hooks, _ in self._held:
            module._forward_hooks = hooks

    def replay(self) -> None:
        """Run the held-back capture hooks with full-length outputs (after the layer call)."""
        held, self._held = self._held, []
        for module, hooks, calls in held:
            for args, out in calls:
                full = _full_rows(out, self._flat, self._total)
                for hook in list(hooks.values()):
                    if _is_capture_hook(hook):
                        hook(module, args, full)


def _is_capture_hook(hook: Any) -> bool:
    return getattr(hook, "__name__", "") == "output_capturing_hook"


def dropped_rows(rows: int, width: int, like: Any) -> Any:
    """Router logits recorded for dropped tokens: ``-0.01 * ((e - n) mod E)`` for row ``n``, expert ``e``.

    Near-uniform probabilities: a constant share of the load-balancing statistics that carries no
    gradient; their top-k choices rotate over the experts row by row, so they count evenly for
    every expert rather than for the first ``k``.
    """
    import torch

    n = torch.arange(rows, device=like.device)[:, None]
    e = torch.arange(width, device=like.device)[None, :]
    return (torch.remainder(e - n, width) * -0.01).to(like.dtype)


def _full_rows(out: Any, flat: Any, total: int) -> Any:
    import torch

    if isinstance(out, (tuple, list)):
        return type(out)(_full_rows(o, flat, total) for o in out)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() != 2:
        return out
    if out.shape[0] != flat.numel():
        return out
    return dropped_rows(total, out.shape[1], out).index_copy(0, flat, out)
