"""The CI part of the checkpoint fuzz suite (``fuzz.py``): a few hundred seeded cases, no failure allowed.

Each case must end with the library's own error (nothing written, input unchanged) or with an
output that safetensors loads, within the per-case time bound. A longer run:
``python tests/checkpoint/fuzz.py --cases 20000 --seed N``.
"""

from __future__ import annotations

import pytest

from .fuzz import run


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzz_safetensors_and_folders(seed: int) -> None:
    result = run(250, seed, stop_after=3, cli_every=50)  # 5 of them through the real CLI too
    assert not result.failures, "\n\n".join(f"seed {f['seed']}: {f['traceback']}" for f in result.failures)
    assert result.cases == 250 and result.cli_runs == 5
    assert result.refused > 0 and result.accepted > 0  # both outcomes are exercised
