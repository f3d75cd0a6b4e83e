"""Rotary position embeddings as HF transformers computes them (``modeling_rope_utils``), for every
``rope_scaling`` type the decoder family reads.

The frequency formulas repeat HF's expressions operation for operation (and in float32, as HF does)
so that cos/sin agree bit for bit, not merely to a tolerance: a greedy decode compared with HF's
``generate`` would otherwise drift at long positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError

SUPPORTED_ROPE = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling's type: ``rope_type``, else the legacy ``type``, else ``'default'`` (as HF reads it)."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def _number(scaling: dict[str, Any], key: str, kind: str, default: float | None = None) -> float:
    """A numeric scaling parameter; refused when it is required (no default) and missing."""
    value = scaling.get(key)
    if value is None:
        value = default
    if value is None:
        raise CpmliveError(f"config: rope_scaling type '{kind}' is missing '{key}'")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CpmliveError(f"config: rope_scaling '{key}' must be a number, got {value!r}")
    return value


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 * mscale * ln(scale) + 1`` (HF's ``yarn_get_mscale``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _plain_inv_freq(theta: float, dim: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def _llama3_inv_freq(theta: float, dim: int, scaling: dict[str, Any], max_position: int) -> Tensor:
    factor = _number(scaling, "factor", "llama3")
    low_freq_factor = _number(scaling, "low_freq_factor", "llama3")
    high_freq_factor = _number(scaling, "high_freq_factor", "llama3")
    old_context_len = _number(scaling, "original_max_position_embeddings", "llama3", max_position)
    inv_freq = _plain_inv_freq(theta, dim)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * scaled / factor + smooth_factor * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_parameters(theta: float, dim: int, scaling: dict[str, Any], max_position: int) -> tuple[Tensor, float]:
    """YaRN's frequencies and the attention factor that multiplies cos/sin."""
    if "factor" not in scaling:
        raise CpmliveError("config: rope_scaling type 'yarn' is missing 'factor'")
    original = _number(scaling, "original_max_position_embeddings", "yarn", max_position)
    factor = _number(scaling, "factor", "yarn", max_position / original)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


class RotaryEmbedding:
    """cos/sin tables for ``rotary_dim`` rotated dims of a head, in HF's layout ``cat(freqs, freqs)``.

    ``scaling`` is the config's ``rope_scaling`` (or ``rope_parameters``) dict; ``rope_theta`` and
    ``partial_rotary_factor`` in it are ignored (``theta`` and ``rotary_dim`` carry them). A config
    that keeps ``original_max_position_embeddings`` outside the dict (Phi-3) should copy it in.
    ``max_position`` is the config's ``max_position_embeddings``.

    'dynamic' keeps HF's state: the frequencies grow with the longest call seen past
    ``max_position`` and return to the original ones when a call is shorter than it again.
    """

    def __init__(self, theta: float, rotary_dim: int, scaling: dict[str, Any] | None, max_position: int) -> None:
        kind = rope_type(scaling)
        if kind not in SUPPORTED_ROPE:
            raise CpmliveError(
                f"config: rope_scaling type '{kind}' is not supported (supported: {', '.join(SUPPORTED_ROPE)})"
            )
        if rotary_dim <= 0 or rotary_dim % 2:
            raise CpmliveError(f"config: the rotary dimension must be a positive even number, got {rotary_dim}")
        self.kind = kind
        self.theta = theta
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.scaling = dict(scaling or {})
        self.attention_scaling = 1.0
        self.inv_freq = self._initial_inv_freq()
        self._original_inv_freq = self.inv_freq.clone()
        self._cached_len: int = max_position

    def _initial_inv_freq(self) -> Tensor:
        theta, dim, scaling, kind = self.theta, self.rotary_dim, self.scaling, self.kind
        if kind == "default":
            return _plain_inv_freq(theta, dim)
        if kind == "linear":
            return _plain_inv_freq(theta, dim) / _number(scaling, "factor", kind)
        if kind == "dynamic":
            if dim <= 2:
                raise CpmliveError(f"config: rope_scaling type 'dynamic' needs a rotary dimension over 2, got {dim}")
            _number(scaling, "factor", kind)
            return self._dynamic_inv_freq(None, None)
        if kind == "llama3":
            return _llama3_inv_freq(theta, dim, scaling, self.max_position)
        if kind == "yarn":
            inv_freq, self.attention_scaling = _yarn_parameters(theta, dim, scaling, self.max_position)
            return inv_freq
        return self._longrope_setup()

    def _dynamic_inv_freq(self, seq_len: Tensor | None, device: torch.device | None) -> Tensor:
        """Dynamic NTK: the base grows with the sequence length (HF computes this in float32 tensors)."""
        factor, dim, max_position = self.scaling["factor"], self.rotary_dim, self.max_position
        if seq_len is None:
            length: Tensor | int = max_position
        else:
            length = torch.maximum(seq_len, torch.tensor(max_position, dtype=seq_len.dtype, device=seq_len.device))
        base = self.theta * ((factor * length / max_position) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (base**exponents)

    def _longrope_setup(self) -> Tensor:
        """LongRoPE: per-frequency factors, the long set for calls past the original length."""
        scaling, dim = self.scaling, self.rotary_dim
        original = _number(scaling, "original_max_position_embeddings", "longrope", self.max_position)
        factors = {}
        for key in ("short_factor", "long_factor"):
            value = scaling.get(key)
            if value is None:
                raise CpmliveError(f"config: rope_scaling type 'longrope' is missing '{key}'")
            if not isinstance(value, (list, tuple)) or len(value) != dim // 2:
                raise CpmliveError(f"config: rope_scaling '{key}' must be a list of {dim // 2} numbers")
            factors[key] = torch.tensor(value, dtype=torch.float32)
        factor = _number(scaling, "factor", "longrope", self.max_position / original)
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        self.attention_scaling = attention_factor
        self._longrope_original = original
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        self._long_inv_freq = 1.0 / (factors["long_factor"] * self.theta**shape)
        return 1.0 / (factors["short_factor"] * self.theta**shape)

    def _frequencies(self, positions: Tensor) -> Tensor:
        """The inverse frequencies for this call (updating dynamic's state as HF's dynamic_rope_update does)."""
        device = positions.device
        if self.kind == "dynamic":
            seq_len = torch.max(positions) + 1
            cached = self._cached_len
            if seq_len > cached:
                self.inv_freq = self._dynamic_inv_freq(seq_len, device)
                self._cached_len = int(seq_len)
            if seq_len < self.max_position and cached > self.max_position:
                self.inv_freq = self._original_inv_freq
                self._cached_len = self.max_position
        elif self.kind == "longrope" and torch.max(positions) + 1 > self._longrope_original:
            self._long_inv_freq = self._long_inv_freq.to(device)
            return self._long_inv_freq
        self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin for integer ``positions`` of any shape: ``[.., rotary_dim]`` each, times the
        attention scaling, computed in float32 and cast to ``dtype``."""
        inv_freq = self._frequencies(positions)
        freqs = positions[..., None].float() * inv_freq.to(dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first ``rotary_dim`` dims of each head of ``x`` [B, H, L, D] by cos/sin [B, L, rotary_dim];
    the other dims pass through. Llama's half-split pairs (i, i + rotary_dim/2) by default; ``interleaved``
    pairs (2i, 2i+1) as GLM does, from the same cos/sin. Returns a new tensor in ``x``'s dtype."""
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if interleaved:
        cos = cos[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    out = (rotated * cos) + (_rotate_half(rotated, interleaved) * sin)
    return torch.cat((out, passed), dim=-1) if passed.shape[-1] else out


def softmax_scale(scaling: dict[str, Any] | None, head_dim: int) -> float:
    """The attention's softmax scale for an MLA model (DeepSeek-V2/V3, MiniCPM3): ``head_dim ** -0.5``,
    times ``mscale(factor, mscale_all_dim)`` squared when the scaling sets ``mscale_all_dim`` (HF's
    ``yarn_apply_mscale``). Llama-style attention keeps ``head_dim ** -0.5`` whatever the scaling."""
    scale = head_dim ** (-0.5)
    kind = rope_type(scaling)
    if scaling and kind != "default":
        mscale_all_dim = scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = _yarn_mscale(_number(scaling, "factor", kind), mscale_all_dim)
            scale = scale * mscale * mscale
    return scale
