"""The library sweep's two runs: the main environment (``pytest``) and the second one (``pytest -m tv``).

Libraries that need another build of torch (torchtitan imports triton) are installed in ``.venv-tv`` by
the README's test command, which runs ``pytest -q -m tv tests/libs`` there. The tests marked ``tv`` skip
where their libraries are missing, except in that run under CI, where they fail.
"""

from __future__ import annotations

import pytest

from . import zoo


def pytest_configure(config: pytest.Config) -> None:
    zoo.TV_RUN[0] = str(config.getoption("markexpr", "") or "").strip() == "tv"
