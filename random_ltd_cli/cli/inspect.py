"""``random-ltd inspect``: what a checkpoint holds, or what conversion would do to a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ._app import JsonOption, app, fail, note, user_errors
from ._plain import json_ready, text
from ._render import human_count, layers_table, print_json, print_table, stdout_console
from .convert import (
    BatchSizeOption,
    DsConfigOption,
    InitOption,
    LayersOption,
    LayerTypeOption,
    MinValueOption,
    RequireStepsOption,
    ScheduleSteps,
    SeqArgOption,
    SeqLenOption,
    SeqPerStepOption,
    StackOption,
    TrustPickleOption,
    parse_seq_arg_options,
)


@app.command()
def inspect(
    target: Annotated[
        str | None,
        typer.Argument(help="A checkpoint file or folder (a run folder lists each checkpoint), or a model import "
                            "path (default: the working folder).", metavar="TARGET"),
    ] = None,
    as_json: JsonOption = False,
    init: InitOption = None,
    layer_type: LayerTypeOption = None,
    layers: LayersOption = "middle",
    ds_config: DsConfigOption = None,
    steps: ScheduleSteps = None,
    seq_len: SeqLenOption = None,
    min_value: MinValueOption = None,
    require_steps: RequireStepsOption = None,
    seq_per_step: SeqPerStepOption = None,
    batch_size: BatchSizeOption = None,
    trust_pickle: TrustPickleOption = False,
    seq_arg: SeqArgOption = None,
    stack: StackOption = None,
) -> None:
    """Show a checkpoint's format, tensors and wrapped layers, or a model's layer stack and the saving of a schedule.

    \b
    Examples:
      random-ltd inspect model.safetensors
      random-ltd inspect out/                  (a Trainer output_dir: each checkpoint)
      random-ltd inspect transformers:GPT2LMHeadModel --init '{"n_layer": 4}' --ds-config ds.json
    """
    from ..checkpoint._fs import path_exists
    from ..target import is_import_path

    with user_errors(as_json):
        if target is None:
            _show_checkpoint(Path.cwd(), as_json, trust_pickle, here=True)
        elif not path_exists(target) and is_import_path(target):
            _show_model(target, as_json, init=init, layer_type=layer_type, layers=layers, ds_config=ds_config,
                        steps=steps, seq_len=seq_len, min_value=min_value, require_steps=require_steps,
                        seq_per_step=seq_per_step, batch_size=batch_size,
                        seq_args=parse_seq_arg_options(seq_arg), stack=stack)
        elif path_exists(target):  # also a name too long or a FIFO: the library says what is wrong
            _show_checkpoint(Path(target), as_json, trust_pickle)
        else:
            fail(f"{target!r} is neither an existing checkpoint path nor an import path 'package.module:attr'.")


def _checkpoint_json(info: Any) -> dict[str, Any]:
    """The report as plain data, bounded: metadata from a pickle may be nested without limit."""
    data: dict[str, Any] = json_ready(info.to_dict())
    return data


def _show_checkpoint(path: Path, as_json: bool, trust_pickle: bool, here: bool = False) -> None:
    from ..checkpoint import inspect_checkpoint
    from ..errors import CheckpointError

    try:
        info = inspect_checkpoint(path, trust_pickle=trust_pickle)
    except CheckpointError:
        if here:
            fail(f"no checkpoints found in {str(path)!r}: pass a checkpoint file or folder, or a model import path.")
        raise
    if info.entries and all(e.format == "unreadable" for e in info.entries):
        _nothing_readable(info)
    data = _checkpoint_json(info)
    if as_json:
        print_json(data)
        return
    console = stdout_console()
    if info.entries:
        count = f"{len(info.entries)} checkpoint{'s' if len(info.entries) != 1 else ''}"
        print_table(console, _run_table(info), text(f"{info.path} ({_kind(info)}): {count}"))
        for e in info.entries:
            if e.format == "unreadable":
                console.print(escape(text(f"{e.path.name}: {e.metadata['error']}")), soft_wrap=True)
    else:
        print_table(console, _info_table(info, data), f"{data['path']} ({_kind(info)})")
    if data["side_files"]:
        other = ", ".join(f"{name} ({role})" for name, role in data["side_files"].items())
        console.print(escape(f"other files (copied unchanged by strip): {other}"), soft_wrap=True)


def _nothing_readable(info: Any) -> None:
    """Every candidate in a folder failed to read: each reason on stderr, then one ``Error:`` line, exit 1."""
    for e in info.entries:
        note(f"{e.path.name}: {e.metadata['error']}")
    n = len(info.entries)
    fail(f"nothing readable in {str(info.path)!r}: {'the' if n == 1 else 'all'} {n} candidate "
         f"file{'s' if n != 1 else ''} failed to read (reasons above). Pass a checkpoint file or folder "
         "that random-ltd can read.")


def _kind(info: Any, short: bool = False) -> str:
    if info.kind in ("file", "hf-model", "deepspeed", "run", "error"):
        return info.format
    return info.kind if short else f"{info.format}, {info.kind}"


def _info_table(info: Any, data: dict[str, Any]) -> Table:
    table = Table(show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("tensors", str(info.tensor_count))
    table.add_row("parameters", f"{human_count(info.parameter_count)} ({info.parameter_count})")
    if data.get("dtypes"):
        table.add_row("dtypes", escape(", ".join(f"{k}: {v}" for k, v in data["dtypes"].items())))
    wrapped = list(data["wrapped_layers"])  # from data: user strings made printable
    table.add_row("wrapped layers", escape(", ".join(wrapped)) if wrapped else "none (plain checkpoint)")
    metadata = data["metadata"]
    if isinstance(metadata, dict) and isinstance(metadata.get("note"), str):
        table.add_row("note", escape(metadata["note"]))  # e.g. a ZeRO-3 or DCP folder: how to consolidate
    settings = metadata.get("random_ltd") if isinstance(metadata, dict) else None
    if isinstance(settings, dict):
        for key, value in settings.items():
            if key == "wrapped_layers":
                continue  # shown above
            shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
            table.add_row(escape(f"random-LTD {key}"), escape(str(shown)))
    elif settings:
        table.add_row("random-LTD settings", escape(str(settings)))
    if info.pickles:
        table.add_row("pickle safety", escape(_pickle_lines(info.pickles)))
    return table


def _pickle_lines(pickles: dict[str, Any]) -> str:
    """One line per verdict: the verdict, then the files that have it (the first few)."""
    groups: dict[str, list[str]] = {}
    for name, verdict in pickles.items():
        groups.setdefault(verdict.verdict, []).append(name)
    lines = []
    for verdict, names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"{verdict} ({shown})")
    return "\n".join(lines)


def _run_table(info: Any) -> Table:
    table = Table()
    for col in ("checkpoint", "format or kind", "tensors", "parameters", "wrapped layers", "pickles"):
        table.add_column(col, no_wrap=col in ("checkpoint", "format or kind"))
    for e in info.entries:
        wrapped = [text(w) for w in e.wrapped_layers]
        shown = f"{len(wrapped)} ({_span(wrapped)})" if wrapped else "none"
        table.add_row(escape(text(e.path.name)), escape(_kind(e, short=True)), str(e.tensor_count),
                      human_count(e.parameter_count), escape(shown), _pickle_short(e.pickles))
    return table


def _pickle_short(pickles: dict[str, Any]) -> str:
    """The worst verdict of a checkpoint's pickles: ``unsafe``, ``engine classes``, ``dcp metadata``, ``safe``, or -."""
    shorts = {v.short for v in pickles.values()}
    return next((s for s in ("unsafe", "engine classes", "dcp metadata", "safe") if s in shorts), "-")


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def _show_model(target: str, as_json: bool, **options: Any) -> None:
    from ..target import parse_init
    from ..workflow import describe_target, parts_text

    init = parse_init(options.pop("init"))
    ds = options.pop("ds_config")
    report = describe_target(target, init=init, ds_config=str(ds) if ds else None, **options)
    if as_json:
        print_json(json.loads(json.dumps(report.to_json(), default=str)))
        return
    console = stdout_console()
    print_table(console, layers_table(report), f"{report.model_class} ({human_count(report.parameter_count)} "
                                               f"parameters): {len(report.layers)} {report.layer_class} layers, "
                                               f"{len(report.wrapped_layers)} would be wrapped")
    if report.parts:
        console.print(parts_text(report), soft_wrap=True, markup=False)
    est = report.estimate
    if est is None:
        console.print("No compute estimate: the sequence length is unknown; pass --seq-len S.")
        return
    sch = est["schedule"]
    console.print(
        f"Schedule: r from {sch['min_value']} to {sch['max_value']} over {sch['require_steps']} steps "
        f"(in multiples of {sch['seq_per_step']}). Over {est['steps']} steps of {est['batch_size']} "
        f"sequence{'s' if est['batch_size'] != 1 else ''} ({est['batch_source']}), random-LTD processes "
        f"{human_count(est['layer_tokens'])} layer-tokens instead of {human_count(est['baseline_layer_tokens'])}: "
        f"an estimated compute saving of {est['saving']:.1%} in the layer stack.",
        soft_wrap=True,
    )
