"""Fuzz generators for checkpoint folders: DeepSpeed tag folders, DCP folders, run folders.

Same contract as ``fuzz_torch.py``: ``gen(rng, work) -> (path, hostile)``. A folder starts valid
(the files the engines write, tiny) and gets one to three mutations: its torch files mutated with
the torch generators' mutations or given a payload, ``latest`` rewritten, special files (FIFOs,
folders named like files), links inside and out, missing or extra files; DCP metadata mutated
at the pickle level or rebuilt with hostile names and storage paths.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

from .fuzz import encode, header_of, random_tensors, raw_mutation
from .fuzz_torch import CANARY, mutate_pickle, mutate_zip, random_state, with_payload
from .hostile_files import legacy_torch_save, zip_entries, zip_torch_save


def _torch_file(rng: random.Random, path: Path, obj: Any, *, mutate: float, payload: float) -> bool:
    """Write ``obj`` with torch.save (ZIP, sometimes legacy), maybe mutated or with a payload."""
    legacy = rng.random() < 0.15
    data = legacy_torch_save(obj) if legacy else zip_torch_save(obj)
    roll = rng.random()
    if roll < payload:
        if legacy:
            path.write_bytes(with_payload(data, _canary(path), rng))  # in the magic-number pickle
        else:
            entries = zip_entries(data)
            entries = [(n, with_payload(c, _canary(path), rng) if n.endswith("/data.pkl") else c) for n, c in entries]
            from .hostile_files import write_zip

            write_zip(path, entries)
        return True
    if roll < payload + mutate:
        if legacy:
            path.write_bytes(mutate_pickle(rng, data))
            return False
        return mutate_zip(rng, zip_entries(data), path, _canary(path))
    path.write_bytes(data)
    return False


def _canary(path: Path) -> Path:
    """The case's canary: in the case folder (the parent of the generated folder tree's root)."""
    for parent in path.parents:
        if parent.name.isdigit():  # the driver names case folders by number
            return parent / CANARY
    return path.parent / CANARY


def _special(rng: random.Random, path: Path) -> None:
    """A FIFO, a folder, or a link where a file is expected."""
    kind = rng.randrange(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.is_file() or path.is_fifo():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    if kind == 0:
        os.mkfifo(path)
    elif kind == 1:
        path.mkdir(exist_ok=True)
    else:
        path.symlink_to(rng.choice(["/etc/hostname", "../../outside.pt", "nowhere.pt", "/dev/zero"]))


# --- DeepSpeed -------------------------------------------------------------------------------------


def gen_deepspeed(rng: random.Random, work: Path) -> tuple[Path, bool]:
    root = work / "ds"
    tags = [f"global_step{n}" for n in sorted(rng.sample(range(1, 50), rng.randint(1, 2)))]
    hostile = False
    files: list[Path] = []
    for tag in tags:
        (root / tag).mkdir(parents=True)
        state = random_state(rng)
        model = {"module": state, "param_shapes": [{k: tuple(v.shape) for k, v in state.items()}],
                 "global_steps": 3, "ds_version": "0.19.8"}
        p = root / tag / "mp_rank_00_model_states.pt"
        hostile |= _torch_file(rng, p, model, mutate=0.25, payload=0.1)
        files.append(p)
        if rng.random() < 0.6:
            optim = {"optimizer_state_dict": {"state": {0: {"exp_avg": next(iter(state.values()))}},
                                              "param_groups": [{"lr": 0.1, "params": [0]}]}, "ds_version": "0.19.8"}
            p = root / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            hostile |= _torch_file(rng, p, optim, mutate=0.2, payload=0.1)
            files.append(p)
    latest = rng.choice([tags[-1], tags[-1] + "\n", None])
    op = rng.randrange(8)
    if op == 0:
        latest = rng.choice(["global_step999", "../outside", "", "a" * 5000, "/etc", "global_step1/..", "\ud800"])
    if latest is not None:
        (root / "latest").write_text(latest, encoding="utf-8", errors="surrogatepass")
    if op == 1:
        (root / "latest").write_bytes(rng.choice([b"\xff\xfe", b"global_step1\x00", b"x" * 10_000]))
    elif op == 2:
        _special(rng, rng.choice(files))
    elif op == 3:
        _special(rng, root / tags[0] / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    elif op == 4:
        (root / tags[0] / "extra_model_states.pt").write_bytes(rng.randbytes(rng.randint(0, 64)))
    elif op == 5:
        (root / "zero_to_fp32.py").write_text("print('never run')\n")
    return root, hostile


# --- DCP -------------------------------------------------------------------------------------------


@functools.cache
def _dcp_templates() -> tuple[tuple[bytes, dict[str, bytes]], ...]:
    """Two small DCP checkpoints written by ``dcp.save`` once per process: (.metadata, {name: bytes})."""
    import tempfile

    import torch
    import torch.distributed.checkpoint as dcp

    out = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        state = {"model": {"h.0.random_ltd_layer.w": torch.randn(3, 2, generator=gen), "ln.bias": torch.zeros(2),
                           **({"h.1.random_ltd_layer.b": torch.ones(4)} if seed else {})}, "step": 5}
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=tmp)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
        out.append((files.pop(".metadata"), files))
    return tuple(out)


def _unframed(obj: Any) -> bytes:
    buf = io.BytesIO()
    pickler = pickle._Pickler(buf, protocol=4)  # type: ignore[attr-defined]
    pickler.framer.start_framing = lambda: None
    pickler.dump(obj)
    return buf.getvalue()


def _rebuilt_metadata(rng: random.Random, meta: bytes) -> bytes:
    """The metadata object (our own, just written by dcp.save) changed field by field and pickled again."""
    md = pickle.loads(meta)
    op = rng.randrange(4)
    if op == 0 and md.storage_data:  # a storage path out of the folder
        key = rng.choice(list(md.storage_data))
        info = md.storage_data[key]
        info.relative_path = rng.choice(["../x.distcp", "/etc/passwd", "sub/../__0_0.distcp", "", "missing.distcp"])
    elif op == 1:  # colliding names after stripping
        names = list(md.state_dict_metadata)
        if names:
            md.state_dict_metadata[names[0].replace(".random_ltd_layer", "")] = md.state_dict_metadata[names[0]]
    elif op == 2 and md.storage_data:
        key = rng.choice(list(md.storage_data))
        info = md.storage_data[key]
        info.offset, info.length = rng.choice([(2**62, 4), (0, 2**62), (-1, 4)])
    else:
        md.state_dict_metadata = rng.choice([{}, [], None, {"x": 1}])
    return _unframed(md)


def gen_dcp(rng: random.Random, work: Path) -> tuple[Path, bool]:
    root = work / "dcp"
    root.mkdir()
    template, files = rng.choice(_dcp_templates())
    for name, data in files.items():
        (root / name).write_bytes(data)
    # only our own template is ever unpickled here; mutated bytes never are
    meta = _rebuilt_metadata(rng, template) if rng.random() < 0.25 else _unframed(pickle.loads(template))
    hostile = False
    for _ in range(rng.randint(0, 2)):
        op = rng.randrange(5)
        if op == 0:
            meta = with_payload(meta, work / CANARY, rng)
            hostile = True
        elif op in (1, 2):
            meta = mutate_pickle(rng, meta)
        elif op == 3:
            distcp = next(iter(files))
            if (root / distcp).is_file() and not (root / distcp).is_symlink():
                    (root / distcp).write_bytes(files[distcp][: rng.randrange(len(files[distcp]) + 1)])
        else:
            _special(rng, root / rng.choice(["__0_0.distcp", "extra.distcp"]))
    (root / ".metadata").write_bytes(meta)
    return root, hostile


# --- run folders -----------------------------------------------------------------------------------


@functools.cache
def _optimizer_bytes() -> bytes:
    return zip_torch_save({"state": {}, "param_groups": []})


def gen_run(rng: random.Random, work: Path) -> tuple[Path, bool]:
    """A Trainer ``output_dir`` (checkpoint-N folders), or a folder of standalone weights files."""
    root = work / "run"
    root.mkdir()
    hostile = False
    if rng.random() < 0.7:
        for step in sorted(rng.sample(range(1, 100), rng.randint(1, 2))):
            ck = root / f"checkpoint-{step}"
            ck.mkdir()
            (ck / "config.json").write_text('{"model_type": "gpt2"}')
            (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            if rng.random() < 0.5:
                tensors = random_tensors(rng)
                header, data = header_of(tensors, {"format": "pt"})
                blob = encode(header, data)
                (ck / "model.safetensors").write_bytes(raw_mutation(rng, blob) if rng.random() < 0.25 else blob)
            else:
                hostile |= _torch_file(rng, ck / "pytorch_model.bin", random_state(rng), mutate=0.25, payload=0.1)
            (ck / "optimizer.pt").write_bytes(_optimizer_bytes())
            (ck / "rng_state.pth").write_bytes(b"opaque side file, copied unchanged")
    else:
        for name in rng.sample(["a.safetensors", "b.pt", "c.bin", "d.ckpt"], rng.randint(2, 3)):
            if name.endswith(".safetensors"):
                header, data = header_of(random_tensors(rng), None)
                (root / name).write_bytes(encode(header, data))
            else:
                obj = random_state(rng) if not name.endswith(".ckpt") else {"state_dict": random_state(rng), "epoch": 0}
                hostile |= _torch_file(rng, root / name, obj, mutate=0.25, payload=0.1)
    op = rng.randrange(6)
    entries = sorted(root.iterdir())
    if op == 0:
        _special(rng, root / rng.choice(["checkpoint-7", "e.pt", "checkpoint-3/pytorch_model.bin"]))
    elif op == 1 and entries:
        target = entries[0]
        (root / "link.pt").symlink_to(rng.choice([target.name, "/etc/hostname", "../outside.pt"]))
    elif op == 2:
        (root / "checkpoint-abc").mkdir(exist_ok=True)
    return root, hostile


GENERATORS = {"deepspeed-dir": gen_deepspeed, "dcp-dir": gen_dcp, "run-dir": gen_run}
