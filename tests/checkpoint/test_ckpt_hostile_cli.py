"""Hostile inputs and outputs through the real CLI in a subprocess (issue 18): no hang, no crash, bounded memory.

Every run has a timeout, so a hang fails the test instead of blocking the suite; peak memory is
the child's own ``ru_maxrss``, measured by a small wrapper process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .test_ckpt_deepspeed import make_ds_dir

BUDGET_MIB = 256
W = "a.random_ltd_layer.w"
_MEASURE = (  # run argv[2:], then write the child's peak RSS to the file argv[1]
    "import pathlib, resource, subprocess, sys; p = subprocess.run(sys.argv[2:]); "
    "pathlib.Path(sys.argv[1]).write_text(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(p.returncode)"
)


def cli(*args: str | Path, timeout: float = 120, rss_file: Path | None = None) -> tuple[int, str, str, float]:
    """``python -m random_ltd_cli ARGS``: exit code, stdout, stderr, and (with ``rss_file``) peak RSS in MiB."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "random_ltd_cli", *map(str, args)]
    if rss_file is not None:
        argv = [sys.executable, "-c", _MEASURE, str(rss_file), *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    rss = 0.0
    if rss_file is not None:
        rss = int(rss_file.read_text()) / (1024 if sys.platform != "darwin" else 1 << 20)
    return proc.returncode, proc.stdout, proc.stderr, rss


def one_error(code: int, stdout: str, stderr: str, as_json: bool = False) -> str:
    """Exit 1, one ``Error:`` line on stderr, and (``--json``) one error object on stdout."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (code, stdout, stderr)
    if as_json:
        assert json.loads(stdout)["exit_code"] == 1
    else:
        assert stdout == ""
    return lines[0]


def st_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(data)
    return path


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({W: torch.ones(2)}, str(path))
    return path


@pytest.mark.parametrize("command", ["inspect", "strip"])
def test_fifo_input_does_not_hang(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    line = one_error(*cli(command, fifo, "--json", timeout=60)[:3], as_json=True)
    assert "FIFO" in line and str(fifo) in line


def test_fifo_model_states_in_deepspeed_folder_does_not_hang(tmp_path: Path, wrapped_state) -> None:
    root = make_ds_dir(tmp_path / "ds", wrapped_state, optim=False)
    os.mkfifo(root / "global_step10" / "zz_model_states.pt")
    assert "FIFO" in one_error(*cli("inspect", root, timeout=60)[:3])
    assert "FIFO" in one_error(*cli("strip", root, timeout=60)[:3])


def test_fifo_output_is_refused_without_blocking(tmp_path: Path, valid: Path) -> None:
    out = tmp_path / "out.safetensors"
    os.mkfifo(out)
    assert "FIFO" in one_error(*cli("strip", valid, "-o", out, "--force", timeout=60)[:3])
    assert out.is_fifo()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_device_output_is_never_replaced(tmp_path: Path, valid: Path) -> None:
    """``strip model.safetensors -o /dev/null`` as root replaced the device; a null device made in tmp_path."""
    import stat

    out = tmp_path / "null"
    os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert "character device" in one_error(*cli("strip", valid, "-o", out, "--force")[:3])
    assert stat.S_ISCHR(os.lstat(out).st_mode)


def test_existing_and_dangling_outputs(tmp_path: Path, valid: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert "--force" in one_error(*cli("strip", valid, "-o", out)[:3])
    assert out.read_bytes() == b"precious"
    code, _out, stderr, _ = cli("strip", valid, "-o", out, "--force")
    assert code == 0, stderr
    with safe_open(str(out), "np") as f:
        assert list(f.keys()) == ["a.w"]
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "nowhere.safetensors")
    assert "symbolic link" in one_error(*cli("strip", valid, "-o", link, "--force")[:3])
    assert link.is_symlink() and not (tmp_path / "nowhere.safetensors").exists()


def test_path_too_long(tmp_path: Path, valid: Path) -> None:
    long = tmp_path / ("x" * 300 + ".safetensors")
    assert "too long" in one_error(*cli("inspect", long, "--json")[:3], as_json=True)
    assert "too long" in one_error(*cli("strip", long)[:3])
    assert "too long" in one_error(*cli("strip", valid, "-o", long)[:3])


def test_folder_link_to_outside_file_is_not_copied(tmp_path: Path, valid: Path) -> None:
    root = tmp_path / "hf"
    root.mkdir()
    os.replace(valid, root / "model.safetensors")
    (tmp_path / "secret").write_text("outside contents")
    (root / "notes.txt").symlink_to(tmp_path / "secret")
    assert "outside" in one_error(*cli("strip", root, "-o", tmp_path / "out")[:3])
    assert not (tmp_path / "out").exists()


def test_deep_random_ltd_value_in_a_pickle_prints_as_json(tmp_path: Path) -> None:
    """json.dumps raised RecursionError on a deeply nested ``random_ltd`` value read from a torch file."""
    nested: list = []
    for _ in range(400):
        nested = [nested]
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {W: torch.ones(2)}, "random_ltd": nested}, path)
    code, stdout, stderr, _ = cli("inspect", path, "--json")
    data = json.loads(stdout)  # a result or an error object: always one JSON document
    if code == 0:  # the torch reader summarizes nested metadata values ("a list of 1 items")
        value = data["metadata"]["random_ltd"]
        assert isinstance(value, str) and len(value) < 200, value
    else:
        one_error(code, stdout, stderr, as_json=True)
        assert "error" in data
    code, stdout, stderr, _ = cli("inspect", path)
    assert code in (0, 1) and "Traceback" not in stderr


def _many_braces(path: Path, size: int) -> Path:
    """A safetensors header of ``{"a":[{},{},...]}``: 2.3 GiB of dicts if parsed."""
    count = (size - 10) // 3
    return st_file(path, b'{"a":[' + b"{}," * count + b"{}]}")


def _long_metadata(path: Path, size: int) -> Path:
    """A valid file whose header is one long metadata string, and one tensor to rename."""
    header = b'{"__metadata__":{"k":"' + b"x" * size + b'"},"' + W.encode() + b'":{"dtype":"U8","shape":[4],' \
             b'"data_offsets":[0,4]}}'
    return st_file(path, header, b"abcd")


@pytest.mark.skipif(not hasattr(resource, "getrusage"), reason="needs getrusage")
def test_memory_stays_within_budget(tmp_path: Path) -> None:
    """Peak RSS of the whole CLI process below 256 MiB on hostile and large headers (2.3 GiB before)."""
    bomb = _many_braces(tmp_path / "bomb.safetensors", 95_000_000)
    code, stdout, stderr, rss = cli("inspect", bomb, "--json", rss_file=tmp_path / "rss")
    assert "MiB of memory" in one_error(code, stdout, stderr, as_json=True) and rss < BUDGET_MIB, rss
    small_bomb = _many_braces(tmp_path / "small.safetensors", 3_000_000)  # under the size cap, over the budget
    code, stdout, stderr, rss = cli("strip", small_bomb, rss_file=tmp_path / "rss")
    assert "MiB of memory" in one_error(code, stdout, stderr) and rss < BUDGET_MIB, rss
    bomb.unlink()
    root = tmp_path / "hf"
    root.mkdir()
    with open(root / "model.safetensors.index.json", "wb") as f:  # the same bomb in a shard index
        f.write(b'{"weight_map": {}, "x": [' + b"{}," * 30_000_000 + b"{}]}")
    code, stdout, stderr, rss = cli("inspect", root, rss_file=tmp_path / "rss")
    assert "MiB of memory" in one_error(code, stdout, stderr) and rss < BUDGET_MIB, rss
    shutil.rmtree(root)
    big = _long_metadata(tmp_path / "big.safetensors", 50_000_000)  # valid, near the largest accepted
    code, stdout, stderr, rss = cli("strip", big, rss_file=tmp_path / "rss")
    assert code == 0 and rss < BUDGET_MIB, (stderr, rss)
    with safe_open(str(tmp_path / "big.stripped.safetensors"), "np") as f:
        assert list(f.keys()) == ["a.w"] and len(f.metadata()["k"]) == 50_000_000


def test_file_name_that_is_not_utf8_prints(tmp_path: Path) -> None:
    """Paths are printed with their undecodable bytes escaped, not as a UnicodeEncodeError."""
    path = tmp_path / os.fsdecode(b"\xff.safetensors")
    save_file({W: torch.ones(2)}, str(path))
    for args in (("inspect", path), ("strip", path), ("inspect", tmp_path)):
        code, stdout, stderr, _ = cli(*args)
        assert code == 0 and "\\udcff" in stdout, (args, stdout, stderr)
