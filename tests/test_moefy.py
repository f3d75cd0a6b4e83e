"""MoEfication: balanced experts, exactness with every expert on, the routers against the
oracle, and the activation sparsity of gated GELU."""

import pytest
import torch
import torch.nn.functional as F

from cpmlive.compress.moefy import activation_sparsity, balanced_clusters, ffn_inputs, moefy, train_router
from cpmlive.compress.quantize import calibration_batches
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import build_model

CONFIG = AntConfig.from_dict({**preset("tiny").to_dict(), "dim_ff": 256})


def model_and_batches():
    model = build_model(CONFIG, seed=3).eval()
    rows = [torch.randint(10, 3000, (60,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    return model, calibration_batches(rows, 6, CONFIG.prompt_length)


def logits(model, batch):
    with torch.no_grad():
        return model.logits(model(**batch.as_inputs()))


def test_balanced_clusters_are_equal_and_tighter_than_chance():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 32, generator=generator)
    vectors = centres.repeat_interleave(16, 0) + 0.3 * torch.randn(128, 32, generator=generator)
    assignment = balanced_clusters(vectors, 8)
    assert torch.bincount(assignment, minlength=8).tolist() == [16] * 8
    units = F.normalize(vectors, dim=1)

    def cohesion(labels):
        return sum((units[labels == c] @ units[labels == c].T).mean() for c in range(8)) / 8

    assert cohesion(assignment) > cohesion(torch.randperm(128, generator=generator) % 8) + 0.2
    with pytest.raises(CpmliveError, match="do not split"):
        balanced_clusters(vectors, 7)


def test_every_expert_on_is_the_dense_model():
    model, batches = model_and_batches()
    dense = logits(model, batches[0])
    moefy(model, experts=8, top_k=8)
    assert torch.allclose(logits(model, batches[0]), dense, atol=1e-4, rtol=1e-4)
    layer = model.layers[0].ffn
    x = torch.randn(1, 1, CONFIG.dim_model)
    residual = torch.zeros_like(x)
    with torch.no_grad():
        one_row = layer(x, residual)
        both = layer(torch.cat([x, x], dim=1), torch.cat([residual, residual], dim=1))
    assert torch.allclose(one_row[0, 0], both[0, 0], atol=1e-5)


def test_routers_against_the_oracle():
    model, batches = model_and_batches()
    dense = logits(model, batches[0])
    errors = {}
    for router in ("oracle", "similarity"):
        candidate = build_model(CONFIG, seed=3).eval()
        moefy(candidate, experts=8, top_k=2, router=router)
        errors[router] = (logits(candidate, batches[0]) - dense).norm().item()
    assert errors["oracle"] < errors["similarity"]
    trained = build_model(CONFIG, seed=3).eval()
    inputs = ffn_inputs(trained, batches)
    layers = moefy(trained, experts=8, top_k=2, router="mlp")
    recall = train_router(layers[0], inputs[0], steps=200)
    assert recall > 0.5 > 2 / 8
    with pytest.raises(CpmliveError, match="top_k"):
        moefy(build_model(CONFIG), experts=8, top_k=9)
    with pytest.raises(CpmliveError, match="do not split dim_ff"):
        moefy(build_model(CONFIG), experts=7, top_k=2)
    with pytest.raises(CpmliveError, match="already MoEfied"):
        moefy(trained, experts=8, top_k=2)


def test_gated_gelu_is_not_relu_sparse():
    model, batches = model_and_batches()
    report = activation_sparsity(model, batches)
    assert report["exactly 0"] < 0.01
    assert 0 <= report["< 0.01 x row max"] <= report["< 0.1 x row max"] <= 1


def test_a_moefied_model_saves_loads_and_exports_dense_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from cpmlive.model.checkpoint import load_model, save_checkpoint
    from cpmlive.model.ant.convert import convert

    from conftest import ANT_VOCAB

    model, batches = model_and_batches()
    dense = logits(model, batches[0])
    inputs = ffn_inputs(model, batches)
    layers = moefy(model, experts=8, top_k=2, router="mlp")
    train_router(layers[0], inputs[0], steps=20)
    path = save_checkpoint(model, model.config, tmp_path / "moe", vocab=ANT_VOCAB)
    loaded = load_model(path)
    assert loaded.config.moe.experts == 8 and loaded.config.moe.router == "mlp"
    assert torch.allclose(logits(loaded, batches[0]), logits(model, batches[0]), atol=1e-5)
    convert(path, tmp_path / "hf", to="hf")  # HF has no MoE: every expert, i.e. the dense model
    hf = transformers.CpmAntForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[6, 100, 200, 300, 400]])
    from cpmlive.data.layout import GENERATION, build_batch

    batch = build_batch([ids[0].tolist()], GENERATION, CONFIG.prompt_length)
    original = build_model(CONFIG, seed=3).eval()
    with torch.no_grad():
        expected = original.logits(original(**batch.as_inputs()))[0, -1]
        got = hf(input_ids=ids).logits[0, -1, :CONFIG.vocab_size]
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
    assert dense.shape == logits(loaded, batches[0]).shape
