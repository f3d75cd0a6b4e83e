"""The decoder family: Llama's pre-norm decoder and the variations of Mistral, Qwen2/3, GLM-4 and
MiniCPM 1/2/3, from one config (``DecoderConfig``).

``h = h + s * attn(norm(h))`` then ``h = h + s * mlp(norm(h))`` with RMS norms, rotary attention
over grouped keys and values (GQA/MQA), a SwiGLU MLP and a final norm, the head tied to the
embedding or not. ``s`` is MiniCPM's ``scale_depth / sqrt(layers)`` (1 elsewhere); MiniCPM also
multiplies the embeddings by ``scale_emb`` and divides the head's input by ``hidden / dim_model_base``.
Qwen3 normalises each query and key head before the rotation; GLM-4 rotates half of each head
(its interleaved pairs are stored half-split by the converter, so one rotation serves all);
Mistral and Qwen2 may limit some layers to a sliding window; MiniCPM3's multi-head latent attention
is :class:`LatentAttention`.

The model takes CPM-Ant's inputs (``model.ant``), as CPM-1 does, so that decoding, the engine,
fine-tuning and pretraining drive it unchanged: ``valid`` marks padding, ``span`` packed samples,
``position`` orders tokens; a token's rotary position is the number of valid tokens of its span
before it, so left padding, packed rows and cached decoding give each token the position an
unpadded forward gives it. The MLP is the shared stack's ``FeedForward`` (``w_0`` the gate,
``w_1`` the up projection), so quantization, LoRA, pruning and the CPU products treat it as CPM-Ant's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.model.cache import KVCache, left_to_right
from cpmlive.model.decoder.config import DecoderConfig
from cpmlive.model.decoder.rope import RotaryEmbedding, apply_rotary, softmax_scale
from cpmlive.model.runtime.kernels import attention, project
import cpmlive.model.runtime.native_decode as native_decode
from cpmlive.model.stack import (Embedding, FeedForward, RMSNorm, Transformer, add_bias, autocast_input, build,
                                  init_gpt2)
from cpmlive.utils import compute_dtype


@dataclass
class AttentionInputs:
    """What every layer's attention reads in one forward: the rotation of the new positions and
    the additive masks, one per sliding window in use (``None``: every earlier key)."""

    cos: Tensor  # [B, L, rotary_dim]
    sin: Tensor
    masks: dict[int | None, Tensor]  # window -> [B, 1, Lq, Lk]

    def last(self, count: int) -> "AttentionInputs":
        """The inputs of the last ``count`` queries."""
        return AttentionInputs(self.cos[:, -count:], self.sin[:, -count:],
                               {window: mask[:, :, -count:] for window, mask in self.masks.items()})


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Attention of ``q`` ``[B, H, Lq, d]`` over ``k``/``v`` with fewer heads ``[B, Hkv, Lk, d]``:
    each key head serves ``H / Hkv`` consecutive query heads (HF's ``repeat_kv``), computed as one
    head with that many times the query rows, so keys and values are never copied."""
    batch, heads, length, _ = q.shape
    kv_heads, keys = k.size(1), k.size(2)
    group = heads // kv_heads
    rows = q.reshape(batch, kv_heads, group * length, q.size(-1))
    bias = mask.expand(batch, 1, length, keys) if group == 1 else \
        mask[:, :, None].expand(batch, 1, group, length, keys).reshape(batch, 1, group * length, keys)
    out = attention(rows, k, v, bias.expand(batch, kv_heads, group * length, keys), scale=scale)
    return out.reshape(batch, heads, length, out.size(-1))


def _heads(x: Tensor, dim_head: int) -> Tensor:
    """``[B, L, heads * dim_head]`` as ``[B, heads, L, dim_head]`` (fewer heads when tensor
    parallelism split the projection)."""
    batch, length, _ = x.shape
    return x.view(batch, length, -1, dim_head).transpose(1, 2)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class DecoderAttention(nn.Module):
    """Rotary attention over ``num_kv_heads`` key/value heads, with the biases and per-head q/k
    norms its config asks for."""

    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.dim_head = config.num_heads, config.num_kv_heads, config.dim_head
        self.window = config.window(layer)
        q_width, kv_width = config.num_heads * config.dim_head, config.dim_kv
        self.project_q = nn.Linear(config.dim_model, q_width, bias=False)
        self.project_k = nn.Linear(config.dim_model, kv_width, bias=False)
        self.project_v = nn.Linear(config.dim_model, kv_width, bias=False)
        self.attention_out = nn.Linear(q_width, config.dim_model, bias=False)
        for name, size, wanted in (("bias_q", q_width, config.qkv_bias), ("bias_k", kv_width, config.qkv_bias),
                                   ("bias_v", kv_width, config.qkv_bias),
                                   ("bias_out", config.dim_model, config.out_bias)):
            self.register_parameter(name, nn.Parameter(torch.zeros(size)) if wanted else None)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.dim_head, config.eps)
            self.k_norm = RMSNorm(config.dim_head, config.eps)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, layer: int, start: int,
                residual: Tensor, queries: int | None = None) -> Tensor:
        """``residual`` plus the attention output, for the last ``queries`` positions if given."""
        mine = inputs if queries is None else inputs.last(queries)
        q = _heads(add_bias(project(x if queries is None else x[:, -queries:], self.project_q), self.bias_q),
                   self.dim_head)
        k = _heads(add_bias(project(x, self.project_k), self.bias_k), self.dim_head)
        v = _heads(add_bias(project(x, self.project_v), self.bias_v), self.dim_head)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, mine.cos, mine.sin), apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            k, v = cache.store(layer, start, k, v)
        out = grouped_attention(q, k, v, mine.masks[self.window])
        batch, _, length, _ = out.shape
        out = project(out.transpose(1, 2).reshape(batch, length, -1), self.attention_out, "residual", residual)
        return add_bias(out, self.bias_out)


class LatentAttention(nn.Module):
    """MiniCPM3's multi-head latent attention (DeepSeek-V2's MLA with Llama's rotation).

    Queries come through a low-rank bottleneck (``q_lora_rank``, normed) or one product; keys and
    values through one: ``project_kv_a`` gives a normed latent of ``kv_lora_rank`` and a shared
    rotary key of ``qk_rope_head_dim``; ``project_kv_b`` expands the latent to each head's no-rope
    key and its value. The cache keeps the expanded keys and values, the values zero-padded to the
    keys' width so that every family's cache and engine pool hold one shape per layer."""

    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.num_heads = self.num_kv_heads = config.num_heads
        self.nope, self.rope, self.value = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.window = config.window(layer)
        self.scale = softmax_scale(config.rope_scaling, config.qk_head_dim)
        heads = config.num_heads
        if config.q_lora_rank is None:
            self.project_q = nn.Linear(config.dim_model, heads * config.qk_head_dim, bias=False)
        else:
            self.project_q_a = nn.Linear(config.dim_model, config.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(config.q_lora_rank, 1e-6)  # HF's MLA norms keep their default eps
            self.project_q_b = nn.Linear(config.q_lora_rank, heads * config.qk_head_dim, bias=False)
        self.project_kv_a = nn.Linear(config.dim_model, self.kv_rank + self.rope, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_rank, 1e-6)
        self.project_kv_b = nn.Linear(self.kv_rank, heads * (self.nope + self.value), bias=False)
        self.attention_out = nn.Linear(heads * self.value, config.dim_model, bias=False)

    def _queries(self, x: Tensor) -> Tensor:
        if hasattr(self, "project_q"):
            return project(x, self.project_q)
        return project(autocast_input(self.q_a_norm(project(x, self.project_q_a))), self.project_q_b)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, layer: int, start: int,
                residual: Tensor, queries: int | None = None) -> Tensor:
        mine = inputs if queries is None else inputs.last(queries)
        q = _split_heads(self._queries(x if queries is None else x[:, -queries:]), self.num_heads)
        q_pass, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = project(x, self.project_kv_a).split([self.kv_rank, self.rope], dim=-1)
        kv = _split_heads(project(autocast_input(self.kv_a_norm(latent)), self.project_kv_b), self.num_heads)
        k_pass, v = kv.split([self.nope, self.value], dim=-1)
        k_rot = apply_rotary(k_rot[:, None], inputs.cos, inputs.sin).expand(-1, self.num_heads, -1, -1)
        q = torch.cat([q_pass, apply_rotary(q_rot, mine.cos, mine.sin)], dim=-1)
        k = torch.cat([k_pass, k_rot], dim=-1)
        v = F.pad(v, (0, k.size(-1) - self.value))
        if cache is not None:
            k, v = cache.store(layer, start, k, v)
        out = grouped_attention(q, k, v, mine.masks[self.window], self.scale)[..., :self.value]
        batch, _, length, _ = out.shape
        return project(out.transpose(1, 2).reshape(batch, length, -1), self.attention_out, "residual", residual)


class DecoderBlock(nn.Module):
    """``h + s * attn(norm(h))``, then the same with the MLP (``s``: the config's residual scale).

    A sub-block its config removes (``mask_modules``: pruned checkpoints) is simply absent."""

    def __init__(self, config: DecoderConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.scale = config.residual_scale
        if config.has_attention(index):
            self.attn_norm = RMSNorm(config.dim_model, config.eps)
            self.attn = LatentAttention(config, index) if config.mla else DecoderAttention(config, index)
        if config.has_ffn(index):
            self.ffn_norm = RMSNorm(config.dim_model, config.eps)
            self.ffn = FeedForward(config, activation="silu")

    def forward(self, h: Tensor, inputs: AttentionInputs, cache: KVCache | None = None, start: int = 0,
                keep: int | None = None) -> Tensor:
        """``keep``: compute the output of the last ``keep`` positions only."""
        # h + s * f == s * (h / s + f): the residual sum stays the product's epilogue.
        scale = self.scale
        if hasattr(self, "attn"):
            x = autocast_input(self.attn_norm(h))
            if keep is not None:
                h = h[:, -keep:]
            h = self.attn(x, inputs, cache, self.index, start, residual=h if scale == 1.0 else h / scale,
                          queries=keep)
            h = h if scale == 1.0 else h * scale
        elif keep is not None:
            h = h[:, -keep:]
        if hasattr(self, "ffn"):
            out = self.ffn(autocast_input(self.ffn_norm(h)), residual=h if scale == 1.0 else h / scale)
            h = out if scale == 1.0 else out * scale
        return h


class Decoder(Transformer):
    causal_prompt = True

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.input_embedding = Embedding(config.vocab_size, config.dim_model)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_layers))
        self.output_norm = RMSNorm(config.dim_model, config.eps)
        if not config.tie_word_embeddings:
            self.output_head = nn.Linear(config.dim_model, config.vocab_size, bias=False)
        with torch.device("cpu"):  # frequency tables, not weights: real even when the model is built on meta
            self.rotary = RotaryEmbedding(config.rope_theta, config.rotary_dim, config.rope_scaling, config.max_length)
        self.windows = sorted({config.window(i) for i in range(config.num_layers)}, key=lambda w: w or 0)

    @staticmethod
    def additive_mask(seen: Tensor, dtype: torch.dtype, window: int | None) -> Tensor:
        """``[B, 1, Lq, Lk]``: 0 where a key is seen (within the last ``window`` seen keys when
        windowed: keys are stored in position order), the dtype's finite minimum elsewhere."""
        if window is not None:
            seen = seen & (seen.flip(-1).cumsum(-1).flip(-1) <= window)
        bias = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
        return bias.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]

    def forward(self, input_ids: Tensor, segment: Tensor | None = None, context: Tensor | None = None,
                span: Tensor | None = None, valid: Tensor | None = None, cache: KVCache | None = None,
                position: Tensor | None = None, last: int | None = None) -> Tensor:
        """Final hidden states ``[B, L, d]`` of the given (new) positions, as ``CpmAnt.forward``."""
        seen, absolute = left_to_right(input_ids, span, valid, cache, position, self.config.max_length)
        # A table stored in float16 beside float32 norms (``keep_matrices``) computes in float32, as CPM-Ant's does.
        hidden = self.input_embedding(input_ids).to(self.output_norm.weight.dtype)
        if self.config.scale_emb != 1.0:
            hidden = hidden * self.config.scale_emb
        dtype = compute_dtype(hidden)
        cos, sin = self.rotary.cos_sin(absolute, dtype)
        inputs = AttentionInputs(cos, sin, {w: self.additive_mask(seen, dtype, w) for w in self.windows})
        decoded = native_decode.decode_step(self, hidden, cache, RMSNorm, FeedForward,
                                            lambda block: inputs.masks[block.attn.window], (cos, sin),
                                            self.config.residual_scale)
        if decoded is not None:
            return self.output_norm(decoded)
        return self.output_norm(self.run_layers(hidden, inputs, cache, last))

    def logits(self, hidden: Tensor) -> Tensor:
        """The head (MiniCPM divides its input by ``hidden / dim_model_base`` first)."""
        if self.config.logit_scale != 1.0:
            hidden = hidden / self.config.logit_scale
        if hasattr(self, "output_head"):
            return project(hidden, self.output_head)
        return super().logits(hidden)

    def head_weight(self) -> Tensor:
        """The head as one float matrix, ``logits == hidden @ head_weight().T``: MiniCPM's scale
        folded in; an untied head that is not a plain product (quantized, or carrying an adapter)
        as the matrix it computes."""
        if not hasattr(self, "output_head"):
            weight = super().head_weight()
        elif type(self.output_head) is nn.Linear:
            weight = self.output_head.weight
        elif hasattr(self.output_head, "dequantized"):
            weight = self.output_head.dequantized()
        else:
            probe = torch.eye(self.config.dim_model, dtype=self.output_norm.weight.dtype,
                              device=self.output_norm.weight.device)
            weight = self.output_head(probe).T
        return weight if self.config.logit_scale == 1.0 else weight / self.config.logit_scale

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.make_cache(batch, capacity, "the text and the new tokens")

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Llama's init: N(0, 0.02) matrices and embeddings (the projections into the residual
        stream further scaled by 1/sqrt(2 * layers), as GPT-2 and OLMo do), zero biases, unit norms."""
        init_gpt2(self, self.config.num_layers, seed)


def build_decoder(config: DecoderConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  seed: int | None = 0) -> Decoder:
    return build(Decoder, config, device, dtype, seed)


__all__ = ["AttentionInputs", "Decoder", "DecoderAttention", "DecoderBlock", "LatentAttention", "build_decoder",
           "grouped_attention"]
