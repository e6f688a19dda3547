"""Importing the package and asking the CLI for help must not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "safetensors", "numpy", "matplotlib")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('LOADED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("LOADED=")][-1]
    return {m for m in line.removeprefix("LOADED=").split(",") if m}


def test_import_package_is_lean() -> None:
    assert _loaded_after("import random_ltd_cli") == set()


def test_errors_and_keys_are_lean() -> None:
    assert _loaded_after("from random_ltd_cli import RandomLTDError, strip_key") == set()


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["strip", "--help"], ["convert", "--help"], ["inspect", "--help"], ["demo", "--help"]],
)
def test_cli_help_does_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom random_ltd_cli.cli import app\n"
        f"sys.argv = ['random-ltd', *{argv!r}]\n"
        "try:\n    app(prog_name='random-ltd')\nexcept SystemExit:\n    pass"
    )
    assert _loaded_after(code) == set()


def test_version_subprocess() -> None:
    from random_ltd_cli import __version__

    out = subprocess.run(
        [sys.executable, "-m", "random_ltd_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"random-ltd {__version__}"
