"""The bilingual demo's pieces: the vocabulary builder, the corpus readers, the task builder
(held-out tasks share no source with training) and the trainer (an interrupted run resumes
exactly)."""

import torch

from cpmlive.model.bee.config import BeeConfig
from cpmlive.data import bee_tasks
from cpmlive.data.bee import answers_of, check_task
from cpmlive.data.bilingual import Entry, _IdBlocks, _is_pair
from cpmlive.model.bee.model import build_bee
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.tokenizer.bee import SPECIALS, BeeTokenizer, build_vocab
from cpmlive.train.bee import LoopConfig, examples_of, train

PAIRS = [(f"打开第{i}个文档，然后选择「格式」菜单中的命令。",
          f"Open document {i}, then choose a command in the Format menu.") for i in range(40)]
ENTRIES = [Entry(word, "x", (gloss,)) for word, gloss in [
    ("图书馆", "library"), ("苹果", "apple"), ("学校", "school"), ("河流", "river"), ("跑步", "to run"),
    ("天气", "weather"), ("朋友", "friend"), ("电脑", "computer"), ("窗口", "window"), ("文档", "document")]]


def test_vocabulary_keeps_the_published_special_ids():
    tokens = build_vocab([text for pair in PAIRS for text in pair], 300)
    assert tokens[:len(SPECIALS)] == list(SPECIALS)
    tokenizer = BeeTokenizer(tokens)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.encoder["<ans>"],
            tokenizer.encoder["<option>"]) == (6, 7, 9, 10)
    ids, ext = tokenizer.encode(PAIRS[3][1])
    assert not ext and len(ids) < len(PAIRS[3][1]) / 2  # whole English words, not letters


def test_help_pages_align_by_id():
    parser = _IdBlocks()
    parser.feed('<p id="par_id1" class="x">选择 <span>「格式」</span></p><h1 id="hd_id2">标题</h1><p>none</p>')
    assert parser.blocks == {"par_id1": "选择 「格式」", "hd_id2": "标题"}
    assert _is_pair("选择格式菜单", "Choose Format") and not _is_pair("Choose Format", "Choose Format")


def test_task_builder_holds_sources_out():
    data = bee_tasks.build(PAIRS, ENTRIES * 3, share=0.3, seed=1)
    assert all(data.held_out[kind] for kind in ("zh2en", "en2zh", "continuation"))
    held_inputs = {task["input"] for kind in ("zh2en", "continuation") for task in data.held_out[kind]}
    train_texts = {task.get("input") for task in data.tasks} | {task["<ans>"] for task in data.pretrain
                                                               if isinstance(task["<ans>"], str)}
    assert not any(text in train_texts for text in held_inputs if text in {p[0] for p in PAIRS})
    for task in data.tasks + [t for tasks in data.held_out.values() for t in tasks]:
        check_task(task)
    choices = data.train_by_kind["choice"] + data.held_out["choice"]
    for task in choices:
        answer = next(answers_of(task))[1]
        gloss = dict((e.word, e.glosses[0]) for e in ENTRIES)[task["input"]]
        assert task["options"][answer] == gloss


def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch):
    import cpmlive.train.bee as trainer

    tokens = build_vocab([text for pair in PAIRS for text in pair], 200)
    tokenizer = BeeTokenizer(tokens)
    examples = examples_of(tokenizer, bee_tasks.build(PAIRS, ENTRIES, share=0.0).tasks, 64)
    config = BeeConfig(vocab_size=len(tokens), dim_model=16, dim_ff=32, num_layers=2, num_heads=2, dim_head=8,
                       half=False, max_length=128)
    loop = LoopConfig(steps=6, rows=2, row_length=64, save_every=3, warmup_steps=2)

    def run(run_dir, resume=None):
        model = build_bee(config, seed=0)
        save = lambda m, d: save_checkpoint(m, config, d / "model")  # noqa: E731
        return model, train(model, tokenizer, lambda step: examples, loop, run_dir, resume, save, desc="t")

    whole, records = run(tmp_path / "whole")
    batches = trainer._batches

    def interrupted(pool, cfg, step, vocab):
        if step == 5:
            raise KeyboardInterrupt
        return batches(pool, cfg, step, vocab)

    monkeypatch.setattr(trainer, "_batches", interrupted)
    try:
        run(tmp_path / "cut")
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(trainer, "_batches", batches)
    resumed, again = run(tmp_path / "cut", resume="auto")
    assert [r["step"] for r in again] == list(range(1, 7))
    assert again == records
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert records[-1]["loss"] < records[0]["loss"]
