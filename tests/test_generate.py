"""Generation against HF ``CpmAntForCausalLM.generate`` on the same random weights."""

import dataclasses
import itertools
import random

import pytest
import torch
import transformers

from cpmlive.api import LM
from cpmlive.model.ant.config import AntConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.registry import preset
from cpmlive.data.layout import GENERATION, INFILLING
from cpmlive.infer import generate as generation
from cpmlive.infer import packing
from cpmlive.infer.generate import (GenerationConfig, build_batch, fill_layout,
                                    generate_ids, prefill, prefill_groups, sampling_filter)
from cpmlive.infer.packing import packed_weights
from cpmlive.model.runtime import kernels
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import model_from_state_dict
from cpmlive.model.ant.keys import hf_to_ours
from cpmlive.model.runtime.kernels import project
from cpmlive.tokenizer import AntTokenizer

from conftest import ANT_VOCAB

EOS = 7


def random_hf_model(seed: int, hidden: int = 48, heads: int = 4, dim_head: int = 16, layers: int = 2):
    torch.manual_seed(seed)
    config = transformers.CpmAntConfig(vocab_size=30720, hidden_size=hidden, num_attention_heads=heads,
                                       dim_head=dim_head, dim_ff=96, num_hidden_layers=layers)
    model = transformers.CpmAntForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or "layernorm_before" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "input_embedding" in name:
                p.copy_(torch.randn_like(p) * 2.0 / hidden**0.5)
            elif "relative_attention_bias" in name or "segment_embedding" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        model.lm_head.weight.copy_(model.cpmant.input_embedding.weight[:30720])
    return model


def ours_from_hf(hf_model) -> "torch.nn.Module":
    config = AntConfig.from_hf(hf_model.config.to_dict())
    state, config = hf_to_ours(dict(hf_model.state_dict()), config)
    return model_from_state_dict(config, state)


@pytest.fixture(scope="module")
def models():
    hf = random_hf_model(0)
    return hf, ours_from_hf(hf)


@pytest.fixture(scope="module")
def tokenizer():
    return AntTokenizer.from_file(ANT_VOCAB)


PROMPTS = ["今天天气不错，", "我们在假期去了法国的埃菲尔铁塔，北京是中华人民共和国的首都", "人工智能"]


def hf_generate(hf, ids: list[int], **kwargs) -> list[int]:
    out = hf.generate(torch.tensor([ids]), eos_token_id=EOS, pad_token_id=0, **kwargs)
    new = out[0, len(ids):].tolist()
    return new[: new.index(EOS)] if EOS in new else new


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_identical_to_hf(models, tokenizer, prompt):
    hf, ours = models
    ids = tokenizer.encode_for_model(prompt)
    expected = hf_generate(hf, ids, max_new_tokens=32, do_sample=False)
    got = generate_ids(ours, [ids], GenerationConfig(max_new_tokens=32), EOS)[0]
    assert got == expected and len(got) == 32


@pytest.mark.parametrize("options", [
    {"repetition_penalty": 1.5},
    {"no_repeat_ngram_size": 2},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 5},
])
def test_logits_processors_identical_to_hf(models, tokenizer, options):
    hf, ours = models
    ids = tokenizer.encode_for_model(PROMPTS[0])
    expected = hf_generate(hf, ids, max_new_tokens=24, do_sample=False, **options)
    got = generate_ids(ours, [ids], GenerationConfig(max_new_tokens=24, **options), EOS)[0]
    assert got == expected


@pytest.mark.parametrize("overhead", [0, 10**9], ids=["grouped-prefill", "padded-prefill"])
def test_left_padded_batch_equals_single_rows(models, tokenizer, monkeypatch, overhead):
    monkeypatch.setattr(generation, "GROUP_OVERHEAD_POSITIONS", overhead)
    _, ours = models
    rows = [tokenizer.encode_for_model(p) for p in PROMPTS]
    batched = generate_ids(ours, rows, GenerationConfig(max_new_tokens=16), EOS)
    single = [generate_ids(ours, [r], GenerationConfig(max_new_tokens=16), EOS)[0] for r in rows]
    assert batched == single


def test_beam_search_matches_hf(models, tokenizer):
    hf, ours = models
    ids = tokenizer.encode_for_model(PROMPTS[1])
    expected = hf_generate(hf, ids, max_new_tokens=12, num_beams=3, do_sample=False, early_stopping=False)
    got = generate_ids(ours, [ids], GenerationConfig(max_new_tokens=12, num_beams=3), EOS)[0]
    assert got == expected


def test_sampling_is_reproducible_with_a_seed(models, tokenizer):
    _, ours = models
    rows = [tokenizer.encode_for_model(p) for p in PROMPTS]
    options = dict(max_new_tokens=12, do_sample=True, top_p=0.9, top_k=40, temperature=0.8)
    first = generate_ids(ours, rows, GenerationConfig(seed=3, **options), EOS)
    again = generate_ids(ours, rows, GenerationConfig(seed=3, **options), EOS)
    other = generate_ids(ours, rows, GenerationConfig(seed=4, **options), EOS)
    assert first == again and first != other


def test_top_k_top_p_filters_match_hf_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    config = GenerationConfig(do_sample=True, top_k=10, top_p=0.8, temperature=0.7)
    ours = sampling_filter(logits, config)
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    theirs = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        theirs = warper(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_min_new_tokens_and_eos_stop(models, tokenizer, monkeypatch):
    _, ours = models
    ids = tokenizer.encode_for_model(PROMPTS[0])
    plain = ours.logits

    def eos_favoured(hidden):
        logits = plain(hidden)
        logits[..., EOS] = logits.max() + 10
        return logits

    monkeypatch.setattr(ours, "logits", eos_favoured)
    assert generate_ids(ours, [ids], GenerationConfig(max_new_tokens=10, min_new_tokens=4), EOS)[0].__len__() == 4
    assert generate_ids(ours, [ids], GenerationConfig(max_new_tokens=10), EOS)[0] == []


def test_stream_yields_the_generated_text(models, tokenizer):
    _, ours = models
    lm = LM(ours, tokenizer)
    assert "".join(lm.stream(PROMPTS[0], max_new_tokens=10)) == lm.generate(PROMPTS[0], max_new_tokens=10)


def test_fill_replaces_every_mask(models, tokenizer):
    _, ours = models
    lm = LM(ours, tokenizer)
    fills = lm.fill("今天<mask>，我们去<mask>公园", max_new_tokens=3, return_fills=True)
    assert len(fills) == 2 and all(fills)
    text = lm.fill("今天<mask>，我们去<mask>公园", max_new_tokens=3)
    assert text == f"今天{fills[0]}，我们去{fills[1]}公园"


def blank_predictor_logits(model, tokenizer, left: str, right: str, length: int = 2):
    """Logits that predict the first blank token of ``left<mask>right``."""
    pieces = [tokenizer.encode_for_model(t)[1:] for t in (left, right)]
    layout = fill_layout(pieces, length, tokenizer.bos_id, EOS)
    batch = build_batch([layout.tokens], INFILLING, 32, "cpu", [layout.context])
    batch.valid &= batch.context
    with torch.no_grad():
        hidden = model(**batch.as_inputs())
    return model.logits(hidden[0, 32 + layout.slots[0] - 1])


def test_fill_blank_tokens_see_right_context(models, tokenizer):
    _, ours = models
    a = blank_predictor_logits(ours, tokenizer, "今天", "，我们去公园")
    b = blank_predictor_logits(ours, tokenizer, "今天", "，他们在北京开会")
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("call, message", [
    (lambda lm: lm.generate(""), "empty prompt"),
    (lambda lm: lm.generate("   "), "empty prompt"),
    (lambda lm: lm.fill("没有空"), "<mask>"),
    (lambda lm: lm.generate("好" * 3000), "at most"),
    (lambda lm: lm.generate("你好", max_new_tokens=0), "max_new_tokens"),
    (lambda lm: lm.generate("你好", top_p=1.5), "top_p"),
    (lambda lm: lm.generate("你好", beams=2), "unknown generation option"),
])
def test_bad_generation_input_is_a_clear_error(models, tokenizer, call, message):
    _, ours = models
    with pytest.raises(CpmliveError, match=message):
        call(LM(ours, tokenizer))


def test_sequence_bias_identical_to_hf(models, tokenizer):
    hf, ours = models
    ids = tokenizer.encode_for_model(PROMPTS[1])
    plain = hf_generate(hf, ids, max_new_tokens=12, do_sample=False)
    bias = {(ids[3],): 4.0, (ids[5],): 2.5, (plain[0],): -8.0, (ids[3], ids[6]): 6.0}
    expected = hf_generate(hf, ids, max_new_tokens=12, do_sample=False,
                           sequence_bias=[[list(k), v] for k, v in bias.items()])
    got = generate_ids(ours, [ids], GenerationConfig(max_new_tokens=12, sequence_bias=bias), EOS)[0]
    assert got == expected and got != plain


def prefill_cost(groups: list[list[int]], lengths: list[int], prompt: int, overhead: int) -> int:
    return sum(len(g) * (prompt + max(lengths[i] for i in g)) + overhead for g in groups)


def test_prefill_groups_are_the_cheapest_cuts():
    assert prefill_groups([10, 11, 12], 32, 64) == [[0, 1, 2]]
    assert prefill_groups([100, 5, 98, 6], 32, 16) == [[1, 3], [2, 0]]
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 16, 64, 500])
        groups = prefill_groups(lengths, 32, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        every_cut = (
            [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))]
            for n in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), n))
        best = min(prefill_cost(c, lengths, 32, overhead) for c in every_cut)
        assert prefill_cost(groups, lengths, 32, overhead) == best


@torch.no_grad()
def test_grouped_prefill_equals_the_padded_one(monkeypatch):
    """Same last hidden states, and the same keys and values at every visible cache column,
    also with a layer whose attention was removed (no cache for it)."""
    config = dataclasses.replace(preset("tiny"), vocab_size=500, num_layers=3,
                                 mask_modules=[[False, False], [True, False], [False, True]])
    model = build_model(config, seed=0).eval()
    rng = random.Random(1)
    rows = [[1] + [rng.randint(10, 499) for _ in range(n)] for n in (3, 40, 5, 38, 70)]
    lengths = [len(r) for r in rows]
    caches, hidden = [], []
    for overhead in (0, 10**9):
        monkeypatch.setattr(generation, "GROUP_OVERHEAD_POSITIONS", overhead)
        batch = build_batch(rows, GENERATION, config.prompt_length)
        cache = model.new_cache(len(rows), batch.input_ids.size(1) + 4)
        hidden.append(prefill(model, batch, cache, lengths))
        caches.append(cache)
    grouped, padded = caches
    assert len(prefill_groups(lengths, config.prompt_length, 0)) > 1
    assert (hidden[0] - hidden[1]).abs().max() < 1e-5
    assert grouped.length == padded.length
    assert torch.equal(grouped.valid, padded.valid) and torch.equal(grouped.position, padded.position)
    visible = padded.valid[:, None, :, None]
    for layer in (0, 2):
        for ours, theirs in ((grouped.keys[layer], padded.keys[layer]), (grouped.values[layer], padded.values[layer])):
            assert ((ours - theirs) * visible).abs().max() < 1e-5
    assert grouped.keys[1] is None and padded.keys[1] is None


@torch.no_grad()
def test_packed_weights_give_the_same_products_and_go_away():
    model = build_model(dataclasses.replace(preset("tiny"), vocab_size=500), seed=0).eval()
    linear = model.layers[0].ffn.w_0
    head = model.input_embedding.weight
    rows = torch.randn(2, 4, linear.in_features)  # 8 rows: packed; one row: plain
    with packed_weights(model):
        with packed_weights(model):  # nested: shares the outer copies
            pass
        assert hasattr(linear.weight, kernels._PACKED) and hasattr(head, kernels._PACKED)
        assert kernels._blocked(rows, linear.weight) is not linear.weight
        assert kernels._blocked(rows[:1, :1], linear.weight) is linear.weight
        for x in (rows, rows[:1, :1]):
            assert (project(x, linear) - torch.nn.functional.linear(x, linear.weight)).abs().max() < 1e-4
            assert (project(x, linear, "gelu") - torch.nn.functional.gelu(x @ linear.weight.T)).abs().max() < 1e-4
        assert (model.logits(rows) - rows @ head.T).abs().max() < 1e-4
        linear.weight.mul_(2)  # changed in place: the stale copy is not used
        assert kernels._blocked(rows, linear.weight) is linear.weight
        assert (project(rows, linear) - rows @ linear.weight.T).abs().max() < 1e-4
    assert not hasattr(linear.weight, kernels._PACKED) and not hasattr(head, kernels._PACKED)


def test_batched_and_beam_decoding_pack_the_weights(models, tokenizer, monkeypatch):
    """Long enough batched or beam generations run inside ``packed_weights``, short or single
    ones do not; the ids are the same either way (HF's, by the tests above)."""
    _, ours = models
    calls = []
    real = packing.packed_weights

    def spy(model):  # counts the outermost uses, the ones that pack
        if getattr(model, "_cpmlive_packing_depth", 0) == 0:
            calls.append(model)
        return real(model)

    monkeypatch.setattr(packing, "packed_weights", spy)
    rows = [tokenizer.encode_for_model(p) for p in PROMPTS]
    packed = generate_ids(ours, rows, GenerationConfig(max_new_tokens=16), EOS)
    assert len(calls) == 1
    generate_ids(ours, rows[:1], GenerationConfig(max_new_tokens=16), EOS)
    generate_ids(ours, rows, GenerationConfig(max_new_tokens=8), EOS)
    assert len(calls) == 1
    monkeypatch.setattr(packing, "PACK_MIN_ROWS", 10**9)
    assert generate_ids(ours, rows, GenerationConfig(max_new_tokens=16), EOS) == packed
    monkeypatch.setattr(packing, "PACK_MIN_ROWS", 3)
    generate_ids(ours, rows[:2], GenerationConfig(max_new_tokens=16, num_beams=4), EOS)  # packs once
    assert len(calls) == 2 and ours._cpmlive_packing_depth == 0


def test_sampling_draws_from_the_distribution():
    """The inverse-CDF sampler against the probabilities it samples (and never a zero one)."""
    from cpmlive.infer.generate import sample

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]]).expand(20_000, -1)
    drawn = sample(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs[0], atol=0.015)
