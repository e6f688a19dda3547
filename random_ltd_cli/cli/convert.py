"""``random-ltd convert``: build a model from an import path, convert it, save the converted state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ._app import DryRunOption, ForceOption, JsonOption, app, note, sigterm_as_interrupt, user_errors
from ._render import layers_table, print_json, print_table, stdout_console

InitOption = Annotated[
    str | None,
    typer.Option("--init", help="Keyword arguments for the class or factory, as a JSON object.", metavar="JSON"),
]
LayerTypeOption = Annotated[
    str | None,
    typer.Option("--layer-type", help="Import path of the layer class to wrap (default: the layer stack).",
                 metavar="IMPORT"),
]
LayersOption = Annotated[
    str,
    typer.Option("--layers", help="Which matched layers: middle, attention (hybrid stacks), all, 1-10 or 1,3,5.",
                 metavar="SPEC"),
]
DsConfigOption = Annotated[
    Path | None,
    typer.Option("--ds-config", help="DeepSpeed JSON config whose random_ltd block gives layer ids and schedule.",
                 metavar="PATH"),
]
SeqArgOption = Annotated[
    list[str] | None,
    typer.Option("--seq-arg", help="How a layer argument lines up with the tokens, e.g. my_bias='b h q k' "
                 "(b batch, q/k query/key tokens, s tokens, others left alone; or mask, none). Repeatable.",
                 metavar="NAME=AXES"),
]
StackOption = Annotated[
    str | None,
    typer.Option("--stack", help="Encoder-decoder models: encoder (default), decoder or both.", metavar="STACK"),
]
TrustPickleOption = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow torch pickles that need arbitrary code (only for files you trust)."),
]


ScheduleSteps = Annotated[
    int | None,
    typer.Option("--steps", min=1, metavar="N",
                 help="Steps for the compute-saving estimate (default: the schedule's require_steps, else 10000)."),
]
SeqLenOption = Annotated[
    int | None,
    typer.Option("--seq-len", min=1, metavar="S", help="Sequence length S (default: the model config's)."),
]
MinValueOption = Annotated[
    int | None, typer.Option("--min-value", min=1, metavar="R", help="Schedule start r (default S/4).")
]
RequireStepsOption = Annotated[
    int | None,
    typer.Option("--require-steps", min=1, metavar="N", help="Steps for r to reach S (default --steps, else 10000)."),
]
SeqPerStepOption = Annotated[
    int | None,
    typer.Option("--seq-per-step", min=1, metavar="K", help="r grows in multiples of K (default min(16, start r))."),
]
BatchSizeOption = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, metavar="B",
                 help="Global batch size for layer-token counts (default: the DeepSpeed config's, else 1)."),
]


@app.command()
def convert(
    target: Annotated[
        str, typer.Argument(help="package.module:attr, path/to/file.py:attr, or a HF model folder.", metavar="TARGET")
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="OUT",
                     help="A HF folder converts to a folder (config and tokenizer files copied, model.safetensors); "
                          "an import path to one file (.safetensors, or .pt/.pth/.bin/.ckpt for torch.save)."),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="A plain (unconverted) checkpoint to load strictly before converting.",
                     metavar="CKPT"),
    ] = None,
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
    force: ForceOption = False,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    trust_pickle: TrustPickleOption = False,
    seq_arg: SeqArgOption = None,
    stack: StackOption = None,
) -> None:
    """Convert a model to random-LTD and save its weights under converted names, with the settings recorded.

    The output holds the model's weights under the names a converted model uses
    ('h.1.random_ltd_layer.attn...', DeepSpeed's names too) and, in its metadata, the wrapped layers and
    the schedule (the same flags as inspect, or --ds-config): load it into a model converted the same way
    to resume training. 'random-ltd strip' turns it back into plain names.

    \b
    Examples:
      random-ltd convert transformers:GPT2LMHeadModel --init '{"n_layer": 4}' -o gpt2-ltd.safetensors
      random-ltd convert my_pkg.models:Net --weights plain.pt -o ltd.safetensors --seq-len 512
      random-ltd convert gpt2-folder/ -o gpt2-ltd/
    """
    from ..target import parse_init
    from ..workflow import ScheduleOptions, convert_target, parts_text

    with user_errors(as_json), sigterm_as_interrupt():
        result = convert_target(
            target, output=output, init=parse_init(init), weights=weights, layer_type=layer_type, layers=layers,
            ds_config=str(ds_config) if ds_config else None, dry_run=dry_run, trust_pickle=trust_pickle,
            force=force, schedule=ScheduleOptions(steps, seq_len, min_value, require_steps, seq_per_step, batch_size),
            seq_args=parse_seq_arg_options(seq_arg), stack=stack,
        )
    if as_json:
        print_json(_json(result))
    else:
        title = f"{result.model_class}: {len(result.wrapped_layers)} of {len(result.layers)} {result.layer_class} " \
                "layers wrapped"
        print_table(stdout_console(), layers_table(result), title)
        if result.parts:
            stdout_console().print(parts_text(result), soft_wrap=True, markup=False)
    if weights is None and output is not None and not Path(target).is_dir():
        verb = "would save" if dry_run else "saving"
        note(f"no --weights: {verb} the model's initial weights (as {target} builds them); pass --weights CKPT "
             "to convert trained weights.")
    if dry_run:
        note("dry run: nothing written.")
    elif result.output:
        note(f"wrote {result.output} ({result.output_format}; settings in its metadata under 'random_ltd').")
    else:
        note("nothing written: pass -o OUT to save the converted state dict.")


def parse_seq_arg_options(values: list[str] | None) -> dict[str, str] | None:
    """``["my_bias=b h q k"]`` -> ``{"my_bias": "b h q k"}`` (the axes are checked by the library)."""
    from ..errors import ConfigError

    if not values:
        return None
    out: dict[str, str] = {}
    for text in values:
        name, sep, axes = text.partition("=")
        if not sep or not name.strip() or not axes.strip():
            raise ConfigError(f"--seq-arg {text!r} must read NAME=AXES, e.g. --seq-arg my_bias='b h q k'.")
        out[name.strip()] = axes.strip()
    return out


def _json(result: Any) -> dict[str, Any]:
    data = result.to_json()
    data["format"] = "model"
    return json.loads(json.dumps(data, default=str))
