"""``random-ltd strip``: remove the ``random_ltd_layer`` segment from a checkpoint's names (no torch here)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import INTERRUPTED, DryRunOption, JsonOption, app, fail, user_errors
from ._strip_run import NOTHING_WRITTEN, PROGRESS_MIN_BYTES, _ProgressBar, render, run

__all__ = ["PROGRESS_MIN_BYTES", "_ProgressBar", "strip"]

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
        help="Accept torch pickles that name globals outside torch's weights_only allowlist "
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
) -> None:
    """Remove the '.random_ltd_layer' segment from every weight name, so plain models load the checkpoint.

    Reads .safetensors, torch.save files (.pt/.pth/.bin/.ckpt), Hugging Face folders (PEFT adapters,
    Trainer and Accelerate checkpoints too), DeepSpeed folders, and run folders holding several
    checkpoints (a Trainer output_dir, a Lightning checkpoints/ folder): each checkpoint is stripped
    on its own and every other file is copied unchanged.

    The input is not modified unless --in-place; tensor bytes are copied as they are; pickles are never run.
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
    written: list[str] = []
    with user_errors(as_json, interrupted=NOTHING_WRITTEN):
        if len(paths) > 1 and output is not None and not output.is_dir():
            fail(f"-o {str(output)!r} must be an existing folder when stripping {len(paths)} inputs; "
                 "create it, or strip one input at a time.")
        # With several inputs, each goes into the -o folder under its own name.
        outputs = [output / (p.name or p.resolve().name) if output is not None and len(paths) > 1 else output
                   for p in paths]
        try:
            reports = run(paths, outputs, in_place=in_place, dry_run=dry_run, trust_pickle=trust_pickle,
                          written=written)
        except KeyboardInterrupt:
            if not written:
                raise
            fail(f"interrupted; already written: {', '.join(written)}; nothing else was written.",
                 code=INTERRUPTED)
    render(reports, as_json)
