"""torchtitan models of the library sweep (second environment: torchtitan 0.3 imports triton, see zoo.py).

torchtitan's trainer builds the flex-attention masks from the batch's ``positions``
(``model.get_attention_masks(positions)``: causal and packed documents) and calls
``model(tokens, positions, attention_masks)``; every block gets ``(h, attention_masks, positions)``.
:class:`TitanStep` does the same for the sweep's batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

S, B, VOCAB = 12, 2, 97  # as zoo.py


def llama3(attn_backend: str = "flex") -> nn.Module:
    """torchtitan's llama3 ``debugmodel`` layout (fused QKV, complex RoPE with llama scaling, depth-scaled
    init) at 4 layers, dim 32, 2 heads, vocabulary 97; the RoPE cache for 64 positions (the trainer sizes it
    to ``training.seq_len``)."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    dim, heads = 32, 2
    cfg = Llama3Model.Config(
        dim=dim, vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB),
        layers=_build_llama3_layers(
            n_layers=4, dim=dim, n_heads=heads, hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=16),
            rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=500000, scaling="llama"),
            attn_backend=attn_backend))
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    return model


class TitanStep(nn.Module):
    """A torchtitan model called as its trainer calls it: masks from ``positions``, then the model.

    ``rope_positions=False`` passes the positions to the masks only (the blocks get ``positions=None``, as
    from a data loader without positions, and the RoPE reads ``0..L-1`` of what it receives).
    """

    def __init__(self, attn_backend: str = "flex") -> None:
        super().__init__()
        self.model = llama3(attn_backend)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rope_positions: bool = True) -> torch.Tensor:
        masks = self.model.get_attention_masks(positions)
        return self.model(tokens, positions if rope_positions else None, masks)


def batches() -> list[dict[str, Any]]:
    """Packed documents (positions restart at 0: document-causal masks), one document, and one document with
    ``positions=None`` in the blocks."""
    tokens = torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(0))
    one = torch.arange(S)[None].expand(B, S)
    packed = torch.cat([torch.cat([torch.arange(5), torch.arange(7)]),
                        torch.cat([torch.arange(3), torch.arange(4), torch.arange(5)])]).view(B, S)
    return [{"tokens": tokens, "positions": packed}, {"tokens": tokens, "positions": one},
            {"tokens": tokens, "positions": one, "rope_positions": False}]
