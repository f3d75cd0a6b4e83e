"""The HF-directory tokenizer (``tokenizer.json`` through ``tokenizers``) against transformers 5, on
tokenizers trained here in both styles (Qwen2's byte-level BPE, Llama-2's SentencePiece-like BPE):
ids with and without special tokens, decoding, special ids, chat templates, and the refusals."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer import TEXT_TOKENIZERS, HFTokenizer, text_tokenizer
from cpmlive.tokenizer.hf import TOKENIZER_FILES
from cpmlive.tokenizer.hf_train import train_tokenizer

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("byte-level", "sentencepiece")
VOCAB_SIZE = 1500

SAMPLES = [
    "今天天气很好，我们一起去公园散步吧。",
    "The quick brown fox jumps over the lazy dog. It's done, isn't it?",
    "中文和 English 混合：tokenizer 的 ids 要一致。",
    "1234567890 3.14159 2024年5月20日 +86-10-6275",
    "emoji 😀🎉👍🏽 与中文 🇨🇳",
    "  two leading spaces\n\nnew\tlines  \n trailing  ",
    "\n",
    " ",
    "",
    "<|im_start|>user\n你好<|im_end|>\n<|endoftext|>",
    "a<s>b</s> c <unk>d",
    "x  <s>  y",
    "[INST] 你好 [/INST] Hi! </s><s>[INST] 再见 [/INST]",
    "ＡＢＣ全角 ｅ\u0301 cafe\u0301 ﬁ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "第一问"},
     {"role": "assistant", "content": "  第一答  "}, {"role": "user", "content": "second question"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "三"},
     {"role": "assistant", "content": "four", "tool_calls": None}],
]


def corpus() -> list[str]:
    """Chinese and English paragraphs the repository ships (its README, docs and demo texts)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "src/cpmlive/demo.py",
             ROOT / "src/cpmlive/data/headlines.py"]
    return [part for path in files for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, texts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {style: train_tokenizer(texts, VOCAB_SIZE, root / style, style).parent for style in STYLES}


def references(directory: Path) -> list:
    """transformers' two readings of a directory: the class its config names, and the generic one."""
    return [transformers.AutoTokenizer.from_pretrained(directory),
            transformers.PreTrainedTokenizerFast.from_pretrained(directory)]


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# ---- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_training_is_fast_and_gives_the_same_files(tmp_path, texts, trained, style):
    start = time.perf_counter()
    path = train_tokenizer(texts, VOCAB_SIZE, tmp_path / "again", style)
    assert time.perf_counter() - start < 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (path.parent / name).read_bytes() == (trained[style] / name).read_bytes()
    assert HFTokenizer.from_file(path).vocab_size == VOCAB_SIZE


def test_the_styles_are_what_they_copy(trained, texts):
    qwen, llama = (HFTokenizer.from_file(trained[style]) for style in STYLES)
    assert qwen.tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (qwen.eos_id, qwen.bos_id, qwen.unk_id) == (qwen.token_to_id("<|im_end|>"),) * 2 + (None,)
    assert qwen.pad_id == qwen.token_to_id("<|endoftext|>") and not qwen.adds_bos
    assert llama.tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and llama.tokens[258] == "<0xFF>"
    assert (llama.unk_id, llama.bos_id, llama.eos_id, llama.pad_id) == (0, 1, 2, 2) and llama.adds_bos
    bytes_ids = [llama.token_to_id(f"<0x{b:02X}>") for b in "𝔘".encode()]  # byte fallback
    assert llama.encode("𝔘") == [llama.token_to_id("▁"), *bytes_ids]
    assert not any(token.strip("▁").isdigit() and len(token.strip("▁")) > 1 for token in llama.tokens)
    counts = Counter("".join(texts))
    rarest = min(counts, key=lambda char: (counts[char], -ord(char)))
    assert llama.token_to_id(rarest) is None  # left to the byte tokens, as SentencePiece's coverage leaves it


def test_training_refusals(tmp_path, texts):
    with pytest.raises(CpmliveError, match="unknown tokenizer style 'bpe-dropout'"):
        train_tokenizer(texts, 1000, tmp_path, "bpe-dropout")
    with pytest.raises(CpmliveError, match="at least 260 tokens, not 100"):
        train_tokenizer(texts, 100, tmp_path, "byte-level")
    with pytest.raises(CpmliveError, match="no text"):
        train_tokenizer(["", ""], 1000, tmp_path)


# ---- against transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_ids_match_transformers(trained, style):
    ours = HFTokenizer.from_file(trained[style] / "tokenizer.json")
    for reference in references(trained[style]):
        for text in SAMPLES:
            assert ours.encode_for_model(text) == reference(text)["input_ids"], (type(reference).__name__, text)
            assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
            assert ours.tokenize(text) == reference.tokenize(text), text
        assert ours.vocab_size == len(reference)
    assert [piece for piece, _ in ours.pieces_with_ids(SAMPLES[2])] == ours.tokenize(SAMPLES[2])
    assert [i for _, i in ours.pieces_with_ids(SAMPLES[2])] == ours.encode(SAMPLES[2])


@pytest.mark.parametrize("style", STYLES)
def test_decode_matches_transformers(trained, style):
    ours = HFTokenizer.from_file(trained[style])
    reference = transformers.AutoTokenizer.from_pretrained(trained[style])
    for text in SAMPLES:
        ids = reference(text)["input_ids"] + [ours.eos_id]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    assert ours.decode([-1, *ours.encode("abc")]) == "abc"  # padding is dropped
    assert ours.decode([ours.vocab_size]) == reference.decode([ours.vocab_size]) == ""  # as HF: no text
    with pytest.raises(CpmliveError, match="token id -2 is outside"):
        ours.id_to_token(-2)


@pytest.mark.parametrize("style", STYLES)
def test_special_ids_match_transformers(trained, style):
    ours = HFTokenizer.from_file(trained[style])
    reference = transformers.AutoTokenizer.from_pretrained(trained[style])
    assert ours.eos_id == reference.eos_token_id and ours.unk_id == reference.unk_token_id
    assert ours.bos_id == (reference.bos_token_id if reference.bos_token_id is not None else reference.eos_token_id)
    assert ours.pad_id == (reference.pad_token_id if reference.pad_token_id is not None else reference.eos_token_id)
    assert ours.adds_bos == (reference("x")["input_ids"][0] == reference.bos_token_id)
    assert ours.stop_ids == {ours.eos_id}
    assert ours.mask_id is ours.newline_id is ours.space_id is ours.bod_id is None


@pytest.mark.parametrize("style", STYLES)
def test_chat_template_matches_transformers(trained, style):
    ours = HFTokenizer.from_file(trained[style])
    reference = transformers.AutoTokenizer.from_pretrained(trained[style])
    assert ours.chat_template == reference.chat_template
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            expected = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(conversation, add_generation_prompt=prompt) == expected
            ids = reference.apply_chat_template(conversation, add_generation_prompt=prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.encode(expected) == list(ids)


TEMPLATE_FEATURES = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
  {{ message.role }}: {{ message | tojson }}
    {% if message.reasoning_content is defined %}
[{{ message.reasoning_content }}]
    {% endif %}
{% generation %}{{ message.content | trim }}{% endgeneration %}

{% endfor %}
{{ ns.count }} {{ bos_token }} {{ eos_token }} {{ pad_token }} {{ strftime_now('%Y') }}
{% if tools %} {{ tools | tojson(indent=1) }}{% endif %}{% if add_generation_prompt %} GO{% endif %}
{{ dict(a=1) | tojson }} {{ enable_thinking | default('-') }} {{ when }}"""


@pytest.mark.parametrize("style", STYLES)
def test_template_features_match_transformers(trained, style):
    ours = HFTokenizer.from_file(trained[style])
    reference = transformers.AutoTokenizer.from_pretrained(trained[style])
    messages = [{"role": "user", "content": "  <tag>&\"引号\"  "}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok", "thinking": "hmm", "extra": None, "path": Path("p")}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for extra in ({}, {"tools": tools}, {"enable_thinking": False, "when": Path("w")}):
        for prompt in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                                     chat_template=TEMPLATE_FEATURES, **extra)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, chat_template=TEMPLATE_FEATURES,
                                            **extra) == expected


def test_named_templates_and_the_template_file(trained, tmp_path):
    directory = copy_dir(trained["byte-level"], tmp_path / "named")
    edit_json(directory / "tokenizer_config.json", chat_template=[
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
        {"name": "rag", "template": "R{{ documents[0].text }}"}])
    ours, reference = HFTokenizer.from_file(directory), transformers.AutoTokenizer.from_pretrained(directory)
    conversation = [{"role": "user", "content": "q"}]
    for extra in ({}, {"tools": [{"name": "f"}]}, {"chat_template": "rag", "documents": [{"title": "t", "text": "d"}]}):
        assert ours.apply_chat_template(conversation, **extra) == reference.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, **extra)
    assert ours.chat_template == "D{{ messages[0].content }}"
    (directory / "chat_template.jinja").write_text("F{{ messages | length }}", encoding="utf-8")
    ours = HFTokenizer.from_file(directory)
    assert ours.chat_template == "F{{ messages | length }}" == transformers.AutoTokenizer.from_pretrained(
        directory).chat_template
    edit_json(directory / "tokenizer_config.json", chat_template=[{"name": "a", "template": "A"}])
    (directory / "chat_template.jinja").unlink()
    with pytest.raises(CpmliveError, match=r"several chat templates and no default \(a\); name one"):
        HFTokenizer.from_file(directory).apply_chat_template(conversation)


def test_config_tokens_join_the_file_as_transformers_adds_them(trained, tmp_path):
    directory = copy_dir(trained["sentencepiece"], tmp_path / "extra")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"][str(VOCAB_SIZE + 1)] = {
        "content": "<|tool|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": False}
    edit_json(directory / "tokenizer_config.json", added_tokens_decoder=config["added_tokens_decoder"],
              pad_token="<pad>", additional_special_tokens=["<|sep|>"], image_token="<image>")
    edit_json(directory / "generation_config.json", eos_token_id=[2, VOCAB_SIZE + 1])
    ours = HFTokenizer.from_file(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    text = "a<pad>b<|tool|>c <|sep|> d<image>"
    assert ours.encode_for_model(text) == reference(text)["input_ids"]
    assert ours.vocab_size == len(reference)
    assert ours.pad_id == reference.pad_token_id == ours.token_to_id("<pad>")
    for skip in (False, True):
        ids = reference(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert ours.stop_ids == {2, VOCAB_SIZE + 1}
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ image_token }}") == (
        reference.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ image_token }}",
                                      tokenize=False))


def test_class_defaults_and_the_special_tokens_map(trained, tmp_path):
    """Special tokens the config does not name come from the class it names (Qwen2Tokenizer's
    ``<|endoftext|>``), and from ``special_tokens_map.json`` where the config lists no added tokens."""
    directory = copy_dir(trained["byte-level"], tmp_path / "legacy-map")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["added_tokens_decoder"], config["eos_token"], config["pad_token"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, reference = HFTokenizer.from_file(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.eos_id == ours.pad_id == reference.eos_token_id == ours.token_to_id("<|endoftext|>")
    edit_json(directory / "special_tokens_map.json", eos_token={"content": "<|end|>", "lstrip": False,
                                                                "normalized": False, "rstrip": False,
                                                                "single_word": False})
    ours, reference = HFTokenizer.from_file(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.eos_id == reference.eos_token_id == VOCAB_SIZE == ours.token_to_id("<|end|>")
    assert ours.encode("a<|end|>b") == reference.encode("a<|end|>b", add_special_tokens=False)
    assert ours.apply_chat_template(CONVERSATIONS[1], chat_template="{{ eos_token }}") == "<|end|>"


def test_split_special_tokens(trained, tmp_path):
    directory = copy_dir(trained["byte-level"], tmp_path / "split")
    edit_json(directory / "tokenizer_config.json", split_special_tokens=True)
    ours, reference = HFTokenizer.from_file(directory), transformers.AutoTokenizer.from_pretrained(directory)
    text = "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode_for_model(text) == reference(text)["input_ids"]
    assert ours.eos_id not in ours.encode(text)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_llama2_file_reads_as_transformers_llama_tokenizer_reads_it(trained, tmp_path, legacy):
    """Llama-2's tokenizer.json prefixes ``▁`` by a normalizer, after special tokens too;
    transformers' LlamaTokenizer rebuilds Metaspace over it (prefixing only the first piece unless
    ``legacy``). The file read as it is gives other ids."""
    directory = copy_dir(trained["sentencepiece"], tmp_path / "llama2")
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    data["pre_tokenizer"] = None
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    edit_json(directory / "tokenizer_config.json", legacy=legacy)
    ours = HFTokenizer.from_file(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for text in [*SAMPLES, "hello<s>world"]:
        assert ours.encode_for_model(text) == reference(text)["input_ids"], text
        assert ours.decode(reference(text)["input_ids"]) == reference.decode(reference(text)["input_ids"])
    as_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    assert as_file("  two")["input_ids"] != reference("  two")["input_ids"]


# ---- the interface and the refusals ----------------------------------------------------------------


def test_text_tokenizer_picks_it_first(trained):
    assert TEXT_TOKENIZERS[0] is HFTokenizer
    assert isinstance(text_tokenizer(trained["byte-level"] / "tokenizer.json"), HFTokenizer)
    assert not HFTokenizer.reads("vocab.txt") and not HFTokenizer.reads("spiece.model")


def test_for_model_checks_the_embedding(trained):
    path = trained["sentencepiece"] / "tokenizer.json"
    assert HFTokenizer.for_model(path, VOCAB_SIZE).vocab_size == VOCAB_SIZE
    assert HFTokenizer.for_model(path, VOCAB_SIZE + 64).vocab_size == VOCAB_SIZE  # a padded embedding
    with pytest.raises(CpmliveError, match=f"the tokenizer has {VOCAB_SIZE} tokens, the embedding only 1000 rows"):
        HFTokenizer.for_model(path, 1000)
    with pytest.raises(CpmliveError, match="CPM-Ant's"):
        HFTokenizer.for_model(path, VOCAB_SIZE, hf_compat=True)
    with pytest.raises(CpmliveError, match="CPM-Ant's"):
        HFTokenizer.from_file(path, hf_compat=True)


def test_not_a_tokenizer_json_is_refused(tmp_path):
    cases = {"plain.json": "[1, 2]", "config.json": '{"model_type": "llama"}', "broken.json": "{not json",
             "bad.json": '{"model": {"type": "BPE", "vocab": 3}}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(CpmliveError, match=f"{name}: not a tokenizers JSON") as caught:
            HFTokenizer.from_file(tmp_path / name)
        assert "\n" not in str(caught.value)
    with pytest.raises(CpmliveError, match="cannot read the tokenizer"):
        HFTokenizer.from_file(tmp_path / "missing.json")


def test_a_tokenizer_without_an_eos_is_refused(trained, tmp_path):
    directory = copy_dir(trained["byte-level"], tmp_path / "no-eos")
    edit_json(directory / "tokenizer_config.json", eos_token=None)
    with pytest.raises(CpmliveError, match="names no end-of-sequence token"):
        HFTokenizer.from_file(directory)
    edit_json(directory / "generation_config.json", eos_token_id=VOCAB_SIZE - 3)
    assert HFTokenizer.from_file(directory).eos_id == VOCAB_SIZE - 3


def test_a_template_that_fails_is_refused_in_one_line(trained, tmp_path):
    llama = HFTokenizer.from_file(trained["sentencepiece"])
    with pytest.raises(CpmliveError, match="chat template failed to render: Conversation roles must alternate"):
        llama.apply_chat_template([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}])
    failing = [("{% if %}", "Expected an expression"), ("{{ messages[0].content + 1 }}", "str"),
               ("{{ ''.__class__.__mro__ }}", "unsafe"), ("{{ raise_exception('bad\nrole') }}", "bad role")]
    for template, reason in failing:
        with pytest.raises(CpmliveError, match=reason) as caught:
            llama.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)
        assert "\n" not in str(caught.value)
    with pytest.raises(CpmliveError, match="empty conversation"):
        llama.apply_chat_template([])
    directory = copy_dir(trained["byte-level"], tmp_path / "no-template")
    edit_json(directory / "tokenizer_config.json", chat_template=None)
    with pytest.raises(CpmliveError, match="has no chat template"):
        HFTokenizer.from_file(directory).apply_chat_template([{"role": "user", "content": "x"}])


def test_save_copies_the_tokenizer_files(trained, tmp_path):
    source = copy_dir(trained["byte-level"], tmp_path / "source")
    (source / "chat_template.jinja").write_text("J", encoding="utf-8")
    (tmp_path / "out").mkdir()
    HFTokenizer.from_file(source).save(tmp_path / "out" / "tokenizer.json")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        name for name in TOKENIZER_FILES if (source / name).exists())
    copy = HFTokenizer.from_file(tmp_path / "out")
    assert copy.encode_for_model(SAMPLES[2]) == HFTokenizer.from_file(source).encode_for_model(SAMPLES[2])
    assert copy.chat_template == "J"


def test_clean_up_spaces_is_honoured_only_where_transformers_honours_it(trained, tmp_path):
    """transformers ignores ``clean_up_tokenization_spaces`` for BPE models and applies it to others."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = copy_dir(trained["sentencepiece"], tmp_path / "bpe")
    edit_json(directory / "tokenizer_config.json", clean_up_tokenization_spaces=True)
    word_level = tmp_path / "word-level"
    word_level.mkdir()
    backend = Tokenizer(models.WordLevel({"hello": 0, ",": 1, "world": 2, "[UNK]": 3, "</s>": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(word_level / "tokenizer.json"))
    edit_json(word_level / "tokenizer_config.json", clean_up_tokenization_spaces=True, eos_token="</s>",
              tokenizer_class="PreTrainedTokenizerFast")
    for folder, text in ((directory, "a , b . c ?"), (word_level, "hello , world")):
        ours, reference = HFTokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(folder)
        ids = reference(text)["input_ids"]
        assert ours.decode(ids) == reference.decode(ids)
    assert HFTokenizer.from_file(word_level).decode([0, 1, 2]) == "hello, world"


def test_ids_past_the_tokenizer_decode_to_nothing_as_in_hf(tmp_path):
    """Qwen pads its embedding past its tokens: a sampled padding row is no text, not an error."""
    from transformers import PreTrainedTokenizerFast

    from cpmlive.tokenizer.hf import HFTokenizer
    from cpmlive.tokenizer.hf_train import train_tokenizer

    path = train_tokenizer(["今天天气不错", "hello world"] * 20, 300, tmp_path)
    ours, theirs = HFTokenizer(path), PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ids = ours.encode("今天") + [ours.vocab_size + 5] + ours.encode("hello")
    assert ours.decode(ids) == theirs.decode(ids) == "今天hello"
