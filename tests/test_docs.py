"""The docs site builds strictly, the CLI reference covers every command and option, the README is honest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from random_ltd_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def test_cli_reference_lists_every_command_and_option() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert f"## `random-ltd {name}`" in text, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("-"):
                    assert f"`{opt}" in text or f" {opt}" in text, (name, opt)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in test_cmd  # never a CUDA build on a fresh machine


def test_docs_pages_in_nav_exist() -> None:
    nav = re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    missing = [n for n in nav if not (ROOT / "docs" / n).is_file()]
    assert not missing


def quickstart_snippet() -> str:
    """The Python block under the quickstart's "## Library" heading."""
    section = (ROOT / "docs" / "quickstart.md").read_text().split("## Library", 1)[1]
    block = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert block is not None
    return block.group(1)


def test_quickstart_snippet_runs_and_its_weights_load_into_the_plain_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    code = quickstart_snippet()
    stated = "S, B, steps, vocab = 128, 8, 300, 1024"
    assert stated in code  # the small configuration the page describes (and times)
    script = tmp_path / "snippet.py"
    short = code.replace(stated, "S, B, steps, vocab = 128, 8, 3, 1024")
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + short)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    import torch

    # 3 steps of batch 8: blocks 0 and 5 see all 128 tokens, the 4 middle ones r = 32, 64, 96 (require_steps = 3)
    assert int(p.stdout.split()[-1]) == 8 * (3 * 2 * 128 + 4 * (32 + 64 + 96))
    cfg = transformers.GPT2Config(vocab_size=1024, n_positions=128, n_layer=6, n_embd=128, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    plain = transformers.GPT2LMHeadModel(cfg)
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
