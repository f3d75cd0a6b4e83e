"""The shipped Llama demo (``llama-demo``, ``recipes/llama-demo.yaml``): it generates Chinese through
the CLI, its byte-level tokenizer round-trips any text, and the recipe builds what ships."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cpmlive.cli import main
from cpmlive.resources import DECODER_DEMO, demo_dir

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llama-demo.yaml"
CHINESE = re.compile(r"[\u4e00-\u9fff]")


def test_it_ships_small_with_its_tokenizer_files():
    directory = demo_dir(DECODER_DEMO)
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert sum(path.stat().st_size for path in directory.iterdir()) <= 50_000_000


def test_generate_prints_chinese_through_the_cli(capsys):
    assert main(["generate", DECODER_DEMO, "中国", "--max-new-tokens", "12", "--min-new-tokens", "12", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["ids"]) == 12 and CHINESE.search(first["text"])
    assert main(["generate", DECODER_DEMO, "中国", "--max-new-tokens", "12", "--min-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == first["text"] + "\n"  # greedy: the same text again


TEXTS = ["北京是中国的首都。今天天气不错", "贾宝玉和林黛玉，“好了歌”", "Hello, 世界 123 ☃ 𠀀\n第二行"]


@pytest.mark.parametrize("text", TEXTS)
def test_its_tokenizer_round_trips_text(text):
    from cpmlive.tokenizer.hf import HFTokenizer

    tokenizer = HFTokenizer(demo_dir(DECODER_DEMO) / "tokenizer.json")
    ids = tokenizer.encode(text)
    assert ids and max(ids) < tokenizer.vocab_size and tokenizer.decode(ids) == text
    assert tokenizer.unk_id is None  # byte-level: every character encodes


def test_it_stops_and_chats_in_chatml():
    from cpmlive.tokenizer.hf import HFTokenizer

    tokenizer = HFTokenizer(demo_dir(DECODER_DEMO) / "tokenizer.json")
    end_ids = {tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")}
    assert tokenizer.stop_ids == end_ids and tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_the_recipe_builds_the_shipped_architecture():
    from cpmlive.train.pretrain import PretrainConfig, new_model_config

    config = PretrainConfig.from_file(RECIPE)
    shipped = json.loads((demo_dir(DECODER_DEMO) / "config.json").read_text("utf-8"))
    built = json.loads(json.dumps(new_model_config(config).to_dict()))
    assert {**built, "half": True} == shipped


def test_data_prepare_keeps_the_tokenizer_json_companions(tmp_path, capsys):
    """``data prepare --vocab DIR/tokenizer.json`` copies the special tokens and generation
    config beside it, so the checkpoints pretraining writes carry them too."""
    from cpmlive.tokenizer.hf import HFTokenizer
    from cpmlive.tokenizer.hf_train import train_tokenizer
    from cpmlive.train.llama_demo import generation_config

    texts = [f"第{i}天，北京的天气不错，我们去了公园。" for i in range(200)]
    vocab = train_tokenizer(texts, 300, tmp_path / "vocab")
    (vocab.parent / "generation_config.json").write_text(json.dumps(generation_config(HFTokenizer(vocab))), "utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    assert main(["data", "prepare", str(corpus), "--vocab", str(vocab), "--out", str(out), "--workers", "1",
                 "--quiet"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (vocab.parent / name).read_bytes(), name


def test_convert_writes_it_in_float16_and_refuses_a_gguf_type_outside_gguf(tmp_path, capsys):
    """``--dtype float16`` is a checkpoint dtype (the recipe's last step), not a GGUF-only type."""
    from cpmlive.model.checkpoint import read_weights

    assert main(["convert", DECODER_DEMO, str(tmp_path / "half"), "--dtype", "float16"]) == 0
    state = read_weights(tmp_path / "half")
    assert state and all(tensor.dtype == torch.float16 for tensor in state.values())
    assert main(["convert", DECODER_DEMO, str(tmp_path / "q8"), "--dtype", "q8_0"]) == 2
    assert "GGUF tensor type" in capsys.readouterr().err and not (tmp_path / "q8").exists()
