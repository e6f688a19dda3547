"""What mixes the tokens in a layer: attention over the sequence, or something random-LTD cannot drop from.

Random-LTD runs a layer on a subset of the tokens; for attention that is the layer with its keys
restricted to the kept tokens. A recurrence, a state-space scan, a convolution over neighbouring
tokens, a Fourier transform or a hashing scheme over the tokens it sees computes something else
on a subset (each kept token would read the next *kept* token as its neighbour), so such layers
are refused at conversion. The rule is structural and costs one walk over the layer's modules
(no forward call): a layer is refused when any module inside it is

* a convolution over tokens: ``nn.Conv1d`` with a kernel wider than 1;
* a convolution or pooling over a 2-D grid (``nn.Conv2d``/``nn.Conv3d`` or ``nn.*Pool2d``): the
  layer works on ``[B, C, H, W]`` feature maps, not on a token sequence;
* channels-first: a pointwise ``nn.Conv1d`` reads ``[B, H, S]`` (SqueezeBERT), not ``[B, S, H]``;
* a recurrence: ``nn.RNNBase`` (LSTM/GRU), input and forget gates (xLSTM), or a module holding the
  parameters of a state-space or recurrent scan (``A_log``, ``dt_bias``, ``time_decay``, ``time_first``,
  ``recurrent_param``...);
* linear attention with a decay over the token order (``slope_rate``, MiniMax lightning attention);
* a Fourier transform (a module class whose source uses ``torch.fft``);
* hashing attention (LSH buckets: ``num_hash``/``hash_code_len``, ``num_hashes``) or block-approximated
  attention (MRA's ``num_block``/``approx_mode``).

Layers the rule cannot see are the run-time verifier's to catch. :func:`mixer_refusal` gives the
reason (naming the module), or ``None``.

:func:`layout_refusal` refuses, from structure and signature, layers whose hidden states are not one
``[B, S, H]`` stream random-LTD can gather: several residual streams (hyper-connections
``[B, S, k, H]``, Gemma-3n's AltUp), ProphetNet's n-gram streams, and forward arguments known to
carry per-token state that cannot be gathered (``mamba_attention_mask``, ``original_hidden_states``,
``prev_topk_indices``, ``block_states``, ``conv_mask``, separate ``key``/``value`` inputs).
"""

from __future__ import annotations

import collections
import functools
import inspect
import re
import warnings
from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["classify", "layout_refusal", "mixer_refusal", "warn_mixed_stack"]

SCAN_PARAMETERS = ("A_log", "dt_bias", "time_decay", "time_first", "time_faaaa", "recurrent_param",
                   "a_log", "lambda_p", "decay_log")
HASH_ATTRIBUTES = (("num_hash", "hash_code_len"), ("num_hashes",))
_FFT = re.compile(r"\bfft\.|\bfftn?\(|\brfftn?\(")


def mixer_refusal(layer: nn.Module) -> str | None:
    """Why ``layer`` mixes its tokens with something other than attention, or ``None``.

    The reason names the module found (its class and its path inside the layer).
    """
    for name, module in layer.named_modules():
        reason = _module_reason(module)
        if reason is not None:
            where = f"{type(module).__name__} at {name!r}" if name else type(module).__name__
            return f"its token mixing is not attention: {reason} ({where})"
    return None


def _module_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv1d):
        if module.kernel_size[0] > 1:
            return (f"a convolution over neighbouring tokens (nn.Conv1d, kernel {module.kernel_size[0]}): on the "
                    "kept tokens each would read the next kept token as its neighbour")
        return ("it works channels-first (a pointwise nn.Conv1d reads [B, H, S]), while random-LTD gathers "
                "[B, S, H] hidden states")
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        return ("a convolution or pooling over a 2-D grid: the layer works on [B, C, H, W] feature maps, which "
                "have no token axis to drop from")
    if isinstance(module, nn.RNNBase):
        return "a recurrence over the tokens (nn.LSTM/GRU/RNN): on the kept tokens it would skip the dropped steps"
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    scan = sorted(own.intersection(SCAN_PARAMETERS))
    if scan:
        return (f"a state-space or recurrent scan over the tokens (parameters {', '.join(scan)}): on the kept "
                "tokens the state would skip the dropped steps")
    children = {n for n, _ in module.named_children()}
    if {"igate_preact", "fgate_preact"} <= children or {"input_gate", "forget_gate"} <= children:
        return "an LSTM-style recurrence over the tokens (input and forget gates): it would skip the dropped steps"
    if "slope_rate" in own:
        return "linear attention with a decay over the token order (slope_rate): a recurrence in disguise"
    if any(all(hasattr(module, a) for a in attrs) for attrs in HASH_ATTRIBUTES):
        return "hashing (LSH) attention that buckets the tokens it sees"
    if hasattr(module, "num_block") and hasattr(module, "approx_mode"):
        return ("multi-resolution block-approximated attention (MRA): it averages fixed blocks of the tokens it "
                "sees, which a subset of the tokens does not have")
    if _calls_fft(type(module)):  # type: ignore[arg-type]
        return "a Fourier transform over the token axis: every output mixes every position by its index"
    return None


@functools.cache
def _calls_fft(cls: type) -> bool:
    """The class's own source (outside torch) uses a Fourier transform."""
    if cls.__module__.startswith("torch."):
        return False
    try:
        return bool(_FFT.search(inspect.getsource(cls)))
    except (OSError, TypeError):
        return False


#: forward parameters that carry per-token state of a kind random-LTD cannot gather exactly
SEQUENCE_STATE_ARGS = {
    "mamba_attention_mask": "the padding mask of a state-space mixer inside the layer",
    "original_hidden_states": "the model's first hidden states, mixed back in by a shared block",
    "prev_topk_indices": "token indices chosen by the previous layer's sparse attention",
    "block_states": "states of a recurrent block carried between layers",
    "conv_mask": "the mask of a convolution over tokens",
    "encoder_padding_mask": "a fairseq-style padding mask: such layers take [S, B, H] sequence-first states",
    "prev_attn_output": "the other half of a reversible residual pair (Reformer)",
    "output_g": "the query stream of two-stream attention (XLNet), laid out sequence-first",
    "key": "a separate key sequence (the layer pools or attends over another length)",
    "value": "a separate value sequence (the layer pools or attends over another length)",
}


def layout_refusal(layer: nn.Module) -> str | None:
    """Why ``layer``'s hidden states or arguments are not one gatherable ``[B, S, H]`` stream, or ``None``."""
    for name, module in layer.named_modules():
        where = f"{type(module).__name__} at {name!r}" if name else type(module).__name__
        if isinstance(getattr(module, "hc_mult", None), int) or "HyperConnection" in type(module).__name__:
            return (f"it keeps several residual streams per token ([B, S, k, H] hyper-connections, {where}), not "
                    "one [B, S, H] sequence")
        if hasattr(module, "altup") or "AltUp" in type(module).__name__:
            return f"it keeps several alternating residual streams per token (AltUp, {where}), not one [B, S, H]"
        if isinstance(getattr(module, "ngram", None), int) and "gram" in type(module).__name__.lower():
            return (f"its n-gram self-attention reads the main stream and n-gram prediction streams concatenated "
                    f"on the token axis ({where}), so the token axis is not one sequence")
    try:
        params = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        return None
    for arg, what in SEQUENCE_STATE_ARGS.items():
        if arg in params and (arg not in ("key", "value") or "query" in params):
            return (f"its forward takes {arg!r} ({what}), which random-LTD cannot line up with the kept tokens "
                    "exactly")
    return None


def classify(layers: Sequence[nn.Module], refusal: Callable[[nn.Module], str | None]) -> tuple[dict[int, str],
                                                                                            dict[int, str]]:
    """``(refused, mixers)``: the reason for every refused layer (by index), and among them the layers refused
    only because their token mixing is not attention (``layers="attention"`` skips those in a hybrid stack).
    ``refusal`` is the family rule of :func:`random_ltd_cli.adapters.refusal`."""
    refused: dict[int, str] = {}
    mixers: dict[int, str] = {}
    for i, layer in enumerate(layers):
        if (reason := refusal(layer) or layout_refusal(layer)) is not None:
            refused[i] = reason
        elif (reason := mixer_refusal(layer)) is not None:
            refused[i] = mixers[i] = reason
    return refused, mixers


def warn_mixed_stack(candidates: list[tuple[str, nn.Module]], chosen: list[int]) -> None:
    """A stack of several layer classes: say which classes were wrapped and which were not."""
    classes = collections.Counter(type(m).__name__ for _, m in candidates)
    if len(classes) < 2:
        return
    wrapped = collections.Counter(type(candidates[i][1]).__name__ for i in chosen)
    left = {c: n - wrapped.get(c, 0) for c, n in classes.items() if n - wrapped.get(c, 0)}
    warnings.warn(
        "the layer stack holds several layer classes; wrapped: "
        + ", ".join(f"{c} x{n}" for c, n in sorted(wrapped.items()))
        + "; not wrapped: " + (", ".join(f"{c} x{n}" for c, n in sorted(left.items())) or "none"),
        stacklevel=4,
    )
