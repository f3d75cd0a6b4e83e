"""EVA's dialogue form, as its code builds a context (``eva_datasets.py``, ``eva_interactive.py`` of
thu-coai/EVA): the utterances one after another, each followed by ``<sep>``; the tokenizer ends the
encoder's row with ``<s_0>``, the decoder starts from ``<s_0>`` and the reply ends at ``<sep>``.
There are no speaker tokens: turns alternate, the user's first and last."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cpmlive.errors import CpmliveError

SEPARATOR = "<sep>"
MARKUP = re.compile(r"<sep>|<eod>|<s_\d+>")
ROLES = ("user", "assistant")


class EvaDialogue:
    """A chat template (``render``, ``stop``, ``stop_ids``) for a dialogue model of the CPM-2 family.

    ``writes_special_tokens`` is false: the rendered text is encoded as a prompt, which ends it
    with ``<s_0>`` and the decoder's start."""

    writes_special_tokens = False

    def __init__(self, separator_id: int) -> None:
        self.stop: list[str] = []
        self.stop_ids = frozenset((separator_id,))

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """``u1<sep>a1<sep>u2<sep>``: every turn checked (the user's first and last, alternating,
        none empty, none holding the dialogue's markup)."""
        if not messages:
            raise CpmliveError("messages: at least one message is needed")
        parts = []
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise CpmliveError(f"messages.{index}.role: EVA's dialogue has only user and assistant turns, "
                                   f"not {role!r}")
            if role != ROLES[index % 2]:
                raise CpmliveError(f"messages.{index}.role: turns alternate, the user's first "
                                   f"(expected {ROLES[index % 2]}, got {role})")
            if not isinstance(content, str) or not content.strip():
                raise CpmliveError(f"messages.{index}.content: an empty turn (EVA's dialogue needs text in every turn)")
            if MARKUP.search(content):
                raise CpmliveError(f"messages.{index}.content: holds {MARKUP.search(content).group()}, "
                                   "the dialogue's own markup")
            parts.append(content + SEPARATOR)
        if add_generation_prompt and messages[-1]["role"] != "user":
            raise CpmliveError("messages: the last turn must be the user's (the model answers it)")
        return "".join(parts)


__all__ = ["EvaDialogue"]
