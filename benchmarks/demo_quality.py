"""Held-out bits per character: a CPM-Ant checkpoint vs a character-bigram baseline.

Both are trained on the same training split of a prepared token store and scored on its
validation split (documents decoded back to text). The bigram model uses interpolated
absolute discounting (Kneser-Ney style) over characters, with the unigram backed off to a
uniform distribution over the training character set plus one unknown symbol.

Each domain (source of the store) is reported against a bigram trained on that domain's own
training documents, and against one trained on all of them. Several models can be compared
(``--model old=DIR --model new=DIR``); texts are re-encoded by each model's own tokenizer, and
characters outside a model's vocabulary are not scored (counted below the table).

    python benchmarks/demo_quality.py --model demo --data data/demo
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

from cpmlive.api import load
from cpmlive.data.store import TokenStore
from cpmlive.infer.score import score_texts
from cpmlive.tokenizer.ant import AntTokenizer


def split_texts(data: str, split: str, tokenizer) -> dict[str, list[str]]:
    """Documents of one split decoded back to text, grouped by source."""
    store = TokenStore(data, split)
    texts: dict[str, list[str]] = {name: [] for name in store.sources}
    for i in range(store.num_documents):
        ids = store.document(i).tolist()[1:-1]
        texts[store.sources[int(store.document_sources[i])]].append(tokenizer.decode(ids))
    return texts


class CharBigram:
    def __init__(self, texts: list[str], discount: float = 0.75) -> None:
        self.discount = discount
        self.unigram = Counter()
        self.bigram: dict[str, Counter] = defaultdict(Counter)
        for text in texts:
            previous = "<s>"
            for char in text:
                self.unigram[char] += 1
                self.bigram[previous][char] += 1
                previous = char
        self.total = sum(self.unigram.values())
        self.vocab = len(self.unigram) + 1

    def unigram_prob(self, char: str) -> float:
        seen = len(self.unigram)
        return (max(self.unigram[char] - self.discount, 0) + self.discount * seen / self.vocab) / self.total

    def prob(self, previous: str, char: str) -> float:
        following = self.bigram.get(previous)
        if not following:
            return self.unigram_prob(char)
        count = sum(following.values())
        kept = max(following[char] - self.discount, 0) / count
        return kept + self.discount * len(following) / count * self.unigram_prob(char)

    def bits_per_char(self, texts: list[str]) -> float:
        bits, chars = 0.0, 0
        for text in texts:
            previous = "<s>"
            for char in text:
                bits -= math.log2(self.prob(previous, char))
                previous = char
                chars += 1
        return bits / max(chars, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="NAME=PATH (or PATH); repeat to compare models")
    parser.add_argument("--data", required=True, help="prepared token store (cpmlive data prepare)")
    parser.add_argument("--max-docs", type=int, default=0, help="score at most this many val documents per domain")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    models = [item.split("=", 1) if "=" in item else (item, item) for item in (args.model or ["demo"])]
    tokenizer = AntTokenizer.from_file(Path(args.data) / "vocab.txt")
    train, val = split_texts(args.data, "train", tokenizer), split_texts(args.data, "val", tokenizer)
    if args.max_docs:
        val = {name: docs[:args.max_docs] for name, docs in val.items()}
    sources = [name for name in val if val[name]]
    everything = [text for name in sources for text in train[name]]
    rows: dict[str, dict[str, float]] = {name: {} for name in [*sources, "all"]}
    for name in sources:
        rows[name]["bigram (own domain)"] = CharBigram(train[name]).bits_per_char(val[name])
    pooled = CharBigram(everything)
    for name in sources:
        rows[name]["bigram (all train)"] = pooled.bits_per_char(val[name])
    rows["all"]["bigram (all train)"] = pooled.bits_per_char([t for name in sources for t in val[name]])
    unknown: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for label, path in models:
        lm = load(path, dtype="float32")
        started = time.perf_counter()
        nats = chars = 0.0
        unknown[label] = {}
        for name in sources:
            score = score_texts(lm.model, lm.tokenizer, val[name], batch_size=16)
            rows[name][label] = score.bits_per_char
            unknown[label][name] = score.unk_dropped
            nats, chars = nats + score.nats, chars + score.chars
        rows["all"][label] = nats / chars / math.log(2)
        seconds[label] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps({"bits_per_char": rows, "unk_dropped": unknown, "seconds": seconds}, ensure_ascii=False))
        return
    columns = [label for label, _ in models] + ["bigram (own domain)", "bigram (all train)"]
    print("| domain | val docs | val chars | " + " | ".join(columns) + " | "
          + " | ".join(f"{label} / own bigram" for label, _ in models) + " |")
    print("|---" * (3 + len(columns) + len(models)) + "|")
    for name in [*sources, "all"]:
        docs = val[name] if name != "all" else [t for n in sources for t in val[n]]
        cells = [f"{rows[name][c]:.3f}" if c in rows[name] else "" for c in columns]
        own = rows[name].get("bigram (own domain)")
        ratios = [f"{rows[name][label] / own:.3f}" if own else "" for label, _ in models]
        print(f"| {name} | {len(docs)} | {sum(map(len, docs))} | " + " | ".join(cells + ratios) + " |")
    for label, _ in models:
        dropped = {name: count for name, count in unknown[label].items() if count}
        if dropped:
            print(f"\n{label}: characters outside its vocabulary, not scored: {dropped}")


if __name__ == "__main__":
    main()
