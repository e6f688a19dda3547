"""``random-ltd inspect``: what a checkpoint holds, or what conversion would do to a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ._app import JsonOption, app, fail, user_errors
from ._render import human_count, layers_table, print_json, stdout_console
from .convert import DsConfigOption, InitOption, LayersOption, LayerTypeOption, TrustPickleOption


@app.command()
def inspect(
    target: Annotated[
        str | None,
        typer.Argument(help="A checkpoint file or folder, or a model import path (default: checkpoints here)."),
    ] = None,
    as_json: JsonOption = False,
    init: InitOption = None,
    layer_type: LayerTypeOption = None,
    layers: LayersOption = "middle",
    ds_config: DsConfigOption = None,
    steps: Annotated[int, typer.Option("--steps", help="Steps for the compute-saving estimate.", min=1)] = 10_000,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Sequence length S (default: the model config's).", min=1)
    ] = None,
    min_value: Annotated[
        int | None, typer.Option("--min-value", help="Schedule start r (default S/4).", min=1)
    ] = None,
    require_steps: Annotated[
        int | None, typer.Option("--require-steps", help="Steps to reach S (default --steps).", min=1)
    ] = None,
    trust_pickle: TrustPickleOption = False,
) -> None:
    """Show a checkpoint's format, tensors and wrapped layers, or a model's layer stack and the saving of a schedule.

    Examples: random-ltd inspect model.safetensors; random-ltd inspect transformers:GPT2LMHeadModel --init '{}'
    """
    from ..target import is_import_path

    with user_errors():
        if target is None:
            _show_listing(Path.cwd(), as_json, trust_pickle)
        elif not Path(target).exists() and is_import_path(target):
            _show_model(target, as_json, init=init, layer_type=layer_type, layers=layers, ds_config=ds_config,
                        steps=steps, seq_len=seq_len, min_value=min_value, require_steps=require_steps)
        elif Path(target).exists():
            _show_checkpoint(Path(target), as_json, trust_pickle)
        else:
            fail(f"{target!r} is neither an existing checkpoint path nor an import path 'package.module:attr'.")


def _checkpoint_json(info: Any) -> dict[str, Any]:
    data = {
        "format": info.format,
        "path": str(info.path),
        "tensor_count": info.tensor_count,
        "parameter_count": info.parameter_count,
        "wrapped_layers": list(info.wrapped_layers),
        "metadata": info.metadata,
    }
    for extra in ("dtypes", "files"):
        if hasattr(info, extra):
            data[extra] = getattr(info, extra)
    return json.loads(json.dumps(data, default=str))


def _show_checkpoint(path: Path, as_json: bool, trust_pickle: bool) -> None:
    from ..checkpoint import inspect_checkpoint

    info = inspect_checkpoint(path, trust_pickle=trust_pickle)
    data = _checkpoint_json(info)
    if as_json:
        print_json(data)
        return
    table = Table(title=escape(f"{path} ({info.format})"), title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("tensors", str(info.tensor_count))
    table.add_row("parameters", f"{human_count(info.parameter_count)} ({info.parameter_count})")
    if data.get("dtypes"):
        table.add_row("dtypes", escape(json.dumps(data["dtypes"])))
    wrapped = list(info.wrapped_layers)
    table.add_row("wrapped layers", escape(", ".join(wrapped)) if wrapped else "none (plain checkpoint)")
    if isinstance(info.metadata, dict) and isinstance(info.metadata.get("note"), str):
        table.add_row("note", escape(info.metadata["note"]))  # e.g. a ZeRO-3 or DCP folder: how to consolidate
    settings = info.metadata.get("random_ltd") if isinstance(info.metadata, dict) else None
    if settings:
        table.add_row("random-LTD settings", escape(json.dumps(settings)))
    stdout_console().print(table)


def _show_listing(folder: Path, as_json: bool, trust_pickle: bool) -> None:
    from ..checkpoint import TORCH_SUFFIXES, detect_format, inspect_checkpoint
    from ..errors import RandomLTDError

    rows = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            try:
                detect_format(entry)
            except RandomLTDError:
                continue  # not a checkpoint folder
        elif entry.suffix.lower() not in (".safetensors", *TORCH_SUFFIXES):
            continue
        try:
            rows.append(_checkpoint_json(inspect_checkpoint(entry, trust_pickle=trust_pickle)))
        except RandomLTDError as exc:
            rows.append({"format": "unreadable", "path": str(entry), "error": str(exc), "wrapped_layers": []})
    if as_json:
        wrapped = sorted({p for r in rows for p in r.get("wrapped_layers", [])})
        print_json({"format": "listing", "path": str(folder), "checkpoints": rows, "wrapped_layers": wrapped})
        return
    if not rows:
        fail(f"no checkpoints found in {str(folder)!r}: pass a checkpoint file or folder, or a model import path.")
    table = Table(title=escape(f"checkpoints in {folder}"), title_justify="left")
    for col in ("path", "format", "tensors", "parameters", "wrapped layers"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(Path(r["path"]).name), r["format"], str(r.get("tensor_count", "-")),
                      human_count(r.get("parameter_count", 0)), str(len(r.get("wrapped_layers", []))))
    stdout_console().print(table)


def _show_model(target: str, as_json: bool, **options: Any) -> None:
    from ..target import parse_init
    from ..workflow import describe_target

    init = parse_init(options.pop("init"))
    ds = options.pop("ds_config")
    report = describe_target(target, init=init, ds_config=str(ds) if ds else None, **options)
    if as_json:
        print_json(json.loads(json.dumps(report.to_json(), default=str)))
        return
    console = stdout_console()
    console.print(layers_table(report, title=f"{report.model_class} ({human_count(report.parameter_count)} "
                                             f"parameters): {len(report.layers)} {report.layer_class} layers, "
                                             f"{len(report.wrapped_layers)} would be wrapped"))
    est = report.estimate
    if est is None:
        console.print("No compute estimate: the sequence length is unknown; pass --seq-len S.")
        return
    sch = est["schedule"]
    console.print(
        f"Schedule r = {sch['min_value']} -> {sch['max_value']} over {sch['require_steps']} steps: over "
        f"{est['steps']} steps random-LTD processes {human_count(est['layer_tokens'])} layer-tokens instead of "
        f"{human_count(est['baseline_layer_tokens'])}, an estimated compute saving of {est['saving']:.1%}."
    )
