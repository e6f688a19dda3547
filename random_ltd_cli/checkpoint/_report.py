"""The results that :func:`strip_checkpoint` and :func:`inspect_checkpoint` return (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._common import TensorInfo

__all__ = ["CheckpointInfo", "StripReport"]


@dataclass
class StripReport:
    """What a strip did (or, with ``dry_run``, would do).

    Attributes:
        format: ``"safetensors"``, ``"torch"``, ``"hf-dir"`` or ``"deepspeed-dir"``.
        source: the input path.
        output: where the result was (or would be) written; None when nothing was written.
        renamed: ``(old, new)`` for every weight name that changes, in file order.
        renamed_count: ``len(renamed)``.
        untouched_count: weight names that keep their name.
        side_renamed_count: other names renamed (DeepSpeed side tables, module metadata, aliases).
        side_renamed: ``(old, new)`` of those other names, each distinct pair once (torch files).
        wrote: whether a file or folder was written.
        in_place: whether the input itself was (or would be) rewritten.
        dry_run: whether this was a dry run.
        entries: for a run folder (``"run-dir"``), one report per checkpoint inside, in order.
    """

    format: str
    source: Path
    output: Path | None
    renamed: list[tuple[str, str]]
    untouched_count: int
    side_renamed_count: int = 0
    side_renamed: list[tuple[str, str]] = field(default_factory=list)
    wrote: bool = False
    in_place: bool = False
    dry_run: bool = False
    entries: list[StripReport] = field(default_factory=list)
    renamed_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.renamed_count = len(self.renamed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings)."""
        return {
            "format": self.format,
            "source": str(self.source),
            "output": None if self.output is None else str(self.output),
            "renamed_count": self.renamed_count,
            "untouched_count": self.untouched_count,
            "side_renamed_count": self.side_renamed_count,
            "wrote": self.wrote,
            "in_place": self.in_place,
            "dry_run": self.dry_run,
            "renamed": [list(pair) for pair in self.renamed],
            "side_renamed": [list(pair) for pair in self.side_renamed],
            **({"checkpoints": [e.to_dict() for e in self.entries]} if self.entries else {}),
        }


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read from its structure (tensor data is not loaded).

    Attributes:
        format: as :func:`detect_format` says.
        path: the inspected path.
        tensor_count: number of weight tensors.
        parameter_count: sum of their element counts.
        dtypes: dtype name (torch spelling, e.g. ``"float32"``) -> number of tensors.
        wrapped_layers: prefixes that carry a ``random_ltd_layer`` segment, in order.
        metadata: e.g. safetensors ``__metadata__``, index metadata, top-level scalars of a
            torch checkpoint; ``metadata["random_ltd"]`` holds recorded random-LTD settings, parsed.
        files: the weights files (and indexes) that were read, relative to ``path`` for folders.
        tensors: every weight tensor's name, dtype and shape.
        kind: what wrote a folder (``trainer-checkpoint``, ``accelerate-checkpoint``, ``peft-adapter``,
            ``lightning-checkpoints``, ``hf-model``, ``deepspeed``, ``run``); ``"file"`` for a file.
        side_files: a folder's other top-level files and what they are (``"optimizer state"``,
            ``"RNG state"``, ``"training arguments"``...); copied unchanged by strip.
        entries: for a run folder (``"run-dir"``), each checkpoint inside, inspected on its own (the
            totals above add them up; nothing is merged).
        pickles: for every pickle strip reads (torch files, DeepSpeed model and optimizer states, DCP
            ``.metadata``), by path relative to a folder (the file's name for a file): the globals it
            names, what allows each (``"torch"``, ``"engine"``, ``"dcp"`` or ``None``) and the file's
            safety verdict (``"safe to torch.load(weights_only=True)"``, ``"needs allow-listed engine
            classes: ..."``, ``"unsafe: ..."``).
    """

    format: str
    path: Path
    tensor_count: int
    parameter_count: int
    dtypes: dict[str, int]
    wrapped_layers: list[str]
    metadata: dict[str, Any]
    files: list[str]
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)
    kind: str = "file"
    side_files: dict[str, str] = field(default_factory=dict)
    entries: list[CheckpointInfo] = field(default_factory=list)
    pickles: dict[str, Any] = field(default_factory=dict)  # relative path -> _verdict.PickleVerdict

    def to_dict(self, *, tensors: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; ``tensors=True`` adds the per-tensor list."""
        out: dict[str, Any] = {
            "format": self.format,
            "path": str(self.path),
            "tensor_count": self.tensor_count,
            "parameter_count": self.parameter_count,
            "dtypes": dict(self.dtypes),
            "wrapped_layers": list(self.wrapped_layers),
            "metadata": self.metadata,
            "files": list(self.files),
            "kind": self.kind,
            "side_files": dict(self.side_files),
            "pickles": {name: v.to_dict() for name, v in self.pickles.items()},
        }
        if self.entries:
            out["checkpoints"] = [e.to_dict(tensors=tensors) for e in self.entries]
        if tensors:
            out["tensors"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.tensors]
        return out
