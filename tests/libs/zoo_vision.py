"""Tiny timm and open_clip models for the library sweep (builders only; the cases are in ``zoo.py``).

timm and open_clip import torchvision, whose PyPI wheel needs a CUDA build of torch: they run in
the second test environment (``.venv-tv``, ``tests/libs/requirements-tv.txt``; see docs/libraries.md).
Every model is random-weight, 4 blocks of width 32 (2 heads), built without downloads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IMG, PATCH, BATCH = 32, 8, 2  # 4 x 4 = 16 patch tokens (+ prefix tokens)
TEXT_LEN, VOCAB = 12, 97


def _eager(model: nn.Module, eager: bool) -> nn.Module:
    """timm's attention modules choose SDPA or the eager softmax path by their ``fused_attn`` flag."""
    if eager:
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    return model


def _randomize(model: nn.Module, *names: str) -> nn.Module:
    """timm initialises some tables to zero or near zero (BEiT's relative position bias, layer scales): random
    values make them count."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rpartition(".")[2] in names:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def timm_model(name: str, eager: bool = False, vit: bool = True, **extra: Any) -> nn.Module:
    """``timm.create_model(name)`` without weights; ``vit``: a ViT-shaped size (4 blocks, width 32, 2 heads)."""
    import timm

    kw: dict[str, Any] = {"num_classes": 10}
    if vit:
        kw.update(img_size=IMG, patch_size=PATCH, depth=4, embed_dim=32, num_heads=2)
    kw.update(extra)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw)
    # layer-scale factors (1e-5 in some configs) would make the blocks near-identities
    return _eager(_randomize(model, "relative_position_bias_table", "cls_token", "dist_token", "reg_token", "gamma",
                             "gamma_1", "gamma_2"), eager)


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def image_batches(tokens: int | None = None) -> list[dict[str, Any]]:
    """An image batch; with ``tokens`` (the model's sequence length) first a padded one: the last 3 tokens of
    sample 1 masked as keys through timm's ``attn_mask`` (``[B,1,1,S]``, True = attend)."""
    plain = {"x": images()}
    if tokens is None:
        return [plain]
    mask = torch.ones(BATCH, 1, 1, tokens, dtype=torch.bool)
    mask[1, ..., -3:] = False
    return [{"x": images(), "attn_mask": mask}, plain]


# -- open_clip ---------------------------------------------------------------------------------


def clip_vision() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=IMG, patch_size=PATCH, width=32, layers=4, heads=2, mlp_ratio=2.0,
                             output_dim=16)


def clip_text(pad_mask: bool = False, **extra: Any) -> nn.Module:
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    return TextTransformer(context_length=TEXT_LEN, vocab_size=VOCAB, width=32, heads=2, layers=4, mlp_ratio=2.0,
                           output_dim=16, use_pad_mask=pad_mask, **extra)


def text_ids() -> torch.Tensor:
    """``B == L`` (12 x 12): the causal ``[L,L]`` mask must not be read as a ``[B,S]`` padding mask; the last
    three tokens of sample 1 are padding (``pad_id`` 0), the eos (argmax id) token before them."""
    ids = torch.randint(3, VOCAB - 1, (TEXT_LEN, TEXT_LEN), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = VOCAB - 1
    ids[1, -4], ids[1, -3:] = VOCAB - 1, 0
    return ids


def text_batches() -> list[dict[str, Any]]:
    return [{"text": text_ids()}]


class ClipLogits(nn.Module):
    """An open_clip ``CLIP`` (both towers) returning its image-text logits, so a loss reaches both towers."""

    def __init__(self) -> None:
        super().__init__()
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        torch.manual_seed(0)
        self.clip = CLIP(embed_dim=16,
                         vision_cfg=CLIPVisionCfg(layers=4, width=32, head_width=16, mlp_ratio=2.0, patch_size=PATCH,
                                                  image_size=IMG),
                         text_cfg=CLIPTextCfg(context_length=TEXT_LEN, vocab_size=VOCAB, width=32, heads=2,
                                              layers=4, mlp_ratio=2.0))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        img, txt, scale = self.clip(image, text)
        return scale * img @ txt.t()


def clip_batches() -> list[dict[str, Any]]:
    return [{"image": images(), "text": text_ids()[:BATCH]}]
