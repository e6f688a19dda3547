"""Write the strip golden files: real inputs, and digests of the outputs the *previous* strip wrote.

The inputs are written by the real libraries (safetensors, torch.save, transformers); the digests
come from the ``random_ltd_cli`` found on ``PYTHONPATH``, which must be the release being compared
against, not the code under test. To regenerate (only when the output format changes on purpose):

    git archive <commit> random_ltd_cli | tar -x -C /tmp/old-rltd
    PYTHONPATH=/tmp/old-rltd python tests/checkpoint/golden/make_golden.py --commit <commit>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model
from torch import nn

HERE = Path(__file__).resolve().parent
INPUTS = HERE / "inputs"
WRAPPED = ("transformer.h.0", "transformer.h.1")


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.random_ltd_layer = inner


def wrapped_model() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=8, n_head=2, vocab_size=24, n_positions=8, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    for prefix in WRAPPED:
        index = int(prefix.rsplit(".", 1)[1])
        model.transformer.h[index] = Wrapper(model.transformer.h[index])
    return model


def digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        (p.relative_to(path).as_posix() if path.is_dir() else ""): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


def write_inputs(model: nn.Module) -> None:
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    save_file(dict(state), str(INPUTS / "plain.safetensors"), metadata={"format": "pt", "note": "golden"})
    save_model(model, str(INPUTS / "aliases.safetensors"))  # tied lm_head: an alias entry in __metadata__
    torch.save(state, INPUTS / "state.pt")
    torch.save({"state_dict": state, "epoch": 3, "note": "lightning-like"}, INPUTS / "nested.ckpt")
    torch.save(state, INPUTS / "legacy.pt", _use_new_zipfile_serialization=False)
    model.save_pretrained(INPUTS / "hf-sharded", max_shard_size="6KB")
    (INPUTS / "hf-sharded" / "tokenizer.json").write_text('{"version": "1.0"}\n')
    tag = INPUTS / "deepspeed" / "global_step7"
    tag.mkdir(parents=True)
    (INPUTS / "deepspeed" / "latest").write_text("global_step7")
    torch.save({"module": state, "buffer_names": [], "global_steps": 7}, tag / "mp_rank_00_model_states.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", required=True, help="the commit whose random_ltd_cli is on PYTHONPATH")
    args = parser.parse_args()
    import random_ltd_cli
    from random_ltd_cli.checkpoint import strip_checkpoint

    if Path(random_ltd_cli.__file__).resolve().is_relative_to(HERE.parents[2]):
        sys.exit("run this with the previous release on PYTHONPATH, not the code under test")
    shutil.rmtree(INPUTS, ignore_errors=True)
    INPUTS.mkdir()
    write_inputs(wrapped_model())
    expected: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(INPUTS.iterdir()):
            out = Path(tmp) / src.name
            strip_checkpoint(src, out)
            expected[src.name] = digests(out)
    manifest = {"made_by_commit": args.commit, "torch": torch.__version__, "expected_sha256": expected}
    (HERE / "expected.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(expected)} cases to {HERE}")


if __name__ == "__main__":
    main()
