"""The demo's corpus: byte-level tokens of the Python standard library's own ``*.py`` files.

Every machine that runs Python has this text, so the demo needs no download. Files are
read in sorted order of their path relative to the stdlib root (``site-packages`` and
``dist-packages`` are skipped), and each file goes wholly to train or to eval by a
CRC-32 of its relative path, so the split is fixed for a given Python install and does
not move when files are added or removed elsewhere. Tokens are the raw bytes (0..255).

Batches are random windows of the train tokens whose start offsets are drawn up front
from a seeded generator: every arm of a comparison sees the same batches in the same order.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

__all__ = ["Corpus", "batch_offsets", "eval_windows", "get_batch", "is_eval_file", "load_corpus", "stdlib_root"]

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """Byte tokens of a source tree, split by file.

    Attributes:
        root: the directory the files were read from.
        train: ``uint8`` tensor ``[N_train]`` of the train files' bytes, concatenated in file order.
        eval: ``uint8`` tensor ``[N_eval]`` of the held-out files' bytes.
        train_files: relative paths (POSIX) of the train files, in order.
        eval_files: relative paths of the held-out files, in order.
    """

    root: Path
    train: torch.Tensor
    eval: torch.Tensor
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_eval_file(relative_path: str, eval_every: int = 20) -> bool:
    """Whether a file belongs to the held-out split: ``crc32(path) % eval_every == 0``."""
    return zlib.crc32(relative_path.encode("utf-8")) % eval_every == 0


def _source_files(root: Path) -> list[str]:
    """Relative POSIX paths of ``*.py`` under ``root``, sorted, without installed packages or caches."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def load_corpus(root: Path | str | None = None, *, eval_every: int = 20, max_bytes: int | None = None) -> Corpus:
    """Read every ``*.py`` file under ``root`` (default: the stdlib) as byte tokens, split by file.

    Args:
        root: the source tree; ``None`` is :func:`stdlib_root`.
        eval_every: about one file in ``eval_every`` is held out (see :func:`is_eval_file`).
            If that picks no file, the last file is held out.
        max_bytes: stop reading once each split holds this many bytes (``None``: read all).

    Returns:
        a :class:`Corpus`.

    Raises:
        ConfigError: ``root`` holds no ``*.py`` file, or too few to give both splits text.
    """
    base = Path(root) if root is not None else stdlib_root()
    files = _source_files(base) if base.is_dir() else []
    if len(files) < 2:
        raise ConfigError(
            f"found {len(files)} *.py file(s) under {str(base)!r}; the demo corpus needs at least 2 "
            "(one to train on, one held out). Point it at a directory of Python sources."
        )
    held = [f for f in files if is_eval_file(f, eval_every)] or files[-1:]
    held_set = set(held)
    train_files = [f for f in files if f not in held_set]
    train, train_used = _read(base, train_files, max_bytes)
    evals, eval_used = _read(base, held, max_bytes)
    if train.numel() == 0 or evals.numel() == 0:
        raise ConfigError(f"the *.py files under {str(base)!r} are empty; the demo corpus needs text in both splits.")
    return Corpus(base, train, evals, tuple(train_used), tuple(eval_used))


def _read(root: Path, files: list[str], max_bytes: int | None) -> tuple[torch.Tensor, list[str]]:
    chunks: list[bytes] = []
    used: list[str] = []
    total = 0
    for rel in files:
        if max_bytes is not None and total >= max_bytes:
            break
        data = (root / rel).read_bytes()
        chunks.append(data)
        used.append(rel)
        total += len(data)
    blob = bytearray(b"".join(chunks))
    if not blob:
        return torch.zeros(0, dtype=torch.uint8), used
    return torch.frombuffer(blob, dtype=torch.uint8).clone(), used


def batch_offsets(n_tokens: int, steps: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Start offsets of every training window, drawn up front: ``int64 [steps, batch_size]``.

    Window ``j`` of step ``i`` is ``tokens[o : o + seq_len + 1]`` with ``o = offsets[i, j]``
    (inputs and next-token targets). The same arguments give the same offsets on every machine.

    Raises:
        ConfigError: the tokens are too few for one window.
    """
    high = n_tokens - seq_len - 1
    if high < 1:
        raise ConfigError(f"the train split has {n_tokens} tokens, fewer than one window of {seq_len + 1}.")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (steps, batch_size), generator=gen)


def get_batch(tokens: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for the windows starting at ``offsets [B]``: two ``int64 [B, seq_len]``."""
    index = offsets[:, None] + torch.arange(seq_len + 1)  # (B, S+1)
    windows = tokens[index].long()
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``count`` fixed eval offsets, evenly spaced over the held-out tokens: ``int64 [count]``.

    Raises:
        ConfigError: the held-out tokens are too few for one window.
    """
    high = tokens.numel() - seq_len - 1
    if high < 0:
        raise ConfigError(f"the eval split has {tokens.numel()} tokens, fewer than one window of {seq_len + 1}.")
    return torch.linspace(0, high, count).round().long()
