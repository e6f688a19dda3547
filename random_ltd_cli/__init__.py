"""random-ltd: random layerwise token dropping for PyTorch and Hugging Face models.

Importing this package does not import torch; each public name is loaded from its
module on first use (PEP 562), so ``random-ltd --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # errors (no torch)
    "RandomLTDError": "errors",
    "ConfigError": "errors",
    "InputError": "errors",
    "ConversionError": "errors",
    "CheckpointError": "errors",
    "LimitExceededError": "errors",
    "MalformedCheckpointError": "errors",
    "OutputExistsError": "errors",
    "UnsupportedFileTypeError": "errors",
    "KeyCollisionError": "errors",
    "UnsafePickleError": "errors",
    "TargetImportError": "errors",
    "VerificationError": "errors",
    "UnverifiableLayerError": "errors",
    # key renaming (no torch)
    "strip_key": "keys",
    "strip_mapping": "keys",
    # schedule
    "RandomLTDScheduler": "schedule",
    "LayerTokenLRScheduler": "lr_schedule",
    # layer
    "RandomLayerTokenDrop": "layer",
    "sample_indices": "sampling",
    "TokenSampler": "sampling",
    # conversion
    "convert_to_random_ltd": "convert",
    "revert_random_ltd": "convert",
    "remove_random_ltd_state_dict": "convert",
    "save_without_random_ltd": "convert",
    "random_ltd_layers": "convert",
    "random_ltd_scheduler": "convert",
    # verification
    "verify_random_ltd": "verify",
    "LayerVerdict": "verify",
    "RandomLTDCallback": "integrations",
    "RandomLTDLightningCallback": "lightning",
    # checkpoints
    "strip_checkpoint": "checkpoint",
    "inspect_checkpoint": "checkpoint",
    "detect_format": "checkpoint",
    "load_state_dict": "checkpoint",
    "save_state_dict": "checkpoint",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'random_ltd_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .checkpoint import detect_format, inspect_checkpoint, load_state_dict, save_state_dict, strip_checkpoint
    from .convert import (
        convert_to_random_ltd,
        random_ltd_layers,
        random_ltd_scheduler,
        remove_random_ltd_state_dict,
        revert_random_ltd,
        save_without_random_ltd,
    )
    from .errors import (
        CheckpointError,
        ConfigError,
        ConversionError,
        InputError,
        KeyCollisionError,
        LimitExceededError,
        MalformedCheckpointError,
        OutputExistsError,
        RandomLTDError,
        TargetImportError,
        UnsafePickleError,
        UnsupportedFileTypeError,
        UnverifiableLayerError,
        VerificationError,
    )
    from .integrations import RandomLTDCallback
    from .keys import strip_key, strip_mapping
    from .layer import RandomLayerTokenDrop
    from .lr_schedule import LayerTokenLRScheduler
    from .sampling import TokenSampler, sample_indices
    from .schedule import RandomLTDScheduler
    from .verify import LayerVerdict, verify_random_ltd
