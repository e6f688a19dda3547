"""`random-ltd strip`: CliRunner for results and every bad input (stdout and stderr apart), one real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from random_ltd_cli.cli import app

from .ckpt_helpers import leftovers, load_strict, wrap_keys

runner = CliRunner()


def run(*args: str | Path) -> Any:
    return runner.invoke(app, ["strip", *map(str, args)])


def error_line(result: Any) -> str:
    """Exit code 1 and exactly one line on stderr, starting with 'Error: '."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def st_file(tmp_path: Path, plain_state) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone() for k, v in wrap_keys(plain_state).items()}, str(path))
    return path


def test_strip_prints_the_output_path(st_file: Path, plain_state) -> None:
    result = run(st_file)
    out = st_file.with_name("model.stripped.safetensors")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Stripped 24 names (5 untouched) from ")
    assert result.stdout.strip().endswith(str(out))
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    load_strict(load_file(out), plain_state)


def test_json_report(st_file: Path, tmp_path: Path) -> None:
    result = run(st_file, "--json", "-o", tmp_path / "plain.safetensors")
    assert result.exit_code == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["format"] == "safetensors" and report["wrote"] is True
    assert report["output"] == str(tmp_path / "plain.safetensors")
    assert (report["renamed_count"], report["untouched_count"]) == (24, 5)
    assert ["transformer.h.0.random_ltd_layer.ln_1.weight", "transformer.h.0.ln_1.weight"] in report["renamed"]


def test_dry_run_lists_renames_and_writes_nothing(st_file: Path, tmp_path: Path) -> None:
    result = run(st_file, "--dry-run")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert (
        len(lines) == 24
        and "transformer.h.1.random_ltd_layer.mlp.c_fc.weight -> transformer.h.1.mlp.c_fc.weight" in lines
    )
    assert result.stderr.startswith("Dry run: would rename 24 names") and "nothing was written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_nothing_to_strip(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"a.random_ltd_layers.w": torch.ones(1), "my_random_ltd_layer.b": torch.ones(1)}, str(plain))
    result = run(plain)
    assert result.exit_code == 0 and result.stdout.startswith("Nothing to strip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors"]
    copy = run(plain, "-o", tmp_path / "copy.safetensors")  # an explicit output always gets a file
    assert copy.exit_code == 0 and "Copied it unchanged" in copy.stderr
    assert (tmp_path / "copy.safetensors").read_bytes() == plain.read_bytes()


def test_in_place_and_output_together_is_a_usage_error(st_file: Path) -> None:
    result = run(st_file, "--in-place", "-o", "x.safetensors")
    assert result.exit_code == 2 and "--in-place" in result.stderr


def test_in_place(st_file: Path, plain_state) -> None:
    result = run(st_file, "--in-place")
    assert result.exit_code == 0 and result.stdout.strip().endswith("(in place)")
    load_strict(load_file(st_file), plain_state)


# --- bad input: exit 1, one Error line, input unchanged, nothing left behind ------------------------


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _not_a_checkpoint(d: Path) -> list[str | Path]:
    (d / "notes.txt").write_text("just text\n")
    return [d / "notes.txt"]


def _truncated_safetensors(d: Path) -> list[str | Path]:
    save_file({"a.random_ltd_layer.w": torch.ones(1000)}, str(d / "t.safetensors"))
    data = (d / "t.safetensors").read_bytes()
    (d / "t.safetensors").write_bytes(data[: len(data) // 2])
    return [d / "t.safetensors"]


def _corrupted_header(d: Path) -> list[str | Path]:
    save_file({"a.random_ltd_layer.w": torch.ones(10)}, str(d / "h.safetensors"))
    data = bytearray((d / "h.safetensors").read_bytes())
    data[10:14] = b"\x00\xff\x00\xff"
    (d / "h.safetensors").write_bytes(bytes(data))
    return [d / "h.safetensors"]


def _truncated_zip(d: Path) -> list[str | Path]:
    torch.save({"a.random_ltd_layer.w": torch.ones(1000)}, d / "z.pt")
    data = (d / "z.pt").read_bytes()
    (d / "z.pt").write_bytes(data[: len(data) - 100])
    return [d / "z.pt"]


def _missing_shard(d: Path) -> list[str | Path]:
    folder = d / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a.random_ltd_layer.w": "model-00002-of-00002.safetensors"}})
    )
    return [folder]


def _collision(d: Path) -> list[str | Path]:
    save_file({"a.random_ltd_layer.w": torch.ones(1), "a.w": torch.ones(1)}, str(d / "c.safetensors"))
    return [d / "c.safetensors"]


def _malicious(d: Path) -> list[str | Path]:
    torch.save({"a.random_ltd_layer.w": torch.ones(1), "x": Evil(d / "pwned")}, d / "evil.pt")
    return [d / "evil.pt"]


def _output_is_input(d: Path) -> list[str | Path]:
    save_file({"a.random_ltd_layer.w": torch.ones(1)}, str(d / "same.safetensors"))
    return [d / "same.safetensors", "-o", d / "." / "same.safetensors"]


def _missing_path(d: Path) -> list[str | Path]:
    return [d / "nope.safetensors"]


BAD = [
    (_not_a_checkpoint, "is not a checkpoint"),
    (_truncated_safetensors, "not a valid safetensors file.*truncated or corrupted"),
    (_corrupted_header, "not a valid safetensors file"),
    (_truncated_zip, "truncated or corrupted torch checkpoint"),
    (_missing_shard, "which is missing from"),
    (_collision, "would both become 'a.w'"),
    (_malicious, r"builtins\.exec.*--trust-pickle"),
    (_output_is_input, "is the input; pass --in-place"),
    (_missing_path, "no such file or folder"),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m.__name__.strip("_") for m, _ in BAD])
def test_bad_input(tmp_path: Path, make: Callable[[Path], list[str | Path]], message: str, untouched) -> None:
    args = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    check = untouched(tmp_path)
    assert re.search(message, error_line(run(*args)))
    check()  # every input byte unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file
    assert not (tmp_path / "pwned").exists()


def test_no_write_permission(st_file: Path, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "locked"
    target.mkdir()
    if os.geteuid() == 0:  # root ignores file modes: simulate the refusal where the temp file is created
        import tempfile

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(13, "Permission denied", str(target))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        target.chmod(0o500)
    try:
        line = error_line(run(st_file, "-o", target / "out.safetensors"))
    finally:
        target.chmod(0o700)
    assert "cannot write" in line and "Permission denied" in line and "choose an output folder you can write to" in line
    assert list(target.iterdir()) == []


def test_interrupt_leaves_nothing(st_file: Path, tmp_path: Path, monkeypatch, untouched) -> None:
    from random_ltd_cli.checkpoint import _copy

    def interrupted(src: int, dst: int, *args: Any, **kwargs: Any) -> None:
        os.write(dst, b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(_copy, "clone", lambda src, dst: False)  # the same on file systems that share extents
    monkeypatch.setattr(_copy, "copy_range", interrupted)
    check = untouched(st_file)
    result = run(st_file)
    assert result.exit_code == 130 and result.stdout == ""  # 130: how shells report a Ctrl-C
    assert result.stderr == "Error: interrupted; nothing was written.\n"
    check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"] and not leftovers(tmp_path)


def test_help_lists_the_options() -> None:
    result = runner.invoke(app, ["strip", "--help"])
    assert result.exit_code == 0
    for option in ("--output", "--in-place", "--dry-run", "--json", "--trust-pickle"):
        assert option in result.stdout


def test_real_subprocess(st_file: Path, tmp_path: Path, plain_state) -> None:
    out = tmp_path / "sub.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "random_ltd_cli", "strip", str(st_file), "-o", str(out), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == str(out) and proc.stderr == ""
    load_strict(load_file(out), plain_state)
    bad = subprocess.run(
        [sys.executable, "-m", "random_ltd_cli", "strip", str(tmp_path / "missing.pt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"Error: no such file or folder: {tmp_path / 'missing.pt'}. Check the path and retry."
    ]


def test_progress_reaches_the_total(st_file: Path, tmp_path: Path) -> None:
    from random_ltd_cli.checkpoint import strip_checkpoint

    calls: list[tuple[int, int]] = []
    strip_checkpoint(st_file, tmp_path / "p.safetensors", progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] == (tmp_path / "p.safetensors").stat().st_size
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_progress_bar_draws_on_stderr_only(capsys: pytest.CaptureFixture[str]) -> None:
    from random_ltd_cli.cli.strip import PROGRESS_MIN_BYTES, _ProgressBar

    bar = _ProgressBar()
    bar.enabled = True  # as if stderr were a terminal
    bar(10, PROGRESS_MIN_BYTES - 1)  # small outputs: no bar
    assert bar.bar is None
    bar(PROGRESS_MIN_BYTES, 2 * PROGRESS_MIN_BYTES)
    bar(2 * PROGRESS_MIN_BYTES, 2 * PROGRESS_MIN_BYTES)
    assert bar.bar is not None
    bar.close()
    assert capsys.readouterr().out == ""


def test_plain_progress_lines_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    # issue 10, problem 8: without a terminal nothing showed progress
    from random_ltd_cli.cli.strip import PROGRESS_MIN_BYTES, _ProgressBar

    bar = _ProgressBar()
    bar.enabled = False  # as when stderr is a pipe or a log file
    bar(PROGRESS_MIN_BYTES // 2, 2 * PROGRESS_MIN_BYTES)  # under the interval: no line yet
    bar(2 * PROGRESS_MIN_BYTES, 2 * PROGRESS_MIN_BYTES)  # the end always gets a line
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "stripping: 0.12 of 0.12 GiB (100%), 0s elapsed\n"
