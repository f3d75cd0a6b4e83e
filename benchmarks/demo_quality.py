"""Held-out bits per character: a CPM-Ant checkpoint vs a character-bigram baseline.

Both are trained on the same training split of a prepared token store and scored on its
validation split (documents decoded back to text). The bigram model uses interpolated
absolute discounting (Kneser-Ney style) over characters, with the unigram backed off to a
uniform distribution over the training character set plus one unknown symbol.

    python benchmarks/demo_quality.py --model src/cpmlive/assets/demo --data data/demo
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter, defaultdict

from cpmlive.api import load
from cpmlive.data.store import TokenStore
from cpmlive.infer.score import score_texts


def split_texts(data: str, split: str, tokenizer) -> list[str]:
    store = TokenStore(data, split)
    texts = []
    for i in range(store.num_documents):
        ids = store.document(i).tolist()[1:-1]
        texts.append(tokenizer.decode(ids))
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
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", required=True, help="prepared token store (cpmlive data prepare)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lm = load(args.model, dtype="float32")
    train, val = split_texts(args.data, "train", lm.tokenizer), split_texts(args.data, "val", lm.tokenizer)
    started = time.perf_counter()
    ours = score_texts(lm.model, lm.tokenizer, val).to_dict()
    ours_seconds = time.perf_counter() - started
    bigram = CharBigram(train).bits_per_char(val)
    result = {"validation_documents": len(val), "validation_chars": sum(map(len, val)),
              "model_bits_per_char": ours["bits_per_char"], "model_perplexity": ours["perplexity"],
              "bigram_bits_per_char": round(bigram, 4),
              "ratio_bigram_over_model": round(bigram / ours["bits_per_char"], 3),
              "model_seconds": round(ours_seconds, 1)}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print("| model | held-out bits/char |")
    print("|---|---|")
    print(f"| cpmlive demo ({lm.model.num_parameters() / 1e6:.1f}M) | {ours['bits_per_char']:.4f} |")
    print(f"| character bigram (same train split) | {bigram:.4f} |")
    print(f"\n{len(val)} validation documents, {result['validation_chars']} chars; "
          f"bigram / model = {result['ratio_bigram_over_model']}")


if __name__ == "__main__":
    main()
