"""Plain text and conversations as CPM-Bee tasks, for the OpenAI routes, ``generate`` and ``chat``.

CPM-Bee answers JSON tasks only. A completion prompt becomes the text-generation task
``{"input": prompt, "<ans>": ""}`` (the field is configurable); a conversation becomes the
dialogue form of the release's fine-tuning tutorial (``tutorials/basic_task_finetune`` in
OpenBMB/CPM-Bee): the turns in one ``input`` string, ``用户： `` and ``AI： `` before each, joined
by ``\\n<sep>``, ending with the ``AI：`` the answer continues::

    {"input": "用户： 你好\\n<sep>AI： 你好！\\n<sep>用户： 我在北京。\\n<sep>AI：", "<ans>": ""}

User text is text, not markup: a ``<`` is escaped (``<<``) unless it opens one of the separators
CPM-Bee's text may hold (``<sep>``, ``</n>``, ``</_>``, ``<mask>``, ``<mask_N>``, ``<option_N>``)
or is already escaped (``<<``); the markup that builds the task itself (``<ans>``, ``<root>``,
``<s>``, ``</s>``...) is refused, since it would be read as structure.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from cpmlive.errors import CpmliveError

TEXT_FIELD = "input"
USER_PREFIX = "用户： "
ASSISTANT_PREFIX = "AI："
TURN_SEPARATOR = "\n<sep>"
KEPT_MARKUP = re.compile(r"<(?:sep|/n|/_|mask|mask_\d+|option_\d+)>")
STRUCTURE = re.compile(r"<(?:ans(?:_\d+)?|root|s|/s|pad|unk|option)>")


def prompt_markup(text: str, where: str = "prompt") -> str:
    """``text`` as CPM-Bee reads it literally (see the module docstring); ``<<`` stays the
    escaped ``<`` it already is."""
    if not isinstance(text, str) or not text.strip():
        raise CpmliveError(f"{where}: empty text")
    out, at = [], 0
    while (found := text.find("<", at)) >= 0:
        out.append(text[at:found])
        if text.startswith("<<", found):
            out.append("<<")
            at = found + 2
        elif (kept := KEPT_MARKUP.match(text, found)) is not None:
            out.append(kept.group())
            at = kept.end()
        elif (markup := STRUCTURE.match(text, found)) is not None:
            raise CpmliveError(f"{where}: {markup.group()} is CPM-Bee task markup, not text (write <{markup.group()} "
                               f"to mean the characters)")
        else:
            out.append("<<")
            at = found + 1
    return "".join(out) + text[at:]


def check_text_field(field: str) -> str:
    """A task key a completion prompt may go in: text, not ``<ans>``."""
    if not isinstance(field, str) or not field.strip() or field == "<ans>" or "<" in field:
        raise CpmliveError(f"the prompt field must be a plain task key (like input or document), got {field!r}")
    return field


def text_task(text: str, field: str = TEXT_FIELD) -> dict[str, str]:
    """The text-generation task of a completion prompt."""
    return {check_text_field(field): prompt_markup(text), "<ans>": ""}


class BeeDialogue:
    """The chat "template" of a CPM-Bee model: it renders a conversation as its dialogue task
    (user and assistant turns only; the last one the user's), and stops at nothing of its own
    (the answer ends with its ``</s>``)."""

    stop: tuple[str, ...] = ()
    roles = {"user": USER_PREFIX, "assistant": ASSISTANT_PREFIX + " "}

    def render(self, messages: Sequence[dict[str, Any]]) -> dict[str, str]:
        if not messages:
            raise CpmliveError("messages: empty conversation")
        turns = []
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in self.roles:
                raise CpmliveError(f"messages.{index}.role: CPM-Bee's dialogue has user and assistant turns only, "
                                   f"not {role!r}")
            if not isinstance(content, str):
                raise CpmliveError(f"messages.{index}.content: must be text")
            turns.append(self.roles[role] + prompt_markup(content, f"messages.{index}.content"))
        if messages[-1]["role"] != "user":
            raise CpmliveError("messages: the last turn must be the user's (the model answers it)")
        return {TEXT_FIELD: TURN_SEPARATOR.join([*turns, ASSISTANT_PREFIX]), "<ans>": ""}


__all__ = ["BeeDialogue", "check_text_field", "prompt_markup", "text_task"]
