"""Language-model loss of a text, reported per character (comparable across vocabularies).

Every line of the file is a document, read left to right under the generation objective
(prompt task 2; only ``<s>`` is context, every later token is predicted from the tokens before
it). Documents longer than the model's window are cut into windows that each restart at ``<s>``.
An encoder-decoder's decoder writes each window from its start token, its encoder reading an
empty text (T5's ``</s>``, CPM-2's ``<s_0>``: the whole window is the one span it writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cpmlive.data.layout import GENERATION
from cpmlive.infer.generate import build_batch
from cpmlive.model.scoring import Pair, continuation_scores
from cpmlive.model.stack import Transformer


@dataclass
class TextScore:
    nats: float
    chars: int
    tokens: int
    documents: int
    unk_dropped: int

    @property
    def bits_per_char(self) -> float:
        return self.nats / math.log(2) / max(self.chars, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / max(self.tokens, 1))

    def to_dict(self) -> dict:
        return {"bits_per_char": round(self.bits_per_char, 4), "perplexity": round(self.perplexity, 3),
                "chars": self.chars, "tokens": self.tokens, "documents": self.documents,
                "unk_dropped": self.unk_dropped}


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@torch.inference_mode()
def score_spans(model: Transformer, rows: list[list[int]], empty: list[int]) -> float:
    """An encoder-decoder's total negative log-likelihood (nats) of ``rows``, each written by the
    decoder from its start token while the encoder reads ``empty``."""
    device = model.input_embedding.weight.device
    width = max(map(len, rows))
    start = model.prompt_tail()
    decoder = torch.tensor([start + r + [0] * (width - len(r)) for r in rows], device=device)
    valid = torch.tensor([[True] * (len(r) + 1) + [False] * (width - len(r)) for r in rows], device=device)
    encoder = torch.tensor([empty] * len(rows), device=device)
    hidden = model.seq2seq(encoder, decoder[:, :-1], decoder_valid=valid[:, :-1])
    nats = 0.0
    for i, row in enumerate(rows):
        logprobs = model.logits(hidden[i, :len(row)]).float().log_softmax(-1)
        nats -= logprobs.gather(1, decoder[i, 1:len(row) + 1, None]).sum().item()
    return nats


@torch.inference_mode()
def score_rows(model: Transformer, rows: list[list[int]], bos_id: int) -> float:
    """Total negative log-likelihood (nats) of every token after ``<s>`` in ``rows``."""
    prompt = model.config.prompt_length
    batch = build_batch([[bos_id] + r for r in rows], GENERATION, prompt, model.input_embedding.weight.device,
                        [[True] + [False] * len(r) for r in rows])
    hidden = model(**batch.as_inputs())
    total = batch.input_ids.size(1)
    nats = 0.0
    for i, row in enumerate(rows):
        start = total - len(row) - 1
        logprobs = model.logits(hidden[i, start:total - 1]).float().log_softmax(-1)
        targets = batch.input_ids[i, start + 1:total]
        nats -= logprobs.gather(1, targets[:, None]).sum().item()
    return nats


@torch.inference_mode()
def continuation_logprobs(model: Transformer, pairs: list[Pair], eos_id: int | None = None) -> list[tuple[float, bool]]:
    """``log P(continuation | context)`` of each pair, and whether greedy decoding writes the
    continuation, in one batch without gradients (see :mod:`cpmlive.model.scoring`)."""
    scores, greedy = continuation_scores(model, pairs, eos_id)
    return list(zip(scores.tolist(), greedy.tolist()))


def score_texts(model: Transformer, tokenizer, texts: list[str], batch_size: int = 8,
                progress: bool = False) -> TextScore:
    window = model.config.max_length - model.config.prompt_length - 1
    rows: list[list[int]] = []
    chars = unk = documents = 0
    for text in texts:
        text = text.strip()
        if not text:
            continue
        raw = tokenizer.encode(text)
        ids = [i for i in raw if i != tokenizer.unk_id]
        unk += len(raw) - len(ids)
        chars += len(text)
        documents += 1
        rows.extend(windows(ids, window))
    rows.sort(key=len)
    nats = 0.0
    batches = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch")
    spans = hasattr(model, "seq2seq")
    for start in batches:
        part = rows[start:start + batch_size]
        nats += (score_spans(model, part, tokenizer.encode_for_model("")) if spans
                 else score_rows(model, part, tokenizer.bos_id))
    return TextScore(nats, chars, sum(map(len, rows)), documents, unk)


__all__ = ["TextScore", "score_texts"]
