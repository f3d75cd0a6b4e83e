"""Train a small HF tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) on texts, in two styles:

* ``byte-level``: Qwen2's. NFC, Qwen2's splitting regex, byte-level BPE (every byte a token, no
  unknown token); ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` after the merges; no BOS;
  EOS ``<|im_end|>`` and padding ``<|endoftext|>`` as Qwen2-Instruct has them; its ChatML template.
* ``sentencepiece``: Llama-2's (and MiniCPM's), as transformers 5 writes it. No normalizer;
  Metaspace (``▁`` for spaces, one before the text) without splitting; BPE with byte fallback over
  ``<unk>``, ``<s>``, ``</s>`` and the 256 byte tokens ``<0x00>``..``<0xFF>`` (ids 0-258); ``<s>``
  added in front of every text; Llama-2-chat's template. Pieces are learned within words, digits
  one by one (as SentencePiece with ``split_digits``), from the characters that cover 99.95% of the
  text; the rarest characters are left to the byte tokens.

* ``t5``: T5's. Metaspace (``▁`` before every word), a Unigram model over ``<pad>``, ``</s>``,
  ``<unk>`` (ids 0-2) and the learned pieces, then :data:`T5_SENTINELS` ``<extra_id_N>`` sentinels
  at the top, ``<extra_id_0>`` last (as T5's ``spiece.model`` has them); ``</s>`` after every text.

The BPE styles use ``tokenizers``' BPE trainer, whose result depends on nothing but the texts: the
same texts give the same files, byte for byte (the Unigram trainer's too, on one thread).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write_text

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
SPACE_MARK = "\u2581"
T5_TOKENS = ("<pad>", "</s>", "<unk>")
T5_SENTINELS = 32
CHARACTER_COVERAGE = 0.9995
STYLES = ("byte-level", "sentencepiece", "t5", "wordpiece")
BERT_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _token_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _trained_pieces(tokenizer: Any, trainer: Any, texts: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges BPE learns on ``texts`` through ``tokenizer``'s pre-tokenizer."""
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    return model["vocab"], merges


def _byte_level(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    def pipeline(model: Any) -> Any:
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        return tokenizer

    trainer = BpeTrainer(vocab_size=vocab_size - len(CHATML_TOKENS), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = _trained_pieces(pipeline(models.BPE()), trainer, texts)
    tokenizer = pipeline(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                    fuse_unk=False, byte_fallback=False))
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CHATML_TOKENS])
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(tokenizer.token_to_id(token)): _token_entry(token) for token in CHATML_TOKENS},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return tokenizer, config


def _alphabet(texts: list[str], size_limit: int) -> list[str]:
    """The characters BPE starts from: the most frequent (ties by code point), up to those covering
    :data:`CHARACTER_COVERAGE` of the text (spaces as ``▁``, one before each text) or ``size_limit``."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    counts[SPACE_MARK] += counts.pop(" ", 0) + len(texts)
    total = sum(counts.values())
    kept, covered = [], 0
    for char, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if covered >= CHARACTER_COVERAGE * total or len(kept) >= size_limit:
            break
        kept.append(char)
        covered += count
    return sorted(set(kept) | {SPACE_MARK})


def _sentencepiece(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    reserved = len(LLAMA_TOKENS) + len(BYTE_TOKENS)
    alphabet = _alphabet(texts, max(1, (vocab_size - reserved) // 2))
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True)])
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[*LLAMA_TOKENS, *BYTE_TOKENS],
                         initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    vocab, merges = _trained_pieces(learner, trainer, texts)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                             special_tokens=[("<s>", vocab["<s>"])])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLAMA_TOKENS])
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(vocab[token]): _token_entry(token) for token in LLAMA_TOKENS},
        "bos_token": "<s>",
        "chat_template": LLAMA2_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "pad_token": None,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    return tokenizer, config


def _t5(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer

    sentinels = [f"<extra_id_{i}>" for i in reversed(range(T5_SENTINELS))]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="always")
    trainer = UnigramTrainer(vocab_size=vocab_size - T5_SENTINELS, special_tokens=list(T5_TOKENS),
                             unk_token="<unk>", show_progress=False, max_piece_length=8)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE_MARK, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in sentinels])
    config = {
        "added_tokens_decoder": {str(tokenizer.token_to_id(token)): _token_entry(token)
                                 for token in (*T5_TOKENS, *sentinels)},
        "additional_special_tokens": sentinels[::-1],
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "extra_ids": T5_SENTINELS,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    return tokenizer, config


def _wordpiece(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    """BERT's (bert-base-chinese's pipeline): lower-cased, accents kept, every CJK character a word,
    WordPiece with ``##`` continuations; ``[CLS] text [SEP]``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=False, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(BERT_TOKENS), show_progress=False,
                               continuing_subword_prefix="##")
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    # WordPiece's decoder puts a space before every word; none before CJK characters and punctuation,
    # so that Chinese text decodes as it was written (BERT's own decode spaces them out).
    cjk = Regex("^ (?=[\u2e80-\u9fff\u3000-\u303f\uff00-\uffef])")
    tokenizer.decoder = decoders.Sequence([decoders.WordPiece(prefix="##"), decoders.Replace(cjk, "")])
    config = {
        "added_tokens_decoder": {str(tokenizer.token_to_id(token)): _token_entry(token) for token in BERT_TOKENS},
        "clean_up_tokenization_spaces": True, "cls_token": "[CLS]", "do_lower_case": True, "mask_token": "[MASK]",
        "pad_token": "[PAD]", "sep_token": "[SEP]", "strip_accents": None, "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]",
    }
    return tokenizer, config


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, style: str = "byte-level",
                    model_max_length: int | None = None) -> Path:
    """Train a ``style`` tokenizer of at most ``vocab_size`` tokens (fewer where the texts run out
    of pairs to merge) on ``texts`` and write it to ``out_dir``; returns its ``tokenizer.json``."""
    if style not in STYLES:
        raise CpmliveError(f"unknown tokenizer style {style!r} (choose {' or '.join(STYLES)})")
    smallest = {"byte-level": 256 + len(CHATML_TOKENS) + 1, "sentencepiece": 256 + len(LLAMA_TOKENS) + 1,
                "t5": len(T5_TOKENS) + T5_SENTINELS + 64, "wordpiece": len(BERT_TOKENS) + 64}[style]
    if vocab_size < smallest:
        raise CpmliveError(f"a {style} tokenizer needs a vocabulary of at least {smallest} tokens, not {vocab_size}")
    texts = [text for text in texts if text]
    if not texts:
        raise CpmliveError("no text to train the tokenizer on")
    builders = {"byte-level": _byte_level, "sentencepiece": _sentencepiece, "t5": _t5, "wordpiece": _wordpiece}
    tokenizer, config = builders[style](texts, vocab_size)
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out_dir / "tokenizer.json"


__all__ = ["STYLES", "train_tokenizer"]
