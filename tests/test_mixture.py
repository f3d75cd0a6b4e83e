"""Several sources in one token store: per-source counts and held-out splits, dedup across
sources, and the recipe's mixture weights (their epochs, their resume, their bad values)."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cpmlive.data.store import TokenStore, prepare
from cpmlive.data.stream import PretrainStream, source_weights
from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.ant import AntTokenizer
from cpmlive.tokenizer.vocab import build_vocab, save_vocab

NEWS = [f"新华社北京电，国务院今天召开第{i}次会议，讨论经济工作和对外开放的问题。" for i in range(60)]
POEMS = [f"床前明月光，疑是地上霜。举头望明月，低头思故乡。其{i}" for i in range(30)]
SHARED = "这一段同时出现在两个来源里，只应保留一次。"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixture")
    news, poems = root / "news.txt", root / "poems.txt"
    news.write_text("\n".join([*NEWS, SHARED]) + "\n", encoding="utf-8")
    poems.write_text("\n".join([SHARED, *POEMS]) + "\n", encoding="utf-8")
    vocab = root / "vocab.txt"
    save_vocab(build_vocab([*NEWS, *POEMS, SHARED], 400), vocab)
    out = root / "data"
    prepare([str(news), str(poems)], vocab, out, val_fraction=0.1, progress=False, workers=1)
    (out / "vocab.txt").write_bytes(vocab.read_bytes())
    return out


def decoded(store: TokenStore, tokenizer: AntTokenizer) -> list[tuple[str, str]]:
    return [(store.sources[int(store.document_sources[i])], tokenizer.decode(store.document(i).tolist()[1:-1]))
            for i in range(store.num_documents)]


def test_every_document_keeps_its_source_and_each_source_has_held_out_documents(store_dir):
    tokenizer = AntTokenizer.from_file(store_dir / "vocab.txt")
    news, poems = (str(store_dir.parent / name) for name in ("news.txt", "poems.txt"))
    docs = {split: decoded(TokenStore(store_dir, split), tokenizer) for split in ("train", "val")}
    everything = docs["train"] + docs["val"]
    assert sorted(text for source, text in everything if source == news) == sorted([*NEWS, SHARED])
    assert sorted(text for source, text in everything if source == poems) == sorted(POEMS)
    assert {source for source, _ in docs["val"]} == {news, poems}
    meta = TokenStore(store_dir).meta["per_source"]
    assert meta[poems]["dropped"]["duplicate"] == 1 and meta[news]["dropped"]["duplicate"] == 0
    assert meta[news]["documents"] == len(NEWS) + 1 and meta[poems]["documents"] == len(POEMS)
    for source in (news, poems):
        counted = Counter(name for name, _ in docs["val"])[source]
        assert meta[source]["val"]["documents"] == counted
        assert meta[source]["train"]["documents"] + counted == meta[source]["documents"]


def test_a_source_empty_after_cleaning_is_named(tmp_path, store_dir):
    short = tmp_path / "short.txt"
    short.write_text("好\n短\n", encoding="utf-8")
    with pytest.raises(CpmliveError, match=r"short\.txt has no documents left after cleaning \(2 shorter"):
        prepare([str(store_dir.parent / "news.txt"), str(short)], store_dir / "vocab.txt", tmp_path / "out",
                progress=False, workers=1)
    copy = tmp_path / "copy.txt"
    copy.write_text("\n".join(NEWS) + "\n", encoding="utf-8")
    with pytest.raises(CpmliveError, match=r"copy\.txt has no documents left .*60 duplicates"):
        prepare([str(store_dir.parent / "news.txt"), str(copy)], store_dir / "vocab.txt", tmp_path / "out2",
                progress=False, workers=1)


def epoch_sources(stream: PretrainStream, epoch: int) -> Counter:
    return Counter(int(stream.pieces[i, 3]) for i in stream._epoch_order(epoch))


def test_mixture_weights_set_how_often_an_epoch_visits_each_source(store_dir):
    store = TokenStore(store_dir)
    news, poems = store.sources
    counts = Counter(int(s) for s in PretrainStream(store, 128, 2).pieces[:, 3])
    stream = PretrainStream(store, 128, 2, mixture={news: 2, poems: 0.5})
    for epoch in (0, 1):
        assert epoch_sources(stream, epoch) == {0: 2 * counts[0], 1: round(0.5 * counts[1])}
    first = set(stream._epoch_order(0)[stream.pieces[stream._epoch_order(0), 3] == 1])
    second = set(stream._epoch_order(1)[stream.pieces[stream._epoch_order(1), 3] == 1])
    assert first != second, "a fractional weight should visit a new share of the source each epoch"
    only_news = PretrainStream(store, 128, 2, mixture={poems: 0})
    assert set(epoch_sources(only_news, 0)) == {0}
    news_tokens = counts_tokens = 0
    for row in stream.pieces:
        counts_tokens += row[2] * (2 if row[3] == 0 else 0.5)
        news_tokens += row[2] * 2 * (row[3] == 0)
    assert stream.shares[news] == pytest.approx(news_tokens / counts_tokens)


def test_a_mixed_stream_resumes_exactly(store_dir):
    store = TokenStore(store_dir)
    mixture = {store.sources[0]: 1.5, store.sources[1]: 0.3}
    stream = PretrainStream(store, 128, 2, seed=3, mixture=mixture)
    for _ in range(40):
        stream.next_batch()
    state = stream.state_dict()
    expected = [stream.next_batch().input_ids for _ in range(3)]
    resumed = PretrainStream(store, 128, 2, seed=3, mixture=mixture)
    resumed.load_state_dict(state)
    for ids in expected:
        assert np.array_equal(resumed.next_batch().input_ids.numpy(), ids.numpy())


def test_bad_mixture_weights_are_named(store_dir):
    store = TokenStore(store_dir)
    with pytest.raises(CpmliveError, match=r"has no source 'wiki' \(it has: .*news\.txt, .*poems\.txt\)"):
        source_weights(store, {"wiki": 1.0})
    with pytest.raises(CpmliveError, match="must be a finite number >= 0"):
        source_weights(store, {store.sources[0]: -1})
    with pytest.raises(CpmliveError, match="every source of the data weight 0"):
        PretrainStream(store, 128, 2, mixture={name: 0 for name in store.sources})


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpmlive", *args], capture_output=True, text=True, cwd=cwd)


def pretrain_args(store_dir: Path, out: Path, *extra: str) -> list[str]:
    vocab_size = len((store_dir / "vocab.txt").read_text("utf-8").splitlines())
    return ["pretrain", f"data={store_dir}", f"out={out}", "model=tiny", f"model_overrides.vocab_size={vocab_size}",
            "model_overrides.num_layers=1", "seq_length=128", "batch_size=2", "max_steps=2", "warmup_steps=1",
            "eval_every=2", "eval_batches=1", "save_every=2", "progress=false", "precision=fp32", *extra]


@pytest.mark.parametrize("weight, message", [
    ("{wiki: 1.0}", "has no source 'wiki'"),
    ("{news: -2}", "mixture weight of news must be a finite number >= 0"),
    ("{news: lots}", "mixture"),
])
def test_pretrain_refuses_a_bad_mixture_before_creating_the_run(tmp_path, store_dir, weight, message):
    out = tmp_path / "run"
    result = run_cli(*pretrain_args(store_dir, out, f"mixture={weight}"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_pretrain_logs_the_mixture_it_trains_on(tmp_path, store_dir):
    from cpmlive.train.metrics import read_records

    news = str(store_dir.parent / "news.txt")
    out = tmp_path / "run"
    result = run_cli(*pretrain_args(store_dir, out, f"mixture={{{news}: 3}}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    start = next(r for r in read_records(out) if r["type"] == "start")
    assert start["mixture"][news] > 0.5 and sum(start["mixture"].values()) == pytest.approx(1.0)


def test_data_prepare_prints_per_source_counts(tmp_path, store_dir):
    news, poems = (str(store_dir.parent / name) for name in ("news.txt", "poems.txt"))
    result = run_cli("data", "prepare", news, poems, "--vocab", str(store_dir / "vocab.txt"), "--out",
                     str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["source", "documents", "chars"]
    assert lines[1].startswith(news) and lines[1].split()[1] == str(len(NEWS) + 1)
    assert lines[2].startswith(poems) and lines[2].split()[-1] == "1"


def test_sample_share_keeps_the_same_share_whatever_the_order():
    from cpmlive.data.corpora import sample_share

    texts = [f"第{i}首诗，春风又绿江南岸。" for i in range(2000)]
    kept = list(sample_share(texts, 0.1))
    assert 150 < len(kept) < 250
    assert sorted(sample_share(reversed(texts), 0.1)) == sorted(kept)
    assert list(sample_share(texts, 1.0)) == texts
    with pytest.raises(CpmliveError, match=r"sample fraction must be in \(0, 1\]"):
        list(sample_share(texts, 0))


def test_vocab_build_counts_a_sampled_share(tmp_path, store_dir):
    news, poems = (str(store_dir.parent / name) for name in ("news.txt", "poems.txt"))
    out = tmp_path / "vocab.txt"
    result = run_cli("vocab", "build", news, poems, "--sample", f"{poems}=0.5", "--size", "60", "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    bad = run_cli("vocab", "build", news, "--sample", f"{poems}=0.5", "--size", "60", "--out",
                  str(tmp_path / "other.txt"), cwd=tmp_path)
    assert bad.returncode == 2 and "which is not among the corpora given" in bad.stderr
    assert not (tmp_path / "other.txt").exists()
    for value in ("poems=2", "poems", "=0.5"):
        bad = run_cli("vocab", "build", news, "--sample", value, "--size", "60", "--out", str(tmp_path / "x.txt"),
                      cwd=tmp_path)
        assert bad.returncode == 2 and "expected CORPUS=FRACTION" in bad.stderr
