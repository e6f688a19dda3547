"""torch.compile over a whole schedule: a bounded number of graphs, no graph breaks, eager's numbers.

The scheduler passes ``r`` into compiled graphs as a dynamic tensor size (``compiled.py``), so a
schedule of many reserved lengths compiles one graph for ``r < S`` and one for ``r = S``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import MaskedAttentionLayer, tiny_hf_model
from torch import nn

from random_ltd_cli import RandomLayerTokenDrop, RandomLTDScheduler, convert_to_random_ltd, random_ltd_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch._dynamo")


def _sched(lo: int = 4, hi: int = 64, steps: int = 14, per: int = 4, layers: int = 4) -> RandomLTDScheduler:
    # 4, 8, ..., 56 and then 64: 15 distinct values over 15 steps
    return RandomLTDScheduler(min_value=lo, max_value=hi, require_steps=steps, seq_per_step=per,
                              total_layer_num=layers, random_ltd_layer_num=layers - 2, global_batch_size=2)


@contextmanager
def _counting() -> Iterator[Any]:
    """Fresh dynamo caches and counters; our own compile warnings become errors."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile:")
        yield counters
    torch._dynamo.reset()


def _graphs(counters: Any) -> int:
    return int(counters["stats"]["unique_graphs"])


def test_whole_gpt2_compiles_at_most_twice_over_a_schedule() -> None:
    model = tiny_hf_model("gpt2").train()
    sched = _sched()
    convert_to_random_ltd(model, scheduler=sched)
    seen = []
    with _counting() as counters:
        compiled = torch.compile(model, backend="aot_eager")
        for g in range(15):
            seen.append(sched.update_seq(g))
            ids = torch.randint(0, 97, (2, 64))
            torch.manual_seed(g)
            eager = model(input_ids=ids, use_cache=False).logits
            torch.manual_seed(g)
            out = compiled(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(out, eager)  # the same kept tokens, the same numbers
            out.square().mean().backward()
        assert len(set(seen)) >= 12 and min(seen) < 64
        assert _graphs(counters) <= 2, dict(counters["stats"])  # r < S (r a symbol) and r = S (no dropping)
        assert not counters["graph_break"]


def test_compiling_only_the_wrapped_layers_full_graph() -> None:
    model = tiny_hf_model("gpt2").train()
    sched = _sched()
    convert_to_random_ltd(model, scheduler=sched)
    with _counting() as counters:
        for _, wrapper in random_ltd_layers(model):
            wrapper.compile(backend="aot_eager", fullgraph=True)  # a graph break would raise
        for g in range(15):
            sched.update_seq(g)
            ids = torch.randint(0, 97, (2, 64))
            model(input_ids=ids, use_cache=False).logits.square().mean().backward()
        # the two wrappers share their code: one graph for r < S, one for r = S
        assert _graphs(counters) <= 2, dict(counters["stats"])


# (r, S) per step: r grows while the batches' length varies; r < S throughout
CHANGING_S = [(4, 32), (8, 24), (12, 40), (16, 32), (20, 24), (24, 40), (28, 32), (8, 40), (12, 24)]


def test_wrapped_layer_full_graph_with_changing_r_and_s() -> None:
    torch.manual_seed(0)
    layer = MaskedAttentionLayer(hidden=16, heads=2, max_pos=64)
    sched = _sched(hi=64, layers=3)
    wrapper = RandomLayerTokenDrop(layer, scheduler=sched).train()
    with _counting() as counters:
        compiled = torch.compile(wrapper, backend="aot_eager", fullgraph=True)
        for step, (r, s) in enumerate(CHANGING_S):
            sched.load_state_dict({**sched.state_dict(), "current_value": r})
            x = torch.randn(2, s, 16)
            mask = torch.ones(2, s, dtype=torch.bool)
            pos = torch.arange(s)[None].expand(2, s)
            torch.manual_seed(step)
            eager = wrapper(x, attention_mask=mask, position_ids=pos)
            torch.manual_seed(step)
            torch.testing.assert_close(compiled(x, attention_mask=mask, position_ids=pos), eager)
        # one graph at the first S, then one with S a symbol too (dynamo's automatic dynamic shapes)
        assert _graphs(counters) <= 2, dict(counters["stats"])


class LengthTable(nn.Module):
    """Scales by a per-length constant from a Python list: the length becomes a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = [1.0 + i / 100 for i in range(128)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lin(hidden_states) * self.scale[hidden_states.shape[1]]


class PlainScheduler:
    """A scheduler with only DeepSpeed's method (no length carrier)."""

    def __init__(self) -> None:
        self.r = 4

    def get_current_seq(self) -> int:
        return self.r


def _run_through(wrapper: nn.Module, set_r: Any) -> list[warnings.WarningMessage]:
    torch._dynamo.reset()
    compiled = torch.compile(wrapper, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, r in enumerate((4, 8, 12, 16)):
            set_r(step, r)
            compiled(torch.randn(2, 32, 8)).sum().backward()
    torch._dynamo.reset()
    return [w for w in caught if str(w.message).startswith("torch.compile:")]


def test_a_layer_that_makes_r_a_constant_warns_once_with_the_count() -> None:
    sched = _sched(lo=4, hi=32, steps=7, layers=3)
    stack = nn.Sequential(*(RandomLayerTokenDrop(LengthTable(), scheduler=sched, layer_id=i) for i in (3, 4)))
    caught = _run_through(stack.train(), lambda step, r: sched.update_seq(step))
    assert len(caught) == 1  # once for both layers of the class, not once per layer or per compilation
    assert str(caught[0].message).startswith(
        "torch.compile: LengthTable (random-LTD layer 3; warned once per layer class) makes the reserved length a "
        "constant in its code (e.g. compares or converts hidden_states.shape[...] to a Python int), so every "
        "distinct reserved length r is a new graph: expect about 8 compilations (8 distinct r from 4 to 32 in "
        "steps of 4). Dynamo runs a frame eagerly once it reaches torch._dynamo.config.recompile_limit (8): raise "
        "that limit"
    )


def test_a_scheduler_without_a_carrier_warns_once() -> None:
    sched = PlainScheduler()
    wrapper = RandomLayerTokenDrop(nn.Linear(8, 8), scheduler=sched, hidden_name="input").train()
    caught = _run_through(wrapper, lambda step, r: setattr(sched, "r", r))
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        "torch.compile: its scheduler PlainScheduler gives r as a Python int, which dynamo treats as a constant "
        "(random-LTD layer 0, Linear; warned once per scheduler), so every distinct reserved length r is a new "
        "graph: expect one recompile per distinct r of the schedule."
    )


def test_the_carrier_follows_the_scheduler() -> None:
    sched = _sched()
    assert sched.reserved_length_carrier.shape == (4, 0)
    sched.update_seq(7)
    assert sched.reserved_length_carrier.shape == (sched.get_current_seq(), 0) == (32, 0)
    sched.load_state_dict({**sched.state_dict(), "current_value": 12})
    assert sched.reserved_length_carrier.shape == (12, 0)
    assert "reserved_length_carrier" not in sched.state_dict()


def test_the_carrier_is_marked_dynamic_without_importing_dynamo() -> None:
    code = (
        "import sys, torch\nfrom random_ltd_cli import RandomLTDScheduler\n"
        "s = RandomLTDScheduler(4, 64, 14, 4, total_layer_num=4, random_ltd_layer_num=2, global_batch_size=2)\n"
        "s.update_seq(3)\nc = s.reserved_length_carrier\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "import torch._dynamo\nt = torch.empty(c.shape[0], 0)\ntorch._dynamo.maybe_mark_dynamic(t, 0)\n"
        "assert {k: v for k, v in vars(c).items() if k.startswith('_')} == "
        "{k: v for k, v in vars(t).items() if k.startswith('_')}, (vars(c), vars(t))\n"
        "print(c.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "torch.Size([16, 0])"


@pytest.mark.skipif(os.environ.get("RANDOM_LTD_NO_INDUCTOR") == "1", reason="RANDOM_LTD_NO_INDUCTOR=1")
def test_inductor_compiles_a_tiny_wrapped_layer_at_most_twice() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    sched = _sched(lo=4, hi=48, steps=11, layers=3)  # 4, 8, ..., 48: 12 values, the last one r = S
    # an MLP (unverifiable) run eagerly beside the compiled one: verification off (compile counts are the point)
    wrapper = RandomLayerTokenDrop(layer, scheduler=sched, hidden_name="input", verify="off").train()
    seen = []
    with _counting() as counters, torch._inductor.config.patch(fallback_random=True):  # eager's random numbers
        compiled = torch.compile(wrapper, backend="inductor", fullgraph=True)
        for g in range(12):
            seen.append(sched.update_seq(g))
            x = torch.randn(2, 48, 8, requires_grad=True)
            torch.manual_seed(g)
            eager = wrapper(x)
            torch.manual_seed(g)
            out = compiled(x)
            torch.testing.assert_close(out, eager)
            out.sum().backward()
        assert len(set(seen)) == 12
        assert _graphs(counters) <= 2, dict(counters["stats"])
