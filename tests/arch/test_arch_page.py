"""docs/architectures.md is exactly what the architecture sweep produces; the README links it."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from .page import PAGE, render
from .zoo import FAMILIES


def test_architectures_page_matches_the_sweep() -> None:
    import transformers

    committed = PAGE.read_text()
    version = re.search(r"transformers (\S+) config", committed)
    assert version, "docs/architectures.md does not name the transformers version it was generated with"
    if version.group(1) != transformers.__version__:
        pytest.skip(f"the page was generated with transformers {version.group(1)}, {transformers.__version__} "
                    "is installed (the sweep itself still runs)")
    torch.set_num_threads(1)
    assert committed == render(), "docs/architectures.md is stale: run `python -m tests.arch.page --write`"


def test_readme_links_the_page_with_the_sweep_size() -> None:
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "(docs/architectures.md)" in readme
    found = re.search(r"swept over (\d+) Hugging Face architectures", readme)
    assert found and int(found.group(1)) == len({f.family for f in FAMILIES})
