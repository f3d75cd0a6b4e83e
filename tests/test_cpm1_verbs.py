"""Every verb on a CPM-1 checkpoint (HF GPT-2 layout, as ``GPT2LMHeadModel.save_pretrained``
writes it): the CLI as a user runs it, the server through the official ``openai`` client,
evaluation and pretraining losses against HF's, voting, and the one-line refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import cpmlive
from cpmlive.model.cpm1.config import Cpm1Config

from cpm1_helpers import hf_gpt2, review_lines, train_spm
from serving import serving
from test_cli import assert_clean_error, run

CONFIG = Cpm1Config(vocab_size=3000, dim_model=64, dim_ff=256, num_layers=2, num_heads=4, dim_head=16, half=False,
                    max_length=1024)
PROMPT = "今天天气不错，我们去公园玩。"


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm") / "spiece.model")


@pytest.fixture(scope="module")
def hf_model():
    return hf_gpt2(CONFIG, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_model, spiece):
    path = tmp_path_factory.mktemp("cpm1") / "hf"
    hf_model.save_pretrained(path)
    shutil.copyfile(spiece, path / "spiece.model")
    return path


def test_generate_verbs(checkpoint):
    greedy = run("generate", checkpoint, PROMPT, "--max-new-tokens", "6", "--json")
    assert greedy.returncode == 0, greedy.stderr.decode()
    result = json.loads(greedy.stdout)
    assert result["ids"] == cpmlive.load(checkpoint).generate_ids([PROMPT], max_new_tokens=6)[0]
    streamed = run("generate", checkpoint, PROMPT, "--max-new-tokens", "6", "--stream")
    assert streamed.stdout.decode().rstrip("\n") == result["text"]
    for flags in (["--num-beams", "3"], ["--do-sample", "--seed", "3", "--top-k", "20"]):
        out = run("generate", checkpoint, PROMPT, "--max-new-tokens", "4", *flags)
        assert out.returncode == 0, out.stderr.decode()


def test_info_and_tokenize(checkpoint, spiece):
    info = json.loads(run("info", checkpoint, "--json").stdout)
    assert (info["model_type"], info["format"], info["parameters"]) == ("cpm1", "hf", 300288 + 1024 * 64 - 128 * 64)
    tokens = json.loads(run("tokenize", checkpoint, "今天 天气", "--json").stdout)
    tokenizer = cpmlive.load(checkpoint).tokenizer
    assert tokens["ids"] == tokenizer.encode("今天 天气") and "\u2582" in tokens["pieces"]
    assert json.loads(run("tokenize", spiece, "今天 天气", "--json").stdout) == tokens
    preset = json.loads(run("info", "cpm1-2.6b", "--json").stdout)
    assert 2.5e9 < preset["parameters"] < 2.7e9
    assert json.loads(run("info", "cpm1-distill", "--json").stdout)["parameters"] == pytest.approx(1.09e8, rel=0.03)


def test_evaluate_bits_per_char_equals_hf_loss(checkpoint, hf_model, tmp_path):
    lines = review_lines(6)
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run("evaluate", checkpoint, "--text", tmp_path / "text.txt", "--json")
    assert result.returncode == 0, result.stderr.decode()
    score = json.loads(result.stdout)
    tokenizer = cpmlive.load(checkpoint).tokenizer
    nats = 0.0
    with torch.no_grad():
        for line in lines:
            pieces = [i for i in tokenizer.encode(line) if i != tokenizer.unk_id]  # as evaluate reports: unk_dropped
            ids = torch.tensor([[tokenizer.eod_id, *pieces]])
            nats += hf_model(ids, labels=ids).loss.item() * (ids.size(1) - 1)
    chars = sum(len(line) for line in lines)
    assert score["chars"] == chars
    assert score["bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-3)


def test_quantize_int8_and_memory_limit(checkpoint, tmp_path):
    out = tmp_path / "int8"
    assert run("quantize", checkpoint, out, "--bits", "8").returncode == 0
    assert (out / "spiece.model").is_file()
    info = json.loads(run("info", out, "--json").stdout)
    assert info["quantization"] == "int8"
    base, quantized = cpmlive.load(checkpoint), cpmlive.load(out)
    ids = torch.tensor([base.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        reference = base.model.logits(base.model(ids))
        approx = quantized.model.logits(quantized.model(ids))
    assert (approx - reference).abs().max().item() < 0.05 * reference.abs().max().item()
    limited = run("generate", checkpoint, PROMPT, "--max-new-tokens", "6", "--json", "--memory-limit", "1.5MB")
    assert limited.returncode == 0, limited.stderr.decode()
    assert json.loads(limited.stdout)["ids"] == base.generate_ids([PROMPT], max_new_tokens=6)[0]


def test_completions_through_the_openai_client(checkpoint):
    import openai

    from cpmlive.serve.app import create_app

    lm = cpmlive.load(checkpoint)
    expected = lm.generate(PROMPT, max_new_tokens=6)
    with serving(create_app(lm)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
        assert answer.choices[0].text == expected
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=name, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
        assert streamed == expected
        with pytest.raises(openai.BadRequestError, match="at most"):
            client.completions.create(model=name, prompt="好" * 1100, max_tokens=4)


def test_lora_finetune(checkpoint, tmp_path):
    rows = [{"input": f"{PROMPT}{i}", "output": "好"} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    result = run("finetune", "--model", checkpoint, "--data", data, "--out", out, "max_steps=40", "eval_every=40",
                 "batch_size=4", "lr=0.01", "max_input_tokens=64", "max_output_tokens=4", "progress=false")
    assert result.returncode == 0, result.stderr.decode()
    assert (out / "best" / "adapter_config.json").is_file() and (out / "best" / "spiece.model").is_file()
    tuned = cpmlive.load(checkpoint, adapter=out / "best")
    assert tuned.generate(f"{PROMPT}3", max_new_tokens=4) == "好"  # then <eod>, as trained


def test_causal_pretraining_loss_equals_hf_and_resumes(checkpoint, spiece, tmp_path, hf_model):
    from cpmlive.data.store import TokenStore, prepare
    from cpmlive.data.stream import PretrainStream
    from cpmlive.model.loss import masked_lm_loss

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(review_lines(300)) + "\n", encoding="utf-8")
    data = tmp_path / "data"
    prepare([str(corpus)], spiece, data, val_fraction=0.1, progress=False, workers=1)
    shutil.copyfile(spiece, data / "spiece.model")

    stream = PretrainStream(TokenStore(data, "train"), 96, 4, prompt_length=0, vocab_size=CONFIG.vocab_size,
                            objective="causal")
    batch = stream.next_batch()
    lm = cpmlive.load(checkpoint)
    with torch.no_grad():
        ours, per_task = masked_lm_loss(lm.model, batch)
        nats, count = 0.0, 0
        for row in range(batch.input_ids.size(0)):  # HF on every packed span alone
            for span in batch.span[row][batch.valid[row]].unique().tolist():
                keep = (batch.span[row] == span) & batch.valid[row]
                ids, targets = batch.input_ids[row][keep][None], batch.target[row][keep]
                logits = hf_model(ids).logits[0]
                nats += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += len(targets)
    assert ours.item() == pytest.approx(nats / count, rel=1e-4)
    assert per_task["lm"].item() == pytest.approx(ours.item(), rel=1e-5)

    args = ["model=cpm1-tiny", f"data={data}", "seq_length=96", "batch_size=4", "model_overrides={vocab_size: 3000}",
            "eval_every=5", "save_every=5", "warmup_steps=2", "lr=0.003", "progress=false"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run("pretrain", *args, f"out={whole}", "max_steps=10").returncode == 0
    shutil.copytree(whole, split)  # as if killed after step 7: its step-5 checkpoint is the latest
    shutil.rmtree(split / "checkpoints" / "step-0000010")
    (split / "checkpoints" / "latest").write_text("step-0000005\n")
    records = (split / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("".join(r + "\n" for r in records if json.loads(r)["step"] <= 7))
    assert run("pretrain", *args, f"out={split}", "max_steps=10", "--resume", "auto").returncode == 0

    def losses(path):  # by step: the resumed run logs steps 6 and 7 again
        return {r["step"]: r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"}

    assert losses(split) == losses(whole) and len(losses(whole)) == 10 and losses(whole)[10] < losses(whole)[1]
    trained = whole / "checkpoints" / "step-0000010" / "model"
    assert (trained / "spiece.model").is_file()
    assert run("generate", trained, PROMPT, "--max-new-tokens", "4").returncode == 0


# ---- sample and vote ----------------------------------------------------------------------------


def constant_model(tokenizer, probabilities: dict[int, float]):
    """A CPM-1 whose next-token distribution is ``probabilities`` after any context: every block
    writes zero, the final LayerNorm outputs its bias, and the tied head reads that bias against
    embedding rows built so the logits are the wanted log-probabilities."""
    from cpmlive.api import LM
    from cpmlive.model.cpm1.model import build_cpm1

    config = Cpm1Config(vocab_size=tokenizer.vocab_size, dim_model=16, dim_ff=32, num_layers=1, num_heads=2,
                        dim_head=8, half=False, max_length=256)
    model = build_cpm1(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("layers."):
                parameter.zero_()
        model.output_norm.weight.zero_()
        model.output_norm.bias.zero_()
        model.output_norm.bias[0] = 1.0
        model.input_embedding.weight[:, 0] = -30.0
        for token, p in probabilities.items():
            model.input_embedding.weight[token, 0] = math.log(p)
    return LM(model, tokenizer)


def test_vote_picks_the_mode_of_known_samples(checkpoint):
    from cpmlive.infer.vote import normalise_answer, vote

    tokenizer = cpmlive.load(checkpoint).tokenizer
    good, bad = tokenizer.encode("好")[-1], tokenizer.encode("坏")[-1]
    lm = constant_model(tokenizer, {good: 0.7, bad: 0.3})
    samples = lm.sample("问：", 40, max_new_tokens=1, do_sample=True, seed=0)
    assert set(samples) == {"好", "坏"} and 0.5 < samples.count("好") / 40 < 0.9
    result = lm.vote("问：", 40, max_new_tokens=1, seed=0)
    assert (result.answer, result.count, result.total) == ("好", samples.count("好"), 40)
    assert result.distribution == [("好", samples.count("好")), ("坏", samples.count("坏"))]
    assert normalise_answer(" 北京\n问：上海", ["。"]) == "北京" and normalise_answer("北京。对", ["。"]) == "北京"
    assert vote(["", "", "上海", "北京", "上海"]).answer == "上海"


def test_vote_and_few_shot_prompt_file_from_the_cli(checkpoint, tmp_path):
    prompt = tmp_path / "few-shot.txt"
    prompt.write_text("问：中国的首都是哪里？\n答：北京\n问：{input}\n答：", encoding="utf-8")
    out = run("generate", checkpoint, "--prompt-file", prompt, "--input", "美国的首都是哪里？",
              "--num-return-sequences", "5", "--vote", "--max-new-tokens", "3", "--seed", "1", "--json")
    assert out.returncode == 0, out.stderr.decode()
    result = json.loads(out.stdout)
    lm = cpmlive.load(checkpoint)
    filled = "问：中国的首都是哪里？\n答：北京\n问：美国的首都是哪里？\n答："
    assert result == lm.vote(filled, 5, max_new_tokens=3, seed=1).to_dict()
    assert_clean_error(run("generate", checkpoint, "--prompt-file", prompt), "{input} slot")
    assert_clean_error(run("generate", checkpoint, PROMPT, "--vote"), "--num-return-sequences")


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_input_is_one_line(checkpoint, tmp_path, ant_vocab_path):
    assert_clean_error(run("generate", checkpoint, "好" * 1100), "this model takes at most 1024")
    assert_clean_error(run("generate", checkpoint, "好", "--num-return-sequences", "100000"), "out of range")
    assert_clean_error(run("generate", checkpoint, "好", "--vocab", ant_vocab_path), "CPM-1 reads a SentencePiece")
    small = train_spm(tmp_path / "small.model", vocab_size=2800)
    assert_clean_error(run("generate", checkpoint, "好", "--vocab", small), "2800 pieces, the embedding 3000 rows")
    assert_clean_error(run("convert", checkpoint, tmp_path / "out", "--vocab", small), "2800 pieces")
    assert_clean_error(run("generate", "demo", "好", "--vocab", checkpoint / "spiece.model"), "CPM-1's vocabulary")
