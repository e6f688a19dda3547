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
    """torchtitan's llama3 ``debugmodel`` layout (fused QKV, complex RoPE with llama scaling, theta 500000) at
    4 layers, dim 32, 2 heads, vocabulary 97; the RoPE cache for 64 positions (the trainer sizes it to
    ``training.seq_len``). Weights are redrawn with unit-variance projections so that a wrong position or
    mask shows at the sweep's tolerance."""
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
    with torch.no_grad():  # unit-variance projections (torchtitan's std 0.02 would make attention a whisper)
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("tok_embeddings"):
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


class TitanStep(nn.Module):
    """A torchtitan model called as its trainer calls it: masks from the batch's ``positions``, then the model.

    Without ``positions`` (a data loader that gives none) the masks are built for ``0..S-1`` (one document)
    and the blocks get ``positions=None``: the RoPE then reads ``0..L-1`` of what each block receives.
    """

    def __init__(self, attn_backend: str = "flex") -> None:
        super().__init__()
        self.model = llama3(attn_backend)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        one = torch.arange(tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)
        masks = self.model.get_attention_masks(one if positions is None else positions)
        return self.model(tokens, positions, masks)


def batches() -> list[dict[str, Any]]:
    """Packed documents (positions restart at 0: document-causal masks), one document, and no positions."""
    tokens = torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(0))
    one = torch.arange(S)[None].expand(B, S)
    packed = torch.cat([torch.cat([torch.arange(5), torch.arange(7)]),
                        torch.cat([torch.arange(3), torch.arange(4), torch.arange(5)])]).view(B, S)
    return [{"tokens": tokens, "positions": packed}, {"tokens": tokens, "positions": one}, {"tokens": tokens}]
