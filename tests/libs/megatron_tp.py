"""Worker for the Megatron-core tensor-parallel test: ``python -m tests.libs.megatron_tp RANK WORLD INIT OUT``.

Each rank builds the same tiny GPTModel with tensor parallelism ``WORLD`` on a gloo group (CPU),
converts it with ``seed=`` (so that the ranks of a tensor-parallel group draw the same kept
tokens), runs one training forward and backward, and saves its kept indices, logits (gathered over
the vocabulary) and loss to ``OUT``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

SEED = 1234


def run(tp: int) -> dict[str, Any]:
    """The converted model's training forward under the current model-parallel state (``tp`` ranks)."""
    from random_ltd_cli import convert_to_random_ltd, random_ltd_layers

    from .zoo import R, megatron_batches, megatron_gpt

    model = megatron_gpt(tp=tp)
    convert_to_random_ltd(model, reserved_length=R, seed=SEED).train()
    batch = megatron_batches()[0]
    logits = _full_vocab(model(**batch), tp)  # [b, s, vocab / tp] on each rank -> [b, s, vocab]
    loss = logits.float().pow(2).mean()
    loss.backward()
    return {
        "indices": [w.last_indices.clone() for _, w in random_ltd_layers(model)],
        "logits": logits.detach().clone(),
        "loss": float(loss.detach()),
        "grads_finite": all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None),
    }


def _full_vocab(logits: torch.Tensor, tp: int) -> torch.Tensor:
    """Concatenate the ranks' vocabulary shards (Megatron's own gather allocates on CUDA)."""
    if tp == 1:
        return logits
    import torch.distributed as dist
    from megatron.core import parallel_state

    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    parts[parallel_state.get_tensor_model_parallel_rank()] = logits  # keeps this rank's gradient path
    return torch.cat(parts, dim=-1)


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from .zoo import cpu_megatron

    rank, world, init, out = int(argv[0]), int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    cpu_megatron()
    torch.manual_seed(0)
    result = run(world)
    torch.save(result, out)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
