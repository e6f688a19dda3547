"""Every family of transformers' auto mappings, built from a generic tiny config.

The sweep does not keep a hand list of families: it enumerates transformers' auto mappings
(causal LM, masked LM, sequence-to-sequence, image classification) and builds each model type
from its config class's defaults with every size shrunk by name (hidden 32, 4 layers, 4 heads,
vocabulary 99, windows 4, 4 experts...). Families whose generic config cannot work get a small
override in :data:`OVERRIDES`; the hand-tuned entries of ``zoo.py`` replace the generic build of
their model type entirely.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .zoo import FAMILIES, Family

MAPPINGS = (  # (auto mapping, zoo kind): a model type is swept once, in the first mapping that has it
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "decoder"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "encoder"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "vision"),
)
HIDDEN, LAYERS, HEADS, VOCAB, WINDOW, EXPERTS = 32, 4, 4, 99, 4, 4
_SIZES: list[tuple[int, tuple[str, ...]]] = [  # (value, attribute names)
    (HIDDEN, ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "word_embed_proj_dim", "embedding_size",
         "d_embed", "n_embed", "projection_dim", "emb_dim", "attention_hidden_size", "lru_width", "embedding_dim",
         "projection_size", "d_latents", "input_embedding_size", "output_embedding_size", "mamba_d_ssm")),
    (LAYERS, ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
         "num_decoder_layers", "num_encoder_layers", "num_hidden_layers_per_block", "num_blocks")),
    (HEADS, ("mamba_n_heads", "n_mamba_heads", "linear_num_heads", "num_attention_heads", "n_head", "n_heads",
         "num_heads", "encoder_attention_heads", "decoder_attention_heads", "attention_heads",
         "num_attention_heads_per_layer")),
    (2, ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "num_experts_per_tok", "moe_k",
         "top_k", "moe_topk", "num_experts_per_token")),
    (8, ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "d_kv", "attention_head_dim", "kv_channels",
         "v_head_dim", "qk_head_dim", "linear_key_head_dim", "linear_value_head_dim", "mamba_headdim", "mamba_d_head",
         "linear_head_dim", "query_pre_attn_scalar", "hidden_size_per_layer_input")),
    (4, ("rotary_dim", "state_size", "ssm_state_size", "mamba_d_state", "conv_kernel", "mamba_d_conv",
         "linear_conv_kernel_dim", "num_buckets", "relative_attention_num_buckets")),
    (16, ("q_lora_rank", "kv_lora_rank", "time_step_rank", "mamba_dt_rank", "o_lora_rank")),
    (64, ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "hidden_dim",
         "ffn_hidden_size", "intermediate_dim", "dff", "d_inner", "dim_ff", "feed_forward_size",
         "first_dense_intermediate_size", "dense_intermediate_size", "intermediate_size_mlp")),
    (32, ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
         "moe_ffn_hidden_size", "mlp_dim", "shared_intermediate_size", "moe_shared_expert_intermediate_size",
         "expert_ffn_hidden_size")),
    (128, ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length", "seq_length",
         "max_length", "max_source_positions", "max_target_positions")),
    (WINDOW, ("sliding_window", "window_size", "local_window_size", "attention_window_size", "local_attention",
         "sliding_window_size", "attention_chunk_size", "keep_window_size", "mamba_chunk_size", "chunk_size",
         "block_size", "index_topk", "local_attention_window_len")),
    (EXPERTS, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")),
    (1, ("expand", "mamba_expand", "n_groups", "mamba_n_groups", "num_expert_group", "n_shared_experts",
         "num_shared_experts", "n_group", "topk_group", "first_k_dense_replace")),
]
SIZES = {name: value for value, names in _SIZES for name in names}
VISION_SIZES = {"image_size": 16, "patch_size": 4}

# Small per-family settings where generic shrinking cannot work (merged over the generic ones).
HYBRID = ["linear_attention", "full_attention", "linear_attention", "full_attention"]  # layers 1, 3: attention
OVERRIDES: dict[str, dict[str, Any]] = {
    # hybrids: the generic 4 layers would hold no attention layer at all
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1, 3]},
    "granitemoehybrid": {"layer_types": HYBRID},
    "bailing_hybrid": {"layer_types": HYBRID},
    "kimi_linear": {"layer_types": HYBRID},
    "qwen3_next": {"layer_types": HYBRID},
    "qwen3_5_text": {"layer_types": HYBRID},
    "qwen3_5_moe_text": {"layer_types": HYBRID},
    "olmo_hybrid": {"layer_types": HYBRID},
    # the default shares more layers' caches than 4 layers have
    "gemma3n_text": {"num_kv_shared_layers": 0},
    # the axial position dimensions must sum to the hidden size; an LM head needs is_decoder
    "reformer": {"axial_pos_embds_dim": [16, 16], "is_decoder": True},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
               "hybrid_layer_ids": [1, 3]},
}


def mapped_types() -> dict[str, tuple[str, str]]:
    """``{model_type: (model class name, kind)}`` over the mappings, in mapping order."""
    from transformers.models.auto import modeling_auto

    out: dict[str, tuple[str, str]] = {}
    for mapping, kind in MAPPINGS:
        for model_type, cls in getattr(modeling_auto, mapping).items():
            if isinstance(cls, (tuple, list)):
                cls = cls[0]
            out.setdefault(model_type, (cls, kind))
    return out


def _shrink_value(key: str, value: Any, vision: bool) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if "jitter" in key and isinstance(value, float):
        return 0.0  # router noise in training mode: the reference would draw other noise than the wrapper
    if key in SIZES and isinstance(value, int):
        return SIZES[key]
    if vision and key in VISION_SIZES and isinstance(value, int):
        return VISION_SIZES[key]
    if ("vocab_size" in key or key == "codebook_size") and isinstance(value, int):
        return VOCAB
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if key in ("depths", "num_layers_per_stage", "layers", "block_repeats"):
            return [1] * len(value)
        if key in ("hidden_sizes", "embed_dims", "embedding_sizes", "dims", "channels"):
            return [16 * (i + 1) for i in range(len(value))]
        if key in ("num_heads", "num_attention_heads", "heads"):
            return [2] * len(value)
        if key == "sr_ratios":
            return [1] * len(value)
        if key in ("embed_dim",):
            return [16 * (i + 1) for i in range(len(value))]
        if key in SIZES:
            return SIZES[key]  # one value for every layer (Gemma-3n's per-layer intermediate sizes)
    return value


def _shrink(defaults: dict[str, Any], vision: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in defaults.items():
        if key.startswith("_") or key in ("transformers_version", "architectures", "id2label", "label2id"):
            continue
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (text_config, vision_config...)
            out[key] = _shrink(value, vision or "vision" in key)
            continue
        new = _shrink_value(key, value, vision)
        if new is not value:
            out[key] = new
    if "kv_lora_rank" in defaults and "num_key_value_heads" in out:
        out["num_key_value_heads"] = HEADS  # multi-head latent attention has as many key/value heads as heads
    tokens = {k: v for k, v in defaults.items() if k.endswith(("_token_id", "_token_index", "_id")) and
              isinstance(v, int) and not isinstance(v, bool) and v >= VOCAB - 8}
    for i, key in enumerate(sorted(tokens)):
        out[key] = VOCAB - 1 - i  # special tokens above the range the batches draw from (3..89)
    return out


def generic_settings(config_name: str, kind: str) -> dict[str, Any]:
    """The generic tiny settings for a config class: its defaults with every size shrunk by name."""
    import transformers as T

    defaults = getattr(T, config_name)().to_dict()
    settings = _shrink(defaults, kind == "vision")
    if kind == "vision":
        settings.setdefault("num_labels", 2)
    return settings


@functools.cache
def families() -> list[Family]:
    """Every family of the sweep: the hand-tuned zoo entries, then every other mapped model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    out = list(FAMILIES)
    covered = {model_type_of(f) for f in FAMILIES} | {f.family for f in FAMILIES}  # gemma3, siglip: hand rows
    for model_type, (model, kind) in mapped_types().items():
        if model_type in covered:
            continue
        config = CONFIG_MAPPING_NAMES.get(model_type, "")
        out.append(Family(model_type, config, model, kind, {}, group="Generated", notes=""))
    return out


def generated() -> list[Family]:
    """The families built from a generic config (every mapped model type the hand-tuned zoo does not cover)."""
    return [f for f in families() if f.group == "Generated"]


def model_type_of(fam: Family) -> str:
    import transformers as T

    cls = getattr(T, fam.config, None)
    return str(getattr(cls, "model_type", fam.name))


def make_generic_config(fam: Family) -> Any:
    """A tiny config for a generated family (``Family.settings`` is empty for these)."""
    import transformers as T

    cls: Callable[..., Any] = getattr(T, fam.config)
    settings = generic_settings(fam.config, fam.kind)
    settings.update(OVERRIDES.get(fam.name, {}))
    return cls(**settings)
