"""Index sampling: which ``r`` of the ``S`` positions a layer keeps.

For every sample, ``r`` distinct positions are drawn uniformly at random without
replacement and returned sorted ascending, as an ``int64`` tensor of shape ``[B, r]``
on the device of the hidden states. The draw is one ``rand`` + ``topk`` + ``sort`` on
the device: no Python loop over the batch and no host-device synchronisation.

Where the randomness comes from decides whether activation checkpointing is safe:

* ``seed=None`` (default) draws from torch's global RNG. ``torch.utils.checkpoint``
  saves and restores the global CPU and device RNG states around a recompute, so a
  recomputed layer draws the very same indices. ``torch.manual_seed`` makes runs
  reproducible. Under ``torch.distributed`` with several ranks the draw is decorrelated
  per rank (a fixed, rank-specific shift of the uniform scores, which keeps them
  uniform), so data-parallel ranks seeded alike still drop different tokens.
* ``seed=<int>`` (or ``generator=``) draws from a private generator. Every rank that
  passes the same seed draws the same indices (tensor-parallel groups need that). A
  private generator is *not* restored by checkpointing, so each draw is remembered and
  a forward that runs inside the backward pass (a recompute) reuses the indices of the
  matching original forward instead of drawing new ones.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

__all__ = ["TokenSampler", "sample_indices"]


def sample_indices(
    batch: int,
    seq_len: int,
    keep: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    priority: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``keep`` sorted distinct positions out of ``seq_len`` for each of ``batch`` samples.

    Args:
        batch: number of samples ``B``.
        seq_len: sequence length ``S``.
        keep: reserved length ``r`` with ``0 < r <= S``.
        device: where to draw (the hidden states' device).
        generator: a private generator; ``None`` uses the global RNG.
        priority: optional bool tensor broadcastable to ``[B, S]``; ``True`` positions are
            always kept (when there are at most ``r`` of them) and the rest are drawn
            uniformly among the other positions.
        shift: optional float tensor broadcastable to ``[B, S]`` in ``[0, 1)`` added modulo 1
            to the uniform scores (keeps them uniform; decorrelates ranks).

    Returns:
        ``int64`` tensor ``[B, r]``, each row strictly increasing.
    """
    # (B, S) in [0, 1). Without a generator, leave the argument out: rand's generator overload takes
    # only concrete sizes, and under torch.compile S may be a symbol.
    if generator is None:
        scores = torch.rand(batch, seq_len, device=device)
    else:
        scores = torch.rand(batch, seq_len, device=device, generator=generator)
    if shift is not None:
        scores = torch.remainder(scores + shift, 1.0)
    if priority is not None:
        scores = scores + priority.to(scores.dtype) * 2.0
    idx = scores.topk(keep, dim=1, sorted=False).indices  # (B, r)
    return idx.sort(dim=1).values


def _in_backward() -> bool:
    """Whether this code runs inside the autograd engine (i.e. an activation-checkpoint recompute)."""
    return bool(torch._C._current_graph_task_id() != -1)


@dataclass
class _Draw:
    key: tuple[int, int, int, str]
    data_ptr: int
    indices: torch.Tensor


class TokenSampler:
    """Draws kept-token indices for one random-LTD layer.

    Args:
        seed: ``None`` to use the global RNG (checkpoint-safe by construction), or an int
            for a private generator (identical draws on every rank with the same seed).
        generator: a private generator to use as it is (overrides ``seed``).
        layer_id: mixed into ``seed`` so that layers sharing a seed draw different indices.
        decorrelate_ranks: with the global RNG under ``torch.distributed``, shift the
            scores per rank so ranks seeded alike draw different indices.
        max_remembered: how many draws a private generator remembers for recomputes.
    """

    def __init__(
        self,
        seed: int | None = None,
        *,
        generator: torch.Generator | None = None,
        layer_id: int = 0,
        decorrelate_ranks: bool = True,
        max_remembered: int = 64,
    ) -> None:
        self.seed = seed
        self.layer_id = int(layer_id)
        self.decorrelate_ranks = decorrelate_ranks
        self._user_generator = generator
        self._generators: dict[str, torch.Generator] = {}
        self._draws: collections.deque[_Draw] = collections.deque(maxlen=max_remembered)
        self._shifts: dict[tuple[int, int, str], torch.Tensor] = {}

    @property
    def uses_global_rng(self) -> bool:
        return self.seed is None and self._user_generator is None

    def __call__(
        self,
        hidden: torch.Tensor,
        batch: int,
        seq_len: int,
        keep: int,
        priority: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Indices ``[B, r]`` for this call; ``hidden`` identifies the call for recompute matching."""
        device = hidden.device
        if self.uses_global_rng:
            return sample_indices(
                batch, seq_len, keep, device=device, priority=priority, shift=self._rank_shift(seq_len, device)
            )
        key = (batch, seq_len, keep, str(device))
        if torch.compiler.is_compiling():
            return sample_indices(batch, seq_len, keep, device=device, generator=self._generator(device),
                                  priority=priority)
        if _in_backward():
            replay = self._replay(key, hidden)
            if replay is not None:
                return replay
        idx = sample_indices(batch, seq_len, keep, device=device, generator=self._generator(device),
                             priority=priority)
        if torch.is_grad_enabled() or hidden.requires_grad:
            self._draws.append(_Draw(key, hidden.data_ptr(), idx))
        return idx

    def reset(self) -> None:
        """Forget remembered draws and restart private generators from the seed."""
        self._draws.clear()
        self._generators.clear()

    # -- private helpers -------------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._user_generator is not None:
            return self._user_generator
        name = str(device)
        gen = self._generators.get(name)
        if gen is None:
            gen = torch.Generator(device=device)
            # Mix the layer id into the seed so layers draw different indices (splitmix-style constant).
            gen.manual_seed((int(self.seed or 0) + self.layer_id * 0x9E3779B97F4A7C15) % (2**63))
            self._generators[name] = gen
        return gen

    def _replay(self, key: tuple[int, int, int, str], hidden: torch.Tensor) -> torch.Tensor | None:
        """Pop the remembered draw of the forward that this recompute repeats."""
        same_shape = [d for d in self._draws if d.key == key]
        if not same_shape:
            return None
        ptr = hidden.data_ptr()
        match = next((d for d in reversed(same_shape) if d.data_ptr == ptr), same_shape[0])
        self._draws.remove(match)
        return match.indices

    def _rank_shift(self, seq_len: int, device: torch.device) -> torch.Tensor | None:
        if not self.decorrelate_ranks or not torch.distributed.is_available():
            return None
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() <= 1:
            return None
        rank = torch.distributed.get_rank()
        if rank == 0:
            return None
        cache_key = (rank, seq_len, str(device))
        shift = self._shifts.get(cache_key)
        if shift is None:
            gen = torch.Generator().manual_seed(1_000_003 * rank + self.layer_id)
            shift = torch.rand(seq_len, generator=gen).to(device)
            self._shifts[cache_key] = shift
        return shift
