"""Prompt learning as OpenPrompt does it: a task becomes the model's own pre-training task through
a template (the example's text around a mask) and a verbalizer (the words that may fill the mask,
by class), scored by the model, optionally calibrated, with few-shot learning by in-context
examples or by prompt tuning (soft tokens trained while the model stays frozen).

Templates read as text with slots::

    {text_a}。总之很{mask}。            # a field of the example, the mask
    {soft*4}{text_a}{soft:总之}很{mask}  # four soft tokens, and soft tokens that start as "总之"

or in OpenPrompt's own syntax (``{"placeholder": "text_a"}``, ``{"mask"}``, ``{"soft": "总之"}``,
``{"soft": null, "duplicate": 4}``). A template has exactly one mask; soft tokens go before it.

Verbalizers map each class to label words (``{"正面": ["好", "棒"], "负面": ["差", "糟"]}``). A class
scores the mean probability of its words (OpenPrompt's manual verbalizer); a word of several
tokens is scored by all its tokens (the model writes them in turn into the mask: their summed
log-probability), so no word needs to be one token. ``knowledgeable`` verbalizers (KPT, Hu et al.
2022) carry an expanded word set per class, refined on unlabeled support texts: words whose prior
probability there is tiny are dropped (frequency refinement), and words more related to another
class than to their own are dropped (relevance refinement: a word's vector is its probability on
each support text; its relevance to a class is its cosine with the class name's vector, divided
by its mean cosine with the other classes', kept above 1). ``soft`` verbalizers learn a weight per
label word and a bias per class from the few-shot examples (KPT's learnable refinement; OpenPrompt's
soft verbalizer learns a head over hidden states instead, which no family-neutral scorer exposes).

Calibration: ``contextual`` (Zhao et al. 2021) divides each class's probability by its
probability on content-free inputs (``N/A``, the empty text, ``[MASK]``, in the template);
``pmi`` (domain-conditional PMI, Holtzman et al. 2021) subtracts each word's log-probability
after the template's domain premise alone (its text from the last field to the mask);
``support`` (KPT's contextualized calibration) divides by the mean over unlabeled support texts.

The scorer is given (``Scorer``): ``cpmlive.api.LM.score`` for every family that writes text
(CPM-Ant infills the mask between its two sides; a left-to-right family and an encoder-decoder
write the word and the template's rest after the prefix). Prompt tuning trains through
:func:`cpmlive.model.scoring.continuation_scores`.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from cpmlive.errors import CpmliveError

SLOT = re.compile(r"\{([^{}]*)\}")
CONTENT_FREE = ("N/A", "", "[MASK]")
CALIBRATIONS = ("contextual", "pmi", "support")
KINDS = ("manual", "knowledgeable", "soft")
SOFT = -1  # a soft token's place in a prompt being built

# (context text, word, text after the word) -> log P(word [+ after] | context)
Scorer = Callable[[list[tuple[str, str, str]]], list[float]]


# ---- templates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    kind: str  # "text", "field", "mask" or "soft"
    text: str = ""  # a text part's text, a field's name, a soft part's initial text
    count: int = 1  # soft tokens


def _slot(content: str) -> Part:
    content = content.strip()
    if content.startswith('"'):
        try:
            spec = json.loads("{" + content + "}") if ":" in content else {json.loads(content): None}
        except json.JSONDecodeError:
            raise CpmliveError(f"template slot {{{content}}} is not OpenPrompt's JSON") from None
        if "mask" in spec:
            return Part("mask")
        if "placeholder" in spec:
            return Part("field", str(spec["placeholder"]))
        if "meta" in spec:
            return Part("field", str(spec["meta"]))
        if "soft" in spec:
            return Part("soft", spec["soft"] or "", int(spec.get("duplicate", 1)))
        raise CpmliveError(f"template slot {{{content}}}: OpenPrompt's slots are placeholder, meta, mask and soft")
    if content == "mask":
        return Part("mask")
    if content == "soft" or content.startswith(("soft*", "soft:")):
        if content.startswith("soft*"):
            count = content[5:]
            if not count.isdigit() or int(count) < 1:
                raise CpmliveError(f"template slot {{{content}}}: soft*N needs a positive N")
            return Part("soft", "", int(count))
        return Part("soft", content[5:] if content.startswith("soft:") else "")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", content):
        raise CpmliveError(f"template slot {{{content}}}: a field name, mask, soft, soft*N or soft:TEXT")
    return Part("field", content)


@dataclass(frozen=True)
class Template:
    """A parsed template (see the module docstring)."""

    parts: tuple[Part, ...]

    @classmethod
    def parse(cls, text: str) -> "Template":
        parts, end = [], 0
        for match in SLOT.finditer(text):
            if match.start() > end:
                parts.append(Part("text", text[end:match.start()]))
            parts.append(_slot(match.group(1)))
            end = match.end()
        if end < len(text):
            parts.append(Part("text", text[end:]))
        masks = [i for i, p in enumerate(parts) if p.kind == "mask"]
        if len(masks) != 1:
            raise CpmliveError(f"a template needs exactly one {{mask}} slot; {text!r} has {len(masks)}")
        if any(p.kind == "soft" for p in parts[masks[0]:]):
            raise CpmliveError("soft tokens go before the {mask} (the model reads them before it writes the word)")
        if not any(p.kind == "field" for p in parts):
            raise CpmliveError(f"template {text!r} places no field of the example (such as {{text_a}})")
        return cls(tuple(parts))

    @property
    def fields(self) -> list[str]:
        return [p.text for p in self.parts if p.kind == "field"]

    @property
    def soft_count(self) -> int:
        return sum(p.count for p in self.parts if p.kind == "soft")

    def _mask(self) -> int:
        return next(i for i, p in enumerate(self.parts) if p.kind == "mask")

    def pieces(self, example: dict) -> tuple[list[tuple[str, str]], str]:
        """The prefix as ``(kind, text)`` pieces (``text`` and ``soft`` parts; a soft part's text is
        its initial text, ``soft*N`` as N empty pieces) and the text after the mask."""
        prefix: list[tuple[str, str]] = []
        for part in self.parts[:self._mask()]:
            if part.kind == "soft":
                prefix += [("soft", part.text)] if part.text else [("soft", "")] * part.count
            else:
                prefix.append(("text", self._text(part, example)))
        return prefix, "".join(self._text(part, example) for part in self.parts[self._mask() + 1:])

    def render(self, example: dict) -> tuple[str, str]:
        """The text before the mask (soft tokens as their initial text) and after it."""
        prefix, after = self.pieces(example)
        if any(kind == "soft" and not text for kind, text in prefix):
            raise CpmliveError("soft tokens without initial text exist only once trained: tune them (--tune)")
        return "".join(text for _, text in prefix), after

    def domain_premise(self) -> str:
        """The template's text from its last field to the mask (what PMI conditions on alone)."""
        mask = self._mask()
        last = max((i for i, p in enumerate(self.parts[:mask]) if p.kind == "field"), default=-1)
        return "".join(p.text for p in self.parts[last + 1:mask] if p.kind in ("text", "soft"))

    @staticmethod
    def _text(part: Part, example: dict) -> str:
        if part.kind == "text":
            return part.text
        if part.kind == "field":
            if part.text not in example:
                raise CpmliveError(f"the template reads field {part.text!r}, which an example lacks "
                                   f"(it has {', '.join(sorted(example)) or 'none'})")
            return str(example[part.text])
        return part.text


# ---- verbalizers ------------------------------------------------------------------------------


@dataclass
class Verbalizer:
    """Label words by class (see the module docstring)."""

    words: dict[str, list[str]]
    kind: str = "manual"
    min_prior: float = 0.0  # knowledgeable: frequency refinement drops words whose support prior is below this share
    weights: Tensor | None = field(default=None, repr=False)  # soft: per-word logits (learned)
    bias: Tensor | None = field(default=None, repr=False)  # soft: per-class bias (learned)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CpmliveError(f"verbalizer kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.words) < 2:
            raise CpmliveError("a verbalizer needs at least two classes")
        for label, words in self.words.items():
            if not words or any(not isinstance(w, str) or not w for w in words):
                raise CpmliveError(f"class {label!r} needs at least one non-empty label word")

    @classmethod
    def load(cls, spec: str | dict) -> "Verbalizer":
        """From a dict, a JSON / YAML file, or inline ``label=word|word,label=word``; a dict or file
        may hold ``{"kind": ..., "words": {...}}`` or the words alone."""
        if isinstance(spec, str) and Path(spec).is_file():
            import yaml

            try:
                spec = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise CpmliveError(f"{spec}: not valid YAML or JSON ({exc})") from None
        elif isinstance(spec, str):
            try:
                spec = {label: words.split("|") for label, words in (item.split("=", 1) for item in spec.split(","))}
            except ValueError:
                raise CpmliveError(f"verbalizer {spec!r}: give a file, or label=word|word,label=word") from None
        if not isinstance(spec, dict):
            raise CpmliveError("a verbalizer is a mapping of class to label words")
        words = spec.get("words", spec)
        words = {str(k): [v] if isinstance(v, str) else list(v) for k, v in words.items() if k not in ("kind",)}
        return cls(words, spec.get("kind", "manual") if "words" in spec else "manual",
                   float(spec.get("min_prior", 0.0)) if "words" in spec else 0.0)

    @property
    def labels(self) -> list[str]:
        return list(self.words)

    def flat(self) -> list[tuple[int, str]]:
        """Every (class index, word), class by class."""
        return [(c, w) for c, label in enumerate(self.labels) for w in self.words[label]]

    def class_scores(self, word_logprobs: Tensor) -> Tensor:
        """``[N, classes]`` log-scores from ``[N, words]`` word log-probabilities (``flat`` order):
        the log of the mean probability of each class's words, or the learned weighted mean."""
        index = torch.tensor([c for c, _ in self.flat()])
        out = []
        for c in range(len(self.labels)):
            columns = word_logprobs[:, index == c]
            if self.kind == "soft" and self.weights is not None:
                mix = self.weights[index == c].log_softmax(0)
                out.append(torch.logsumexp(columns + mix, dim=1) + self.bias[c])
            else:
                out.append(torch.logsumexp(columns, dim=1) - math.log(columns.size(1)))
        return torch.stack(out, dim=1)

    def refine(self, support_logprobs: Tensor) -> "Verbalizer":
        """KPT's refinement over unlabeled support texts (``[texts, words]`` log-probabilities of
        every word): frequency (prior share below ``min_prior``) and relevance (closer to another
        class than to its own). Each class keeps its first word (its name) whatever happens."""
        flat = self.flat()
        probs = support_logprobs.exp()
        prior = probs.mean(0)
        vectors = probs / probs.norm(dim=0, keepdim=True).clamp_min(1e-12)
        names = [next(i for i, (c, _) in enumerate(flat) if c == k) for k in range(len(self.labels))]
        kept: dict[str, list[str]] = {label: [] for label in self.labels}
        for i, (c, word) in enumerate(flat):
            if i in names:
                kept[self.labels[c]].append(word)
                continue
            share = prior[i] / prior[[j for j, (k, _) in enumerate(flat) if k == c]].sum()
            cosines = torch.stack([vectors[:, i] @ vectors[:, n] for n in names])
            others = torch.cat([cosines[:c], cosines[c + 1:]]).clamp_min(1e-6).mean()
            if share >= self.min_prior and cosines[c] / others > 1:
                kept[self.labels[c]].append(word)
        return Verbalizer(kept, self.kind, self.min_prior)


# ---- scoring, calibration ---------------------------------------------------------------------


def word_logprobs(score: Scorer, template: Template, verbalizer: Verbalizer, examples: Sequence[dict],
                  demonstrations: str = "") -> Tensor:
    """``[N, words]``: each label word's log-probability in each example's mask."""
    triples = []
    for example in examples:
        prefix, after = template.render(example)
        triples += [(demonstrations + prefix, word, after) for _, word in verbalizer.flat()]
    return torch.tensor(score(triples), dtype=torch.float32).view(len(examples), -1)


def content_free_examples(template: Template) -> list[dict]:
    return [{name: text for name in template.fields} for text in CONTENT_FREE]


@dataclass
class Calibration:
    """What calibration takes away: from each word's log-probability (``per_word``: PMI's domain
    premise) or from each class's normalised log-probability (``per_class``: the mean class
    probability on content-free or support inputs)."""

    kind: str
    per_word: Tensor | None = None
    per_class: Tensor | None = None


def calibrate(kind: str | None, score: Scorer, template: Template, verbalizer: Verbalizer,
              demonstrations: str = "", support: Sequence[dict] = ()) -> Calibration | None:
    """The calibration of ``kind`` (``None``: none) for this template, verbalizer and context."""
    if kind is None:
        return None
    if kind not in CALIBRATIONS:
        raise CpmliveError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {kind!r}")
    if kind == "pmi":
        _, after = template.render({name: "" for name in template.fields})
        premise = demonstrations + template.domain_premise()
        if not premise:
            raise CpmliveError("PMI needs template text between the last field and the mask (its domain premise)")
        triples = [(premise, word, after) for _, word in verbalizer.flat()]
        return Calibration(kind, per_word=torch.tensor(score(triples), dtype=torch.float32))
    inputs = content_free_examples(template) if kind == "contextual" else list(support)
    if not inputs:
        raise CpmliveError("support calibration needs unlabeled support texts")
    classes = verbalizer.class_scores(word_logprobs(score, template, verbalizer, inputs, demonstrations))
    return Calibration(kind, per_class=classes.log_softmax(-1).exp().mean(0).log())


def classify_scores(word_scores: Tensor, verbalizer: Verbalizer, calibration: Calibration | None = None) -> Tensor:
    """``[N, classes]`` (calibrated) log-scores from ``[N, words]`` word log-probabilities."""
    if calibration is not None and calibration.per_word is not None:
        word_scores = word_scores - calibration.per_word
    classes = verbalizer.class_scores(word_scores)
    if calibration is not None and calibration.per_class is not None:
        return classes.log_softmax(-1) - calibration.per_class
    return classes


# ---- few-shot ---------------------------------------------------------------------------------


def sample_shots(examples: Sequence[dict], labels: Sequence[str], shots: int, seed: int,
                 label_field: str = "label") -> list[dict]:
    """``shots`` examples of each class, drawn with ``seed`` (classes interleaved, as a prompt's
    demonstrations should not end on a run of one class)."""
    by_class = {label: [e for e in examples if e[label_field] == label] for label in labels}
    short = [label for label, items in by_class.items() if len(items) < shots]
    if short:
        raise CpmliveError(f"{shots} shots per class asked for, but class {short[0]!r} has "
                           f"{len(by_class[short[0]])} examples in the training data")
    rng = random.Random(seed)
    drawn = {label: rng.sample(items, shots) for label, items in by_class.items()}
    return [drawn[label][i] for i in range(shots) for label in labels]


def demonstrations(template: Template, verbalizer: Verbalizer, shots: Sequence[dict], label_field: str = "label",
                   separator: str = "\n") -> str:
    """In-context examples: each shot in the template with its class's first word in the mask."""
    out = []
    for shot in shots:
        prefix, after = template.render(shot)
        out.append(prefix + verbalizer.words[shot[label_field]][0] + after)
    return "".join(text + separator for text in out)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


# ---- prompt tuning ------------------------------------------------------------------------------


class SoftTokens(nn.Module):
    """A template's soft tokens as vectors in the model's embedding space, put where the
    placeholder id stands in the input. The placeholder is a real vocabulary id that no other
    token of the batch has (set per batch): a family may clamp or remap ids beyond its table
    before the lookup (CPM-Ant reads them as its task prompt's rows)."""

    def __init__(self, embedding: nn.Embedding | nn.Module, initial: Tensor) -> None:
        super().__init__()
        self.placeholder = 0
        self.vectors = nn.Parameter(initial.detach().clone().float())
        self._hook = embedding.register_forward_hook(self._place)

    def _place(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        mask = args[0] == self.placeholder
        if not mask.any():
            return output
        rows, rest = divmod(int(mask.sum()), self.vectors.size(0))
        if rest:
            raise RuntimeError("a batch row holds the soft tokens partly: the placeholder id is in the text")
        return output.masked_scatter(mask[..., None], self.vectors.to(output.dtype).repeat(rows, 1))

    def remove(self) -> None:
        self._hook.remove()


class PromptTuner:
    """Prompt tuning (Lester et al. 2021, as OpenPrompt's mixed templates do it): the template's
    soft tokens, and a soft verbalizer's weights, trained on few-shot examples by the
    cross-entropy of the verbalizer's class scores, the model frozen. ``encode_context`` and
    ``encode`` are the tokenizer's prompt and plain encodings (``LM.encode_context``,
    ``tokenizer.encode``)."""

    def __init__(self, model: nn.Module, encode_context: Callable[[str], list[int]], encode: Callable[[str], list[int]],
                 eos_id: int, template: Template, verbalizer: Verbalizer, seed: int = 0) -> None:
        self.model, self.encode_context, self.encode, self.eos_id = model, encode_context, encode, eos_id
        self.template, self.verbalizer, self.seed = template, verbalizer, seed
        self.words = [encode(word) for _, word in verbalizer.flat()]
        initial = self._initial(seed)
        self.soft = SoftTokens(model.input_embedding, initial) if initial is not None else None

    def _initial(self, seed: int) -> Tensor | None:
        """Each soft token's first vector: its initial text's token embeddings, else a random
        vocabulary token's (seeded)."""
        ids: list[int] = []
        generator = random.Random(seed)
        for part in self.template.parts:
            if part.kind != "soft":
                continue
            if part.text:
                ids += self.encode(part.text)
            else:
                ids += [generator.randrange(1000, min(8000, self.model.config.vocab_size)) for _ in range(part.count)]
        if not ids:
            return None
        with torch.no_grad():
            return self.model.input_embedding(torch.tensor(ids, device=self.model.input_embedding.weight.device))

    def _context(self, example: dict) -> tuple[list[int], list[int]]:
        """The prompt's ids, each soft token as ``SOFT`` (-1) until the batch's placeholder is
        known, and the ids of the template's rest after the mask."""
        prefix, after = self.template.pieces(example)
        ids: list[int] = []
        for kind, text in prefix:
            if kind == "soft":
                ids += [SOFT] * (len(self.encode(text)) if text else 1)
            elif text:
                ids += self.encode(text)
        return self.encode_context("") + ids, self.encode(after)

    def _scores(self, examples: Sequence[dict]) -> Tensor:
        from cpmlive.model.scoring import continuation_scores

        pairs = []
        for example in examples:
            context, after = self._context(example)
            pairs += [(context, word, after) for word in self.words]
        if self.soft is not None:
            used = {token for pair in pairs for part in pair for token in part}
            vocab = self.model.config.vocab_size  # (mid-table: pads sit low, CPM-Ant clamps prompt ids to the top)
            self.soft.placeholder = next(i for i in range(vocab // 2, vocab - 1) if i not in used)
            pairs = [([self.soft.placeholder if t == SOFT else t for t in context], word, after)
                     for context, word, after in pairs]
        scores, _ = continuation_scores(self.model, pairs, self.eos_id)
        return scores.view(len(examples), -1)

    def fit(self, shots: Sequence[dict], label_field: str = "label", steps: int = 30, lr: float = 0.05,
            batch_size: int = 8) -> list[float]:
        """Train on ``shots``, ``batch_size`` of them a step (each pass over them in a seeded
        order); the losses of each step."""
        labels = [self.verbalizer.labels.index(e[label_field]) for e in shots]
        batches = self._batches(len(shots), batch_size, steps)
        if self.verbalizer.kind == "soft":
            self.verbalizer.weights = nn.Parameter(torch.zeros(len(self.words)))
            self.verbalizer.bias = nn.Parameter(torch.zeros(len(self.verbalizer.labels)))
        trained = [p for p in ([self.soft.vectors] if self.soft is not None else [])
                   + ([self.verbalizer.weights, self.verbalizer.bias] if self.verbalizer.kind == "soft" else [])]
        if not trained:
            raise CpmliveError("nothing to tune: the template has no soft tokens and the verbalizer is not soft")
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        was_training = self.model.training
        self.model.eval()
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
        losses = []
        try:
            for batch in batches:
                scores = self.verbalizer.class_scores(self._scores([shots[i] for i in batch]))
                loss = nn.functional.cross_entropy(scores, torch.tensor([labels[i] for i in batch]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach().item())
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
            self.model.train(was_training)
        return losses

    def _batches(self, count: int, batch_size: int, steps: int) -> list[list[int]]:
        order: list[int] = []
        generator = random.Random(self.seed)
        while len(order) < steps * min(batch_size, count):
            order += generator.sample(range(count), count)
        size = min(batch_size, count)
        return [order[i * size:(i + 1) * size] for i in range(steps)]

    @torch.no_grad()
    def word_scores(self, examples: Sequence[dict], batch_size: int = 16) -> Tensor:
        return torch.cat([self._scores(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)])

    def close(self) -> None:
        """Detach the soft tokens from the model's embedding."""
        if self.soft is not None:
            self.soft.remove()


__all__ = ["CALIBRATIONS", "CONTENT_FREE", "Calibration", "KINDS", "Part", "PromptTuner", "Scorer", "SoftTokens",
           "Template", "Verbalizer", "calibrate", "classify_scores", "content_free_examples", "demonstrations",
           "mean_std", "sample_shots", "word_logprobs"]
