"""CPM-Ant tokenizer and vocabulary builder."""

from cpmlive.tokenizer.ant import AntTokenizer
from cpmlive.tokenizer.vocab import build_vocab, read_corpus_texts, save_vocab

__all__ = ["AntTokenizer", "build_vocab", "read_corpus_texts", "save_vocab"]
