"""Synthetic inputs for ``random-ltd check``: token ids, images or a tensor of a given shape.

What a model takes is read from the model itself: a Hugging Face model's ``main_input_name``
and config (vocabulary, channels, image size, maximum length, sliding window); a plain module's
``config`` attribute (nanoGPT's ``GPTConfig``) or its embeddings; a plain vision transformer's image
size (timm's ``patch_embed.img_size``, open_clip's ``image_size``) and first convolution. A module that takes hidden
states is fed ``torch.randn(shape)``. Token batches come twice where the model's forward takes an
``attention_mask``: without padding (no mask passed) and with the tail of the first sample padded.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["DEFAULT_SEQ_LEN", "Batch", "InputPlan", "make_batches", "parse_shape", "plan_inputs"]

DEFAULT_SEQ_LEN = 64
"""Sequence length of token batches when ``--seq-len`` is not given (capped by the model's maximum)."""
DEFAULT_BATCH = 2

_MAX_LENGTH_NAMES = ("max_position_embeddings", "n_positions", "block_size", "max_seq_len", "seq_length", "n_ctx")
_WINDOW_NAMES = ("sliding_window", "window_size", "attention_window")


@dataclass
class Batch:
    """One synthetic forward: ``model(*args, **kwargs)``."""

    name: str  # "unpadded" or "padded"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    description: str  # e.g. "input_ids [2, 64], attention_mask [2, 64] (16 padded)"


@dataclass
class InputPlan:
    """What to feed: ``kind`` is ``tokens``, ``images`` or ``shape``."""

    kind: str
    batch_size: int
    seq_len: int | None = None  # tokens
    vocab_size: int | None = None  # tokens
    image: tuple[int, int, int] | None = None  # channels, height, width
    shape: tuple[int, ...] | None = None
    input_name: str | None = None  # keyword of the main input (Hugging Face models), else positional
    mask: bool = False  # the forward takes attention_mask: also a padded batch
    decoder: bool = False  # encoder-decoder: decoder_input_ids too
    notes: list[str] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.kind, "batch_size": self.batch_size}
        if self.kind == "tokens":
            out.update(seq_len=self.seq_len, vocab_size=self.vocab_size)
        elif self.kind == "images":
            out["image"] = list(self.image or ())
        else:
            out["shape"] = list(self.shape or ())
        out["padded_batch"] = self.mask
        return out


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"2,16,32"`` -> ``(2, 16, 32)``.

    Raises:
        ConfigError: not a comma-separated list of positive integers.
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"--shape {text!r} must be positive integers separated by commas, e.g. --shape 2,16,32.")
    return dims


def _config(model: Any) -> Any:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return config, getter()
        except Exception:  # a composite config without a text part
            return config, config
    return config, config


def _int_attr(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _forward_params(model: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _smallest_embedding(model: Any) -> int | None:
    from torch import nn

    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return min(sizes) if sizes else None  # any id below the smallest table is valid for every table


def _plain_vision_input(model: Any) -> tuple[int, int, int] | None:
    """A plain vision transformer's image ``(channels, height, width)``: the size it was built for (timm:
    ``patch_embed.img_size``; open_clip: ``image_size``) and the input channels of its first ``Conv2d``."""
    from torch import nn

    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "image_size", None)
    hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        return None
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else (int(conv.in_channels), int(hw[0]), int(hw[1]))


def plan_inputs(
    model: Any, *, shape: tuple[int, ...] | None = None, vocab_size: int | None = None,
    seq_len: int | None = None, batch_size: int | None = None,
) -> InputPlan:
    """Decide what to feed ``model`` (see the module docstring).

    Raises:
        ConfigError: the input cannot be told from the model and no flag says it; a flag that
            does not fit (``--seq-len`` above the model's maximum).
    """
    config, text = _config(model)
    params = _forward_params(model)
    main = getattr(model, "main_input_name", None) if config is not None else None
    name = main if isinstance(main, str) and main in params else None
    if shape is not None:
        plan = InputPlan("shape", shape[0], shape=shape, input_name=name)
        if batch_size is not None or seq_len is not None:
            plan.notes.append("--shape gives the whole input: --batch-size and --seq-len are ignored.")
        return plan
    b = batch_size or DEFAULT_BATCH
    image_size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if vocab_size is None and main == "pixel_values" and isinstance(channels, int) and image_size:
        hw = tuple(image_size) if isinstance(image_size, list | tuple) else (image_size, image_size)
        return InputPlan("images", b, image=(channels, int(hw[0]), int(hw[-1])), input_name=name)
    image = _plain_vision_input(model) if vocab_size is None and config is None else None
    if image is not None:
        return InputPlan("images", b, image=image, input_name=name)
    vocab = vocab_size or _int_attr(text, ("vocab_size",)) or _smallest_embedding(model)
    if vocab is None or (main is not None and main != "input_ids" and vocab_size is None):
        what = f"{type(model).__name__} (its main input is {main!r})" if main else type(model).__name__
        raise ConfigError(
            f"cannot tell what input {what} takes: pass --vocab-size V for token ids, or --shape B,S,H for a "
            "tensor of that shape (e.g. a module that takes hidden states)."
        )
    return _token_plan(model, text, params, name, vocab, seq_len, b)


def _token_plan(
    model: Any, config: Any, params: dict[str, inspect.Parameter], name: str | None, vocab: int,
    seq_len: int | None, b: int,
) -> InputPlan:
    limit = _int_attr(config, _MAX_LENGTH_NAMES)
    notes: list[str] = []
    if seq_len is not None and limit is not None and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is longer than {type(model).__name__}'s maximum length {limit}; "
                          f"pass --seq-len {limit} or less.")
    s = seq_len
    if s is None:
        s = DEFAULT_SEQ_LEN if limit is None else min(DEFAULT_SEQ_LEN, limit)
        window = _int_attr(config, _WINDOW_NAMES)
        if window is not None and window < (limit or window + 1) and s <= window:
            s = min(2 * window, limit) if limit is not None else 2 * window  # a window only shows beyond it
            notes.append(f"S={s}: twice the model's attention window ({window}), so that the window takes effect.")
    return InputPlan(
        "tokens", b, seq_len=s, vocab_size=vocab, input_name=name, mask="attention_mask" in params,
        decoder="decoder_input_ids" in params and bool(getattr(config, "is_encoder_decoder", False)), notes=notes,
    )


def make_batches(plan: InputPlan, seed: int = 0) -> list[Batch]:
    """The synthetic batches of ``plan`` (deterministic for a ``seed``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if plan.kind == "shape":
        x = torch.randn(*(plan.shape or ()), generator=gen)
        return [_batch("unpadded", plan, x, {}, f"{plan.input_name or 'input'} {list(x.shape)}")]
    if plan.kind == "images":
        x = torch.randn(plan.batch_size, *(plan.image or ()), generator=gen)
        return [_batch("unpadded", plan, x, {}, f"{plan.input_name or 'images'} {list(x.shape)}")]
    s = int(plan.seq_len or DEFAULT_SEQ_LEN)
    ids = torch.randint(0, int(plan.vocab_size or 2), (plan.batch_size, s), generator=gen)
    extra: dict[str, Any] = {"decoder_input_ids": ids.clone()} if plan.decoder else {}
    label = f"{plan.input_name or 'token ids'} {list(ids.shape)}"
    batches = [_batch("unpadded", plan, ids, dict(extra), label)]
    if plan.mask and s > 1:
        mask = torch.ones_like(ids)
        pad = max(1, s // 4)
        mask[0, s - pad:] = 0  # right padding in the first sample; the others are full
        batches.append(_batch("padded", plan, ids, {**extra, "attention_mask": mask},
                              f"{label}, attention_mask with the last {pad} tokens of sample 0 padded"))
    return batches


def _batch(name: str, plan: InputPlan, x: Any, kwargs: dict[str, Any], description: str) -> Batch:
    if plan.input_name is not None:
        return Batch(name, (), {plan.input_name: x, **kwargs}, description)
    return Batch(name, (x,), kwargs, description)
