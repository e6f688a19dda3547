"""The project's error hierarchy.

Every error a user can cause derives from :class:`RandomLTDError`, and also from the
built-in class that describes it best (``ValueError``, ``ImportError``...), so code
that already catches built-in errors keeps working. Messages repeat the offending
input and say what to do next.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "InputError",
    "KeyCollisionError",
    "LimitExceededError",
    "MalformedCheckpointError",
    "OutputExistsError",
    "RandomLTDError",
    "TargetImportError",
    "UnsafePickleError",
    "UnsupportedFileTypeError",
    "UnverifiableLayerError",
    "VerificationError",
]


class RandomLTDError(Exception):
    """Base class of every error raised on purpose by random-ltd."""


class ConfigError(RandomLTDError, ValueError):
    """A schedule, layer or DeepSpeed setting has a value that cannot work."""


class InputError(RandomLTDError, ValueError):
    """A tensor given to a random-LTD layer at run time has a shape or kind it cannot gather."""


class ConversionError(RandomLTDError, ValueError):
    """A model cannot be converted (or reverted) as asked; the model is left unchanged."""


class CheckpointError(RandomLTDError, ValueError):
    """A checkpoint cannot be read or written; the input is left unchanged."""


class KeyCollisionError(CheckpointError):
    """Two keys would have the same name after removing the ``random_ltd_layer`` segment."""


class MalformedCheckpointError(CheckpointError):
    """A file breaks its format's rules (truncated, corrupted or crafted): refused before anything is written."""


class LimitExceededError(CheckpointError):
    """A file needs more than a fixed budget (header size, JSON nesting, memory to parse) allows."""


class UnsupportedFileTypeError(CheckpointError):
    """A path is not a regular file or folder (a FIFO, socket or device), or is a link leaving its folder."""


class OutputExistsError(CheckpointError):
    """The output path exists and replacing it was not asked for (``--force``, ``overwrite=True``)."""


class UnsafePickleError(CheckpointError):
    """A torch pickle needs globals that ``weights_only=True`` refuses to load."""


class TargetImportError(RandomLTDError, ImportError):
    """An import path such as ``package.module:attr`` does not resolve."""


class VerificationError(RandomLTDError, ValueError):
    """A wrapped layer does not match the verifier's reference (or its reference call failed)."""


class UnverifiableLayerError(VerificationError):
    """The verifier found no way to restrict a wrapped layer's attention keys, so it cannot check it."""
