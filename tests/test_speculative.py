"""Speculative decoding (``infer/speculative.py``, the engine's verifying step): greedy output equal to
plain decoding token for token for every causal family, with prompt lookup and with an assistant
model (a perfect one and a poor one); rejection sampling keeps the target distribution exactly."""

import copy
import json

import pytest
import torch

from cpmlive.errors import CpmliveError
from cpmlive.infer import speculative
from cpmlive.infer.engine import Engine, Request
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.infer.speculative import Assistant, lookup_draft, verify_sampled
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.ant.model import build_model
from cpmlive.model.cpm1.config import Cpm1Config
from cpmlive.model.cpm1.model import build_cpm1
from cpmlive.model.decoder.config import DecoderConfig
from cpmlive.model.decoder.model import Decoder
from cpmlive.model.runtime import native

VOCAB = 400


class NumberTokenizer:
    """Token ``i`` reads ``<i>``: all the engine needs of a tokenizer."""

    vocab_size, bos_id, eos_id = VOCAB, 1, 2

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)

    def id_to_token(self, index):
        return f"<{index}>"


def sharpened(model, seed):
    """Random weights with larger logits, so that greedy choices are far from ties, and a final
    norm that keeps a tied head from echoing the last token."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.input_embedding.weight.normal_(std=0.2, generator=g)
        for block in model.layers:
            for name, weight in block.named_parameters():
                if weight.dim() == 2:
                    weight.normal_(std=0.15, generator=g)
    return model.eval()


def ant(seed=0):
    config = AntConfig(vocab_size=VOCAB, dim_model=64, dim_ff=96, num_layers=2, num_heads=4, dim_head=16,
                       prompt_length=4, max_length=128, half=False)
    return sharpened(build_model(config, seed=seed), seed)


def cpm1(seed=0):
    config = Cpm1Config(vocab_size=VOCAB, dim_model=64, dim_ff=128, num_layers=2, num_heads=4, dim_head=16,
                        max_length=128, half=False)
    return sharpened(build_cpm1(config, seed=seed), seed)


def llama(seed=0):
    config = DecoderConfig(architecture="qwen2", vocab_size=VOCAB, dim_model=64, dim_ff=96, num_layers=2,
                           num_heads=4, num_kv_heads=2, dim_head=16, max_length=128, qkv_bias=True)
    model = Decoder(config)
    model.init_weights(seed)
    return sharpened(model, seed)


FAMILIES = {"cpm-ant": ant, "cpm-1": cpm1, "llama": llama}


def prompts(count=4, seed=0):
    """Prompts that repeat themselves (as text that quotes its context does), of several lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        phrase = torch.randint(10, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        rows.append([1] + phrase * (2 + index % 2) + phrase[:2])
    return rows


def engine_ids(model, rows, options, **fields):
    engine = Engine(model, NumberTokenizer())
    handles = [engine.submit(Request(row, options, **fields)) for row in rows]
    return [h.result().ids for h in handles], engine.stats()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


def test_lookup_draft_takes_what_followed_the_latest_match():
    assert lookup_draft([5, 6, 7, 5, 6, 9, 5, 6], 3) == [9, 5, 6]  # the latest "5 6"
    assert lookup_draft([5, 6, 7, 8, 4, 6], 2) == [7, 8]  # no "4 6": the last token alone
    assert lookup_draft([5, 6, 7], 2) == []
    assert lookup_draft([3, 3, 3], 4, max_ngram=1) == [3]


@pytest.mark.parametrize("blocks", ["native", "pytorch"])
def test_greedy_with_prompt_lookup_is_plain_decoding(family, blocks):
    model = FAMILIES[family]()
    rows = prompts()
    plain = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    expected = [generate_ids(model, [row], plain, 2)[0] for row in rows]
    drafted = kept = 0
    with native.switched_off() if blocks == "pytorch" else torch.inference_mode():
        for count in (1, 3, 8):
            got, stats = engine_ids(model, rows, GenerationConfig(max_new_tokens=24, min_new_tokens=24,
                                                                  prompt_lookup_num_tokens=count))
            assert got == expected
            drafted, kept = drafted + stats["drafted_tokens"], kept + stats["kept_tokens"]
    assert drafted > kept > 0  # drafts both kept and refused


def test_greedy_with_an_assistant_is_plain_decoding(family):
    model = FAMILIES[family]()
    rows = prompts(3, seed=1)
    options = GenerationConfig(max_new_tokens=20, repetition_penalty=1.3)
    expected = [generate_ids(model, [row], options, 2)[0] for row in rows]
    tokenizer = NumberTokenizer()
    perfect, poor = Assistant(copy.deepcopy(model), tokenizer), Assistant(FAMILIES[family](seed=5), tokenizer)
    got, stats = engine_ids(model, rows, options, assistant=perfect)
    assert got == expected and stats["drafted_tokens"] == stats["kept_tokens"] > 0
    got, stats = engine_ids(model, rows, GenerationConfig(max_new_tokens=20, repetition_penalty=1.3,
                                                          num_assistant_tokens=6), assistant=poor)
    assert got == expected and stats["kept_tokens"] < stats["drafted_tokens"] / 2


def test_a_batch_mixes_speculating_and_plain_rows():
    model = ant()
    rows = prompts(6, seed=2)
    options = [GenerationConfig(max_new_tokens=16 + i, prompt_lookup_num_tokens=4 if i % 2 else None)
               for i in range(len(rows))]
    expected = [generate_ids(model, [row], GenerationConfig(max_new_tokens=16 + i), 2)[0]
                for i, row in enumerate(rows)]
    engine = Engine(model, NumberTokenizer())
    handles = [engine.submit(Request(row, opt)) for row, opt in zip(rows, options)]
    assert [h.result().ids for h in handles] == expected


def test_the_assistant_adapts_its_draft_length():
    assert speculative.next_count(4, 4, 4, "heuristic") == 6
    assert speculative.next_count(4, 4, 2, "heuristic") == 3
    assert speculative.next_count(1, 1, 0, "heuristic") == 1
    assert speculative.next_count(4, 4, 2, "constant") == 4


# ---- rejection sampling keeps the target distribution ------------------------------------------------

TARGET = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
DRAFT = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.7, 0.1, 0.1, 0.1]])


def emitted_pairs(trials, draft_probs):
    """How often each pair of the first two emitted tokens comes out."""
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    singles = 0
    for _ in range(trials):
        if draft_probs is None:  # point-mass drafts (prompt lookup): fixed tokens
            drafts = [2, 0]
        else:
            drafts = [int(torch.multinomial(draft_probs[j], 1, generator=g)) for j in range(2)]
        kept = verify_sampled(lambda j: TARGET[j], drafts, draft_probs, g)
        if len(kept) == 1:
            kept.append(int(torch.multinomial(TARGET[1], 1, generator=g)))  # the next step would draw it from p
            singles += 1
        counts[kept[0], kept[1]] += 1
    return counts / trials, singles


@pytest.mark.parametrize("draft_probs", [DRAFT, None], ids=["assistant", "lookup"])
def test_rejection_sampling_keeps_the_target_distribution(draft_probs):
    trials = 20000
    joint, singles = emitted_pairs(trials, draft_probs)
    expected = TARGET[0][:, None] * TARGET[1][None, :]
    # Each cell's standard deviation is at most sqrt(0.25 / 20000) = 0.0035: 0.015 is over four of them.
    assert (joint - expected).abs().max() < 0.015
    assert 0 < singles < trials  # some drafts were refused, some kept


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(num_assistant_tokens=0), "num_assistant_tokens must be in"),
    (dict(prompt_lookup_num_tokens=1000), "prompt_lookup_num_tokens must be in"),
    (dict(max_matching_ngram_size=0), "max_matching_ngram_size"),
    (dict(num_assistant_tokens_schedule="fast"), "num_assistant_tokens_schedule"),
    (dict(prompt_lookup_num_tokens=3, num_beams=2), "not beam search"),
])
def test_bad_speculation_options_are_refused(options, message):
    with pytest.raises(CpmliveError, match=message):
        GenerationConfig(**options)


def test_a_draft_of_another_vocabulary_is_refused():
    class Other(NumberTokenizer):
        def id_to_token(self, index):
            return "x" if index == 7 else super().id_to_token(index)

    engine = Engine(ant(), NumberTokenizer())
    with pytest.raises(CpmliveError, match="token 7 is 'x'.*share the model's vocabulary"):
        engine.submit(Request([1, 5, 6], GenerationConfig(max_new_tokens=4), assistant=Assistant(ant(1), Other())))


# ---- the command line ----------------------------------------------------------------------------------

QUOTING = "宝玉笑道：“林妹妹，你这话说的是。”黛玉笑道：“宝哥哥，你这话说的是。”宝玉笑道："


def generate_json(capsys, *flags):
    from cpmlive.cli import main

    assert main(["generate", "demo", QUOTING, "--max-new-tokens", "16", "--min-new-tokens", "16", "--json",
                 *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_cli_drafts_from_the_prompt_or_an_int8_twin(tmp_path, capsys):
    from cpmlive.cli import main

    plain = generate_json(capsys)
    assert "speculative" not in plain
    lookup = generate_json(capsys, "--prompt-lookup-num-tokens", "4")
    assert lookup["ids"] == plain["ids"] and lookup["speculative"]["kept_tokens"] > 0
    assert main(["quantize", "demo", str(tmp_path / "int8"), "--bits", "8"]) == 0
    capsys.readouterr()
    drafted = generate_json(capsys, "--assistant-model", str(tmp_path / "int8"), "--num-assistant-tokens", "3")
    assert drafted["ids"] == plain["ids"]
    speculation = drafted["speculative"]
    assert 0 < speculation["kept_tokens"] <= speculation["drafted_tokens"]
    assert speculation["acceptance_rate"] == round(speculation["kept_tokens"] / speculation["drafted_tokens"], 4)


@pytest.mark.parametrize("flags, message", [
    (["--num-assistant-tokens", "0"], "num_assistant_tokens must be in [1, 32]"),
    (["--prompt-lookup-num-tokens", "99"], "prompt_lookup_num_tokens must be in [1, 32]"),
    (["--assistant-model", "llama-demo"], "vocabulary has 8000 tokens, the model's 16000"),
    (["--prompt-lookup-num-tokens", "2", "--num-beams", "2"], "not beam search"),
])
def test_the_cli_refuses_bad_speculation_in_one_line(capsys, flags, message):
    from cpmlive.cli import main

    assert main(["generate", "demo", "你好", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_assistant_with_more_embedding_rows_drafts_within_the_model_s():
    """Qwen's sizes pad their embeddings differently over one tokenizer: drafts stay in the model's rows."""
    model = llama()
    config = DecoderConfig(architecture="qwen2", vocab_size=VOCAB + 24, dim_model=64, dim_ff=96, num_layers=2,
                           num_heads=4, num_kv_heads=2, dim_head=16, max_length=128, qkv_bias=True)
    wide = Decoder(config)
    wide.init_weights(7)
    assistant = Assistant(sharpened(wide, 7), NumberTokenizer())
    rows = prompts(2, seed=4)
    greedy = GenerationConfig(max_new_tokens=12)
    got, stats = engine_ids(model, rows, greedy, assistant=assistant)
    assert got == [generate_ids(model, [row], greedy, 2)[0] for row in rows] and stats["drafted_tokens"] > 0
    sampled, _ = engine_ids(model, rows, GenerationConfig(max_new_tokens=12, do_sample=True, seed=3),
                            assistant=assistant)
    assert all(len(ids) > 0 and max(ids) < VOCAB for ids in sampled)
