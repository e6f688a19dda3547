"""Fuzz generators for torch files: ZIP archives, legacy (non-zip) files, bare pickles; hostile payloads.

Every generator takes a seeded ``random.Random`` and the case folder, writes one file and returns
``(path, hostile)``: ``hostile`` is true when the file carries a payload that would create the
case's canary file (``work / "CANARY"``) if it were ever unpickled without restriction. Nothing here
runs a pickle; the driver (``fuzz_all.py``) decides what a clean outcome is.

Mutations are structural: pickle opcodes (deleted, duplicated, replaced, their length and integer
arguments changed, globals renamed, nesting inserted, truncated), ZIP records (duplicated, renamed,
dropped, compressed, CRCs, sizes, flags and methods changed, trailing bytes) and the legacy layout
(any of its five pickles, storage element counts, truncation).
"""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
import random
import struct
import zlib
from pathlib import Path
from typing import Any

from .hostile_files import legacy_torch_save, raw_zip, split_legacy, write_zip, zip_entries, zip_torch_save

CANARY = "CANARY"
WORDS = ["model", "h", "0", "1", "attn", "mlp", "weight", "bias", "random_ltd_layer", "ln", "module"]
DTYPES = ["float32", "float16", "bfloat16", "int64", "int8", "uint8", "bool", "float64"]

# names a mutation may put into a GLOBAL: allowed, look-alikes, and dangerous ones
GLOBAL_NAMES = [
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
    ("torch", "os.system"), ("collections", "OrderedDictX"), ("torch._utils", "_rebuild_tensor_v2.x"),
    ("os", "system"), ("posix", "system"), ("builtins", "exec"), ("__builtin__", "eval"), ("torch", "load"),
    ("torch.storage", "_load_from_bytes"), ("builtins", "getattr"), ("", ""), ("torch\n", "x"), ("a" * 300, "b"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"), ("deepspeed.runtime.fp16.loss_scaler", "LossScalerX"),
    ("torch.distributed.checkpoint.metadata", "Metadata"), ("pathlib", "PosixPath"),
]


# --- valid inputs ----------------------------------------------------------------------------------


def random_state(rng: random.Random) -> dict[str, Any]:
    """A small state dict: 1 to 4 tensors of mixed dtypes, names with and without wrapper segments."""
    import torch

    state: dict[str, Any] = {}
    for _ in range(rng.randint(1, 4)):
        name = ".".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
        dtype = getattr(torch, rng.choice(DTYPES))
        state[name] = (torch.randint(0, 2, shape) if dtype == torch.bool else torch.randint(-5, 5, shape)).to(dtype)
    if rng.random() < 0.3 and state:  # a shared storage: a view of another tensor
        first = next(iter(state.values()))
        state[rng.choice(WORDS) + ".view"] = first.view(-1)[: max(first.numel() // 2, 0)]
    return state


def random_object(rng: random.Random) -> Any:
    """What torch.save is given: a state dict, or one nested as trainers and engines nest it."""
    state = random_state(rng)
    shape = rng.randrange(4)
    if shape == 0:
        return state
    if shape == 1:
        return {"module": state, "param_shapes": [{k: tuple(v.shape) for k, v in state.items()}], "global_steps": 3}
    if shape == 2:
        return {"state_dict": state, "epoch": 1, "random_ltd": {"layers": [0, 1]}}
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}


# --- pickle mutations ------------------------------------------------------------------------------


def _ops(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each opcode of a well-formed pickle."""
    spans: list[tuple[int, int]] = []
    try:
        ops = [pos for _op, _arg, pos in pickletools.genops(io.BytesIO(data))]
    except Exception:  # already broken: treat it as one blob
        return [(0, len(data))]
    ops.append(len(data))
    spans = [(ops[i], ops[i + 1]) for i in range(len(ops) - 1)]
    return spans


def system_payload(canary: Path, rng: random.Random, form: int | None = None) -> bytes:
    """Opcodes (no PROTO, no STOP) whose execution creates ``canary``; leaves one value on the stack."""
    cmd = f"touch {canary}".encode()
    code = f"__import__('os').system('touch {canary}')".encode()

    def s(text: bytes) -> bytes:
        return b"X" + struct.pack("<I", len(text)) + text

    def sg(module: str, name: str) -> bytes:
        return s(module.encode()) + s(name.encode()) + b"\x93"

    forms = [
        b"cos\nsystem\n" + s(cmd) + b"\x85R",  # GLOBAL + REDUCE
        b"cposix\nsystem\n" + s(cmd) + b"\x85R",
        b"cbuiltins\nexec\n" + s(code) + b"\x85R",
        b"c__builtin__\neval\n" + s(code) + b"\x85R",  # Python 2 name, mapped to builtins.eval
        sg("torch", "os.system") + s(cmd) + b"\x85R",  # STACK_GLOBAL through torch.os
        sg("os", "system") + s(cmd) + b"\x85R",
        b"(" + s(cmd) + b"ios\nsystem\n",  # INST
        b"(cos\nsystem\n" + s(cmd) + b"o",  # OBJ
        b"cbuiltins\ngetattr\ncbuiltins\n__import__\n" + s(b"os") + b"\x85R" + s(b"system") + b"\x86R" + s(cmd)
        + b"\x85R",
        # torch's own unsafe loader, given a nested legacy file whose first pickle runs the command
        b"ctorch.storage\n_load_from_bytes\n" + _bytes_arg(_nested(cmd)) + b"\x85R",
    ]
    return forms[form] if form is not None else rng.choice(forms)


PAYLOAD_FORMS = 10
"""How many payload forms :func:`system_payload` knows (GLOBAL/STACK_GLOBAL/INST/OBJ, os, posix, exec, eval...)."""


def _bytes_arg(raw: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(raw)) + raw


def _nested(cmd: bytes) -> bytes:
    """A legacy torch file whose magic-number pickle runs ``cmd`` (what ``_load_from_bytes`` would load)."""
    return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."


def with_payload(data: bytes, canary: Path, rng: random.Random, form: int | None = None) -> bytes:
    """``data`` with a payload inserted after PROTO (popped) or before STOP (popped)."""
    payload = system_payload(canary, rng, form) + b"0"
    if data[:1] == b"\x80" and b"\x93" in payload:  # STACK_GLOBAL resolves dotted names from protocol 4 on
        data = b"\x80\x04" + data[2:]
    if data[:1] == b"\x80" and rng.random() < 0.6:
        return data[:2] + payload + data[2:]
    if data.endswith(b"."):
        return data[:-1] + payload + b"."
    return payload + data


def mutate_pickle(rng: random.Random, data: bytes) -> bytes:
    """One structural change to a pickle's opcodes."""
    spans = _ops(data)
    op = rng.randrange(10)
    i = rng.randrange(len(spans))
    start, end = spans[i]
    if op == 0:  # delete an opcode
        return data[:start] + data[end:]
    if op == 1:  # duplicate one
        return data[:end] + data[start:end] + data[end:]
    if op == 2:  # replace the opcode byte
        codes = b"().0NRXbcdehjqrst}]\x85\x86\x87\x8c\x93\x94\x95\x81\x92\x8a\x8bBC"
        return data[:start] + bytes([rng.choice(codes)]) + data[start + 1 :]
    if op == 3:  # an integer or length argument
        code = data[start : start + 1]
        width = {b"X": 4, b"B": 4, b"J": 4, b"j": 4, b"r": 4, b"\x8e": 8, b"\x8d": 8, b"\x8c": 1, b"C": 1,
                 b"K": 1, b"M": 2, b"h": 1, b"q": 1, b"\x8a": 1, b"\x8b": 4, b"\x96": 8}.get(code)  # fmt: skip
        if width is None or end - start <= width:
            return data[:end] + rng.choice([b"\x8e" + struct.pack("<Q", 2**40), b"\x8d" + struct.pack("<Q", 2**62),
                                            b"\x8b\xff\xff\xff\x7f", b"j\xff\xff\xff\xff"]) + data[end:]
        value = rng.choice([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), rng.randrange(2**(8 * width))])
        return data[: start + 1] + value.to_bytes(width, "little") + data[start + 1 + width :]
    if op == 4:  # rename or insert a global
        module, name = rng.choice(GLOBAL_NAMES)
        glob = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        if data[start : start + 1] == b"c":
            return data[:start] + glob + data[end:]
        return data[:start] + glob + b"0" + data[start:]
    if op == 5:  # nesting: tuples (hashable) or lists/dicts, popped again
        depth = rng.choice([10, 999, 1001, 5000, 100_000])
        kind = rng.randrange(3)
        nest = b"N" + b"\x85" * depth if kind == 0 else b"]" * depth + b"a" * (depth - 1) if kind == 1 else \
            b"(" * min(depth, 20_000) + b"N" + b"t" * min(depth, 20_000)
        return data[:start] + nest + b"0" + data[start:]
    if op == 6:  # truncate
        return data[: rng.randrange(len(data) + 1)]
    if op == 7:  # protocol byte
        return b"\x80" + bytes([rng.choice([0, 1, 2, 3, 4, 5, 6, 255])]) + data[2:] if data[:1] == b"\x80" else data
    if op == 8:  # a memo reference out of range or before its PUT
        return data[:start] + rng.choice([b"h\xff", b"j\xff\xff\xff\xff", b"g99999\n", b"h\x00"]) + b"0" + data[start:]
    return data[:start] + bytes([rng.randrange(256)]) + data[start + 1 :]  # a random byte


# --- torch ZIP archives ----------------------------------------------------------------------------


def _records(entries: list[tuple[str, bytes]]) -> list[tuple[str, int, bytes, int, int]]:
    return [(n, 0, c, len(c), zlib.crc32(c)) for n, c in entries]


def _deflate(content: bytes) -> bytes:
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    return comp.compress(content) + comp.flush()


@functools.cache
def _zero_block() -> bytes:
    """1 MiB of zeros as a raw deflate block ending in a full flush (blocks like it can follow one another)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    return comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)


def _bomb(body: bytes, mib: int) -> tuple[bytes, int, int]:
    """``body`` then ``mib`` MiB of zeros, deflated: (compressed bytes, inflated size, CRC-32), built in no time."""
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    head = comp.compress(body) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    crc, zeros = zlib.crc32(body), bytes(1 << 20)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return head + _zero_block() * mib + tail, len(body) + (mib << 20), crc


def mutate_zip(rng: random.Random, entries: list[tuple[str, bytes]], path: Path, canary: Path) -> bool:
    """Write ``entries`` after one to three record-level mutations; return whether a payload went in."""
    entries = list(entries)
    hostile = False
    pkl = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
    prefix = entries[pkl][0].rsplit("/", 1)[0]
    raw_ops: list[int] = []
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        if op == 0:
            entries[pkl] = (entries[pkl][0], mutate_pickle(rng, entries[pkl][1]))
        elif op == 1:  # a second data.pkl, before or after, possibly with a payload
            extra = entries[pkl][1]
            if rng.random() < 0.6:
                extra, hostile = with_payload(extra, canary, rng), True
            entries.insert(rng.choice([0, pkl, pkl + 1, len(entries)]), (entries[pkl][0], extra))
        elif op == 2:  # rename a record
            i = rng.randrange(len(entries))
            entries[i] = (rng.choice([f"../{entries[i][0]}", f"/{entries[i][0]}", f"other/{entries[i][0]}",
                                      f"{prefix}/data/../data.pkl", f"{prefix}//x", f"{prefix}/data/\x00",
                                      f"{prefix}\\data\\0", f"{prefix}/data/{rng.randrange(9)}", "C:/x"]),
                          entries[i][1])
        elif op == 3 and len(entries) > 1:  # drop a record
            del entries[rng.randrange(len(entries))]
            pkl = next((i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl")), 0)
        elif op == 4:  # an extra record
            entries.insert(rng.randrange(len(entries) + 1), (rng.choice([f"{prefix}/extra", f"{prefix}/data/99",
                           f"{prefix}/constants.pkl", "stray.txt"]), rng.randbytes(rng.randint(0, 40))))
        elif op == 5:  # shorten a storage record
            i = rng.randrange(len(entries))
            entries[i] = (entries[i][0], entries[i][1][: rng.randrange(len(entries[i][1]) + 1)])
        elif op == 6:  # a payload in the main pickle
            entries[pkl] = (entries[pkl][0], with_payload(entries[pkl][1], canary, rng))
            hostile = True
        elif op == 7:
            rng.shuffle(entries)
            pkl = next((i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl")), 0)
        else:
            raw_ops.append(op)
    if not raw_ops:
        write_zip(path, entries, deflate=tuple(n for n, _ in entries if rng.random() < 0.1))
        return hostile
    records = _records(entries)
    flags = 0
    for op in raw_ops:
        i = rng.randrange(len(records))
        name, method, body, usize, crc = records[i]
        if op == 8:  # CRC and sizes
            records[i] = rng.choice([(name, method, body, usize, crc ^ 1), (name, method, body, usize + 1, crc),
                                     (name, method, body, max(usize - 1, 0), crc), (name, method, body, 2**40, crc)])
        elif op == 9:  # compression flags: deflated for real, declared deflated but stored, unknown method
            records[i] = rng.choice([(name, 8, _deflate(body), usize, crc), (name, 8, body, usize, crc),
                                     (name, rng.choice([1, 12, 14, 99]), body, usize, crc),
                                     (name, 8, _deflate(body)[:-2], usize, crc)])
        elif op == 10:
            flags = rng.choice([1, 8, 0x40, 0x800])
        else:  # a deflate bomb: a small record inflating to megabytes
            bomb, size, bomb_crc = _bomb(body, rng.choice([1, 40]))
            records[i] = (name, 8, bomb, rng.choice([size, len(body)]), bomb_crc)
    raw_zip(path, records, flags=flags, zip64=rng.random() < 0.8, count_delta=rng.choice([0, 0, 0, 1, -1]))
    if rng.random() < 0.2:  # trailing or cut bytes, a flipped byte
        blob = bytearray(path.read_bytes())
        kind = rng.randrange(3)
        if kind == 0:
            blob += rng.randbytes(rng.randint(1, 30))
        elif kind == 1:
            del blob[rng.randrange(len(blob)) :]
        else:
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(blob))
    return hostile


def gen_zip(rng: random.Random, work: Path) -> tuple[Path, bool]:
    path = work / rng.choice(["model.pt", "pytorch_model.bin", "weights.pth", "last.ckpt"])
    data = zip_torch_save(random_object(rng))
    if rng.random() < 0.1:  # a valid file, unchanged
        path.write_bytes(data)
        return path, False
    return path, mutate_zip(rng, zip_entries(data), path, work / CANARY)


# --- legacy torch files and bare pickles -----------------------------------------------------------


def gen_legacy(rng: random.Random, work: Path) -> tuple[Path, bool]:
    path = work / "model.pt"
    parts = split_legacy(legacy_torch_save(random_object(rng)))
    hostile = False
    if rng.random() < 0.1:
        path.write_bytes(b"".join(parts))
        return path, False
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        i = rng.randrange(5)
        if op in (0, 1):
            parts[i] = mutate_pickle(rng, parts[i])
        elif op == 2:  # a payload in any of the five pickles (torch unpickles all of them)
            parts[i] = with_payload(parts[i], work / CANARY, rng)
            hostile = True
        elif op == 3 and len(parts[5]) >= 8:  # a storage's element count
            old = struct.unpack("<q", parts[5][:8])[0]
            count = rng.choice([0, -1, 2**62, 2**63 - 1, min(max(old + rng.choice([1, -1]), -(2**63)), 2**63 - 1)])
            parts[5] = struct.pack("<q", count) + parts[5][8:]
        elif op == 4:  # cut or extend the storages
            parts[5] = parts[5][: rng.randrange(len(parts[5]) + 1)] if rng.random() < 0.5 else \
                parts[5] + rng.randbytes(rng.randint(1, 16))
        else:  # keys pickle and main pickle disagree, or a pickle is repeated
            parts[4] = rng.choice([pickle.dumps(["0", "0"], protocol=2), pickle.dumps([], protocol=2),
                                   pickle.dumps(["x"], protocol=2), pickle.dumps({"0": 1}, protocol=2), parts[3]])
    path.write_bytes(b"".join(parts))
    return path, hostile


def gen_bare(rng: random.Random, work: Path) -> tuple[Path, bool]:
    """A plain pickle (no legacy magic number) named like a torch file, usually with a payload."""
    path = work / rng.choice(["model.pt", "pytorch_model.bin", "model.pth"])
    obj: Any = rng.choice([{"a.random_ltd_layer.w": [1.0, 2.0]}, [1, 2, 3], {"state_dict": {}}, "x", 12])
    data = pickle.dumps(obj, protocol=rng.choice([2, 3]))
    hostile = rng.random() < 0.7
    if hostile:
        data = with_payload(data, work / CANARY, rng)
    for _ in range(rng.randint(0, 2)):
        data = mutate_pickle(rng, data)
    path.write_bytes(data)
    return path, hostile


GENERATORS = {"torch-zip": gen_zip, "torch-legacy": gen_legacy, "bare-pickle": gen_bare}
