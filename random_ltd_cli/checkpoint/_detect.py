"""Tell checkpoint formats apart by their content (not their names), and dispatch per file."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from . import _safetensors, _torch
from ._common import FilePlan, TensorInfo
from ._dcp import is_dcp_dir
from ._deepspeed_dir import is_deepspeed_dir
from ._fs import open_file, os_error, stat_input
from ._run import is_hf_weights_dir, run_entries

__all__ = ["FORMATS", "detect_format", "file_format", "plan_file", "scan_file"]

FORMATS = ("safetensors", "torch", "hf-dir", "deepspeed-dir", "dcp-dir", "run-dir")
_WHAT = (
    "expected a .safetensors file, a torch.save file (.pt, .pth, .bin, .ckpt), "
    "a Hugging Face model folder, a DeepSpeed checkpoint folder or a folder of checkpoints"
)


def file_format(path: Path) -> str:
    """``"safetensors"`` or ``"torch"`` for a single file, judged by its first bytes.

    Raises:
        CheckpointError: empty file, or neither format.
        UnsupportedFileTypeError: not a regular file.
    """
    fd = open_file(path)  # a FIFO, socket or device is refused here, without blocking
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 9, 0)
    except OSError as exc:
        raise os_error(path, exc) from exc
    finally:
        os.close(fd)
    if not head:
        raise CheckpointError(f"{path} is empty, not a checkpoint; {_WHAT}. Pass one of those.")
    if head[8:9] == b"{" and (int.from_bytes(head[:8], "little") <= size - 8 or path.suffix == ".safetensors"):
        return "safetensors"  # checked first: a header length may start with the bytes a pickle starts with
    if head[:4] == _torch.ZIP_MAGIC or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    if head[8:9] == b"{" or path.suffix == ".safetensors":
        return "safetensors"
    raise CheckpointError(f"{path} is not a checkpoint; {_WHAT}. Pass one of those.")


def detect_format(path: str | os.PathLike[str]) -> str:
    """One of ``"safetensors"``, ``"torch"``, ``"hf-dir"``, ``"deepspeed-dir"``, ``"dcp-dir"``, ``"run-dir"``.

    Raises:
        CheckpointError: the path does not exist or is not a checkpoint.
    """
    path = Path(path)
    if stat.S_ISDIR(stat_input(path).st_mode):  # missing, too long a name, a FIFO...: refused here
        if is_dcp_dir(path):  # torch.distributed.checkpoint: .metadata + *.distcp
            return "dcp-dir"
        if is_deepspeed_dir(path):
            return "deepspeed-dir"
        if is_hf_weights_dir(path):
            return "hf-dir"
        if run_entries(path):
            return "run-dir"  # several checkpoints: each is handled on its own, never merged
        raise CheckpointError(f"{path} is a folder without checkpoint files; {_WHAT}. Pass one of those.")
    return file_format(path)


def plan_file(path: Path, *, trust_pickle: bool) -> FilePlan:
    """The strip plan of one weights file, whatever its format."""
    if file_format(path) == "safetensors":
        return _safetensors.plan_strip(path)
    return _torch.plan_strip(path, trust_pickle=trust_pickle)


def scan_file(path: Path, *, trust_pickle: bool) -> tuple[list[TensorInfo], dict[str, Any]]:
    """Tensor records and metadata of one weights file, whatever its format."""
    if file_format(path) == "safetensors":
        return _safetensors.scan(path)
    return _torch.scan(path, trust_pickle=trust_pickle)
