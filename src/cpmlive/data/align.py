"""Alignment data in TRL's formats, read with errors that name the file and line.

* SFT, one JSON object per line: ``{"prompt": str, "completion": str}`` or
  ``{"messages": [{"role", "content"}, ...]}`` (the loss goes on every assistant turn: a
  conversation becomes one example per assistant message, the turns before it as the prompt).
* Preferences: ``{"prompt", "chosen", "rejected"}``, each a string, or TRL's conversational
  form (``prompt`` a list of messages, ``chosen``/``rejected`` lists holding one assistant
  message).
* Prompts only (PPO and GRPO rollouts): ``{"prompt"}``; a preference or SFT file works too, and
  its reference answer is kept (``completion`` / ``chosen``) for task metrics.

A prompt given as text is the user's message: the chat template makes it a conversation, so a
tuned model answers the same layout in ``generate``, ``cpmlive chat`` and the chat endpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from cpmlive.data.chat import ROLES, ChatTemplate
from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write_text


TRUNCATION_MODES = ("keep_end", "keep_start")
T = TypeVar("T")


@dataclass(frozen=True)
class PromptedText:
    """A rendered prompt (the chat template applied) and a completion (may be empty)."""

    prompt: str
    completion: str = ""
    where: str = ""  # "FILE line N", for errors found later (a prompt too long for the model)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    where: str = ""


def json_lines(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` per non-blank line; ``where`` is ``"FILE line N"``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CpmliveError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CpmliveError(f"{path}: is a directory, not a JSONL file") from None
    except UnicodeDecodeError:
        raise CpmliveError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CpmliveError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise CpmliveError(f"{where}: each line must be a JSON object")
        yield where, value


def _text_field(obj: dict[str, Any], name: str, where: str) -> str:
    if name not in obj:
        raise CpmliveError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise CpmliveError(f"{where}: {name!r} must be a string")
    if not value.strip():
        raise CpmliveError(f"{where}: {name!r} is empty")
    return value


def _messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise CpmliveError(f"{where}: {name!r} must be a non-empty list of messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise CpmliveError(f"{where}: {name}[{index}] must be {{\"role\": one of {', '.join(ROLES)}, "
                               "\"content\": a string}")
    return value


def render_prompt(obj: dict[str, Any], where: str, template: ChatTemplate) -> str:
    """The chat-templated prompt of a record, whose ``prompt`` is text or a list of messages."""
    if "prompt" not in obj:
        raise CpmliveError(f"{where}: missing field 'prompt'")
    if isinstance(obj["prompt"], list):
        return template.render(_messages(obj["prompt"], where, "prompt"))
    return template.render([{"role": "user", "content": _text_field(obj, "prompt", where)}])


def _answer(obj: dict[str, Any], name: str, where: str) -> str:
    """A completion given as text or as TRL's one-message list."""
    if isinstance(obj.get(name), list):
        messages = _messages(obj[name], where, name)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise CpmliveError(f"{where}: {name!r} must hold one assistant message")
        obj = {name: messages[0]["content"]}
    return _text_field(obj, name, where)


def _read_all(path: str | Path, what: str, read: Callable[[str, dict[str, Any]], Iterable[T]]) -> list[T]:
    """What ``read(where, record)`` makes of every record of ``path``, in file order; a file that
    makes nothing is refused as having no ``what``."""
    found = [item for where, obj in json_lines(path) for item in read(where, obj)]
    if not found:
        raise CpmliveError(f"{path}: no {what}")
    return found


def sft_examples(path: str | Path, template: ChatTemplate) -> list[PromptedText]:
    def examples(where: str, obj: dict[str, Any]) -> list[PromptedText]:
        if "messages" in obj:
            messages = _messages(obj["messages"], where, "messages")
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if not turns:
                raise CpmliveError(f"{where}: 'messages' has no assistant message to learn")
            learned = []
            for turn in turns:
                if not messages[turn]["content"].strip():
                    raise CpmliveError(f"{where}: messages[{turn}] (assistant) is empty")
                if turn == 0:
                    raise CpmliveError(f"{where}: the conversation opens with the assistant; nothing prompts it")
                learned.append(PromptedText(template.render(messages[:turn]), messages[turn]["content"], where))
            return learned
        if "completion" in obj or "prompt" in obj:
            return [PromptedText(render_prompt(obj, where, template), _answer(obj, "completion", where), where)]
        raise CpmliveError(f"{where}: an SFT record needs 'prompt' and 'completion', or 'messages'")

    return _read_all(path, "examples", examples)


def preference_pairs(path: str | Path, template: ChatTemplate) -> list[PreferencePair]:
    def pair(where: str, obj: dict[str, Any]) -> list[PreferencePair]:
        prompt = render_prompt(obj, where, template)
        chosen, rejected = _answer(obj, "chosen", where), _answer(obj, "rejected", where)
        if chosen.strip() == rejected.strip():
            raise CpmliveError(f"{where}: 'chosen' and 'rejected' are the same text; the pair teaches nothing")
        return [PreferencePair(prompt, chosen, rejected, where)]

    return _read_all(path, "pairs", pair)


def prompts(path: str | Path, template: ChatTemplate) -> list[PromptedText]:
    """Rollout prompts, with the reference answer when the record has one."""
    def prompt(where: str, obj: dict[str, Any]) -> list[PromptedText]:
        reference = ""
        for name in ("completion", "chosen"):
            if name in obj:
                reference = _answer(obj, name, where)
                break
        return [PromptedText(render_prompt(obj, where, template), reference, where)]

    return _read_all(path, "prompts", prompt)


def truncate_prompt(ids: list[int], max_length: int, mode: str = "keep_end") -> list[int]:
    """The prompt truncation of TRL before 1.0 (``max_prompt_length`` with ``truncation_mode``;
    TRL 1.16 cuts only whole sequences, with ``max_length``): a prompt longer
    than ``max_length`` keeps its last (``keep_end``, where a chat prompt opens the answer's turn)
    or its first ``max_length`` ids."""
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    if len(ids) <= max_length:
        return ids
    if mode == "keep_end":
        return ids[-max_length:]
    if mode == "keep_start":
        return ids[:max_length]
    raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}")


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def starts_with_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a start token before a text (CPM-Ant's ``<s>``, Llama's; not Qwen's)."""
    return getattr(tokenizer, "adds_bos", True)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """A text's ids as the model reads them, without the start token the tokenizer puts first (a
    tokenizer without one, Qwen's, keeps every id: the end-of-turn tokens inside a chat too)."""
    ids = tokenizer.encode_for_model(text)
    return ids[1:] if starts_with_bos(tokenizer) and ids[:1] == [tokenizer.bos_id] else ids


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A prompt's ids: the start token where the tokenizer has one, then the text's (once: a chat
    template that writes the start token itself, Llama's, is not given a second one)."""
    ids = text_ids(tokenizer, text)
    return [tokenizer.bos_id, *ids] if starts_with_bos(tokenizer) and ids[:1] != [tokenizer.bos_id] else ids


__all__ = ["PreferencePair", "PromptedText", "TRUNCATION_MODES", "json_lines", "preference_pairs", "prompt_ids",
           "prompts", "render_prompt", "sft_examples", "starts_with_bos", "text_ids", "truncate_prompt", "write_jsonl"]
