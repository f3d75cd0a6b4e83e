"""Our compiled decoding products (``model/runtime/native.py``, ``model/runtime/native_decode.py``) against the
plain PyTorch expressions and the PyTorch forward pass."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cpmlive.compress.quantize import quantize_model
from cpmlive.model.ant.config import AntConfig
from cpmlive.config import QuantConfig
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.runtime import native, native_decode
from cpmlive.model.ant.model import build_model
from cpmlive.model.stack import FeedForward, RMSNorm
from cpmlive.model.runtime.quant import dequantize_int4, int8_matmul_per_token, quantize_int4, quantize_int8

# Shapes with a ragged tail of output rows (not a multiple of 4) and of columns (not of 16 / 64).
SHAPES = [(37, 45), (64, 128), (20, 200)]
# Without AVX2 flags the scalar forms run: the same sums, checked against the same references.
PORTABLE_FLAGS = ["-O2", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


def test_the_library_builds_on_this_machine():
    assert native.available(), "a C compiler is needed (the CI installs gcc)"


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request):
    if request.param == "native":
        return None  # this process's own build
    path = native.build(native.compiler(), PORTABLE_FLAGS)
    assert path is not None
    return native.load(path)


def weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(4, k, generator=g)


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_products_match_f_linear(lib, rows, dtype):
    for n, k in SHAPES:
        w, x = weights(n, k)
        w = w.to(dtype)
        got = native.matvec(x[:rows], w, lib)
        want = F.linear(x[:rows], w.float())
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (n, k)


@pytest.mark.parametrize("rows", [1, 4])
def test_int8_products_match_their_references(lib, rows):
    for n, k in SHAPES:
        w, x = weights(n, k, seed=1)
        codes, scale = quantize_int8(w)
        weight_only = native.matvec_int8(x[:rows], codes, scale, int8_inputs=False, lib=lib)
        assert torch.allclose(weight_only, x[:rows] @ (codes.float() * scale[:, None]).T, rtol=1e-4, atol=1e-4)
        # int8 x int8: the integer sums are exact, so only the float scaling can differ.
        w8a8 = native.matvec_int8(x[:rows], codes, scale, int8_inputs=True, lib=lib)
        want = int8_matmul_per_token(x[:rows], codes.t().contiguous(), scale)
        assert torch.allclose(w8a8, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [16, 32, 64])
def test_int4_products_match_the_dequantized_weight(lib, group):
    w, x = weights(48, 192, seed=2)
    packed, scale, zero = quantize_int4(w, group)
    got = native.matvec_int4(x[:2], packed, scale, zero, group, lib=lib)
    want = F.linear(x[:2], dequantize_int4(packed, scale, zero, group))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_products_of_many_rows_or_with_autograd_stay_in_pytorch():
    x = torch.randn(native.MAX_ROWS + 1, 8)
    with torch.no_grad():
        assert not native.applies(x) and native.applies(x[:2])
    assert not native.applies(x[:2])  # gradients enabled


def test_the_switch_turns_the_library_off():
    code = "from cpmlive.model.runtime import native; print(native.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CPMLIVE_NATIVE": "0"})
    assert out.stdout.strip() == "False", out.stderr


# ---- the whole decoding step ----------------------------------------------------------------------

CONFIG = AntConfig(vocab_size=512, dim_model=64, dim_ff=96, num_layers=3, num_heads=4, dim_head=16,
                   prompt_length=4, half=False)


def small_model(config=CONFIG, seed=0):
    model = build_model(config, seed=seed)
    with torch.no_grad():  # a non-zero position bias, so that it matters
        model.position_bias.weight.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


ROWS = [[6, 40, 41, 42, 43, 44, 45], [6, 50, 51]]  # two prompts of different lengths (left padding)


def logits_both_ways(model, monkeypatch):
    """Last-step logits of a few greedy steps with the native step and with PyTorch's blocks."""
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False)

    def run():
        with torch.no_grad():
            return generate_ids(model, ROWS, config, stop_ids=7)

    native_ids = run()
    calls = []
    real = native_decode.decode_blocks
    monkeypatch.setattr(native_decode, "decode_blocks", lambda *a: calls.append(1) or real(*a))
    assert run() == native_ids and calls, "the native step was not taken"
    monkeypatch.setattr(native_decode, "applies", lambda *a: False)
    return native_ids, run()


@pytest.mark.parametrize("quantization", [None, QuantConfig(bits=8), QuantConfig(bits=4, group_size=16)])
def test_native_steps_decode_the_same_ids_as_pytorch(monkeypatch, quantization):
    model = small_model()
    if quantization is not None:
        model = quantize_model(model, quantization)
    ours, reference = logits_both_ways(model, monkeypatch)
    assert ours == reference


def test_native_step_hidden_states_match_the_blocks_for_w8a8_and_pruned_models():
    pruned = CONFIG.to_dict() | {"mask_modules": [[False, True], [True, False], [False, False]]}
    models = [quantize_model(small_model(), QuantConfig(bits=8, activations="int8")),
              small_model(AntConfig.from_dict(pruned))]
    for model in models:
        with torch.no_grad():
            cache = model.new_cache(2, 16)
            ids = torch.tensor([[6, 40, 41, 42, 43], [0, 0, 6, 50, 51]])
            valid = ids != 0
            zeros = torch.zeros_like(ids, dtype=torch.int32)
            model(ids, zeros, valid, zeros, valid, cache=cache)
            step = torch.tensor([[60], [61]])
            ones = torch.ones_like(step, dtype=torch.bool)
            inputs = dict(input_ids=step, segment=torch.zeros_like(step, dtype=torch.int32), context=~ones,
                          span=torch.zeros_like(step, dtype=torch.int32), valid=ones)
            twin = copy.deepcopy(cache)
            fast = model(**inputs, cache=cache)
            assert native_decode.plan(model, RMSNorm, FeedForward) is not None
            native_decode_applies = native_decode.applies
            try:
                native_decode.applies = lambda *a: False
                slow = model(**inputs, cache=twin)
            finally:
                native_decode.applies = native_decode_applies
            assert torch.allclose(fast, slow, rtol=1e-3, atol=1e-3)
            for layer in range(model.config.num_layers):
                if cache.keys[layer] is not None:
                    assert torch.allclose(cache.keys[layer], twin.keys[layer], atol=1e-5)


def test_steps_that_run_an_adapter_or_experts_keep_the_pytorch_blocks(monkeypatch):
    """A model with adapters decodes natively while no adapter runs (its base weights are the
    base model's), and on PyTorch's blocks when one does, for the whole batch or some rows."""
    from cpmlive.tune.delta import DeltaConfig, active_adapter, adapters_by_row, attach

    model = small_model()
    base_ids, _ = logits_both_ways(model, monkeypatch)
    monkeypatch.undo()
    attach(model, DeltaConfig(method="lora", r=2, target_modules=["project_q", "w_0"]), "a")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(3))
    assert native_decode.plan(model, RMSNorm, FeedForward) is not None
    with active_adapter(model, None):
        ours, reference = logits_both_ways(model, monkeypatch)
    assert ours == reference == base_ids
    monkeypatch.undo()
    hidden = torch.zeros(2, 1, CONFIG.dim_model)
    cache = model.new_cache(2, 8)
    with torch.no_grad(), active_adapter(model, "a"):
        assert not native_decode.applies(model, hidden, cache)
    with torch.no_grad(), adapters_by_row(model, [None, "a"]):
        assert not native_decode.applies(model, hidden, cache)
    with torch.no_grad(), adapters_by_row(model, [None, None]):
        assert native_decode.applies(model, hidden, cache)
    experts = AntConfig.from_dict(CONFIG.to_dict() | {"moe": {"experts": 4, "top_k": 2}})
    assert native_decode.plan(small_model(experts), RMSNorm, FeedForward) is None


def test_concurrent_decoding_on_one_model_keeps_each_cache_apart():
    from concurrent.futures import ThreadPoolExecutor

    model = small_model()
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    prompts = [[[6, 40 + i, 41, 42 + i]] for i in range(4)]
    with torch.no_grad():
        alone = [generate_ids(model, rows, config, stop_ids=7) for rows in prompts]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda rows: generate_ids(model, rows, config, stop_ids=7), prompts * 3))
    assert together == alone * 3


def test_int8_inputs_meet_the_code_minus_128(lib):
    """Codes of other tools may use -128 (ours stop at -127): the sign trick must not wrap."""
    codes = torch.full((8, 64), -128, dtype=torch.int8)
    codes[1::2] = 127
    scale, x = torch.ones(8), -torch.ones(2, 64)
    got = native.matvec_int8(x, codes, scale, int8_inputs=True, lib=lib)
    assert torch.equal(got, int8_matmul_per_token(x, codes.t().contiguous(), scale))


def test_layers_whose_scales_are_not_float32_keep_the_pytorch_product():
    from cpmlive.model.runtime.quant import QuantizedLinear

    layer = QuantizedLinear(64, 8, QuantConfig(bits=8))
    assert layer.native_layout()
    layer.weight_scale = layer.weight_scale.to(torch.bfloat16)  # a checkpoint loaded as bf16
    assert not layer.native_layout()
    with torch.no_grad():
        assert not layer._native_applies(torch.randn(1, 64))


def test_a_replaced_weight_is_seen_by_the_next_native_step(monkeypatch):
    model = small_model()
    rows = [[6, 40, 41, 42]]
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        generate_ids(model, rows, config, stop_ids=7)  # a plan is made for the old weights
        layer = model.layers[1].ffn.w_0
        layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight), requires_grad=False)
        fast = generate_ids(model, rows, config, stop_ids=7)
        monkeypatch.setattr(native_decode, "applies", lambda *a: False)
        assert fast == generate_ids(model, rows, config, stop_ids=7)
