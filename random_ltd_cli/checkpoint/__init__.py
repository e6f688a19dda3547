"""Checkpoint files: detect, inspect, strip ``random_ltd_layer`` from names, load and save.

Supported: safetensors files, torch.save files (zip and legacy layouts; a bare state dict
or one nested under ``state_dict``/``module``/``model``...), Hugging Face folders (single
or sharded, safetensors or ``.bin``; PEFT adapter folders), DeepSpeed checkpoint folders and
torch.distributed.checkpoint (DCP) folders. See
``docs/checkpoints.md`` for what is renamed where and the safety rules.

Importing this package does not import torch; only :func:`load_state_dict` and
:func:`save_state_dict` do, when called. Stripping and inspecting never load tensor data
and never run pickled code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._common import TORCH_SUFFIXES, TensorInfo
from ._detect import FORMATS
from ._detect import detect_format as _detect_format
from ._io import ProgressFn
from ._report import CheckpointInfo, StripReport
from ._strip import default_output

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FORMATS",
    "TORCH_SUFFIXES",
    "CheckpointInfo",
    "ProgressFn",
    "StripReport",
    "TensorInfo",
    "default_output",
    "detect_format",
    "inspect_checkpoint",
    "load_state_dict",
    "save_state_dict",
    "strip_checkpoint",
]

PathLike = str | os.PathLike[str]


def detect_format(path: PathLike) -> str:
    """Say which checkpoint format ``path`` holds, from its content.

    Args:
        path: a file or a folder.

    Returns:
        ``"safetensors"``, ``"torch"``, ``"hf-dir"``, ``"deepspeed-dir"`` or ``"dcp-dir"``.

    Raises:
        CheckpointError: the path does not exist or is not a checkpoint.
    """
    return _detect_format(path)


def strip_checkpoint(
    src: PathLike,
    dst: PathLike | None = None,
    *,
    in_place: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> StripReport:
    """Write a copy of a checkpoint whose names lack the ``random_ltd_layer`` segment.

    The whole input is validated by its format's rules, and every rename computed and checked,
    before anything is written; the output appears atomically (temporary name in its folder,
    fsync, rename) and the input is left as it was unless ``in_place``. Tensor bytes are copied
    as they are, never decoded. Only regular files and folders are read; only a missing path,
    an empty folder, or (with ``overwrite``) a regular file is written over.

    Args:
        src: a file or folder in any format :func:`detect_format` knows.
        dst: output path; default beside the input (:func:`default_output`), e.g.
            ``model.stripped.safetensors`` or ``ckpt-dir.stripped``. An existing folder
            receives a file of the input's name. When nothing needs stripping, a copy is
            written only if ``dst`` was given.
        in_place: rewrite the input itself (a safetensors file: only its header).
        dry_run: compute and return the renames; write nothing.
        trust_pickle: accept torch pickles that name globals outside torch's
            ``weights_only`` allowlist and the engine allowlist (DeepSpeed's inert ZeRO classes,
            matched by exact name); they are still never executed here.
        overwrite: replace an existing output file (the CLI's ``--force``). Without it an
            existing output is refused (:class:`OutputExistsError`), also in a dry run. A
            folder output must be missing or empty either way; a link, FIFO, socket or device
            is never replaced.
        progress: called as ``progress(done_bytes, total_bytes)`` while writing.

    Returns:
        A :class:`StripReport`.

    Raises:
        KeyCollisionError: two names would become the same.
        UnsafePickleError: a torch pickle needs globals outside the allowlist.
        MalformedCheckpointError: the input breaks its format's rules.
        LimitExceededError: the input needs more than the fixed size, depth or memory budget.
        UnsupportedFileTypeError: a FIFO, socket or device as input or output; a link leaving a folder.
        OutputExistsError: the output exists and ``overwrite`` is False.
        CheckpointError: not a checkpoint, output is the input, cannot write...
    """
    from ._strip import strip

    return strip(src, dst, in_place=in_place, dry_run=dry_run, trust_pickle=trust_pickle, overwrite=overwrite,
                 progress=progress)


def inspect_checkpoint(path: PathLike, *, trust_pickle: bool = False) -> CheckpointInfo:
    """Describe a checkpoint from its structure alone (safetensors header, torch pickle, index JSON).

    Args:
        path: a file or folder.
        trust_pickle: as for :func:`strip_checkpoint`.

    Returns:
        A :class:`CheckpointInfo`; ``metadata["random_ltd"]`` holds recorded random-LTD
        settings, parsed from JSON, when the checkpoint has them; ``pickles`` the globals and
        safety verdict of every pickle strip would read.

    Raises:
        UnsafePickleError, CheckpointError: as for :func:`strip_checkpoint`.
    """
    from ._strip import inspect

    return inspect(path, trust_pickle=trust_pickle)


def load_state_dict(path: PathLike, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load the model weights of any supported checkpoint as a plain state dict (on CPU).

    torch files are checked for unsafe globals first, then loaded with
    ``weights_only=True`` (and memory-mapped where the layout allows); an allow-listed engine
    class (e.g. a ZeRO loss scaler) is built as an inert stand-in, never imported from the engine's
    package; nestings such as
    ``{"state_dict": ...}`` or DeepSpeed's ``{"module": ...}`` are unwrapped; a Hugging
    Face folder's shards are merged.

    Args:
        path: a file or folder.
        trust_pickle: load torch files with ``weights_only=False``. This runs the pickle's
            code: only for files whose source you trust.

    Returns:
        ``{name: tensor}`` in file order (names are not stripped).

    Raises:
        UnsafePickleError: see ``trust_pickle``.
        CheckpointError: not a checkpoint, no state dict inside, several model-parallel shards.
    """
    from ._state import load_state_dict as load

    return load(path, trust_pickle=trust_pickle)


def save_state_dict(state: Mapping[str, Any], path: PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict atomically, as safetensors or (by extension) as a torch file.

    ``.pt``, ``.pth``, ``.bin`` and ``.ckpt`` are written with torch.save: the bare state dict,
    or ``{"state_dict": state, "random_ltd": metadata}`` when ``metadata`` is given. Any other
    name is written as safetensors with ``metadata`` in ``__metadata__``; tensors that share
    memory (tied weights) are saved as separate copies, so every name loads back.

    Convention: random-LTD settings go under ``metadata["random_ltd"]`` as a JSON string,
    e.g. ``{"wrapped_layers": [...], "schedule": {...}}``.

    Raises:
        CheckpointError: metadata values that are not strings, a non-tensor value for
            safetensors, or a destination that cannot be written.
    """
    from ._state import save_state_dict as save

    save(state, path, metadata=metadata)
