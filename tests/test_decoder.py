"""The decoder family against HF transformers, one architecture at a time, on random weights:
logits within 1e-4 in float32, cached decoding equal to the full forward, greedy and beam ids
identical to HF ``generate``. MiniCPM 1/2 has no HF class: its formulas are written out here over
HF's Llama modules."""

from __future__ import annotations

import math

import pytest
import torch

from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.decoder.config import DecoderConfig
from cpmlive.model.decoder.convert import load_pretrained

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16}}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0}, "attention_bias": True,
        "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5, "head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True, "use_sliding_window": True,
                                                   "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "glm": ("GlmConfig", "GlmForCausalLM", {"head_dim": 16, "attention_bias": True, "pad_token_id": 0,
                                             "eos_token_id": 1, "bos_token_id": None}),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", {
        "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 12, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16}),
}
PROMPT = [[5, 17, 99, 3, 42, 8, 200, 31, 7, 64, 12]]


def _randomize_norms(model: torch.nn.Module) -> None:
    """HF starts norms at one: random ones make a wrong norm (or a missing one) show."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith(".bias"):
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator)
                                if "norm" in name else 0.3 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pair(request, tmp_path_factory):
    config_name, model_name, extra = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_name)(**{**BASE, **extra})
    hf_config._attn_implementation = "eager"
    hf = getattr(transformers, model_name)(hf_config).eval()
    _randomize_norms(hf)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    ours, _ = load_pretrained(directory)
    return request.param, hf, ours


def test_logits_equal_hf(pair):
    name, hf, ours = pair
    ids = torch.tensor(PROMPT * 2)
    length = 40 if name == "llama-dynamic" else ids.size(1)  # past the original 16 positions: NTK scaling on
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.logits(ours(ids))
    assert (got - expected).abs().max() < 1e-4


def test_left_padding_gives_each_row_its_unpadded_logits(pair):
    name, hf, ours = pair
    ids = torch.tensor([[0, 0, 0] + PROMPT[0][:8], PROMPT[0][:11]])
    valid = torch.tensor([[False] * 3 + [True] * 8, [True] * 11])
    with torch.no_grad():
        got = ours.logits(ours(ids, valid=valid))
        alone = hf(torch.tensor([PROMPT[0][:8]])).logits
    assert (got[0, 3:] - alone[0]).abs().max() < 1e-4


def test_cached_decoding_equals_the_full_forward(pair):
    _, _, ours = pair
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        full = ours.logits(ours(ids))
        cache = ours.new_cache(1, ids.size(1))
        steps = [ours.logits(ours(ids[:, :4], cache=cache))]
        for index in range(4, ids.size(1)):
            steps.append(ours.logits(ours(ids[:, index:index + 1], cache=cache)))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_greedy_and_beam_ids_equal_hf_generate(pair):
    name, hf, ours = pair
    # Dynamic NTK: HF recomputes the frequencies once the cache passes the original 16 positions
    # while cached keys keep theirs, so it is compared where it is plain RoPE (11 + 5 positions);
    # test_logits_equal_hf checks the scaled frequencies past them.
    new = 5 if name == "llama-dynamic" else 10
    eos = 255
    greedy = generate_ids(ours, PROMPT, GenerationConfig(max_new_tokens=new, min_new_tokens=new), eos)[0]
    beams = generate_ids(ours, PROMPT, GenerationConfig(max_new_tokens=min(new, 6), num_beams=3), eos)[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor(PROMPT), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                               eos_token_id=eos, pad_token_id=eos)[0, len(PROMPT[0]):].tolist()
        hf_beams = hf.generate(torch.tensor(PROMPT), do_sample=False, num_beams=3, max_new_tokens=min(new, 6),
                               eos_token_id=eos, pad_token_id=eos, early_stopping=True)[0, len(PROMPT[0]):].tolist()
    assert greedy == expected
    assert beams == [t for t in hf_beams if t != eos]


def test_the_head_as_one_matrix_gives_the_logits(pair):
    _, _, ours = pair
    with torch.no_grad():
        hidden = ours(torch.tensor(PROMPT))
        assert (hidden @ ours.head_weight().T - ours.logits(hidden)).abs().max() < 1e-5


def test_hf_config_round_trip(pair):
    name, hf, ours = pair
    again = DecoderConfig.from_hf(ours.config.to_hf())
    assert again == ours.config
    rebuilt = getattr(transformers, ARCHITECTURES[name][0])(**ours.config.to_hf())
    assert rebuilt.to_dict()["rope_parameters"] == hf.config.to_dict()["rope_parameters"]


# ---- MiniCPM 1/2: Llama + muP scales, no HF class --------------------------------------------------

MINICPM = dict(scale_emb=12.0, scale_depth=1.4, dim_model_base=16)


def minicpm_reference(llama: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """MiniCPM's forward over HF Llama's modules: embeddings x scale_emb, each branch x
    scale_depth / sqrt(layers), the head's input / (hidden / dim_model_base)."""
    body, config = llama.model, llama.config
    branch = MINICPM["scale_depth"] / math.sqrt(config.num_hidden_layers)
    hidden = body.embed_tokens(ids) * MINICPM["scale_emb"]
    positions = torch.arange(ids.size(1))[None]
    rotary = body.rotary_emb(hidden, positions)
    causal = torch.full((ids.size(1), ids.size(1)), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for layer in body.layers:
        attended, _ = layer.self_attn(layer.input_layernorm(hidden), attention_mask=causal,
                                      position_embeddings=rotary)
        hidden = hidden + attended * branch
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden)) * branch
    hidden = body.norm(hidden) / (config.hidden_size / MINICPM["dim_model_base"])
    return llama.lm_head(hidden)


def test_minicpm_formulas(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**{**BASE, "tie_word_embeddings": True})
    hf_config._attn_implementation = "eager"
    llama = transformers.LlamaForCausalLM(hf_config).eval()
    _randomize_norms(llama)
    llama.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    import json

    data = json.loads(config_file.read_text())
    data.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], **MINICPM)
    config_file.write_text(json.dumps(data))
    ours, _ = load_pretrained(tmp_path)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        expected = minicpm_reference(llama, ids)
        got = ours.logits(ours(ids))
        plain = llama(ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - plain).abs().max() > 1e-2  # the scales matter on these weights
    hidden = ours(ids)  # the training loss reads the head as one matrix: MiniCPM's scale folded in
    assert (hidden @ ours.head_weight().T - got).abs().max() < 1e-5


def test_refusals(tmp_path):
    with pytest.raises(CpmliveError, match="model_type 'gpt_neox' is not supported"):
        DecoderConfig.from_hf({"model_type": "gpt_neox"})
    with pytest.raises(CpmliveError, match="rope_scaling type 'weird' is not supported"):
        DecoderConfig.from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "weird", "factor": 2.0}})
    with pytest.raises(CpmliveError, match="hidden_act 'gelu'"):
        DecoderConfig.from_hf({"model_type": "llama", "hidden_act": "gelu"})


@pytest.mark.parametrize("config_name", ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config", "GlmConfig",
                                         "MiniCPM3Config"])
def test_a_config_json_that_leaves_keys_out_reads_as_hf_reads_it(config_name):
    """HF's class of each architecture fills a left-out key with its own default (GLM-4's biases,
    half rotary and eps; Mistral's window; Qwen's 32 key/value heads ...): ours fills in the same."""
    given = dict(hidden_size=256, intermediate_size=96, num_hidden_layers=2, num_attention_heads=32, vocab_size=100)
    hf = getattr(transformers, config_name)(**given)
    assert DecoderConfig.from_hf({"model_type": hf.model_type, **given}) == DecoderConfig.from_hf(hf.to_dict())
