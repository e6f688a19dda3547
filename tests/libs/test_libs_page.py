"""docs/libraries.md is exactly what the library sweep produces; the README and architectures.md point to it."""

from __future__ import annotations

import re

import torch

from .page import PAGE, libraries, render
from .test_libs_sweep import _need
from .zoo import CASES, group


def test_libraries_page_matches_the_sweep() -> None:
    for case in CASES:
        if group(case) == "main":
            _need(case.name)  # the page is generated with every claimed library installed
    torch.set_num_threads(1)
    assert PAGE.read_text() == render(), "docs/libraries.md is stale: run `python -m tests.libs.page --write`"


def test_readme_counts_both_sweeps_and_links_the_pages() -> None:
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "(docs/libraries.md)" in readme
    found = re.search(r"and (\d+) other model libraries", readme)
    assert found and int(found.group(1)) == len(libraries()), libraries()
    assert "(libraries.md)" in (PAGE.parent / "architectures.md").read_text()
    assert "libraries.md" in (PAGE.parents[1] / "mkdocs.yml").read_text()
