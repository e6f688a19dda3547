"""Where ``random-ltd convert`` writes: the output checks, tied weights stored once, a Hugging Face folder.

No torch at import; nothing here writes before every check has passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

__all__ = ["check_output", "output_format", "same_file", "untied", "write_folder"]


def check_output(out: Path, folder_in: bool, force: bool) -> Path:
    """Refuse an output that does not fit the input (folder in, folder out) or that exists without ``force``."""
    from .checkpoint import TORCH_SUFFIXES

    weights_suffix = out.suffix.lower() in (".safetensors", *TORCH_SUFFIXES)
    if folder_in and weights_suffix:
        raise ConfigError(
            f"-o {str(out)!r} names a file, but a Hugging Face folder converts to a folder (config.json and "
            "model.safetensors); pass a folder path such as 'gpt2-ltd/'."
        )
    if not folder_in:
        if out.is_dir() or str(out).endswith(("/", "\\")) or not out.suffix:
            raise ConfigError(
                f"-o {str(out)!r} is not a file name: converting an import path writes one file; pass e.g. "
                f"'{out / 'model.safetensors'}' (or .pt for torch.save)."
            )
        output_format(out)
    if out.exists() and not force:
        raise CheckpointError(f"the output {out} already exists; pass --force to replace it, or choose another -o.")
    if out.exists() and folder_in and not out.is_dir():
        raise CheckpointError(f"the output {out} is a file; a folder is written here. Choose another -o.")
    if not out.parent.is_dir():
        raise CheckpointError(f"the output folder {out.parent} does not exist; create it or choose another -o.")
    return out


def untied(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The state dict with each tensor stored once (the first name wins, as ``save_pretrained`` keeps it).

    Returns the kept tensors and ``{dropped name: kept name}``.
    """
    kept: dict[str, Any] = {}
    first: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()))
        if tensor.numel() and view in first:
            tied[name] = first[view]
            continue
        first.setdefault(view, name)
        kept[name] = tensor.detach()
    return kept, tied


def write_folder(source: Path, out: Path, state: dict[str, Any], metadata: dict[str, str]) -> None:
    """``out/`` with the source's non-weight top-level files and ``model.safetensors``, atomically."""
    import os
    import shutil
    import tempfile

    from .checkpoint import save_state_dict
    from .checkpoint._atomic import atomic_dir
    from .checkpoint._run import file_role

    def fill(folder: Path) -> None:
        for path in sorted(source.iterdir()):
            is_weights = path.suffix in (".safetensors", ".bin", ".pt", ".pth") and file_role(path.name) is None
            if path.is_file() and not is_weights and not path.name.endswith(".index.json"):
                shutil.copy2(path, folder / path.name)
                fd = os.open(folder / path.name, os.O_RDONLY)
                try:
                    os.fsync(fd)  # the folder is renamed into place whole: every file in it is durable
                finally:
                    os.close(fd)
        save_state_dict(state, folder / "model.safetensors", metadata=metadata)

    if not out.exists():
        with atomic_dir(out) as tmp:
            fill(tmp)
        return
    new = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".new"))
    new.rmdir()
    with atomic_dir(new) as tmp:
        fill(tmp)
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def output_format(path: Path) -> str:
    from .checkpoint import TORCH_SUFFIXES

    if path.suffix.lower() in TORCH_SUFFIXES:
        return "torch"
    if path.suffix.lower() in (".safetensors", ""):
        return "safetensors"
    raise ConfigError(f"-o {str(path)!r}: unknown file type {path.suffix!r}; use .safetensors (default) or .pt.")


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
