"""Attribute reads that fall through a wrapper to the module it holds as ``random_ltd_layer``."""

from __future__ import annotations

from typing import Any

from .keys import SEGMENT

__all__ = ["InnerAttributes"]


class InnerAttributes:
    """Mixin for an ``nn.Module`` wrapper: attributes it does not have are read from its ``random_ltd_layer``."""

    _modules: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's: parameters, buffers, modules
        except AttributeError:
            if name == SEGMENT or name.startswith("__"):
                raise
            inner = self._modules.get(SEGMENT)
            if inner is None:
                raise
            return getattr(inner, name)
