"""The alignment recipes end to end on a tiny model: SFT → reward model → DPO → PPO → GRPO,
their saved adapters, exact resume, pair evaluation, chat, and the bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpmlive
from cpmlive.align.evaluate import pair_metrics, reward_head_of
from cpmlive.align.recipes import AlignConfig, TRAINERS, rouge_l
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.data.align import preference_pairs, sft_examples
from cpmlive.data.chat import ChatTemplate
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.resources import ASSETS
from cpmlive.train.metrics import read_records

CITIES = ["北京", "上海", "广州", "深圳", "南京", "武汉", "成都", "西安"]
THINGS = ["下雪", "开会", "修路", "办展", "植树", "赛跑", "演出", "招聘"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_base(directory: Path, seed: int = 0) -> Path:
    config = AntConfig.from_dict({**preset("tiny").to_dict(), "vocab_size": 16000, "max_length": 256})
    model = build_model(config, seed=seed)
    torch.nn.init.normal_(model.input_embedding.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    save_checkpoint(model, config, directory, vocab=ASSETS / "demo" / "vocab.txt")
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("align")
    rows = [(f"{c}今天{t}了吗？", f"{c}今天{t}。", f"{t}没有。") for c in CITIES for t in THINGS]
    files = {"base": tiny_base(root / "base"), "root": root}
    files["sft"] = write_jsonl(root / "sft.jsonl", [{"prompt": p, "completion": c} for p, c, _ in rows[:48]])
    files["sft_dev"] = write_jsonl(root / "sft_dev.jsonl", [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c, _ in rows[48:]])
    files["pairs"] = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                       for p, c, r in rows[:48]])
    files["pairs_dev"] = write_jsonl(root / "pairs_dev.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                               for p, c, r in rows[48:]])
    return files


def config(world, method: str, out: str, **extra) -> AlignConfig:
    data = "sft" if method == "sft" else "pairs"
    fields = dict(method=method, model=str(extra.pop("model", world["base"])), data=str(world[data]),
                  eval=str(world[data + "_dev"]), out=str(world["root"] / out), max_steps=12, eval_every=6,
                  save_every=6, batch_size=8, progress=False, max_input_tokens=40, max_output_tokens=12, lr=3e-3)
    return AlignConfig(**{**fields, **extra})


def run(world, method: str, out: str, **extra) -> list[dict]:
    TRAINERS[method](config(world, method, out, **extra)).run()
    return read_records(world["root"] / out)


@pytest.fixture(scope="module")
def trained(world) -> dict[str, Path]:
    """SFT, then the reward model, in the order the pipeline runs them."""
    run(world, "sft", "sft", lr=2e-2, max_steps=24, eval_every=12, save_every=12)
    run(world, "rm", "rm", lr=5e-3)
    return {"sft": world["root"] / "sft" / "best", "rm": world["root"] / "rm" / "best"}


def test_data_formats_and_the_chat_template():
    template = ChatTemplate()
    examples = sft_examples(write_jsonl(Path("/tmp") / "cpmlive-msg.jsonl", [
        {"messages": [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"},
                      {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"},
                      {"role": "assistant", "content": "再见！"}]}]), template)
    assert [e.completion for e in examples] == ["你好！", "再见！"]  # the loss goes on every assistant turn
    assert examples[1].prompt == "简短回答\n用户：你好\n助手：你好！\n用户：再见\n助手："
    conversational = write_jsonl(Path("/tmp") / "cpmlive-conv.jsonl", [
        {"prompt": [{"role": "user", "content": "一加一？"}], "chosen": [{"role": "assistant", "content": "二"}],
         "rejected": [{"role": "assistant", "content": "三"}]}])
    pair = preference_pairs(conversational, template)[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("用户：一加一？\n助手：", "二", "三")


def test_sft_learns_the_completions_and_saves_a_chat_adapter(world, trained):
    records = read_records(world["root"] / "sft")
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert sum(losses[-4:]) < sum(losses[:4]) / 2
    best = trained["sft"]
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.json", "task.json"} <= {
        p.name for p in best.iterdir()}
    peft = json.loads((best / "adapter_config.json").read_text())
    assert peft["peft_type"] == "LORA"
    lm = cpmlive.load(world["base"], adapter=best)
    assert lm.task.template == "用户：{input}\n助手："  # generate wraps the prompt as the chat's user turn
    assert lm.chat([{"role": "user", "content": "北京今天下雪了吗？"}], max_new_tokens=6) == \
        lm.generate("北京今天下雪了吗？", max_new_tokens=6).split("\n用户：")[0]


def test_reward_model_ranks_held_out_pairs(world, trained):
    evals = [r for r in read_records(world["root"] / "rm") if r["type"] == "eval"]
    assert evals[-1]["val_accuracy"] == 1.0
    lm = cpmlive.load(world["base"], adapter=trained["rm"])
    head = reward_head_of(trained["rm"], lm.model)
    assert head is not None
    metrics = pair_metrics(lm.model, lm.tokenizer, str(world["pairs_dev"]), reward_head=head)
    assert metrics["pairs"] == 16 and metrics["pair_accuracy"] == 1.0 and metrics["mean_margin"] > 0


def test_dpo_from_the_sft_adapter_widens_the_margin(world, trained):
    records = run(world, "dpo", "dpo", adapter=str(trained["sft"]), beta=0.5)
    train = [r for r in records if r["type"] == "train"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(train[0])
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)  # policy == reference at the start
    lm = cpmlive.load(world["base"])
    before = pair_metrics(lm.model, lm.tokenizer, str(world["pairs_dev"]))
    after_lm = cpmlive.load(world["base"], adapter=world["root"] / "dpo" / "best")
    after = pair_metrics(after_lm.model, after_lm.tokenizer, str(world["pairs_dev"]))
    assert after["mean_margin"] > before["mean_margin"] + 1


def test_ppo_with_the_reward_model_and_grpo_with_rouge(world, trained):
    records = run(world, "ppo", "ppo", reward_model=str(trained["rm"]), adapter=str(trained["sft"]), max_steps=4,
                  eval_every=2, save_every=2, eval_prompts=4, batch_size=4)
    train = [r for r in records if r["type"] == "train"]
    assert {"objective/kl", "objective/rlhf_reward", "objective/scores", "loss/policy_avg",
            "loss/value_avg"} <= set(train[0])
    assert (world["root"] / "ppo" / "best" / "adapter_model.safetensors").is_file()
    records = run(world, "grpo", "grpo", reward="rouge", adapter=str(trained["sft"]), max_steps=3, eval_every=3,
                  save_every=3, eval_prompts=4, batch_size=2, num_samples=3)
    train = [r for r in records if r["type"] == "train"]
    assert all(0 <= r["reward"] <= 1 for r in train) and "frac_reward_zero_std" in train[0]


def test_full_tuning_writes_a_checkpoint_and_dpo_keeps_a_frozen_copy(world, tmp_path):
    run(world, "sft", str(tmp_path / "sft"), tuning="full", lr=2e-3, max_steps=8, eval_every=8, save_every=4)
    best = tmp_path / "sft" / "best"
    assert (best / "config.json").is_file() and not (best / "adapter_config.json").exists()
    lm = cpmlive.load(best)
    assert lm.chat([{"role": "user", "content": "北京今天下雪了吗？"}], max_new_tokens=4) is not None
    records = run(world, "dpo", str(tmp_path / "dpo"), tuning="full", model=str(best), lr=1e-3, max_steps=6,
                  eval_every=3, save_every=3, beta=0.5)
    train = [r for r in records if r["type"] == "train"]
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    before = pair_metrics(lm.model, lm.tokenizer, str(world["pairs_dev"]))
    tuned = cpmlive.load(tmp_path / "dpo" / "best")
    assert pair_metrics(tuned.model, tuned.tokenizer, str(world["pairs_dev"]))["mean_margin"] > before["mean_margin"]
    with pytest.raises(CpmliveError, match="full tuning starts from model="):
        config(world, "dpo", "x", tuning="full", adapter=str(best))


@pytest.mark.parametrize("method,tuning", [("dpo", "lora"), ("ppo", "lora"), ("ppo", "full")])
def test_resume_reproduces_the_uninterrupted_run(world, trained, method, tuning, tmp_path):
    extra = {"dpo": {}, "ppo": {"reward_model": str(trained["rm"]), "eval_prompts": 2, "batch_size": 2}}[method]
    start = {"adapter": str(trained["sft"])} if tuning == "lora" else {"tuning": "full"}
    common = dict(max_steps=4, eval_every=2, save_every=2, **start, **extra)
    full = TRAINERS[method](config(world, method, str(tmp_path / "full"), **common))
    full.run()
    half = TRAINERS[method](config(world, method, str(tmp_path / "half"), **common))
    half.total_steps = 2
    half.run()
    TRAINERS[method](config(world, method, str(tmp_path / "half"), **common), resume="auto").run()
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "elapsed_s", "tokens_per_s", "memory_mb")}  # noqa: E731
                        for r in rs if r["type"] != "start"]
    assert strip(read_records(tmp_path / "full")) == strip(read_records(tmp_path / "half"))


def test_the_servers_chat_endpoint_uses_the_sft_template(world, trained):
    import openai
    from serving import serving

    from cpmlive.serve.app import create_app

    lm = cpmlive.load(world["base"], adapter=trained["sft"])
    messages = [{"role": "user", "content": "北京今天下雪了吗？"}]
    expected = lm.chat(messages, max_new_tokens=6)
    with serving(create_app(lm)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        answer = client.chat.completions.create(model="best", messages=messages, max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == expected


def test_rouge_l_reward():
    assert rouge_l("北京下雪", "北京下雪") == pytest.approx(1.0)
    assert rouge_l("", "北京") == 0.0
    assert 0 < rouge_l("北京下雨", "北京下雪") < 1


# ---- the command line and bad input --------------------------------------------------------------


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpmlive", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_cli_align_evaluate_pairs_and_chat(world, trained, tmp_path):
    out = cli("align", "sft", "--model", str(world["base"]), "--data", str(world["sft"]), "--out",
              str(tmp_path / "run"), "max_steps=2", "progress=false", "max_input_tokens=40", "max_output_tokens=8")
    assert out.returncode == 0, out.stderr
    assert "best adapter" in out.stdout
    out = cli("evaluate", str(world["base"]), "--adapter", str(trained["rm"]), "--pairs", str(world["pairs_dev"]),
              "--json")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"pair_accuracy", "mean_margin", "pairs"}
    out = cli("chat", str(world["base"]), "--adapter", str(trained["sft"]), "--max-new-tokens", "4",
              stdin="北京今天下雪了吗？\n/reset\n上海今天开会了吗？\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2


def bad(args: list[str]) -> str:
    out = cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    return out.stderr


def test_bad_input_is_one_line_exit_2(world, trained, tmp_path):
    base = str(world["base"])
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "问", "chosen": "答", "rejected": "答"}])
    assert "same text" in bad(["align", "dpo", "--model", base, "--data", str(same), "--out", str(tmp_path / "a")])
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "问", "chosen": "答", "rejected": "错"},
                                                       {"prompt": "问", "chosen": "答"}])
    assert "missing.jsonl line 2: missing field 'rejected'" in bad(
        ["align", "rm", "--model", base, "--data", str(missing), "--out", str(tmp_path / "b")])
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "北京" * 80, "completion": "好"}])
    assert "long.jsonl line 1: the prompt is" in bad(
        ["align", "sft", "--model", base, "--data", str(long), "--out", str(tmp_path / "c"), "max_input_tokens=64"])
    assert "beta must be > 0" in bad(["align", "dpo", "--model", base, "--data", str(world["pairs"]), "--out",
                                      str(tmp_path / "d"), "beta=0"])
    other = tiny_base(tmp_path / "other", seed=1)
    assert "adapter was trained on base" in bad(["align", "ppo", "--model", str(other), "--data", str(world["pairs"]),
                                                 "--out", str(tmp_path / "e"), f"reward_model={trained['rm']}",
                                                 "max_steps=2"])
    assert "not a reward model" in bad(["align", "ppo", "--model", base, "--data", str(world["pairs"]), "--out",
                                        str(tmp_path / "f"), f"reward_model={trained['sft']}", "max_steps=2"])
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "问"}])
    assert "bare.jsonl line 1: reward=rouge scores against a reference" in bad(
        ["align", "grpo", "--model", base, "--data", str(bare), "--out", str(tmp_path / "g"), "reward=rouge",
         "max_steps=2"])
    assert "--pairs" in bad(["evaluate", base, "--pairs", str(world["pairs"]), "--text", str(world["pairs"])])
    with pytest.raises(CpmliveError, match="no chat template"):
        cpmlive.load(world["base"]).chat([{"role": "user", "content": "你好"}])


def test_dashboard_charts_the_alignment_metrics(world, trained, tmp_path):
    from serving import chromium_page, serving

    from cpmlive.serve.dashboard import create_app

    run(world, "dpo", str(tmp_path / "dpo"), adapter=str(trained["sft"]), max_steps=4, eval_every=2, save_every=4)
    with serving(create_app(tmp_path / "dpo")) as url, chromium_page(1400, 1200) as (page, errors):
        page.goto(f"{url}/?poll=300")
        page.wait_for_function("() => !document.getElementById('align-section').hidden", timeout=15_000)
        points = {name: int(page.get_attribute(f"#chart-align-{name}", "data-points")) for name in ("rewards", "kl")}
        # rewards/chosen, rejected, margins: 4 steps each, val margins at 2 evaluations; accuracies likewise
        assert points == {"rewards": 3 * 4 + 2, "kl": 4 + 2}, points
        artifacts = Path(__file__).resolve().parents[1] / "artifacts"
        artifacts.mkdir(exist_ok=True)
        page.screenshot(path=str(artifacts / "dashboard-align.png"), full_page=True)
        assert errors == []


def test_missing_eos_penalty_lowers_unfinished_rollouts(world, tmp_path):
    trainer = TRAINERS["grpo"](config(world, "grpo", str(tmp_path / "g"), reward="rouge", missing_eos_penalty=0.5,
                                      max_steps=1))
    eos = trainer.tokenizer.eos_id
    answer = trainer.completion_ids("北京今天下雪。")
    scores = trainer.rewards([([6], answer), ([6], answer[:-1])], ["北京今天下雪。"] * 2)
    assert scores.tolist() == pytest.approx([1.0, 0.5]) and answer[-1] == eos
