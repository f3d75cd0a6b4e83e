"""The native decoding step (``model/runtime/native_decode.py``) on the decoder family: its logits
equal those of PyTorch's blocks over several steps, for every variation C computes (grouped keys,
biases, q/k norms with a head width of its own, partial rotary, MiniCPM's scales, sliding
windows), with float32, float16-stored and int8 weights; what it does not compute stays in PyTorch."""

from __future__ import annotations

import pytest
import torch

from cpmlive.compress.quantize import quantize_model
from cpmlive.config import QuantConfig
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.checkpoint import matrix_names
from cpmlive.model.decoder.config import DecoderConfig
from cpmlive.model.decoder.model import build_decoder
from cpmlive.model.runtime import native, native_decode
from cpmlive.model.stack import FeedForward, RMSNorm

TINY = dict(vocab_size=256, dim_model=64, dim_ff=96, num_layers=2, num_heads=4, num_kv_heads=2, dim_head=16,
            max_length=64)
ARCHITECTURES = {
    "llama": dict(architecture="llama", num_kv_heads=1),
    "qwen2": dict(architecture="qwen2", qkv_bias=True, tie_word_embeddings=True),
    "qwen3": dict(architecture="qwen3", qk_norm=True, dim_head=24),
    "glm": dict(architecture="glm", partial_rotary_factor=0.5, qkv_bias=True),
    "minicpm": dict(architecture="minicpm", scale_emb=12.0, scale_depth=1.4, dim_model_base=16,
                    tie_word_embeddings=True, num_kv_heads=4),
    "mistral": dict(architecture="mistral", sliding_window=3),
}
PROMPT = [5, 17, 99, 3, 42, 8]
STEPS = [200, 31, 7, 64, 12]


def build(name: str, weights: str = "float32") -> torch.nn.Module:
    model = build_decoder(DecoderConfig(**{**TINY, **ARCHITECTURES[name]}), seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so that a missing one shows;
        for parameter_name, parameter in model.named_parameters():  # matrices that make logits of ~1
            if parameter.dim() == 2:
                parameter.mul_(8.0)
            else:
                offset = 1.0 if parameter_name.endswith("norm.weight") else 0.0
                parameter.copy_(offset + 0.3 * torch.randn(parameter.shape, generator=generator))
    if weights == "int8":
        return quantize_model(model, QuantConfig(bits=8))
    if weights == "float16":
        names = matrix_names(model)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if parameter_name in names:
                    parameter.data = parameter.data.half()
    return model


def step_logits(model: torch.nn.Module, rows: list[list[int]], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a prefill of ``rows`` then of each of ``STEPS`` fed one by one, ``[steps, B, vocab]``."""
    ids = torch.tensor(rows)
    with torch.no_grad():
        cache = model.new_cache(ids.size(0), ids.size(1) + len(STEPS))
        model(ids, valid=valid, cache=cache)
        out = []
        for token in STEPS:
            step = torch.full((ids.size(0), 1), token)
            out.append(model.logits(model(step, cache=cache))[:, -1])
    return torch.stack(out)


def both_ways(model: torch.nn.Module, monkeypatch, rows=(PROMPT,), valid=None) -> tuple[torch.Tensor, torch.Tensor]:
    calls = []
    real = native_decode.decode_blocks
    monkeypatch.setattr(native_decode, "decode_blocks", lambda *a: calls.append(1) or real(*a))
    fast = step_logits(model, list(rows), valid)
    assert len(calls) == len(STEPS), "the native step was not taken"
    monkeypatch.setattr(native_decode, "applies", lambda *a: False)
    slow = step_logits(model, list(rows), valid)
    monkeypatch.undo()
    return fast, slow


pytestmark = pytest.mark.skipif(not native.available(), reason="needs the compiled library (a C compiler)")


@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_native_steps_give_the_logits_of_the_pytorch_blocks(monkeypatch, name, weights):
    fast, slow = both_ways(build(name, weights), monkeypatch)
    assert (fast - slow).abs().max() < 1e-5
    assert slow.std() > 0.3  # logits that tell the tokens apart, so that a wrong step would show


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_rows_of_other_lengths_keep_their_own_positions_and_windows(monkeypatch, name):
    rows = [[0, 0, 0] + PROMPT[:3], PROMPT]
    valid = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])
    fast, slow = both_ways(build(name), monkeypatch, rows, valid)
    assert (fast - slow).abs().max() < 1e-5
    alone = step_logits(build(name), [PROMPT[:3]])
    assert (fast[:, 0] - alone[:, 0]).abs().max() < 1e-4  # the padded row decodes as if alone


def test_greedy_ids_are_those_of_the_pytorch_blocks(monkeypatch):
    model = build("qwen3", "int8")
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    fast = generate_ids(model, [PROMPT, PROMPT[:4]], config, 255)
    monkeypatch.setattr(native_decode, "applies", lambda *a: False)
    assert generate_ids(model, [PROMPT, PROMPT[:4]], config, 255) == fast


def test_what_c_does_not_compute_stays_in_pytorch():
    latent = DecoderConfig(**{**TINY, "architecture": "minicpm3", "num_kv_heads": 4, "q_lora_rank": 32,
                              "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
                              "dim_head": 8})
    assert native_decode.plan(build_decoder(latent).eval(), RMSNorm, FeedForward) is None
    model = build("qwen3")
    assert native_decode.plan(model, RMSNorm, FeedForward) is not None
    model.layers[1].attn.k_norm.weight.data = model.layers[1].attn.k_norm.weight.data.half()
    assert native_decode.plan(model, RMSNorm, FeedForward) is None
    model = build("qwen2")
    model.layers[0].attn.bias_v.data = model.layers[0].attn.bias_v.data.half()
    assert native_decode.plan(model, RMSNorm, FeedForward) is None


def test_a_changed_bias_is_seen_by_the_next_native_step(monkeypatch):
    model = build("qwen2")
    before = step_logits(model, [PROMPT])
    with torch.no_grad():
        model.layers[1].attn.bias_q.add_(1.0)
    fast, slow = both_ways(model, monkeypatch)
    assert (fast - slow).abs().max() < 1e-5 and (fast - before).abs().max() > 1e-3
