"""``make demo``: a short tour of cpmlive on the shipped demo model."""

from __future__ import annotations

import sys
import time

from cpmlive.errors import CpmliveError

PROMPTS = ["中国人民", "今天天气", "宝玉笑道："]
FILLS = ["北京是中国的<mask>。", "新华社北京1月5日电，国务院总理<mask>今天会见了外国客人。"]
ARTICLE = ("新华社北京1月5日电 国务院总理李鹏今天在人民大会堂会见了来访的美国国务卿奥尔布赖特，"
           "双方就中美关系和共同关心的国际问题交换了意见。")
BEE_TASKS = [
    {"input": "打开一个新的文本文档。", "prompt": "中翻英", "<ans>": ""},
    {"input": "Select the text that you want to format.", "prompt": "英翻中", "<ans>": ""},
    {"input": "要插入图片，", "prompt": "往后写", "<ans>": ""},
    {"input": "图书馆：library；苹果：apple；学校：school", "question": "苹果的意思是什么？", "<ans>": ""},
    {"input": "学校", "question": "这个词的英文意思是？",
     "options": {"<option_0>": "apple", "<option_1>": "school", "<option_2>": "river", "<option_3>": "to run"},
     "<ans>": ""},
]
REVIEWS = ["房间很干净，服务也很周到，下次还会再来。", "书的印刷质量太差了，错别字很多，不推荐购买。",
           "电池不耐用，用了两天就坏了。"]


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))


def main() -> int:
    import cpmlive
    from cpmlive.resources import demo_dir
    from cpmlive.apps.headline import TitleOptions, suggest_titles
    from cpmlive.model.convert import checkpoint_info

    try:
        lm = cpmlive.load("demo", adapter=["headline", "sentiment"])
        lm.use(None)
    except CpmliveError as exc:
        print(f"cpmlive demo: {exc}", file=sys.stderr)
        return 2
    info = checkpoint_info(demo_dir())
    config = info["config"]
    section("the demo model")
    print(f"CPM-Ant, {info['parameters'] / 1e6:.1f}M parameters, {config['num_layers']} layers, "
          f"d_model {config['dim_model']}, vocab {config['vocab_size']}, {info['size_bytes'] / 1e6:.1f} MB on disk")

    section("tokenize")
    text = "人民日报1998年元旦社论"
    print(text, "->", lm.tokenizer.tokenize(text))

    section("generate (greedy, repetition penalty 1.2)")
    for prompt in PROMPTS:
        started = time.perf_counter()
        out = lm.generate(prompt, max_new_tokens=32, min_new_tokens=8, repetition_penalty=1.2, no_repeat_ngram_size=3)
        print(f"{prompt}|{out}   ({time.perf_counter() - started:.2f}s)")

    section("generate (sampling, top_p 0.9, seed 1)")
    for out, prompt in zip(lm.generate(PROMPTS, max_new_tokens=32, min_new_tokens=8, do_sample=True, top_p=0.9,
                                       temperature=0.8, repetition_penalty=1.1, seed=1), PROMPTS):
        print(f"{prompt}|{out}")

    section("fill (blank infilling)")
    for text in FILLS:
        print(text, "->", lm.fill(text, max_new_tokens=4))

    section("title (智取标题: the shipped headline adapter)")
    print(ARTICLE)
    with lm.using("headline"):
        for rank, title in enumerate(suggest_titles(lm, ARTICLE, TitleOptions(n=3)), 1):
            print(f"  {rank}. {title}")

    section("classify (the shipped sentiment adapter)")
    with lm.using("sentiment"):
        for review, label in zip(REVIEWS, lm.classify(REVIEWS)):
            print(f"  {label:>8}  {review}")

    section("stream")
    for piece in lm.stream("在新的一年里，", max_new_tokens=24, repetition_penalty=1.2):
        print(piece, end="", flush=True)
    print()
    return bee_tour()


def bee_tour() -> int:
    """The bilingual CPM-Bee demo (``"bee-demo"``): one task of each kind, as JSON in and out."""
    import json

    import cpmlive

    try:
        bee = cpmlive.load("bee-demo")
    except CpmliveError as exc:
        print(f"cpmlive demo: {exc}", file=sys.stderr)
        return 2
    section(f"CPM-Bee JSON tasks (bee-demo, {bee.model.num_parameters() / 1e6:.1f}M parameters)")
    started = time.perf_counter()
    for filled in bee.bee(BEE_TASKS, max_new_tokens=40, num_beams=3):
        print(json.dumps(filled, ensure_ascii=False))
    print(f"({time.perf_counter() - started:.2f}s for {len(BEE_TASKS)} tasks as one batch, beam 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
