"""torchtitan's transformer blocks: their ``positions`` and ``attention_masks``, or a refusal.

Recognised by structure (a forward taking ``attention_masks`` and ``positions``), never by importing
torchtitan. A torchtitan block is called as ``block(x, attention_masks, positions)``:

* ``positions [1|B,S]`` (``None`` when the data loader gives none) are the rotary positions: the
  attention's RoPE reads its cache at them, or at ``0..L-1`` of the ``L`` tokens it receives when they
  are ``None``. On the kept tokens that would be ``0..r-1``, so the adapter passes ``0..S-1`` first and
  gathers them per sample: the kept tokens keep their original positions.
* ``attention_masks``: a flex-attention ``BlockMask`` (causal, packed documents, sliding windows) is
  rebuilt for the kept tokens from its ``mask_mod`` at the original positions (:mod:`.tokens`); a dict of
  them (gpt-oss: one per window kind, each block picks its own) is rebuilt mask by mask.
  torchtitan's varlen attention takes ``VarlenMetadata`` (cumulative document lengths) instead, which
  is refused at conversion.
* ``freqs_cis`` (torchtitan 0.2's blocks, ``block(x, freqs_cis, attention_masks, positions)``, take the
  whole rotary table ``[max_seq_len, d/2]`` and slice ``[:L]`` without positions): with the positions
  passed, the table is indexed by them, so it goes in unchanged. (Read from 0.2's source and tested on a
  block of that form; torchtitan 0.2 itself imports tensorboard and torchdata and is not in the sweep.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .adapters import LayerAdapter, _CustomAlignment
from .adapters import forward_params as _params
from .alignment import Alignment
from .tokens import gather_mask

if TYPE_CHECKING:  # imported by library_adapters (torch already loaded); no module-level torch here
    import torch
    from torch import nn

__all__ = ["torchtitan_adapter", "torchtitan_refusal"]

POSITIONS = Alignment("position_ids", "b s", (("b", "s"),))  # [1|B,S] -> [B,r], original values
TABLE = Alignment("none", "none")


class _Torchtitan(LayerAdapter):
    def __init__(self, tables: tuple[str, ...]) -> None:
        self.tables = tables

    def alignments(self) -> dict[str, Alignment]:
        masks = _CustomAlignment("mask | {key: mask}", _gather_masks)
        return {"positions": POSITIONS, "attention_masks": masks, **{n: TABLE for n in self.tables}}

    def prepare(self, call: Any, hidden: torch.Tensor, seq_len: int) -> None:
        import torch

        if call.get("positions") is None:  # the rope would read 0..r-1 on the kept tokens
            call.set("positions", torch.arange(seq_len, device=hidden.device)[None])


def _gather_masks(value: Any, idx: torch.Tensor, seq_len: int, name: str) -> Any:
    """A mask, or a dict of masks (gpt-oss's ``{"basic_mask": ..., "sliding_window_mask": ...}``), for the
    kept tokens."""
    if isinstance(value, dict):
        return {k: gather_mask(v, idx, seq_len, f"{name}[{k!r}]") for k, v in value.items()}
    return gather_mask(value, idx, seq_len, name)


def _is_torchtitan_block(layer: nn.Module) -> bool:
    return {"attention_masks", "positions"} <= _params(layer.forward).keys()


def torchtitan_adapter(layer: nn.Module) -> LayerAdapter | None:
    """The adapter of a torchtitan block (``forward(x, [freqs_cis,] attention_masks, positions)``), else ``None``."""
    if not _is_torchtitan_block(layer) or torchtitan_refusal(layer) is not None:
        return None
    return _Torchtitan(tuple(n for n in ("freqs_cis",) if n in _params(layer.forward)))


def torchtitan_refusal(layer: nn.Module) -> str | None:
    """Why a torchtitan block cannot drop tokens exactly, or ``None``."""
    if not _is_torchtitan_block(layer):
        return None
    if any(type(m).__name__ == "VarlenAttention" for m in layer.modules()):
        return ("its varlen attention (torchtitan VarlenAttention) takes the packed documents as cumulative "
                "lengths over the whole sequence (VarlenMetadata), which random-LTD does not rebuild for the kept "
                "tokens; build the model with attn_backend='flex' (its BlockMask is rebuilt exactly)")
    return None
