"""The fine-tuning recipe, task evaluation and the title verb on a tiny model with the demo vocab."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpmlive
from cpmlive.resources import ASSETS
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.data.layout import GENERATION
from cpmlive.infer.generate import build_batch, step_inputs
from cpmlive.apps.headline import rank_titles
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.train.metrics import latest_by_step, read_records
from cpmlive.tune.finetune import FinetuneConfig, Finetuner
from cpmlive.tune.task import TaskSpec, encode_input, encode_target, example_batch, target_logprobs

DEMO_VOCAB = ASSETS / "demo" / "vocab.txt"
CITIES = ["北京", "上海", "广州", "深圳", "南京", "武汉", "成都", "西安"]
THINGS = ["下雪", "开会", "修路", "办展", "植树", "赛跑", "演出", "招聘"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    config = AntConfig.from_dict({**preset("tiny").to_dict(), "vocab_size": 16000, "max_length": 256})
    model = build_model(config, seed=0)
    # A trained model's embeddings are far larger than the init's; with init-sized tied
    # embeddings a frozen random model cannot reach confident logits through a small delta.
    torch.nn.init.normal_(model.input_embedding.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("tiny-base") / "model"
    save_checkpoint(model, config, out, vocab=DEMO_VOCAB)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def generation_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gen-data")
    rows = [{"input": f"本报{city}电，今天{city}市民{thing}，场面热闹。", "output": f"{city}{thing}"}
            for city in CITIES for thing in THINGS]
    return write_jsonl(root / "train.jsonl", rows[:48]), write_jsonl(root / "dev.jsonl", rows[48:56])


@pytest.fixture(scope="module")
def classify_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cls-data")
    good = ["很好", "不错", "满意", "喜欢"]
    bad = ["很差", "糟糕", "失望", "讨厌"]
    rows = []
    for i, city in enumerate(CITIES):
        for j in range(4):
            rows.append({"input": f"{city}的酒店{good[j]}", "label": "正面"})
            rows.append({"input": f"{city}的酒店{bad[j]}", "label": "负面"})
    return write_jsonl(root / "train.jsonl", rows[:48]), write_jsonl(root / "dev.jsonl", rows[48:])


def tune_config(base_dir: Path, data: tuple[Path, Path], out: Path, **extra) -> FinetuneConfig:
    values = {"model": str(base_dir), "data": str(data[0]), "eval": str(data[1]), "out": str(out),
              "batch_size": 8, "max_steps": 12, "lr": 0.01, "warmup_steps": 2, "eval_every": 4,
              "save_every": 4, "precision": "fp32", "progress": False, "max_input_tokens": 32,
              "max_output_tokens": 8, **extra}
    return FinetuneConfig.from_dict(values)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in latest_by_step(list(read_records(run_dir)), "train")}


def test_training_layout_scores_targets_exactly_as_decoding_does(base_dir):
    lm = cpmlive.load(base_dir)
    spec = TaskSpec(max_input_tokens=64, max_output_tokens=16)
    row = encode_input(lm.tokenizer, spec, "今天北京下雪，市民出门赏雪。")[0]
    target = encode_target(lm.tokenizer, spec, "北京迎来新年第一场雪")
    with torch.no_grad():
        trained = target_logprobs(lm.model, example_batch([(row, target)], spec.prompt_task, lm.config)).item()
        batch = build_batch([row], GENERATION, lm.config.prompt_length)
        cache = lm.model.new_cache(1, batch.input_ids.size(1) + len(target))
        hidden = lm.model(**batch.as_inputs(), cache=cache)[:, -1]
        decoded = 0.0
        for token in target:
            decoded += lm.model.logits(hidden).log_softmax(-1)[0, token].item()
            step = step_inputs(torch.tensor([[token]]), 2)
            hidden = lm.model(**step, cache=cache)[:, -1]
    assert trained == pytest.approx(decoded, abs=1e-4)


def test_generation_finetune_lowers_dev_loss_and_keeps_the_best_adapter(base_dir, generation_data, tmp_path):
    config = tune_config(base_dir, generation_data, tmp_path / "run", max_steps=16)
    Finetuner(config).run()
    records = list(read_records(tmp_path / "run"))
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 4 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    best = min(evals, key=lambda r: r["val_loss"])
    saved = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert saved["step"] == best["step"]
    names = {p.name for p in (tmp_path / "run" / "best").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "task.json", "vocab.txt"} <= names
    start = records[0]
    assert 0 < start["trainable"] < start["parameters"] / 10


def test_resume_reproduces_the_uninterrupted_run(base_dir, generation_data, tmp_path):
    full = tune_config(base_dir, generation_data, tmp_path / "full", max_steps=8,
                       delta={"method": "lora", "dropout": 0.1})
    Finetuner(full).run()
    interrupted = Finetuner(tune_config(base_dir, generation_data, tmp_path / "half", max_steps=8,
                                        delta={"method": "lora", "dropout": 0.1}))
    interrupted.total_steps = 4  # stops after the step-4 checkpoint, schedule still for 8 steps
    interrupted.run()
    resumed = tune_config(base_dir, generation_data, tmp_path / "half", max_steps=8,
                          delta={"method": "lora", "dropout": 0.1})
    Finetuner(resumed, resume="auto").run()
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "half")


def test_classification_finetune_reports_accuracy_and_evaluates(base_dir, classify_data, tmp_path):
    config = tune_config(base_dir, classify_data, tmp_path / "run", task="classify", max_steps=24, lr=0.02)
    Finetuner(config).run()
    evals = [r for r in read_records(tmp_path / "run") if r["type"] == "eval"]
    assert all(0 <= r["val_accuracy"] <= 100 and 0 <= r["val_macro_f1"] <= 100 for r in evals)
    assert max(r["val_accuracy"] for r in evals) == 100.0
    lm = cpmlive.load(base_dir, adapter=tmp_path / "run" / "best")
    assert lm.task.labels == ["正面", "负面"]
    assert lm.classify(["上海的酒店很好", "上海的酒店很差"]) == ["正面", "负面"]
    out = run_cli("evaluate", str(base_dir), "--adapter", str(tmp_path / "run" / "best"),
                  "--data", str(classify_data[1]), "--json")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) >= {"accuracy", "macro_f1", "perplexity"}
    unseen = write_jsonl(tmp_path / "unseen.jsonl",
                         [{"input": "好", "label": "正面"}, {"input": "坏", "label": "中性"}])
    out = run_cli("evaluate", str(base_dir), "--adapter", str(tmp_path / "run" / "best"), "--data", str(unseen))
    assert out.returncode == 2 and "unseen.jsonl:2" in out.stderr and len(out.stderr.splitlines()) == 1


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpmlive", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


@pytest.fixture(scope="module")
def tuned(base_dir, generation_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "run"
    Finetuner(tune_config(base_dir, generation_data, out, max_steps=8)).run()
    return out / "best"


def test_cli_finetune_and_generation_evaluate(base_dir, generation_data, tuned, tmp_path):
    out = run_cli("finetune", "--model", str(base_dir), "--data", str(generation_data[0]),
                  "--eval", str(generation_data[1]), "--out", str(tmp_path / "run"), "max_steps=2", "eval_every=2",
                  "batch_size=4", "progress=false", "precision=fp32", "max_input_tokens=32")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "best" / "task.json").is_file()
    out = run_cli("evaluate", str(base_dir), "--adapter", str(tuned), "--data", str(generation_data[1]), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"rouge1", "rouge2", "rougeL", "perplexity"} <= set(result)
    assert result["examples"] == 8


def test_cli_finetune_bad_input_is_one_line(base_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a"\n', encoding="utf-8")
    out = run_cli("finetune", "--model", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "r"),
                  "max_input_tokens=32")
    assert out.returncode == 2 and "bad.jsonl:2" in out.stderr and len(out.stderr.splitlines()) == 1
    out = run_cli("finetune", "--model", str(base_dir), "--data", str(bad), "learning_rate=1")
    assert out.returncode == 2 and "learning_rate" in out.stderr


def test_title_cli_returns_distinct_candidates_and_handles_bad_articles(base_dir, tuned, tmp_path):
    article = "本报北京电，今天北京市民下雪，场面热闹。" * 3
    common = ["--model", str(base_dir), "--adapter", str(tuned), "--num-beams", "3", "--samples", "3",
              "--min-chars", "1"]
    out = run_cli("title", article, "-n", "4", "--json", *common)
    assert out.returncode == 0, out.stderr
    titles = json.loads(out.stdout)["titles"]
    assert 1 <= len(titles) <= 4 and len(set(titles)) == len(titles) and all(t.strip() for t in titles)
    out = run_cli("title", "-", *common, stdin="   \n")
    assert out.returncode == 2 and out.stderr.strip() == "cpmlive: error: the article is empty"
    huge = tmp_path / "huge.txt"
    huge.write_text("北京下雪。" * 20_000, encoding="utf-8")
    out = run_cli("title", "--file", str(huge), "--json", *common)
    assert out.returncode == 0, out.stderr
    assert "truncated" in out.stderr and "Traceback" not in out.stderr
    other = cpmlive.load(base_dir)
    torch.nn.init.normal_(other.model.input_embedding.weight)
    other_dir = tmp_path / "other"
    save_checkpoint(other.model, other.config, other_dir, vocab=DEMO_VOCAB)
    out = run_cli("title", article, "--model", str(other_dir), "--adapter", str(tuned))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "base" in out.stderr


@pytest.mark.parametrize("method", ["prompt", "bitfit"])
def test_prompt_and_norm_tuning_train_save_and_serve(base_dir, generation_data, tmp_path, method):
    config = tune_config(base_dir, generation_data, tmp_path / "run", max_steps=6, lr=0.05,
                         delta={"method": method})
    Finetuner(config).run()
    lm = cpmlive.load(base_dir, adapter=tmp_path / "run" / "best")
    assert lm.task.prompt_task == (3 if method == "prompt" else 2)
    article = "本报北京电，今天北京市民下雪，场面热闹。"
    row = encode_input(lm.tokenizer, lm.task, article)[0]
    tuned = rank_titles(lm, row, lm.task, ["北京下雪"])[0]
    with lm.using(None):
        assert lm.task is None
        base = rank_titles(lm, row, TaskSpec(), ["北京下雪"])[0]
    assert tuned > base + 0.5  # the trained delta (and only it) makes the target likelier


def test_copy_rules_keep_titles_to_the_articles_words(base_dir, tuned):
    from cpmlive.apps.headline import CopySpans, TitleOptions, article_words, suggest_titles

    lm = cpmlive.load(base_dir, adapter=tuned)
    article = "本报北京电，今天北京市民下雪，场面热闹。"
    row = encode_input(lm.tokenizer, lm.task, article)[0]
    words = article_words(lm, row)
    rule = CopySpans(lm, row, bonus=3.0)
    history = row + [row[2]]
    logits = rule(torch.zeros(1, lm.config.vocab_size), [history])[0]
    allowed = set(torch.isfinite(logits).nonzero()[:, 0].tolist())
    assert allowed == (words | {lm.tokenizer.eos_id}) - {row[2]}
    assert logits[row[3]].item() == 3.0 or row[3] not in words
    for options in (TitleOptions(n=3, num_beams=3, samples=2, copy_spans=True, min_chars=1),
                    TitleOptions(n=3, num_beams=3, samples=2, copy_bias=50.0, min_chars=1)):
        titles = suggest_titles(lm, article, options)
        assert titles and all(set(title) <= set(article) for title in titles), titles


def test_contrastive_ranking_is_the_adapters_gain_over_the_base(base_dir, tuned):
    from cpmlive.apps.headline import rank_titles

    lm = cpmlive.load(base_dir, adapter=tuned)
    row = encode_input(lm.tokenizer, lm.task, "本报北京电，今天北京市民下雪，场面热闹。")[0]
    titles = ["北京下雪", "场面热闹", "今天北京市民下雪"]
    pairs = [(row, encode_target(lm.tokenizer, lm.task, t)) for t in titles]
    batch = example_batch(pairs, lm.task.prompt_task, lm.config)
    with torch.inference_mode():
        tuned_scores = target_logprobs(lm.model, batch)
        with lm.using(None):
            base_scores = target_logprobs(lm.model, batch)
    contrast = rank_titles(lm, row, lm.task, titles, contrast=True)
    assert contrast == pytest.approx((tuned_scores - base_scores).tolist(), abs=1e-4)
    mean = rank_titles(lm, row, lm.task, titles)
    assert mean == pytest.approx([s / len(target) for s, (_, target) in zip(tuned_scores.tolist(), pairs)], abs=1e-4)
    with lm.using(None):  # no adapter: nothing to contrast with, the mean is the score
        assert rank_titles(lm, row, TaskSpec(), titles, contrast=True) == pytest.approx(
            rank_titles(lm, row, TaskSpec(), titles), abs=1e-6)


def test_titles_draw_on_the_lead_and_respect_the_length_options(base_dir, tuned):
    from cpmlive.apps.headline import TitleOptions, lead_clauses, suggest_titles

    lm = cpmlive.load(base_dir, adapter=tuned)
    article = "本报北京电，今天北京市民下雪，场面热闹。第二句话，没有用。"
    lead = set(lead_clauses(article, 1, 3))
    greedy_and_lead = TitleOptions(n=20, num_beams=1, samples=0, lead_sentences=1, min_chars=1, max_chars=40)
    titles = suggest_titles(lm, article, greedy_and_lead)
    assert lead <= set(titles) and len(set(titles) - lead) <= 1, titles  # the clauses and one greedy title
    generated_only = TitleOptions(n=5, num_beams=2, samples=2, lead_sentences=0, min_new_tokens=6, min_chars=1,
                                  max_chars=40)
    long = suggest_titles(lm, article, generated_only)
    assert long and all(len(t) >= 6 for t in long), long  # six copied words, each at least one character


def test_title_options_refuse_no_source_of_titles():
    from cpmlive.apps.headline import TitleOptions

    with pytest.raises(CpmliveError, match="no source of titles"):
        TitleOptions(num_beams=0, samples=0, lead_sentences=0)
    assert TitleOptions(num_beams=0, samples=0, lead_sentences=1).lead_sentences == 1


@pytest.mark.parametrize("key,value", [("precision", "fp16"), ("schedule", "linear"), ("best_metric", "bleu"),
                                       ("classify_loss", "hinge")])
def test_bad_choice_is_named_with_the_allowed_ones(key, value):
    with pytest.raises(CpmliveError, match=f"config: {key} must be one of .*, got '{value}'"):
        FinetuneConfig.from_file(None, ["data=/x", f"{key}={value}"])


def test_qlora_trains_an_adapter_on_a_quantized_base(base_dir, generation_data, tmp_path):
    from cpmlive.compress.quantize import quantize_checkpoint
    from cpmlive.config import QuantConfig
    from cpmlive.tune.delta import merge_checkpoint

    quantized = quantize_checkpoint(base_dir, tmp_path / "int4", QuantConfig(bits=4, group_size=32), progress=False)
    Finetuner(tune_config(quantized, generation_data, tmp_path / "run", max_steps=16)).run()
    evals = [r for r in read_records(tmp_path / "run") if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    lm = cpmlive.load(quantized, adapter=tmp_path / "run" / "best")
    assert type(lm.model.layers[0].attn.project_q).__name__ == "LoraQuantizedLinear"
    assert lm.model.layers[0].attn.project_q.weight.dtype == torch.uint8
    assert isinstance(lm.generate("本报北京电，今天北京市民植树。", max_new_tokens=4), str)
    with pytest.raises(CpmliveError, match="cannot be merged into quantized weights"):
        merge_checkpoint(quantized, tmp_path / "run" / "best", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
