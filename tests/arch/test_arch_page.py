"""docs/architectures.md is what the architecture sweep produces; the README states the coverage it counts.

The page is regenerated under whatever transformers is installed (never skipped). With the version
the page names, the regenerated page must equal the committed one character for character. With
another version (a fresh clone installs the newest transformers) the wording of errors and the set
of model types in the auto mappings may change, so the check compares what matters: the status
(exact / refused / refused at the first step / not buildable) of every family both know must be the
same. A family new in the installed version, or one it dropped, is not a failure.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from .page import PAGE, coverage, render

ROW = re.compile(r"^\| ([\w.-]+) \| `\w+` \| [^|]* \| [^|]* \| (exact|refused|not buildable|known gap)", re.M)
GEN_ROW = re.compile(r"^\| ([\w.-]+) \| `\w+` \| [^|]+ \| (exact|refused at the first step|refused|not buildable) \|",
                     re.M)


def statuses(page: str) -> dict[str, str]:
    """``{family: status}`` of every table row of a rendered page (hand-tuned rows and generated rows)."""
    out: dict[str, str] = {}
    head, _, generated = page.partition("\n## Every other family")
    for line in head.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| ") and len(cells) >= 5 and cells[1].startswith("`"):
            out[cells[0].lstrip("| ")] = re.split(r"[ :(]", cells[4])[0]
    out.update({m.group(1): m.group(2) for m in GEN_ROW.finditer(generated)})
    return out


def test_architectures_page_matches_the_sweep() -> None:
    import transformers

    committed = PAGE.read_text()
    version = re.search(r"transformers (\S+) config", committed)
    assert version, "docs/architectures.md does not name the transformers version it was generated with"
    torch.set_num_threads(1)
    fresh = render()
    if version.group(1) == transformers.__version__:
        assert committed == fresh, "docs/architectures.md is stale: run `python -m tests.arch.page --write`"
        return
    old, new = statuses(committed), statuses(fresh)
    assert len(old) > 100 and len(new) > 100, (len(old), len(new))
    changed = {f: (old[f], new[f]) for f in old.keys() & new.keys() if old[f] != new[f]}
    assert not changed, (
        f"with transformers {transformers.__version__} (the page was generated with {version.group(1)}) these "
        f"families changed status (page -> now): {changed}; run `python -m tests.arch.page --write`")


def test_statuses_reads_every_row_of_the_page() -> None:
    page = PAGE.read_text()
    found = statuses(page)
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith(("| Family",
                                                                                                 "| Model type"))]
    assert len(found) == len(rows), (len(found), len(rows))


def test_readme_states_the_coverage_the_page_counts() -> None:
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "(docs/architectures.md)" in readme
    page = PAGE.read_text()
    stated = re.search(r"\*\*Coverage: (\d+) model types: (\d+) exact, (\d+) refused at conversion(?:, (\d+) refused "
                       r"at the first step)?, (\d+) not\s+buildable", page)
    assert stated, "the page states no coverage line"
    total, exact, refused, _, not_buildable = stated.groups()
    found = re.search(r"(\d+) Hugging Face model types: (\d+) exact, (\d+) refused at conversion, (\d+) not\s+"
                      r"buildable", readme)
    assert found, "the README does not state the coverage from docs/architectures.md"
    assert found.groups() == (total, exact, refused, not_buildable)


def test_page_counts_are_the_sweep_counts() -> None:
    torch.set_num_threads(1)
    cov = coverage()
    page = PAGE.read_text()
    assert f"**Coverage: {sum(cov.values())} model types: {cov['exact']} exact, {cov['refused']} refused" in page
