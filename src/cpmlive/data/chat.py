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


__all__ = ["CHAT_TEMPLATE_FILE", "ChatTemplate"]
