"""The architecture zoo: tiny random-weight Hugging Face models built from configs (no downloads).

Every entry is 2-4 layers, hidden 32, dropout off, with sliding windows (where the family
has them) shorter than the sequence. ``expect`` is the status the sweep asserts:
``"exact"`` (every wrapped layer equals the independent reference) or ``"refused"``
(``convert_to_random_ltd`` raises the library's error and leaves the model untouched).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

S = 12  # text length; vision: 16 patches + [CLS]; speech: 24 frames; seq2seq targets: 10
R = 6  # reserved length used by the sweep (below every stack's length)
H = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, vocab_size=97,
         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(H, num_key_value_heads=1, head_dim=16)
VISION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=16,
              patch_size=4, num_channels=3, num_labels=2)
SPEECH = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, vocab_size=20,
              conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
              num_conv_pos_embedding_groups=2, mask_time_prob=0.0, mask_feature_prob=0.0)
SEQ2SEQ = dict(vocab_size=97, d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
T5 = dict(vocab_size=97, d_model=32, d_kv=16, d_ff=64, num_layers=4, num_decoder_layers=4, num_heads=2,
          relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)


@dataclass(frozen=True)
class Family:
    """One architecture variant of the sweep."""

    name: str  # pytest id and docs row, e.g. "falcon-alibi"
    config: str  # transformers config class name
    model: str  # transformers model class name
    kind: str  # "decoder" | "encoder" | "vision" | "speech" | "whisper" | "seq2seq"
    settings: dict[str, Any] = field(default_factory=dict)
    convert: dict[str, Any] = field(default_factory=dict)  # extra convert_to_random_ltd arguments
    expect: str = "exact"
    notes: str = ""
    group: str = ""  # the docs section; default from kind
    inverted_mask: bool = False  # the layer's bool mask is True where attention is *blocked* (MPT)
    refusal: str = ""  # for expect="refused": text the library's message must contain
    xfail: str = ""  # a known gap the library has not closed yet (the sweep marks it xfail, strict)

    @property
    def family(self) -> str:
        """The architecture family (variants such as ``falcon-alibi`` or ``t5-decoder`` share one)."""
        return self.name.split("-")[0]

    @property
    def section(self) -> str:
        return self.group or {"decoder": "Decoders", "encoder": "Encoders", "vision": "Vision",
                              "speech": "Speech", "whisper": "Speech", "seq2seq": "Encoder-decoder"}[self.kind]


def _f(name: str, config: str, model: str, kind: str, settings: dict[str, Any], **kw: Any) -> Family:
    return Family(name, config, model, kind, settings, **kw)


SLIDING = "sliding window 4 < S=12"
FAMILIES: list[Family] = [
    # -- decoders -------------------------------------------------------------------------------
    _f("gpt2", "GPT2Config", "GPT2LMHeadModel", "decoder", H),
    _f("gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM", "decoder",
       dict(H, attention_types=[[["global", "local"], 2]], window_size=4), notes="local layers: window 4 < S=12"),
    _f("gptj", "GPTJConfig", "GPTJForCausalLM", "decoder", dict(H, rotary_dim=8)),
    _f("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "decoder", dict(H, rotary_pct=0.5)),
    _f("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "decoder", dict(H, multi_query=True)),
    _f("codegen", "CodeGenConfig", "CodeGenForCausalLM", "decoder", dict(H, rotary_dim=8, n_ctx=64)),
    _f("llama", "LlamaConfig", "LlamaForCausalLM", "decoder", LLAMA_LIKE),
    _f("mistral", "MistralConfig", "MistralForCausalLM", "decoder", dict(LLAMA_LIKE, sliding_window=4),
       notes=SLIDING),
    _f("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "decoder",
       dict(LLAMA_LIKE, use_sliding_window=True, sliding_window=4, max_window_layers=2),
       notes=SLIDING + " (layers 2-3)"),
    _f("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "decoder", LLAMA_LIKE),
    _f("gemma", "GemmaConfig", "GemmaForCausalLM", "decoder", LLAMA_LIKE),
    _f("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "decoder", dict(LLAMA_LIKE, sliding_window=4),
       notes=SLIDING + " (alternate layers), logit soft-capping"),
    _f("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "decoder",
       dict(LLAMA_LIKE, sliding_window=4, sliding_window_pattern=2), notes=SLIDING + " (alternate layers)"),
    _f("phi", "PhiConfig", "PhiForCausalLM", "decoder", dict(H, partial_rotary_factor=0.5)),
    _f("phi3", "Phi3Config", "Phi3ForCausalLM", "decoder", dict(LLAMA_LIKE, sliding_window=None)),
    _f("opt", "OPTConfig", "OPTForCausalLM", "decoder", dict(H, ffn_dim=64, word_embed_proj_dim=32)),
    _f("bloom", "BloomConfig", "BloomForCausalLM", "decoder", H, notes="alibi"),
    _f("falcon-alibi", "FalconConfig", "FalconForCausalLM", "decoder",
       dict(H, alibi=True, new_decoder_architecture=False, multi_query=True), notes="alibi"),
    _f("falcon-rotary", "FalconConfig", "FalconForCausalLM", "decoder",
       dict(H, alibi=False, new_decoder_architecture=True, num_kv_heads=1), notes="rotary"),
    _f("mpt", "MptConfig", "MptForCausalLM", "decoder", dict(d_model=32, n_layers=4, n_heads=2, max_seq_len=64,
                                                            vocab_size=97, expansion_ratio=2), notes="alibi",
       inverted_mask=True),
    _f("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", "decoder", dict(LLAMA_LIKE, sliding_window=4),
       notes=SLIDING),
    _f("stablelm", "StableLmConfig", "StableLmForCausalLM", "decoder", dict(LLAMA_LIKE, partial_rotary_factor=0.5)),
    _f("olmo2", "Olmo2Config", "Olmo2ForCausalLM", "decoder", LLAMA_LIKE),
    _f("cohere", "CohereConfig", "CohereForCausalLM", "decoder", LLAMA_LIKE),
    _f("granite", "GraniteConfig", "GraniteForCausalLM", "decoder", LLAMA_LIKE),
    _f("xglm", "XGLMConfig", "XGLMForCausalLM", "decoder",
       dict(vocab_size=97, d_model=32, num_layers=4, attention_heads=2, ffn_dim=64, max_position_embeddings=64)),
    _f("biogpt", "BioGptConfig", "BioGptForCausalLM", "decoder", H),
    # -- mixture of experts (load-balancing loss on) --------------------------------------------
    _f("mixtral", "MixtralConfig", "MixtralForCausalLM", "decoder",
       dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, sliding_window=None),
       notes="output_router_logits=True", group="Mixture of experts"),
    _f("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "decoder",
       dict(LLAMA_LIKE, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, output_router_logits=True), notes="output_router_logits=True",
       group="Mixture of experts"),
    _f("olmoe", "OlmoeConfig", "OlmoeForCausalLM", "decoder",
       dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, output_router_logits=True),
       notes="output_router_logits=True", group="Mixture of experts"),
    _f("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", "decoder",
       dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),
       notes="output_router_logits=True", group="Mixture of experts"),
    # -- encoders -------------------------------------------------------------------------------
    _f("bert", "BertConfig", "BertForMaskedLM", "encoder", H),
    _f("roberta", "RobertaConfig", "RobertaForMaskedLM", "encoder", H),
    _f("xlm_roberta", "XLMRobertaConfig", "XLMRobertaForMaskedLM", "encoder", H),
    _f("camembert", "CamembertConfig", "CamembertForMaskedLM", "encoder", H),
    _f("albert", "AlbertConfig", "AlbertForMaskedLM", "encoder", dict(H, embedding_size=16),
       notes="one shared layer called 4 times"),
    _f("distilbert", "DistilBertConfig", "DistilBertForMaskedLM", "encoder",
       dict(vocab_size=97, dim=32, n_layers=4, n_heads=2, hidden_dim=64, max_position_embeddings=64, pad_token_id=0)),
    _f("electra", "ElectraConfig", "ElectraForMaskedLM", "encoder", dict(H, embedding_size=16)),
    _f("deberta", "DebertaConfig", "DebertaForMaskedLM", "encoder",
       dict(H, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16),
       notes="relative positions"),
    _f("deberta_v2", "DebertaV2Config", "DebertaV2ForMaskedLM", "encoder",
       dict(H, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16, position_buckets=8),
       notes="relative positions (`relative_pos` [1,S,S])"),
    _f("mpnet", "MPNetConfig", "MPNetForMaskedLM", "encoder", H,
       notes="relative position bias (`position_bias` [B,H,S,S])"),
    _f("megatron_bert", "MegatronBertConfig", "MegatronBertForMaskedLM", "encoder", H),
    _f("ernie", "ErnieConfig", "ErnieForMaskedLM", "encoder", H),
    _f("roformer", "RoFormerConfig", "RoFormerForMaskedLM", "encoder", dict(H, embedding_size=32),
       notes="rotary (`sinusoidal_pos`)"),
    _f("data2vec_text", "Data2VecTextConfig", "Data2VecTextForMaskedLM", "encoder", H),
    _f("esm", "EsmConfig", "EsmForMaskedLM", "encoder", dict(H, position_embedding_type="rotary", mask_token_id=3),
       notes="rotary"),
    _f("modernbert", "ModernBertConfig", "ModernBertForMaskedLM", "encoder",
       dict(H, local_attention=4, global_attn_every_n_layers=2, cls_token_id=1, sep_token_id=2),
       notes="local attention window 4 < S=12 (alternate layers)"),
    _f("big_bird", "BigBirdConfig", "BigBirdForMaskedLM", "encoder", dict(H, attention_type="original_full"),
       notes="`attention_type=\"original_full\"`"),
    _f("big_bird-block_sparse", "BigBirdConfig", "BigBirdForMaskedLM", "encoder",
       dict(H, attention_type="block_sparse", block_size=2, num_random_blocks=1), notes="block-sparse attention",
       expect="refused", refusal="BigBirdLayer exactly: its block-sparse attention"),
    _f("longformer", "LongformerConfig", "LongformerForMaskedLM", "encoder", dict(H, attention_window=4),
       notes="sliding-window chunks", expect="refused",
       refusal="LongformerLayer exactly: its sliding-window attention cuts the sequence"),
    _f("nystromformer", "NystromformerConfig", "NystromformerForMaskedLM", "encoder",
       dict(H, num_landmarks=4, segment_means_seq_len=12), notes="landmark attention", expect="refused",
       refusal="NystromformerLayer exactly: its Nystrom attention averages fixed segments"),
    # -- vision ---------------------------------------------------------------------------------
    _f("vit", "ViTConfig", "ViTForImageClassification", "vision", VISION),
    _f("deit", "DeiTConfig", "DeiTForImageClassification", "vision", VISION),
    _f("dinov2", "Dinov2Config", "Dinov2ForImageClassification", "vision", dict(VISION, mlp_ratio=2)),
    _f("beit", "BeitConfig", "BeitForImageClassification", "vision",
       dict(VISION, use_relative_position_bias=True), notes="relative position bias per layer"),
    _f("data2vec_vision", "Data2VecVisionConfig", "Data2VecVisionForImageClassification", "vision",
       dict(VISION, use_relative_position_bias=False)),
    _f("swin", "SwinConfig", "SwinForImageClassification", "vision",
       dict(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[4], num_heads=[2], window_size=2,
            num_labels=2), notes="shifted 2-D windows", expect="refused",
       refusal="random-LTD cannot drop tokens in SwinLayer exactly: it partitions its tokens into 2-D windows"),
    _f("siglip", "SiglipVisionConfig", "SiglipVisionModel", "vision", VISION),
    # -- speech ---------------------------------------------------------------------------------
    _f("wav2vec2", "Wav2Vec2Config", "Wav2Vec2Model", "speech", dict(SPEECH, feat_extract_norm="layer")),
    _f("hubert", "HubertConfig", "HubertModel", "speech", dict(SPEECH, feat_extract_norm="layer")),
    _f("wavlm", "WavLMConfig", "WavLMModel", "speech",
       dict(SPEECH, feat_extract_norm="layer", num_buckets=16, max_bucket_distance=32),
       notes="gated relative position bias"),
    _f("data2vec_audio", "Data2VecAudioConfig", "Data2VecAudioModel", "speech", dict(SPEECH, conv_pos_kernel_size=5,
       num_conv_pos_embeddings=3)),
    _f("whisper", "WhisperConfig", "WhisperForConditionalGeneration", "whisper",
       dict(vocab_size=97, d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
            max_source_positions=12, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)),
    # -- encoder-decoder ------------------------------------------------------------------------
    _f("t5", "T5Config", "T5ForConditionalGeneration", "seq2seq", T5,
       notes="relative `position_bias` handed from layer to layer"),
    _f("mt5", "MT5Config", "MT5ForConditionalGeneration", "seq2seq", T5),
    _f("umt5", "UMT5Config", "UMT5ForConditionalGeneration", "seq2seq", T5),
    _f("bart", "BartConfig", "BartForConditionalGeneration", "seq2seq", SEQ2SEQ),
    _f("mbart", "MBartConfig", "MBartForConditionalGeneration", "seq2seq", SEQ2SEQ),
    _f("pegasus", "PegasusConfig", "PegasusForConditionalGeneration", "seq2seq", SEQ2SEQ),
    _f("marian", "MarianConfig", "MarianMTModel", "seq2seq", SEQ2SEQ),
    _f("blenderbot", "BlenderbotConfig", "BlenderbotForConditionalGeneration", "seq2seq", SEQ2SEQ),
    _f("m2m100", "M2M100Config", "M2M100ForConditionalGeneration", "seq2seq", SEQ2SEQ),
    _f("plbart", "PLBartConfig", "PLBartForConditionalGeneration", "seq2seq", SEQ2SEQ),
    _f("longt5", "LongT5Config", "LongT5ForConditionalGeneration", "seq2seq",
       dict(T5, encoder_attention_type="local", local_radius=2), notes="blocked local attention in the encoder",
       expect="refused", refusal="LongT5Block exactly: its local attention splits the sequence it sees into blocks"),
    _f("led", "LEDConfig", "LEDForConditionalGeneration", "seq2seq",
       dict(SEQ2SEQ, max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, attention_window=4),
       notes="sliding-window chunks in the encoder", expect="refused",
       refusal="LEDEncoderLayer exactly: its sliding-window attention cuts the sequence"),
]
DECODER_STACKS = [  # encoder-decoder models with the decoder stack (cross-attention) or both stacks chosen
    Family(f"{f.name}-decoder", f.config, f.model, f.kind, f.settings, {"stack": "decoder"}, "exact",
           "`stack=\"decoder\"`: causal self-attention, cross-attention to the full encoder output", f.group,
           f.inverted_mask)
    for f in FAMILIES if f.name in ("t5", "bart", "whisper", "led", "longt5")
] + [
    Family(f"{f.name}-both", f.config, f.model, f.kind, f.settings, {"stack": "both"}, f.expect,
           "`stack=\"both\"`: the middle layers of the encoder and of the decoder", f.group)
    for f in FAMILIES if f.name in ("t5", "bart")
]
VARIANTS = FAMILIES + DECODER_STACKS
BY_NAME = {f.name: f for f in VARIANTS}


def _zero_dropout(cfg: Any) -> None:
    for key, value in list(vars(cfg).items()):
        low = key.lower()
        if isinstance(value, float) and ("drop" in low or key in ("mask_time_prob", "mask_feature_prob")):
            setattr(cfg, key, 0.0)
        elif hasattr(value, "to_dict") and not isinstance(value, type):
            _zero_dropout(value)


def make_config(fam: Family, attn: str) -> Any:
    import transformers as T

    cls: Callable[..., Any] = getattr(T, fam.config)
    cfg = cls(**fam.settings)
    _zero_dropout(cfg)
    cfg._attn_implementation = attn
    return cfg


@functools.cache
def _base(name: str, attn: str) -> nn.Module:
    import transformers as T

    fam = BY_NAME[name]
    torch.manual_seed(0)
    model = getattr(T, fam.model)(make_config(fam, attn))
    model.config._attn_implementation = attn
    return model.train()


def build(name: str, attn: str) -> nn.Module:
    """A fresh copy of the family's tiny model in training mode (one build per family and attention kind)."""
    return copy.deepcopy(_base(name, attn))


def attn_kinds(name: str) -> list[str]:
    """The attention implementations the family's model class supports among eager and sdpa."""
    import transformers as T

    cls = getattr(T, BY_NAME[name].model)
    return ["eager", "sdpa"] if getattr(cls, "_supports_sdpa", False) else ["eager"]


def batch_for(fam: Family, *, labels: bool = False) -> dict[str, torch.Tensor]:
    """A padded batch of two samples (pads where the family's tokenizer puts them)."""
    g = torch.Generator().manual_seed(1)
    if fam.kind == "vision":
        out = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
        if labels and "Classification" in fam.model:
            out["labels"] = torch.tensor([0, 1])
        return out
    if fam.kind == "speech":
        mask = torch.ones(2, 250, dtype=torch.long)
        mask[1, 200:] = 0
        return {"input_values": torch.randn(2, 250, generator=g), "attention_mask": mask}
    if fam.kind == "whisper":
        out = {"input_features": torch.randn(2, 8, 24, generator=g),
               "decoder_input_ids": torch.randint(3, 90, (2, 10), generator=g)}
        if labels:
            out["labels"] = out["decoder_input_ids"]
        return out
    ids = torch.randint(3, 90, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    if fam.kind == "decoder":
        mask[1, :3] = 0  # left padding
    else:
        mask[1, S - 3:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if fam.kind == "seq2seq":
        tgt = torch.randint(3, 90, (2, 10), generator=g)
        tmask = torch.ones(2, 10, dtype=torch.long)
        tmask[1, 7:] = 0
        out.update(decoder_input_ids=tgt, decoder_attention_mask=tmask)
        if labels:
            out["labels"] = tgt.masked_fill(tmask == 0, -100)
        return out
    if labels:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out
