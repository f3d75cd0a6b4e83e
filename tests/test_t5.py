"""The T5 family against HF transformers, one architecture at a time (T5 v1.0, T5 v1.1, mT5, UMT5),
on random weights saved by HF's own ``save_pretrained`` and read as published: logits within 1e-4
(padded encoder rows too), the prompt path and cached decoding equal to teacher forcing, greedy and
beam ids identical to HF ``generate``, the engine's continuous batch equal to each prompt alone,
and the HF layout written back that HF's class reads to the same logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import cpmlive
from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.registry import family_of
from cpmlive.model.runtime import native, native_decode
from cpmlive.model.t5 import convert as t5_convert
from cpmlive.resources import demo_dir

transformers = pytest.importorskip("transformers")

VOCAB = 8000  # the t5-demo tokenizer's
BASE = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
ARCHITECTURES = {
    "t5-v1.0": ("T5Config", "T5ForConditionalGeneration", {}, False),
    "t5-v1.1": ("T5Config", "T5ForConditionalGeneration", {"feed_forward_proj": "gated-gelu",
                                                          "tie_word_embeddings": False}, True),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", {"tie_word_embeddings": False}, True),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", {"tie_word_embeddings": False, "num_layers": 3,
                                                             "num_decoder_layers": 3}, True),
}
TEXTS = ["今天天气不错，我们去公园散步。", "你好"]


def _randomize(model: nn.Module, untied: bool) -> None:
    """Random norms and tables (HF starts norms at one); an untied head of its own (transformers 5
    ties every model it builds: the stored ``lm_head.weight`` is what unties it on reading)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.normal_(0, 0.3, generator=generator)
    if untied:
        model.lm_head.weight = nn.Parameter(torch.randn(VOCAB, model.config.d_model, generator=generator))


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pair(request, tmp_path_factory):
    config_name, model_name, extra, untied = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**BASE, **extra})
    hf = getattr(transformers, model_name)(config).eval()
    _randomize(hf, untied)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir("t5-demo") / name, directory / name)
    return request.param, hf, cpmlive.load(directory), directory


def _encoder_rows(lm) -> list[list[int]]:
    return [lm.tokenizer.encode_for_model(text) for text in TEXTS]


def test_the_family_reads_the_directory(pair):
    name, hf, lm, directory = pair
    assert family_of(directory).model_type == "t5" and lm.config.architecture == name.split("-")[0]
    assert hasattr(lm.model, "output_head") == ARCHITECTURES[name][3]
    assert lm.config.bias_per_layer == (name == "umt5")


def test_logits_equal_hf_with_padded_encoder_rows(pair):
    _, hf, lm, _ = pair
    rows = _encoder_rows(lm)
    width = max(map(len, rows))
    encoder = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    valid = encoder != 0
    decoder = torch.tensor([[0, 17, 99, 3, 42], [0, 8, 200, 31, 7]])
    with torch.no_grad():
        expected = hf(input_ids=encoder, attention_mask=valid.long(), decoder_input_ids=decoder).logits
        got = lm.model.logits(lm.model.seq2seq(encoder, decoder, valid))
    assert (got - expected).abs().max() < 1e-4


def test_the_prompt_path_and_cached_steps_equal_teacher_forcing(pair):
    _, _, lm, _ = pair
    model = lm.model
    encoder = torch.tensor(_encoder_rows(lm)[:1])
    decoder = torch.tensor([[0, 17, 99, 3, 42, 8]])
    with torch.no_grad():
        full = model.logits(model.seq2seq(encoder, decoder))
        cache = model.new_cache(1, 32)
        steps = [model.logits(model(torch.cat([encoder, decoder[:, :1]], 1), cache=cache))]
        for index in range(1, decoder.size(1)):
            steps.append(model.logits(model(decoder[:, index:index + 1], cache=cache)))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def _cached_steps(model, encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        cache = model.new_cache(encoder.size(0), 32)
        steps = [model.logits(model(torch.cat([encoder, decoder[:, :1]], 1), cache=cache))]
        for index in range(1, decoder.size(1)):
            steps.append(model.logits(model(decoder[:, index:index + 1], cache=cache)))
    return torch.cat(steps, dim=1)


@pytest.mark.skipif(not native.available(), reason="no C compiler here")
def test_decoding_steps_go_to_the_native_step_and_equal_pytorch(pair, monkeypatch):
    """Self-attention over the decoder's cache, cross-attention over the encoder's cached keys and
    values (padding masked), the ReLU or gated tanh-GELU feed-forward: one C call per step."""
    _, _, lm, _ = pair
    rows = _encoder_rows(lm)
    width = max(map(len, rows))
    encoder = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    decoder = torch.tensor([[0, 17, 99, 3, 42, 8], [0, 5, 6, 7, 8, 9]])
    calls = []
    real = native_decode.decode_blocks
    monkeypatch.setattr(native_decode, "decode_blocks", lambda *a: calls.append(1) or real(*a))
    got = _cached_steps(lm.model, encoder, decoder)
    assert len(calls) == decoder.size(1) - 1
    with native.switched_off():
        expected = _cached_steps(lm.model, encoder, decoder)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


def test_greedy_and_beam_ids_equal_hf_generate(pair):
    _, hf, lm, _ = pair
    encoder = _encoder_rows(lm)[0]
    row = [encoder + lm.model.prompt_tail()]
    eos = 1
    greedy = generate_ids(lm.model, row, GenerationConfig(max_new_tokens=8, min_new_tokens=8), eos)[0]
    beams = generate_ids(lm.model, row, GenerationConfig(max_new_tokens=6, num_beams=3), eos)[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([encoder]), do_sample=False, max_new_tokens=8, min_new_tokens=8)[0, 1:]
        hf_beams = hf.generate(torch.tensor([encoder]), do_sample=False, num_beams=3, max_new_tokens=6,
                               early_stopping=True)[0, 1:]
    assert greedy == expected.tolist()
    assert beams == [t for t in hf_beams.tolist() if t not in (0, eos)]


def test_the_engine_batch_equals_each_prompt_alone_and_hf(pair):
    _, hf, lm, _ = pair
    together = lm.generate_ids(TEXTS, max_new_tokens=6, min_new_tokens=6)
    alone = [lm.generate_ids([text], max_new_tokens=6, min_new_tokens=6)[0] for text in TEXTS]
    assert together == alone
    with torch.no_grad():
        expected = hf.generate(torch.tensor([_encoder_rows(lm)[1]]), do_sample=False, max_new_tokens=6,
                               min_new_tokens=6)[0, 1:].tolist()
    assert together[1] == expected


def test_the_hf_layout_written_back_reads_in_hf(pair, tmp_path):
    name, hf, lm, directory = pair
    config_name, model_name, _, _ = ARCHITECTURES[name]
    ours = t5_convert.convert(directory, tmp_path / "ours")
    back = t5_convert.convert(ours, tmp_path / "hf", to="hf")
    reread = getattr(transformers, model_name).from_pretrained(back).eval()
    encoder, decoder = torch.tensor(_encoder_rows(lm)[:1]), torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        expected = hf(input_ids=encoder, decoder_input_ids=decoder).logits
        got = reread(input_ids=encoder, decoder_input_ids=decoder).logits
    assert (got - expected).abs().max() < 1e-5
    assert json.loads((back / "config.json").read_text())["model_type"] == name.split("-")[0]


def test_refusals(tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    config = {**BASE, "model_type": "t5", "feed_forward_proj": "gated-silu"}
    (directory / "config.json").write_text(json.dumps(config))
    torch.save({}, directory / "pytorch_model.bin")
    with pytest.raises(CpmliveError, match="feed_forward_proj 'gated-silu' is not supported"):
        t5_convert.load_pretrained(directory)
    config["feed_forward_proj"] = "relu"
    (directory / "config.json").write_text(json.dumps(config))
    torch.save({"shared.weight": torch.zeros(VOCAB, 32), "encoder.block.0.layer.0.Bogus.weight": torch.zeros(1)},
               directory / "pytorch_model.bin")
    with pytest.raises(CpmliveError, match="unknown key 'encoder.block.0.layer.0.Bogus.weight'"):
        t5_convert.load_pretrained(directory)


def test_fill_writes_each_blank_from_its_sentinel_as_hf_generate_does(pair):
    """Span corruption: blank i is <extra_id_i> in the input; HF's greedy output, cut at the
    sentinels, gives the fills."""
    _, hf, lm, _ = pair
    text = "今天天气<mask>，我们去<mask>散步。"
    sentinels = [lm.tokenizer.encode(f"<extra_id_{i}>")[0] for i in range(3)]
    encoder = lm.tokenizer.encode_for_model("今天天气<extra_id_0>，我们去<extra_id_1>散步。")
    assert sentinels[0] in encoder and sentinels[1] in encoder and encoder[-1] == 1
    with torch.no_grad():
        out = hf.generate(torch.tensor([encoder]), do_sample=False, max_new_tokens=3 * 2 + 3,
                          min_new_tokens=3 * 2 + 3)[0, 1:].tolist()
    out = out[1:] if out[0] == sentinels[0] else out
    cuts = [i for i, token in enumerate(out) if token in sentinels] + [len(out)]
    spans = [out[:cuts[0]]] + [out[a + 1:b] for a, b in zip(cuts, cuts[1:])]
    expected = [lm.tokenizer.decode(span[:3]) for span in spans[:2]] + [""] * max(0, 2 - len(spans))
    assert lm.fill(text, max_new_tokens=3, min_new_tokens=3 * 2 + 3, return_fills=True) == expected
