"""The transformer stack every family composes: norms, the embedding, attention, the feed-forward
variants, the pre-LN block with its residual rule, the layer loop and the tied head.

What tells the families apart stays in each family's ``model.py``: how tokens are embedded,
the attention bias (masks and position schemes), which norm, FFN and residual scale its
blocks use, and how its weights start. The layers are plain bias-free ``nn.Linear`` products
(a biased layer keeps its biases beside them, ``bias_q`` ...), so that quantization, LoRA and
the CPU products (``model.runtime.kernels``) treat every family alike.
"""

from __future__ import annotations

import math
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cpmlive.config import StackConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.cache import KVCache
from cpmlive.model.runtime.kernels import attention, project
from cpmlive.model.runtime.moe import MoEFeedForward
from cpmlive.model.runtime.quant import count_parameters
from cpmlive.utils import compute_dtype


class Embedding(nn.Embedding):
    """``nn.Embedding`` without its random init on the meta device (shapes only, no values).

    Every load builds the model on meta first (``empty_model``); there torch draws ``normal_``
    through a Python reference wrapped in ``torch._dynamo.disable``, so the first meta embedding
    imports all of ``torch._dynamo``, which costs more than the rest of the load. On a real
    device the init is torch's, drawing from the same generator as before."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """Weight-only RMS norm; the normalisation is done in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # The same float32 arithmetic in one call (fewer dispatches when decoding).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def add_bias(out: Tensor, bias: Tensor | None) -> Tensor:
    """``out + bias`` (``out`` itself without one); in place outside autograd (``out`` is a
    product's own fresh tensor)."""
    if bias is None:
        return out
    bias = bias.to(out.dtype)
    return out.add_(bias) if not torch.is_grad_enabled() else out + bias


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype when autocast is on: cast once here rather than once by each
    of the projections that read it (three for attention, two for the FFN)."""
    return x.to(compute_dtype(x))


class Attention(nn.Module):
    """q, k, v and output projections around ``softmax(q kᵀ / sqrt(d_head) + bias) v``, over
    ``num_heads`` heads of ``dim_head`` (``dim_attention`` wide in all). With ``biases``, each
    projection adds its own (``bias_q``, ``bias_k``, ``bias_v``, ``bias_out``) after the product."""

    def __init__(self, config: StackConfig, biases: bool = False, scale: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.dim_head = config.num_heads, config.dim_head
        self.dropout_p = config.dropout_p
        self.scale = scale  # what q kᵀ is multiplied by (None: 1 / sqrt(dim_head))
        width = config.dim_attention
        self.project_q = nn.Linear(config.dim_model, width, bias=False)
        self.project_k = nn.Linear(config.dim_model, width, bias=False)
        self.project_v = nn.Linear(config.dim_model, width, bias=False)
        self.attention_out = nn.Linear(width, config.dim_model, bias=False)
        for name, size in (("bias_q", width), ("bias_k", width), ("bias_v", width), ("bias_out", config.dim_model)):
            self.register_parameter(name, nn.Parameter(torch.zeros(size)) if biases else None)

    @property
    def biased(self) -> bool:
        return self.bias_out is not None

    # When tensor parallelism split this module (``train.distributed``): the function that takes its
    # heads' slice of the position bias (and sums the bias's gradient over the split). None: all heads.
    tp_bias: Callable[[Tensor], Tensor] | None = None

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, -1, self.dim_head).transpose(1, 2)  # fewer heads when split

    def forward(self, x: Tensor, bias: Tensor, cache: KVCache | None, layer: int, start: int,
                residual: Tensor, queries: int | None = None) -> Tensor:
        """``residual`` plus the attention output (the sum is the output projection's epilogue);
        with ``queries``, only for the last ``queries`` positions (keys and values still cover
        them all)."""
        q = self._heads(add_bias(project(x if queries is None else x[:, -queries:], self.project_q), self.bias_q))
        k = self._heads(add_bias(project(x, self.project_k), self.bias_k))
        v = self._heads(add_bias(project(x, self.project_v), self.bias_v))
        if cache is not None:
            k, v = cache.store(layer, start, k, v)
        if self.tp_bias is not None and bias.size(1) > 1:
            bias = self.tp_bias(bias)
        out = attention(q, k, v, bias, self.dropout_p if self.training else 0.0, self.scale)
        batch, _, length, _ = out.shape
        out = project(out.transpose(1, 2).reshape(batch, length, -1), self.attention_out, "residual", residual)
        return add_bias(out, self.bias_out)


class FeedForward(nn.Module):
    """Gated GELU: ``w_out(gelu(w_0 x) * w_1 x)``; with ``activation="silu"``, SwiGLU (Llama's
    ``down(silu(gate x) * up x)``: ``w_0`` is the gate, ``w_1`` the up projection)."""

    def __init__(self, config: StackConfig, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = activation
        self.w_0 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_1 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual`` plus the FFN output (the sum is the last projection's epilogue)."""
        gated = project(x, self.w_1, "gate", project(x, self.w_0, self.activation))
        return project(gated, self.w_out, "residual", residual)


class GeluFeedForward(nn.Module):
    """GPT-2's MLP with biases: ``w_out(gelu_new(w_in x + b_in)) + b_out`` (tanh GELU; BERT's, with
    ``approximate="none"``, the erf GELU)."""

    def __init__(self, config: StackConfig, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate
        self.w_in = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)
        self.bias_in = nn.Parameter(torch.zeros(config.dim_ff))
        self.bias_out = nn.Parameter(torch.zeros(config.dim_model))

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual`` plus the MLP output."""
        hidden = F.gelu(add_bias(project(x, self.w_in), self.bias_in), approximate=self.approximate)
        return add_bias(project(hidden, self.w_out, "residual", residual), self.bias_out)


class Block(nn.Module):
    """Pre-LN block: ``h = (h + attn(norm(h))) / residual_scale``, then the same with the FFN.

    The family chooses the parts (``norm``, ``attention`` and ``ffn`` make one each); a sub-block
    its config removes (``mask_modules``, compressed checkpoints) is simply absent."""

    def __init__(self, config: StackConfig, index: int, norm: Callable[[], nn.Module],
                 attention: Callable[[], nn.Module], ffn: Callable[[], nn.Module],
                 residual_scale: float = 1.0) -> None:
        super().__init__()
        self.index = index
        self.residual_scale = residual_scale
        if config.has_attention(index):
            self.attn_norm = norm()
            self.attn = attention()
        if config.has_ffn(index):
            self.ffn_norm = norm()
            self.ffn = ffn()

    def _scaled(self, h: Tensor) -> Tensor:
        return h if self.residual_scale == 1.0 else h / self.residual_scale

    def forward(self, h: Tensor, bias: Tensor, cache: KVCache | None = None, start: int = 0,
                keep: int | None = None) -> Tensor:
        """``keep``: compute the output of the last ``keep`` positions only."""
        if hasattr(self, "attn"):
            x = autocast_input(self.attn_norm(h))
            if keep is not None:
                h, bias = h[:, -keep:], bias[:, :, -keep:]
            h = self._scaled(self.attn(x, bias, cache, self.index, start, residual=h, queries=keep))
        elif keep is not None:
            h = h[:, -keep:]
        if hasattr(self, "ffn"):
            h = self._scaled(self.ffn(autocast_input(self.ffn_norm(h)), residual=h))
        return h


def gated_block(config: StackConfig, index: int, residual_scale: float = 1.0) -> Block:
    """A pre-LN block of RMS norms, bias-free attention and the gated-GELU FFN (or its experts,
    ``config.moe``): CPM-Ant's, and CPM-Bee's with its residual scale."""
    return Block(config, index, norm=lambda: RMSNorm(config.dim_model, config.eps),
                 attention=lambda: Attention(config),
                 ffn=lambda: FeedForward(config) if config.moe is None else MoEFeedForward(config),
                 residual_scale=residual_scale)


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int,
                             bidirectional: bool = True) -> Tensor:
    """T5's buckets of ``relative`` (key minus query position); float32 ``log`` exactly as the
    reference computes it. Bidirectional: half the buckets for keys after the query; else (a
    causal decoder) every bucket for keys at or before it, later keys in bucket 0."""
    if bidirectional:
        half = num_buckets // 2
        offset = (relative > 0).to(torch.int32) * half
        distance = relative.abs()
    else:
        half, offset = num_buckets, 0
        distance = (-relative).clamp(min=0)
    max_exact = half // 2
    scaled = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    large = torch.clamp(max_exact + scaled.to(torch.int32), max=half - 1)
    return offset + torch.where(distance < max_exact, distance.to(torch.int32), large)


class Transformer(nn.Module):
    """What every family's model shares around its own embedding and attention bias: the layer
    loop over ``layers``, the head tied to ``input_embedding`` and the cache.

    A family builds ``input_embedding``, ``layers`` (of :class:`Block`) and ``output_norm``
    itself, in its own order (the order of its state dict and of its init's draws)."""

    input_embedding: nn.Module
    layers: nn.ModuleList
    output_norm: nn.Module
    # Whether a prompt token's keys and values depend only on the tokens before it (left-to-right
    # families): then the engine's prefix cache reuses any shared prefix, else only identical prompts.
    causal_prompt: bool = False
    cache_kind: type[KVCache] = KVCache  # what its decoding cache keeps (a family's own mask inputs)

    def __init__(self, config: StackConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False

    def run_layers(self, hidden: Tensor, bias: Tensor, cache: KVCache | None, last: int | None) -> Tensor:
        """The blocks' output for ``hidden``, then the cache moved past its positions. ``last``:
        the final block computes only the last ``last`` positions (a prefill needs the last
        position's output and every position's keys and values). Training without a cache
        recomputes each block's activations in the backward pass when ``gradient_checkpointing``."""
        count, start = hidden.size(1), cache.length if cache is not None else 0
        for index, block in enumerate(self.layers):
            keep = last if index == len(self.layers) - 1 else None
            if self.gradient_checkpointing and self.training and cache is None:
                hidden = checkpoint(block, hidden, bias, None, 0, keep, use_reentrant=False)
            else:
                hidden = block(hidden, bias, cache, start, keep)
        if cache is not None:
            cache.advance(count)
        return hidden

    def logits(self, hidden: Tensor) -> Tensor:
        """The tied output head over the token table."""
        head = getattr(self.input_embedding, "head", None)  # a quantized table multiplies itself
        return head(hidden) if head is not None else project(hidden, self.input_embedding.weight)

    def head_weight(self) -> Tensor:
        """The tied head's float weight (dequantized for a quantized table)."""
        dequantized = getattr(self.input_embedding, "dequantized", None)
        return dequantized() if dequantized is not None else self.input_embedding.weight

    def make_cache(self, batch: int, capacity: int, holding: str, shorten: str = "the text") -> KVCache:
        """A ``kind`` of cache for ``capacity`` positions: at most the model's ``max_length``, which
        also bounds what a huge ``max_new_tokens`` would allocate (the error names what the
        positions hold and what to shorten)."""
        if capacity > self.config.max_length:
            raise CpmliveError(f"{capacity} positions needed ({holding}); the model takes at most "
                               f"{self.config.max_length}: shorten {shorten} or lower max_new_tokens")
        return self.cache_kind(batch=batch, capacity=capacity, num_layers=self.cache_layers,
                    device=self.input_embedding.weight.device)

    def prompt_tail(self) -> list[int]:
        """Ids a prompt row ends with after its text's (an encoder-decoder's decoder start)."""
        return []

    # The module lists holding its blocks, in the order they run (an encoder-decoder's encoder first).
    block_lists: tuple[str, ...] = ("layers",)

    def blocks(self) -> list[nn.Module]:
        """Every block, in the order they run (what quantization and a memory limit go through)."""
        return [block for name in self.block_lists for block in getattr(self, name)]

    @property
    def cache_layers(self) -> int:
        """Key and value layers its decoding cache holds (an encoder-decoder's cross-attention adds its own)."""
        return self.config.num_layers

    def num_parameters(self) -> int:
        return count_parameters(self)

    def init_weights(self, seed: int | None = None) -> None:
        """Weights a model of this family trains from (each family says how they start)."""
        raise NotImplementedError


@torch.no_grad()
def init_stack(model: nn.Module, num_layers: int, embeddings: tuple[nn.Embedding, ...], seed: int | None,
               zeroed: tuple[nn.Module, ...] = ()) -> None:
    """Linear layers get std 1/sqrt(fan_in) (OpenBMB's unit-scaled N(0,1) with the scale
    folded in); the projections that write into the residual stream are further divided
    by sqrt(2 * num_layers) so the stream does not grow with depth; embeddings start small
    (std 0.02, as OpenBMB's). The family names the modules whose weights start at zero
    (``zeroed``: CPM-Ant's and CPM-Bee's position bias), after every draw."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    depth_scale = 1.0 / math.sqrt(2 * num_layers)

    def normal(tensor: Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = 1.0 / math.sqrt(module.in_features)
            if name.endswith(("attention_out", "w_out")):
                std *= depth_scale
            normal(module.weight, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    for embedding in embeddings:
        normal(embedding.weight, 0.02)
    for module in zeroed:
        module.weight.zero_()


@torch.no_grad()
def init_gpt2(model: nn.Module, num_layers: int, seed: int | None) -> None:
    """GPT-2's init (Llama's too): N(0, 0.02) matrices and embeddings, the projections into the
    residual stream further scaled by 1/sqrt(2 * layers), zero biases, unit norms."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    depth_scale = 1.0 / math.sqrt(2 * num_layers)
    for name, parameter in model.named_parameters():
        if name.endswith(("attention_out.weight", "w_out.weight")):
            std = 0.02 * depth_scale
        elif parameter.dim() == 2:
            std = 0.02
        else:
            parameter.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            continue
        parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std)


Model = TypeVar("Model", bound=Transformer)


def build(model_class: type[Model], config: StackConfig, device: str | torch.device = "cpu",
          dtype: torch.dtype | None = None, seed: int | None = 0) -> Model:
    """A freshly initialised model (``seed=None`` leaves torch's global RNG in charge)."""
    model = model_class(config)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


__all__ = ["Attention", "Block", "Embedding", "FeedForward", "GeluFeedForward", "RMSNorm", "Transformer",
           "add_bias", "autocast_input", "build", "gated_block", "init_gpt2", "init_stack", "relative_position_bucket"]
