"""Parity of AntTokenizer with the original OpenBMB tokenizer and HF CpmAntTokenizer."""

import json
import random
import subprocess
import sys

import pytest
from conftest import ANT_VOCAB, REFERENCE

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer import AntTokenizer

ENTRIES = json.loads((REFERENCE / "ant-tokenizer.json").read_text(encoding="utf-8"))["entries"]

EXTRA_TEXTS = [
    "",
    "是",
    "今天天气真好！我们一起去公园散步吧。",
    "北京大学和清华大学都在海淀区。",
    "深度学习模型需要大量的数据进行训练",
    "The year 2024 was warm.",
    "supercalifragilisticexpialidocious",
    "0123456789 3.14159 -42 1e10 100%",
    "０１２３４５６７８９ ＡＢＣａｂｃ",
    "全角，标点。符号！？",
    "one  two   three    four",
    " leading space",
    "trailing space ",
    "tab\there\t\tdouble tab",
    "windows\r\nline\r\nend\r\n",
    "old mac\rline",
    "多行\n文本\n\n\n结束\n",
    "emoji 😀😃😄 在中文里🎉结束",
    "中English混合mixed文本text123数字",
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
    "<mask>",
    "<d>",
    "</d>",
    "</n>",
    "</_>",
    "<sep>",
    "<s0><s58>##########",
    "开始<s>中间</s>结束<pad>尾巴",
    "<d>第一篇文档</d><d>第二篇文档</d>",
    "a</_>b</n>c<mask>d",
    "<<s>>",
    "</</s>",
    "<s<s>>",
    "<pad<pad>",
    "<unk></unk>",
    "<S> </S> <PAD>",
    "x" * 201,
    "a" * 200,
    "9" * 250,
    "😀" * 300,
    "测" * 300,
    "\u3000全角空格\u3000",
    "non\u00a0breaking\u2009thin",
    "zero\u200bwidth",
    "Ⅸ㈱№™©®",
    "한국어 텍스트",
    "русский текст",
    "i18n/l10n: naïve café résumé",
]

# cpm-spec.md section 3 test vectors: (text, ids without <s>).
SPEC_ENCODE = [("今天天气真好！", [9802, 14962, 2082, 831, 244]), ("[是否正确]", [70, 20000, 21151, 72])]


@pytest.fixture(scope="module")
def orig() -> AntTokenizer:
    return AntTokenizer.from_file(ANT_VOCAB)


@pytest.fixture(scope="module")
def hf_mode() -> AntTokenizer:
    return AntTokenizer.from_file(ANT_VOCAB, hf_compat=True)


@pytest.fixture(scope="module")
def hf_live():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("rjieba")
    return transformers.CpmAntTokenizer(vocab_file=str(ANT_VOCAB))


def _entry_id(entry: dict) -> str:
    return repr(entry["text"][:20])


@pytest.mark.parametrize("entry", ENTRIES, ids=_entry_id)
def test_openbmb_mode_matches_original(orig: AntTokenizer, entry: dict) -> None:
    text = entry["text"]
    assert orig.tokenize(text) == entry["orig_tokens"]
    assert orig.encode(text) == entry["orig_ids"]
    assert orig.encode_for_model(text) == entry["orig_model_input_ids"]
    assert orig.decode(entry["orig_ids"]) == entry["orig_decoded"]


@pytest.mark.parametrize("entry", ENTRIES, ids=_entry_id)
def test_hf_mode_matches_recorded_hf(hf_mode: AntTokenizer, entry: dict) -> None:
    text = entry["text"]
    assert hf_mode.tokenize(text) == entry["hf_tokens"]
    assert hf_mode.encode(text) == entry["hf_input_ids"]
    assert hf_mode.encode_for_model(text) == entry["hf_input_ids"]
    assert hf_mode.decode(entry["hf_input_ids"]) == entry["hf_decoded"]


def test_fixture_has_forty_entries() -> None:
    assert len(ENTRIES) == 40


@pytest.mark.parametrize("text", EXTRA_TEXTS, ids=lambda t: repr(t[:24]))
def test_hf_mode_matches_live_hf(hf_mode: AntTokenizer, hf_live, text: str) -> None:
    expected = hf_live(text)["input_ids"]
    assert hf_mode.encode(text) == expected
    assert hf_mode.tokenize(text) == hf_live.tokenize(text)
    assert hf_mode.decode(expected) == hf_live.decode(expected)
    assert hf_mode.decode(expected, skip_special_tokens=True) == hf_live.decode(expected, skip_special_tokens=True)


def test_hf_decode_of_every_special_and_odd_id(hf_mode: AntTokenizer, hf_live) -> None:
    ids = [6, 0, 1, 2, 3, 4, 5, 7, 8, 9, 30653, 30711, 30719, -1, 30720, 100000, 245]
    assert hf_mode.decode(ids) == hf_live.decode(ids)
    assert hf_mode.decode(ids, skip_special_tokens=True) == hf_live.decode(ids, skip_special_tokens=True)


def test_extra_texts_cover_enough_cases() -> None:
    assert len(EXTRA_TEXTS) >= 30


@pytest.mark.parametrize(("text", "ids"), SPEC_ENCODE)
def test_spec_vectors(orig: AntTokenizer, hf_mode: AntTokenizer, text: str, ids: list[int]) -> None:
    assert orig.encode(text) == ids
    assert orig.encode_for_model(text) == [6, *ids]
    assert hf_mode.encode(text) == [6, *ids]


def test_spec_single_tokens(orig: AntTokenizer) -> None:
    assert orig.encode("是") == [1729]
    assert orig.encode(" ") == [5]
    assert orig.encode("\n") == [4]
    assert orig.tokenize("今天天气真好！") == ["今天", "天气", "真", "好", "！"]


def test_special_ids(orig: AntTokenizer) -> None:
    assert orig.vocab_size == 30720
    got = (orig.pad_id, orig.unk_id, orig.mask_id, orig.newline_id, orig.space_id, orig.bos_id, orig.eos_id)
    assert got == (0, 1, 2, 4, 5, 6, 7)
    assert (orig.bod_id, orig.eod_id) == (8, 9)
    assert orig.token_to_id(" ") == 5
    assert orig.token_to_id("</_>") is None
    assert orig.token_to_id("不存在的词") is None
    assert orig.id_to_token(4) == "\n"
    assert orig.id_to_token(1729) == "是"


def test_id_to_token_out_of_range(orig: AntTokenizer) -> None:
    for bad in (-1, 30720):
        with pytest.raises(CpmliveError):
            orig.id_to_token(bad)


def test_openbmb_decode(orig: AntTokenizer) -> None:
    assert orig.decode([6, 9802, -100, 7, 1, 0]) == "<s>今天</s><unk><pad>"
    assert orig.decode([6, 9802, 5, 4, 7, 1, 0, 2, 30660], skip_special_tokens=True) == "今天 \n"
    with pytest.raises(CpmliveError):
        orig.decode([30720])


def test_pieces_with_ids(orig: AntTokenizer, hf_mode: AntTokenizer) -> None:
    assert orig.pieces_with_ids("今天 好😀") == [("今天", 9802), (" ", 5), ("好", 831), ("<unk>", 1)]
    assert hf_mode.pieces_with_ids("</n>是") == [("</n>", 1), ("是", 1729)]


def test_long_piece_is_one_unk(orig: AntTokenizer) -> None:
    assert orig.encode("a" * 201) == [1]
    assert len(orig.encode("a" * 200)) > 1


def test_save_round_trip(orig: AntTokenizer, tmp_path) -> None:
    target = tmp_path / "vocab.txt"
    orig.save(target)
    lines = target.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    assert lines[:-1] == ANT_VOCAB.read_text(encoding="utf-8").split("\n")
    again = AntTokenizer.from_file(target)
    assert again.encode("今天 天气\n") == orig.encode("今天 天气\n")
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.txt"]


def test_jieba_startup_is_quiet() -> None:
    code = f"from cpmlive.tokenizer import AntTokenizer; AntTokenizer.from_file({str(ANT_VOCAB)!r}).encode('安静')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def _vocab_file(tmp_path, content: bytes):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    return path


BASIC = "<pad>\n<unk>\n<mask>\n<sep>\n</n>\n</_>\n<s>\n</s>\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (BASIC.encode() + b"\xff\xfe\n", "UTF-8"),
        (BASIC.replace("<unk>\n", "").encode(), "<unk>"),
        (BASIC.replace("</s>\n", "").encode(), "</s>"),
        (BASIC.replace("<pad>\n", "").encode(), "<pad>"),
        (BASIC.replace("<s>\n", "").encode(), "<s>"),
        (BASIC.encode() + b"a\n\nb\n", "empty line"),
        (BASIC.encode() + b"a\na\n", "duplicate"),
        (BASIC.encode() + b"a b\n", "whitespace"),
    ],
)
def test_bad_vocab_file(tmp_path, content: bytes, message: str) -> None:
    path = _vocab_file(tmp_path, content)
    with pytest.raises(CpmliveError, match=message) as info:
        AntTokenizer.from_file(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_vocab_file(tmp_path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(CpmliveError, match="not found") as info:
        AntTokenizer.from_file(path)
    assert str(path) in str(info.value)


def test_vocab_path_is_directory(tmp_path) -> None:
    with pytest.raises(CpmliveError, match=str(tmp_path)):
        AntTokenizer.from_file(tmp_path)


def test_minimal_vocab_without_optional_tokens(tmp_path) -> None:
    path = _vocab_file(tmp_path, b"<pad>\r\n<unk>\r\n<s>\r\n</s>\r\na\r\n")
    tok = AntTokenizer.from_file(path)
    assert (tok.vocab_size, tok.mask_id, tok.space_id, tok.newline_id) == (5, None, None, None)
    assert tok.encode("a a") == [4, 1, 4]


FUZZ_FRAGMENTS = [
    "<s>", "</s>", "<pad>", "<unk>", "<d>", "</d>", "</n>", "</_>", "<mask>", "<", "/", ">", "s", "d", "n", "_",
    " ", "\n", "\t", "\r\n", "今天", "天气", "小明", "硕士", "3.14", "abc", "Hello", "😀", "，", "。", "\u3000", "１",
]


def test_hf_mode_matches_live_hf_on_seeded_mixtures(hf_mode: AntTokenizer, hf_live) -> None:
    rng = random.Random(20240611)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_FRAGMENTS) for _ in range(rng.randint(0, 12)))
        expected = hf_live(text)["input_ids"]
        assert hf_mode.encode(text) == expected, text
        assert hf_mode.decode(expected) == hf_live.decode(expected), text
