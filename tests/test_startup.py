"""``cpmlive --help``, each verb's ``--help`` and every usage error answer without importing torch.

Importing torch (and numpy, transformers, fastapi) is what made a usage error take seconds; a
fresh interpreter that parses the command line must not have any of them in ``sys.modules``
afterwards. The modules the parser needs (``cpmlive.cli``, ``cpmlive.utils``, ``cpmlive.errors``)
import the heavy ones inside the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpmlive.cli import build_parser

from conftest import ANT_VOCAB, REFERENCE

HEAVY = ("torch", "numpy", "transformers", "fastapi", "uvicorn", "safetensors", "jieba", "sentencepiece")

PROBE = """
import json, sys
from cpmlive.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def verb_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every verb and sub-verb of the parser (``generate``, ``data prepare``, ``align dpo``, ...)."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(verb_paths(sub, (*prefix, name)))
    return paths


VERBS = verb_paths(build_parser())


def parse_in_fresh_interpreter(*argv: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_every_verb_is_probed():
    assert {("generate",), ("title",), ("serve",), ("data", "prepare"), ("align", "dpo")} <= set(VERBS)


def test_help_imports_nothing_heavy():
    probe = parse_in_fresh_interpreter("--help")
    assert probe == {"code": 0, "heavy": []}


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_verb_help_imports_nothing_heavy(verb):
    probe = parse_in_fresh_interpreter(*verb, "--help")
    assert probe == {"code": 0, "heavy": []}


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_usage_error_imports_nothing_heavy(verb):
    probe = parse_in_fresh_interpreter(*verb, "--no-such-flag")
    assert probe == {"code": 2, "heavy": []}


@pytest.mark.parametrize("argv", [
    ("generate", "demo", "hi", "--memory-limit", "4XB"),
    ("generate", "demo", "hi", "--max-new-tokens", "0"),
    ("serve", "--memory-limit", "lots"),
    ("title", "正文", "--num-beams", "-1"),
    ("serve", "--port", "70000"),
    (),
], ids=repr)
def test_bad_flag_values_import_nothing_heavy(argv):
    """Validators that run while parsing (sizes, ranges) are refused before anything heavy loads."""
    probe = parse_in_fresh_interpreter(*argv)
    assert probe == {"code": 2, "heavy": []}


@pytest.mark.parametrize("argv", [
    ("generate", "demo"),
    ("generate", "demo", "你好", "--vote"),
    ("fill", "demo"),
    ("title",),
    ("title", "  "),
    ("tokenize", "demo"),
    ("generate", "no-such-model", "你好"),
    ("chat", "no-such-model"),
    ("title", "正文", "--model", "no-such-model"),
    ("bee", "bee-demo", "{bad json"),
    ("bee", "bee-demo", '{"input": "北京"}'),
], ids=repr)
def test_bad_input_before_the_model_imports_nothing_heavy(argv):
    """A missing text, an empty article or a wrong model name is refused (exit 2) before torch loads."""
    probe = parse_in_fresh_interpreter(*argv)
    assert probe == {"code": 2, "heavy": []}


RUN_PROBE = """
import contextlib, io, json, sys
from cpmlive.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": sorted(m for m in %r if m in sys.modules)}))
"""


@pytest.mark.parametrize("argv", [
    ("generate", "demo", "你好", "--max-new-tokens", "2"),
    ("title", "新华社北京1月5日电 国务院总理今天会见了来访的代表团，双方交换了意见。", "--num-beams", "2",
     "--samples", "1"),
    ("bee", "bee-demo", '{"input": "你好", "<ans>": ""}', "--max-new-tokens", "2"),
], ids=lambda argv: argv[0])
def test_one_shot_commands_import_only_what_they_use(argv):
    """Loading builds the model on the meta device first, where torch's random initialisers go
    through torch._dynamo, whose import cost more than the rest of the load; ROUGE (rouge_score
    imports nltk, and it pandas and scipy) came in with the fine-tuning module's name for a
    run's best adapter. Loading, generating and titling need none of them."""
    unwanted = ("torch._dynamo", "transformers", "fastapi", "uvicorn", "rouge_score", "nltk", "pandas", "scipy")
    result = subprocess.run([sys.executable, "-c", RUN_PROBE % (unwanted,), *argv], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"code": 0, "loaded": []}


# ---- jieba's dictionary, loaded by first character ------------------------------------------------

ENTRIES = json.loads((REFERENCE / "ant-tokenizer.json").read_text(encoding="utf-8"))["entries"]


@pytest.fixture(scope="module")
def stock_jieba():
    import jieba

    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def long_text() -> str:
    """Every 5th vocabulary entry, in lines of 60 entries: thousands of distinct characters."""
    words = ANT_VOCAB.read_text(encoding="utf-8").split("\n")[::5]
    return "\n".join("".join(words[i:i + 60]) for i in range(0, len(words), 60))


def test_segmenter_cuts_as_jieba(tmp_path, monkeypatch, stock_jieba):
    from cpmlive.tokenizer.jieba_dict import Segmenter

    monkeypatch.setenv("CPMLIVE_CACHE", str(tmp_path))
    for segmenter in (Segmenter(), Segmenter()):  # the first writes the cache, the second reads it
        for entry in ENTRIES:
            assert list(segmenter.cut(entry["text"])) == entry["orig_jieba_pieces"]
        text = long_text()
        assert list(segmenter.cut(text)) == list(stock_jieba.cut(text))
        assert list(segmenter.cut(text, HMM=False)) == list(stock_jieba.cut(text, HMM=False))
        assert segmenter.tokenizer.total == stock_jieba.total
    assert len(list(tmp_path.glob("cpmlive/jieba-prefix-*.marshal"))) == 1


def test_a_short_text_loads_a_small_part_of_the_dictionary(tmp_path, monkeypatch, stock_jieba):
    """A one-shot command loads the entries of its text's characters, not all of jieba's."""
    monkeypatch.setenv("CPMLIVE_CACHE", str(tmp_path))
    from cpmlive.tokenizer import ant

    monkeypatch.setattr(ant, "_jieba_tokenizer", None)
    assert ant.jieba_pieces("今天天气真好！") == ["今天天气", "真", "好", "！"]
    loaded = ant._jieba().tokenizer.FREQ
    assert 0 < len(loaded) < len(stock_jieba.FREQ) // 100
    assert all(loaded[word] == stock_jieba.FREQ[word] for word in loaded)


@pytest.mark.parametrize("cache", ["a file, not a directory", "a corrupt cache"])
def test_segmenter_without_a_usable_cache(tmp_path, monkeypatch, stock_jieba, cache):
    from cpmlive.tokenizer.jieba_dict import Segmenter, cache_path

    import jieba

    if cache == "a file, not a directory":
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv("CPMLIVE_CACHE", str(tmp_path / "file"))
    else:
        monkeypatch.setenv("CPMLIVE_CACHE", str(tmp_path))
        path = cache_path(Path(jieba.__file__).parent / jieba.DEFAULT_DICT_NAME)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not marshal")
    segmenter = Segmenter()
    text = long_text()[:3000]
    assert list(segmenter.cut(text)) == list(stock_jieba.cut(text))
    if cache == "a corrupt cache":
        assert len(segmenter.tokenizer.FREQ) < len(stock_jieba.FREQ)  # rewritten, then read by part
