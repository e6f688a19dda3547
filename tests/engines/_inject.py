"""Put one foreign global into a real checkpoint file, as a hostile editor would (tests only).

The pickle gets ``GLOBAL module name`` + ``EMPTY_TUPLE`` + ``REDUCE`` + ``POP`` just before its
``STOP``: loading it with plain pickle would import and call the global; the rest of the file is
unchanged, so everything else about it still looks as the engine wrote it.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from random_ltd_cli.checkpoint._pickle import parse


def inject_pickle(data: bytes, qualname: str) -> bytes:
    """``data`` (one pickle) with a call to ``qualname`` added before its STOP opcode."""
    assert data.endswith(b"."), "not a pickle that ends with STOP"
    body = data[:-1]
    frames = parse(data).frames
    if frames:  # protocol 4+: take STOP out of the last frame; the new opcodes follow unframed
        pos, length = frames[-1]
        assert pos + 9 + length == len(data), "the last frame does not end the pickle"
        body = data[:pos] + b"\x95" + struct.pack("<Q", length - 1) + data[pos + 9 : -1]
    module, _, name = qualname.rpartition(".")
    return body + b"c" + module.encode() + b"\n" + name.encode() + b"\n)R0."


def inject_file(path: Path, qualname: str) -> None:
    """Rewrite ``path`` in place: a torch zip checkpoint (its ``data.pkl``) or a bare pickle (DCP ``.metadata``)."""
    if path.read_bytes()[:4] != b"PK\x03\x04":
        path.write_bytes(inject_pickle(path.read_bytes(), qualname))
        return
    with zipfile.ZipFile(path) as src:
        records = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dst:
        for name, content in records:
            dst.writestr(name, inject_pickle(content, qualname) if name.endswith("/data.pkl") else content)
