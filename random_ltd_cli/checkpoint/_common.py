"""Small types shared by the format modules (no torch here)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import CheckpointError
from ._io import Progress
from ._jsonio import parse_text

__all__ = ["TORCH_SUFFIXES", "FilePlan", "TensorInfo", "plain_metadata"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File names torch.save checkpoints usually carry (anything else is written as safetensors)."""


@dataclass
class TensorInfo:
    """One tensor's name, dtype and shape, as the file records them (the data is never read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class FilePlan(Protocol):
    """A stripped file, computed from the input's structure and ready to be written."""

    source: Path

    @property
    def weights(self) -> dict[str, str]: ...  # every weight name -> its new name (unchanged too), in file order

    @property
    def side_count(self) -> int: ...  # names renamed outside the weights (metadata, side tables)

    @property
    def changed(self) -> bool: ...

    @property
    def nbytes(self) -> int: ...  # bytes a full write produces (for progress)

    def write(self, out: int, progress: Progress | None = None) -> None: ...

    def write_in_place(self, progress: Progress | None = None) -> bool: ...


def plain_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Plain ``str`` values, with the ``"random_ltd"`` entry parsed from JSON where it is a JSON string.

    The value is parsed within :mod:`._jsonio`'s bounds (depth 64, 16 MiB of memory); beyond them,
    or when it is not JSON, it is kept as the string it is.
    """
    out = {str(k): str(v) if isinstance(v, str) else v for k, v in metadata.items()}
    if isinstance(out.get("random_ltd"), str):
        with contextlib.suppress(CheckpointError):  # not JSON, too deep or too large: kept as the string
            out["random_ltd"] = parse_text(out["random_ltd"], "the random_ltd metadata", budget=16 << 20)
    return out
