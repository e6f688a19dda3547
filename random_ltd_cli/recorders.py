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

__all__ = ["call_unrecorded", "replay_recorders"]

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
