"""2:4 sparsity: the mask against torch.ao's block sparsifier, wanda's activation-aware scores,
and the pattern kept through fine-tuning and quantization in `cpmlive compress`."""

import pytest
import torch
from torch.ao.pruning import WeightNormSparsifier

from cpmlive.compress.pipeline import compress
from cpmlive.compress.quantize import calibration_batches
from cpmlive.compress.sparsity import block_linears, follows_2of4, input_norms, mask_2of4, sparsify_2of4
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import load_model
from cpmlive.model.runtime.quant import dequantize_state
from cpmlive.model.checkpoint import read_weights

from tiny_store import make_model_and_store, recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_model_and_store(tmp_path_factory.mktemp("sparsity"))


def test_magnitude_mask_matches_torch_ao_block_sparsifier():
    layer = torch.nn.Sequential(torch.nn.Linear(32, 12, bias=False))
    weight = layer[0].weight.detach().clone()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(layer, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    reference = layer[0].parametrizations.weight[0].mask
    assert torch.equal(mask_2of4(weight.abs()), reference)


def test_wanda_weighs_each_weight_by_its_input_channel():
    model = build_model(preset("tiny"), seed=0).eval()
    rows = [torch.randint(10, 1000, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    batches = calibration_batches(rows, 6, model.config.prompt_length)
    norms = input_norms(model, batches)
    name = "layers.0.ffn.w_out"
    expected = mask_2of4(block_linears(model)[name].weight.abs() * norms[name][None, :])
    masks = sparsify_2of4(model, "wanda", batches)
    assert torch.equal(masks[name], expected)
    assert all(follows_2of4(layer.weight) for layer in block_linears(model).values())
    magnitude = sparsify_2of4(build_model(preset("tiny"), seed=0), "magnitude")
    assert not torch.equal(magnitude[name], masks[name])
    with pytest.raises(CpmliveError, match="wanda needs calibration"):
        sparsify_2of4(build_model(preset("tiny"), seed=0), "wanda")


def test_the_pattern_survives_fine_tuning_and_int8(setup, tmp_path):
    model_dir, data = setup
    steps = [{"sparse24": {"method": "wanda", "steps": 4, "lr": 0.001}}, {"quantize": {"bits": 8}}]
    out = compress(model_dir, tmp_path / "sparse", recipe(data, steps=steps))
    tuned = load_model(tmp_path / "sparse.run" / "step-1-sparse24" / "done")
    original = load_model(model_dir)
    assert not torch.equal(tuned.layers[0].ffn.w_0.weight, original.layers[0].ffn.w_0.weight)
    assert all(follows_2of4(layer.weight) for layer in block_linears(tuned).values())
    weights = dequantize_state(read_weights(out))
    assert (follows_2of4(weights["layers.1.attn.project_q.weight"])
            and follows_2of4(weights["layers.0.ffn.w_out.weight"]))


def test_only_quantize_may_follow_sparse24(setup):
    _, data = setup
    with pytest.raises(CpmliveError, match="only quantize may follow sparse24"):
        recipe(data, steps=[{"sparse24": {}}, {"distill": {"steps": 2}}])
    with pytest.raises(CpmliveError, match="method must be one of"):
        recipe(data, steps=[{"sparse24": {"method": "random"}}])
