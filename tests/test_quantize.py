"""Quantization: the formats against torch's own quantizers, the kernels against the
dequantized product, GPTQ against round-to-nearest, and quantized checkpoints through the verbs
(load, generate, evaluate, convert back to float and to HF, bad input)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpmlive.compress.quantize import (
    HessianCollector, awq_scale_block, awq_search, block_input_samples, calibration_batches, fake_quantized,
    gptq_codes, quantize_model, rtn_codes,
)
from cpmlive.model.ant.config import AntConfig
from cpmlive.config import QuantConfig
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.model.runtime import quant
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import load_model, read_weights, save_checkpoint

from conftest import ANT_VOCAB
from test_cli import assert_clean_error, run

TEXT = "新华社北京1月5日电，国务院总理今天会见了外国客人，双方就共同关心的问题交换了意见。"


def random_model(seed: int = 1):
    config = preset("tiny")
    model = build_model(config, seed=seed)
    with torch.no_grad():  # a non-zero position bias, so that attention patterns matter
        model.position_bias.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = random_model()
    save_checkpoint(model, model.config, path, vocab=ANT_VOCAB)
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text("\n".join([TEXT] * 20) + "\n", encoding="utf-8")
    return path


# ---- formats against torch's quantizers ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_int8_codes_match_torch_quantize_per_channel():
    weight = torch.randn(48, 64) * torch.rand(48, 1) * 3
    codes, scale = quant.quantize_int8(weight)
    reference = torch.quantize_per_channel(weight, scale.double(), torch.zeros(48, dtype=torch.long), 0, torch.qint8)
    assert torch.equal(codes, reference.int_repr())
    assert torch.allclose(quant.dequantize_int8(codes, scale), reference.dequantize())
    assert (weight - quant.dequantize_int8(codes, scale)).abs().max() <= scale.max() / 2 + 1e-6


def test_int4_groups_match_torch_fake_quantize():
    weight = torch.randn(16, 96)
    packed, scale, zero = quant.quantize_int4(weight, 32)
    assert packed.shape == (16, 48) and scale.shape == zero.shape == (16, 3)
    groups = weight.view(-1, 32)
    reference = torch.fake_quantize_per_channel_affine(groups, scale.view(-1), zero.view(-1).int(), 0, 0, 15)
    ours = quant.dequantize_int4(packed, scale, zero, 32).view(-1, 32)
    mismatched = (ours - reference).abs() > 1e-5
    # torch multiplies by 1/scale, we divide by scale: a value exactly between two codes may
    # round the other way, one step apart; nothing else may differ.
    assert mismatched.float().mean() < 1e-3
    assert ((ours - reference).abs() <= scale.view(-1, 1) * 1.001).all()


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(codes)), codes)
    assert quant.pack_int4(codes)[0, 0] == codes[0, 0] | (codes[0, 1] << 4)


# ---- kernels against the dequantized product ----------------------------------------------------


@pytest.mark.parametrize("config", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)],
                         ids=["int8", "int4-g32"])
def test_weight_only_kernels_equal_the_dequantized_product(config):
    weight, x = torch.randn(96, 128), torch.randn(3, 7, 128)
    layer = quant.QuantizedLinear(128, 96, config)
    layer.set_codes(*rtn_codes(weight, config))
    expected = F.linear(x, layer.dequantized())
    with torch.inference_mode():  # many rows (dequantized product) and few (torch's packed kernels)
        assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
        assert torch.allclose(layer(x[:1, :2]), expected[:1, :2], atol=1e-4, rtol=1e-4)
    # with a gradient to pass back (QLoRA), the same product through autograd
    x.requires_grad_(True)
    out = layer(x)
    out.sum().backward()
    assert (torch.allclose(out, expected, atol=1e-4)
            and torch.allclose(x.grad, layer.dequantized().sum(0).expand_as(x), atol=1e-4))


def test_w8a8_equals_per_token_fake_quantized_inputs():
    """Each row on its own grid: rows scaled to absolute maximum 1, then one 7-bit asymmetric grid
    over their range (what fbgemm's dynamic product does to its input), outputs scaled back."""
    weight, x = torch.randn(96, 128), torch.randn(5, 128) * torch.rand(5, 1) * 10
    layer = quant.QuantizedLinear(128, 96, QuantConfig(bits=8, activations="int8"))
    layer.set_codes(*quant.quantize_int8(weight))
    peak = x.abs().amax(1, keepdim=True)
    normalised = x / peak
    low, high = min(normalised.min().item(), 0.0), max(normalised.max().item(), 0.0)
    scale = (high - low) / 127
    zero = int(round(-low / scale))
    fake = torch.fake_quantize_per_tensor_affine(normalised, scale, zero, 0, 127) * peak
    expected = F.linear(fake, layer.dequantized())
    with torch.inference_mode():
        got = layer(x)
    # fbgemm does not expose its exact rounding; its output is that of the reference grid to
    # well within the grid's own error (~1.3% here).
    assert (got - expected).norm() / expected.norm() < 5e-3
    exact = F.linear(x, layer.dequantized())
    assert (got - exact).norm() / exact.norm() < 0.03


# ---- GPTQ ------------------------------------------------------------------------------------


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    return (torch.randn(rows, features, generator=generator) @ mixing
            + 0.3 * torch.randn(rows, features, generator=generator))


@pytest.mark.parametrize("config", [QuantConfig(bits=8, method="gptq"),
                                    QuantConfig(bits=4, group_size=32, method="gptq")],
                         ids=["int8", "int4-g32"])
def test_gptq_beats_round_to_nearest_on_the_layer_output(config):
    weight, x = torch.randn(64, 128), correlated_inputs(512, 128)
    collector = HessianCollector(torch.nn.Linear(128, 64, bias=False))
    collector.add(x)
    assert torch.allclose(collector.hessian, 2 * x.double().T @ x.double() / 512)

    def output_error(codes) -> float:
        layer = quant.QuantizedLinear(128, 64, config)
        layer.set_codes(*codes)
        return (F.linear(x, layer.dequantized()) - F.linear(x, weight)).pow(2).sum().item()

    gptq, rtn = output_error(gptq_codes(weight, collector.hessian, config)), output_error(rtn_codes(weight, config))
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal Hessian no rounding error is passed on: GPTQ's codes are RTN's."""
    weight = torch.randn(32, 64)
    config = QuantConfig(bits=4, group_size=16, method="gptq")
    hessian = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    for ours, reference in zip(gptq_codes(weight, hessian, config), rtn_codes(weight, config)):
        assert torch.allclose(ours.float(), reference.float(), atol=1e-5)


# ---- AWQ -------------------------------------------------------------------------------------


def test_awq_scales_fold_without_changing_what_the_block_computes():
    model = random_model()
    batch = tokens_batches(model, 1)[0]
    with torch.inference_mode():
        before = model(**batch.as_inputs())
    block = model.layers[0]
    samples = block_input_samples(model, block, tokens_batches(model))
    assert set(samples) == {"attn.project_q", "attn.project_k", "attn.project_v", "attn.attention_out",
                            "ffn.w_0", "ffn.w_1", "ffn.w_out"}
    norm_before = block.attn_norm.weight.clone()
    awq_scale_block(block, samples, QuantConfig(bits=4, group_size=32, method="awq"))
    with torch.inference_mode():
        after = model(**batch.as_inputs())
    assert not torch.equal(norm_before, block.attn_norm.weight)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)


def test_awq_protects_the_channels_with_large_activations():
    """Inputs with a few outlier channels (what LLM activations look like): AWQ's scaled
    rounding reproduces the layer's output better than plain rounding."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=generator)
    x[:, :4] *= 30
    weight = torch.randn(64, 128, generator=generator)
    config = QuantConfig(bits=4, group_size=32, method="awq")
    scale = awq_search(x, [weight], config)
    exact = x @ weight.T
    awq = (x / scale) @ fake_quantized(weight * scale, config).T
    rtn = x @ fake_quantized(weight, config).T
    assert (awq - exact).pow(2).mean() < 0.8 * (rtn - exact).pow(2).mean()


# ---- whole models ------------------------------------------------------------------------------


def tokens_batches(model, count: int = 2):
    rows = [torch.randint(10, 1000, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(count)]
    return calibration_batches(rows, bos_id=6, prompt_length=model.config.prompt_length)


@pytest.mark.parametrize("config", [QuantConfig(bits=8), QuantConfig(bits=8, activations="int8"),
                                    QuantConfig(bits=4, group_size=32),
                                    QuantConfig(bits=4, group_size=32, method="gptq"),
                                    QuantConfig(bits=4, group_size=32, method="awq")],
                         ids=["int8", "w8a8", "int4-rtn", "int4-gptq", "int4-awq"])
def test_quantized_model_saves_loads_and_tracks_the_float_model(config, tmp_path):
    model = random_model()
    batch = tokens_batches(model, 1)[0]
    with torch.inference_mode():
        reference = model.logits(model(**batch.as_inputs()))
    quantized = quantize_model(random_model(), config, tokens_batches(model))
    path = save_checkpoint(quantized, quantized.config, tmp_path / "q", vocab=ANT_VOCAB)
    stored = read_weights(path)
    assert stored["layers.0.ffn.w_0.weight"].dtype == (torch.int8 if config.bits == 8 else torch.uint8)
    assert stored["input_embedding.weight"].dtype == torch.int8
    assert json.loads((path / "config.json").read_text())["quantization"]["bits"] == config.bits
    loaded = load_model(path)
    with torch.inference_mode():
        ours = loaded.logits(loaded(**batch.as_inputs()))
        again = quantized.logits(quantized(**batch.as_inputs()))
    assert torch.allclose(ours, again, atol=1e-5)
    relative = (ours - reference).norm() / reference.norm()
    assert relative < (0.05 if config.bits == 8 else 0.3), relative.item()


def test_quantizing_twice_is_refused():
    model = quantize_model(random_model(), QuantConfig(bits=8))
    with pytest.raises(CpmliveError, match="already quantized"):
        quantize_model(model, QuantConfig(bits=8))


def test_bad_quantization_configs_are_refused():
    for bad in [dict(bits=3), dict(bits=8, group_size=64), dict(bits=4, group_size=3), dict(method="best"),
                dict(bits=4, activations="int8")]:
        with pytest.raises(CpmliveError):
            QuantConfig(**bad)
    with pytest.raises(CpmliveError, match="unknown key"):
        AntConfig.from_dict({**preset("tiny").to_dict(), "quantization": {"bits": 8, "colour": 1}})


# ---- the verbs -----------------------------------------------------------------------------------


def test_quantize_verb_then_generate_info_evaluate_and_convert(checkpoint, calibration, tmp_path):
    out = tmp_path / "int4"
    result = run("quantize", checkpoint, out, "--bits", "4", "--group-size", "32", "--method", "gptq",
                 "--calibration", calibration, "--samples", "4", "--sample-tokens", "32")
    assert result.returncode == 0, result.stderr.decode()
    info = json.loads(run("info", out, "--json").stdout)
    assert info["quantization"].startswith("int4-g32 (gptq, calibrated on")
    assert info["config"]["quantization"]["calibration"]["file"] == "calibration.txt"
    assert info["size_bytes"] < 0.5 * sum(f.stat().st_size for f in checkpoint.iterdir())
    generated = run("generate", out, "今天", "--max-new-tokens", "4", "--json")
    assert generated.returncode == 0, generated.stderr.decode()
    assert len(json.loads(generated.stdout)["ids"]) >= 1
    evaluated = run("evaluate", out, "--text", calibration, "--json")
    assert evaluated.returncode == 0, evaluated.stderr.decode()

    float_dir = tmp_path / "float"
    assert run("convert", out, float_dir, "--dequantize").returncode == 0
    dequantized = quant.dequantize_state(read_weights(out))
    assert all(torch.equal(dequantized[k], v) for k, v in read_weights(float_dir).items())
    assert "quantization" not in json.loads((float_dir / "config.json").read_text())


def test_quantized_checkpoint_exports_to_hf_transformers(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, hf_dir = tmp_path / "int8", tmp_path / "hf"
    assert run("quantize", checkpoint, out, "--bits", "8").returncode == 0
    assert run("convert", out, hf_dir, "--to", "hf").returncode == 0
    hf = transformers.CpmAntForCausalLM.from_pretrained(hf_dir).eval()
    ours = load_model(out)
    ids = torch.tensor([[6, 100, 200, 300, 400]])
    from cpmlive.data.layout import GENERATION, build_batch

    batch = build_batch([ids[0].tolist()], GENERATION, ours.config.prompt_length)
    with torch.inference_mode():
        expected = ours.logits(ours(**batch.as_inputs()))[0, -1]
        got = hf(input_ids=ids).logits[0, -1, : ours.config.vocab_size]
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)


def test_quantize_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run("quantize", checkpoint, out, "--bits", "3"), "invalid choice")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    assert_clean_error(run("quantize", checkpoint, out, "--bits", "4", "--method", "gptq", "--calibration", empty),
                       "calibration file is empty")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    assert_clean_error(run("quantize", checkpoint, out, "--bits", "8", "--method", "gptq", "--calibration", binary),
                       "not UTF-8")
    assert_clean_error(run("quantize", checkpoint, out, "--bits", "4", "--method", "gptq"), "needs calibration")
    assert_clean_error(run("quantize", checkpoint, out, "--bits", "4", "--group-size", "48"), "group size")
    assert_clean_error(run("quantize", checkpoint, out, "--bits", "8", "--group-size", "32"), "--group-size")
    assert not out.exists()
    done = tmp_path / "done"
    assert run("quantize", checkpoint, done, "--bits", "8").returncode == 0
    assert_clean_error(run("quantize", done, tmp_path / "again", "--bits", "8"), "already quantized")
    assert not (tmp_path / "again").exists()


def test_an_adapter_of_the_float_model_loads_on_its_quantized_copy(checkpoint, tmp_path):
    import cpmlive
    from cpmlive.compress.quantize import quantize_checkpoint
    from cpmlive.tune import delta

    lm = cpmlive.load(checkpoint)
    delta.attach(lm.model, delta.DeltaConfig(method="lora", r=4, target_modules=["project_q", "project_v"]))
    with torch.no_grad():
        for name, parameter in lm.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    delta.save_adapter(lm.model, tmp_path / "adapter")
    quantized = quantize_checkpoint(checkpoint, tmp_path / "int8", QuantConfig(bits=8), progress=False)
    tuned = cpmlive.load(quantized, adapter=tmp_path / "adapter")
    assert type(tuned.model.layers[0].attn.project_q).__name__ == "LoraQuantizedLinear"
    assert isinstance(tuned.generate("今天", max_new_tokens=2), str)
    different = tmp_path / "different"  # another float model's quantized copy refuses the adapter
    model = random_model(seed=7)
    save_checkpoint(model, model.config, different, vocab=ANT_VOCAB)
    with pytest.raises(CpmliveError, match="adapter was trained on base"):
        cpmlive.load(quantize_checkpoint(different, tmp_path / "int8-different", QuantConfig(bits=8), progress=False),
                     adapter=tmp_path / "adapter")


@pytest.mark.slow
def test_quantized_demo_fills_titles_and_serves_with_the_shipped_adapter(tmp_path):
    """Every verb on a quantized model: here the ones that go through the API and the app server
    (the W8A8 demo, decoding on the native step; then with the float model's headline adapter,
    whose LoRA layers decode in PyTorch)."""
    from fastapi.testclient import TestClient

    import cpmlive
    from cpmlive.cli import main
    from cpmlive.model.runtime import native_decode
    from cpmlive.resources import adapter_path
    from cpmlive.serve.app import create_app

    out = tmp_path / "demo-w8a8"
    assert main(["quantize", "demo", str(out), "--bits", "8", "--activations", "int8"]) == 0
    lm = cpmlive.load(out)
    calls = []
    real = native_decode.decode_blocks
    native_decode.decode_blocks = lambda *a: calls.append(1) or real(*a)
    try:
        filled = lm.fill("今天天气<mask>，我们去公园玩。", max_new_tokens=3)
        generated = lm.generate("新华社北京1月5日电", max_new_tokens=6)
    finally:
        native_decode.decode_blocks = real
    assert ("<mask>" not in filled and filled.endswith("我们去公园玩。")
            and len(filled) > len("今天天气，我们去公园玩。"))
    assert generated and calls
    lm.add_adapter(adapter_path("headline"))
    article = ("新华社北京3月5日电 第十四届全国人民代表大会第二次会议今天上午在人民大会堂开幕。"
               "国务院总理作政府工作报告。")
    response = TestClient(create_app(lm)).post("/api/titles", json={"article": article, "n": 2, "num_beams": 2,
                                                                      "samples": 1})
    assert response.status_code == 200, response.text
    titles = response.json()["titles"]
    assert titles and all(isinstance(t, str) and t for t in titles)
