"""The library sweep's two runs: the main environment (``pytest``) and the second one (``pytest -m tv``).

timm and open_clip import torchvision, whose PyPI wheel needs a CUDA build of torch, and torchtitan imports
triton, which only a CUDA build brings; the README's test command installs them in ``.venv-tv`` and runs
``pytest -m tv tests/libs`` there. The tests marked ``tv`` skip where their libraries are missing, except in
that run under CI, where they fail.
"""

from __future__ import annotations

import pytest

from . import zoo


def pytest_configure(config: pytest.Config) -> None:
    zoo.TV_RUN[0] = str(config.getoption("markexpr", "") or "").strip() == "tv"
