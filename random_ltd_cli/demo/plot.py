"""Eval-loss curves as PNG files (matplotlib, the optional ``plot`` extra).

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so the global
backend of a program that imports this module is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .train import ArmResult

__all__ = ["MISSING_MATPLOTLIB", "X_LABELS", "plot_eval_curves"]

XAxis = Literal["layer_tokens", "train_seconds", "step"]

X_LABELS: dict[str, str] = {
    "layer_tokens": "consumed layer-tokens (all layers)",
    "train_seconds": "training wall time (s, evaluation excluded)",
    "step": "optimizer step",
}

MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so no plot was drawn; install it with: pip install 'random-ltd[plot]'"
)


def plot_eval_curves(
    results: Sequence[ArmResult | Sequence[ArmResult]],
    path: Path | str,
    *,
    x: XAxis = "layer_tokens",
    title: str = "Eval loss at full length",
) -> Path:
    """Draw eval loss against ``x`` for each arm and write a PNG at ``path``.

    Args:
        results: one :class:`ArmResult` per arm, or a sequence of them per arm (several
            seeds: each seed is drawn thin, in the arm's colour; the label names the arm once).
        path: the PNG to write (its directory must exist).
        x: ``"layer_tokens"``, ``"train_seconds"`` or ``"step"``.
        title: the figure's title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed (see :data:`MISSING_MATPLOTLIB`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, arm in enumerate(results):
        runs = [arm] if isinstance(arm, ArmResult) else list(arm)
        for j, run in enumerate(runs):
            xs = [getattr(point, x) for point in run.history]
            ys = [point.eval_loss for point in run.history]
            label = run.name if j == 0 else None
            ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.4, color=colours[i % len(colours)], label=label)
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("eval loss (nats/byte)")
    ax.set_title(title)
    ax.set_ylim(top=_upper_limit(results))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _upper_limit(results: Sequence[ArmResult | Sequence[ArmResult]]) -> float:
    """Clip the first (untrained) points so the interesting part of the curves is visible."""
    values: list[float] = []
    for arm in results:
        for run in [arm] if isinstance(arm, ArmResult) else arm:
            values.extend(p.eval_loss for p in run.history[1:])
    return max(values) * 1.05 if values else 6.0
