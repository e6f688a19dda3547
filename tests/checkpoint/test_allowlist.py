"""The engine allowlist: exact names only, inert classes only, and what the verdicts say."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect

import pytest

from random_ltd_cli.checkpoint._allowlist import ENGINE_GLOBALS, EngineRecord, torch_stand_ins
from random_ltd_cli.checkpoint._torch import is_safe_global
from random_ltd_cli.checkpoint._verdict import judge


@pytest.mark.parametrize("name", sorted(ENGINE_GLOBALS))
def test_every_entry_is_allowed(name: str) -> None:
    assert is_safe_global(name)


@pytest.mark.parametrize(
    "name",
    [
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScalerX",  # a look-alike class name
        "deepspeed.runtime.fp16.loss_scaler",  # the module itself
        "deepspeed.runtime.fp16.loss_scaler.CreateLossScaler",  # a function of the same module
        "deepspeed.runtime.fp16.loss_scaler.os",  # a module the allow-listed one imports
        "deepspeed.utils.tensor_fragment.os",
        "deepspeed.utils.tensor_fragment.tensor_fragment",  # a real class of the same module, not on the list
        "deepspeed.runtime.zero.config.ZeroStageEnum.__reduce__",
        "Deepspeed.runtime.zero.config.ZeroStageEnum",  # case matters
        "os.system",
    ],
)
def test_names_near_the_list_are_refused(name: str) -> None:
    assert not is_safe_global(name)


def test_verdicts() -> None:
    assert judge(["torch._utils._rebuild_tensor_v2", "collections.OrderedDict"]).verdict == (
        "safe to torch.load(weights_only=True)"
    )
    v = judge(["torch.FloatStorage", "deepspeed.runtime.zero.config.ZeroStageEnum"])
    assert v.verdict == "needs allow-listed engine classes: deepspeed.runtime.zero.config.ZeroStageEnum"
    assert v.globals == {"deepspeed.runtime.zero.config.ZeroStageEnum": "engine", "torch.FloatStorage": "torch"}
    v = judge(["deepspeed.runtime.zero.config.ZeroStageEnum", "__builtin__.eval", "os.system"])
    assert v.verdict == "unsafe: builtins.eval, os.system" and v.short == "unsafe"  # protocol-2 spelling mapped


def test_stand_ins_cover_only_allow_listed_names() -> None:
    names = ["os.system", "deepspeed.runtime.fp16.loss_scaler.LossScaler", "torch.FloatStorage"]
    assert torch_stand_ins(names) == [(EngineRecord, "deepspeed.runtime.fp16.loss_scaler.LossScaler")]
    record = EngineRecord.__new__(EngineRecord)  # what NEWOBJ + BUILD do
    record.__setstate__({"cur_scale": 1.0})
    assert record.state == {"cur_scale": 1.0}


@pytest.mark.parametrize("name", sorted(ENGINE_GLOBALS))
def test_each_entry_is_an_inert_data_class_in_the_installed_engine(name: str) -> None:
    """Re-read the installed DeepSpeed: a class whose unpickling (NEWOBJ/REDUCE + BUILD) runs none of its code."""
    pytest.importorskip("deepspeed")
    module, _, attr = name.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    assert inspect.isclass(cls)
    if issubclass(cls, enum.Enum):  # unpickled as ZeroStageEnum(2): a lookup among fixed int members
        assert cls.__reduce_ex__ is enum.Enum.__reduce_ex__ and "_missing_" not in vars(cls)
        assert all(isinstance(m.value, int) for m in cls)
        return
    assert not set(vars(cls)) & {"__reduce__", "__reduce_ex__", "__setstate__", "__new__", "__getattr__", "__setattr__"}
    if dataclasses.is_dataclass(cls):
        assert {f.type for f in dataclasses.fields(cls)} <= {int, "int"}
    else:  # the loss scalers: state is a __dict__ of numbers, flags and a dtype
        for base in cls.__mro__[:-1]:
            assert not set(vars(base)) & {"__reduce__", "__reduce_ex__", "__setstate__", "__getattr__"}
