"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpmlive.model.registry import preset
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import save_checkpoint

from conftest import ANT_VOCAB, REFERENCE


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "cpmlive", *map(str, args)], input=stdin,
                          capture_output=True, env=env, timeout=300)


def assert_clean_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = preset("tiny")
    save_checkpoint(build_model(config, seed=1), config, path, vocab=ANT_VOCAB)
    return path


def test_generate_json_and_stream(checkpoint):
    result = run("generate", checkpoint, "今天天气不错，", "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert len(out["ids"]) == 6 and isinstance(out["text"], str) and out["text"]
    streamed = run("generate", checkpoint, "今天天气不错，", "--max-new-tokens", "6", "--stream")
    assert streamed.stdout.decode().strip() == out["text"]


def test_generate_reads_stdin_and_prompt_file(checkpoint, tmp_path):
    direct = run("generate", checkpoint, "北京是", "--max-new-tokens", "4", "--json")
    piped = run("generate", checkpoint, "-", "--max-new-tokens", "4", "--json", stdin="北京是".encode())
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("北京是", encoding="utf-8")
    from_file = run("generate", checkpoint, "--prompt-file", prompt, "--max-new-tokens", "4", "--json")
    assert json.loads(direct.stdout) == json.loads(piped.stdout) == json.loads(from_file.stdout)


def test_generate_sampling_flags_and_seed(checkpoint):
    args = ("generate", checkpoint, "今天", "--do-sample", "--top-p", "0.9", "--top-k", "20",
            "--temperature", "0.8", "--max-new-tokens", "8", "--json")
    a, b = run(*args, "--seed", "1"), run(*args, "--seed", "1")
    assert a.returncode == 0 and json.loads(a.stdout) == json.loads(b.stdout)
    beams = run("generate", checkpoint, "今天", "--num-beams", "3", "--max-new-tokens", "5",
                "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2", "--json")
    assert beams.returncode == 0, beams.stderr.decode()


def test_fill_json(checkpoint):
    result = run("fill", checkpoint, "今天<mask>，我们去公园", "--json", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert len(out["fills"]) == 1 and out["text"] == f"今天{out['fills'][0]}，我们去公园"


def test_tokenize_both_modes():
    ours = json.loads(run("tokenize", ANT_VOCAB, "今天天气真好！", "--json").stdout)
    hf = json.loads(run("tokenize", ANT_VOCAB, "今天天气真好！", "--hf", "--json").stdout)
    assert ours == {"ids": [9802, 14962, 2082, 831, 244], "pieces": ["今天", "天气", "真", "好", "！"]}
    assert hf["ids"] == [6, 9802, 14962, 2082, 831, 244]


def test_info_checkpoint_and_preset(checkpoint):
    info = json.loads(run("info", checkpoint, "--json").stdout)
    assert info["parameters"] == build_model(preset("tiny")).num_parameters()
    assert info["size_bytes"] > 0 and info["config"]["dim_model"] == 64
    big = json.loads(run("info", "ant-10b", "--json").stdout)
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096
    embeddings = (30720 + 1024 + 32) * 4096 + 1536 * 32 + 4096
    assert big["parameters"] == 48 * per_layer + embeddings  # 9.39B: "10B" is the nominal size
    assert run("info", checkpoint).returncode == 0


def test_convert_openbmb_fixture_to_hf_and_back(tmp_path):
    src = REFERENCE / "ant-tiny" / "model.safetensors"
    ours = tmp_path / "ours"
    result = run("convert", src, ours, "--config", REFERENCE / "ant-tiny" / "config.json", "--vocab", ANT_VOCAB)
    assert result.returncode == 0, result.stderr.decode()
    hf = tmp_path / "hf"
    assert run("convert", ours, hf, "--to", "hf").returncode == 0
    back = tmp_path / "back"
    assert run("convert", hf, back).returncode == 0
    a = json.loads(run("info", ours, "--json").stdout)
    b = json.loads(run("info", back, "--json").stdout)
    assert a["parameters"] == b["parameters"] and a["config"]["mask_modules"] == b["config"]["mask_modules"]


def test_vocab_build(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("今天天气很好，我们去公园散步。\n北京是中国的首都。\n" * 20, encoding="utf-8")
    out = tmp_path / "vocab.txt"
    result = run("vocab", "build", corpus, "--size", "32", "--out", out)
    assert result.returncode == 0, result.stderr.decode()
    tokens = out.read_text("utf-8").splitlines()
    assert tokens[:8] == ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>"]
    assert "今" in tokens and len(tokens) == 32


# ---- bad input: one line on stderr, exit 2, never a traceback --------------------------------------


def test_missing_checkpoint():
    assert_clean_error(run("generate", "/nonexistent/model", "你好"), "no such checkpoint")


def test_unknown_preset():
    assert_clean_error(run("generate", "ant-99b", "你好"), "ant-99b")


def test_corrupt_checkpoint(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "vocab.txt"):
        (broken / name).write_bytes((checkpoint / name).read_bytes())
    (broken / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:5000])
    assert_clean_error(run("generate", broken, "你好"), "model.safetensors")


def test_shape_mismatch_names_key_and_shapes(checkpoint, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in ("model.safetensors", "vocab.txt"):
        (wrong / name).write_bytes((checkpoint / name).read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    config["dim_ff"] = 256
    (wrong / "config.json").write_text(json.dumps(config))
    result = run("generate", wrong, "你好")
    assert_clean_error(result, "w_0.weight")
    assert "[128, 64]" in result.stderr.decode() and "[256, 64]" in result.stderr.decode()


def test_empty_prompt(checkpoint):
    assert_clean_error(run("generate", checkpoint, ""), "empty prompt")


def test_prompt_over_the_length_limit(checkpoint):
    assert_clean_error(run("generate", checkpoint, "天气" * 1200), "at most")


def test_non_utf8_prompt_file(checkpoint, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("你好".encode("gbk"))
    assert_clean_error(run("generate", checkpoint, "--prompt-file", bad), "not UTF-8")


def test_fill_without_mask(checkpoint):
    assert_clean_error(run("fill", checkpoint, "今天天气真好"), "<mask>")


def test_bad_flag_value(checkpoint):
    assert_clean_error(run("generate", checkpoint, "你好", "--top-p", "2"), "top_p")
    assert_clean_error(run("generate", checkpoint, "你好", "--max-new-tokens", "abc"), "max-new-tokens")


def test_debug_shows_the_traceback(checkpoint):
    result = run("--debug", "fill", checkpoint, "今天天气真好")
    assert result.returncode == 2 and "Traceback" in result.stderr.decode()
