"""The CPM-1 demo's vocabulary: a SentencePiece unigram model trained on the embedded corpora.

CPM-Generate's ``chinese_vocab.model`` has ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then U+2583 (the
newline piece), ``<sep>``, ``<pad>``, ``<mask>`` and ``<eod>`` at 3..7; this one keeps those ids,
so :class:`~cpmlive.tokenizer.cpm1.Cpm1Tokenizer` reads it as it reads the original. The texts are
segmented by the original recipe (:func:`~cpmlive.tokenizer.cpm1.segment`) before training, so
word starts are pieces as in CPM-1's vocabulary. The rest of the demo is ``recipes/cpm1-demo.yaml``.

``python -m cpmlive.train.cpm1_demo --out data/cpm1-demo-vocab/spiece.model``;
``--held-out FILE`` writes instead the documents ``data prepare --val-fraction 0.02`` holds out of
these corpora (one a line), the text both demos' bits/char are measured on.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from cpmlive.data.corpora import clean_paragraphs, iter_source
from cpmlive.data.store import document_digest, split_score, val_mask
from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer, segment

SPECIAL_PIECES = ["\u2583", "<sep>", "<pad>", "<mask>", "<eod>"]
CORPORA = ("people-daily-1998", "hongloumeng")
VOCAB_SIZE = 8000


def corpus_texts(sources: Iterable[str] = CORPORA) -> Iterator[str]:
    """Every cleaned paragraph of the sources, deduplicated across them, as ``data prepare`` reads them."""
    seen: set[bytes] = set()
    for source in sources:
        yield from clean_paragraphs(iter_source(source), seen=seen)


def held_out(sources: Iterable[str] = CORPORA, val_fraction: float = 0.02, seed: int = 0) -> list[str]:
    """The documents ``cpmlive data prepare SOURCES --val-fraction F --seed S`` puts in val (the same
    per-source split by a hash of each cleaned document)."""
    seen: set[bytes] = set()
    kept: list[str] = []
    for source in sources:
        texts = list(clean_paragraphs(iter_source(source), seen=seen))
        mask = val_mask([split_score(document_digest(text), seed) for text in texts], val_fraction)
        kept += [text for text, is_val in zip(texts, mask) if is_val]
    return kept


def write_held_out(path: Path, sources: Iterable[str] = CORPORA) -> int:
    """Write :func:`held_out`'s documents to ``path``, one a line; returns how many."""
    texts = held_out(sources)
    path.write_text("".join(text.replace("\n", " ") + "\n" for text in texts), encoding="utf-8")
    return len(texts)


def train_vocab(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, threads: int = 1) -> bytes:
    """A serialized SentencePiece model over ``texts`` with CPM-Generate's special pieces at 3..7."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=(segment(text) for text in texts), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=SPECIAL_PIECES,
        character_coverage=0.9995, max_sentence_length=16384, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, minloglevel=2, num_threads=threads)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.train.cpm1_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the spiece.model to write")
    parser.add_argument("--held-out", type=Path, help="write the held-out documents here instead")
    parser.add_argument("--size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("sources", nargs="*", default=list(CORPORA))
    args = parser.parse_args(argv)
    if args.held_out is not None:
        print(f"wrote {args.held_out} ({write_held_out(args.held_out, args.sources)} documents)")
        return 0
    if args.out is None:
        parser.error("--out or --held-out is required")
    try:
        if args.out.exists():
            raise CpmliveError(f"{args.out} exists; remove it first")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(train_vocab(corpus_texts(args.sources), args.size, args.threads))
        tokenizer = Cpm1Tokenizer(args.out)
    except CpmliveError as exc:
        print(f"cpm1_demo: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({tokenizer.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
