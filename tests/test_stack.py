"""The shared transformer stack (``model/stack.py``) and cache (``model/cache.py``): every family
composes the same pieces under the same state-dict names, the cache fails with the one error
type, and the native step takes only the blocks it computes exactly."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cpmlive.errors import CpmliveError
from cpmlive.infer.packing import _projection_weights
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.ant.model import build_model
from cpmlive.model.bee.config import BeeConfig
from cpmlive.model.bee.model import BeeCache, build_bee
from cpmlive.model.cache import MASK_INPUTS, KVCache, SlotCache
from cpmlive.model.cpm1.config import Cpm1Config
from cpmlive.model.cpm1.model import build_cpm1
from cpmlive.model.runtime import native_decode
from cpmlive.model.stack import Attention, Block, FeedForward, GeluFeedForward, RMSNorm, Transformer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"dim_model": 32, "dim_ff": 48, "num_layers": 2, "num_heads": 4, "dim_head": 8, "half": False}


def ant_model():
    return build_model(AntConfig(vocab_size=100, **SHAPE))


def bee_model():
    return build_bee(BeeConfig(vocab_size=100, **SHAPE))


def models():
    return {"ant": ant_model(), "bee": bee_model(), "cpm1": build_cpm1(Cpm1Config(vocab_size=100, **SHAPE))}


def test_every_family_composes_the_same_stack():
    for name, model in models().items():
        assert isinstance(model, Transformer), name
        assert all(type(block) is Block and type(block.attn) is Attention for block in model.layers), name


def test_state_dict_names_of_a_layer_are_unchanged():
    layer = {name: sorted(k.split(".", 2)[2] for k in model.state_dict() if k.startswith("layers.0."))
             for name, model in models().items()}
    gated = ["attn.attention_out.weight", "attn.project_k.weight", "attn.project_q.weight", "attn.project_v.weight",
             "attn_norm.weight", "ffn.w_0.weight", "ffn.w_1.weight", "ffn.w_out.weight", "ffn_norm.weight"]
    assert layer["ant"] == layer["bee"] == gated
    assert layer["cpm1"] == [
        "attn.attention_out.weight", "attn.bias_k", "attn.bias_out", "attn.bias_q", "attn.bias_v",
        "attn.project_k.weight", "attn.project_q.weight", "attn.project_v.weight", "attn_norm.bias",
        "attn_norm.weight", "ffn.bias_in", "ffn.bias_out", "ffn.w_in.weight", "ffn.w_out.weight", "ffn_norm.bias",
        "ffn_norm.weight"]


def test_bee_blocks_scale_both_residuals_by_1_05():
    torch.manual_seed(0)
    model = bee_model().eval()
    block = model.layers[0]
    h = torch.randn(1, 5, model.config.dim_model)
    bias = torch.zeros(1, model.config.num_heads, 5, 5)
    with torch.no_grad():
        block.residual_scale = 1.0
        after_attn = block.attn(block.attn_norm(h), bias, None, 0, 0, residual=h)
        block.residual_scale = 1.05
        mid = after_attn / 1.05
        want = block.ffn(block.ffn_norm(mid), residual=mid) / 1.05
        assert torch.equal(block(h, bias), want)


@pytest.mark.parametrize("cache", [
    lambda: KVCache(batch=1, capacity=4, num_layers=1),
    lambda: BeeCache(batch=1, capacity=4, num_layers=1),
])
def test_a_full_cache_fails_with_the_one_error_type(cache):
    cache = cache()
    inputs = {name: torch.zeros(1, 5, dtype=torch.int32) for name in cache.inputs}
    with pytest.raises(CpmliveError, match="KV cache holds 4 positions, 5 needed"):
        cache.append_inputs(inputs)


def test_a_full_slot_cache_fails_with_the_one_error_type():
    masks = {name: torch.zeros(1, 2, dtype=torch.int32) for name in MASK_INPUTS}
    cache = SlotCache([None], [None], masks, torch.tensor([2]))
    with pytest.raises(CpmliveError, match="KV cache holds 2 positions, 3 needed"):
        cache.append_inputs({name: torch.zeros(1, 1, dtype=torch.int32) for name in MASK_INPUTS})
    with pytest.raises(CpmliveError, match="KV cache holds 2 positions, 4 needed"):  # a step with drafted tokens
        cache.append_inputs({name: torch.zeros(1, 2, dtype=torch.int32) for name in MASK_INPUTS})


def test_bee_cache_keeps_sample_ids_beside_the_mask_inputs():
    cache = BeeCache(batch=2, capacity=3, num_layers=1)
    assert cache.inputs == (*MASK_INPUTS, "sample_ids") and cache.sample_ids.dtype == torch.int32
    assert cache.context.dtype == cache.valid.dtype == torch.bool and cache.span.dtype == torch.int32
    cache.sample_ids[1] = 7
    cache.reorder(torch.tensor([1]))
    assert cache.batch == 1 and cache.sample_ids.tolist() == [[7, 7, 7]]


def test_the_native_step_takes_only_blocks_it_computes_exactly():
    built = models()
    assert native_decode.plan(built["ant"], RMSNorm, FeedForward) is not None
    assert native_decode.plan(built["bee"], RMSNorm, FeedForward).divisor == 1.05  # CPM-Bee's (h + branch) / 1.05
    biased = ant_model()
    biased.layers[0].attn = Attention(biased.config, biases=True)
    assert native_decode.plan(biased, RMSNorm, FeedForward) is not None  # biases are added in C
    biased.layers[0].attn.bias_q.data = biased.layers[0].attn.bias_q.data.half()
    assert native_decode.plan(biased, RMSNorm, FeedForward) is None  # but only float32 ones
    cpm1 = native_decode.plan(built["cpm1"], nn.LayerNorm, GeluFeedForward)  # LayerNorms and GPT-2's MLP too
    assert cpm1 is not None and all(block.layer_norm == 1 and block.w_1.weight is None for block in cpm1.blocks)
    assert native_decode.plan(built["cpm1"], RMSNorm, GeluFeedForward) is None  # a norm of another kind


def test_blocked_copies_are_made_for_the_bias_free_layers_only():
    built = models()
    assert len(_projection_weights(built["ant"])) == 2 * 7 + 1  # every product and the tied head
    assert _projection_weights(built["cpm1"]) == []


def test_no_name_says_cpm_ant_where_it_means_any_family():
    old_names = re.compile(r"\b(Ant" + "Cache|Ant" + "Like)\b")
    found = [f"{path.relative_to(ROOT)}:{number}" for folder in ("src", "tests", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if old_names.search(line)]
    assert not found, found


def test_importing_the_model_package_stays_light():
    code = "import sys, cpmlive.model; print(sorted(m for m in sys.modules if m.startswith(('torch', 'cpmlive.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # no torch: only the thread policy, which must run before torch starts OpenMP (model/runtime/threads.py)
    assert out.strip() == "['cpmlive.model', 'cpmlive.model.runtime', 'cpmlive.model.runtime.threads']"



def test_init_stack_zeroes_only_the_modules_the_family_names():
    """The shared init assumes no family's module (CPM-Ant's and CPM-Bee's ``position_bias``): a
    stack without one starts too, and what the family names starts at zero after every draw."""
    from cpmlive.model.stack import Embedding, init_stack

    stack = nn.ModuleDict({"w_out": nn.Linear(8, 4, bias=False), "norm": RMSNorm(4, 1e-6)})
    table, bias = Embedding(10, 4), Embedding(6, 2)
    init_stack(stack, 2, (table,), seed=3)
    drawn = {name: tensor.clone() for name, tensor in stack.state_dict().items()}
    init_stack(stack, 2, (table,), seed=3, zeroed=(bias,))
    assert all(torch.equal(drawn[name], tensor) for name, tensor in stack.state_dict().items())
    assert not bias.weight.any() and table.weight.std() < 0.1 and torch.equal(stack["norm"].weight, torch.ones(4))
    for model in (ant_model(), bee_model()):
        assert not model.position_bias.weight.any()


def test_the_families_share_the_gated_block_and_the_position_buckets():
    from cpmlive.model.stack import gated_block, relative_position_bucket

    config = AntConfig(vocab_size=100, **SHAPE)
    assert sorted(gated_block(config, 0, 1.05).state_dict()) == sorted(
        k.split(".", 2)[2] for k in ant_model().state_dict() if k.startswith("layers.0."))
    assert gated_block(config, 0, 1.05).residual_scale == 1.05
    buckets = relative_position_bucket(torch.arange(-4, 5), num_buckets=32, max_distance=128)
    assert buckets.tolist() == [4, 3, 2, 1, 0, 17, 18, 19, 20]
