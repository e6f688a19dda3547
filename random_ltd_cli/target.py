"""Resolve a CLI target to a model: ``package.module:attr``, ``path/to/file.py:attr`` or a Hugging Face folder.

``attr`` may be an ``nn.Module`` subclass (instantiated with the ``--init`` keyword arguments),
a factory function (called with them) or a module instance. A Hugging Face model class given
with ``--init`` is built from its config class (``Cls(Cls.config_class(**init))``). A local folder
with ``config.json`` builds the architecture the config names, with its weights when the folder
has them, without network access. Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, TargetImportError

__all__ = ["is_import_path", "load_attribute", "parse_init", "resolve_model"]


def is_import_path(text: str) -> bool:
    """Whether ``text`` looks like ``module:attr`` (and is not an existing path)."""
    return ":" in text and not Path(text).exists() and not (len(text) > 1 and text[1] == ":" and text[0].isalpha())


def parse_init(text: str | None) -> dict[str, Any]:
    """Parse ``--init`` JSON into keyword arguments.

    Raises:
        ConfigError: not JSON, or not a JSON object.
    """
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--init is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}; "
            """pass an object such as '{"n_layer": 4}'."""
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"--init must be a JSON object of keyword arguments, got {type(value).__name__}: {text!r}.")
    return value


def load_attribute(spec: str) -> Any:
    """Import ``package.module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted).

    Raises:
        TargetImportError: which part failed (the module, or the attribute) and why.
    """
    if ":" not in spec:
        raise TargetImportError(
            f"{spec!r} is not an import path: use 'package.module:attr' or 'path/to/file.py:attr'."
        )
    module_part, _, attr_part = spec.rpartition(":")
    if not module_part or not attr_part:
        raise TargetImportError(f"{spec!r} is not an import path: both the module and the attribute are needed.")
    module = _import_module(module_part)
    obj: Any = module
    walked = module_part
    for name in attr_part.split("."):
        if not hasattr(obj, name):
            raise TargetImportError(
                f"cannot resolve {spec!r}: {walked!r} has no attribute {name!r}"
                f"{_suggest(obj, name)}."
            )
        obj = getattr(obj, name)
        walked = f"{walked}:{name}" if walked == module_part else f"{walked}.{name}"
    return obj


def _import_module(module_part: str) -> Any:
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise TargetImportError(f"cannot import {module_part!r}: no such file.")
        name = f"_random_ltd_target_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TargetImportError(f"cannot import {module_part!r}: not a Python file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise TargetImportError(f"importing {module_part!r} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    _working_folder_on_path()
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_part
        where = "" if missing == module_part else f" (while importing {module_part!r})"
        raise TargetImportError(
            f"cannot import module {module_part!r}: no module named {missing!r}{where}; check the spelling, "
            "install the package, or run from the folder that contains it."
        ) from None
    except Exception as exc:
        raise TargetImportError(f"importing module {module_part!r} failed: {type(exc).__name__}: {exc}") from exc


def _working_folder_on_path() -> None:
    """Import from the working folder first, as ``python -m`` does (console scripts do not)."""
    cwd = os.getcwd()
    if not any(entry in ("", ".", cwd) for entry in sys.path):
        sys.path.insert(0, cwd)


def _suggest(obj: Any, name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, [n for n in dir(obj) if not n.startswith("_")], n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def resolve_model(target: str, init: dict[str, Any] | None = None) -> Any:
    """Build the ``nn.Module`` a CLI target names (see the module docstring).

    Raises:
        TargetImportError: the import path does not resolve.
        ConfigError: the attribute is not a module, class or factory; ``init`` does not fit.
    """
    from torch import nn

    init = dict(init or {})
    path = Path(target)
    if path.is_dir():
        return _from_hf_folder(path, init)
    obj = load_attribute(target)
    if isinstance(obj, nn.Module):
        if init:
            raise ConfigError(f"{target!r} is a module instance; --init only applies to a class or a factory.")
        return obj
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        config_class = getattr(obj, "config_class", None)
        if config_class is not None and init and _is_hf_model_class(obj):
            _check_config_keys(config_class, init, target)
            return obj(_call_checked(config_class, init, f"{config_class.__name__} (config of {target!r})"))
        return _call_checked(obj, init, target)
    if callable(obj) and not isinstance(obj, type):
        model = _call_checked(obj, init, target)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"factory {target!r} returned {type(model).__name__}, not an nn.Module.")
        return model
    raise ConfigError(
        f"{target!r} is a {type(obj).__name__}, not an nn.Module class, a factory function or a module instance."
    )


def _is_hf_model_class(cls: type) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in cls.__mro__)


def _call_checked(fn: Any, kwargs: dict[str, Any], what: str) -> Any:
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        hint = ""
        with contextlib.suppress(TypeError, ValueError):
            known = list(inspect.signature(fn).parameters)
            hint = "".join(_close(key, known) for key in kwargs if key not in known)
        raise ConfigError(f"--init does not fit {what}: {exc}{hint}; its signature is {_signature(fn)}.") from None
    except ValueError:
        pass  # no signature to check (builtins): let the call decide
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"building {what} with --init {json.dumps(kwargs)} failed: {exc}") from exc


def _close(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=3)
    return f" ({key!r}: did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _check_config_keys(config_class: Any, init: dict[str, Any], target: str) -> None:
    """Refuse ``--init`` keys that a Hugging Face config would silently keep as unknown attributes."""
    try:
        known = set(config_class().to_dict()) | set(inspect.signature(config_class).parameters)
        known |= set(getattr(config_class, "attribute_map", {}) or {}) | {"attn_implementation", "torch_dtype"}
        for base in config_class.__mro__:
            if "__init__" in vars(base):
                known |= set(inspect.signature(base.__init__).parameters) - {"self", "kwargs"}
    except Exception:  # a config that cannot be built without arguments: let the call decide
        return
    unknown = [key for key in init if key not in known]
    if unknown:
        hints = "".join(_close(key, sorted(known)) for key in unknown)
        raise ConfigError(
            f"--init key {', '.join(repr(k) for k in unknown)} is not a setting of {config_class.__name__} "
            f"(config of {target!r}){hints}; check the spelling against the config's documentation."
        )


def _signature(fn: Any) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(unknown)"


def _from_hf_folder(folder: Path, init: dict[str, Any]) -> Any:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise TargetImportError(
            f"folder {str(folder)!r} has no config.json: give a Hugging Face model folder, or an import path "
            "'package.module:attr'."
        )
    try:
        import transformers
    except ImportError:
        raise TargetImportError("building a model from a folder needs transformers: pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, **init)
    except Exception as exc:
        raise ConfigError(f"cannot read {str(config_file)!r}: {exc}") from exc
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        cls = transformers.AutoModel
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    try:
        if weights:
            return cls.from_pretrained(str(folder), config=config, local_files_only=True)
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except Exception as exc:
        raise ConfigError(f"cannot build {getattr(cls, '__name__', cls)} from {str(folder)!r}: {exc}") from exc
