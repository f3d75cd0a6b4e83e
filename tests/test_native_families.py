"""The native decoding step (``model/runtime/native_decode.py``) on CPM-1 (LayerNorms with biases,
biased attention, GPT-2's tanh-GELU MLP, learned positions) and CPM-Bee (its residual scale
``h = (h + branch) / 1.05``, segment and tree position bias): the logits of PyTorch's blocks, step
after step, in float32 and int8; CPM-Bee's task answers unchanged."""

from __future__ import annotations

import pytest
import torch

import cpmlive
from cpmlive.compress.quantize import quantize_model
from cpmlive.config import QuantConfig
from cpmlive.model.cpm1.config import Cpm1Config
from cpmlive.model.cpm1.model import build_cpm1
from cpmlive.model.runtime import native, native_decode

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the compiled library (a C compiler)")

PROMPT = [5, 17, 99, 3, 42, 8]
STEPS = [200, 31, 7, 64, 12]


def cpm1(weights: str) -> torch.nn.Module:
    config = Cpm1Config(vocab_size=256, dim_model=64, dim_ff=192, num_layers=2, num_heads=4, dim_head=16,
                        max_length=64, half=False)
    model = build_cpm1(config, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms and biases away from 1 and 0, so that a missing one shows
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.mul_(8.0)
            else:
                offset = 1.0 if name.endswith("norm.weight") else 0.0
                parameter.copy_(offset + 0.3 * torch.randn(parameter.shape, generator=generator))
    return quantize_model(model, QuantConfig(bits=8)) if weights == "int8" else model


def step_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        cache = model.new_cache(1, len(PROMPT) + len(STEPS))
        model(ids, cache=cache)
        return torch.stack([model.logits(model(torch.tensor([[t]]), cache=cache))[:, -1] for t in STEPS])


def counted(monkeypatch) -> list:
    calls = []
    real = native_decode.decode_blocks
    monkeypatch.setattr(native_decode, "decode_blocks", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_cpm1_native_steps_give_the_logits_of_the_pytorch_blocks(monkeypatch, weights):
    model = cpm1(weights)
    calls = counted(monkeypatch)
    fast = step_logits(model)
    assert len(calls) == len(STEPS), "the native step was not taken"
    with native.switched_off():
        slow = step_logits(model)
    assert (fast - slow).abs().max() < 1e-4 and slow.std() > 0.3


def test_cpm_bee_answers_are_those_of_the_pytorch_blocks(monkeypatch):
    lm = cpmlive.load("bee-demo")
    task = {"input": "今天天气很好，我们去公园散步。", "prompt": "续写", "<ans>": ""}
    calls = counted(monkeypatch)
    fast = lm.bee(task, max_new_tokens=12)
    assert calls, "the native step was not taken"
    with native.switched_off():
        assert lm.bee(task, max_new_tokens=12) == fast
