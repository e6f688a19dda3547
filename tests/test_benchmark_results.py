"""Running a benchmark never overwrites the committed reference results (issue 10, item 9)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_default_json_goes_to_the_ignored_local_folder() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _timing  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(BENCHMARKS))
    reference = {p.name: p.read_bytes() for p in (BENCHMARKS / "results").glob("*.json")}
    out = _timing.write_json("layer_overhead", {"probe": True})
    try:
        assert out == BENCHMARKS / "results" / "local" / "layer_overhead.json"
        assert {p.name: p.read_bytes() for p in (BENCHMARKS / "results").glob("*.json")} == reference
        assert "benchmarks/results/local/" in (BENCHMARKS.parent / ".gitignore").read_text()
    finally:
        out.unlink()
