"""The README's and the quickstart's command lines, run verbatim through the installed console script
from a temporary folder that holds what they name (issue 10, problem 1: import paths resolve from the
working folder, as with ``python -m``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("random-ltd")

MY_PKG = '''
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        return x + self.ff(x)


class Net(nn.Module):
    def __init__(self, d: int = 16, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x
'''


def command_lines(page: Path) -> list[str]:
    """The ``random-ltd ...`` lines of the page's bash block under its "Command line" heading."""
    section = page.read_text().split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.startswith("random-ltd ")]


def make_folder(tmp: Path) -> None:
    """What the commands name: my_pkg/ with plain.pt, a Hugging Face folder, a Trainer output_dir."""
    transformers = pytest.importorskip("transformers")
    (tmp / "my_pkg").mkdir()
    (tmp / "my_pkg" / "__init__.py").write_text("")
    (tmp / "my_pkg" / "models.py").write_text(MY_PKG)
    sys.path.insert(0, str(tmp))
    try:
        from my_pkg.models import Net  # type: ignore[import-not-found]

        torch.save(Net().state_dict(), tmp / "plain.pt")
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop("my_pkg.models", None)
        sys.modules.pop("my_pkg", None)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp / "gpt2-small")
    ckpt = tmp / "out" / "checkpoint-500"
    ckpt.mkdir(parents=True)
    state = {k.replace("transformer.h.1.", "transformer.h.1.random_ltd_layer."): v.contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / "config.json").write_text((tmp / "gpt2-small" / "config.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 500}))


@pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is not installed beside this Python")
def test_readme_and_quickstart_commands_run_verbatim(tmp_path: Path) -> None:
    lines = command_lines(ROOT / "README.md") + command_lines(ROOT / "docs" / "quickstart.md")
    lines = list({tuple(shlex.split(line, comments=True)): line for line in reversed(lines)}.values())[::-1]
    assert any("my_pkg.models:Net" in line for line in lines) and any("out/" in line for line in lines)
    make_folder(tmp_path)
    env = {**os.environ, "PATH": f"{SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    for line in lines:
        p = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (line, p.stdout[-2000:], p.stderr[-3000:])
    assert (tmp_path / "ltd.stripped.safetensors").is_file()
    assert (tmp_path / "gpt2-small-ltd" / "config.json").is_file()
    assert (tmp_path / "gpt2-small-ltd.stripped" / "model.safetensors").is_file()
    assert (tmp_path / "out.stripped" / "checkpoint-500" / "trainer_state.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-500"]  # nothing added beside it


def test_module_beside_the_working_folder_imports_like_python_m(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a console script's sys.path lacks the working folder; `random-ltd convert mymodel:Net` must still work
    from random_ltd_cli.target import load_attribute

    (tmp_path / "mymodel_t10.py").write_text(MY_PKG)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mymodel_t10", raising=False)
    try:
        assert load_attribute("mymodel_t10:Net").__name__ == "Net"
        assert load_attribute(f"{tmp_path / 'mymodel_t10.py'}:Block").__name__ == "Block"  # the file form
    finally:
        sys.modules.pop("mymodel_t10", None)
