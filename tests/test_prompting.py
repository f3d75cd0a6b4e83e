"""Prompt learning (``tune/prompting.py``, ``apps/prompt_classify.py``, ``cpmlive classify``):
templates in both syntaxes, verbalizers (manual, multi-token words, knowledgeable refinement,
soft), calibration on a synthetic scorer whose bias it provably removes, seeded few-shot draws,
soft tokens equal to their initial text before training and lowering the loss after, the scores
against HF's model on the same weights, and one-line errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cpmlive
from cpmlive.apps import prompt_classify
from cpmlive.cli import main
from cpmlive.errors import CpmliveError
from cpmlive.tune import prompting
from cpmlive.tune.prompting import Part, PromptTuner, Template, Verbalizer

from decoder_helpers import tiny_hf_dir

SENTIMENT = {"正面": ["好", "棒"], "负面": ["差", "糟糕"]}
EXAMPLES = [{"text_a": "这家酒店的服务很周到", "label": "正面"}, {"text_a": "房间又脏又吵", "label": "负面"},
            {"text_a": "早餐丰富，下次还来", "label": "正面"}, {"text_a": "前台态度恶劣", "label": "负面"},
            {"text_a": "位置方便，干净整洁", "label": "正面"}, {"text_a": "空调坏了没人修", "label": "负面"}]


@pytest.fixture(scope="module")
def demo():
    return cpmlive.load("demo")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_hf_dir(tmp_path_factory.mktemp("llama"), "llama")


# ---- templates ------------------------------------------------------------------------------


def test_both_template_syntaxes_parse_to_the_same_parts():
    ours = Template.parse("{soft*2}{text_a}{soft:总之}很{mask}。")
    openprompt = Template.parse('{"soft": null, "duplicate": 2}{"placeholder": "text_a"}{"soft": "总之"}很{"mask"}。')
    assert ours == openprompt
    assert ours.parts == (Part("soft", "", 2), Part("field", "text_a"), Part("soft", "总之"), Part("text", "很"),
                          Part("mask"), Part("text", "。"))
    assert ours.fields == ["text_a"] and ours.soft_count == 3
    plain = Template.parse("{text_a}。总之很{mask}。{text_b}")
    assert plain.render({"text_a": "好吃", "text_b": "下次"}) == ("好吃。总之很", "。下次")
    assert plain.domain_premise() == "。总之很"


@pytest.mark.parametrize("text, message", [
    ("{text_a}总之很好。", "exactly one {mask}"),
    ("{text_a}{mask}{mask}", "exactly one {mask}"),
    ("{text_a}{mask}{soft}", "soft tokens go before"),
    ("总之很{mask}。", "places no field"),
    ("{text a}{mask}", "a field name"),
    ("{soft*0}{text_a}{mask}", "positive N"),
    ('{"placeholder": }{mask}', "OpenPrompt's JSON"),
])
def test_bad_templates_are_one_clear_error(text, message):
    with pytest.raises(CpmliveError, match=message.replace("{", r"\{").replace("}", r"\}").replace("*", r"\*")):
        Template.parse(text)


def test_an_example_without_a_templates_field_is_named():
    with pytest.raises(CpmliveError, match="field 'text_b'"):
        Template.parse("{text_a}{text_b}{mask}").render({"text_a": "x"})
    with pytest.raises(CpmliveError, match="only once trained"):
        Template.parse("{soft}{text_a}{mask}").render({"text_a": "x"})


# ---- verbalizers ----------------------------------------------------------------------------


def test_verbalizers_load_from_inline_dict_and_file(tmp_path):
    inline = Verbalizer.load("正面=好|棒,负面=差|糟糕")
    assert inline.words == SENTIMENT and inline.kind == "manual"
    path = tmp_path / "v.yaml"
    path.write_text("kind: knowledgeable\nmin_prior: 0.1\nwords:\n  正面: [好, 棒]\n  负面: 差\n", encoding="utf-8")
    loaded = Verbalizer.load(str(path))
    assert loaded.kind == "knowledgeable" and loaded.min_prior == 0.1 and loaded.words["负面"] == ["差"]
    with pytest.raises(CpmliveError, match="at least two classes"):
        Verbalizer.load({"正面": ["好"]})
    with pytest.raises(CpmliveError, match="kind must be"):
        Verbalizer(SENTIMENT, "fuzzy")


def test_a_class_scores_the_mean_probability_of_its_words():
    verbalizer = Verbalizer(SENTIMENT)
    probs = torch.tensor([[0.4, 0.2, 0.3, 0.1]])
    expected = torch.tensor([[math.log(0.3), math.log(0.2)]])
    assert torch.allclose(verbalizer.class_scores(probs.log()), expected)
    soft = Verbalizer(SENTIMENT, "soft", weights=torch.zeros(4), bias=torch.zeros(2))
    assert torch.allclose(soft.class_scores(probs.log()), expected)  # untrained: the manual verbalizer


def test_kpt_refinement_drops_rare_and_misplaced_words():
    words = {"正面": ["好", "棒", "差劲", "罕见"], "负面": ["坏", "糟"]}
    verbalizer = Verbalizer(words, "knowledgeable", min_prior=0.05)
    positive = torch.tensor([0.5, 0.4, 0.05, 0.001, 0.05, 0.05])
    negative = torch.tensor([0.05, 0.05, 0.4, 0.001, 0.5, 0.4])
    support = torch.stack([positive, positive, negative, negative]).log()  # 差劲 follows 坏; 罕见 is rare
    refined = verbalizer.refine(support)
    assert refined.words == {"正面": ["好", "棒"], "负面": ["坏", "糟"]} and refined.kind == "knowledgeable"


# ---- calibration ----------------------------------------------------------------------------


def biased_scorer(truth: dict[str, str], bias: dict[str, float]):
    """A scorer whose mask probability is the evidence times a prior that favours 好: the
    evidence (0.7 for the true class's word) exists only in real inputs; content-free ones and
    the domain premise alone see the prior."""

    def score(triples):
        out = []
        for context, word, _ in triples:
            text = next((t for t in truth if t in context), None)
            evidence = 0.5 if text is None else (0.7 if word == ("好" if truth[text] == "正面" else "差") else 0.3)
            weights = {w: bias[w] * (evidence if w == word else 1 - evidence) for w in bias}
            out.append(math.log(weights[word] / sum(weights.values())))
        return out

    return score


@pytest.mark.parametrize("kind", ["contextual", "pmi", "support"])
def test_calibration_corrects_a_biased_prior(kind):
    template, verbalizer = Template.parse("{text_a}。总之很{mask}。"), Verbalizer({"正面": ["好"], "负面": ["差"]})
    truth = {e["text_a"]: e["label"] for e in EXAMPLES}
    score = biased_scorer(truth, {"好": 0.9, "差": 0.1})
    words = prompting.word_logprobs(score, template, verbalizer, EXAMPLES)
    raw = prompting.classify_scores(words, verbalizer).argmax(-1).tolist()
    assert raw == [0] * len(EXAMPLES)  # the prior wins: every text is 正面
    support = [{"text_a": "。"}] * 3  # unlabeled texts that carry no evidence either way
    offset = prompting.calibrate(kind, score, template, verbalizer, support=support)
    fixed = prompting.classify_scores(words, verbalizer, offset).argmax(-1).tolist()
    assert [verbalizer.labels[i] for i in fixed] == [e["label"] for e in EXAMPLES]


def test_calibration_errors_are_named():
    template, verbalizer = Template.parse("{text_a}{mask}"), Verbalizer({"a": ["好"], "b": ["差"]})
    with pytest.raises(CpmliveError, match="domain premise"):
        prompting.calibrate("pmi", lambda t: [0.0] * len(t), template, verbalizer)
    with pytest.raises(CpmliveError, match="support texts"):
        prompting.calibrate("support", lambda t: [0.0] * len(t), template, verbalizer)
    with pytest.raises(CpmliveError, match="calibration must be"):
        prompting.calibrate("platt", lambda t: [0.0] * len(t), template, verbalizer)


# ---- few-shot -------------------------------------------------------------------------------


def test_shots_are_seeded_balanced_and_interleaved():
    train = [{"text_a": f"{i}", "label": "正面" if i % 3 else "负面"} for i in range(30)]
    first = prompting.sample_shots(train, ["正面", "负面"], 4, seed=7)
    assert first == prompting.sample_shots(train, ["正面", "负面"], 4, seed=7)
    assert first != prompting.sample_shots(train, ["正面", "负面"], 4, seed=8)
    assert [e["label"] for e in first] == ["正面", "负面"] * 4
    with pytest.raises(CpmliveError, match="class '负面' has 10"):
        prompting.sample_shots(train, ["正面", "负面"], 11, seed=0)
    shown = prompting.demonstrations(Template.parse("{text_a}很{mask}。"), Verbalizer(SENTIMENT), first[:2])
    assert shown == f"{first[0]['text_a']}很好。\n{first[1]['text_a']}很差。\n"
    assert prompting.mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213), abs=1e-6)


def test_few_shot_runs_are_reproducible_per_seed(demo):
    template, verbalizer = Template.parse("{text_a}。总之很{mask}。"), Verbalizer(SENTIMENT)
    report = prompt_classify.run(demo, template, verbalizer, EXAMPLES, EXAMPLES, shots=1, mode="icl", seeds=[0, 1])
    again = prompt_classify.run(demo, template, verbalizer, EXAMPLES, EXAMPLES, shots=1, mode="icl", seeds=[0, 1])
    assert len(report.accuracies) == 2 and report.accuracies == again.accuracies
    assert report.to_dict()["std"] == pytest.approx(prompting.mean_std(report.accuracies)[1])


def test_a_long_input_is_cut_to_the_window(demo):
    template, verbalizer = Template.parse("{text_a}。总之很{mask}。"), Verbalizer(SENTIMENT)
    long = {"text_a": "房间很干净" * 200, "label": "正面"}
    fitted = prompt_classify.fit_window(demo, template, verbalizer, long)
    limit = demo.config.max_length - demo.config.prompt_length
    assert long["text_a"].startswith(fitted["text_a"]) and 0 < len(fitted["text_a"]) < len(long["text_a"])
    assert len(demo.encode_context(fitted["text_a"] + "。总之很")) + 2 + 1 <= limit
    assert prompt_classify.fit_window(demo, template, verbalizer, EXAMPLES[0]) is EXAMPLES[0]
    report = prompt_classify.run(demo, template, verbalizer, [long, *EXAMPLES])
    assert report.truncated == 1 and len(report.predictions) == 7
    train = [long, {"text_a": "前台态度恶劣" * 200, "label": "负面"}]
    shown = prompt_classify._demonstrations(demo, template, verbalizer, train, "label")
    assert len(demo.encode_context(shown)) <= limit // 2 + 4  # each of two examples cut to a quarter window
    icl = prompt_classify.run(demo, template, verbalizer, [long], train, shots=1, mode="icl")
    assert len(icl.predictions) == 1


# ---- scores against the reference, soft tokens, prompt tuning ---------------------------------


def test_triples_score_the_word_and_the_rest_as_hf_does(llama_dir):
    """On an HF Llama directory, a (context, word, rest) score is HF's summed log-probability of
    the word's and the rest's tokens after the context (a word of several tokens included)."""
    import transformers

    lm = cpmlive.load(llama_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    context, word, rest = lm.encode_context("今天天气"), lm.tokenizer.encode("很好"), lm.tokenizer.encode("。")
    assert len(word) > 1
    (ours, _), = lm.score([("今天天气", "很好", "。")])
    ids = torch.tensor([context + word + rest])
    with torch.no_grad():
        logprobs = reference(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, len(context):]
    expected = logprobs[len(context) - 1:].gather(1, targets[:, None]).sum().item()
    assert abs(ours - expected) < 1e-4


def test_cpm_ant_scores_a_blank_as_its_fill_decodes_it(demo):
    """CPM-Ant reads the text after the mask on the blank's far side: the two tokens its fill
    writes greedily into a two-token blank are the greedy ones by the infilling score."""
    written = demo.fill("北京是中国的<mask>，也是文化中心。", blank_lengths=[2], return_fills=True)[0]
    ids = demo.tokenizer.encode(written)
    after = demo.tokenizer.encode("，也是文化中心。")
    (score, greedy), = demo.score([(demo.encode_context("北京是中国的"), ids, after)])
    (without, _), = demo.score([(demo.encode_context("北京是中国的"), ids)])
    assert len(ids) == 2 and greedy and score != pytest.approx(without)


@pytest.mark.parametrize("model", ["demo", "llama-demo"])
def test_soft_tokens_start_as_their_text_and_tuning_lowers_the_loss(model):
    lm = cpmlive.load(model)
    template, verbalizer = Template.parse("{text_a}{soft:总之}很{mask}。"), Verbalizer(SENTIMENT, "soft")
    tuner = PromptTuner(lm.model, lm.encode_context, lm.tokenizer.encode, lm.tokenizer.eos_id, template, verbalizer)
    before = tuner.word_scores(EXAMPLES[:2])
    rows = [(lm.encode_context("") + lm.tokenizer.encode(e["text_a"]) + lm.tokenizer.encode("总之") +
             lm.tokenizer.encode("很"), lm.tokenizer.encode(word), lm.tokenizer.encode("。"))
            for e in EXAMPLES[:2] for _, word in verbalizer.flat()]
    expected = torch.tensor([s for s, _ in lm.score(rows)]).view(2, -1)
    assert torch.allclose(before, expected, atol=1e-4)
    weights = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    losses = tuner.fit(EXAMPLES, steps=6, lr=0.1)
    tuner.close()
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, weights[name]) and p.requires_grad for name, p in lm.model.named_parameters())


# ---- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in EXAMPLES), encoding="utf-8")
    return path


def test_classify_reports_accuracy_and_the_majority(data, capsys):
    assert main(["classify", "demo", "--template", "{text_a}。总之很{mask}。", "--verbalizer",
                 "正面=好|棒,负面=差|糟糕", "--data", str(data), "--calibrate", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 6 and result["majority"] == 0.5 and result["calibration"] == "contextual"
    assert 0 <= result["accuracy"] <= 1 and result["seeds"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--template", "{text_a}总之很好"], "exactly one {mask}"),
    (["--verbalizer", "正面=好"], "at least two classes"),
    (["--verbalizer", "正面=好,中性=还行"], "label '负面' is not in the verbalizer"),
    (["--shots", "4", "--train", "DATA"], "class '正面' has 3"),
    (["--shots", "2"], "--shots draws its examples from --train"),
    (["--shots", "1", "--train", "DATA", "--tune"], "nothing to tune"),
])
def test_classify_bad_input_is_one_line(data, capsys, extra, message):
    args = {"--template": "{text_a}。总之很{mask}。", "--verbalizer": "正面=好|棒,负面=差|糟糕"}
    flags = [str(data) if item == "DATA" else item for item in extra]
    for flag, value in args.items():
        if flag not in flags:
            flags += [flag, value]
    assert main(["classify", "demo", "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cpm_bee_answers_through_its_choice_task(capsys, data):
    """CPM-Bee picks an option of its choice task (the template with ____ for the mask); it gives
    no scores, so calibration and prompt tuning are one line each."""
    bee = cpmlive.load("bee-demo")
    template, verbalizer = Template.parse("{text_a}。总之很{mask}。"), Verbalizer(SENTIMENT)
    predicted = prompt_classify.predict(bee, template, verbalizer, EXAMPLES[:2])
    assert len(predicted) == 2 and set(predicted) <= {"正面", "负面"}
    with pytest.raises(CpmliveError, match="calibration does not apply"):
        prompt_classify.predict(bee, template, verbalizer, EXAMPLES[:2], calibration="contextual")
    assert main(["classify", "bee-demo", "--template", "{text_a}{soft}很{mask}。", "--verbalizer",
                 "正面=好,负面=差", "--data", str(data), "--train", str(data), "--shots", "1", "--tune"]) == 2
    assert "prompt tuning does not apply" in capsys.readouterr().err


def test_support_calibration_and_kpt_run_from_the_command_line(data, capsys):
    """Without --train, support calibration and KPT's refinement read the data's texts, unlabeled."""
    path = data.parent / "kpt.yaml"
    path.write_text("kind: knowledgeable\nwords:\n  正面: [好, 棒, 满意]\n  负面: [差, 糟糕, 失望]\n", encoding="utf-8")
    assert main(["classify", "demo", "--template", "{text_a}。总之很{mask}。", "--verbalizer", str(path),
                 "--data", str(data), "--calibrate", "support", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calibration"] == "support" and 0 <= result["accuracy"] <= 1
