"""The CPM-2 family's model: the shared encoder-decoder stack as the original code computes it
(``src/mpu/transformer_enc_dec.py`` of TsinghuaAI/CPM-2-Pretrain): pre-norm RMS blocks, attention
without scaling (EVA 2.0's divides by ``sqrt(dim_head)``), one relative position table per stack,
the gated tanh-GELU FFN, a token table shared by both stacks and unscaled, and its own head.

With ``experts`` (CPM-2's mixture, the ``moe`` branch's ``BaseLayer``): every FFN sub-block is a
BASE layer. Each expert is a whole sub-block (its own RMS norm, its gated FFN, the residual added)
and owns a centroid; a token goes to the expert whose centroid best matches the token as that
expert's norm sees it, and its output is that expert's, unweighted (the original's gate is commented
out). The original assigns tokens to experts by a balanced auction over the whole batch (each expert
takes an equal share), which makes a token's output depend on the other tokens of its batch; here
each token takes its best expert (the top-1 greedy assignment the original's code keeps beside it),
so a prompt decodes the same alone or in a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cpmlive.model.cpm2.config import Cpm2Config
from cpmlive.model.encoder_decoder import EncoderDecoder, FeedForwardMaker, T5FeedForward
from cpmlive.model.stack import RMSNorm, build


class Expert(nn.Module):
    """One expert of a BASE layer: ``x + ffn(norm(x))``."""

    def __init__(self, config: Cpm2Config) -> None:
        super().__init__()
        self.norm = RMSNorm(config.dim_model, config.eps)
        self.ffn = T5FeedForward(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.norm(x), residual=x)


class BaseLayer(nn.Module):
    """A BASE layer: ``centroids`` ``[experts, d]`` route each token to one of ``experts``."""

    def __init__(self, config: Cpm2Config) -> None:
        super().__init__()
        self.centroids = nn.Parameter(torch.zeros(config.experts, config.dim_model))
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.experts))

    def route(self, x: Tensor) -> Tensor:
        """Each token's expert: the best ``norm_e(x) · centroid_e``."""
        scores = torch.stack([expert.norm(x) @ self.centroids[index].to(x.dtype)
                              for index, expert in enumerate(self.experts)], dim=-1)
        return scores.argmax(-1)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """The chosen expert's output for each token (``residual`` is ``x``: the sub-block adds it itself)."""
        flat = x.reshape(-1, x.size(-1))
        choice = self.route(flat)
        out = torch.empty_like(flat)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = expert(flat[rows])
        return out.view_as(x)


class Cpm2(EncoderDecoder):
    config: Cpm2Config

    @staticmethod
    def sentinel_text(index: int) -> str:
        """The token that marks span ``index`` (the input's blanks, the output's spans)."""
        return f"<s_{index}>"

    def feed_forward(self, config: Cpm2Config) -> FeedForwardMaker:
        if not config.experts:
            return super().feed_forward(config)
        return lambda: (nn.Identity(), BaseLayer(config))


def build_cpm2(config: Cpm2Config, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               seed: int | None = 0) -> Cpm2:
    model = build(Cpm2, config, device, dtype, seed)
    if config.experts:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed or 0)
            for module in model.modules():
                if isinstance(module, BaseLayer):
                    module.centroids.copy_(torch.randn(module.centroids.shape, generator=generator) * 0.1)
    return model


__all__ = ["BaseLayer", "Cpm2", "Expert", "build_cpm2"]
