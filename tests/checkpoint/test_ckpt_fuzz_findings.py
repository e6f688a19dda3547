"""Regression tests for what the all-format fuzz suite (``fuzz_all.py``) found: inputs that random-ltd
accepted and rewrote although torch (or pickle, for DCP metadata) cannot load them correctly."""

from __future__ import annotations

import pickle

import pytest

from random_ltd_cli.checkpoint._pickle import PickleError, parse

# --- pickles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [b"\x80\x02\x88)R.", b"\x80\x02c__builtin__\nset\nNR.", b"\x80\x02)\x88\x81."])
def test_a_call_of_a_non_global_or_with_non_tuple_arguments_is_malformed(stream: bytes) -> None:
    """REDUCE of a bool (``'bool' object is not callable`` in pickle.load) was accepted in DCP metadata."""
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises: it cannot load these
        pickle.loads(stream)
    with pytest.raises(PickleError, match="only a global called with a tuple"):
        parse(stream)


def test_an_unknown_protocol_is_malformed() -> None:
    with pytest.raises(ValueError, match="unsupported pickle protocol"):
        pickle.loads(b"\x80\x06N.")
    with pytest.raises(PickleError, match="unsupported pickle protocol 6"):
        parse(b"\x80\x06N.")
    assert parse(b"\x80\x05N.").root is None
