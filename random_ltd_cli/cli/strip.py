"""``random-ltd strip``: remove the ``random_ltd_layer`` segment from a checkpoint's names (no torch here)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import DryRunOption, JsonOption, app, user_errors
from ._strip_run import PROGRESS_MIN_BYTES, _ProgressBar, render, run

__all__ = ["PROGRESS_MIN_BYTES", "_ProgressBar", "strip"]

OutputOption = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        help="Where to write (default: beside the input, e.g. model.stripped.safetensors or ckpt-dir.stripped/).",
        show_default=False,
    ),
]
InPlaceOption = Annotated[
    bool, typer.Option("--in-place", help="Rewrite the input itself (safetensors: only its header).")
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Accept torch pickles that name globals outside torch's weights_only allowlist "
        "(random-ltd still never runs them; the output will need the same trust to load).",
    ),
]


@app.command()
def strip(
    path: Annotated[Path, typer.Argument(help="A checkpoint file or folder.", show_default=False)],
    output: OutputOption = None,
    in_place: InPlaceOption = False,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    trust_pickle: TrustOption = False,
) -> None:
    """Remove the '.random_ltd_layer' segment from every weight name, so plain models load the checkpoint.

    Reads .safetensors, torch.save files (.pt/.pth/.bin/.ckpt), Hugging Face folders and DeepSpeed folders.

    The input is not modified unless --in-place; tensor bytes are copied as they are; pickles are never run.

    Examples: random-ltd strip model.safetensors; random-ltd strip ckpt/ -o plain/; random-ltd strip x.pt --dry-run
    """
    if in_place and output is not None:
        raise typer.BadParameter("use either --in-place or -o/--output, not both.", param_hint="'--in-place'")
    with user_errors():
        report = run(path, output, in_place=in_place, dry_run=dry_run, trust_pickle=trust_pickle)
    render(report, as_json)
