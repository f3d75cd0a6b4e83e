"""lm-evaluation-harness over cpmlive (``apps/harness.py``): on an HF Llama directory (random
weights, a Llama-style tokenizer that starts texts with ``<s>``), every multiple-choice request's
log-likelihood equals lm-eval's own ``hf`` backend's on the same weights and task, and the
rolling log-likelihood equals it where that backend reads no ``<s>`` of its own; the local tasks
run offline, every family that scores texts answers the three request types, and an unknown task
or missing data file is one line (exit 2)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="cpmlive-datasets-"))

import cpmlive  # noqa: E402
from cpmlive.apps import harness  # noqa: E402
from cpmlive.cli import main  # noqa: E402
from cpmlive.data.choice_tasks import choice_record  # noqa: E402

from decoder_helpers import tiny_hf_dir  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

DOCS = [("今天天气很好，我们去公园散步。", "心情很好", ["心情很好", "非常难过", "不知道"]),
        ("这家酒店的服务太差了", "差评", ["好评", "差评"]),
        ("床前明月光", "疑是地上霜", ["疑是地上霜", "低头思故乡", "举头望明月"]),
        ("", "你好", ["你好", "再见"])]


@pytest.fixture(autouse=True)
def quick_harness(monkeypatch):
    """The harness's per-run environment report (pip list, git describe) is seconds of subprocesses."""
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda storage: None)
    monkeypatch.setattr("lm_eval.evaluator.get_git_commit_hash", lambda: None)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    data = directory / "mc.jsonl"
    rows = [{"query": q, "choices": c, "label": c.index(a)} for q, a, c in DOCS]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (directory / "texts.jsonl").write_text("".join(json.dumps({"text": q + a}, ensure_ascii=False) + "\n"
                                                   for q, a, _ in DOCS[:3]), encoding="utf-8")
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (directory / "mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{query}}\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    (directory / "rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'texts.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n", encoding="utf-8")
    (directory / "gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\noutput_type: generate_until\n"
        "doc_to_text: \"{{query}}\"\ndoc_to_target: \"{{choices[label]}}\"\n"
        "generation_kwargs:\n  until: [\"。\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_hf_dir(tmp_path_factory.mktemp("llama"), "llama")


def _loglikelihoods(results: dict, task: str) -> list[list[float]]:
    return [[float(r[0]) for r in sample["filtered_resps"]] for sample in results["samples"][task]]


def _hf_backend(directory, tasks, manager, **model_args) -> dict:
    extra = "".join(f",{k}={v}" for k, v in model_args.items())
    return lm_eval.evaluator.simple_evaluate(model="hf", model_args=f"pretrained={directory},dtype=float32{extra}",
                                             device="cpu", batch_size=1, tasks=tasks, task_manager=manager,
                                             log_samples=True, bootstrap_iters=0)


def test_loglikelihoods_equal_the_hf_backend(llama_dir, task_dir):
    manager = harness.task_manager([task_dir])
    ours = harness.run_tasks(cpmlive.load(llama_dir), ["tiny_mc"], include=[task_dir], batch_size=3)
    reference = _hf_backend(llama_dir, ["tiny_mc"], manager)
    got, expected = _loglikelihoods(ours, "tiny_mc"), _loglikelihoods(reference, "tiny_mc")
    assert len(got) == len(DOCS) and [len(g) for g in got] == [len(c) for _, _, c in DOCS]
    assert max(abs(a - b) for g, e in zip(got, expected) for a, b in zip(g, e)) < 1e-4
    greedy = [[bool(r[1]) for r in s["filtered_resps"]] for s in ours["samples"]["tiny_mc"]]
    assert greedy == [[bool(r[1]) for r in s["filtered_resps"]] for s in reference["samples"]["tiny_mc"]]
    assert ours["results"]["tiny_mc"]["acc,none"] == reference["results"]["tiny_mc"]["acc,none"]


def test_rolling_loglikelihood_equals_the_hf_backend_reading_no_bos_of_its_own(llama_dir, task_dir):
    manager = harness.task_manager([task_dir])
    ours = harness.run_tasks(cpmlive.load(llama_dir), ["tiny_rolling"], include=[task_dir])
    reference = _hf_backend(llama_dir, ["tiny_rolling"], manager, add_bos_token=False)
    got = [float(s["filtered_resps"][0]) for s in ours["samples"]["tiny_rolling"]]
    expected = [float(s["filtered_resps"][0]) for s in reference["samples"]["tiny_rolling"]]
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(got, expected)) < 1e-3


@pytest.mark.parametrize("model", ["demo", "cpm1-demo", "t5-demo"])
def test_every_request_type_runs_on_each_family(model, task_dir):
    results = harness.run_tasks(cpmlive.load(model), ["tiny_mc", "tiny_rolling", "tiny_gen"], include=[task_dir],
                                limit=2)
    assert set(results["results"]) == {"tiny_mc", "tiny_rolling", "tiny_gen"}
    scores = _loglikelihoods(results, "tiny_mc")
    assert [len(row) for row in scores] == [3, 2] and all(x < 0 for row in scores for x in row)
    assert all(float(s["filtered_resps"][0]) < 0 for s in results["samples"]["tiny_rolling"])
    generated = [s["filtered_resps"][0] for s in results["samples"]["tiny_gen"]]
    assert all(isinstance(text, str) and "。" not in text for text in generated)


@pytest.mark.parametrize("model", ["demo", "cpm1-demo", "llama-demo", "t5-demo"])
def test_a_score_equals_the_engines_logprobs_of_what_it_wrote(model):
    """Scores read a continuation in one pass; the engine wrote it token by token from its cache."""
    lm = cpmlive.load(model)
    context = "北京是中国的"
    row = lm.encode_prompt(context)  # (an encoder-decoder's: the encoder's row, then the decoder's start)
    done = lm.engine.submit(lm.request(row, lm._options(4, {}), logprobs=0)).result()
    written = [t for t in done.ids if t not in lm.stop_ids]
    (logprob, greedy), = lm.score([(lm.encode_context(context), written)])
    assert greedy and abs(logprob - sum(done.logprobs[:len(written)])) < 1e-3


def test_local_tasks_run_over_data_files(tmp_path, capsys):
    rng = __import__("random").Random(0)
    rows = [choice_record("这家店的菜很好吃", "正面", ["负面"], rng) for _ in range(3)]
    for name in ("sentiment", "headline", "poem", "gloss"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
    assert main(["evaluate", "llama-demo", "--tasks", "cpmlive_sentiment,cpmlive_gloss", "--task-data",
                 str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"cpmlive_sentiment", "cpmlive_gloss"}
    assert 0 <= out["tasks"]["cpmlive_gloss"]["acc"] <= 1


def test_unknown_task_and_missing_data_are_one_line(tmp_path, capsys):
    assert main(["evaluate", "llama-demo", "--tasks", "no_such_task"]) == 2
    error = capsys.readouterr().err
    assert "unknown lm-eval task 'no_such_task'" in error and error.count("\n") == 1
    assert main(["evaluate", "llama-demo", "--tasks", "cpmlive_poem", "--task-data", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "poem.jsonl does not exist" in error and error.count("\n") == 1
    assert main(["evaluate", "bert-demo", "--tasks", "cpmlive_poem"]) == 2
    assert "BERT cannot generate" in capsys.readouterr().err


def test_clue_tasks_are_indexed_and_offline_is_one_line(monkeypatch, capsys):
    """The shipped CLUE tasks read the HF hub's ``clue/clue``: indexed under their tag here, and
    without network the harness's failure to reach the hub is one line."""
    manager = harness.task_manager()
    assert {"cpmlive_clue_afqmc", "cpmlive_clue_cmnli"} <= set(manager.all_tasks)
    assert manager.task_index["cpmlive_clue"].tags == {"cpmlive_clue_afqmc", "cpmlive_clue_cmnli"}
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    assert main(["evaluate", "llama-demo", "--tasks", "cpmlive_clue_afqmc", "--limit", "2"]) == 2
    error = capsys.readouterr().err
    assert "clue/clue" in error and "CPMLIVE_HARNESS_ONLINE=1" in error and error.count("\n") == 1


def test_choice_sets_are_seeded_and_keep_the_answer():
    from cpmlive.data.choice_tasks import gloss_records, headline_records, poem_records, sentiment_records

    glosses = [(f"词{i}", f"gloss {i}") for i in range(40)]
    first, again = gloss_records(glosses, 10, seed=3), gloss_records(glosses, 10, seed=3)
    assert first == again and len(first) == 10
    gloss = dict(glosses)
    assert all(len(r["choices"]) == 4 == len(set(r["choices"])) and r["choices"][r["label"]] == gloss[r["query"]]
               for r in first)
    poems = [["一二三四五。", "六七八九十。", "甲乙丙丁戊。"], ["春眠不觉晓。", "处处闻啼鸟。"],
             ["白日依山尽。", "黄河入海流。"], ["床前明月光。", "疑是地上霜。"], ["千山鸟飞绝。", "万径人踪灭。"]]
    rows = poem_records(poems, 20)
    nexts = {a: b for lines in poems for a, b in zip(lines, lines[1:])}
    assert rows and all(r["choices"][r["label"]] == nexts[r["query"]] for r in rows)
    assert all(len({len(c) for c in r["choices"]}) == 1 for r in rows)
    heads = headline_records([(f"标题{i}", f"正文{i}" * 50) for i in range(10)], 5)
    assert len(heads) == 5 and all(r["choices"][r["label"]] == "标题" + r["query"][2:r["query"].index("正", 1)]
                                   for r in heads)
    labelled = sentiment_records([("好", "正面"), ("差", "负面")], 5)
    assert sorted(r["choices"][r["label"]] for r in labelled) == ["正面", "负面"]
