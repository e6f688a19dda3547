"""Conversion knows the token mixer: non-attention mixers and layouts are refused at conversion, model untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from random_ltd_cli import ConversionError, convert_to_random_ltd, random_ltd_layers
from random_ltd_cli.mixers import layout_refusal, mixer_refusal


class Attention(nn.Module):
    """A plain attention + MLP block over [B, S, H]."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.qkv, self.out, self.mlp = nn.Linear(h, 3 * h), nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(hidden_states).chunk(3, -1)
        x = hidden_states + self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)
        return x + self.mlp(x)


class ShortConv(nn.Module):
    """A depthwise convolution over neighbouring tokens (LFM2-style)."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(h, h, 3, groups=h, padding=2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_states + self.conv(hidden_states.transpose(1, 2))[..., : hidden_states.shape[1]].transpose(1, 2)


class Scan(nn.Module):
    """A diagonal state-space scan (Mamba's A_log parameter)."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(h))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cumsum(hidden_states * torch.exp(-self.A_log.exp()), 1)


class Fourier(nn.Module):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.fft.fft(hidden_states, dim=1).real


class ConvStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class Hybrid(nn.Module):
    """Layers 0, 2, 4: attention; 1, 3: convolution. One ModuleList, one class name suffix per kind."""

    def __init__(self, kinds: list[type[nn.Module]]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(k() for k in kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class AttentionLayer(Attention):
    pass


class ConvLayer(ShortConv):
    pass


def _state(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("layer", "words"), [
    (ShortConv, "convolution over neighbouring tokens (nn.Conv1d, kernel 3)"),   # LFM2, ConvBERT, Mamba's conv
    (Scan, "state-space or recurrent scan over the tokens (parameters A_log)"),  # Mamba, RWKV...
    (Fourier, "Fourier transform over the token axis"),                          # FNet
    (lambda: nn.LSTM(8, 8, batch_first=True), "a recurrence over the tokens"),  # nn.RNNBase
    (lambda: ConvStage(), "[B, C, H, W] feature maps"),  # ResNet, RegNet, MobileNet stages
])
def test_a_stack_of_non_attention_mixers_is_refused_at_conversion_untouched(layer: object, words: str) -> None:
    model = nn.Module()
    model.layers = nn.ModuleList(layer() for _ in range(4))  # type: ignore[operator]
    before = _state(model)
    with pytest.raises(ConversionError, match="cannot drop tokens in .* exactly: its token mixing is not attention") \
            as e:
        convert_to_random_ltd(model, reserved_length=2)
    assert words in str(e.value)
    after = _state(model)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_attention_is_not_refused() -> None:
    assert mixer_refusal(Attention()) is None and layout_refusal(Attention()) is None


def test_layout_refusal_reads_per_token_state_arguments_from_the_signature() -> None:
    class FalconH1Like(Attention):
        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,  # type: ignore[override]
                    mamba_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return hidden_states

    reason = layout_refusal(FalconH1Like())
    assert reason is not None and "'mamba_attention_mask'" in reason


def test_a_hybrid_stack_is_refused_by_default_and_offers_layers_attention() -> None:
    model = Hybrid([AttentionLayer, ConvLayer, AttentionLayer, ConvLayer, AttentionLayer])
    with pytest.raises(ConversionError, match=r"layers='attention' wraps only its middle attention layers \(indices "
                                              r"\[2\], AttentionLayer\)"):
        convert_to_random_ltd(model, reserved_length=2)
    assert not random_ltd_layers(model)


def test_layers_attention_wraps_only_the_middle_attention_layers_and_warns_what_it_left() -> None:
    torch.manual_seed(0)
    model = Hybrid([AttentionLayer, ConvLayer, AttentionLayer, ConvLayer, AttentionLayer])
    plain = Hybrid([AttentionLayer, ConvLayer, AttentionLayer, ConvLayer, AttentionLayer])
    plain.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"wrapped: AttentionLayer x1; not wrapped: AttentionLayer x2, ConvLayer x2"):
        convert_to_random_ltd(model, layers="attention", reserved_length=3)
    assert [n for n, _ in random_ltd_layers(model)] == ["layers.2"]
    x = torch.randn(2, 6, 8)
    model.eval()
    assert torch.equal(model(x), plain(x))  # eval: nothing dropped
    model.train()
    assert torch.isfinite(model(x)).all()


def test_layers_attention_in_a_stack_without_attention_is_refused() -> None:
    model = Hybrid([AttentionLayer, ConvLayer, ConvLayer, ConvLayer, AttentionLayer])
    with pytest.raises(ConversionError, match="layers='attention' selects nothing"):
        convert_to_random_ltd(model, layers="attention", reserved_length=2)
    assert not random_ltd_layers(model)


def test_a_homogeneous_stack_does_not_warn() -> None:
    model = Hybrid([AttentionLayer] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_random_ltd(model, reserved_length=2)
    assert len(random_ltd_layers(model)) == 2


def test_parallel_lists_of_layer_parts_are_refused() -> None:
    class XlmLike(nn.Module):  # XLM / FlauBERT keep attention, norms and FFN in parallel lists
        def __init__(self) -> None:
            super().__init__()
            self.attentions = nn.ModuleList(nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(4))
            self.layer_norm1 = nn.ModuleList(nn.LayerNorm(8) for _ in range(4))
            self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(4))

    model = XlmLike()
    with pytest.raises(ConversionError, match="no module of this model is a whole transformer layer: it keeps the "
                                              "parts of its layers in parallel lists"):
        convert_to_random_ltd(model, reserved_length=2)
    assert not random_ltd_layers(model)
