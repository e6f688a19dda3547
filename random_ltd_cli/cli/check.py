"""``random-ltd check``: build a model, convert it, and verify every wrapped layer on synthetic batches."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ._app import JsonOption, app, user_errors
from ._render import print_json, stdout_console
from .convert import (
    DsConfigOption,
    InitOption,
    LayersOption,
    LayerTypeOption,
    SeqArgOption,
    StackOption,
    TrustPickleOption,
    parse_seq_arg_options,
)

ShapeOption = Annotated[
    str | None,
    typer.Option("--shape", metavar="B,S,H",
                 help="Feed torch.randn of this shape (e.g. a module that takes hidden states: 2,16,32)."),
]
VocabSizeOption = Annotated[
    int | None,
    typer.Option("--vocab-size", min=1, metavar="V", help="Feed token ids below V (default: the model config's)."),
]
CheckSeqLenOption = Annotated[
    int | None,
    typer.Option("--seq-len", min=1, metavar="S",
                 help="Tokens per sample (default: 64, capped by the model's maximum; twice a sliding window)."),
]
CheckBatchOption = Annotated[
    int | None, typer.Option("--batch-size", min=1, metavar="B", help="Samples per synthetic batch (default 2).")
]
ReservedOption = Annotated[
    list[int] | None,
    typer.Option("--r", min=1, metavar="R", help="Reserved length to verify at; repeatable (default S/4, S/2, S-1)."),
]
WeightsOption = Annotated[
    Path | None,
    typer.Option("--weights", metavar="CKPT",
                 help="A plain checkpoint to load strictly first (default: the model's random initialisation)."),
]

_HEADERS = ("layer", "class", "result", "max error", "detail")


@app.command()
def check(
    target: Annotated[
        str, typer.Argument(help="package.module:attr, path/to/file.py:attr, or a HF model folder.", metavar="TARGET")
    ],
    init: InitOption = None,
    weights: WeightsOption = None,
    layer_type: LayerTypeOption = None,
    layers: LayersOption = "middle",
    ds_config: DsConfigOption = None,
    seq_arg: SeqArgOption = None,
    stack: StackOption = None,
    shape: ShapeOption = None,
    vocab_size: VocabSizeOption = None,
    seq_len: CheckSeqLenOption = None,
    batch_size: CheckBatchOption = None,
    r: ReservedOption = None,
    trust_pickle: TrustPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Check that random-LTD is exact on a model: convert it and verify every wrapped layer.

    The model is built on the CPU (its own random initialisation, or --weights), converted as
    'random-ltd convert' would, and run in training mode on synthetic batches (token ids, images, or
    --shape; with and without padding where it takes an attention mask) at several reserved lengths r.
    Each wrapped layer is compared with the unwrapped layer on all tokens with attention restricted to
    the kept ones. Exit 0 only when every wrapped layer is exact.

    \b
    Examples:
      random-ltd check gpt2-folder/
      random-ltd check transformers:GPT2LMHeadModel --init '{"n_layer": 4, "n_embd": 64, "n_head": 4}'
      random-ltd check my_pkg.blocks:Stack --shape 2,16,32 --r 4 --r 8
    """
    from ..model_check import check_target
    from ..synthetic import parse_shape
    from ..target import parse_init

    # Whatever the model code or its libraries print while building and running goes to stderr: stdout
    # holds the report only (deepspeed's accelerator detection, for one, logs to stdout).
    with user_errors(as_json), contextlib.redirect_stdout(sys.stderr):
        report = check_target(
            target, init=parse_init(init), weights=weights, trust_pickle=trust_pickle, layer_type=layer_type,
            layers=layers, ds_config=str(ds_config) if ds_config else None, seq_args=parse_seq_arg_options(seq_arg),
            stack=stack, shape=parse_shape(shape), vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size,
            reserved_lengths=r,
        )
    data = report.to_json()
    if not report.ok:
        data.update(error=report.summary(), exit_code=1)
    if as_json:
        print_json(json.loads(json.dumps(data, default=str)))
    else:
        _print_rows(report)
    if not report.ok:
        print(f"Error: {report.summary()}", file=sys.stderr)
        raise typer.Exit(code=1)


def _title(report: Any) -> str:
    st = report.settings
    if report.refused is not None:
        n = len(report.layers)
        return f"{report.model_class}: conversion refused ({n} {report.layer_class} layer{'s' if n != 1 else ''})"
    rs = ", ".join(str(x) for x in st.get("reserved_lengths", []))
    n = len(report.layers)
    return (f"{report.model_class}: {n} wrapped {report.layer_class} layer{'s' if n != 1 else ''}, "
            f"verified on {_batch_kinds(st)} at r = {rs} of S = {st.get('tokens_at_wrapped_layers')}")


def _batch_kinds(settings: dict[str, Any]) -> str:
    what = {"tokens": f"token ids [{settings.get('batch_size')}, {settings.get('seq_len')}]",
            "images": f"images {[settings.get('batch_size'), *settings.get('image', [])]}",
            "shape": f"randn {settings.get('shape')}"}
    text = what.get(settings.get("input", ""), "synthetic input")
    return f"{text}, unpadded and padded" if settings.get("padded_batch") else text


def _cells(row: Any) -> tuple[str, str, str, str, str]:
    err = "-" if row.max_error is None else f"{row.max_error:.1e}"
    if row.status == "exact":
        detail = f"tolerance {row.tolerance:.0e}" if row.tolerance is not None else ""
        detail = f"{detail}; {row.method}" if row.method and detail else (row.method or detail)
    else:
        detail = row.cause or row.method
    return row.name, row.layer_class, row.status, err, detail


def _terminal() -> bool:
    return sys.stdout.isatty()


def _print_rows(report: Any) -> None:
    rows = [_cells(row) for row in report.layers]
    title = _title(report)
    if _terminal():
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(title), title_justify="left")
        for h in _HEADERS:
            table.add_column(h, justify="right" if h == "max error" else "left", no_wrap=h != "detail")
        for cells in rows:
            table.add_row(*(escape(c) for c in cells))
        stdout_console().print(table)
        for line in report.notes:
            print(f"Note: {line}")
        return
    # Not a terminal: plain lines that never wrap, one per layer, columns aligned.
    widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(_HEADERS)]
    print(title)
    last = len(_HEADERS) - 1
    for cells in (_HEADERS, *rows):
        print("  ".join(c if i == last else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip())
    for line in report.notes:
        print(f"Note: {line}")
