"""One status per family of the generated sweep: exact, refused at conversion, or not buildable.

A generated family (see ``generic.py``) is built from its generic tiny config in eager attention,
run once unconverted on the zoo's padded batch (a family whose model cannot be built or run that
way is *not buildable*, with the reason), converted with ``reserved_length=6``, and checked
against the independent reference (``reference.check_exact``). The statuses:

* ``exact``: every wrapped layer equals the reference;
* ``refused``: ``convert_to_random_ltd`` raised the library's error, model untouched (a model that
  builds but does not run on the batch is still converted: a refusal needs no forward);
* ``refused at the first step``: the converted model's first forward raised the library's error
  (a refusal the library could not make at conversion);
* ``not buildable``: no model from a generic config (the reason says why);
* ``FAIL``: a wrong value or a raw error: the sweep's test fails on it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from random_ltd_cli import ConversionError, InputError, RandomLTDError, convert_to_random_ltd

from .generic import make_generic_config
from .reference import Outcome, check_exact, convert, snapshot
from .zoo import Family, R, _zero_dropout, batch_for

MAX_PARAMETERS = 5_000_000  # a generic tiny config that still builds more is "not buildable" (too large)
STATUSES = ("exact", "refused", "refused at the first step", "not buildable")


@dataclass
class Status:
    """What the sweep found for one generated family."""

    status: str  # one of STATUSES, or "FAIL"
    detail: str = ""
    outcome: Outcome | None = None


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _ForwardFailed(Exception):
    """The unconverted model was built but its forward on the padded batch failed."""

    def __init__(self, model: torch.nn.Module, cause: Exception) -> None:
        super().__init__(_line(cause))
        self.model = model


def _build(fam: Family) -> torch.nn.Module:
    import transformers as T

    cfg = make_generic_config(fam)
    _zero_dropout(cfg)
    if fam.kind == "decoder" and getattr(cfg, "is_decoder", None) is False:
        cfg.is_decoder = True  # a causal-LM head on an encoder class (BertGeneration, RemBERT...) runs causal
    cfg._attn_implementation = "eager"
    cls = getattr(T, fam.model)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMETERS:
        raise RuntimeError(f"{n / 1e6:.1f}M parameters from the generic tiny config (limit "
                           f"{MAX_PARAMETERS / 1e6:.0f}M): it needs a hand-tuned config")
    torch.manual_seed(0)
    model = cls(cfg).train()
    try:
        with torch.no_grad():
            model(**batch_for(fam))
    except Exception as exc:
        raise _ForwardFailed(model, exc) from exc
    return model


_CACHE: dict[str, Status] = {}


def _attention_only(fam: Family) -> str:
    """A hybrid stack refused by default: convert a fresh copy with ``layers="attention"`` and check it."""
    model = _build(fam)
    convert_to_random_ltd(model, reserved_length=R, layers="attention")
    try:
        outcome = check_exact(fam, model)
    except AssertionError as exc:
        return f"FAIL with layers='attention': {_line(exc)}"
    wrapped = ", ".join(outcome.wrapped)
    return f"with layers='attention' exact (wraps {wrapped}: {outcome.layer_class})"  # no numbers: CPU-dependent


def status(fam: Family) -> Status:
    """Build, convert and check one generated family (cached: the test and the page share one run)."""
    if fam.name not in _CACHE:
        _CACHE[fam.name] = _status(fam)
    return _CACHE[fam.name]


def _status(fam: Family) -> Status:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = True
        try:
            model = _build(fam)
        except _ForwardFailed as exc:  # built, but it does not run: conversion may still refuse it by structure
            model, runs, why = exc.model, False, f"the unconverted model fails: {exc}"
        except Exception as exc:  # anything: the family cannot be built from a generic config
            return Status("not buildable", _line(exc))
        before = snapshot(model)
        try:
            convert(model, fam)
            if not runs:
                return Status("not buildable", why)
        except (ConversionError, InputError) as exc:
            after = snapshot(model)
            untouched = before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
            if not untouched:
                return Status("FAIL", f"model changed: {exc}")
            if "layers='attention'" in str(exc) and runs:
                return Status("refused", f"{_attention_only(fam)}; the default: {exc}")
            return Status("refused", str(exc))
        except Exception as exc:
            return Status("FAIL", f"conversion raised {_line(exc)}")
        try:
            outcome = check_exact(fam, model)
        except AssertionError as exc:
            if " dropped no tokens in " in str(exc) and " 0 call(s)" not in str(exc):
                return Status("not buildable", f"its wrapped layers see at most r={R} tokens on the generic batch, "
                                               "so nothing is dropped and nothing can be checked")
            return Status("FAIL", _line(exc))
        except RandomLTDError as exc:
            return Status("refused at the first step", str(exc))
        except Exception as exc:
            return Status("FAIL", f"the converted model raised {_line(exc)}")
    return Status("exact", f"max abs diff {outcome.max_diff:.1e}", outcome)


__all__ = ["STATUSES", "Status", "status"]
