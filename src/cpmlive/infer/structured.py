"""Structured output: text that must be JSON (any object, or one a JSON Schema describes), match a
regex, or follow a Lark grammar, applied as a mask on the sampler in the engine's batch.

The grammar engine is llguidance (``benchmarks/structured_output.py`` measured it beside xgrammar
and outlines-core on our vocabularies: 5-10 us of mask per token on CPM-Ant's 30k and CPM-Bee's 87k
tokens, sub-millisecond compiles, no torch dependency, rollback built in). A sequence under a
constraint gets its own matcher; before each choice its mask sets every token the grammar does not
allow to -inf (control tokens, ``<unk>`` and embedding rows past the tokenizer never are), and the
chosen token advances it. When the grammar is complete only the end-of-text token is allowed, so
the request stops there. Requests give OpenAI's ``response_format`` (``json_object``,
``json_schema``) or vLLM's ``guided_regex`` / ``guided_grammar``.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy as llguidance_numpy
import numpy as np
import torch
from torch import Tensor

from cpmlive.errors import CpmliveError

CONTROL = re.compile(r"<[^<>\s]+>")  # CPM vocabularies' control tokens (<s>, <mask>, <ans_0>, ...)
# JSON as one line with ", " and ": ": a model cannot wander into endless whitespace.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_object", "json_schema", "regex", "grammar")
MAX_GRAMMAR_CHARS = 100_000


@dataclass(frozen=True)
class Constraint:
    """What the text must be: ``kind`` (one of :data:`KINDS`) and llguidance's grammar for it."""

    kind: str
    grammar: str


def constraint_from(response_format: Any = None, guided_regex: str | None = None,
                    guided_grammar: str | None = None) -> Constraint | None:
    """The constraint a request asks for (``None``: free text); a malformed one is refused in one line."""
    given = [name for name, value in (("response_format", response_format), ("guided_regex", guided_regex),
                                      ("guided_grammar", guided_grammar)) if value is not None]
    if len(given) > 1:
        raise CpmliveError(f"give one of response_format, guided_regex or guided_grammar, not {' and '.join(given)}")
    if guided_regex is not None:
        return _compiled("regex", _text(guided_regex, "guided_regex"), llguidance.LLMatcher.grammar_from_regex)
    if guided_grammar is not None:
        return _compiled("grammar", _text(guided_grammar, "guided_grammar"), llguidance.LLMatcher.grammar_from_lark)
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _compiled("json_object", {"type": "object"}, _json_grammar)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise CpmliveError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return _compiled("json_schema", schema, _json_grammar)
    raise CpmliveError("response_format type must be one of text, json_object, json_schema")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise CpmliveError(f"{name} must be a non-empty string")
    if len(value) > MAX_GRAMMAR_CHARS:
        raise CpmliveError(f"{name} is {len(value)} characters long; at most {MAX_GRAMMAR_CHARS}")
    return value


def _json_grammar(schema: Any) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT)


def _compiled(kind: str, source: Any, make: Any) -> Constraint:
    try:
        grammar = make(source)
    except (ValueError, TypeError) as exc:  # a schema json cannot serialise, a grammar llguidance cannot read
        raise CpmliveError(f"{kind}: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, None)
    if error:
        raise CpmliveError(f"{kind}: {_first_line(error)}")
    return Constraint(kind, grammar)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])


# ---- a tokenizer as llguidance sees it --------------------------------------------------------------

_VOCABULARIES: "weakref.WeakKeyDictionary[Any, Vocabulary]" = weakref.WeakKeyDictionary()


class Vocabulary:
    """A tokenizer's tokens as llguidance takes them, built once per tokenizer: an HF tokenizer
    through its ``tokenizer.json``, a CPM vocabulary as each token's text (control tokens and
    ``<unk>`` are special: a grammar never allows them)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.size, self.eos_id = tokenizer, tokenizer.vocab_size, tokenizer.eos_id
        backend = getattr(tokenizer, "backend", None)
        if backend is not None and hasattr(backend, "to_str"):
            self.llg = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.size, eos_token=self.eos_id)
        else:
            table = _TokenTable(tokenizer)
            self.table = table.table  # text -> id of every token that writes text
            self.llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(table))

    @classmethod
    def of(cls, tokenizer: Any) -> "Vocabulary":
        found = _VOCABULARIES.get(tokenizer)
        if found is None:
            found = _VOCABULARIES[tokenizer] = cls(tokenizer)
        return found


class _TokenTable:
    """What ``llguidance.TokenizerWrapper`` reads of a CPM tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        unk = getattr(tokenizer, "unk_id", None)
        self.tokens, self.special_token_ids = [], []
        for index in range(tokenizer.vocab_size):
            piece = tokenizer.id_to_token(index)
            control = bool(CONTROL.fullmatch(piece))
            self.tokens.append((piece if control else tokenizer.decode([index])).encode("utf-8"))
            if control or index == unk:
                self.special_token_ids.append(index)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = getattr(tokenizer, "bos_id", None)

        self.table = {text: index for index, text in enumerate(self.tokens)
                      if index not in set(self.special_token_ids) and text}
        self.longest = max(map(len, self.table), default=1)

    def __call__(self, data: bytes) -> list[int]:
        """``data`` as tokens by greedy longest match (what a CPM tokenizer does within a word);
        bytes no token spells are left out (never ``<unk>``: it writes no text)."""
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self.longest), start, -1):
                index = self.table.get(data[start:end])
                if index is not None:
                    ids.append(index)
                    start = end
                    break
            else:
                start += 1
        return ids


# ---- one sequence's matcher ----------------------------------------------------------------------------


class Matcher:
    """A sequence's place in its constraint's grammar, and the mask of what may come next."""

    def __init__(self, constraint: Constraint, tokenizer: Any, rows: int) -> None:
        self.vocabulary = Vocabulary.of(tokenizer)
        self.matcher = llguidance.LLMatcher(self.vocabulary.llg, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise CpmliveError(f"{constraint.kind}: {_first_line(self.matcher.get_error())}")
        self.rows = rows  # the model's vocabulary rows (at least the tokenizer's)
        self.bits = llguidance_numpy.allocate_token_bitmask(1, self.vocabulary.llg.vocab_size)

    def allowed(self) -> Tensor:
        """``[rows]`` bool: the tokens the grammar allows next."""
        llguidance_numpy.fill_next_token_bitmask(self.matcher, self.bits)
        flags = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:self.vocabulary.size].astype(bool)
        allowed = torch.zeros(self.rows, dtype=torch.bool)
        allowed[:flags.size] = torch.from_numpy(flags)
        return allowed

    def mask(self, logits: Tensor) -> bool:
        """Set what the grammar forbids in ``logits`` ``[rows]`` to -inf, in place; ``False`` when
        it allows nothing (the text can go no further)."""
        allowed = self.allowed().to(logits.device)
        logits.masked_fill_(~allowed, float("-inf"))
        return bool(allowed.any())

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise CpmliveError(f"token {token} does not follow the grammar: {self.matcher.get_error()}")


JSON_MARKS = '{}[]":,'  # what every JSON text is built with


def check_constraint(constraint: Constraint, tokenizer: Any, rows: int) -> None:
    """Refuse a constraint this vocabulary cannot write: JSON where no token starts with one of
    JSON's marks (CPM-Ant's vocabulary has no ``{``), or a grammar no token can begin (a regex that
    matches nothing)."""
    matcher = Matcher(constraint, tokenizer, rows)
    if constraint.kind.startswith("json"):
        table = getattr(matcher.vocabulary, "table", None)
        starts = {text[:1] for text in table} if table is not None else None
        missing = [mark for mark in JSON_MARKS if starts is not None and mark.encode() not in starts]
        if missing:
            raise CpmliveError(f"{constraint.kind}: this model's vocabulary has no token for {missing[0]!r}: "
                               "it cannot write JSON")
    allowed = matcher.allowed()[:tokenizer.vocab_size]
    allowed[tokenizer.eos_id] = False
    if not allowed.any():
        raise CpmliveError(f"{constraint.kind}: no text this model's vocabulary can write matches it")


__all__ = ["COMPACT", "Constraint", "KINDS", "Matcher", "Vocabulary", "check_constraint", "constraint_from"]
