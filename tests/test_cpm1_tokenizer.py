"""CPM-1's tokenizer against CPM-Generate's recipe (``data_utils/tokenization_gpt2.py``, written
out here from the published code) and HF's ``CpmTokenizerFast`` / ``CpmTokenizer``, on a
SentencePiece model trained in the test on local text."""

from __future__ import annotations

import jieba
import pytest
import sentencepiece

from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer

from cpm1_helpers import SAMPLES, review_lines, train_spm

TEXTS = SAMPLES + review_lines(40)[::4] + ["中 英 mixed text\twith tab", "末尾换行\n"]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm") / "spiece.model")


@pytest.fixture(scope="module")
def tokenizer(spiece):
    return Cpm1Tokenizer(spiece)


class OriginalRecipe:
    """CPM-Generate's ``GPT2Tokenizer.encode`` / ``decode``, line for line."""

    def __init__(self, model_file):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.translator = str.maketrans(" \n", "\u2582\u2583")

    def encode(self, text):
        seg_list = [x.translate(self.translator) for x in jieba.cut(text, cut_all=False)]
        return self.sp.encode(" ".join(seg_list))

    def decode(self, tokens):
        text = self.sp.decode(tokens)
        return text.replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")


@pytest.fixture(scope="module")
def hf_fast(spiece):
    import transformers
    from transformers.convert_slow_tokenizer import XLNetConverter

    transformers.logging.set_verbosity_error()
    slow = transformers.CpmTokenizer(str(spiece))
    # HF publishes no converter for CpmTokenizer; CPM's fast tokenizer is XLNet's SentencePiece pipeline.
    return transformers.CpmTokenizerFast(tokenizer_object=XLNetConverter(slow).converted(), vocab_file=str(spiece))


def test_ids_and_text_equal_the_original_recipe(tokenizer, spiece):
    original = OriginalRecipe(spiece)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == original.encode(text), text
        assert tokenizer.decode(ids) == original.decode(ids)


def test_special_pieces_sit_where_cpm_generate_has_them(tokenizer):
    assert [tokenizer.id_to_token(i) for i in range(8)] == ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>",
                                                            "<mask>", "<eod>"]
    assert tokenizer.eos_id == tokenizer.eod_id == 7 and tokenizer.pad_id == 5
    assert tokenizer.adds_bos is False


def test_per_token_decoding_concatenates_to_the_whole(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert "".join(tokenizer.decode([i]) for i in ids) == tokenizer.decode(ids)


def test_hf_fast_tokenizer_after_its_jieba_step_equals_ours(tokenizer, hf_fast):
    """CpmTokenizerFast's own pre-tokenization (``_batch_encode_plus``: rjieba without HMM, the
    same mapping, words joined by spaces), then its SentencePiece pipeline."""
    compared = 0
    for text in TEXTS:
        words = list(hf_fast.jieba.cut(text, False))
        if words != list(jieba.cut(text, cut_all=False)):
            continue  # rjieba without HMM segments some unseen words otherwise
        compared += 1
        segmented = " ".join(w.translate(hf_fast.translator) for w in words)
        ids = hf_fast(segmented, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer.encode(text), text
        assert hf_fast.decode(ids) == tokenizer.decode(ids)
    assert compared >= len(TEXTS) // 2


def test_hf_tokenizers_skip_jieba_on_raw_text_in_transformers_5(tokenizer, spiece, hf_fast):
    """Recorded divergence: transformers 5.x ``CpmTokenizer._tokenize`` never calls jieba (nor
    maps spaces), and ``CpmTokenizerFast``'s jieba step sits in ``_batch_encode_plus``, which
    the 5.x base class no longer calls; both encode raw text as plain SentencePiece does, and
    their ``X <sep> <cls>`` special tokens add ids past a 30,000-row embedding."""
    import transformers

    slow = transformers.CpmTokenizer(str(spiece))
    text = "今天 天气不错，\n我们去公园玩。"
    plain = sentencepiece.SentencePieceProcessor(model_file=str(spiece)).encode(text)
    assert slow.encode(text, add_special_tokens=False) == plain
    assert hf_fast(text, add_special_tokens=False)["input_ids"] == plain
    assert plain != tokenizer.encode(text)
    assert slow.encode(text)[-2:] == [slow.sep_token_id, slow.cls_token_id]
    assert slow.cls_token_id >= tokenizer.vocab_size


def test_a_model_without_eod_or_not_sentencepiece_is_refused(tmp_path, ant_vocab_path):
    from cpmlive.errors import CpmliveError

    with pytest.raises(CpmliveError, match="not a SentencePiece model"):
        Cpm1Tokenizer(ant_vocab_path)
    import io

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(review_lines(200)), model_writer=buffer,
                                             vocab_size=2500, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "plain.model").write_bytes(buffer.getvalue())
    with pytest.raises(CpmliveError, match="no <eod> piece"):
        Cpm1Tokenizer(tmp_path / "plain.model")
