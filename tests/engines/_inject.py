"""Put one foreign global into a real checkpoint file, as a hostile editor would (tests only).

The pickle gets ``GLOBAL module name`` + ``EMPTY_TUPLE`` + ``REDUCE`` just before its ``STOP``, the
result stored in the root dict under ``"injected"`` (torch files: ``SETITEM``, an opcode torch's
``weights_only`` loader knows) or dropped (``POP``, other pickles): loading it would import and call the
global. The rest of the file is unchanged, so everything else still looks as the engine wrote it.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from random_ltd_cli.checkpoint._pickle import parse


def inject_pickle(data: bytes, qualname: str, *, into_root_dict: bool = False) -> bytes:
    """``data`` (one pickle) with a call to ``qualname`` added before its STOP opcode."""
    assert data.endswith(b"."), "not a pickle that ends with STOP"
    body = data[:-1]
    frames = parse(data).frames
    if frames:  # protocol 4+: take STOP out of the last frame; the new opcodes follow unframed
        pos, length = frames[-1]
        assert pos + 9 + length == len(data), "the last frame does not end the pickle"
        body = data[:pos] + b"\x95" + struct.pack("<Q", length - 1) + data[pos + 9 : -1]
    module, _, name = qualname.rpartition(".")
    call = b"c" + module.encode() + b"\n" + name.encode() + b"\n)R"
    if into_root_dict:
        return body + b"X" + struct.pack("<I", 8) + b"injected" + call + b"s."
    return body + call + b"0."


def inject_file(path: Path, qualname: str) -> None:
    """Rewrite ``path`` in place: a torch zip checkpoint (its ``data.pkl``) or a bare pickle (DCP ``.metadata``)."""
    tmp = path.with_name(path.name + ".tmp")  # a new file (tensors memory-mapped from the old one stay valid)
    if path.read_bytes()[:4] != b"PK\x03\x04":
        tmp.write_bytes(inject_pickle(path.read_bytes(), qualname))
    else:
        with zipfile.ZipFile(path) as src:
            records = [(info.filename, src.read(info)) for info in src.infolist()]
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as dst:
            for name, content in records:
                if name.endswith("/data.pkl"):
                    content = inject_pickle(content, qualname, into_root_dict=True)
                dst.writestr(name, content)
    os.replace(tmp, path)
