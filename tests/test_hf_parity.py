"""Our CPM-Ant against HF transformers' ``CpmAntForCausalLM``, through our converters.

Random HF models of several shapes are saved with ``save_pretrained``, converted to our format
and compared in float32: full forward, KV-cached decoding, and format round trips. The OpenBMB
reference fixture converted to HF must reproduce the original code's logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cpmlive.model.ant.model import CpmAnt
from cpmlive.model.checkpoint import load_model, read_safetensors, read_weights
from cpmlive.model.ant.convert import convert, detect_format, load_any

from conftest import ANT_VOCAB, REFERENCE

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
DECODE_STEPS = 8
LENGTHS = (20, 7, 13)

SHAPES = {
    "small": dict(vocab_size=1000, hidden_size=64, num_attention_heads=4, dim_head=16, dim_ff=256,
                  num_hidden_layers=2),
    "narrow": dict(vocab_size=900, hidden_size=32, num_attention_heads=4, dim_head=16, dim_ff=96,
                   num_hidden_layers=3, position_bias_num_buckets=32, position_bias_max_distance=64,
                   prompt_types=4, segment_types=4),
    "removed": dict(vocab_size=800, hidden_size=48, num_attention_heads=2, dim_head=32, dim_ff=80,
                    num_hidden_layers=4),
}
# HF has no mask_modules: a removed sub-block is written as a zero output projection.
REMOVED = {"removed": [[False, False], [True, False], [False, True], [True, True]]}


@dataclass
class Pair:
    name: str
    hf: torch.nn.Module
    ours: CpmAnt
    hf_dir: Path
    ours_dir: Path


@torch.no_grad()
def randomize(model: torch.nn.Module, removed: list[list[bool]] | None, seed: int) -> None:
    """Weights of a trained-looking scale (1/sqrt(fan-in) folded in, as HF stores them)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    for name, param in model.cpmant.named_parameters():
        if "layernorm" in name:
            param.copy_(1 + 0.1 * randn(param.shape))
        elif "relative_attention_bias" in name:
            param.copy_(randn(param.shape))
        elif "embedding" in name:
            param.copy_(randn(param.shape) / math.sqrt(hidden))
        else:
            param.copy_(randn(param.shape) / math.sqrt(param.shape[1]))
    model.lm_head.weight.copy_(model.cpmant.input_embedding.weight[: model.config.vocab_size])
    for layer, (no_attention, no_ffn) in zip(model.cpmant.encoder.layers, removed or []):
        if no_attention:
            layer.self_att.self_attention.attention_out.weight.zero_()
        if no_ffn:
            layer.ffn.ffn.w_out.weight.zero_()


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf_config = transformers.CpmAntConfig(**SHAPES[name])
    hf = transformers.CpmAntForCausalLM(hf_config).eval()
    randomize(hf, REMOVED.get(name), seed=list(SHAPES).index(name))
    hf.save_pretrained(root / "hf")
    convert(root / "hf", root / "ours", to="ours")
    return Pair(name, hf, load_model(root / "ours"), root / "hf", root / "ours")


def batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Left-padded ids, rows of different lengths (id 0 is padding for HF)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        ids[row, width - length:] = torch.randint(1, vocab_size, (length,), generator=generator)
    return ids


def our_inputs(ids: torch.Tensor, prompt_length: int = 32) -> dict[str, torch.Tensor]:
    """HF's implicit inputs made explicit: prompt task 2, segment 2 for text, left-pad validity."""
    rows, width = ids.shape
    prompt = (2 * prompt_length + torch.arange(prompt_length)).expand(rows, -1)
    length = (ids != 0).sum(-1)
    text_valid = torch.arange(width - 1, -1, -1)[None, :] < length[:, None]
    return {
        "input_ids": torch.cat([prompt, ids], dim=1),
        "segment": torch.cat([torch.zeros(rows, prompt_length, dtype=torch.long), (ids != 0).long() * 2], dim=1),
        "context": torch.ones(rows, prompt_length + width, dtype=torch.bool),
        "span": torch.zeros(rows, prompt_length + width, dtype=torch.long),
        "valid": torch.cat([torch.ones(rows, prompt_length, dtype=torch.bool), text_valid], dim=1),
    }


def max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_converted_config_and_removed_blocks(pair: Pair) -> None:
    config = pair.ours.config
    assert config.dim_model == SHAPES[pair.name]["hidden_size"]
    assert (config.num_heads * config.dim_head
            == SHAPES[pair.name]["num_attention_heads"] * SHAPES[pair.name]["dim_head"])
    assert config.mask_modules == REMOVED.get(pair.name)
    for index, block in enumerate(pair.ours.layers):
        assert hasattr(block, "attn") == config.has_attention(index)
        assert hasattr(block, "ffn") == config.has_ffn(index)
    assert detect_format(pair.hf_dir) == "hf" and detect_format(pair.ours_dir) == "ours"


@torch.no_grad()
def test_full_forward_matches_hf(pair: Pair) -> None:
    ids = batch(pair.ours.config.vocab_size)
    expected = pair.hf(ids).logits
    hidden = pair.ours(**our_inputs(ids))[:, pair.ours.config.prompt_length:]
    logits = pair.ours.logits(hidden)
    text = ids != 0
    assert logits.shape == expected.shape
    assert max_delta(logits[text], expected[text]) <= ATOL


@torch.no_grad()
def test_last_positions_match_hf(pair: Pair) -> None:
    ids = batch(pair.ours.config.vocab_size, seed=3)
    expected = pair.hf(ids, logits_to_keep=5).logits
    hidden = pair.ours(**our_inputs(ids), last=5)
    assert hidden.shape[1] == 5
    assert max_delta(pair.ours.logits(hidden), expected) <= ATOL


def hf_cached_steps(hf: torch.nn.Module, ids: torch.Tensor, new_tokens: torch.Tensor) -> list[torch.Tensor]:
    """HF is fed the whole sequence every step and slices the cached prefix off itself."""
    out = hf(ids, use_cache=True)
    steps = [out.logits[:, -1]]
    for step in range(new_tokens.size(1)):
        ids = torch.cat([ids, new_tokens[:, step:step + 1]], dim=1)
        out = hf(ids, past_key_values=out.past_key_values, use_cache=True)
        assert out.logits.size(1) == 1
        steps.append(out.logits[:, -1])
    return steps


def our_cached_steps(model: CpmAnt, ids: torch.Tensor, new_tokens: torch.Tensor,
                     last: int | None = None) -> list[torch.Tensor]:
    inputs = our_inputs(ids, model.config.prompt_length)
    rows, width = inputs["input_ids"].shape
    cache = model.new_cache(rows, width + new_tokens.size(1))
    steps = [model.logits(model(**inputs, cache=cache, last=last)[:, -1])]
    ones = torch.ones(rows, 1, dtype=torch.long)
    for step in range(new_tokens.size(1)):
        hidden = model(new_tokens[:, step:step + 1], 2 * ones, ones.bool(), 0 * ones, ones.bool(), cache=cache)
        steps.append(model.logits(hidden[:, -1]))
    return steps


@torch.no_grad()
@pytest.mark.parametrize("last", [None, 1], ids=["whole-prefill", "last-row-prefill"])
def test_cached_decoding_matches_hf(pair: Pair, last: int | None) -> None:
    """``last=1`` (what generation uses): the final block computes the last prompt row only,
    yet caches every row's keys and values, so the decoding steps after it still match."""
    vocab_size = pair.ours.config.vocab_size
    ids = batch(vocab_size, seed=1)
    new_tokens = torch.randint(1, vocab_size, (ids.size(0), DECODE_STEPS), generator=torch.Generator().manual_seed(2))
    expected = hf_cached_steps(pair.hf, ids, new_tokens)
    got = our_cached_steps(pair.ours, ids, new_tokens, last)
    assert len(got) == DECODE_STEPS + 1
    for step, (ours, theirs) in enumerate(zip(got, expected)):
        assert max_delta(ours, theirs) <= ATOL, f"step {step}"


@torch.no_grad()
def test_round_trip_through_hf(pair: Pair, tmp_path: Path) -> None:
    convert(pair.ours_dir, tmp_path / "hf", to="hf")
    reloaded = transformers.CpmAntForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = batch(pair.ours.config.vocab_size, seed=3)
    assert torch.equal(reloaded(ids).logits, pair.hf(ids).logits)
    state, config = load_any(tmp_path / "hf")
    assert config == pair.ours.config
    original = read_weights(pair.ours_dir)
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


def exact_scaling(config) -> bool:
    """Folding 1/sqrt(fan-in) round-trips exactly only when every fan-in is a power of four."""
    return all(math.sqrt(n).is_integer() and math.log2(n).is_integer()
               for n in (config.dim_model, config.dim_attention, config.dim_ff))


@torch.no_grad()
def test_round_trip_through_openbmb(pair: Pair, tmp_path: Path) -> None:
    pt = convert(pair.ours_dir, tmp_path / "openbmb" / "model.pt", to="openbmb")
    assert detect_format(pt) == "openbmb"
    saved_config = json.loads(pt.with_suffix(".json").read_text("utf-8"))
    assert saved_config.get("mask_modules") == REMOVED.get(pair.name)
    flat = torch.load(pt, weights_only=True)
    assert all(k.startswith(("encoder.", "prompt_", "segment_", "input_", "position_")) for k in flat)
    convert(pt, tmp_path / "ours")
    back, original = read_weights(tmp_path / "ours"), read_weights(pair.ours_dir)
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        if exact_scaling(pair.ours.config):
            assert torch.equal(back[key], tensor), key
        else:
            torch.testing.assert_close(back[key], tensor, rtol=2.5e-7, atol=1e-30, msg=key)


@pytest.fixture(scope="module")
def reference_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(REFERENCE / "ant-tiny" / "model.safetensors", tmp_path_factory.mktemp("ref") / "hf", to="hf",
                   vocab_path=ANT_VOCAB)


@pytest.fixture(scope="module")
def reference_as_hf(reference_hf_dir: Path) -> torch.nn.Module:
    return transformers.CpmAntForCausalLM.from_pretrained(reference_hf_dir, dtype=torch.float32).eval()


@torch.no_grad()
def test_openbmb_fixture_through_hf_matches_reference(reference_as_hf: torch.nn.Module) -> None:
    hf = reference_as_hf
    assert (hf.config.num_hidden_layers == 3
            and not hf.cpmant.encoder.layers[2].self_att.self_attention.attention_out.weight.any())
    assert not hf.cpmant.encoder.layers[1].ffn.ffn.w_out.weight.any()
    cases = read_safetensors(REFERENCE / "ant-tiny" / "cases.safetensors")
    text = cases["gen.input"][:, 32:].long()
    out = hf(text, use_cache=True)
    assert max_delta(out.logits[:, -1], cases["gen.logits_last"]) <= ATOL
    step = torch.cat([text, cases["decode.step_input"][0].long()[:, None]], dim=1)
    cached = hf(step, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    assert max_delta(cached, cases["decode.step_logits_full_1"]) <= ATOL


def test_converted_directory_loads_with_hf_auto_classes(reference_hf_dir: Path) -> None:
    pytest.importorskip("rjieba")
    tokenizer = transformers.AutoTokenizer.from_pretrained(reference_hf_dir)
    assert type(tokenizer).__name__ == "CpmAntTokenizer"
    assert tokenizer("今天天气真好！").input_ids == [6, 9802, 14962, 2082, 831, 244]
    assert type(transformers.AutoModelForCausalLM.from_pretrained(reference_hf_dir)).__name__ == "CpmAntForCausalLM"
