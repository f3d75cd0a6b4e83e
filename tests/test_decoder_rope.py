"""RoPE of the decoder family against HF transformers' own rotary classes, for every scaling type."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GlmConfig, LlamaConfig
from transformers.modeling_rope_utils import yarn_apply_mscale
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm_apply_rotary
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply_rotary
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary

from cpmlive.errors import CpmliveError
from cpmlive.model.decoder.rope import SUPPORTED_ROPE, RotaryEmbedding, apply_rotary, softmax_scale

THETA = 10000.0
HEAD_DIM = 16
MAX_POSITION = 128
LONG = {"short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [2.0 + i / 4 for i in range(8)]}

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "legacy-type-key": {"type": "linear", "factor": 3.0},
    # low/high wavelength bounds 64 and 16 split head_dim 16's wavelengths (6.3 .. 6e4) into all three bands
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "llama3-no-original": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-no-original": {"rope_type": "yarn", "factor": 4.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                    "mscale": 0.707, "mscale_all_dim": 0.707},
    "yarn-mscale-unequal": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                            "mscale": 1.0, "mscale_all_dim": 0.5},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                              "attention_factor": 0.8},
    "yarn-betas-untruncated": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                               "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn-default-betas-untruncated": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096,
                                       "truncate": False},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 64, **LONG},
    "longrope-attention-factor": {"rope_type": "longrope", "original_max_position_embeddings": 64,
                                  "factor": 4.0, "attention_factor": 1.3, **LONG},
}


def llama_rotary(scaling: dict | None) -> LlamaRotaryEmbedding:
    parameters = {"rope_theta": THETA, **copy.deepcopy(scaling or {"rope_type": "default"})}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POSITION, rope_parameters=parameters)
    return LlamaRotaryEmbedding(config)


def hf_cos_sin(rotary: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary(torch.zeros(1, dtype=torch.float32), positions)


def assert_same(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> None:
    for mine, hf in zip(ours, theirs):
        assert mine.shape == hf.shape and mine.dtype == hf.dtype
        torch.testing.assert_close(mine, hf, atol=1e-6, rtol=0)


def test_the_types_are_supported():
    assert SUPPORTED_ROPE[:5] == ("default", "linear", "dynamic", "llama3", "yarn")


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_cos_sin_equal_hf(name):
    scaling = SCALINGS[name]
    ours = RotaryEmbedding(THETA, HEAD_DIM, copy.deepcopy(scaling), MAX_POSITION)
    theirs = llama_rotary(scaling)
    short = torch.arange(64).repeat(2, 1)
    long = torch.tensor([[0, 5, 90, 127, 200, 299], [3, 64, 65, 128, 250, 300]])
    for positions in (short, long):  # longrope switches to its long factors past 64 positions
        assert_same(ours.cos_sin(positions, torch.float32), hf_cos_sin(theirs, positions))


def test_dynamic_follows_hf_state_across_calls():
    """Below the original length, grown past it, shorter again but still past it (HF keeps the
    longest length's frequencies), longer, then reset below it."""
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    ours = RotaryEmbedding(THETA, HEAD_DIM, dict(scaling), MAX_POSITION)
    theirs = llama_rotary(scaling)
    plain = RotaryEmbedding(THETA, HEAD_DIM, None, MAX_POSITION)
    for length in (50, 300, 200, 500, 128, 60, 129):
        positions = torch.arange(length).unsqueeze(0)
        cos_sin = ours.cos_sin(positions, torch.float32)
        assert_same(cos_sin, hf_cos_sin(theirs, positions))
        scaled = length > MAX_POSITION or length == 128
        assert torch.equal(cos_sin[0], plain.cos_sin(positions, torch.float32)[0]) != scaled, length


def test_dynamic_one_step_decode_matches_hf():
    """Cached decoding: one new position per call, across the original length."""
    scaling = {"type": "dynamic", "factor": 4.0}
    ours = RotaryEmbedding(THETA, HEAD_DIM, dict(scaling), MAX_POSITION)
    theirs = llama_rotary(scaling)
    for position in (120, 127, 128, 129, 160):
        positions = torch.tensor([[position], [position]])
        assert_same(ours.cos_sin(positions, torch.float32), hf_cos_sin(theirs, positions))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}])
def test_partial_rotary_equal_glm(scaling):
    parameters = {"rope_theta": THETA, "partial_rotary_factor": 0.5,
                  **copy.deepcopy(scaling or {"rope_type": "default"})}
    config = GlmConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, max_position_embeddings=MAX_POSITION,
                       rope_parameters=parameters)
    theirs = GlmRotaryEmbedding(config)
    ours = RotaryEmbedding(THETA, HEAD_DIM // 2, copy.deepcopy(scaling), MAX_POSITION)
    positions = torch.tensor([[0, 1, 2, 100, 250], [7, 8, 9, 130, 300]])
    cos, sin = ours.cos_sin(positions, torch.float32)
    assert cos.shape == (2, 5, HEAD_DIM // 2)
    assert_same((cos, sin), hf_cos_sin(theirs, positions))


def test_cos_sin_dtype_cast_after_float32():
    ours = RotaryEmbedding(THETA, HEAD_DIM, SCALINGS["yarn"], MAX_POSITION)
    positions = torch.arange(64).unsqueeze(0)
    cos, sin = ours.cos_sin(positions, torch.bfloat16)
    hf_cos, hf_sin = llama_rotary(SCALINGS["yarn"])(torch.zeros(1, dtype=torch.bfloat16), positions)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def random_qk(rotary_dim: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, HEAD_DIM, generator=generator).to(dtype)
    k = torch.randn(2, 2, 6, HEAD_DIM, generator=generator).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [9, 10, 11, 12, 13, 14]])
    cos, sin = RotaryEmbedding(THETA, rotary_dim, None, MAX_POSITION).cos_sin(positions, dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_equal_llama(dtype):
    q, k, cos, sin = random_qk(HEAD_DIM, dtype)
    q_hf, k_hf = llama_apply_rotary(q, k, cos, sin)
    q_ours, k_ours = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    assert q_ours.dtype == dtype and torch.equal(q_ours, q_hf) and torch.equal(k_ours, k_hf)
    assert not torch.equal(q_ours, q)
    from_float32 = apply_rotary(q, cos.float(), sin.float())  # float32 tables: cast to q's dtype first, as HF does
    assert from_float32.dtype == dtype and torch.equal(from_float32, q_hf)


def test_apply_rotary_partial_equal_gpt_neox():
    q, k, cos, sin = random_qk(HEAD_DIM // 2)
    q_hf, k_hf = neox_apply_rotary(q, k, cos, sin)
    q_ours = apply_rotary(q, cos, sin)
    assert torch.equal(q_ours, q_hf) and torch.equal(apply_rotary(k, cos, sin), k_hf)
    assert torch.equal(q_ours[..., HEAD_DIM // 2:], q[..., HEAD_DIM // 2:])


def test_apply_rotary_interleaved_equal_glm():
    q, k, cos, sin = random_qk(HEAD_DIM // 2)
    q_hf, k_hf = glm_apply_rotary(q, k, cos, sin)
    assert torch.equal(apply_rotary(q, cos, sin, interleaved=True), q_hf)
    assert torch.equal(apply_rotary(k, cos, sin, interleaved=True), k_hf)
    assert not torch.equal(apply_rotary(q, cos, sin), q_hf)


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "default", "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 0.5, "mscale_all_dim": 1.0},
    {"rope_type": "linear", "factor": 2.0, "mscale_all_dim": 0.5},
])
def test_softmax_scale_equal_hf(scaling):
    head_dim = 96
    parameters = dict(scaling or {})
    parameters.setdefault("rope_type", parameters.get("type", "default"))  # HF reads the standardized dict
    assert softmax_scale(scaling, head_dim) == yarn_apply_mscale(parameters, head_dim ** (-0.5))


def test_softmax_scale_differs_with_mscale_all_dim():
    scaling = {"rope_type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0}
    assert softmax_scale(scaling, 64) > 64 ** (-0.5)


def test_unknown_type_refused():
    with pytest.raises(CpmliveError) as raised:
        RotaryEmbedding(THETA, HEAD_DIM, {"rope_type": "xyz", "factor": 2.0}, MAX_POSITION)
    assert str(raised.value).startswith(
        "config: rope_scaling type 'xyz' is not supported (supported: default, linear, dynamic, llama3, yarn")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("scaling, key", [
    ({"rope_type": "linear"}, "factor"),
    ({"type": "dynamic"}, "factor"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 32}, "factor"),
    ({"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "low_freq_factor"),
    ({"rope_type": "longrope", "long_factor": LONG["long_factor"]}, "short_factor"),
])
def test_missing_key_refused(scaling, key):
    kind = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(CpmliveError, match=f"^config: rope_scaling type '{kind}' is missing '{key}'$"):
        RotaryEmbedding(THETA, HEAD_DIM, scaling, MAX_POSITION)


def test_bad_values_refused():
    with pytest.raises(CpmliveError, match="'factor' must be a number"):
        RotaryEmbedding(THETA, HEAD_DIM, {"rope_type": "linear", "factor": "2"}, MAX_POSITION)
    with pytest.raises(CpmliveError, match="'long_factor' must be a list of 8 numbers"):
        RotaryEmbedding(THETA, HEAD_DIM, {**SCALINGS["longrope"], "long_factor": [1.0]}, MAX_POSITION)
    with pytest.raises(CpmliveError, match="positive even"):
        RotaryEmbedding(THETA, 7, None, MAX_POSITION)
