"""The headline generator (智取标题): an article in, several distinct candidate titles out.

Candidates come from beam search (the ``num_beams`` best hypotheses) and from seeded
nucleus sampling; they are deduplicated (ignoring punctuation and spaces), kept within
``min_chars..max_chars`` and ranked best first by their length-normalised log-likelihood
under the model, so beam and sampled candidates compete on one scale.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig, beam_search, generate_ids
from cpmlive.tune.task import TaskSpec, encode_input, encode_target, example_batch, target_logprobs

MAX_ARTICLE_CHARS = 20_000
_NOT_TEXT_RE = re.compile(r"[\s\W_]+")


@dataclass
class TitleOptions:
    n: int = 5
    num_beams: int = 6
    samples: int = 8
    temperature: float = 0.8
    top_p: float = 0.9
    min_chars: int = 4
    max_chars: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.num_beams < 1 or self.samples < 0:
            raise CpmliveError("n and num_beams must be >= 1, samples >= 0")
        if not 1 <= self.min_chars <= self.max_chars:
            raise CpmliveError("need 1 <= min_chars <= max_chars")


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


def _candidates(lm, row: list[int], spec: TaskSpec, options: TitleOptions) -> list[list[int]]:
    max_new = spec.max_output_tokens
    found: list[list[int]] = []
    if options.num_beams > 1:
        config = GenerationConfig(max_new_tokens=max_new, num_beams=options.num_beams, no_repeat_ngram_size=3)
        found += [ids for _, ids in beam_search(lm.model, row, config, lm.tokenizer.eos_id, spec.prompt_task)]
    else:
        config = GenerationConfig(max_new_tokens=max_new, no_repeat_ngram_size=3)
        found += generate_ids(lm.model, [row], config, lm.tokenizer.eos_id, spec.prompt_task)
    if options.samples:
        config = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=options.temperature,
                                  top_p=options.top_p, no_repeat_ngram_size=3, seed=options.seed)
        found += generate_ids(lm.model, [row] * options.samples, config, lm.tokenizer.eos_id, spec.prompt_task)
    return found


def rank_titles(lm, row: list[int], spec: TaskSpec, titles: list[str]) -> list[float]:
    """Mean log-probability per target token (the closing ``</s>`` included)."""
    pairs = [(row, encode_target(lm.tokenizer, spec, t)) for t in titles]
    with torch.inference_mode():
        totals = target_logprobs(lm.model, example_batch(pairs, spec.prompt_task, lm.model.config))
    return [total / len(target) for total, (_, target) in zip(totals.tolist(), pairs)]


def suggest_titles(lm, article: str, options: TitleOptions | None = None) -> list[str]:
    """Up to ``options.n`` distinct titles for ``article``, best first."""
    options = options or TitleOptions()
    spec: TaskSpec = lm.task or TaskSpec()
    row, cut = encode_input(lm.tokenizer, spec, clean_article(article))
    if cut:
        warnings.warn(f"article truncated to its first {spec.max_input_tokens} tokens", stacklevel=2)
    seen: dict[str, str] = {}
    with torch.inference_mode():
        for ids in _candidates(lm, row, spec, options):
            title = lm.tokenizer.decode(ids).strip()
            key = _key(title)
            if key and key not in seen and options.min_chars <= len(title) <= options.max_chars:
                seen[key] = title
    titles = list(seen.values())
    if not titles:
        return []
    scores = rank_titles(lm, row, spec, titles)
    ranked = sorted(zip(scores, range(len(titles)), titles), reverse=True)
    return [title for _, _, title in ranked[:options.n]]


def lead_title(article: str) -> str:
    """The lead baseline: the article's first clause."""
    from cpmlive.data.headlines import lead_baseline

    return lead_baseline(clean_article(article))


__all__ = ["MAX_ARTICLE_CHARS", "TitleOptions", "clean_article", "lead_title", "rank_titles", "suggest_titles"]
