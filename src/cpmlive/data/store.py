"""Tokenized pretraining data: ``prepare`` builds it, ``TokenStore`` reads it.

A prepared directory holds, for each split (``train``, ``val``):

* ``<split>.bin``: every document's token ids back to back, as a flat array
  of ``uint16`` (vocabulary of at most 65,535 tokens) or ``uint32``; a
  document is ``<s>``, its ids without ``<unk>``, then ``</s>``;
* ``<split>.idx.npy``: ``int64`` document offsets into it, one more than the
  number of documents (document ``i`` is ``tokens[idx[i]:idx[i + 1]]``);
* ``<split>.source.npy``: ``uint8`` index into ``meta["sources"]`` of each
  document's source, so training can weight a mixture and evaluation can
  report each domain;

and ``meta.json`` (vocabulary fingerprint and size, dtype, counts overall and
per source, seed, split), written last: a directory without it is not finished.

Documents are split between train and val by a hash of (seed, document
text), within each source (so every source has held-out documents), so the
split does not depend on document order or worker count, and the same inputs
always give the same bytes. A paragraph seen in an earlier source is dropped
from a later one (dedup across sources by the hash of the normalised text). Tokenization runs in shards of
documents, each saved under ``shards/`` as soon as it is done; a run that
was interrupted picks up the shards already saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpmlive.data.corpora import DEFAULT_MIN_CHARS, clean_paragraphs, iter_source
from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write, check_output
from cpmlive.tokenizer import TextTokenizer, text_tokenizer
from cpmlive.tokenizer.ant import NEWLINE_TOKEN, SPACE_TOKEN

FORMAT = "cpmlive-token-store"
FORMAT_VERSION = 2
MAX_SOURCES = 255
META_FILE = "meta.json"
SHARD_DIR = "shards"
SPLITS = ("train", "val")
SHARD_DOCUMENTS = 1024
UINT16_MAX_VOCAB = 65535

PathLike = str | os.PathLike[str]
_FILE_FORMS = {" ": SPACE_TOKEN, "\n": NEWLINE_TOKEN}


def opened(vocab: str | os.PathLike[str] | TextTokenizer) -> TextTokenizer:
    """A tokenizer as given, or that of a vocabulary file."""
    return text_tokenizer(vocab) if isinstance(vocab, (str, os.PathLike)) else vocab


def vocab_fingerprint(vocab: str | os.PathLike[str] | TextTokenizer) -> str:
    """sha256 of the vocabulary: its tokens in file form joined by ``\\n``.

    For a vocabulary file written that way (as the published CPM-Ant
    ``vocab.txt``) this is the sha256 of the file content; a BOM, CRLF line
    ends or a final newline do not change it.
    """
    tokenizer = opened(vocab)
    tokens = (tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size))
    text = "\n".join(_FILE_FORMS.get(token, token) for token in tokens)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (size ≤ 65,535), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)


def document_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_score(digest: bytes, seed: int) -> int:
    """A 64-bit number from (seed, document digest); small scores go to val."""
    key = seed.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=key).digest(), "little")


def val_mask(scores: list[int], val_fraction: float) -> np.ndarray:
    """True for val documents: score below ``val_fraction`` of the 64-bit range.

    With two or more documents neither split is left empty when
    ``val_fraction > 0``: the lowest score goes to val, the highest to train.
    """
    limit = val_fraction * 2**64
    mask = np.array([score < limit for score in scores], dtype=bool)
    if len(scores) >= 2 and val_fraction > 0:
        mask[scores.index(min(scores))] = True
        mask[scores.index(max(scores))] = False
    return mask


@dataclass(frozen=True)
class _ShardTask:
    index: int
    path: Path
    documents: list[str]
    sources: list[int]
    vocab_path: str
    dtype: str


_worker_tokenizers: dict[str, TextTokenizer] = {}


def _tokenizer_for(vocab_path: str) -> TextTokenizer:
    if vocab_path not in _worker_tokenizers:
        _worker_tokenizers[vocab_path] = text_tokenizer(vocab_path)
    return _worker_tokenizers[vocab_path]


def _tokenize_shard(task: _ShardTask) -> tuple[int, int]:
    """Tokenize one shard and save it atomically; returns (chars, tokens)."""
    tokenizer = _tokenizer_for(task.vocab_path)
    bos, eos, unk = tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id
    encoded = [tokenizer.encode(text) for text in task.documents]
    docs = [[bos, *(i for i in ids if i != unk), eos] for ids in encoded]
    unknown = sum(len(ids) + 2 - len(doc) for ids, doc in zip(encoded, docs))
    tokens = np.fromiter((i for ids in docs for i in ids), dtype=task.dtype)
    arrays = {
        "tokens": tokens,
        "lengths": np.array([len(ids) for ids in docs], dtype=np.int64),
        "digests": np.frombuffer(b"".join(map(document_digest, task.documents)), dtype=np.uint8).reshape(-1, 16),
        "chars": np.array([len(text) for text in task.documents], dtype=np.int64),
        "sources": np.array(task.sources, dtype=np.uint8),
        "unk": np.array(unknown, dtype=np.int64),
    }
    atomic_write(task.path, lambda out: np.savez(out, **arrays))
    return sum(len(text) for text in task.documents), len(tokens)


def _documents(
    sources: Sequence[str], min_chars: int, cache_dir: PathLike | None, counts: dict[str, Counter[str]],
    max_docs: int | None = None,
) -> Iterator[tuple[int, str]]:
    """(source index, cleaned text) of every document (the first ``max_docs`` of each source when
    given); ``counts[source]`` gets its drop tallies."""
    seen: set[bytes] = set()
    for index, source in enumerate(sources):
        tally = counts.setdefault(source, Counter())
        texts = clean_paragraphs(iter_source(source, cache_dir=cache_dir), min_chars=min_chars, counts=tally,
                                 seen=seen)
        for text in itertools.islice(texts, max_docs):
            yield index, text


def _batches(documents: Iterable[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _shard_name(index: int, documents: list[tuple[int, str]], fingerprint: str, dtype: str) -> str:
    digest = hashlib.blake2b(f"{fingerprint}\0{dtype}\0".encode(), digest_size=10)
    for source, text in documents:
        digest.update(f"{source}\0{text}\0".encode("utf-8"))
    return f"{index:06d}-{digest.hexdigest()}.npz"


def _ordered_results(tasks: Iterable[_ShardTask], workers: int) -> Iterator[tuple[int, int]]:
    """``_tokenize_shard`` over ``tasks`` in order; a few shards in flight per worker."""
    if workers == 1:
        yield from map(_tokenize_shard, tasks)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: deque[Any] = deque()
        for task in tasks:
            pending.append(pool.apply_async(_tokenize_shard, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class _Plan:
    vocab_path: str
    fingerprint: str
    dtype: str
    shard_dir: Path
    shard_documents: int


def _tokenize_all(documents: Iterable[tuple[int, str]], plan: _Plan, workers: int,
                  progress: Any) -> tuple[list[Path], int]:
    """Write every missing shard; returns all shard paths in order and how many were reused."""
    paths: list[Path] = []
    reused = 0

    def tasks() -> Iterator[_ShardTask]:
        nonlocal reused
        for index, batch in enumerate(_batches(documents, plan.shard_documents)):
            path = plan.shard_dir / _shard_name(index, batch, plan.fingerprint, plan.dtype)
            paths.append(path)
            if path.is_file():
                reused += 1
                progress.update(sum(len(text) for _, text in batch))
                continue
            yield _ShardTask(index, path, [text for _, text in batch], [source for source, _ in batch],
                             plan.vocab_path, plan.dtype)

    tokens = 0
    for chars, count in _ordered_results(tasks(), workers):
        tokens += count
        progress.update(chars)
        progress.set_postfix(tokens=tokens, refresh=False)
    return paths, reused


def _load_shard(path: Path, *keys: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in keys or data.files}


def _split_masks(paths: Sequence[Path], seed: int, val_fraction: float) -> list[np.ndarray]:
    """Val flags per shard, chosen within each source (see ``val_mask``)."""
    shards = [_load_shard(path, "digests", "sources") for path in paths]
    scores = [split_score(row.tobytes(), seed) for shard in shards for row in shard["digests"]]
    sources = np.concatenate([shard["sources"] for shard in shards])
    mask = np.zeros(len(scores), dtype=bool)
    for source in np.unique(sources):
        members = np.flatnonzero(sources == source)
        mask[members] = val_mask([scores[i] for i in members], val_fraction)
    bounds = np.cumsum([0, *(len(shard["digests"]) for shard in shards)])
    return [mask[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


class _SplitWriter:
    """Appends documents of one split to a temporary ``.bin`` and records their lengths."""

    def __init__(self, out_dir: Path, split: str) -> None:
        self.split = split
        self.out_dir = out_dir
        fd, tmp = tempfile.mkstemp(prefix=f".{split}.bin.", suffix=".tmp", dir=out_dir)
        self.tmp = Path(tmp)
        self.handle = os.fdopen(fd, "wb")
        self.lengths: list[np.ndarray] = []
        self.sources: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, sources: np.ndarray) -> None:
        self.handle.write(tokens.tobytes())
        self.lengths.append(lengths)
        self.sources.append(sources)

    def finish(self) -> dict[str, int]:
        """Close the token file and write the index (both still temporary)."""
        self.handle.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        sources = np.concatenate(self.sources) if self.sources else np.zeros(0, dtype=np.uint8)
        atomic_write(self.out_dir / f".{self.split}.idx.npy.tmp", lambda out: np.save(out, offsets))
        atomic_write(self.out_dir / f".{self.split}.source.npy.tmp", lambda out: np.save(out, sources))
        self.per_source = {int(s): (int((sources == s).sum()), int(lengths[sources == s].sum()))
                           for s in np.unique(sources)}
        return {"documents": int(len(lengths)), "tokens": int(offsets[-1])}

    def commit(self) -> None:
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.out_dir / f"{self.split}.bin")
        os.replace(self.out_dir / f".{self.split}.idx.npy.tmp", self.out_dir / f"{self.split}.idx.npy")
        os.replace(self.out_dir / f".{self.split}.source.npy.tmp", self.out_dir / f"{self.split}.source.npy")

    def discard(self) -> None:
        self.handle.close()
        for path in (self.tmp, *(self.out_dir / f".{self.split}.{kind}.npy.tmp" for kind in ("idx", "source"))):
            with contextlib.suppress(OSError):
                path.unlink()


def _assemble(paths: Sequence[Path], out_dir: Path, seed: int, val_fraction: float) -> dict[str, Any]:
    """Write train/val ``.bin`` and ``.idx.npy`` from the shards, replacing old ones."""
    masks = _split_masks(paths, seed, val_fraction)
    writers = {split: _SplitWriter(out_dir, split) for split in SPLITS}
    totals: Counter[str] = Counter()
    try:
        for path, is_val in zip(paths, masks):
            shard = _load_shard(path)
            token_is_val = np.repeat(is_val, shard["lengths"])
            for writer, keep, token_keep in ((writers["train"], ~is_val, ~token_is_val),
                                              (writers["val"], is_val, token_is_val)):
                writer.add(shard["tokens"][token_keep], shard["lengths"][keep], shard["sources"][keep])
            totals.update(chars=int(shard["chars"].sum()), unk_dropped=int(shard["unk"]))
        splits = {split: writer.finish() for split, writer in writers.items()}
        with contextlib.suppress(FileNotFoundError):
            (out_dir / META_FILE).unlink()
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    per_source = {split: writer.per_source for split, writer in writers.items()}
    return {"chars": totals["chars"], "unk_dropped": totals["unk_dropped"], "per_source": per_source, **splits}


def _check_options(sources: Sequence[str], val_fraction: float, min_chars: int, shard_documents: int) -> None:
    if not sources:
        raise CpmliveError("no corpus sources given")
    if len(sources) > MAX_SOURCES:
        raise CpmliveError(f"at most {MAX_SOURCES} corpus sources, got {len(sources)}")
    repeated = sorted({source for source in sources if sources.count(source) > 1})
    if repeated:
        raise CpmliveError(f"corpus source given twice: {', '.join(repeated)}")
    if not 0 <= val_fraction < 1:
        raise CpmliveError(f"val fraction must be in [0, 1), got {val_fraction}")
    if min_chars < 1:
        raise CpmliveError(f"minimum document length must be at least 1 character, got {min_chars}")
    if shard_documents < 1:
        raise CpmliveError(f"shard size must be at least 1 document, got {shard_documents}")


def _default_workers() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _count_documents(
    sources: Sequence[str], min_chars: int, cache_dir: PathLike | None, max_docs: int | None = None
) -> tuple[int, int, dict[str, Counter[str]]]:
    """Totals, and per source its kept documents/chars and drop tallies; an empty source is an error."""
    counts: dict[str, Counter[str]] = {}
    for index, text in _documents(sources, min_chars, cache_dir, counts, max_docs):
        counts[sources[index]].update(documents=1, chars=len(text))
    for source in sources:
        tally = counts[source]
        if tally["documents"] == 0:
            raise CpmliveError(
                f"corpus source {source} has no documents left after cleaning ({tally['short']} shorter than "
                f"{min_chars} characters, {tally['duplicate']} duplicates)")
    return sum(c["documents"] for c in counts.values()), sum(c["chars"] for c in counts.values()), counts


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


def prepare(
    sources: Sequence[str],
    vocab_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int | None = None,
    min_chars: int = DEFAULT_MIN_CHARS,
    *,
    shard_documents: int = SHARD_DOCUMENTS,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    force: bool = False,
    max_docs: int | None = None,
) -> dict[str, Any]:
    """Tokenize ``sources`` (embedded corpus names or paths) into ``out_dir``.

    Paragraphs are cleaned (``clean_paragraphs``: width normalisation, at
    least ``min_chars`` characters, duplicates dropped), tokenized with
    ``workers`` processes (default: all cores) in shards of
    ``shard_documents``, and split by document into train/val. Returns the
    metadata written to ``meta.json`` plus ``seconds`` and ``shards_reused``.

    ``max_docs`` keeps the first that many documents of each source (a quick store for a trial run).

    ``out_dir`` must be new or empty, or hold an interrupted run's shards (which are resumed);
    with ``force`` an existing directory is written over (only this writer's files).
    """
    started = time.monotonic()
    sources = [str(source) for source in sources]
    _check_options(sources, val_fraction, min_chars, shard_documents)
    if max_docs is not None and max_docs < 1:
        raise CpmliveError(f"max_docs must be at least 1, got {max_docs}")
    tokenizer = text_tokenizer(vocab_path)
    out = Path(out_dir)
    if not (out / SHARD_DIR).is_dir():
        check_output(out, force)
    plan = _Plan(str(Path(vocab_path).resolve()), vocab_fingerprint(tokenizer),
                 token_dtype(tokenizer.vocab_size).name, out / SHARD_DIR, shard_documents)
    try:
        plan.shard_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CpmliveError(f"cannot create output directory {out}: {exc.strerror}") from exc
    documents, chars, counts = _count_documents(sources, min_chars, cache_dir, max_docs)
    shards = -(-documents // shard_documents)
    workers = max(1, min(workers or _default_workers(), shards))
    with _progress_bar(chars, progress) as bar:
        paths, reused = _tokenize_all(_documents(sources, min_chars, cache_dir, {}, max_docs), plan, workers, bar)
    assembled = _assemble(paths, out, seed, val_fraction)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "vocab": {"sha256": plan.fingerprint, "size": tokenizer.vocab_size},
        "dtype": plan.dtype, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "sources": sources, "seed": seed, "val_fraction": val_fraction, "min_chars": min_chars,
        "split": "document", "documents": documents, "chars": assembled["chars"],
        "tokens": assembled["train"]["tokens"] + assembled["val"]["tokens"],
        "unk_dropped": assembled["unk_dropped"],
        "dropped": {"short": sum(c["short"] for c in counts.values()),
                    "duplicate": sum(c["duplicate"] for c in counts.values())},
        "train": assembled["train"], "val": assembled["val"],
        "per_source": _per_source_meta(sources, counts, assembled["per_source"]),
    }
    if max_docs is not None:
        meta["max_docs"] = max_docs
    text = json.dumps(meta, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    atomic_write(out / META_FILE, lambda handle: handle.write(text.encode("utf-8")))
    shutil.rmtree(plan.shard_dir, ignore_errors=True)
    return {**meta, "seconds": round(time.monotonic() - started, 3), "shards_reused": reused}


def _per_source_meta(sources: Sequence[str], counts: dict[str, Counter[str]],
                     splits: dict[str, dict[int, tuple[int, int]]]) -> dict[str, dict[str, Any]]:
    table = {}
    for index, source in enumerate(sources):
        tally = counts[source]
        entry: dict[str, Any] = {"documents": tally["documents"], "chars": tally["chars"],
                                 "dropped": {"short": tally["short"], "duplicate": tally["duplicate"]}}
        for split, rows in splits.items():
            documents, tokens = rows.get(index, (0, 0))
            entry[split] = {"documents": documents, "tokens": tokens}
        table[source] = entry
    return table


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a prepared directory; CpmliveError when missing or not ours."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CpmliveError(f"{directory} is not a prepared data directory (no {META_FILE}; run prepare)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CpmliveError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CpmliveError(f"{path} is not a cpmlive token store description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CpmliveError(f"{path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION} "
                           f"(prepare the data again with this cpmlive)")
    return meta


class TokenStore:
    """Memory-mapped read access to one split of a prepared directory."""

    def __init__(self, directory: str | os.PathLike[str], split: str = "train") -> None:
        if split not in SPLITS:
            raise CpmliveError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
        self.directory = Path(directory)
        self.split = split
        self.meta = read_meta(directory)
        self.dtype = np.dtype(self.meta["dtype"])
        self.tokens = self._map_tokens(self.directory / f"{split}.bin", int(self.meta[split]["tokens"]))
        self.offsets = self._load_offsets(self.directory / f"{split}.idx.npy", int(self.meta[split]["documents"]))
        self.sources: list[str] = list(self.meta["sources"])
        self.document_sources = self._load_sources(self.directory / f"{split}.source.npy")

    def _map_tokens(self, path: Path, expected: int) -> np.ndarray:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CpmliveError(f"cannot read token file {path}: {exc.strerror}") from exc
        if size != expected * self.dtype.itemsize:
            raise CpmliveError(
                f"token file {path} has {size} bytes, {META_FILE} says {expected} {self.dtype.name} tokens"
            )
        if expected == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def _load_offsets(self, path: Path, expected: int) -> np.ndarray:
        try:
            offsets = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CpmliveError(f"cannot read document index {path}: {exc}") from exc
        if offsets.shape != (expected + 1,) or int(offsets[-1]) != len(self.tokens):
            raise CpmliveError(f"document index {path} does not match {META_FILE}")
        return offsets

    def _load_sources(self, path: Path) -> np.ndarray:
        try:
            sources = np.load(path)
        except (OSError, ValueError) as exc:
            raise CpmliveError(f"cannot read document sources {path}: {exc}") from exc
        if sources.shape != (self.num_documents,) or (len(sources) and int(sources.max()) >= len(self.sources)):
            raise CpmliveError(f"document sources {path} do not match {META_FILE}")
        return sources

    def source_index(self, name: str) -> int:
        """Index of source ``name`` in this store; CpmliveError naming the ones it has."""
        if name not in self.sources:
            raise CpmliveError(f"{self.directory} has no source {name!r} (it has: {', '.join(self.sources)})")
        return self.sources.index(name)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.num_documents

    def document(self, index: int) -> np.ndarray:
        """Token ids of document ``index`` (``<s>`` … ``</s>``), a read-only view."""
        if not -self.num_documents <= index < self.num_documents:
            raise IndexError(f"document {index} out of range ({self.num_documents} in {self.split})")
        index %= self.num_documents
        return self.tokens[int(self.offsets[index]) : int(self.offsets[index + 1])]

    def check_vocab(self, vocab: TextTokenizer | str | os.PathLike[str]) -> None:
        """CpmliveError unless the data was prepared with this vocabulary."""
        tokenizer = opened(vocab)
        fingerprint = vocab_fingerprint(tokenizer)
        expected = self.meta["vocab"]
        if fingerprint != expected["sha256"] or tokenizer.vocab_size != expected["size"]:
            raise CpmliveError(
                f"vocab/model mismatch: {self.directory} was prepared with a vocabulary of "
                f"{expected['size']} tokens (sha256 {expected['sha256'][:12]}), the model's has "
                f"{tokenizer.vocab_size} tokens (sha256 {fingerprint[:12]})"
            )
