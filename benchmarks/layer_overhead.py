"""How much does the random-LTD wrapper cost on top of the layer it saves work for?

Times, side by side in one run, forward + backward of

* ``wrapped``: a GPT-2-small-sized block (H=768, 12 heads) wrapped by ``RandomLayerTokenDrop``
  with reserved length r, on the full [B, S, H] batch (sampling, gathers, scatter included);
* ``bare``: the same block on the r tokens already gathered, [B, r, H];

and prints ``wrapped / bare`` (target: <= 1.03 on CPU). Defaults: B=8, S=512, r=256.

    python benchmarks/layer_overhead.py                 # the full measurement
    python benchmarks/layer_overhead.py --smoke         # a seconds-long check that it runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import dtype_of, finish, interleaved, median

from random_ltd_cli import RandomLayerTokenDrop


def make_block(hidden: int, heads: int, seq: int) -> torch.nn.Module:
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    cfg = GPT2Config(n_embd=hidden, n_head=heads, n_positions=seq, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return GPT2Block(cfg, layer_idx=0)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--keep", type=int, default=None, help="reserved length r (default S/2)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a couple of repeats")
    p.add_argument("--json", dest="json_path", default=None, help="where to write the JSON (default results/)")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.seq, a.hidden, a.heads, a.repeats, a.warmup = 2, 64, 64, 2, 2, 1
    keep = a.keep or a.seq // 2
    torch.manual_seed(0)
    dtype = dtype_of(a.dtype)
    block = make_block(a.hidden, a.heads, a.seq).to(a.device, dtype).train()
    wrapped = RandomLayerTokenDrop(block, reserved_length=keep).train()
    x_full = torch.randn(a.batch, a.seq, a.hidden, device=a.device, dtype=dtype, requires_grad=True)
    x_kept = torch.randn(a.batch, keep, a.hidden, device=a.device, dtype=dtype, requires_grad=True)
    g_full = torch.randn_like(x_full)
    g_kept = torch.randn_like(x_kept)

    def run_wrapped() -> None:
        wrapped(x_full).backward(g_full)

    def run_bare() -> None:
        block(x_kept).backward(g_kept)

    times = interleaved({"wrapped": run_wrapped, "bare": run_bare}, a.repeats, a.warmup, a.device)
    tw, tb = median(times["wrapped"]), median(times["bare"])
    result = {
        "benchmark": "layer_overhead",
        "config": {"batch": a.batch, "seq": a.seq, "keep": keep, "hidden": a.hidden, "heads": a.heads,
                   "dtype": a.dtype, "repeats": a.repeats},
        "median_s": {"wrapped": tw, "bare_on_gathered": tb},
        "ratio_wrapped_over_bare": tw / tb,
        "target": 1.03,
    }
    title = f"layer overhead: GPT-2 block H={a.hidden}, B={a.batch}, S={a.seq}, r={keep}, {a.dtype} on {a.device}"
    rows = [("wrapped (full batch)", f"{tw * 1e3:.1f} ms"), ("bare (gathered tokens)", f"{tb * 1e3:.1f} ms"),
            ("ratio wrapped / bare", f"{tw / tb:.3f}"), ("target", "<= 1.03")]
    return finish("layer_overhead", title, rows, result, argv, a.smoke, a.json_path, a.device)


if __name__ == "__main__":
    main()
