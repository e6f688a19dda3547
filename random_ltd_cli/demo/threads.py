"""How many torch threads the demo trains with, and why (measured: ``benchmarks/demo_threads.py``).

The demo's models are small: a matrix multiply of the default model takes well under a
millisecond, so a second thread buys little on a quiet machine and costs several-fold on a busy
one, where torch's threads wait for each other at every operation while other processes hold the
cores. The rule, in order:

1. ``--threads N`` (``requested``) wins;
2. else ``OMP_NUM_THREADS`` from the environment, when set to a positive integer (the user chose);
3. else 1 thread for a model whose per-step work is small (``batch * S * hidden`` under
   :data:`SMALL_WORK`, e.g. ``--tiny``): more threads only add synchronisation;
4. else the CPUs that are free: the CPUs this process may run on minus the 1-minute load average
   (rounded), at least 1 and at most torch's own default.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["SMALL_WORK", "ThreadChoice", "available_cpus", "choose_threads", "load_average"]

SMALL_WORK = 65_536
"""``batch * S * hidden`` below which the demo trains on one thread (the tiny model: 4,096; default: 262,144)."""


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count and a short reason for people (printed in the demo's header)."""

    threads: int
    reason: str


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or ``None`` where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(
    work: int,
    requested: int | None = None,
    *,
    cpus: int | None = None,
    load: float | None = None,
    torch_default: int | None = None,
    env: dict[str, str] | None = None,
) -> ThreadChoice:
    """The demo's torch thread count for a model of ``work = batch * S * hidden`` per step.

    Args:
        work: ``batch_size * seq_len * n_embd`` of the model to train.
        requested: ``--threads N``; used as given.
        cpus: CPUs available (default :func:`available_cpus`).
        load: the 1-minute load average (default :func:`load_average`; ``None``: unknown, taken as 0).
        torch_default: torch's own default thread count (default ``torch.get_num_threads()`` now).
        env: the environment to read ``OMP_NUM_THREADS`` from (default ``os.environ``).
    """
    if requested is not None:
        return ThreadChoice(requested, "--threads")
    omp = (os.environ if env is None else env).get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp} in the environment")
    if work < SMALL_WORK:
        return ThreadChoice(1, "a small model gains nothing from more threads")
    cpus = available_cpus() if cpus is None else cpus
    load = load_average() if load is None else load
    if torch_default is None:
        import torch

        torch_default = torch.get_num_threads()
    free = math.floor(cpus - (load or 0.0) + 0.5)
    threads = max(1, min(free, torch_default))
    shown = "unknown" if load is None else f"{load:.1f}"
    return ThreadChoice(threads, f"{cpus} CPUs available, load average {shown}: {threads} free")
