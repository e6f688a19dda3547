"""``random-ltd strip``: remove the ``random_ltd_layer`` segment from a checkpoint's names (no torch here).

The Typer command only parses; :func:`._strip_run.execute` does the work, for it and for the fast path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import DryRunOption, ForceOption, JsonOption, app
from ._strip_run import PLAIN_INTERVAL_S, PROGRESS_MIN_BYTES, _ProgressBar, execute

__all__ = ["PLAIN_INTERVAL_S", "PROGRESS_MIN_BYTES", "_ProgressBar", "strip"]

OutputOption = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="OUT",
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
        help="Accept torch pickles that name globals outside torch's weights_only allowlist and the engine allowlist "
        "(random-ltd still never runs them; the output will need the same trust to load).",
    ),
]


@app.command()
def strip(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Checkpoint files or folders; a run folder strips every checkpoint inside.",
                       show_default=False, metavar="PATH"),
    ],
    output: OutputOption = None,
    in_place: InPlaceOption = False,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    trust_pickle: TrustOption = False,
    force: ForceOption = False,
) -> None:
    """Remove the '.random_ltd_layer' segment from every weight name, so plain models load the checkpoint.

    Reads .safetensors, torch.save files (.pt/.pth/.bin/.ckpt), Hugging Face folders (PEFT adapters,
    Trainer and Accelerate checkpoints too), DeepSpeed folders, and run folders holding several
    checkpoints (a Trainer output_dir, a Lightning checkpoints/ folder): each checkpoint is stripped
    on its own and every other file is copied unchanged.

    The input is not modified unless --in-place; tensor bytes are copied as they are; pickles are never run.
    An existing output file is refused unless --force; a link, FIFO or device is never replaced.
    Default outputs sit where no trainer rotates or resumes from them: out/checkpoint-500 ->
    out.stripped/checkpoint-500, checkpoints/last.ckpt -> checkpoints.stripped/last.ckpt.

    \b
    Examples:
      random-ltd strip model.safetensors
      random-ltd strip out/ --dry-run
      random-ltd strip a.pt b.pt -o plain/
    """
    if in_place and output is not None:
        raise typer.BadParameter("use either --in-place or -o/--output, not both.", param_hint="'--in-place'")
    code = execute(paths, output, in_place=in_place, dry_run=dry_run, as_json=as_json, trust_pickle=trust_pickle,
                   force=force)
    if code:
        raise typer.Exit(code)
