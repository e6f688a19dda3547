"""The engine allowlist: inert data classes that training engines pickle into their own checkpoints.

torch's ``weights_only`` allowlist covers tensors, storages, dtypes and a few containers. The
ZeRO optimizer states DeepSpeed writes (``*_optim_states.pt``) also name four small classes of
its own. Each is listed here by its **exact** qualified name (never a module prefix), after
reading its source in DeepSpeed 0.19.8: plain attributes, no ``__reduce__``, no
``__setstate__``, nothing that runs when an instance is built.

random-ltd never imports these classes and never builds them. ``strip`` and ``inspect`` only
parse the pickle (:mod:`._pickle`). Where the library does hand a file to ``torch.load``
(:func:`random_ltd_cli.checkpoint.load_state_dict`), :func:`torch_stand_ins` registers an inert
stand-in class of ours under each allow-listed name that the file uses: torch builds the
stand-in (which only stores what it is given) instead of the engine's class, so the engine's
package is neither imported nor needed, and no code from the file or the engine runs.

Lightning (``.ckpt``), Accelerate (``save_state``) and torch FSDP2 / DCP checkpoints name no
classes beyond torch's own (checked in the test suite), so no entries are needed for them.
The justification of every entry is on the documentation's threat-model page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ENGINE_GLOBALS", "EngineRecord", "engine_globals_in", "is_engine_global", "torch_stand_ins"]

ENGINE_GLOBALS: dict[str, str] = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": (
        "DeepSpeed's static loss scaler, saved by ZeRO stages 1-3 (fp32 and bf16 use it with scale 1): "
        "attributes cur_scale and dynamic"
    ),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": (
        "DeepSpeed's dynamic fp16 loss scaler, saved by ZeRO stages 1-3 with fp16: numbers, flags and a torch dtype"
    ),
    "deepspeed.runtime.zero.config.ZeroStageEnum": (
        "the ZeRO stage number (an int Enum, 0-3) recorded in ZeRO optimizer states"
    ),
    "deepspeed.utils.tensor_fragment.fragment_address": (
        "a dataclass of two ints (numel, start): where a parameter lies in a rank's flat partition "
        "(param_slice_mappings of ZeRO stages 1 and 2)"
    ),
}
"""Exact qualified name -> what it is."""


def is_engine_global(qualname: str) -> bool:
    """Whether ``qualname`` (already in its Python 3 spelling) is on the engine allowlist, by exact name."""
    return qualname in ENGINE_GLOBALS


def engine_globals_in(qualnames: Iterable[str]) -> list[str]:
    """The allow-listed engine names among ``qualnames``, sorted, each once."""
    return sorted({name for name in qualnames if name in ENGINE_GLOBALS})


class EngineRecord:
    """What ``torch.load`` builds in place of an allow-listed engine object: the call and state, stored.

    torch's ``weights_only`` unpickler calls a class for REDUCE (``ZeroStageEnum(2)``), calls
    ``cls.__new__(cls, *args)`` for NEWOBJ and ``__setstate__(state)`` for BUILD; each only
    records its arguments here. Nothing else is ever called on it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"EngineRecord(args={self.args!r})"


def torch_stand_ins(qualnames: Iterable[str]) -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """``(EngineRecord, name)`` for each allow-listed name among ``qualnames``, for
    ``torch.serialization.safe_globals``; names outside the allowlist are not included."""
    return [(EngineRecord, name) for name in engine_globals_in(qualnames)]
