"""What does conversion's token-mixer rule cost? (``random_ltd_cli.mixers``: structure only, no forward.)

Builds Hugging Face models on the meta device (structure only, no memory for weights) at a realistic
size, times the rule (``mixers.classify`` over the stack's layers, the family rules included) and a
whole ``convert_to_random_ltd`` side by side, and prints both per layer.

    python benchmarks/mixer_rule_cost.py
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median, write_json

MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {  # name: (config class, model class, settings)
    "llama-1b-shape": ("LlamaConfig", "LlamaForCausalLM",
                       dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=8192, vocab_size=32000)),
    "jamba-shape": ("JambaConfig", "JambaForCausalLM",
                    dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=4096, vocab_size=32000, num_experts=4)),
    "bert-base-shape": ("BertConfig", "BertForMaskedLM", dict()),
}


def _time(fn: Any, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return median(out)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="one model, one repeat")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch
    import transformers as T

    from random_ltd_cli import ConversionError, convert_to_random_ltd, revert_random_ltd
    from random_ltd_cli.adapters import refusal
    from random_ltd_cli.mixers import classify
    from random_ltd_cli.stacks import find_layer_stacks

    T.logging.set_verbosity_error()
    rows = []
    for name, (config, model, settings) in list(MODELS.items())[: 1 if args.smoke else None]:
        with torch.device("meta"):
            m = getattr(T, model)(getattr(T, config)(**settings))
        layers = [layer for _, _, members in find_layer_stacks(m) for _, layer in members]
        rule = _time(lambda layers=layers: classify(layers, refusal), 1 if args.smoke else args.repeats)

        def convert(m: Any = m) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    convert_to_random_ltd(m, reserved_length=8, layers="attention")
                except ConversionError:
                    return
            revert_random_ltd(m)

        whole = _time(convert, 1 if args.smoke else args.repeats)
        rows.append({"model": name, "layers": len(layers), "rule_ms_per_layer": 1e3 * rule / len(layers),
                     "convert_ms_per_layer": 1e3 * whole / len(layers), "rule_share": rule / whole})
        print(f"{name:16s} {len(layers):3d} layers: rule {1e3 * rule / len(layers):.3f} ms/layer, whole conversion "
              f"{1e3 * whole / len(layers):.3f} ms/layer ({100 * rule / whole:.0f}% of it)")
    payload: dict[str, object] = {"rows": rows, "rule_ms_per_layer": rows[0]["rule_ms_per_layer"]}
    write_json("mixer_rule_cost", payload, args.json)
    return payload


if __name__ == "__main__":
    main()
