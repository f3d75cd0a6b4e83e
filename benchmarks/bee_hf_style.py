"""CPM-Bee decoding as the HF release's remote code computes it, for benchmarks only.

HF has no CPM-Bee class of its own; OpenBMB's ``modeling_cpmbee.py`` (the transformers PR that
added CPM-Bee, shipped as remote code with ``openbmb/cpm-bee-*``) keeps the original's numerics:
unscaled weights with every product divided by ``sqrt(fan_in)`` at run time, the embedding
divided by ``sqrt(d)``, scores divided by ``sqrt(dim_head)`` plus the position bias, softmax, the
gated GELU FFN, residuals divided by 1.05, the head reading ``h / sqrt(d)``, and a cache that
grows by concatenation every step. This module is that computation, written from that
description over the OpenBMB state dict, so that ``native_families.py`` can time our decoding
against an HF-style one on the same weights. The attention bias (position buckets and masks) is
our model's :meth:`~cpmlive.model.bee.model.CpmBee.attention_bias`, computed at every step here
as the remote code computes its own: both sides pay for it alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmlive.data.bee import Beam, advanced, batch_prompts, prompt_for
from cpmlive.model.bee.model import RESIDUAL_SCALE, CpmBee, rotate_by_sub
from cpmlive.model.openbmb import ours_to_openbmb

MASK_NAMES = ("context", "span", "segment", "valid", "position", "sample_ids")


class HfStyleBee:
    """The forward pass of ``CpmBeeForCausalLM`` over OpenBMB's unscaled weights."""

    def __init__(self, model: CpmBee) -> None:
        self.ours, self.config = model, model.config
        self.weights = {k: v.float() for k, v in ours_to_openbmb(model.state_dict(), model.config).items()}

    def linear(self, x: Tensor, name: str) -> Tensor:
        weight = self.weights[name]
        return F.linear(x, weight) / math.sqrt(weight.size(1))

    def norm(self, x: Tensor, name: str) -> Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.config.eps) * self.weights[name]

    def embed(self, ids: Tensor, sub: Tensor) -> Tensor:
        hidden = F.embedding(ids.long(), self.weights["input_embedding.weight"]) / math.sqrt(self.config.dim_model)
        return rotate_by_sub(hidden, sub, self.ours.inv_freq(hidden.device))

    def attention(self, x: Tensor, prefix: str, bias: Tensor, past: tuple[Tensor, Tensor] | None
                  ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        cfg = self.config
        batch, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, length, cfg.num_heads, cfg.dim_head).transpose(1, 2)

        query = heads(self.linear(x, f"{prefix}.project_q.weight"))
        key = heads(self.linear(x, f"{prefix}.project_k.weight"))
        value = heads(self.linear(x, f"{prefix}.project_v.weight"))
        if past is not None:
            key, value = torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)
        score = query @ key.transpose(-1, -2) / math.sqrt(cfg.dim_head) + bias
        hidden = score.softmax(-1) @ value
        hidden = hidden.transpose(1, 2).reshape(batch, length, -1)
        return self.linear(hidden, f"{prefix}.attention_out.weight"), (key, value)

    def forward(self, ids: Tensor, sub: Tensor, bias: Tensor, past: list) -> tuple[Tensor, list]:
        hidden = self.embed(ids, sub)
        present = []
        for layer in range(self.config.num_layers):
            base = f"encoder.layers.{layer}"
            if self.config.has_attention(layer):
                out, kv = self.attention(self.norm(hidden, f"{base}.self_att.layernorm_before_attention.weight"),
                                         f"{base}.self_att.self_attention", bias, past[layer] if past else None)
                hidden = (hidden + out) / RESIDUAL_SCALE
                present.append(kv)
            else:
                present.append(None)
            if self.config.has_ffn(layer):
                x = self.norm(hidden, f"{base}.ffn.layernorm_before_ffn.weight")
                ffn = f"{base}.ffn.ffn"
                gate = F.gelu(self.linear(x, f"{ffn}.w_in.w_0.weight"))
                out = self.linear(gate * self.linear(x, f"{ffn}.w_in.w_1.weight"), f"{ffn}.w_out.weight")
                hidden = (hidden + out) / RESIDUAL_SCALE
        return self.norm(hidden, "encoder.output_layernorm.weight"), present

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden / math.sqrt(self.config.dim_model), self.weights["input_embedding.weight"])


@torch.inference_mode()
def greedy_answer(model: HfStyleBee, tokenizer, task: dict, steps: int) -> list[int]:
    """Greedy decoding of a one-answer task for ``steps`` steps at most (ordinary columns; the
    task holds no extra tokens), its columns as :func:`cpmlive.infer.bee.fill_tasks` returns them."""
    prompt = prompt_for(tokenizer, task)
    inputs = batch_prompts([prompt], tokenizer.vocab_size).inputs
    zeros = torch.zeros_like(inputs["input_ids"])
    keys = {name: inputs[name] if name in inputs else zeros for name in MASK_NAMES}
    keys["context"], keys["valid"] = keys["context"].bool(), keys["valid"].bool()
    query = {**keys, "num_segments": inputs["num_segments"], "segment_rel": inputs["segment_rel"],
             "segment_rel_offset": inputs["segment_rel_offset"]}
    bias = model.ours.attention_bias(query, keys, torch.float32)
    _, past = model.forward(inputs["input_ids"], inputs["input_sub"], bias, [])
    beam, columns = Beam(0, [], tokenizer.bos_id, 0, prompt.answers[0][0], 0), []
    one = torch.ones(1, 1, dtype=torch.bool)
    for _ in range(steps):
        step = {"context": one, "span": torch.zeros(1, 1, dtype=torch.int32), "valid": one,
                "segment": torch.tensor([[beam.segment]], dtype=torch.int32),
                "position": torch.tensor([[beam.position]], dtype=torch.int32),
                "sample_ids": torch.zeros(1, 1, dtype=torch.int32)}
        keys = {name: torch.cat([keys[name], step[name]], dim=1) for name in MASK_NAMES}
        query = {**step, "num_segments": torch.tensor([[prompt.num_segments]], dtype=torch.int32),
                 "segment_rel": inputs["segment_rel"], "segment_rel_offset": torch.zeros(1, 1, dtype=torch.int32)}
        bias = model.ours.attention_bias(query, keys, torch.float32)
        hidden, past = model.forward(torch.tensor([[beam.feed]]), torch.tensor([[beam.feed_sub]]), bias, past)
        logits = model.logits(hidden[:, -1]).float()
        logits[:, tokenizer.unk_id] = -10000.0
        column = int(logits.argmax(-1))
        columns.append(column)
        if column == tokenizer.eos_id:
            break
        beam = advanced(beam, column, prompt, None, tokenizer.eos_id, tokenizer.bos_id, tokenizer.vocab_size)
    return columns


__all__ = ["HfStyleBee", "greedy_answer"]
