"""The strip fast path (no Typer at start-up): same results, same errors, and a lean import list."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from random_ltd_cli.cli import app
from random_ltd_cli.cli._strip_run import parse_plain

from .ckpt_helpers import wrap_keys

P = Path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["strip", "a"], {"paths": [P("a")], "output": None}),
        (["strip", "a", "-o", "b", "--json"], {"paths": [P("a")], "output": P("b"), "as_json": True}),
        (["strip", "--output=b", "a", "--trust-pickle"], {"paths": [P("a")], "output": P("b"), "trust_pickle": True}),
        (["strip", "-ob", "--dry-run", "a"], {"paths": [P("a")], "output": P("b"), "dry_run": True}),
        (["strip", "--in-place", "--", "-a"], {"paths": [P("-a")], "output": None, "in_place": True}),
        (["strip", "a", "-o", "b", "--force"], {"paths": [P("a")], "output": P("b"), "force": True}),
        (["strip"], None),
        (["strip", "a", "--help"], None),
        (["strip", "a", "b"], {"paths": [P("a"), P("b")], "output": None}),  # several inputs, run folders
        (["strip", "a", "-o", "d", "b", "--", "-c"], {"paths": [P("a"), P("b"), P("-c")], "output": P("d")}),
        (["strip", "a", "-h"], None),
        (["strip", "a", "-o=b"], None),
        (["strip", "a", "-o"], None),
        (["strip", "a", "-o", "--json"], None),
        (["strip", "a", "--json", "--json"], None),
        (["strip", "a", "--in-place", "-o", "b"], None),
        (["strip", "a", "--bogus"], None),
        (["strip", ""], None),
        (["--version"], None),
        (["inspect", "a"], None),
    ],
)
def test_parse_plain(argv: list[str], expected: dict[str, Any] | None) -> None:
    flags = {"in_place": False, "dry_run": False, "as_json": False, "trust_pickle": False, "force": False}
    assert parse_plain(argv) == (None if expected is None else {**flags, **expected})


def cli(*args: str, cwd: Path, python: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """``python [python] -m random_ltd_cli [args]`` in ``cwd``: exit code, stdout, stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, *python, "-m", "random_ltd_cli", *args]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_fast_path_matches_the_typer_command(tmp_path: Path, plain_state) -> None:
    """Each command line through ``python -m`` (fast path) and through the Typer app: same everything."""
    save_file({k: v.clone() for k, v in wrap_keys(plain_state).items()}, str(tmp_path / "w.safetensors"))
    save_file({k: v.clone() for k, v in plain_state.items() if k != "lm_head.weight"}, str(tmp_path / "p.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    run_dir = tmp_path / "run"  # a run folder of standalone files (issue 10)
    run_dir.mkdir()
    shutil.copy(tmp_path / "w.safetensors", run_dir / "a.safetensors")
    shutil.copy(tmp_path / "p.safetensors", run_dir / "b.safetensors")
    (run_dir / "results.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    runs = [
        ["strip", "w.safetensors", "-o", "no/such/dir/out.safetensors", "--json"],
        ["strip", "w.safetensors", "p.safetensors", "-o", "missing-folder"],
        ["strip", "w.safetensors", "p.safetensors", "-o", "missing-folder", "--json"],
        ["strip", "w.safetensors", "bad.safetensors"],
        ["strip", "run", "--dry-run"],
        ["strip", "run", "w.safetensors", "--json"],
        ["strip", "w.safetensors", "run", "-o", "plain"],
        ["strip", "w.safetensors"],
        ["strip", "w.safetensors", "-o", "out.safetensors", "--json"],
        ["strip", "w.safetensors", "--dry-run"],
        ["strip", "p.safetensors", "-o", "copy.safetensors"],
        ["strip", "bad.safetensors"],
        ["strip", "missing.pt"],
        ["strip", "w.safetensors", "-o", "no/such/dir/out.safetensors"],
    ]
    assert all(parse_plain(argv) is not None for argv in runs)
    runner = CliRunner()
    for argv in runs:
        typer_dir, fast_dir = tmp_path / "typer", tmp_path / "fast"
        for d in (typer_dir, fast_dir):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(tmp_path, d, ignore=shutil.ignore_patterns("typer", "fast"))
        old = Path.cwd()
        os.chdir(typer_dir)
        try:
            slow = runner.invoke(app, argv)
        finally:
            os.chdir(old)
        code, out, err = cli(*argv, cwd=fast_dir)
        assert (code, out, err) == (slow.exit_code, slow.stdout, slow.stderr), argv
        made = sorted(p.relative_to(fast_dir) for p in fast_dir.rglob("*"))
        assert made == sorted(p.relative_to(typer_dir) for p in typer_dir.rglob("*")), argv
        for name in made:
            if (fast_dir / name).is_file():
                assert (fast_dir / name).read_bytes() == (typer_dir / name).read_bytes(), (argv, name)
    assert code == 1 and err.startswith("Error: the output folder")


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_a_real_strip_imports_no_torch_typer_or_rich(tmp_path: Path, plain_state, name: str) -> None:
    """What ``random-ltd strip`` imports before its first byte: the checkpoint package and the stdlib only."""
    state = {k: v.clone() for k, v in wrap_keys(plain_state).items()}
    if name.endswith(".pt"):
        import torch

        torch.save(state, tmp_path / name)
    else:
        save_file(state, str(tmp_path / name))
    code, out, err = cli("strip", name, cwd=tmp_path, python=("-X", "importtime"))
    assert code == 0 and out.startswith("Stripped ")
    loaded = set(re.findall(r"^import time:.*\|\s+([\w.]+)$", err, flags=re.MULTILINE))
    assert "random_ltd_cli.checkpoint._copy" in loaded
    heavy = {"torch", "typer", "pydantic", "rich", "click", "numpy", "safetensors", "transformers"}
    assert not {m.split(".")[0] for m in loaded} & heavy


HARNESS = """
import os, signal, sys, time
from random_ltd_cli.checkpoint import _copy
from random_ltd_cli.cli import _strip_run, main
copy_range, how = _copy.copy_range, sys.argv[1]

def stop_then_copy(src, dst, *args, **kwargs):
    if how == "term":  # a real SIGTERM in the middle of the copy
        os.write(dst, b"partial bytes")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    copy_range(src, dst, *args, **kwargs)

_copy.clone = lambda src, dst: False  # the same on file systems that share extents
_copy.copy_range = stop_then_copy
_strip_run.PROGRESS_MIN_BYTES = 0  # as for a large checkpoint
sys.argv = ["random-ltd", *sys.argv[2:]]
main()
raise SystemExit("main() returned: the fast path did not run")
"""


@pytest.mark.parametrize("how", ["term", "plain"])
def test_fast_path_signals_and_plain_progress(tmp_path: Path, plain_state, how: str) -> None:
    """Through the fast path: SIGTERM exits 130 leaving nothing; without a terminal, plain progress lines."""
    save_file({k: v.clone() for k, v in wrap_keys(plain_state).items()}, str(tmp_path / "w.safetensors"))
    save_file({k: v.clone() for k, v in wrap_keys(plain_state).items()}, str(tmp_path / "v.safetensors"))
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-c", HARNESS, how, "strip", "w.safetensors", "v.safetensors", "-o", "out"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, check=False)
    code, out, err = proc.returncode, proc.stdout, proc.stderr
    if how == "term":
        assert (code, out) == (130, "")
        assert err == "Error: interrupted; nothing was written.\n"
        assert list((tmp_path / "out").iterdir()) == []
    else:
        assert code == 0, err
        lines = err.splitlines()
        assert len(lines) == 2 and all(re.fullmatch(r"stripping: [0-9.]+ of [0-9.]+ GiB \(100%\), 0s elapsed", ln)
                                       for ln in lines), err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v.safetensors", "w.safetensors"]
