"""The headline generator (智取标题): an article in, several distinct candidate titles out.

Candidates come from three sources: beam search (the ``num_beams`` best hypotheses), seeded
nucleus sampling, and the lead's own clauses (every run of up to ``lead_clauses`` clauses of the
first ``lead_sentences`` sentences: headline editors mostly compress the lead). They are
deduplicated (ignoring punctuation and spaces), kept within ``min_chars..max_chars`` and ranked
best first by one score, so all sources compete on one scale.

The score is *contrastive* when a title adapter is active: the candidate's log-likelihood as a
title under the adapter minus its log-likelihood under the bare base model on the same input.
The difference is what tuning taught the model about titles, with the base model's general
fluency (which favours short, common phrases) cancelled out. Without an adapter, or with
``contrast=False``, the score is the mean log-likelihood per token.

Generated titles pay ``generated_penalty`` (in the score's units) against the lead's clauses, and
``length_bonus`` (per character, the score's units) is the usual length prior of summarization
decoding: the contrastive score alone picks titles shorter than the reference's best match. Both
were chosen by ``benchmarks/headline_priors.py`` on the first 100 dev articles for the shipped
base and adapter: ROUGE-L of the top title 22.5 with neither, 27.6 with no penalty and a 0.3
bonus (18 generated winners, most of them weak), 29.15 with 8 and 0.3 (3 generated winners),
29.05 with clauses alone; the lead baseline has 20.4 there. A stronger base model earns a lower
penalty.

Headlines mostly reuse the article's own words. ``copy_spans`` restricts decoding to them, and
``copy_bias`` adds that prior to decoding (HF's ``sequence_bias`` on every word token of the
article) and to the score (``copy_bias`` times the share of tokens taken from the article).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from cpmlive.api import LM
from cpmlive.data.headlines import strip_dateline
from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig, beam_search, generate_ids
from cpmlive.tune.task import TaskSpec, encode_input, encode_target, example_batch, target_logprobs

MAX_ARTICLE_CHARS = 20_000
_CLAUSE_RE = re.compile(r"[，。！？；：\n]")
_SENTENCE_END_RE = re.compile(r"(?<=[。！？\n])")
_NOT_TEXT_RE = re.compile(r"[\s\W_]+")
_WORDLIKE_RE = re.compile(r"[^\W_]")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")  # the headline model reads Chinese: an article needs some


@dataclass
class TitleOptions:
    n: int = 5
    num_beams: int = 6
    samples: int = 8
    temperature: float = 0.8
    top_p: float = 0.9
    min_chars: int = 4
    max_chars: int = 40  # the longest title in the training split has 39 characters
    min_new_tokens: int = 0
    lead_sentences: int = 2
    lead_clauses: int = 3
    contrast: bool = True
    # chosen on the headline dev split (see the module docstring)
    generated_penalty: float = 8.0
    length_bonus: float = 0.3
    copy_bias: float = 0.0
    # chosen on the headline dev split: ROUGE-L of the shipped adapter's top title 2.7 -> 13.9
    copy_spans: bool = True
    span_bonus: float = 6.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.num_beams < 0 or self.samples < 0 or self.lead_sentences < 0 or self.lead_clauses < 1:
            raise CpmliveError("need n >= 1, num_beams, samples and lead_sentences >= 0, lead_clauses >= 1")
        if not (self.num_beams or self.samples or self.lead_sentences):
            raise CpmliveError("no source of titles: num_beams, samples and lead_sentences are all 0")
        if not 1 <= self.min_chars <= self.max_chars:
            raise CpmliveError("need 1 <= min_chars <= max_chars")


def lead_baseline(body: str) -> str:
    """The first clause of a cleaned body (up to the first ，。！？；： or line break):
    the classic "lead" baseline for headline generation."""
    for clause in _CLAUSE_RE.split(body):
        if clause.strip():
            return clause.strip()
    return ""


def lead_clauses(body: str, sentences: int = 3, max_clauses: int = 3) -> list[str]:
    """Extractive title candidates: every run of 1..``max_clauses`` consecutive clauses of each of
    the body's first ``sentences`` sentences (after a dateline, as ``clean_body`` drops it), joined
    without their punctuation, in reading order. On a cleaned body the lead baseline is the first
    of them; headline editors mostly compress these sentences."""
    found: list[str] = []
    lead = [s for s in _SENTENCE_END_RE.split(strip_dateline(body.lstrip())) if s.strip()][:sentences]
    for sentence in lead:
        clauses = [c.strip() for c in _CLAUSE_RE.split(sentence) if c.strip()]
        for start in range(len(clauses)):
            for end in range(start + 1, min(start + max_clauses, len(clauses)) + 1):
                found.append("".join(clauses[start:end]))
    return list(dict.fromkeys(found))


def clean_article(text: str) -> str:
    """The article as the model should see it; a clear error for nothing to title."""
    if not isinstance(text, str) or not text.strip():
        raise CpmliveError("the article is empty")
    text = " ".join(text.split())
    if len(text) > MAX_ARTICLE_CHARS:
        warnings.warn(f"article of {len(text)} characters truncated to its first {MAX_ARTICLE_CHARS}", stacklevel=3)
        text = text[:MAX_ARTICLE_CHARS]
    return text


def _key(title: str) -> str:
    return _NOT_TEXT_RE.sub("", title)


def article_words(lm: LM, row: list[int]) -> set[int]:
    """The article's tokens that hold a letter, digit or CJK character (not punctuation)."""
    special = {lm.tokenizer.bos_id, lm.tokenizer.eos_id}
    return {t for t in row if t not in special and _WORDLIKE_RE.search(lm.tokenizer.decode([t]))}


class CopySpans:
    """A logits rule that builds titles from the article's own words: only its word tokens and
    ``</s>`` may be chosen, a word that continues the span being copied gets ``bonus``, and no
    word comes twice."""

    def __init__(self, lm: LM, row: list[int], bonus: float) -> None:
        self.prompt = len(row)
        self.bonus = bonus
        words = article_words(lm, row)
        self.mask = torch.full((lm.config.vocab_size,), float("-inf"))
        self.mask[list(words | {lm.tokenizer.eos_id})] = 0.0
        self.follows: dict[int, set[int]] = {}
        for current, following in zip(row, row[1:]):
            if following in words:
                self.follows.setdefault(current, set()).add(following)

    def __call__(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        logits = logits + self.mask.to(logits.device)
        for index, history in enumerate(histories):
            generated = history[self.prompt:]
            if not generated:
                continue
            continuing = self.follows.get(generated[-1], set()) - set(generated)
            if continuing:
                logits[index, list(continuing)] += self.bonus
            logits[index, list(set(generated))] = float("-inf")
        return logits


def _candidates(lm: LM, row: list[int], spec: TaskSpec, options: TitleOptions) -> list[list[int]]:
    common = {"max_new_tokens": spec.max_output_tokens, "no_repeat_ngram_size": 3,
              "min_new_tokens": min(options.min_new_tokens, spec.max_output_tokens)}
    if options.copy_spans:
        common["logits_processor"] = CopySpans(lm, row, options.span_bonus)
    if options.copy_bias:
        # </s> gets the bias too, so ending a title stays as likely as copying another word
        boosted = article_words(lm, row) | {lm.tokenizer.eos_id}
        common["sequence_bias"] = {(t,): options.copy_bias for t in boosted}
    found: list[list[int]] = []
    if options.num_beams > 1:
        config = GenerationConfig(num_beams=options.num_beams, **common)
        found += [ids for _, ids in beam_search(lm.model, row, config, lm.tokenizer.eos_id, spec.prompt_task)]
    elif options.num_beams == 1:
        found += generate_ids(lm.model, [row], GenerationConfig(**common), lm.tokenizer.eos_id, spec.prompt_task)
    if options.samples:
        config = GenerationConfig(do_sample=True, temperature=options.temperature, top_p=options.top_p,
                                  seed=options.seed, **common)
        found += generate_ids(lm.model, [row] * options.samples, config, lm.tokenizer.eos_id, spec.prompt_task)
    return found


def rank_titles(lm: LM, row: list[int], spec: TaskSpec, titles: list[str], copy_bias: float = 0.0,
                contrast: bool = False) -> list[float]:
    """One score per title, higher is better. ``contrast`` (with an adapter active): the title's
    log-likelihood under the adapter minus under the bare base model. Otherwise the mean
    log-probability per target token (the closing ``</s>`` included). Either way plus
    ``copy_bias`` times the share of target tokens that occur in the article."""
    pairs = [(row, encode_target(lm.tokenizer, spec, t)) for t in titles]
    batch = example_batch(pairs, spec.prompt_task, lm.model.config)
    with torch.inference_mode():
        totals = target_logprobs(lm.model, batch).tolist()
        if contrast and lm.active is not None:
            with lm.using(None):
                base = target_logprobs(lm.model, batch).tolist()
            scores = [tuned - plain for tuned, plain in zip(totals, base)]
        else:
            scores = [total / len(target) for total, (_, target) in zip(totals, pairs)]
    if copy_bias:
        words = article_words(lm, row) | {lm.tokenizer.eos_id}
        scores = [score + copy_bias * sum(t in words for t in target) / len(target)
                  for score, (_, target) in zip(scores, pairs)]
    return scores


@dataclass(frozen=True)
class Candidate:
    """A title with its model score before the priors, and whether it is one of the lead's clauses."""

    title: str
    score: float
    from_lead: bool


def title_candidates(lm: LM, article: str, options: TitleOptions | None = None) -> list[Candidate]:
    """Every distinct title of the right length from the three sources, scored (``rank_titles``)."""
    lm.require("title")
    options = options or TitleOptions()
    spec: TaskSpec = lm.task or TaskSpec()
    article = clean_article(article)
    if not HAN.search(article):
        raise CpmliveError("the headline model is Chinese-only: the article has no Chinese characters")
    row, cut = encode_input(lm.tokenizer, spec, article)
    if cut:
        warnings.warn(f"article truncated to its first {spec.max_input_tokens} tokens", stacklevel=3)
    with torch.inference_mode():
        generated = [lm.tokenizer.decode(ids).strip() for ids in _candidates(lm, row, spec, options)]
    extracted = lead_clauses(article, options.lead_sentences, options.lead_clauses) if options.lead_sentences else []
    seen: dict[str, str] = {}
    for title in extracted + generated:  # a generated title equal to a clause counts as the clause
        key = _key(title)
        if key and key not in seen:
            seen[key] = title
    # Length control; when no candidate fits, the closest ones are better than nothing.
    titles = [t for t in seen.values() if options.min_chars <= len(t) <= options.max_chars]
    if not titles:
        titles = sorted(seen.values(), key=lambda t: max(options.min_chars - len(t), len(t) - options.max_chars))
        titles = titles[:options.n]
    if not titles:
        return []
    scores = rank_titles(lm, row, spec, titles, options.copy_bias, options.contrast)
    clauses = set(extracted)
    return [Candidate(title, score, title in clauses) for title, score in zip(titles, scores)]


def apply_priors(candidates: list[Candidate], options: TitleOptions) -> list[Candidate]:
    """Best first by score + ``length_bonus`` per character - ``generated_penalty`` unless from the lead."""
    def total(candidate: Candidate) -> float:
        penalty = 0.0 if candidate.from_lead else options.generated_penalty
        return candidate.score + options.length_bonus * len(candidate.title) - penalty

    order = sorted(range(len(candidates)), key=lambda i: (-total(candidates[i]), -i))
    return [candidates[i] for i in order]


def suggest_titles(lm: LM, article: str, options: TitleOptions | None = None) -> list[str]:
    """Up to ``options.n`` distinct titles for ``article``, best first."""
    options = options or TitleOptions()
    return [c.title for c in apply_priors(title_candidates(lm, article, options), options)[:options.n]]


def lead_title(article: str) -> str:
    """The lead baseline: the article's first clause."""
    return lead_baseline(clean_article(article))


__all__ = ["MAX_ARTICLE_CHARS", "Candidate", "TitleOptions", "apply_priors", "clean_article", "lead_baseline",
           "lead_clauses", "lead_title", "rank_titles", "suggest_titles", "title_candidates"]
