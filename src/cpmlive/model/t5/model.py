"""The T5 family's model: the shared encoder-decoder stack (``model/encoder_decoder.py``) as HF's
``T5ForConditionalGeneration``, ``MT5ForConditionalGeneration`` and ``UMT5ForConditionalGeneration``
compute it; the config's fields (FFN kind, shared or per-block position bias, head) say which."""

from __future__ import annotations

import torch

from cpmlive.model.encoder_decoder import EncoderDecoder
from cpmlive.model.stack import build
from cpmlive.model.t5.config import T5Config


class T5(EncoderDecoder):
    config: T5Config

    @staticmethod
    def sentinel_text(index: int) -> str:
        """The token that marks span ``index`` (span corruption: the input's blanks, the output's spans)."""
        return f"<extra_id_{index}>"


def build_t5(config: T5Config, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             seed: int | None = 0) -> T5:
    return build(T5, config, device, dtype, seed)


__all__ = ["T5", "build_t5"]
