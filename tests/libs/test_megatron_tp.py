"""Megatron-core tensor parallelism 2 on two gloo processes (CPU): the ranks of the tensor-parallel group
draw identical kept tokens (``seed=``) and the converted model's training forward equals TP=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from .test_libs_sweep import _need
from .zoo import megatron_process_group

ROOT = Path(__file__).resolve().parents[2]


def test_tensor_parallel_ranks_draw_the_same_tokens_and_match_tp1(tmp_path: Path) -> None:
    _need("megatron-gpt")
    from .megatron_tp import run

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    init, outs = tmp_path / "init", [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.libs.megatron_tp", str(r), "2", str(init), str(outs[r])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    ranks = [torch.load(o, weights_only=True) for o in outs]
    torch.set_num_threads(1)
    with megatron_process_group():
        torch.manual_seed(0)
        tp1 = run(1)
    assert len(ranks[0]["indices"]) == 2  # the middle layers of four
    for a, b, c in zip(ranks[0]["indices"], ranks[1]["indices"], tp1["indices"], strict=True):
        assert torch.equal(a, b), "the tensor-parallel ranks drew different kept tokens"
        assert torch.equal(a, c), "TP=2 kept other tokens than TP=1 with the same seed"
    for rank in ranks:
        torch.testing.assert_close(rank["logits"], tp1["logits"], atol=1e-5, rtol=1e-4)
        assert rank["grads_finite"]
