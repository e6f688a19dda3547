"""The demo: its corpus and batches, the training loop, and ``random-ltd demo`` end to end (tiny)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from random_ltd_cli.cli import app
from random_ltd_cli.demo.data import batch_offsets, eval_windows, get_batch, is_eval_file, load_corpus
from random_ltd_cli.demo.run import FILES, DemoConfig
from random_ltd_cli.demo.train import Arm, train_arms
from random_ltd_cli.errors import ConfigError

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small source tree: 40 files, a package to skip, a non-Python file."""
    root = tmp_path / "src"
    for i in range(40):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    (root / "site-packages" / "dep").mkdir(parents=True)
    (root / "site-packages" / "dep" / "installed.py").write_text("print('not stdlib')\n")
    (root / "README.txt").write_text("not python")
    return root


# -- data -------------------------------------------------------------------------------


def test_corpus_is_deterministic(tree: Path) -> None:
    a, b = load_corpus(tree, eval_every=5), load_corpus(tree, eval_every=5)
    assert a.train_files == b.train_files and a.eval_files == b.eval_files
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert list(a.train_files) == sorted(a.train_files)  # file order is the sorted relative path
    assert a.train.dtype == torch.uint8


def test_eval_split_is_disjoint_and_complete(tree: Path) -> None:
    corpus = load_corpus(tree, eval_every=5)
    train, held = set(corpus.train_files), set(corpus.eval_files)
    assert train.isdisjoint(held)
    assert train | held == {f"pkg{i % 3}/mod{i}.py" for i in range(40)}  # site-packages and non-.py skipped
    assert held and all(is_eval_file(f, 5) for f in held)
    assert corpus.eval.numel() == sum(len((tree / f).read_bytes()) for f in corpus.eval_files)


def test_stdlib_split_is_disjoint() -> None:
    corpus = load_corpus(max_bytes=50_000)
    assert corpus.train.numel() >= 50_000 and corpus.eval.numel() >= 50_000
    assert set(corpus.train_files).isdisjoint(corpus.eval_files)
    assert not any("site-packages" in f for f in corpus.train_files + corpus.eval_files)


def test_eval_falls_back_to_last_file(tmp_path: Path) -> None:
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("x = 1\n")
    corpus = load_corpus(tmp_path, eval_every=10**9)  # crc32 % huge == 0 for no file
    assert corpus.eval_files == ("b.py",) and corpus.train_files == ("a.py",)


def test_too_few_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "only.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"found 1 \*\.py file\(s\) under .* needs at least 2"):
        load_corpus(tmp_path)


def test_batches_are_deterministic_windows() -> None:
    tokens = torch.arange(200, dtype=torch.uint8)
    offsets = batch_offsets(tokens.numel(), steps=3, batch_size=4, seq_len=16, seed=7)
    assert torch.equal(offsets, batch_offsets(200, 3, 4, 16, seed=7))
    assert not torch.equal(offsets, batch_offsets(200, 3, 4, 16, seed=8))
    assert offsets.shape == (3, 4) and int(offsets.max()) + 17 <= 200
    x, y = get_batch(tokens, offsets[0], 16)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 0], offsets[0]) and torch.equal(y, x + 1)  # targets are the next tokens


def test_eval_windows_cover_the_split() -> None:
    offsets = eval_windows(torch.zeros(1000, dtype=torch.uint8), 5, 99)
    assert offsets.tolist() == [0, 225, 450, 675, 900]
    with pytest.raises(ConfigError, match="fewer than one window of 100"):
        eval_windows(torch.zeros(50, dtype=torch.uint8), 5, 99)


# -- training loop ----------------------------------------------------------------------


def test_arms_see_identical_batches_and_init(tree: Path) -> None:
    # With r pinned at S, a random-LTD arm never drops anything: it must match the baseline bit for bit.
    cfg = DemoConfig.tiny(steps=6).train
    cfg.min_frac = 1.0
    corpus = load_corpus(tree, eval_every=5)
    offsets = batch_offsets(corpus.train.numel(), cfg.steps, cfg.batch_size, cfg.seq_len, cfg.seed)
    evals = eval_windows(corpus.eval, cfg.eval_sequences, cfg.seq_len)
    base, ltd = train_arms(cfg, corpus, [Arm("a", False), Arm("b", True)], offsets, evals)
    assert base.result.train_losses == ltd.result.train_losses
    assert base.result.final_eval_loss == ltd.result.final_eval_loss
    assert base.result.layer_tokens == ltd.result.layer_tokens == 6 * cfg.batch_size * cfg.seq_len * cfg.n_layer


def test_random_ltd_arm_drops_and_counts_layer_tokens(tree: Path) -> None:
    cfg = DemoConfig.tiny(steps=8).train  # S=32, 4 blocks (2 drop), r from 8 to 32, seq_per_step 4
    cfg.eval_every = 5
    corpus = load_corpus(tree, eval_every=5)
    offsets = batch_offsets(corpus.train.numel(), cfg.steps, cfg.batch_size, cfg.seq_len, cfg.seed)
    evals = eval_windows(corpus.eval, cfg.eval_sequences, cfg.seq_len)
    (ltd,) = train_arms(cfg, corpus, [Arm("ltd", True, "layer_token")], offsets, evals)
    r = ltd.result.reserved_lengths
    assert r == [8, 8, 12, 16, 20, 20, 24, 28]
    assert ltd.result.layer_tokens == sum(cfg.batch_size * (k * 2 + 32 * 2) for k in r)
    assert [p.step for p in ltd.result.history] == [0, 5, 8]


# -- the command ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(app, ["demo", "--tiny", "--out", str(out), "--seed", "3"])
    return result, out


def test_demo_prints_the_table(demo_run: tuple[Any, Path]) -> None:
    result, _ = demo_run
    assert result.exit_code == 0, result.output
    stdout, stderr = result.stdout, result.stderr
    for text in ("eval loss", "layer-tokens", "time", "baseline", "random-LTD", "load-back:  OK"):
        assert text in stdout
    assert "corpus:" in stderr and "corpus:" not in stdout  # notes go to stderr
    assert "Error" not in stderr


def test_demo_writes_its_files(demo_run: tuple[Any, Path]) -> None:
    _, out = demo_run
    assert (out / FILES["checkpoint"]).is_file() and (out / FILES["stripped"]).is_file()
    assert (out / FILES["plot"]).is_file() == HAS_MATPLOTLIB
    saved = json.loads((out / FILES["results"]).read_text())
    assert saved["config"]["seed"] == 3 and saved["proof"]["ok"] is True


def test_demo_checkpoint_strips_and_loads_back(demo_run: tuple[Any, Path]) -> None:
    from random_ltd_cli.checkpoint import inspect_checkpoint, load_state_dict
    from random_ltd_cli.model import GPT

    _, out = demo_run
    info = inspect_checkpoint(out / FILES["checkpoint"])
    assert info.wrapped_layers and info.metadata["random_ltd"]["schedule"]["min_value"] == 8
    converted = load_state_dict(out / FILES["checkpoint"])
    stripped = load_state_dict(out / FILES["stripped"])
    assert any(".random_ltd_layer." in k for k in converted)
    assert not any("random_ltd_layer" in k for k in stripped)
    plain = GPT(DemoConfig.tiny().train.model_config())
    plain.load_state_dict(stripped, strict=True)
    for name, tensor in converted.items():
        assert torch.equal(plain.state_dict()[name.replace(".random_ltd_layer.", ".")], tensor), name


def test_demo_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--tiny", "--steps", "5", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["arms"]) == {"baseline", "random-LTD"}
    assert data["arms"]["baseline"]["steps"] == 5
    assert data["load_back"] == {"ok": True, "strict": True, "identical_tensors": 53, "compared_tensors": 53}
    assert 0 < data["layer_token_saving"] < 0.5
    assert data["threads"]["count"] >= 1 and data["threads"]["reason"]


def test_demo_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    result = CliRunner().invoke(app, ["demo", "--tiny", "--steps", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "matplotlib is not installed" in result.stderr
    assert "skipped" in result.stdout
    assert not (tmp_path / FILES["plot"]).exists() and (tmp_path / FILES["stripped"]).exists()


def test_demo_unwritable_out_is_one_error_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["demo", "--tiny", "--out", str(blocker / "sub")])
    assert result.exit_code == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot be a folder" in errors[0] and "Choose another folder" in errors[0]


def test_demo_rejects_zero_steps(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--tiny", "--steps", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--steps" in result.stderr


def test_demo_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom random_ltd_cli.cli import app\nsys.argv = ['random-ltd', 'demo', '--help']\n"
        "try:\n    app(prog_name='random-ltd')\nexcept SystemExit:\n    pass\n"
        "print('TORCH=' + str('torch' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--steps" in out and "TORCH=False" in out


def test_demo_subprocess(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "random_ltd_cli", "demo", "--tiny", "--steps", "2", "--out", str(tmp_path), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["load_back"]["ok"] is True


# -- the quality benchmark reuses the loop ----------------------------------------------


def test_quality_benchmark_smoke(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    cmd = [sys.executable, str(script), "--smoke", "--steps", "3", "--seeds", "0", "1"]
    cmd += ["--json", str(tmp_path / "q.json"), "--img-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads((tmp_path / "q.json").read_text())
    assert list(data["summary"]) == ["baseline", "random-LTD (step LR)", "random-LTD (LayerToken LR)"]
    assert data["summary"]["random-LTD (step LR)"]["layer_token_saving"] > 0
    assert all(len(runs) == 2 for runs in data["runs"].values())
    assert "| baseline |" in out.stdout
    assert (tmp_path / "quality_loss_vs_time.png").is_file() == HAS_MATPLOTLIB


# -- issue 10: interrupts leave nothing; progress without a terminal -------------------------


def test_demo_interrupt_leaves_nothing_and_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from random_ltd_cli.demo import run as demo_module

    real = demo_module.save_and_prove

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # the checkpoint and its stripped copy are on disk by now
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "save_and_prove", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", "--tiny", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"Error: interrupted; nothing was written to {out} (outputs are moved there only at the end)."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the folder it created


def test_demo_progress_lines_without_a_terminal(demo_run: tuple[Any, Path]) -> None:
    result, _ = demo_run
    lines = [ln for ln in result.stderr.splitlines() if ": step " in ln]
    assert [ln.split(",")[0] for ln in lines if ln.startswith("baseline")] == [
        f"baseline: step {s}/20" for s in range(2, 21, 2)
    ]
    assert re.fullmatch(r"random-LTD: step 20/20, loss \d+\.\d{3}, \d+s elapsed", lines[-1])


# -- issue 19: the torch thread count is chosen, printed and recorded ----------------------------


@pytest.mark.parametrize(
    ("work", "requested", "env", "cpus", "load", "default", "expected", "reason"),
    [
        (262_144, 3, {"OMP_NUM_THREADS": "2"}, 2, 9.0, 2, 3, "--threads"),  # the option wins over everything
        (262_144, None, {"OMP_NUM_THREADS": "2"}, 2, 9.0, 2, 2, "OMP_NUM_THREADS=2 in the environment"),
        (4_096, None, {}, 2, 0.0, 2, 1, "a small model gains nothing"),  # --tiny: one thread even when idle
        (262_144, None, {"OMP_NUM_THREADS": "0"}, 2, 0.1, 2, 2, "2 CPUs available, load average 0.1: 2 free"),
        (262_144, None, {}, 2, 0.7, 2, 1, "load average 0.7: 1 free"),  # one other busy process
        (262_144, None, {}, 2, 9.0, 2, 1, "load average 9.0: 1 free"),  # a busy machine: never below one
        (262_144, None, {}, 8, 2.2, 8, 6, "8 CPUs available, load average 2.2: 6 free"),
        (262_144, None, {}, 64, 0.0, 32, 32, ": 32 free"),  # never more than torch's own default
    ],
)
def test_thread_choice_rule(
    work: int, requested: int | None, env: dict[str, str], cpus: int, load: float, default: int, expected: int,
    reason: str,
) -> None:
    from random_ltd_cli.demo.threads import choose_threads

    choice = choose_threads(work, requested, cpus=cpus, load=load, torch_default=default, env=env)
    assert choice.threads == expected and reason in choice.reason


def test_thread_choice_without_a_load_average(monkeypatch: pytest.MonkeyPatch) -> None:
    from random_ltd_cli.demo import threads

    monkeypatch.setattr(threads, "load_average", lambda: None)  # e.g. Windows
    choice = threads.choose_threads(262_144, cpus=2, torch_default=2, env={})
    assert choice.threads == 2 and "load average unknown" in choice.reason


def test_demo_sizes_fall_on_either_side_of_the_small_model_bound() -> None:
    from random_ltd_cli.demo.threads import SMALL_WORK

    tiny, default = DemoConfig.tiny().train, DemoConfig.default().train
    assert tiny.batch_size * tiny.seq_len * tiny.n_embd < SMALL_WORK
    assert default.batch_size * default.seq_len * default.n_embd >= SMALL_WORK


def test_demo_threads_option_is_printed_recorded_and_restored(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    args = ["demo", "--tiny", "--steps", "2", "--threads", str(target), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"torch threads: {target} (--threads)." in result.stderr
    saved = json.loads((tmp_path / FILES["results"]).read_text())
    assert saved["machine"]["torch_threads"] == target and saved["machine"]["threads_reason"] == "--threads"
    assert torch.get_num_threads() == before  # run_demo puts torch's setting back


def test_demo_header_says_why_and_how_to_override(demo_run: tuple[Any, Path]) -> None:
    result, out = demo_run
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("torch threads: "))
    assert line.endswith("; --threads N to override).")
    saved = json.loads((out / FILES["results"]).read_text())
    assert line.startswith(f"torch threads: {saved['machine']['torch_threads']} ({saved['machine']['threads_reason']}")


def test_demo_rejects_zero_threads(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--tiny", "--threads", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--threads" in result.stderr
