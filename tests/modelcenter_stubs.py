"""Run OpenBMB's ModelCenter (``model-center`` 1.0.2 from PyPI, installed without its
dependencies) on one CPU: a stand-in for the few ``bmtrain`` names its layers use, which
distribute parameters over GPUs and checkpoint blocks, and none of which changes what a forward
computes. ``import_model_center()`` installs it and returns the package."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn


class DistributedParameter(nn.Parameter):
    """A plain parameter that remembers how bmtrain would initialise it."""

    def __new__(cls, data, requires_grad=True, init_method=None, group=None, **_):
        parameter = super().__new__(cls, data, requires_grad)
        parameter.init_method = init_method
        return parameter


class ParameterInitializer:
    def __init__(self, func, *args, **kwargs):
        self.func, self.args, self.kwargs = func, args, kwargs

    def __call__(self, tensor):
        return self.func(tensor, *self.args, **self.kwargs)


class TransformerBlockList(nn.Module):
    """Blocks called one after another on the hidden states, named ``0``, ``1`` ... as bmtrain's."""

    def __init__(self, modules, sqrt=False):
        super().__init__()
        for index, module in enumerate(modules):
            self.add_module(str(index), module)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def forward(self, hidden, *args):
        for module in self:
            hidden = module(hidden, *args)
        return hidden


def init_parameters(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if getattr(parameter, "init_method", None) is not None:
                parameter.init_method(parameter)


def _bmtrain() -> types.ModuleType:
    module = types.ModuleType("bmtrain")
    module.DistributedModule = nn.Module
    module.DistributedParameter = DistributedParameter
    module.ParameterInitializer = ParameterInitializer
    module.TransformerBlockList = TransformerBlockList
    module.CheckpointBlock = lambda block, *args, **kwargs: block
    module.init_parameters = init_parameters
    module.rank = lambda: 0
    module.world_size = lambda: 1
    module.print_rank = print
    module.store = types.SimpleNamespace(
        _save_to_rank0=lambda model, destination=None, prefix="": nn.Module.state_dict(model, destination=destination,
                                                                                      prefix=prefix))
    return module


class _OnCpu(types.ModuleType):
    """``torch`` as ModelCenter's position tables see it: tensors it makes on ``"cuda"`` are made
    on the CPU (the only change to what it computes: where)."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name in ("arange", "zeros", "ones"):
            return lambda *args, device=None, **kwargs: value(*args, **kwargs)
        return value


def import_model_center() -> types.ModuleType:
    """``model_center`` over the bmtrain stand-in, on the CPU (the test is skipped where it is
    not installed)."""
    sys.modules.setdefault("bmtrain", _bmtrain())
    pytest.importorskip("model_center", reason="pip install --no-deps model-center==1.0.2")
    importlib.import_module("model_center.layer.position_embedding").torch = _OnCpu()
    return importlib.import_module("model_center")
