"""The architecture sweep: every family of the zoo is exact against the independent reference, or refused.

See ``reference.py`` for the reference and ``zoo.py`` for the models; ``docs/architectures.md``
is generated from the same results (``test_arch_page.py``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from .generic import generated
from .reference import check_checkpointing, check_eval_identical, check_training_step, result
from .sweep import STATUSES, status
from .zoo import BY_NAME, VARIANTS, Family, attn_kinds


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny ops: one thread is far faster on a busy 2-core machine


def _cases(families: list[Family], *, first_attention_only: bool = False) -> list[object]:
    return [
        pytest.param(f.name, attn, id=f"{f.name}-{attn}",
                     marks=[pytest.mark.xfail(strict=True, reason=f.xfail)] if f.xfail else [])
        for f in families for attn in attn_kinds(f.name)[: 1 if first_attention_only else None]
    ]


@pytest.mark.parametrize(("name", "attn"), _cases(VARIANTS))
def test_family_is_exact_or_refused(name: str, attn: str) -> None:
    fam = BY_NAME[name]
    res = result(name, attn)
    assert res.status == fam.expect, f"{name} ({attn}): expected {fam.expect}, found {res.status}: {res.detail}"
    if fam.expect == "refused":
        assert fam.refusal and fam.refusal in res.detail, res.detail


@pytest.mark.parametrize(("name", "attn"), _cases([f for f in VARIANTS if f.expect == "exact"]))
def test_converted_model_trains_one_step_on_a_padded_batch(name: str, attn: str) -> None:
    loss = check_training_step(BY_NAME[name], attn)
    assert loss > 0


@pytest.mark.parametrize(("name", "attn"), _cases([f for f in VARIANTS if f.expect == "exact"],
                                                   first_attention_only=True))
def test_converted_model_in_eval_mode_equals_the_unconverted_one(name: str, attn: str) -> None:
    check_eval_identical(BY_NAME[name], attn)


@pytest.mark.parametrize(("name", "attn"), _cases([f for f in VARIANTS if f.expect == "exact"],
                                                   first_attention_only=True))
def test_gradient_checkpointing_gives_the_same_gradients(name: str, attn: str) -> None:
    if not check_checkpointing(BY_NAME[name], attn):
        pytest.skip(f"{BY_NAME[name].model} does not support gradient checkpointing")


def test_sweep_covers_the_issue_families() -> None:
    families = {f.family for f in VARIANTS}
    assert len(families) >= 55
    named = {"gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "opt",
             "bloom", "falcon", "mpt", "codegen", "mixtral", "qwen2_moe", "bert", "roberta", "albert", "distilbert",
             "electra", "deberta", "deberta_v2", "mpnet", "xlm_roberta", "vit", "deit", "beit", "swin", "wav2vec2",
             "hubert", "whisper", "t5", "bart", "mbart", "pegasus"}
    assert named <= families, named - families


# -- the generated sweep: every other family of transformers' auto mappings -------------------------------------

GENERATED = generated()
# token mixers that are not attention (issue 20): refused at conversion, by the mixer rule or the layout rule
NOT_ATTENTION = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "fnet", "recurrent_gemma", "jamba", "bamba",
                 "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "minimax", "kimi_linear", "granitemoehybrid", "lfm3",
                 "bailing_hybrid", "lara_mini", "yoso", "convbert", "olmo_hybrid", "mra")
# convolutional stages ([B, C, H, W] states), channels-first, multi-stream and n-gram layouts, per-token state args
LAYOUTS = ("resnet", "regnet", "mobilenet_v1", "mobilenet_v2", "poolformer", "cvt", "segformer", "swiftformer",
           "pvt_v2", "pp_lcnet", "squeezebert", "deepseek_v4", "hy_v4", "gemma3n_text", "prophetnet", "falcon_h1",
           "zamba2", "glm_moe_dsa", "inkling_text", "funnel", "xlnet")
# layers kept as parallel lists of parts (attentions, layer_norm1, ffns, layer_norm2): the attention list is wrapped,
# the other parts run on its kept tokens (random_ltd_cli/parts.py); checked by a per-layer reference (parts_reference)
PARTS = ("xlm", "flaubert")


@pytest.mark.parametrize("fam", GENERATED, ids=[f.name for f in GENERATED])
def test_generated_family_is_exact_refused_or_not_buildable(fam: Family) -> None:
    found = status(fam)
    assert found.status in STATUSES, f"{fam.name}: {found.status}: {found.detail}"
    assert "FAIL with layers='attention'" not in found.detail, found.detail


HYBRIDS = ("jamba", "bamba", "qwen3_next", "minimax", "granitemoehybrid", "lfm3", "recurrent_gemma", "olmo_hybrid")


@pytest.mark.parametrize("name", HYBRIDS)
def test_a_hybrid_stack_is_exact_with_layers_attention(name: str) -> None:
    found = status(next(f for f in GENERATED if f.name == name))
    assert found.status == "refused" and "with layers='attention' exact (wraps " in found.detail, found.detail


@pytest.mark.parametrize("name", NOT_ATTENTION + LAYOUTS)
def test_what_is_not_one_attention_sequence_is_refused_at_conversion(name: str) -> None:
    fam = next(f for f in GENERATED if f.name == name)
    found = status(fam)
    assert found.status == "refused", f"{name}: {found.status}: {found.detail}"
    if name in NOT_ATTENTION:
        assert "is not attention" in found.detail or "line up with the kept tokens" in found.detail, found.detail


@pytest.mark.parametrize("name", PARTS)
def test_layers_kept_as_parallel_parts_are_exact(name: str) -> None:
    found = status(next(f for f in GENERATED if f.name == name))
    assert found.status == "exact", f"{name}: {found.status}: {found.detail}"
    assert found.outcome is not None and found.outcome.stack == "transformer.attentions", found.outcome
    assert "ffns" in found.outcome.layer_class, found.outcome.layer_class
