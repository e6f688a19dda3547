"""Pure key renaming: remove the ``random_ltd_layer`` path segment (no torch here).

A key loses the segment only where it is a whole dotted segment::

    >>> strip_key("h.3.random_ltd_layer.mlp.weight")
    'h.3.mlp.weight'
    >>> strip_key("h.random_ltd_layers.w"), strip_key("h.my_random_ltd_layer.w")
    ('h.random_ltd_layers.w', 'h.my_random_ltd_layer.w')

Values and order are kept, nothing is ever deleted, and two keys that would become
one raise :class:`~random_ltd_cli.errors.KeyCollisionError` before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from .errors import KeyCollisionError

__all__ = ["SEGMENT", "has_segment", "rename_keys", "strip_key", "strip_mapping", "wrapped_prefixes"]

SEGMENT = "random_ltd_layer"
"""The attribute under which :class:`RandomLayerTokenDrop` keeps the wrapped layer."""

V = TypeVar("V")


def strip_key(key: str) -> str:
    """Return ``key`` without its whole-segment ``random_ltd_layer`` parts.

    A key that consists of the segment alone is returned unchanged (it would become empty).
    """
    parts = key.split(".")
    if SEGMENT not in parts:
        return key
    kept = [p for p in parts if p != SEGMENT]
    return ".".join(kept) if kept else key


def has_segment(key: str) -> bool:
    """Whether ``key`` contains ``random_ltd_layer`` as a whole dotted segment."""
    return strip_key(key) != key


def rename_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map every key to its stripped name, in input order.

    Raises:
        KeyCollisionError: two distinct keys map to the same name (both are named).
    """
    mapping: dict[str, str] = {}
    owner: dict[str, str] = {}
    for key in keys:
        new = strip_key(key)
        if new in owner and owner[new] != key:
            raise KeyCollisionError(
                f"keys {owner[new]!r} and {key!r} would both become {new!r} after removing "
                f"'.{SEGMENT}'; the checkpoint mixes wrapped and plain copies of the same weight. "
                "Remove one of them (or load it into the model and save it again), then retry."
            )
        owner[new] = key
        mapping[key] = new
    return mapping


def strip_mapping(state: Mapping[str, V]) -> dict[str, V]:
    """Return a new dict with stripped keys, the same values and the same order."""
    names = rename_keys(state.keys())
    return {names[k]: v for k, v in state.items()}


def wrapped_prefixes(keys: Iterable[str]) -> list[str]:
    """The distinct module prefixes that hold a ``random_ltd_layer`` segment, in order of appearance.

    ``["h.1.random_ltd_layer.attn.w", "h.1.random_ltd_layer.mlp.w"] -> ["h.1"]``.
    """
    seen: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part == SEGMENT:
                seen.setdefault(".".join(parts[:i]), None)
    return list(seen)
