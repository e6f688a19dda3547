"""What does drawing indices and gathering encoder masks cost, ours against DeepSpeed's Python loop?

Side by side in one run, for L layers, batch B, length S, reserved length r (defaults 10, 32, 512, 256)
and a [B, 1, S, S] encoder attention mask:

* ``deepspeed-style``: a re-implementation of what DeepSpeed's ``bert_sample_tokens`` does on the
  Python side: ``torch.multinomial`` over a uniform distribution for L*B rows, a sort of each row
  (DeepSpeed calls a CUDA kernel for this step), then, per layer and per sample, a Python loop
  that slices the mask rows and columns and concatenates the slices;
* ``random-ltd``: per layer, ``sample_indices`` (one rand + topk + sort) and the vectorised
  ``gather_mask`` that each wrapped layer runs.

It prints both times and ``deepspeed-style / random-ltd``.

    python benchmarks/sampling_cost.py
    python benchmarks/sampling_cost.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import finish, interleaved, median

from random_ltd_cli.sampling import sample_indices
from random_ltd_cli.tokens import gather_mask


def deepspeed_style(mask: torch.Tensor, layers: int, batch: int, seq: int, keep: int) -> list[torch.Tensor]:
    """The Python-side algorithm of DeepSpeed's encoder sampling, re-implemented for comparison."""
    uniform = torch.ones(layers * batch, seq, device=mask.device)
    idx = torch.multinomial(uniform, keep).view(layers, batch, keep)
    idx = idx.sort(dim=-1).values  # DeepSpeed: token_sort_ CUDA kernel
    masks = []
    for layer in range(layers):
        per_sample = []
        for i in range(batch):
            rows = mask[i : i + 1, :, idx[layer][i], :]
            per_sample.append(rows[:, :, :, idx[layer][i]])
        masks.append(torch.cat(per_sample, dim=0))
    return masks


def ours(mask: torch.Tensor, layers: int, batch: int, seq: int, keep: int) -> list[torch.Tensor]:
    out = []
    for _ in range(layers):
        idx = sample_indices(batch, seq, keep, device=mask.device)
        out.append(gather_mask(mask, idx, seq))
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--keep", type=int, default=None, help="reserved length r (default S/2)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.batch, a.seq, a.repeats, a.warmup = 2, 4, 64, 2, 1
    keep = a.keep or a.seq // 2
    torch.manual_seed(0)
    pad = torch.ones(a.batch, a.seq, dtype=torch.bool, device=a.device)
    pad[:, a.seq - a.seq // 8 :] = False
    mask = (pad[:, None, :, None] & pad[:, None, None, :]).float()  # [B,1,S,S] encoder mask
    # both produce the same shapes
    assert [m.shape for m in ours(mask, a.layers, a.batch, a.seq, keep)] == [
        m.shape for m in deepspeed_style(mask, a.layers, a.batch, a.seq, keep)
    ]
    times = interleaved(
        {
            "deepspeed_style": lambda: deepspeed_style(mask, a.layers, a.batch, a.seq, keep),
            "random_ltd": lambda: ours(mask, a.layers, a.batch, a.seq, keep),
        },
        a.repeats, a.warmup, a.device,
    )
    t = {k: median(v) for k, v in times.items()}
    ratio = t["deepspeed_style"] / t["random_ltd"]
    result = {
        "benchmark": "sampling_cost",
        "config": {"layers": a.layers, "batch": a.batch, "seq": a.seq, "keep": keep, "repeats": a.repeats},
        "median_s": t,
        "ratio_deepspeed_over_ours": ratio,
    }
    title = f"sampling + encoder-mask gathering: L={a.layers}, B={a.batch}, S={a.seq}, r={keep} on {a.device}"
    rows = [("deepspeed-style python loop", f"{t['deepspeed_style'] * 1e3:.2f} ms"),
            ("random-ltd (vectorised)", f"{t['random_ltd'] * 1e3:.2f} ms"), ("ratio deepspeed / ours", f"{ratio:.2f}x")]
    return finish("sampling_cost", title, rows, result, argv, a.smoke, a.json_path, a.device)


if __name__ == "__main__":
    main()
