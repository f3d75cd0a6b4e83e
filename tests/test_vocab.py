"""build_vocab / read_corpus_texts / save_vocab."""

import json
from collections import Counter

import pytest

from cpmlive.errors import CpmliveError
from cpmlive.data.corpora import read_corpus_texts
from cpmlive.tokenizer import AntTokenizer, build_vocab, save_vocab
from cpmlive.tokenizer.vocab import SPECIAL_TOKENS

CORPUS = [
    "春天来了，公园里的花都开了。孩子们在草地上奔跑，老人们坐在长椅上聊天。",
    "我们学校的图书馆很大，里面有很多中文书和英文书。每天下午，同学们都去图书馆看书。",
    "今天天气很好，我和朋友一起去公园散步。公园里人很多，大家都很开心。",
    "中国的首都是北京。北京有很多名胜古迹，比如故宫、长城和天坛。",
    "学习一门新的语言需要时间和耐心。每天练习一点，慢慢就会进步。",
    "他说：“明天我们一起去图书馆学习吧！” 我回答：“好的，明天见。”",
    "计算机科学是一门研究计算和信息处理的学科。人工智能是计算机科学的一个重要方向。",
    "晚上，妈妈做了很多好吃的菜。我们一家人坐在一起吃饭，聊着今天发生的事情。",
    "Python 3 和 PyTorch 2 是很多研究者每天使用的工具。",
]


CHAR_COUNTS = Counter(ch for text in CORPUS for ch in text if not ch.isspace())
MOST_FREQUENT_CHAR = min(CHAR_COUNTS, key=lambda ch: (-CHAR_COUNTS[ch], ch))


@pytest.fixture(scope="module")
def vocab() -> list[str]:
    return build_vocab(CORPUS, size=600)


def test_specials_first_in_cpm_ant_order(vocab: list[str]) -> None:
    assert tuple(vocab[:10]) == SPECIAL_TOKENS
    assert vocab[:10] == ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>"]


def test_every_non_space_character_present(vocab: list[str]) -> None:
    chars = {ch for text in CORPUS for ch in text if not ch.isspace()}
    assert chars <= set(vocab)
    assert not [t for t in vocab if any(ch.isspace() for ch in t)]
    assert len(set(vocab)) == len(vocab)


def test_characters_ordered_by_frequency(vocab: list[str]) -> None:
    chars = vocab[10 : 10 + len(CHAR_COUNTS)]
    assert set(chars) == set(CHAR_COUNTS)
    assert chars == sorted(chars, key=lambda ch: (-CHAR_COUNTS[ch], ch))
    assert chars[:3] == ["。", "天", "，"]  # 天 and ， tie at 11: string order


def test_size_respected() -> None:
    for size in (16, 100, 156, 200):
        assert len(build_vocab(CORPUS, size=size)) == size
    assert len(build_vocab(CORPUS, size=100000)) < 100000


def test_too_small_size_keeps_most_frequent_chars() -> None:
    small = build_vocab(CORPUS, size=20)
    assert len(small) == 20
    ranked = sorted(CHAR_COUNTS, key=lambda ch: (-CHAR_COUNTS[ch], ch))
    assert small[10:] == ranked[:10]
    assert small[10] == MOST_FREQUENT_CHAR


def test_size_below_minimum_raises() -> None:
    with pytest.raises(CpmliveError, match="15"):
        build_vocab(CORPUS, size=15)


def test_min_char_count_drops_rare_chars() -> None:
    filtered = build_vocab(CORPUS, size=600, min_char_count=2)
    assert "坛" not in filtered
    assert "，" in filtered


def test_deterministic(vocab: list[str]) -> None:
    assert build_vocab(iter(CORPUS), size=600) == vocab
    assert build_vocab(list(reversed(CORPUS)), size=600) == vocab


def test_frequent_words_are_single_tokens(vocab: list[str]) -> None:
    tok = AntTokenizer(vocab)
    for word in ("图书馆", "公园", "明天", "每天"):
        assert word in vocab
        assert tok.tokenize(word) == [word]
    assert not [t for t in vocab[10:] if len(t) > 1 and not t.isalnum()]


@pytest.mark.parametrize("hf_compat", [False, True])
def test_round_trip(vocab: list[str], hf_compat: bool) -> None:
    tok = AntTokenizer(vocab, hf_compat=hf_compat)
    text = "今天  我们去图书馆学习。\n明天一起去公园散步吧！\n\n北京 天气很好 "
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert tok.space_id == 5 and tok.newline_id == 4 and tok.bos_id == 6


def test_save_and_reload(vocab: list[str], tmp_path) -> None:
    path = tmp_path / "vocab.txt"
    save_vocab(vocab, path)
    assert path.read_text(encoding="utf-8").split("\n")[:-1] == vocab
    loaded = AntTokenizer.from_file(path)
    assert loaded.encode("春天来了 公园") == AntTokenizer(vocab).encode("春天来了 公园")


def test_read_corpus_texts(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("第一行\n\n第二行\r\n", encoding="utf-8")
    records = [{"text": "甲"}, {"text": "乙", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    assert (list(read_corpus_texts([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]))
            == ["第一行", "第二行", "甲", "乙"])
    assert list(read_corpus_texts([str(tmp_path)])) == ["第一行", "第二行", "甲", "乙"]


def test_read_corpus_missing_file(tmp_path) -> None:
    with pytest.raises(CpmliveError, match="missing.txt"):
        read_corpus_texts([str(tmp_path / "missing.txt")])


def test_read_corpus_empty_directory(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CpmliveError, match="no files"):
        read_corpus_texts([str(tmp_path / "empty")])


def test_read_corpus_non_utf8_names_line(tmp_path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes("好\n".encode() + "坏".encode("gbk") + b"\n")
    with pytest.raises(CpmliveError, match=r"bad\.txt: line 2"):
        list(read_corpus_texts([str(path)]))


def test_read_corpus_bad_jsonl(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "好"}\n{"title": "x"}\n', encoding="utf-8")
    with pytest.raises(CpmliveError, match="line 2"):
        list(read_corpus_texts([str(path)]))
