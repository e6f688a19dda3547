"""The library zoo: tiny random-weight models of model libraries beyond transformers (no downloads).

Each case builds a 4-layer model (hidden 32) and the batches the sweep feeds it; ``expect`` is the
status the sweep asserts (``exact`` or ``refused``). A library that is not installed makes its cases
skip with the reason in :data:`NOT_INSTALLABLE` (or "not installed"); under ``CI`` the libraries in
:data:`CLAIMED` must be importable, and those in :data:`CLAIMED_TV` in the second environment's run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

S, B, R = 12, 2, 6  # sequence length, batch size, reserved length
VOCAB = 97

# Libraries the sweep claims to cover: installed by the README's test command, required in CI.
CLAIMED = {"litgpt": "litgpt", "OLMo-core": "olmo_core", "Megatron-core": "megatron.core", "torch": "torch"}
# Libraries of the second test environment (.venv-tv: torch 2.14.1, a CUDA build that runs on the CPU, with
# triton), run with ``pytest -m tv tests/libs``: there they must be importable under CI, here they skip.
CLAIMED_TV = {"torchtitan": "torchtitan"}
TV_REASONS = {
    "torchtitan": "torchtitan 0.3 imports triton when its llama3 model is imported (MoE kernels), which the CPU "
                  "build of torch 2.13 lacks; its cases run in the second test environment (.venv-tv, `pytest -m tv`)",
}
# Libraries that do not install cleanly next to the CPU build of torch 2.13 (what blocks them).
NOT_INSTALLABLE = {
    "timm": "timm imports torchvision at import time (timm.data), and torchvision's only x86-64 wheel on PyPI is "
            "a CUDA build: with the CPU torch it fails at import ('operator torchvision::nms does not exist')",
    "open_clip": "open_clip imports torchvision (open_clip.transform) and timm; see timm",
}


@dataclass(frozen=True)
class Case:
    """One model of the library sweep."""

    name: str  # pytest id and docs row
    library: str  # a key of CLAIMED or CLAIMED_TV
    model: str  # what is built, for the docs
    build: Callable[[], nn.Module]
    batches: Callable[[], list[dict[str, Any]]]  # keyword batches for model(**batch); the first one is padded
    kernel: str  # how the reference restricts the attention: "sdpa" (intercepts SDPA) or "megatron-mask"
    expect: str = "exact"
    refusal: str = ""  # for expect="refused": text the library's message must contain
    notes: str = ""
    batch_first: bool = True
    setup: Callable[[], contextlib.AbstractContextManager[Any]] = field(default=contextlib.nullcontext)
    backward: str = ""  # why a training step cannot run here (e.g. no CPU backward), else ""


def group(case: Case) -> str:
    """``"tv"`` for the cases of the second environment, else ``"main"``."""
    return "tv" if case.library in CLAIMED_TV else "main"


def available(case: Case) -> str | None:
    """``None`` when the case's library imports, else the reason it is skipped."""
    module = {**CLAIMED, **CLAIMED_TV}[case.library]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found and case.library == "torchtitan":
        return _titan_missing()
    if found:
        return None
    if group(case) == "tv":
        return f"{case.library} is not installed: {TV_REASONS[case.library]}"
    return f"{case.library} is not installed ({module})"


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


# -- flex attention (torchtitan's attention_masks are BlockMasks; torchtitan itself does not install here) -------


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
    from importlib.metadata import version

    found = version("torchtitan")
    if not found.startswith("0.3."):
        return f"torchtitan {found} is installed; the sweep's cases need 0.3 (tests/libs/no-deps-tv.txt)"
    if importlib.util.find_spec("triton") is None:
        return "torchtitan 0.3 imports triton, which is not installed (a CPU build of torch has none)"
    return None


def _titan() -> Any:
    from . import zoo_titan

    return zoo_titan


BY_NAME = {c.name: c for c in CASES}
