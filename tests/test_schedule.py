"""The reserved-length schedule (DeepSpeed value for value), layer-token accounting and LayerToken LR."""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from random_ltd_cli import ConfigError, LayerTokenLRScheduler, RandomLTDScheduler

# --------------------------------------------------------------------------- a reference


class DeepSpeedReference:
    """DeepSpeed's fixed_linear scheduler re-written from its description (design.md §4), state in a dict."""

    def __init__(self, lo: int, hi: int, req: int, k: int, layers: int, n_ltd: int, batch: int) -> None:
        self.req, self.k, self.layers, self.n_ltd, self.batch = req, k, layers, n_ltd, batch
        self.state = {
            "consumed_layer_tokens": 0,
            "current_steps": -1,
            "current_value": lo,
            "min_value": lo,
            "max_value": hi,
        }

    def value(self, g: int) -> int:
        lo, hi = self.state["min_value"], self.state["max_value"]
        f = math.floor((float(g) / self.req) * (hi - lo) + lo)
        return min(f - f % self.k, hi)

    def update_seq(self, g: int) -> None:
        s = self.state
        if s["current_value"] < s["max_value"]:
            s["current_value"] = self.value(g)
        if g != s["current_steps"]:
            per_sample = s["current_value"] * self.n_ltd + s["max_value"] * (self.layers - self.n_ltd)
            s["consumed_layer_tokens"] += self.batch * per_sample
            s["current_steps"] = g


def make(lo: int, hi: int, req: int, k: int, layers: int = 24, n_ltd: int = 22, batch: int = 512) -> RandomLTDScheduler:
    return RandomLTDScheduler(
        lo, hi, req, k, total_layer_num=layers, random_ltd_layer_num=n_ltd, global_batch_size=batch
    )


# --------------------------------------------------------------------------- worked values (design.md §4)


@pytest.mark.parametrize(
    ("cfg", "step", "r"),
    [
        ((128, 2048, 200000, 16), 0, 128),  # starts at min_value
        ((128, 2048, 200000, 16), 1666, 128),  # F = 143: rounded down to 128
        ((128, 2048, 200000, 16), 1667, 144),  # F = 144.0064 -> first increase
        ((128, 2048, 200000, 16), 100000, 1088),  # half way: 128 + 1920 / 2
        ((128, 2048, 200000, 16), 199999, 2032),  # one step before the end: F = 2047 -> 2032
        ((128, 2048, 200000, 16), 200000, 2048),  # reaches max_value at require_steps
        ((32, 197, 3910, 8), 0, 32),  # max_value not a multiple of seq_per_step
        ((32, 197, 3910, 8), 1955, 112),  # F = 114 -> 112
        ((32, 197, 3910, 8), 3909, 192),  # F = 196 -> 192
        ((32, 197, 3910, 8), 3910, 192),  # at require_steps F = 197 -> 192, still below max
        ((32, 197, 3910, 8), 4000, 197),  # F = 200 -> 200, capped at max_value
        ((100, 512, 1000, 16), 0, 96),  # below min_value: DeepSpeed rounds 100 down to 96
        ((100, 512, 1000, 16), 1000, 512),  # max_value
    ],
)
def test_worked_values(cfg: tuple[int, int, int, int], step: int, r: int) -> None:
    sched = make(*cfg)
    assert sched.value_at(step) == r
    assert sched.state_dict()["current_steps"] == -1  # value_at does not step
    assert sched.update_seq(step) == r == sched.get_current_seq() == sched.reserved_length


def test_worked_accounting_with_step() -> None:
    """design.md: 4, 8, 4, 2, batch 2, 4 layers of which 2 drop, steps 0..5 -> r = 4,4,6,6,8,8, 336 layer-tokens.

    The call sequence: six ``step()`` calls on a fresh scheduler, i.e. ``update_seq(0) .. update_seq(5)``;
    each sets ``r`` for its step first and then adds ``2 * (r * 2 + 8 * 2)``: 48+48+56+56+64+64 = 336.
    """
    sched = make(4, 8, 4, 2, layers=4, n_ltd=2, batch=2)
    rs, consumed = [], []
    for _ in range(6):
        rs.append(sched.step())
        consumed.append(sched.consumed_layer_tokens)
    assert rs == [4, 4, 6, 6, 8, 8]
    assert consumed == [48, 96, 152, 208, 272, 336]
    assert sched.state_dict() == {
        "consumed_layer_tokens": 336,
        "current_steps": 5,
        "current_value": 8,
        "min_value": 4,
        "max_value": 8,
    }
    assert sched.layer_tokens_at(6) == 336
    assert sched.baseline_layer_tokens(6) == 6 * 2 * 4 * 8
    assert sched.estimated_saving(6) == pytest.approx(1 - 336 / 384)


def test_gradient_accumulation_counts_each_step_once() -> None:
    """DeepSpeed calls update_seq(global_steps) on every micro-batch forward; a step is counted once."""
    sched = make(4, 8, 4, 2, layers=4, n_ltd=2, batch=2)
    for g in range(6):
        for _ in range(4):  # four micro-batches
            sched.update_seq(g)
    assert sched.consumed_layer_tokens == 336 and sched.get_current_seq() == 8


def test_min_equal_max_never_changes() -> None:
    sched = make(100, 100, 10, 16)  # the formula alone would give 96; DeepSpeed never updates at max
    assert [sched.step() for _ in range(3)] == [100, 100, 100]
    assert sched.estimated_saving(3) == 0.0


# --------------------------------------------------------------------------- against the reference

configs = st.tuples(
    st.integers(1, 300), st.integers(0, 300), st.integers(1, 3000), st.integers(1, 64), st.integers(1, 6)
).flatmap(
    lambda t: st.tuples(
        st.just(t[0]), st.just(t[0] + t[1]), st.just(t[2]), st.just(t[3]), st.just(t[4]), st.integers(0, t[4])
    )
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, calls=st.lists(st.integers(0, 4000), min_size=1, max_size=40), batch=st.integers(1, 8))
def test_matches_reference_for_any_calls(cfg: tuple[int, ...], calls: list[int], batch: int) -> None:
    """Arbitrary update_seq() sequences (repeats, jumps, going back) give DeepSpeed's state after each call."""
    lo, hi, req, k, layers, n_ltd = cfg
    ours, ref = make(lo, hi, req, k, layers, n_ltd, batch), DeepSpeedReference(lo, hi, req, k, layers, n_ltd, batch)
    for g in sorted(calls)[: len(calls) // 2] + calls:
        ours.update_seq(g)
        ref.update_seq(g)
        assert ours.state_dict() == ref.state
        assert ours.value_at(g) == ref.value(g)


@settings(max_examples=50, deadline=None)
@given(cfg=configs, batch=st.integers(1, 8), extra=st.integers(0, 200))
def test_layer_tokens_at_equals_stepping(cfg: tuple[int, ...], batch: int, extra: int) -> None:
    lo, hi, req, k, layers, n_ltd = cfg
    steps = min(req, 1500) + extra
    ours, ref = make(lo, hi, req, k, layers, n_ltd, batch), DeepSpeedReference(lo, hi, req, k, layers, n_ltd, batch)
    for g in range(steps):
        ref.update_seq(g)
    assert ours.layer_tokens_at(steps) == ref.state["consumed_layer_tokens"]
    assert ours.state_dict()["current_steps"] == -1  # not mutated


@pytest.mark.parametrize("cfg", [(128, 2048, 200000, 16), (32, 197, 3910, 8), (100, 512, 1000, 16)])
def test_sweep_worked_configs(cfg: tuple[int, int, int, int]) -> None:
    """Every step up to past the end (every 7th for the long schedule) and the whole-run layer-tokens."""
    ours, ref = make(*cfg), DeepSpeedReference(*cfg, 24, 22, 512)
    stride = 7 if cfg[2] > 10000 else 1
    for g in range(0, cfg[2] + 200, stride):
        assert ours.value_at(g) == ref.value(g)
    if cfg[2] < 10000:
        for g in range(cfg[2] + 200):
            ref.update_seq(g)
        assert ours.layer_tokens_at(cfg[2] + 200) == ref.state["consumed_layer_tokens"]


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("cfg", [(4, 8, 4, 2), (100, 512, 1000, 16), (32, 197, 3910, 8)])
@pytest.mark.parametrize("stop", [0, 1, 3, 999, 1000])
def test_resume_equals_uninterrupted(cfg: tuple[int, int, int, int], stop: int) -> None:
    full, first = make(*cfg), make(*cfg)
    for _ in range(stop):
        first.step()
    saved = json.loads(json.dumps(first.state_dict()))  # plain ints survive JSON
    resumed = make(*cfg)
    resumed.load_state_dict(saved)
    expected = [(full.step(), full.consumed_layer_tokens) for _ in range(stop + 1200)][stop:]
    assert [(resumed.step(), resumed.consumed_layer_tokens) for _ in range(1200)] == expected


def test_loads_deepspeed_state_with_extra_keys() -> None:
    sd = {"consumed_layer_tokens": 96, "current_steps": 1, "current_value": 4, "min_value": 4, "max_value": 8}
    sched = make(4, 8, 4, 2, layers=4, n_ltd=2, batch=2)
    sched.load_state_dict({**sd, "sample_idx": None, "schedule_type": "fixed_linear"})
    assert sched.state_dict() == sd
    assert [sched.step() for _ in range(4)] == [6, 6, 8, 8] and sched.consumed_layer_tokens == 336


GOOD_SD = {"consumed_layer_tokens": 0, "current_steps": 1, "current_value": 4, "min_value": 4, "max_value": 8}


@pytest.mark.parametrize(
    ("sd", "match"),
    [
        ([1, 2], r"state_dict must be a mapping from RandomLTDScheduler\.state_dict\(\), got list"),
        ({"current_steps": 1}, r"state_dict is missing 'consumed_layer_tokens', 'current_value', 'min_value'"),
        ({**GOOD_SD, "current_steps": -2}, r"state_dict\['current_steps'\] must be an integer >= -1, got -2"),
        ({**GOOD_SD, "consumed_layer_tokens": 1.5}, r"\['consumed_layer_tokens'\] must be an integer >= 0, got 1\.5"),
        ({**GOOD_SD, "current_value": 0}, r"state_dict\['current_value'\] must be an integer >= 1, got 0"),
        (
            {**GOOD_SD, "min_value": 9},
            r"state_dict\['min_value'\] \(9\) is greater than state_dict\['max_value'\] \(8\)",
        ),
        ({**GOOD_SD, "max_value": "8"}, r"state_dict\['max_value'\] must be an integer, got '8'"),
        ({**GOOD_SD, "current_value": 9}, r"\['current_value'\] \(9\) is greater than state_dict\['max_value'\]"),
    ],
)
def test_bad_state_dict_changes_nothing(sd: Any, match: str) -> None:
    sched = make(4, 8, 4, 2, layers=4, n_ltd=2, batch=2)
    sched.step()
    before = sched.state_dict()
    with pytest.raises(ConfigError, match=match):
        sched.load_state_dict(sd)
    assert sched.state_dict() == before and sched.min_value == 4


# --------------------------------------------------------------------------- bad settings

GOOD = dict(min_value=4, max_value=8, require_steps=4, seq_per_step=2, total_layer_num=4, random_ltd_layer_num=2)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"min_value": 0}, r"min_value must be >= 1, got 0: set it to the number of tokens"),
        ({"min_value": -5}, r"min_value must be >= 1, got -5"),
        ({"min_value": 9}, r"min_value \(9\) is greater than max_value \(8\): .*lower min_value"),
        ({"max_value": 2.5}, r"max_value must be an integer, got 2\.5 \(float\)"),
        ({"require_steps": 0}, r"require_steps must be >= 1, got 0: set it to the number of optimizer steps"),
        ({"seq_per_step": 0}, r"seq_per_step must be >= 1, got 0: .*use 8 or 16"),
        ({"seq_per_step": -16}, r"seq_per_step must be >= 1, got -16"),
        ({"total_layer_num": 0}, r"total_layer_num must be >= 1, got 0"),
        ({"random_ltd_layer_num": 5}, r"random_ltd_layer_num \(5\) is greater than total_layer_num \(4\)"),
        ({"random_ltd_layer_num": -1}, r"random_ltd_layer_num must be >= 0, got -1"),
        ({"global_batch_size": 0}, r"global_batch_size must be >= 1, got 0"),
        ({"global_batch_size": None}, r"global_batch_size must be an integer, got None"),
        ({"schedule_type": "fixed_root"}, r"schedule_type 'fixed_root' is not supported; known schedule types: "),
    ],
)
def test_bad_settings(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RandomLTDScheduler(**{**GOOD, "global_batch_size": 2, **over})


@pytest.mark.parametrize("bad", [-1, 1.0, "3", True])
def test_bad_step_argument(bad: Any) -> None:
    sched = make(4, 8, 4, 2)
    for call in (sched.update_seq, sched.value_at):
        with pytest.raises(ConfigError, match=r"global_step must be an integer >= 0"):
            call(bad)
    with pytest.raises(ConfigError, match=r"steps must be an integer >= 0"):
        sched.layer_tokens_at(bad)
    assert sched.state_dict()["current_steps"] == -1


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        make(0, 8, 4, 2)


def test_repr_and_deepspeed_names() -> None:
    sched = make(4, 8, 4, 2, layers=4, n_ltd=2, batch=2)
    assert sched.get_random_ltd_layer_num() == 2
    assert sched.get_total_layer_tokens(6) == 336 and sched.current_steps == -1
    assert "min_value=4" in repr(sched) and "consumed_layer_tokens=0" in repr(sched)


# --------------------------------------------------------------------------- from_deepspeed


def _ds_config(**block: Any) -> dict[str, Any]:
    rl = {
        "enabled": True,
        "total_layer_num": 4,
        "random_ltd_layer_num": 2,
        "random_ltd_layer_id": [1, 2],
        "random_ltd_schedule": {
            "min_value": 4,
            "max_value": 8,
            "schedule_type": "fixed_linear",
            "schedule_config": {"require_steps": 4, "seq_per_step": 2},
        },
    }
    rl.update(block)
    return {"train_batch_size": 2, "data_efficiency": {"data_routing": {"random_ltd": rl}}}


def _run(sched: RandomLTDScheduler) -> tuple[list[int], int]:
    return [sched.step() for _ in range(6)], sched.consumed_layer_tokens


def test_from_deepspeed_dict_block_and_file(tmp_path: Path) -> None:
    cfg = _ds_config()
    before = copy.deepcopy(cfg)
    assert _run(RandomLTDScheduler.from_deepspeed(cfg)) == ([4, 4, 6, 6, 8, 8], 336)
    assert cfg == before
    block = cfg["data_efficiency"]["data_routing"]["random_ltd"]
    assert _run(RandomLTDScheduler.from_deepspeed(block, global_batch_size=2)) == ([4, 4, 6, 6, 8, 8], 336)
    sub = cfg["data_efficiency"]
    assert RandomLTDScheduler.from_deepspeed(sub, global_batch_size=4).global_batch_size == 4
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    assert _run(RandomLTDScheduler.from_deepspeed(path)) == ([4, 4, 6, 6, 8, 8], 336)
    assert RandomLTDScheduler.from_deepspeed(str(path), global_batch_size=8).global_batch_size == 8


def test_from_deepspeed_errors(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"global batch size is unknown .* counted per sample"):
        bare = RandomLTDScheduler.from_deepspeed(_ds_config()["data_efficiency"]["data_routing"]["random_ltd"])
    assert bare.global_batch_size == 1 and bare.step() == 4  # the schedule itself needs no batch size
    with pytest.raises(ConfigError, match=r"random_ltd\.enabled is not true.*require_enabled=False"):
        RandomLTDScheduler.from_deepspeed(_ds_config(enabled=False), require_enabled=True)
    assert RandomLTDScheduler.from_deepspeed(_ds_config(enabled=False)).max_value == 8
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json': is not valid JSON"):
        RandomLTDScheduler.from_deepspeed(bad)


# --------------------------------------------------------------------------- LayerToken LR


class Tokens:
    """A stand-in source of consumed layer-tokens."""

    def __init__(self) -> None:
        self.consumed_layer_tokens = 0


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


def _lr(source: Any, **kw: Any) -> LayerTokenLRScheduler:
    return LayerTokenLRScheduler(_optimizer(1.0), source, **kw)


@pytest.mark.parametrize(
    ("kw", "points"),
    [
        # linear warm-up over 100, then cosine to 0.1 at 1100
        ({"decay": "cosine", "min_lr_ratio": 0.1}, {0: 0.0, 50: 0.5, 100: 1.0, 600: 0.55, 1100: 0.1, 9999: 0.1}),
        # linear decay: a quarter of the way down at 350
        ({"decay": "linear", "min_lr_ratio": 0.1}, {25: 0.25, 100: 1.0, 350: 0.1 + 0.9 * 0.75, 1100: 0.1, 2000: 0.1}),
        # constant after warm-up
        ({"decay": "constant"}, {10: 0.1, 100: 1.0, 5000: 1.0}),
        # DeepSpeed's log warm-up
        ({"warmup": "log"}, {0: 0.0, 9: math.log(10) / math.log(101), 100: 1.0, 1100: 0.0}),
    ],
)
def test_lr_shapes(kw: dict[str, Any], points: dict[int, float]) -> None:
    src = Tokens()
    sched = _lr(src, warmup_layer_tokens=100, total_layer_tokens=1100, **kw)
    for tokens, factor in points.items():
        src.consumed_layer_tokens = tokens
        assert sched.lr_factor(tokens) == pytest.approx(factor)
        sched.optimizer.step()
        sched.step()
        assert sched.get_last_lr() == [pytest.approx(factor)]


def test_lr_without_warmup_starts_at_full_lr_and_decays_monotonically() -> None:
    src = Tokens()
    sched = _lr(src, warmup_layer_tokens=0, total_layer_tokens=1000)
    assert sched.get_last_lr() == [1.0]
    factors = [sched.lr_factor(t) for t in range(0, 1001, 10)]
    assert all(a >= b for a, b in itertools.pairwise(factors)) and factors[-1] == pytest.approx(0.0)


def test_each_group_scaled_from_its_initial_lr() -> None:
    src = Tokens()
    opt = _optimizer(1.0, 0.1)
    sched = LayerTokenLRScheduler(opt, src, warmup_layer_tokens=10, total_layer_tokens=20, decay="linear")
    src.consumed_layer_tokens = 5
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05]) == sched.get_last_lr()


def test_random_ltd_and_baseline_share_the_lr_curve() -> None:
    """Equal LR at equal consumed layer-tokens; the baseline equals a step-based schedule."""
    # random-LTD: r = 4 for steps 0..7 (12 layer-tokens a step), then 8 (16 a step); baseline: 16 every step
    ltd = RandomLTDScheduler(4, 8, 8, 4, total_layer_num=2, random_ltd_layer_num=1, global_batch_size=1)
    base = RandomLTDScheduler(8, 8, 8, 4, total_layer_num=2, random_ltd_layer_num=1, global_batch_size=1)
    kw: dict[str, Any] = dict(warmup_layer_tokens=64, total_layer_tokens=640, min_lr_ratio=0.1)
    opt_ltd, opt_base, opt_step = _optimizer(0.5), _optimizer(0.5), _optimizer(0.5)
    lr_ltd = LayerTokenLRScheduler(opt_ltd, ltd, **kw)
    lr_base = LayerTokenLRScheduler(opt_base, base, **kw)
    by_step = torch.optim.lr_scheduler.LambdaLR(opt_step, lambda k: lr_base.lr_factor(16 * k))
    curve_ltd: dict[int, float] = {}
    curve_base: dict[int, float] = {}
    for _ in range(50):
        for sched, lr, opt, curve in ((ltd, lr_ltd, opt_ltd, curve_ltd), (base, lr_base, opt_base, curve_base)):
            sched.step()
            opt.step()
            lr.step()
            curve[sched.consumed_layer_tokens] = float(lr.get_last_lr()[0])
        opt_step.step()
        by_step.step()
        assert lr_base.get_last_lr() == pytest.approx(by_step.get_last_lr())
    common = sorted(set(curve_ltd) & set(curve_base))
    assert len(common) >= 30  # after step 8 both runs meet every 16 layer-tokens
    for tokens in common:
        assert curve_ltd[tokens] == pytest.approx(curve_base[tokens])
    # the random-LTD run needs two more steps to spend the same compute
    assert ltd.layer_tokens_at(10) == base.layer_tokens_at(8)


def test_works_with_a_real_optimizer_and_no_warnings() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(
        [{"params": [model.weight], "lr": 1e-2}, {"params": [model.bias], "lr": 1e-3}], weight_decay=0.0
    )
    ltd = make(4, 8, 4, 2, layers=4, n_ltd=2, batch=2)
    total = ltd.layer_tokens_at(10)
    lr_sched = LayerTokenLRScheduler(opt, ltd, warmup_layer_tokens=100, total_layer_tokens=total)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            ltd.step()
            loss = model(torch.randn(2, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            lr_sched.step()
            opt.zero_grad()
            factor = lr_sched.lr_factor(ltd.consumed_layer_tokens)
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 * factor, 1e-3 * factor])
    assert lr_sched.get_last_lr() == pytest.approx([0.0, 0.0], abs=1e-12)  # fully decayed at total


def test_lr_state_dict_round_trip() -> None:
    def build() -> tuple[RandomLTDScheduler, torch.optim.Optimizer, LayerTokenLRScheduler]:
        ltd = make(4, 8, 4, 2, layers=4, n_ltd=2, batch=2)
        opt = _optimizer(1.0)
        return ltd, opt, LayerTokenLRScheduler(opt, ltd, warmup_layer_tokens=100, total_layer_tokens=900)

    def run(ltd: RandomLTDScheduler, opt: torch.optim.Optimizer, lr: LayerTokenLRScheduler, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            ltd.step()
            opt.step()
            lr.step()
            out.append(lr.get_last_lr()[0])
        return out

    full = run(*build(), 12)
    ltd, opt, lr = build()
    first = run(ltd, opt, lr, 5)
    state = lr.state_dict()
    assert "random_ltd_scheduler" not in state and "optimizer" not in state
    buf = io.BytesIO()
    torch.save({"ltd": ltd.state_dict(), "opt": opt.state_dict(), "lr": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    ltd2, opt2, lr2 = build()
    ltd2.load_state_dict(saved["ltd"])
    opt2.load_state_dict(saved["opt"])
    lr2.load_state_dict(saved["lr"])
    assert lr2.random_ltd_scheduler is ltd2 and lr2.get_last_lr() == lr.get_last_lr()
    assert first + run(ltd2, opt2, lr2, 7) == pytest.approx(full)


def test_lr_from_deepspeed() -> None:
    lr_block = {"enabled": True, "total_layer_tokens": 1000, "warmup_layer_tokens": 100, "warmup_type": "linear"}
    cfg = _ds_config(layer_token_lr_schedule=lr_block)
    ltd = RandomLTDScheduler.from_deepspeed(cfg)
    sched = LayerTokenLRScheduler.from_deepspeed(_optimizer(1.0), ltd, cfg)
    assert (sched.warmup_layer_tokens, sched.total_layer_tokens, sched.decay, sched.warmup) == (
        100,
        1000,
        "cosine",
        "linear",
    )
    no_total = {"enabled": True, "warmup_layer_tokens": 10}
    with pytest.raises(ConfigError, match=r"total_layer_tokens is missing: .*layer_tokens_at\(train_steps\)"):
        LayerTokenLRScheduler.from_deepspeed(_optimizer(1.0), ltd, _ds_config(layer_token_lr_schedule=no_total))
    sched = LayerTokenLRScheduler.from_deepspeed(
        _optimizer(1.0), ltd, _ds_config(layer_token_lr_schedule=no_total), total_layer_tokens=ltd.layer_tokens_at(50)
    )
    assert sched.total_layer_tokens == ltd.layer_tokens_at(50)
    with pytest.raises(ConfigError, match=r"layer_token_lr_schedule\.enabled is not true"):
        LayerTokenLRScheduler.from_deepspeed(_optimizer(1.0), ltd, _ds_config())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"warmup_layer_tokens": -1}, r"warmup_layer_tokens must be an integer >= 0, got -1"),
        ({"total_layer_tokens": 0}, r"total_layer_tokens must be an integer >= 1, got 0: use .*layer_tokens_at"),
        ({"warmup_layer_tokens": 20, "total_layer_tokens": 10}, r"warmup_layer_tokens \(20\) is greater than"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be a number in \[0, 1\], got 1\.5"),
        ({"decay": "step"}, r"decay 'step' is not supported; known: 'cosine', 'linear', 'constant'"),
        ({"warmup": "exp"}, r"warmup 'exp' is not supported; known: 'linear', 'log'"),
    ],
)
def test_lr_bad_settings(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _lr(Tokens(), **{"warmup_layer_tokens": 0, "total_layer_tokens": 10, **kw})


def test_lr_needs_a_token_source() -> None:
    with pytest.raises(ConfigError, match=r"scheduler must report consumed_layer_tokens .*got object"):
        _lr(object(), warmup_layer_tokens=0, total_layer_tokens=10)
