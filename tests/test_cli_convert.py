"""`random-ltd convert` and `random-ltd inspect`: CliRunner for every path and bad input, one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from random_ltd_cli.cli import app
from random_ltd_cli.model import GPT, GPTConfig

runner = CliRunner()
TARGET = "random_ltd_cli.model:GPT"
INIT = json.dumps({"vocab_size": 50, "block_size": 32, "n_layer": 4, "n_head": 2, "n_embd": 32})


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**json.loads(INIT)))


def _run(*args: str) -> object:
    return runner.invoke(app, list(args))


def _error_line(result: object) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_dry_run_lists_layers_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    r = _run("convert", TARGET, "--init", INIT, "--dry-run", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert "transformer.h.1" in r.stdout and "wrapped" in r.stdout
    assert "dry run" in r.stderr
    assert not out.exists()


def test_json_report() -> None:
    r = _run("convert", TARGET, "--init", INIT, "--layers", "1-3", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["format"] == "model"
    assert data["wrapped_layers"] == ["transformer.h.1", "transformer.h.2", "transformer.h.3"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_output_records_settings_and_inspect_reads_them(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"ltd{suffix}"
    r = _run("convert", TARGET, "--init", INIT, "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert out.exists() and str(out) in r.stderr
    r = _run("inspect", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["wrapped_layers"] == ["transformer.h.1", "transformer.h.2"]
    settings = info["metadata"]["random_ltd"]
    settings = json.loads(settings) if isinstance(settings, str) else settings
    assert settings["wrapped_layers"] == ["transformer.h.1", "transformer.h.2"]
    human = _run("inspect", str(out))
    assert human.exit_code == 0 and "transformer.h.1" in human.stdout


def test_weights_convert_strip_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    vanilla = _gpt().state_dict()
    full = tmp_path / "vanilla.pt"
    torch.save(vanilla, full)
    conv = tmp_path / "conv.safetensors"
    r = _run("convert", TARGET, "--init", INIT, "--weights", str(full), "-o", str(conv))
    assert r.exit_code == 0, r.stderr
    stripped = tmp_path / "stripped.safetensors"
    r = _run("strip", str(conv), "-o", str(stripped))
    assert r.exit_code == 0, r.stderr
    got = load_file(str(stripped))
    model = _gpt()
    model.load_state_dict({**got, "lm_head.weight": got.get("lm_head.weight", got["transformer.wte.weight"])})
    for k, v in vanilla.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert set(got) == set(vanilla) - {"lm_head.weight"}  # tied weights stored once, as save_pretrained does
    assert all(torch.equal(got[k], vanilla[k]) for k in got)


def test_weights_with_a_tied_head_saved_once(tmp_path: Path) -> None:
    # save_pretrained-style files keep one name of a tied weight; --weights must accept them
    from safetensors.torch import save_file

    vanilla = _gpt().state_dict()
    once = {k: v.contiguous().clone() for k, v in vanilla.items() if k != "lm_head.weight"}
    save_file(once, str(tmp_path / "tied.safetensors"))
    out = tmp_path / "conv.safetensors"
    r = _run("convert", TARGET, "--init", INIT, "--weights", str(tmp_path / "tied.safetensors"), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    from random_ltd_cli.checkpoint import load_state_dict

    got = load_state_dict(out)
    assert "lm_head.weight" not in got  # stored once, under the first name, as save_pretrained does
    assert torch.equal(got["transformer.wte.weight"], vanilla["transformer.wte.weight"])


def test_inspect_model_import_path_with_estimate() -> None:
    r = _run("inspect", TARGET, "--init", INIT, "--steps", "100", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["format"] == "model" and data["wrapped_layers"] == ["transformer.h.1", "transformer.h.2"]
    assert 0 < data["estimate"]["saving"] < 1
    human = _run("inspect", TARGET, "--init", INIT)
    assert "estimated compute saving" in " ".join(human.stdout.split())


def test_inspect_lists_checkpoints_in_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run("convert", TARGET, "--init", INIT, "-o", str(tmp_path / "a.safetensors")).exit_code == 0
    torch.save(_gpt().state_dict(), tmp_path / "b.pt")
    (tmp_path / "notes").mkdir()  # a folder that is not a checkpoint is skipped
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    r = _run("inspect", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["format"] == "run-dir" and data["kind"] == "run"
    assert sorted(Path(c["path"]).name for c in data["checkpoints"]) == ["a.safetensors", "b.pt"]
    assert data["wrapped_layers"] == ["transformer.h.1", "transformer.h.2"]


def test_deepspeed_config_gives_layers_and_schedule(tmp_path: Path) -> None:
    block = {
        "enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 3],
        "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 100, "seq_per_step": 8}},
    }
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 16, "data_efficiency": {"data_routing": {"random_ltd": block}}}))
    out = tmp_path / "ltd.safetensors"
    r = _run("convert", TARGET, "--init", INIT, "--ds-config", str(ds), "-o", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["wrapped_layers"] == ["transformer.h.1", "transformer.h.3"]
    info = json.loads(_run("inspect", str(out), "--json").stdout)
    settings = info["metadata"]["random_ltd"]
    settings = json.loads(settings) if isinstance(settings, str) else settings
    assert settings["schedule"]["min_value"] == 8 and settings["schedule"]["max_value"] == 32
    est = json.loads(_run("inspect", TARGET, "--init", INIT, "--ds-config", str(ds), "--json").stdout)["estimate"]
    assert est["schedule"]["global_batch_size"] == 16 and 0 < est["saving"] < 1


def test_hf_folder_target(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=4, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    r = _run("convert", str(tmp_path / "hf"), "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["wrapped_layers"] == ["transformer.h.1", "transformer.h.2"]


# --- bad input: exit 1, one Error line, nothing written ------------------------------------


def _ds_file(tmp_path: Path, text: str) -> str:
    p = tmp_path / "ds.json"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchpkg.models:Net"], "cannot import module 'nosuchpkg.models': no module named 'nosuchpkg'"),
        (["random_ltd_cli.model:Nope"], "'random_ltd_cli.model' has no attribute 'Nope'"),
        (["random_ltd_cli.model:GPTConfig"], "not an nn.Module class, a factory function or a module instance"),
        ([TARGET, "--init", "{n_layer: 2}"], "--init is not valid JSON"),
        ([TARGET, "--init", "[1, 2]"], "--init must be a JSON object"),
        ([TARGET, "--init", '{"layers": 3}'], "unexpected keyword argument 'layers'"),
        ([TARGET, "--init", INIT, "--layers", "7"], "layer index 7 is out of range: the model has 4 matching layers"),
        ([TARGET, "--init", INIT, "--layers", "a-b"], "is not a layer selection"),
        ([TARGET, "--init", INIT, "--layer-type", "torch.nn:GRU"], "no layer of GPT matches layer_type=GRU"),
        ([TARGET, "--init", INIT, "--ds-config", "{ds_bad}"], "not valid JSON"),
        ([TARGET, "--init", INIT, "--ds-config", "{ds_missing}"], "no such file"),
        ([TARGET, "--init", INIT, "-o", "{out_txt}"], "unknown file type '.txt'"),
    ],
)
def test_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    fill = {"ds_bad": _ds_file(tmp_path, "{not json"), "ds_missing": str(tmp_path / "none.json"),
            "out_txt": str(tmp_path / "out.txt")}
    args = [a.format(**fill) if "{" in a and a.strip("{}") in fill else a for a in args]
    out = tmp_path / "out.safetensors"
    r = _run("convert", *args, *([] if "-o" in args else ["-o", str(out)]))
    assert r.exit_code == 1, (r.stdout, r.stderr)
    line = _error_line(r)
    assert message in line, line
    assert r.stdout == ""
    assert not out.exists() and not (tmp_path / "out.txt").exists()


def test_weights_that_do_not_match_list_first_keys(tmp_path: Path) -> None:
    bad = {k: v for k, v in _gpt().state_dict().items() if "h.3" not in k}
    bad["extra.weight"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pt")
    out = tmp_path / "out.safetensors"
    r = _run("convert", TARGET, "--init", INIT, "--weights", str(tmp_path / "bad.pt"), "-o", str(out))
    assert r.exit_code == 1
    line = _error_line(r)
    assert "do not match the model" in line and "missing (first: transformer.h.3." in line
    assert "1 unexpected (first: extra.weight)" in line
    assert not out.exists()


def test_inspect_bad_target() -> None:
    r = _run("inspect", "no/such/file.safetensors")
    assert r.exit_code == 1
    assert "neither an existing checkpoint path nor an import path" in _error_line(r)


def test_real_subprocess_convert_and_inspect(tmp_path: Path) -> None:
    out = tmp_path / "ltd.safetensors"
    p = subprocess.run([sys.executable, "-m", "random_ltd_cli", "convert", TARGET, "--init", INIT, "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "random_ltd_cli", "inspect", str(out), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["wrapped_layers"] == ["transformer.h.1", "transformer.h.2"]
    p = subprocess.run([sys.executable, "-m", "random_ltd_cli", "convert", "nosuch:X"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("Error: ") and p.stdout == ""


def test_output_equal_to_weights_is_refused_and_weights_untouched(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(_gpt().state_dict(), weights)
    before = weights.read_bytes()
    r = _run("convert", TARGET, "--init", INIT, "--weights", str(weights), "-o", str(weights))
    assert r.exit_code == 1
    assert "is the --weights file" in _error_line(r)
    assert weights.read_bytes() == before


@pytest.mark.parametrize(
    ("attr", "extra", "message"),
    [
        ("INSTANCE", ["--init", '{"n_layer": 2}'], "is a module instance; --init only applies to a class or a factory"),
        ("not_a_model", [], "factory '{file}:not_a_model' returned int, not an nn.Module"),
        ("make", ["--layer-type", "{file}:make"], "--layer-type '{file}:make' is a function, not an nn.Module class"),
    ],
)
def test_file_targets_that_are_not_models(tmp_path: Path, attr: str, extra: list[str], message: str) -> None:
    src = tmp_path / "models_here.py"
    src.write_text(
        "from random_ltd_cli.model import GPT, GPTConfig\n"
        f"INSTANCE = GPT(GPTConfig(**{INIT}))\n"
        "def not_a_model():\n    return 3\n"
        f"def make():\n    return GPT(GPTConfig(**{INIT}))\n"
    )
    out = tmp_path / "out.safetensors"
    args = [a.replace("{file}", str(src)) for a in extra]
    r = _run("convert", f"{src}:{attr}", *args, "-o", str(out))
    assert r.exit_code == 1, r.stdout
    assert message.format(file=src) in _error_line(r)
    assert not out.exists()


# --- issue 10: convert's outputs, the estimate's horizon, small rough edges ------------------


def _hf_folder(tmp_path: Path) -> tuple[Path, object]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=4, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    return tmp_path / "hf", model


def test_hf_folder_converts_to_a_folder_with_tied_weights_once(tmp_path: Path) -> None:
    # Problem 4: a folder went in and one file without config.json came out, tied weights twice
    import transformers
    from safetensors import safe_open

    src, model = _hf_folder(tmp_path)
    out = tmp_path / "ltd"
    r = _run("convert", str(src), "-o", str(out), "--seq-len", "32", "--min-value", "8", "--require-steps", "100")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer_config.json"]
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names, meta = list(f.keys()), f.metadata()
    assert "lm_head.weight" not in names and "transformer.h.1.random_ltd_layer.attn.c_attn.weight" in names
    assert meta["format"] == "pt"
    settings = json.loads(meta["random_ltd"])
    assert settings["schedule"]["min_value"] == 8 and settings["schedule"]["require_steps"] == 100
    assert settings["tied_weights"] == {"lm_head.weight": "transformer.wte.weight"}
    info = json.loads(_run("inspect", str(out), "--json").stdout)
    assert info["parameter_count"] == sum(p.numel() for p in model.parameters())  # tied counted once
    # back: strip gives a folder that from_pretrained loads into the plain model, equal tensors
    assert _run("strip", str(out)).exit_code == 0
    plain = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ltd.stripped"))
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("which", "output", "message"),
    [
        ("folder", "ltd.safetensors", "names a file, but a Hugging Face folder converts to a folder"),
        ("import", "some-folder/", "is not a file name: converting an import path writes one file"),
        ("import", "noext", "is not a file name"),
        ("import", "exists.safetensors", "already exists; pass --force to replace it"),
    ],
)
def test_convert_output_semantics_are_explicit(tmp_path: Path, which: str, output: str, message: str) -> None:
    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    target = str(_hf_folder(tmp_path)[0]) if which == "folder" else TARGET
    r = _run("convert", target, "--init", "{}" if which == "folder" else INIT, "-o", str(tmp_path / output))
    assert r.exit_code == 1 and message in _error_line(r)
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep"
    assert not (tmp_path / "some-folder.safetensors").exists() and not (tmp_path / "noext.safetensors").exists()


def test_convert_force_replaces(tmp_path: Path) -> None:
    out = tmp_path / "ltd.safetensors"
    out.write_bytes(b"old")
    r = _run("convert", TARGET, "--init", INIT, "-o", str(out), "--force")
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() != b"old"


def test_inspect_ds_config_estimates_over_its_schedule(tmp_path: Path) -> None:
    # Problem 5: the estimate ran over 10000 steps although the schedule ends at step 100
    block = {"enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 2],
             "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                                     "schedule_config": {"require_steps": 100, "seq_per_step": 8}}}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 16, "data_efficiency": {"data_routing": {"random_ltd": block}}}))
    r = _run("inspect", TARGET, "--init", INIT, "--ds-config", str(ds), "--json")
    est = json.loads(r.stdout)["estimate"]
    assert est["steps"] == 100 and est["batch_size"] == 16
    assert est["saving"] > 0.2  # r averages ~20 of 32 on 2 of 4 layers: about a fifth, not 0.3%
    human = " ".join(_run("inspect", TARGET, "--init", INIT, "--ds-config", str(ds)).stdout.split())
    assert "Over 100 steps of 16 sequences (the DeepSpeed config's train_batch_size)" in human
    assert human.count("over 100 steps") == 1
    flags = " ".join(_run("inspect", TARGET, "--init", INIT, "--seq-len", "32").stdout.split())
    assert "of 1 sequence (assumed; pass --batch-size B for your global batch)" in flags
    both = _run("inspect", TARGET, "--init", INIT, "--ds-config", str(ds), "--min-value", "4")
    assert both.exit_code == 1 and "--min-value and --ds-config both set the schedule" in _error_line(both)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([TARGET, "--init", INIT, "--layers", "2-1"], "the range '2-1' is reversed (it ends before it starts); "
                                                      "write it low-high, e.g. '1-2'."),
        (["torch.nn:Linear", "--init", '{"in_feature": 2, "out_features": 2}'],
         "('in_feature': did you mean 'in_features'"),
        (["transformers:GPT2LMHeadModel", "--init", '{"n_layers": 2}'],
         "--init key 'n_layers' is not a setting of GPT2Config (config of 'transformers:GPT2LMHeadModel') "
         "('n_layers': did you mean 'n_layer'"),
    ],
)
def test_small_errors_say_what_to_do(args: list[str], message: str) -> None:
    r = _run("inspect", *args)
    assert r.exit_code == 1 and message in _error_line(r)


def test_json_errors_are_json_on_stdout() -> None:
    r = _run("inspect", TARGET, "--init", "[1]", "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["exit_code"] == 1 and data["error"].startswith("--init must be a JSON object")
    assert r.stderr.startswith("Error: --init must be a JSON object")


def test_help_has_short_options_and_no_bool_metavar() -> None:
    for args in (["strip", "-h"], ["convert", "--help"], ["inspect", "-h"], ["demo", "-h"]):
        r = _run(*args)
        assert r.exit_code == 0 and "<bool>" not in r.stdout and "-h, --help" in r.stdout, args
    assert _run("-V").stdout.startswith("random-ltd ")
    assert _run("convert", TARGET, "--dry-run", "true").exit_code == 2  # a flag takes no value


def test_inspect_shows_settings_as_rows(tmp_path: Path) -> None:
    out = tmp_path / "ltd.safetensors"
    assert _run("convert", TARGET, "--init", INIT, "-o", str(out), "--seq-len", "32").exit_code == 0
    text = _run("inspect", str(out)).stdout
    assert "random-LTD schedule" in text and "min_value=8" in text and '{"' not in text
