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
    ``training.seq_len``)."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    dim, heads = 32, 2
    return _built(Llama3Model.Config(
        dim=dim, vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB),
        layers=_build_llama3_layers(
            n_layers=4, dim=dim, n_heads=heads, hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=16),
            rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=500000, scaling="llama"),
            attn_backend=attn_backend)))


def qwen3(moe: bool = False) -> nn.Module:
    """torchtitan's qwen3 ``debugmodel`` (or ``debugmodel_moe``) layout: grouped-query attention (4 query, 2
    key/value heads of 8), qk-norm, cos/sin RoPE (theta 1e6), tied embeddings (dense); 4 layers, dim 32; the
    MoE blocks route each token to 2 of 4 experts."""
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.qwen3 import Qwen3Model, _build_qwen3_layers, _build_qwen3_moe_layers, _qwen3_norm

    dim = 32
    shape: dict[str, Any] = dict(n_layers=4, dim=dim, n_heads=4, n_kv_heads=2, head_dim=8, attn_backend="flex",
                                 rope=CosSinRoPE.Config(dim=8, max_seq_len=64, theta=1e6))
    layers = (_build_qwen3_moe_layers(moe_hidden_dim=16, num_experts=4, top_k=2, moe_comm_backend="standard",
                                      **shape) if moe else _build_qwen3_layers(hidden_dim=64, **shape))
    return _built(Qwen3Model.Config(
        vocab_size=VOCAB, dim=dim, norm=_qwen3_norm(dim), enable_weight_tying=not moe,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB), layers=layers))


def _built(cfg: Any) -> nn.Module:
    """The model of ``cfg``, initialised by torchtitan, then its projections redrawn with unit variance
    (torchtitan's std 0.02 would make attention a whisper that a wrong position or mask hides in)."""
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.startswith(("tok_embeddings", "lm_head")):
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


class TitanStep(nn.Module):
    """A torchtitan model called as its trainer calls it: masks from the batch's ``positions``, then the model.

    Without ``positions`` (a data loader that gives none) the masks are built for ``0..S-1`` (one document)
    and the blocks get ``positions=None``: the RoPE then reads ``0..L-1`` of what each block receives.
    """

    def __init__(self, attn_backend: str = "flex", flavor: str = "llama3") -> None:
        super().__init__()
        self.model = {"llama3": lambda: llama3(attn_backend), "qwen3": qwen3,
                      "qwen3-moe": lambda: qwen3(moe=True)}[flavor]()

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
