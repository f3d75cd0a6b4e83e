"""The explicit CPU attention path against PyTorch's fused kernel evaluated in float64."""

import pytest
import torch
import torch.nn.functional as F

from cpmlive.model.runtime import kernels
from cpmlive.model.runtime.kernels import attention

BATCH, HEADS, DIM = 2, 3, 16


def inputs(queries: int, keys: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and a bias with a causal mask and one fully masked (padding) query row."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, n, DIM, generator=g) for n in (queries, keys, keys))
    bias = torch.randn(BATCH, HEADS, queries, keys, generator=g)
    hidden = torch.ones(queries, keys).triu(keys - queries + 1).bool()
    bias = bias.masked_fill(hidden, torch.finfo(dtype).min)
    bias[1, :, 0] = torch.finfo(dtype).min
    return [t.to(dtype) for t in (q, k, v, bias)]


def reference(q, k, v, bias) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())


@pytest.mark.parametrize("queries,keys", [(9, 9), (1, 12), (5, 12)])
@pytest.mark.parametrize("piece", [kernels.SCORE_PIECE_ELEMENTS, 40])
def test_bf16_inference_matches_float64(monkeypatch, queries, keys, piece):
    monkeypatch.setattr(kernels, "SCORE_PIECE_ELEMENTS", piece)  # 40: one row of scores per piece
    q, k, v, bias = inputs(queries, keys, torch.bfloat16)
    with torch.no_grad():
        out = attention(q, k, v, bias)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert (out.double() - reference(q, k, v, bias)).abs().max() < 3e-2


def test_float32_single_row_matches_fused_kernel():
    q, k, v, bias = inputs(1, 12, torch.float32)
    with torch.no_grad():
        out = attention(q, k, v, bias)
    assert (out.double() - reference(q, k, v, bias)).abs().max() < 1e-5


def test_bf16_training_gradients_match_float64():
    """Training path (the bias learns): outputs and the gradients of q, k, v and the bias."""
    leaves = [t.requires_grad_() for t in inputs(9, 9, torch.bfloat16, seed=1)]
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    weight = torch.randn(BATCH, HEADS, 9, DIM, generator=torch.Generator().manual_seed(2))
    out = attention(*leaves)
    (out.float() * weight).sum().backward()
    expected = F.scaled_dot_product_attention(*doubles[:3], attn_mask=doubles[3])
    (expected * weight.double()).sum().backward()
    assert (out.double() - expected).abs().max() < 3e-2
    for name, ours, theirs in zip("qkv", leaves, doubles):
        scale = theirs.grad.abs().max()
        assert (ours.grad.double() - theirs.grad).abs().max() < 3e-2 * scale, name
    unmasked = doubles[3] > torch.finfo(torch.bfloat16).min / 2
    assert (leaves[3].grad.double() - doubles[3].grad)[unmasked].abs().max() < 3e-2 * doubles[3].grad.abs().max()


def test_float32_prompts_and_training_keep_the_fused_kernel(monkeypatch):
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    q, k, v, bias = inputs(9, 9, torch.float32)
    with torch.no_grad():
        attention(q, k, v, bias)
    attention(q.requires_grad_(), k, v, bias)
    assert len(calls) == 2
    with torch.no_grad():
        attention(*inputs(9, 9, torch.bfloat16))
    assert len(calls) == 2
