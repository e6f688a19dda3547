"""docs/libraries.md is exactly what the library sweep produces; the README and architectures.md point to it.

Each environment checks its own table (the other is taken from the committed page): the main one in the
project's venv, the ``tv`` one (timm, open_clip, torchtitan) in the second environment's run
(``pytest -m tv``).
"""

from __future__ import annotations

import re

import pytest
import torch

from .page import PAGE, committed_sections, libraries, render, section
from .test_libs_sweep import _need
from .zoo import CASES, group


def _page_matches(name: str) -> None:
    for case in CASES:
        if group(case) == name:
            _need(case.name)  # the table is generated with every library of its environment installed
    torch.set_num_threads(1)
    expected = render({**committed_sections(), name: section(name)})
    assert PAGE.read_text() == expected, "docs/libraries.md is stale: run `python -m tests.libs.page --write`"


def test_libraries_page_matches_the_sweep() -> None:
    _page_matches("main")


@pytest.mark.tv
def test_libraries_page_matches_the_vision_sweep() -> None:
    _page_matches("tv")


def test_readme_counts_both_sweeps_and_links_the_pages() -> None:
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "(docs/libraries.md)" in readme
    found = re.search(r"and (\d+) other model libraries \(([^)]*)\)", readme.replace("\n", " "))
    assert found and int(found.group(1)) == len(libraries()), libraries()
    assert {n.strip() for n in found.group(2).split(",")} == set(libraries()), found.group(2)
    assert "(libraries.md)" in (PAGE.parent / "architectures.md").read_text()
    assert "libraries.md" in (PAGE.parents[1] / "mkdocs.yml").read_text()


def test_readme_test_command_runs_the_second_environment_with_pinned_builds() -> None:
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert ("python3 -m venv .venv-tv && .venv-tv/bin/pip install -q -e . -r tests/libs/requirements-tv.txt && "
            ".venv-tv/bin/pip install -q --no-deps -r tests/libs/no-deps-tv.txt && "
            ".venv-tv/bin/python -m pytest -q -m tv tests/libs") in readme
    libs = PAGE.parent.parent / "tests" / "libs"
    pins = (libs / "requirements-tv.txt").read_text().split()
    assert {"torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31", "open_clip_torch==3.3.0", "tyro==1.0.17",
            "spmd_types==0.2.3"} <= set(pins)
    assert "torchtitan==0.3.0" in (libs / "no-deps-tv.txt").read_text().split()
