"""How close does a converted model's training step come to the ideal speed-up?

In one run, side by side:

* ``base``: a training step (forward, backward, optimizer) of a 12-layer GPT-2-small-shaped
  model (Hugging Face ``GPT2LMHeadModel``, H=768, 12 heads, vocab 50257) on [B, S] tokens;
* ``ltd``: the same model with layers 1-10 wrapped by random-LTD at r = S/2;
* per-layer costs: one block's forward + backward at length S and at length r.

The ideal step time removes exactly what the wrapped layers no longer compute:
``ideal = base - n_wrapped * (t_layer(S) - t_layer(r))``. It prints ``ltd / base`` next to
``ideal / base``; target: measured <= 1.03 x ideal.

    python benchmarks/model_speedup.py            # B=2, S=512 (a few minutes on 2 CPU cores)
    python benchmarks/model_speedup.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import dtype_of, finish, interleaved, median

from random_ltd_cli import convert_to_random_ltd


def build(layers: int, hidden: int, heads: int, vocab: int, seq: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=seq,
                     resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.seq, a.layers, a.hidden, a.heads, a.vocab, a.repeats, a.warmup = 2, 64, 4, 64, 2, 256, 2, 1
    keep = a.seq // 2
    dtype = dtype_of(a.dtype)
    base = build(a.layers, a.hidden, a.heads, a.vocab, a.seq).to(a.device, dtype).train()
    ltd = convert_to_random_ltd(copy.deepcopy(base), layers="middle", reserved_length=keep).train()
    n_wrapped = a.layers - 2
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in (("base", base), ("ltd", ltd))}

    def step(name: str, model: torch.nn.Module) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    block = copy.deepcopy(base.transformer.h[1])
    x_full = torch.randn(a.batch, a.seq, a.hidden, device=a.device, dtype=dtype, requires_grad=True)
    x_kept = torch.randn(a.batch, keep, a.hidden, device=a.device, dtype=dtype, requires_grad=True)

    times = interleaved(
        {
            "base": lambda: step("base", base),
            "ltd": lambda: step("ltd", ltd),
            "layer_full": lambda: block(x_full).sum().backward(),
            "layer_kept": lambda: block(x_kept).sum().backward(),
        },
        a.repeats, a.warmup, a.device,
    )
    t = {k: median(v) for k, v in times.items()}
    ideal = t["base"] - n_wrapped * (t["layer_full"] - t["layer_kept"])
    measured_ratio, ideal_ratio = t["ltd"] / t["base"], ideal / t["base"]
    result = {
        "benchmark": "model_speedup",
        "config": {"batch": a.batch, "seq": a.seq, "keep": keep, "layers": a.layers, "wrapped": n_wrapped,
                   "hidden": a.hidden, "heads": a.heads, "vocab": a.vocab, "dtype": a.dtype, "repeats": a.repeats},
        "median_s": t,
        "ratio_measured": measured_ratio,
        "ratio_ideal": ideal_ratio,
        "measured_over_ideal": measured_ratio / ideal_ratio,
        "target_measured_over_ideal": 1.03,
    }
    title = (f"model speed-up: GPT-2 {a.layers} layers H={a.hidden}, layers 1-{a.layers - 2} at r={keep} of "
             f"S={a.seq}, B={a.batch}, {a.dtype} on {a.device}")
    rows = [("base step", f"{t['base'] * 1e3:.1f} ms"), ("random-LTD step", f"{t['ltd'] * 1e3:.1f} ms"),
            ("one layer at S / at r", f"{t['layer_full'] * 1e3:.1f} / {t['layer_kept'] * 1e3:.1f} ms"),
            ("ratio measured (ltd / base)", f"{measured_ratio:.3f}"), ("ratio ideal", f"{ideal_ratio:.3f}"),
            ("measured / ideal", f"{measured_ratio / ideal_ratio:.3f}"), ("target", "<= 1.03")]
    return finish("model_speedup", title, rows, result, argv, a.smoke, a.json_path, a.device)


if __name__ == "__main__":
    main()
