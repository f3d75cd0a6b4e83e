"""Chat templates: how a conversation becomes one CPM-Ant prompt, stored with a model or an
adapter as ``chat_template.json``.

A template names the text around each message by role and what opens the assistant's turn;
generation stops at the text that opens the next user turn. CPM-Ant was never trained on chats,
so only a model or adapter tuned with a template has one; ``/v1/chat/completions`` and
``cpmlive chat`` refuse the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write_text, dataclass_from_dict

CHAT_TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass
class ChatTemplate:
    system: str = "{content}\n"
    user: str = "用户：{content}\n"
    assistant: str = "助手：{content}\n"
    generation_prompt: str = "助手："
    stop: list[str] = field(default_factory=lambda: ["\n用户："])

    def __post_init__(self) -> None:
        for role in ROLES:
            if "{content}" not in getattr(self, role):
                raise CpmliveError(f"chat template: {role} must contain {{content}}")

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (``{"role", "content"}`` each), opening the assistant's turn."""
        if not messages:
            raise CpmliveError("messages: at least one message is needed")
        parts = []
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise CpmliveError(f"messages.{index}.role: must be one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise CpmliveError(f"messages.{index}.content: must be a string")
            parts.append(getattr(self, role).replace("{content}", content))
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_text(Path(directory) / CHAT_TEMPLATE_FILE,
                          json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ChatTemplate | None":
        """The template stored in ``directory``, or ``None`` when there is none."""
        path = Path(directory) / CHAT_TEMPLATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CpmliveError(f"{path}: not valid JSON ({exc})") from None
        return dataclass_from_dict(cls, data, str(path), f"{path}: a chat template must be a JSON object")


# The text an end-of-turn probe gives the assistant: what the template writes after it closes the turn.
TURN_PROBE = "cpmlive-turn-probe"


class TokenizerChatTemplate:
    """A tokenizer's own chat template (an HF model's Jinja template, rendered by
    ``tokenizer.apply_chat_template``), used where a :class:`ChatTemplate` is: ``render`` and
    ``stop`` (no stop strings), plus ``stop_ids``, the token that closes the assistant's turn.

    The rendered text holds the template's special tokens (Llama's ``<s>``): it is encoded with
    none added (``writes_special_tokens``), as HF's ``apply_chat_template(tokenize=True)`` does."""

    writes_special_tokens = True

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.stop: list[str] = []
        self.stop_ids = self._turn_end_ids()

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``, as HF's ``apply_chat_template(..., tokenize=False)`` renders it."""
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)

    def _turn_end_ids(self) -> frozenset[int]:
        """The special token the template writes right after an assistant's message (ChatML's
        ``<|im_end|>``, Llama-2's ``</s>``, Llama-3's ``<|eot_id|>``); none where it writes none
        (GLM-4 opens the next turn instead: its generation_config lists those tokens)."""
        probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": TURN_PROBE}]
        try:
            text = self.render(probe, add_generation_prompt=False)
        except CpmliveError:  # a template that renders no such conversation
            return frozenset()
        _, found, after = text.partition(TURN_PROBE)
        decode = self.tokenizer.decode
        for token in self.tokenizer.encode(after) if found else []:
            if decode([token]) and not decode([token], skip_special_tokens=True):  # a special token
                return frozenset((token,))
        return frozenset()


__all__ = ["CHAT_TEMPLATE_FILE", "ChatTemplate", "TokenizerChatTemplate"]
