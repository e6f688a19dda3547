"""Per-file safety verdicts for ``inspect``: which globals each pickle names, and what loading it would take."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _dcp
from ._allowlist import is_engine_global
from ._deepspeed_dir import deepspeed_files
from ._detect import file_format
from ._hf_dir import hf_weight_files, indexes
from ._torch import canonical, is_safe_global, read_torch

__all__ = ["SAFE", "PickleVerdict", "checkpoint_verdicts", "judge", "pickle_verdicts"]

SAFE = "safe to torch.load(weights_only=True)"
ENGINE = "needs allow-listed engine classes: "
UNSAFE = "unsafe: "
DCP = "torch.distributed.checkpoint metadata classes only (dcp.load unpickles it without restriction)"


@dataclass
class PickleVerdict:
    """The globals one file's pickles name, each with what allows it, and the verdict for the file.

    ``allowed`` per name: ``"torch"`` (torch's ``weights_only`` allowlist), ``"engine"`` (the engine
    allowlist of :mod:`._allowlist`), ``"dcp"`` (DCP's own metadata classes) or ``None`` (not allowed).
    """

    globals: dict[str, str | None] = field(default_factory=dict)
    verdict: str = SAFE

    def to_dict(self) -> dict[str, Any]:
        return {"globals": [{"name": k, "allowed": v} for k, v in self.globals.items()], "verdict": self.verdict}

    @property
    def short(self) -> str:
        """``safe``, ``engine classes``, ``dcp metadata`` or ``unsafe``."""
        if self.verdict.startswith(UNSAFE):
            return "unsafe"
        if self.verdict.startswith(ENGINE):
            return "engine classes"
        return "dcp metadata" if self.verdict == DCP else "safe"


def _allowed(name: str, *, dcp: bool) -> str | None:
    if is_engine_global(name):
        return "engine"
    if is_safe_global(name):
        return "torch"
    return "dcp" if dcp and is_safe_global(name, dcp=True) else None  # DCP's own metadata classes, by exact name


def judge(qualnames: list[str], *, dcp: bool = False) -> PickleVerdict:
    """The verdict for one file whose pickles name ``qualnames``.

    ``dcp=True``: a DCP ``.metadata`` file that its reader has already checked; names outside torch's
    allowlist are DCP's own metadata classes.
    """
    names = sorted({canonical(q) for q in qualnames})
    allowed = {name: _allowed(name, dcp=dcp) for name in names}
    unsafe = [n for n, a in allowed.items() if a is None]
    engine = [n for n, a in allowed.items() if a == "engine"]
    if unsafe:
        verdict = UNSAFE + ", ".join(unsafe)
    elif any(a == "dcp" for a in allowed.values()):
        verdict = DCP
    elif engine:
        verdict = ENGINE + ", ".join(engine)
    else:
        verdict = SAFE
    return PickleVerdict(allowed, verdict)


def pickle_verdicts(root: Path, files: list[str], *, trust_pickle: bool) -> dict[str, PickleVerdict]:
    """Verdicts of the torch pickle files among ``files`` (relative to ``root``, or ``root`` itself for ``""``).

    Each file is parsed, never loaded; with ``trust_pickle`` false, a file naming a global outside both
    allowlists raises :class:`~random_ltd_cli.errors.UnsafePickleError` (as strip would).
    """
    out: dict[str, PickleVerdict] = {}
    for rel in files:
        tf = read_torch(root / rel if rel else root, trust_pickle=trust_pickle)
        out[rel or root.name] = judge([g.qualname for g in tf.globals])
    return out


def checkpoint_verdicts(path: Path, fmt: str, *, trust_pickle: bool) -> dict[str, PickleVerdict]:
    """Verdicts of every pickle that strip reads in a file or folder (not a run folder), by relative path.

    DeepSpeed: every model- and optimizer-state file of every tag; Hugging Face folders: the torch
    weights files; DCP: ``.metadata``. Side files (optimizer, RNG states) are copied unchanged by
    strip and never read, so they get no verdict.
    """
    if fmt == "torch":
        return pickle_verdicts(path, [""], trust_pickle=trust_pickle)
    if fmt in ("hf-dir", "deepspeed-dir"):  # as plan_dir: a Trainer checkpoint may hold both
        names = [n for n in hf_weight_files(path, indexes(path)) if file_format(path / n) == "torch"]
        names += deepspeed_files(path) if fmt == "deepspeed-dir" else []
        return pickle_verdicts(path, list(dict.fromkeys(names)), trust_pickle=trust_pickle)
    if fmt == "dcp-dir":
        parsed = _dcp._read(path, trust_pickle=trust_pickle).parsed  # refuses globals outside DCP's own
        return {_dcp.METADATA: judge([g.qualname for g in parsed.globals], dcp=True)}
    return {}
