"""The library zoo: tiny random-weight models of model libraries beyond transformers (no downloads).

Each case builds a 4-layer model (hidden 32) and the batches the sweep feeds it; ``expect`` is the
status the sweep asserts (``exact`` or ``refused``). A library that is not installed makes its cases
skip with the reason; under ``CI`` the libraries in :data:`CLAIMED` must be importable, and those in
:data:`CLAIMED_TV` (timm, open_clip, torchtitan: the second environment, ``.venv-tv``) in that environment's
run (``pytest -m tv tests/libs``; builders in ``zoo_vision.py`` and ``zoo_titan.py``).
:data:`NOT_INSTALLABLE` lists the libraries that install in neither environment.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import zoo_vision as zv

S, B, R = 12, 2, 6  # sequence length, batch size, reserved length
VOCAB = 97

# Libraries the sweep claims to cover: installed by the README's test command, required in CI.
CLAIMED = {"litgpt": "litgpt", "OLMo-core": "olmo_core", "Megatron-core": "megatron.core", "torch": "torch"}
# Libraries that import torchvision, whose PyPI wheel needs a CUDA build of torch: the README's test command
# installs them in a second environment (.venv-tv, tests/libs/requirements-tv.txt) and runs their cases there
# (``pytest -m tv``); in that run they must be importable under CI, in the main environment they skip.
CLAIMED_TV = {"timm": "timm", "open_clip": "open_clip", "torchtitan": "torchtitan"}
_TORCHVISION = ("it imports torchvision, whose PyPI wheel needs a CUDA build of torch (a CPU-only torch fails at "
                "import: 'operator torchvision::nms does not exist')")
# Why each library of the second environment is not in the main one (the skip reason there).
TV_WHY = {"timm": _TORCHVISION, "open_clip": _TORCHVISION,
          "torchtitan": "torchtitan 0.3 imports triton when its models are imported (MoE kernels), which the CPU "
                        "build of torch lacks (the CUDA build of torch 2.14.1 brings it)"}
TV_WHERE = ("its cases run in the second test environment (.venv-tv: torch 2.14.1, tests/libs/requirements-tv.txt, "
            "`pytest -m tv tests/libs`)")
# Libraries that do not install cleanly in either test environment (what blocks them).
NOT_INSTALLABLE: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    """One model of the library sweep."""

    name: str  # pytest id and docs row
    library: str  # a key of CLAIMED or CLAIMED_TV
    model: str  # what is built, for the docs
    build: Callable[[], nn.Module]
    batches: Callable[[], list[dict[str, Any]]]  # keyword batches for model(**batch); the first one is padded
    kernel: str  # how the reference restricts the attention: "sdpa"/"softmax" (intercepts it), "megatron-mask"
    expect: str = "exact"
    refusal: str = ""  # for expect="refused": text the library's message must contain
    notes: str = ""
    batch_first: bool = True
    setup: Callable[[], contextlib.AbstractContextManager[Any]] = field(default=contextlib.nullcontext)
    backward: str = ""  # why a training step cannot run here (e.g. no CPU backward), else ""


def group(case: Case) -> str:
    """``"tv"`` for the cases of the second environment (timm, open_clip), else ``"main"``."""
    return "tv" if case.library in CLAIMED_TV else "main"


def available(case: Case) -> str | None:
    """``None`` when the case's library imports, else the reason it is skipped."""
    module = {**CLAIMED, **CLAIMED_TV}[case.library]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if group(case) == "tv":  # installed is not enough: without a matching torchvision the import fails
        if found and _imports(module):
            return _titan_missing() if case.library == "torchtitan" else None
        why = TV_WHY.get(case.library, "it needs the second environment")
        return f"{case.library} {'does not import' if found else 'is not installed'} here: {why}; {TV_WHERE}"
    return None if found else f"{case.library} is not installed ({module})"


@functools.cache
def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


TV_RUN = [False]  # set by tests/libs/conftest.py: this pytest run selects the second environment's tests (-m tv)


def must_run(case: Case) -> bool:
    """Whether a missing library fails the case instead of skipping it: under CI, the main group always,
    the tv group in the second environment's run (``pytest -m tv``)."""
    return in_ci() and (group(case) == "main" or TV_RUN[0])


def _ids(seed: int = 0, batch: int = B) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, S), generator=torch.Generator().manual_seed(seed))


# -- litgpt ---------------------------------------------------------------------------------


def _litgpt(name: str, **extra: Any) -> nn.Module:
    from litgpt.config import Config
    from litgpt.model import GPT

    cfg = Config.from_name(name, n_layer=4, n_embd=32, n_head=2, block_size=64, vocab_size=VOCAB,
                           padded_vocab_size=VOCAB, **extra)
    torch.manual_seed(0)
    return GPT(cfg)


def _litgpt_batches() -> list[dict[str, Any]]:
    return [{"idx": _ids()}]  # litgpt's GPT takes no padding mask


# -- OLMo-core --------------------------------------------------------------------------------


def _olmo(**extra: Any) -> nn.Module:
    from olmo_core.nn.transformer import TransformerConfig

    cfg = TransformerConfig.llama_like(d_model=32, vocab_size=VOCAB, n_layers=4, n_heads=2,
                                       hidden_size_multiple_of=16, **extra)
    torch.manual_seed(0)
    model = cfg.build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"))
    return model


def _window() -> Any:
    from olmo_core.nn.attention import SlidingWindowAttentionConfig

    return SlidingWindowAttentionConfig(pattern=[4, -1])


def _olmo_batches() -> list[dict[str, Any]]:
    return [{"input_ids": _ids()}]


# -- Megatron-core ----------------------------------------------------------------------------


@contextlib.contextmanager
def megatron_process_group() -> Iterator[None]:
    """A one-process gloo group with Megatron-core's model-parallel state (TP=1) on CPU.

    Megatron-core's local attention allocates its score buffer with ``device=torch.cuda.current_device()``
    and forks a CUDA RNG tracker for attention dropout; on CPU the buffer is pre-allocated on the CPU (it is
    reused when large enough) and the RNG tracker is Megatron's no-op one (dropout is 0 here).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        cpu_megatron()
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if own:
            dist.destroy_process_group()


def cpu_megatron() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state.get_global_memory_buffer().buffer[("mpu", torch.float32)] = torch.empty(1 << 16)


def megatron_gpt(tp: int = 1, parallel_output: bool = True, **extra: Any) -> nn.Module:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp, **extra)
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=96,  # TP divides it
                    max_sequence_length=64, position_embedding_type="learned_absolute",
                    parallel_output=parallel_output)


class MegatronRope(nn.Module):
    """A rotary GPTModel run layer stack by layer stack: Megatron-core's ``RotaryEmbedding.forward`` moves its
    table to CUDA, so the table ``[s,1,1,d]`` is built on the CPU from its own ``get_freqs_non_repeated``."""

    def __init__(self) -> None:
        super().__init__()
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel
        from megatron.core.transformer.transformer_config import TransformerConfig

        cfg = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                                hidden_dropout=0.0, attention_dropout=0.0)
        torch.manual_seed(0)
        self.gpt = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=96,
                            max_sequence_length=64, position_embedding_type="rope")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.gpt.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        freqs = self.gpt.rotary_pos_emb.get_freqs_non_repeated(input_ids.shape[1])
        table = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # as get_emb lays it out
        hidden = self.gpt.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=table)
        return self.gpt.output_layer(hidden)[0].transpose(0, 1)


def megatron_batches() -> list[dict[str, Any]]:
    ids = _ids() % 96
    pos = torch.arange(S)[None].expand(B, S)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)  # True = masked (Megatron's convention)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -3:] = True
    padded = (causal[None] | pad[:, None, :])[:, None]  # [b, 1, s, s]
    unpadded = causal[None, None].expand(B, 1, S, S)
    return [{"input_ids": ids, "position_ids": pos, "attention_mask": padded},
            {"input_ids": ids, "position_ids": pos, "attention_mask": unpadded}]


# -- torch nn.MultiheadAttention blocks (the form open_clip's towers use) ---------------------


def _torch_encoder(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=batch_first)
    return _Encoder(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), batch_first)


class _Encoder(nn.Module):
    """Token embeddings + ``nn.TransformerEncoder`` with a causal ``[L,L]`` float mask (as open_clip's text
    tower builds it) and an optional ``[B,S]`` key-padding mask."""

    def __init__(self, encoder: nn.TransformerEncoder, batch_first: bool) -> None:
        super().__init__()
        self.embed, self.encoder, self.batch_first = nn.Embedding(VOCAB, 32), encoder, batch_first

    def forward(self, ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        s = ids.shape[1]
        causal = torch.full((s, s), float("-inf")).triu(1)
        x = self.embed(ids)
        x = x if self.batch_first else x.transpose(0, 1)
        return self.encoder(x, mask=causal, src_key_padding_mask=key_padding_mask)


def _torch_batches() -> list[dict[str, Any]]:
    ids = _ids(batch=S)  # B == S: a [L,L] mask must not be read as a [B,S] padding mask
    pad = torch.zeros(S, S, dtype=torch.bool)
    pad[1, -3:] = True
    return [{"ids": ids, "key_padding_mask": pad}, {"ids": ids}]


# -- flex attention (torchtitan's attention_masks are BlockMasks; torchtitan's own models: at the end) ---------


class FlexBlock(nn.Module):
    """A pre-norm attention block on flex attention, taking a ``BlockMask`` as torchtitan's blocks do."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attention_masks: Any) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = flex_attention(q, k, v, block_mask=attention_masks)
        return x + self.out(y.transpose(1, 2).reshape(b, s, d))


class FlexModel(nn.Module):
    """Embeddings + 4 flex blocks with a causal sliding-window (4) ``BlockMask`` built for the full sequence."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.layers = nn.Embedding(VOCAB, 32), nn.ModuleDict({str(i): FlexBlock() for i in range(4)})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        def window(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return (q >= kv) & (q - kv < 4)

        mask = create_block_mask(window, None, None, ids.shape[1], ids.shape[1], device=ids.device)
        x = self.embed(ids)
        for layer in self.layers.values():
            x = layer(x, mask)
        return x


CASES: list[Case] = [
    Case("litgpt-llama", "litgpt", "litgpt GPT (Llama-3.2 config)", lambda: _litgpt("Llama-3.2-1B", n_query_groups=1,
         intermediate_size=64), _litgpt_batches, "sdpa", notes="rope cos/sin [1,S,d] gathered per sample"),
    Case("litgpt-pythia", "litgpt", "litgpt GPT (Pythia config)", lambda: _litgpt("pythia-14m"), _litgpt_batches,
         "sdpa", notes="partial rotary (25%), parallel residual"),
    Case("litgpt-mistral-window", "litgpt", "litgpt GPT (Mistral config)",
         lambda: _litgpt("Mistral-7B-v0.1", n_query_groups=1, intermediate_size=64, sliding_window_size=4),
         _litgpt_batches, "sdpa", notes="sliding window 4 < S=12, folded into a mask at the original positions"),
    Case("olmo-core-llama", "OLMo-core", "OLMo-core Transformer (llama_like)", _olmo, _olmo_batches, "sdpa",
         notes="rotary table passed as pos_sin/pos_cos at the original positions"),
    Case("olmo-core-window", "OLMo-core", "OLMo-core Transformer (llama_like, sliding window)",
         lambda: _olmo(sliding_window=_window()), _olmo_batches, "sdpa", expect="refused",
         refusal="its sliding-window attention (OLMo-core window_size) counts the tokens it sees",
         notes="window 4 in every other layer (pattern [4, -1])"),
    Case("megatron-gpt", "Megatron-core", "Megatron-core GPTModel (local spec, TP=1, gloo)", megatron_gpt,
         megatron_batches, "megatron-mask", batch_first=False, setup=megatron_process_group,
         notes="sequence-first [s,b,h]; attention_mask [b,1,s,s]"),
    Case("megatron-gpt-rope", "Megatron-core", "Megatron-core GPTModel (rope, TP=1, gloo)", MegatronRope,
         megatron_batches, "megatron-mask", batch_first=False, setup=megatron_process_group,
         notes="rotary_pos_emb [s,1,1,d] gathered per sample to [r,b,1,d]; table built on the CPU"),
    Case("torch-flex", "torch", "flex-attention blocks in an nn.ModuleDict (torchtitan-style)", FlexModel,
         lambda: [{"ids": _ids()}], "flex", backward="flex attention has no CPU backward in torch 2.13",
         notes="BlockMask (causal, window 4) rebuilt for the kept tokens from its mask_mod"),
    Case("torch-mha", "torch", "nn.TransformerEncoder (batch_first)", lambda: _torch_encoder(True), _torch_batches,
         "sdpa", notes="causal [L,L] attn mask with B == S, key padding mask"),
    Case("torch-mha-seq-first", "torch", "nn.TransformerEncoder (sequence-first)", lambda: _torch_encoder(False),
         _torch_batches, "sdpa", batch_first=False, notes="[S,B,H]; causal [L,L] attn mask with B == S"),
]

# -- timm and open_clip (second environment; builders in zoo_vision.py) -------------------------------------


def _timm(name: str, eager: bool = False, vit: bool = True, **extra: Any) -> Callable[[], nn.Module]:
    return lambda: zv.timm_model(name, eager, vit, **extra)


def _imgs(tokens: int) -> Callable[[], list[dict[str, Any]]]:
    return lambda: zv.image_batches(tokens)


_VIT, _DEIT, _EVA, _BEIT = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "eva02_tiny_patch14_224",
                            "beit_base_patch16_224")
_GRID = "32x32 image, 8x8 patches: 16 patch tokens"
CASES += [
    Case("timm-vit", "timm", "timm ViT (vit_tiny config)", _timm(_VIT), _imgs(17), "sdpa",
         notes=f"{_GRID} + class token; SDPA (fused_attn); padded: attn_mask [B,1,1,S]"),
    Case("timm-vit-eager", "timm", "timm ViT (vit_tiny config, eager attention)", _timm(_VIT, True), _imgs(17),
         "softmax", notes=f"{_GRID} + class token; softmax(q k^T) path (fused_attn=False)"),
    Case("timm-deit-distilled", "timm", "timm DeiT (deit_tiny_distilled config)", _timm(_DEIT), _imgs(18), "sdpa",
         notes=f"{_GRID} + class and distillation tokens (2 prefix tokens)"),
    Case("timm-eva02", "timm", "timm EVA-02 (eva02_tiny config)", _timm(_EVA), _imgs(17), "sdpa",
         notes=f"{_GRID} + class token; rope [S-1,d] gathered per sample to [B,1,r-1,d], class token kept"),
    Case("timm-eva02-eager", "timm", "timm EVA-02 (eva02_tiny config, eager attention)", _timm(_EVA, True),
         _imgs(17), "softmax", notes="as above, softmax(q k^T) path"),
    Case("timm-eva02-no-cls", "timm", "timm EVA-02 without class token (eva02_tiny config)",
         _timm(_EVA, class_token=False, global_pool="avg"), _imgs(16), "sdpa",
         notes=f"{_GRID}, no prefix: rope [S,d] gathered per sample"),
    Case("timm-eva02-patch-dropout", "timm", "timm EVA-02 with patch dropout 0.25 (eva02_tiny config)",
         _timm(_EVA, patch_drop_rate=0.25), lambda: zv.image_batches(), "sdpa",
         notes="12 of 16 patches + class token reach the blocks; rope arrives per sample [B,1,S-1,d] and is gathered "
               "per sample"),
    Case("timm-vit-rope-mixed", "timm", "timm RoPE-Mixed ViT (vit_small_patch16_rope_mixed config)",
         _timm("vit_small_patch16_rope_mixed_224"), _imgs(17), "sdpa",
         notes="EvaBlock with AttentionRope; per-layer table [heads,S-1,d] gathered per sample to [B,heads,r-1,d]"),
    Case("timm-vit-rope-reg", "timm", "timm RoPE ViT with a register token (vit_base_patch16_rope_reg1_gap config)",
         _timm("vit_base_patch16_rope_reg1_gap_256"), _imgs(17), "sdpa",
         notes="1 register token (no class token) as the prefix, kept; average pooling"),
    Case("timm-beit", "timm", "timm BEiT (beit_base config)", _timm(_BEIT), lambda: zv.image_batches(), "sdpa",
         notes=f"{_GRID} + class token; relative position bias [1,H,S,S] (random table) gathered to [B,H,r,r]"),
    Case("timm-beit-eager", "timm", "timm BEiT (beit_base config, eager attention)", _timm(_BEIT, True),
         lambda: zv.image_batches(), "softmax", notes="as above, softmax(q k^T) path; BEiT takes no mask"),
    Case("timm-swin", "timm", "timm Swin (swin_tiny config)",
         _timm("swin_tiny_patch4_window7_224", vit=False, img_size=32, patch_size=4, window_size=4, depths=(2, 4),
               num_heads=(2, 2), embed_dim=16), lambda: zv.image_batches(), "sdpa", expect="refused",
         refusal="(shifted) windows of the image grid", notes="window 4, stages of 2 and 4 blocks"),
    Case("timm-convnext", "timm", "timm ConvNeXt (convnext_atto config)",
         _timm("convnext_atto", vit=False, depths=(2, 2, 4, 2), dims=(8, 16, 16, 16)), lambda: zv.image_batches(),
         "sdpa", expect="refused", refusal="its token mixing is not attention", notes="[B,C,H,W] feature maps"),
    Case("open-clip-vision", "open_clip", "open_clip VisionTransformer (image tower)", zv.clip_vision,
         lambda: zv.image_batches(), "sdpa", notes=f"{_GRID} + class token; nn.MultiheadAttention"),
    Case("open-clip-text", "open_clip", "open_clip TextTransformer (text tower)", zv.clip_text, zv.text_batches,
         "sdpa", notes="causal [L,L] float attn_mask with B == L = 12"),
    Case("open-clip-text-padded", "open_clip", "open_clip TextTransformer (text tower, use_pad_mask)",
         lambda: zv.clip_text(pad_mask=True), zv.text_batches, "sdpa",
         notes="causal + padding [B*heads,L,L] attn_mask, B == L = 12"),
    Case("open-clip-text-custom", "open_clip", "open_clip TextTransformer (custom blocks: qk_norm)",
         lambda: zv.clip_text(qk_norm=True), zv.text_batches, "sdpa",
         notes="CustomResidualAttentionBlock with open_clip's Attention; causal [L,L] mask, B == L = 12"),
    Case("open-clip-text-custom-padded", "open_clip", "open_clip TextTransformer (custom blocks, use_pad_mask)",
         lambda: zv.clip_text(pad_mask=True, qk_norm=True), zv.text_batches, "sdpa",
         notes="open_clip's Attention reshapes a 3-D [B*heads,L,L] mask to [B,heads,L,L]"),
    Case("open-clip-clip", "open_clip", "open_clip CLIP (image and text towers)", zv.ClipLogits, zv.clip_batches,
         "sdpa", notes="the default stack is the text tower; for the image tower, convert model.visual (notes)"),
]
# -- torchtitan (second environment; builders in zoo_titan.py) ------------------------------------------------

_TITAN_CPU = ("flex attention has no CPU backward in torch 2.14 either, and it is torchtitan 0.3's only attention "
              "for its language models on CPU (sdpa is retired there, varlen needs CUDA)")
CASES += [
    Case("torchtitan-llama3", "torchtitan", "torchtitan Llama3Model (debugmodel layout, flex attention)",
         lambda: _titan().TitanStep(), lambda: _titan().batches(), "flex", backward=_TITAN_CPU,
         notes="called as torchtitan's trainer calls it (masks from positions); batches: packed documents, one "
               "document, positions=None in the blocks"),
    Case("torchtitan-qwen3", "torchtitan", "torchtitan Qwen3Model (debugmodel layout, flex attention)",
         lambda: _titan().TitanStep(flavor="qwen3"), lambda: _titan().batches(), "flex", backward=_TITAN_CPU,
         notes="grouped-query attention, qk-norm, cos/sin RoPE, tied embeddings; batches as above"),
    Case("torchtitan-qwen3-moe", "torchtitan", "torchtitan Qwen3Model (debugmodel_moe layout, flex attention)",
         lambda: _titan().TitanStep(flavor="qwen3-moe"), lambda: _titan().batches(), "flex", backward=_TITAN_CPU,
         notes="MoE blocks: each token routed to 2 of 4 experts (token-choice, no capacity limit)"),
    Case("torchtitan-llama3-varlen", "torchtitan", "torchtitan Llama3Model (varlen attention)",
         lambda: _titan().TitanStep("varlen"), lambda: _titan().batches(), "flex", expect="refused",
         refusal="its varlen attention (torchtitan VarlenAttention)", notes="varlen attention runs on CUDA only"),
]


def _titan_missing() -> str | None:
    """Why the installed torchtitan cannot run the sweep's cases (they are written for 0.3), else ``None``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torchtitan")
    except PackageNotFoundError:  # a source checkout on the path: its models decide
        found = "0.3.?"
    if not found.startswith("0.3."):
        return f"torchtitan {found} is installed; the sweep's cases need 0.3 (tests/libs/no-deps-tv.txt)"
    if importlib.util.find_spec("triton") is None:
        return "torchtitan 0.3 imports triton, which is not installed (a CPU build of torch has none)"
    return None


def _titan() -> Any:
    from . import zoo_titan

    return zoo_titan


BY_NAME = {c.name: c for c in CASES}
