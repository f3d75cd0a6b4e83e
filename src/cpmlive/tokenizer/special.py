"""The special-token ids of a tokenizer that looks its tokens up in a vocabulary (CPM-Ant's, CPM-Bee's)."""

from __future__ import annotations

from typing import Any


def token_id_property(token: str) -> property:
    """A read-only property: the id of ``token`` by the tokenizer's ``token_to_id`` (None where the
    vocabulary lacks it; the tokens a tokenizer requires, such as ``<pad>``, always have one)."""

    def token_id(self: Any) -> int | None:
        return self.token_to_id(token)

    return property(token_id, doc=f"The id of {token!r} (None where the vocabulary lacks it).")


class SpecialIds:
    """The ids of the special tokens CPM-Ant's and CPM-Bee's vocabularies share; both require
    ``<pad>``, ``<unk>``, ``<s>`` and ``</s>``."""

    pad_id = token_id_property("<pad>")
    unk_id = token_id_property("<unk>")
    bos_id = token_id_property("<s>")
    eos_id = token_id_property("</s>")
    mask_id = token_id_property("<mask>")

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError


__all__ = ["SpecialIds", "token_id_property"]
