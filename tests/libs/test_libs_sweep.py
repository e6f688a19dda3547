"""The library sweep: every case of tests/libs/zoo.py is exact against the independent reference, or refused.

Cases whose library is not installed skip with the reason; under CI (env ``CI`` set) the libraries the
sweep claims (``zoo.CLAIMED``, installed by the README's test command) must be importable, and so must
``zoo.CLAIMED_TV`` (timm, open_clip, torchtitan) in the second environment's run (``pytest -m tv``, marked
``tv``).
"""

from __future__ import annotations

import pytest
import torch

from .reference import check_eval_identical, check_training_step, result
from .zoo import BY_NAME, CASES, CLAIMED, CLAIMED_TV, Case, available, group, must_run


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _need(name: str) -> None:
    case = BY_NAME[name]
    reason = available(case)
    if reason is not None:
        if must_run(case):
            pytest.fail(f"{reason}: the README's test command installs it; CI must not skip the claimed coverage")
        pytest.skip(reason)


def params(cases: list[Case]) -> list[object]:
    """Case names for parametrize; the second environment's cases marked ``tv``."""
    return [pytest.param(c.name, id=c.name, marks=[pytest.mark.tv] if group(c) == "tv" else []) for c in cases]


@pytest.mark.parametrize("name", params(CASES))
def test_case_is_exact_or_refused(name: str) -> None:
    _need(name)
    case = BY_NAME[name]
    res = result(name)
    assert res.status == case.expect, f"{name}: expected {case.expect}, found {res.status}: {res.detail}"
    if case.expect == "refused":
        assert case.refusal in res.detail, res.detail


@pytest.mark.parametrize("name", params([c for c in CASES if c.expect == "exact"]))
def test_converted_model_trains_one_step(name: str) -> None:
    _need(name)
    if BY_NAME[name].backward:
        pytest.skip(BY_NAME[name].backward)
    assert check_training_step(BY_NAME[name]) > 0


@pytest.mark.parametrize("name", params([c for c in CASES if c.expect == "exact"]))
def test_converted_model_in_eval_mode_equals_the_unconverted_one(name: str) -> None:
    _need(name)
    check_eval_identical(BY_NAME[name])


@pytest.mark.tv
def test_every_claimed_library_has_a_case() -> None:
    assert {c.library for c in CASES} == set(CLAIMED) | set(CLAIMED_TV)
    assert {c.library for c in CASES if group(c) == "tv"} == set(CLAIMED_TV)
