"""`cpmlive compress`: a recipe of prune -> distill -> quantize on a tiny model and store, its
output in the other verbs, exact resume of an interrupted step, and bad recipes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmlive.compress.pipeline import CompressRecipe, compress
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import load_model, read_weights
from tiny_store import make_model_and_store, recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    return make_model_and_store(tmp_path_factory.mktemp("compress"))


def test_prune_distill_quantize_gives_a_model_every_verb_reads(setup, tmp_path):
    model_dir, data = setup
    out = compress(model_dir, tmp_path / "small", recipe(data))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["method"] == "gptq" and config["quantization"]["bits"] == 4
    original, small = load_model(model_dir), load_model(out)
    assert small.config.num_heads * small.config.dim_ff < original.config.num_heads * original.config.dim_ff
    assert sum(f.stat().st_size for f in out.iterdir()) < sum(f.stat().st_size for f in model_dir.iterdir())
    steps = sorted(p.name for p in (tmp_path / "small.run").iterdir() if p.is_dir())
    assert steps == ["step-1-prune", "step-2-distill", "step-3-quantize"]
    assert (tmp_path / "small.run" / "compress-run.json").is_file()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "cpmlive", "generate", str(out), "今天", "--max-new-tokens", "3"],
                            capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    info = subprocess.run([sys.executable, "-m", "cpmlive", "info", str(out), "--json"], capture_output=True, env=env,
                          timeout=300)
    described = json.loads(info.stdout)
    assert described["compression"].startswith(f"from {model_dir}")
    assert "prune" in described["compression"] and "quantize" in described["compression"]
    assert described["quantization"].startswith("int4-g16 (gptq")


def test_an_interrupted_step_resumes_exactly(setup, tmp_path):
    model_dir, data = setup
    steps = [{"prune": {"target": 0.5, "steps": 6, "target_warmup_steps": 3}}]
    full = compress(model_dir, tmp_path / "full", recipe(data, steps=steps))
    # the same run stopped after step 3 of 6 (its checkpoint), then continued
    first = compress(model_dir, tmp_path / "half", recipe(data, steps=[{"prune": {**steps[0]["prune"], "steps": 3}}]))
    assert first.is_dir()
    import shutil

    shutil.rmtree(tmp_path / "half")
    shutil.rmtree(tmp_path / "half.run" / "step-1-prune" / "done")
    run = tmp_path / "half.run" / "step-1-prune"
    state = torch.load(run / "checkpoints" / "step-0000003" / "trainer.pt", weights_only=False)
    assert state["step"] == 3
    with pytest.raises(CpmliveError, match="--resume auto"):
        compress(model_dir, tmp_path / "half", recipe(data, steps=steps))
    resumed = compress(model_dir, tmp_path / "half", recipe(data, steps=steps), resume="auto")
    ours, theirs = read_weights(resumed), read_weights(full)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("steps, message", [
    ([{"quantize": {"bits": 8}}, {"distill": {"steps": 2}}], "quantize must be the last step"),
    ([{"prune": {"target": 0.5}}, {"prune": {"target": 0.3}}], "one prune step"),
    ([{"prune": {"target": 1.5}}], "target"),
    ([{"prune": {"target": 0.0}}], "target"),
    ([{"quantize": {"bits": 3}}], "bits must be 8 or 4"),
    ([{"shrink": {}}], "unknown step 'shrink'"),
    ([], "steps is empty"),
    ([{"distill": {"steps": 2, "temperature": -1}}], "temperature"),
])
def test_bad_recipes_are_refused_before_anything_runs(setup, steps, message):
    _, data = setup
    with pytest.raises(CpmliveError, match=message):
        recipe(data, steps=steps)


def test_compress_cli_bad_input_is_one_line_and_writes_nothing(setup, tmp_path):
    model_dir, data = setup
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {data}\nsteps:\n  - quantize: {{bits: 4}}\n  - prune: {{target: 0.5}}\n", encoding="utf-8")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "cpmlive", "compress", str(model_dir), str(tmp_path / "out"),
                             "--recipe", str(bad)], capture_output=True, env=env, timeout=300)
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "quantize must be the last step" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_qat_trains_through_the_final_rounding_and_resumes_exactly(setup, tmp_path):
    model_dir, data = setup
    steps = [{"qat": {"steps": 6, "lr": 0.001}}, {"quantize": {"bits": 4, "group_size": 32}}]
    out = compress(model_dir, tmp_path / "qat", recipe(data, steps=steps))
    trained = load_model(tmp_path / "qat.run" / "step-1-qat" / "done")
    original = load_model(model_dir)
    assert not torch.equal(trained.layers[0].ffn.w_0.weight, original.layers[0].ffn.w_0.weight)
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32
    before = {k: v.clone() for k, v in read_weights(out).items()}
    import shutil

    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "qat.run" / "step-1-qat" / "done")
    shutil.rmtree(tmp_path / "qat.run" / "step-1-qat" / "checkpoints" / "step-0000006")
    (tmp_path / "qat.run" / "step-1-qat" / "checkpoints" / "latest").write_text("step-0000003\n")
    shutil.rmtree(tmp_path / "qat.run" / "step-2-quantize", ignore_errors=True)
    again = read_weights(compress(model_dir, tmp_path / "qat", recipe(data, steps=steps), resume="auto"))
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again)
    resumed = load_model(tmp_path / "qat.run" / "step-1-qat" / "done")
    assert torch.equal(resumed.layers[0].ffn.w_0.weight, trained.layers[0].ffn.w_0.weight)


def test_fake_quantized_layers_round_forward_and_pass_gradients_straight_through():
    from cpmlive.compress.qat import FakeQuantLinear
    from cpmlive.config import QuantConfig
    from cpmlive.model.runtime import quant

    base = torch.nn.Linear(64, 32, bias=False)
    layer = FakeQuantLinear(base, QuantConfig(bits=4, group_size=32))
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    expected = x @ quant.dequantize_int4(*quant.quantize_int4(base.weight, 32), 32).T
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert torch.allclose(base.weight.grad, torch.ones(32, 5) @ x.detach())


@pytest.mark.parametrize("steps, message", [
    ([{"qat": {"steps": 2}}], "right before a final quantize"),
    ([{"qat": {"steps": 2}}, {"distill": {"steps": 2}}, {"quantize": {"bits": 8}}], "right before a final quantize"),
    ([{"qat": {"steps": 2, "lr": "1e-4"}}, {"quantize": {"bits": 8}}], "write 1.0e-4"),
])
def test_bad_qat_recipes_are_refused(setup, steps, message):
    _, data = setup
    with pytest.raises(CpmliveError, match=message):
        recipe(data, steps=steps)


def test_moefy_step_writes_a_model_the_verbs_read(setup, tmp_path):
    model_dir, data = setup
    steps = [{"moefy": {"experts": 8, "top_k": 2, "router": "mlp", "router_steps": 20}}]
    out = compress(model_dir, tmp_path / "moe", recipe(data, steps=steps))
    loaded = load_model(out)
    assert loaded.config.moe.experts == 8 and type(loaded.layers[0].ffn).__name__ == "MoEFeedForward"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    info = json.loads(subprocess.run([sys.executable, "-m", "cpmlive", "info", str(out), "--json"],
                                     capture_output=True, env=env, timeout=300).stdout)
    assert info["moe"] == "8 experts per FFN, top-2, mlp router"
    result = subprocess.run([sys.executable, "-m", "cpmlive", "generate", str(out), "今天", "--max-new-tokens", "3"],
                            capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize("steps, message", [
    ([{"moefy": {"experts": 8}}, {"quantize": {"bits": 8}}], "moefy must be the last step"),
    ([{"moefy": {"experts": 8, "top_k": 9}}], "top_k"),
    ([{"moefy": {"router": "best"}}], "router must be one of"),
])
def test_bad_moefy_recipes_are_refused(setup, steps, message):
    _, data = setup
    with pytest.raises(CpmliveError, match=message):
        recipe(data, steps=steps)


@pytest.mark.parametrize("model", ["cpm1-demo", "bee-demo"])
def test_resume_reloads_a_finished_step_through_the_models_family(model, tmp_path):
    """A finished step's model is read back by its own family's loader, not CPM-Ant's."""
    steps = CompressRecipe(steps=[{"quantize": {"bits": 8}}], progress=False)
    first = read_weights(compress(model, tmp_path / "q", steps))
    import shutil

    shutil.rmtree(tmp_path / "q")  # the run's finished step stays in q.run/
    resumed = read_weights(compress(model, tmp_path / "q", steps, resume="auto"))
    assert resumed.keys() == first.keys() and all(torch.equal(resumed[k], first[k]) for k in first)
