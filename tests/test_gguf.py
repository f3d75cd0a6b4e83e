"""GGUF both ways (cpmlive.model.decoder.gguf): the metadata, tensor names and types llama.cpp's
converter writes for each architecture, transformers' GGUF loader as the reference reader (logits and
token ids), read_gguf's round trip (config, tensors, tokenizer), and the refusals."""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cpmlive.errors import CpmliveError
from cpmlive.model.decoder import gguf as gguf_io

transformers = pytest.importorskip("transformers")
# Our test tokenizers are not among those llama.cpp knows by hash: write_gguf says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:.*a tokenizer llama.cpp does not know")

Q = gguf.GGMLQuantizationType
QWEN2_REGEX = gguf_io.QWEN2_REGEX
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
          "我想在apple工作1314151天～ 北京欢迎你，你好世界！",
          "def main():\n    return 42  # done\n\n",
          "Hello   world\t tabs and  spaces; emojis 🚀🦙 too."] * 20
TEXTS = ["Hello world 我想在apple工作", "  two  spaces\n\nnew line", "<|im_start|>user<think>hi<|im_end|>",
         "The quick brown fox, isn't it? 🦙", "北京欢迎你"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
VOCAB = 512  # the embedding's rows: more than either tokenizer has, so the vocabulary is padded


# ---- tokenizers and models ------------------------------------------------------------------------

def _byte_level(out: Path, split: pre_tokenizers.PreTokenizer | None = None) -> Path:
    """A Qwen2-like byte-level BPE: Qwen2's split regex, special tokens and a user-defined one."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = split or pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|user|>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": TEMPLATE}))
    (out / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    return out


def _sentencepiece(out: Path) -> Path:
    """A Llama-2-like BPE: '▁' for spaces, byte fallback tokens <0x00>..<0xFF>, <s> added in front."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<s>", "</s>"]))
    data = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for token, _ in sorted(data["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in data["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    specials = ("<unk>", "<s>", "</s>")
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only add their start-up (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"byte-level": _byte_level(root / "byte-level"), "sentencepiece": _sentencepiece(root / "sentencepiece")}


SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}
KINDS = {  # name -> (HF class stem, config overrides)
    "llama": ("Llama", {}),
    "mistral": ("Mistral", {"sliding_window": 64}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 128}),  # transformers' GGUF loader keeps Qwen3's default head_dim
    "glm": ("Glm", {"head_dim": 16}),
    "glm4": ("Glm4", {"head_dim": 32}),
    "minicpm3": ("MiniCPM3", {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
                              "v_head_dim": 16, "num_key_value_heads": 4}),
    "minicpm": ("Llama", {"tie_word_embeddings": True}),  # HF has no MiniCPM class: Llama's weights, muP scales
    "llama3-tied": ("Llama", {"rope_parameters": LLAMA3, "tie_word_embeddings": True}),
}
MINICPM = {"model_type": "minicpm", "architectures": ["MiniCPMForCausalLM"], "scale_emb": 12.0, "scale_depth": 1.4,
           "dim_model_base": 32}


@functools.cache
def tiny(kind: str) -> tuple[dict, torch.nn.Module]:
    """An HF model of ``kind`` on random weights large enough that a wrong row or scale shows."""
    stem, overrides = KINDS[kind]
    config = getattr(transformers, f"{stem}Config")(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{stem}ForCausalLM")(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(0.5, 1.5) if parameter.ndim == 1 else parameter.normal_(0, 0.2)
    hf_config = json.loads(config.to_json_string())
    if kind == "minicpm":
        hf_config.update(MINICPM)
    return hf_config, model


def write(tmp_path: Path, kind: str, tokenizer: Path | None, dtype: str = "f32", name: str = "model.gguf") -> Path:
    hf_config, model = tiny(kind)
    out = tmp_path / name
    gguf_io.write_gguf(hf_config, model.state_dict(), tokenizer, out, dtype)
    return out


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 77, 300, 9, 42, 11, 200, 3, 64]])).logits


def metadata(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


# ---- what llama.cpp's converter writes --------------------------------------------------------------

LAYER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
GLM_LAYER = ["attn_norm", "attn_q", "attn_q.bias", "attn_k", "attn_k.bias", "attn_v", "attn_v.bias", "attn_output",
             "ffn_norm", "ffn_up", "ffn_down"]
MLA_LAYER = ["attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_kv_b",
             "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
# kind -> (GGUF architecture, its keys (less the arch prefix) with the values the converter writes, layer tensors,
#          global tensors)
EXPECTED = {
    "llama": ("llama", {"vocab_size": VOCAB, "rope.dimension_count": 16, "attention.key_length": 16}, LAYER,
              ["token_embd", "output_norm", "output"]),
    "mistral": ("llama", {"vocab_size": VOCAB, "rope.dimension_count": 16, "attention.sliding_window": 64}, LAYER,
                ["token_embd", "output_norm", "output"]),
    "qwen2": ("qwen2", {}, LAYER + ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
              ["token_embd", "output_norm", "output"]),
    "qwen3": ("qwen3", {"attention.key_length": 128, "attention.value_length": 128},
              LAYER + ["attn_q_norm", "attn_k_norm"], ["token_embd", "output_norm", "output"]),
    "glm": ("chatglm", {"rope.dimension_count": 8}, GLM_LAYER, ["token_embd", "output_norm", "output"]),
    "glm4": ("glm4", {"rope.dimension_count": 16}, GLM_LAYER + ["post_attention_norm", "post_ffw_norm"],
             ["token_embd", "output_norm", "output"]),
    "minicpm3": ("minicpm3", {"vocab_size": VOCAB, "attention.q_lora_rank": 32, "attention.kv_lora_rank": 32,
                              "attention.key_length": 32, "rope.dimension_count": 16}, MLA_LAYER,
                 ["token_embd", "output_norm"]),
    "minicpm": ("minicpm", {"embedding_scale": 12.0, "residual_scale": 1.4 / 2 ** 0.5, "logit_scale": 2.0}, LAYER,
                ["token_embd", "output_norm"]),
    "llama3-tied": ("llama", {"rope.freq_base": 500000.0}, LAYER, ["token_embd", "output_norm", "rope_freqs"]),
}
COMMON_KEYS = {"block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
               "attention.head_count": 4}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_metadata_tensor_names_and_types_are_llama_cpps(tmp_path, tokenizers_dir, kind):
    arch, keys, layer, global_names = EXPECTED[kind]
    fields, tensors = metadata(write(tmp_path, kind, tokenizers_dir["byte-level"], "f16"))
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    for key, value in {**COMMON_KEYS, **keys}.items():
        assert fields[f"{arch}.{key}"] == pytest.approx(value), key
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] > 0
    expected = {f"{name}.weight" for name in global_names}
    expected |= {f"blk.{index}.{name}" + ("" if name.endswith(".bias") else ".weight")
                 for index in range(2) for name in layer}
    assert set(tensors) == expected
    for name, tensor in tensors.items():
        flat = len(tensor.shape) == 1 or name.endswith("_norm.weight") or name.endswith(".bias")
        assert tensor.tensor_type == (Q.F32 if flat else Q.F16), name


def test_tokenizer_metadata(tmp_path, tokenizers_dir):
    fields, _ = metadata(write(tmp_path, "qwen2", tokenizers_dir["byte-level"]))
    source = json.loads((tokenizers_dir["byte-level"] / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert all(tokens[index] == token for token, index in source["model"]["vocab"].items())
    assert types[tokens.index("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("<think>")] == gguf.TokenType.USER_DEFINED
    assert fields["tokenizer.ggml.merges"] == [" ".join(merge) for merge in source["model"]["merges"]]
    assert fields["tokenizer.ggml.eos_token_id"] == tokens.index("<|endoftext|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == TEMPLATE
    assert fields["general.sampling.top_k"] == 20
    fields, _ = metadata(write(tmp_path, "llama", tokenizers_dir["sentencepiece"], name="sp.gguf"))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    tokens, scores, types = (fields[f"tokenizer.ggml.{key}"] for key in ("tokens", "scores", "token_type"))
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    merged = json.loads((tokenizers_dir["sentencepiece"] / "tokenizer.json").read_text())["model"]["merges"]
    first, second = ("".join(merge) for merge in merged[:2])  # earlier merges score higher, as SentencePiece's
    assert scores[tokens.index(first)] > scores[tokens.index(second)]


def test_glm_vocabulary_as_llama_cpps(tmp_path, tokenizers_dir):
    """ChatGLM's set_vocab: no BOS, <|user|> ends a turn (and so generation, as in GLM-4's generation config)."""
    path = write(tmp_path, "glm", tokenizers_dir["byte-level"])
    fields, _ = metadata(path)
    tokens = fields["tokenizer.ggml.tokens"]
    end, user = tokens.index("<|endoftext|>"), tokens.index("<|user|>")
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eot_token_id"]) == (end, user)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    _, _, files = gguf_io.read_gguf(path)
    assert json.loads(files["generation_config.json"])["eos_token_id"] == [end, user]


def test_llama_and_minicpm_permute_q_and_k_rows_qwen_does_not(tmp_path):
    """llama.cpp's LlamaModel.permute: each head's rows 0, d/2, 1, d/2+1, ... (HF's halves to pairs)."""
    def interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
        dim = weight.shape[0] // heads
        order = [head * dim + half * dim // 2 + pair for head in range(heads) for pair in range(dim // 2)
                 for half in range(2)]
        return weight[order]

    for kind, permuted in (("llama", True), ("minicpm", True), ("qwen2", False)):
        _, model = tiny(kind)
        _, tensors = metadata(write(tmp_path, kind, None, name=f"{kind}.gguf"))
        layer = model.model.layers[0].self_attn
        q, k = (torch.from_numpy(np.array(tensors[f"blk.0.attn_{part}.weight"].data)) for part in "qk")
        assert torch.equal(q, interleaved(layer.q_proj.weight, 4) if permuted else layer.q_proj.weight)
        assert torch.equal(k, interleaved(layer.k_proj.weight, 2) if permuted else layer.k_proj.weight)


def test_q8_0_blocks_and_the_f16_fallback(tmp_path):
    hf_config, model = tiny("llama")
    state = dict(model.state_dict())
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"][:, :80]
    gguf_io.write_gguf({**hf_config, "intermediate_size": 80}, state, None, tmp_path / "q.gguf", "q8_0")
    fields, tensors = metadata(tmp_path / "q.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0 and tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16  # 80 columns: not whole blocks of 32
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32


# ---- transformers, the reference reader ---------------------------------------------------------------

@pytest.mark.parametrize("kind, tokenizer, dtype", [("llama", "sentencepiece", "f32"), ("mistral", "byte-level", "f32"),
                                                     ("qwen2", "byte-level", "q8_0"), ("qwen3", "byte-level", "f16")])
def test_transformers_loads_our_gguf(tmp_path, tokenizers_dir, kind, tokenizer, dtype):
    path = write(tmp_path, kind, tokenizers_dir[tokenizer], dtype)
    _, model = tiny(kind)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    expected, got = logits(model), logits(loaded.eval())
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < {"f32": 1e-6, "f16": 2e-3, "q8_0": 3e-2}[dtype]
    if dtype == "f32":
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    source = Tokenizer.from_file(str(tokenizers_dir[tokenizer] / "tokenizer.json"))
    for text in TEXTS:
        assert reference(text)["input_ids"] == source.encode(text).ids, text


# ---- read_gguf ------------------------------------------------------------------------------------

CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
               "sliding_window", "attention_bias", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim", "scale_emb", "scale_depth", "dim_model_base")


@pytest.mark.parametrize("kind", list(KINDS))
def test_read_gguf_round_trip(tmp_path, tokenizers_dir, kind):
    tokenizer = tokenizers_dir["sentencepiece" if kind in ("llama", "minicpm") else "byte-level"]
    hf_config, model = tiny(kind)
    config, state, files = gguf_io.read_gguf(write(tmp_path, kind, tokenizer))
    for key in CONFIG_KEYS:
        assert config.get(key) == hf_config.get(key), key
    assert config["rms_norm_eps"] == hf_config["rms_norm_eps"]
    assert gguf_io._rope_of(config, 1.0) == gguf_io._rope_of(hf_config, 0.5 if kind.startswith("glm") else 1.0)
    expected = {name: tensor for name, tensor in model.state_dict().items()
                if not (name == "lm_head.weight" and hf_config["tie_word_embeddings"])}
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    if kind != "minicpm":  # HF has no MiniCPM class; the others run from what was read
        stem, _ = KINDS[kind]
        again = getattr(transformers, f"{stem}ForCausalLM")(getattr(transformers, f"{stem}Config")(**config)).eval()
        again.load_state_dict(state, strict=False)
        torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=1e-5)
    source, rebuilt = (Tokenizer.from_file(str(tokenizer / "tokenizer.json")),
                       Tokenizer.from_str(files["tokenizer.json"]))
    for text in TEXTS:
        assert rebuilt.encode(text).ids == source.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids) == source.decode(source.encode(text).ids)
    tokenizer_config = json.loads(files["tokenizer_config.json"])
    assert tokenizer_config["chat_template"] == TEMPLATE
    assert tokenizer_config["eos_token"] == json.loads((tokenizer / "tokenizer_config.json").read_text())["eos_token"]


def test_generation_config_from_llama_cpps_sampling_keys(tmp_path, tokenizers_dir):
    path = write(tmp_path, "qwen2", tokenizers_dir["byte-level"])
    _, _, files = gguf_io.read_gguf(path)
    generation = json.loads(files["generation_config.json"])
    assert generation == {"eos_token_id": 0, "pad_token_id": 0, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert gguf_io.read_gguf_tokenizer(path) == files


KEPT = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}


@pytest.mark.parametrize("dtype, kind, bound", [("f16", Q.F16, 0), ("q8_0", Q.Q8_0, 1 / 127), ("q8_0", Q.Q4_0, 1 / 7),
                                                 ("f16", Q.BF16, 0)])
def test_read_gguf_dequantizes(tmp_path, monkeypatch, dtype, kind, bound):
    """F16 and BF16 come back as they were stored, Q8_0 and Q4_0 (written by gguf.quants) within a block's step."""
    monkeypatch.setitem(gguf_io.TENSOR_TYPES, dtype, kind)
    _, model = tiny("llama")
    path = write(tmp_path, "llama", None, dtype)
    assert metadata(path)[1]["blk.0.attn_v.weight"].tensor_type == kind
    _, state, _ = gguf_io.read_gguf(path)
    for name, tensor in model.state_dict().items():
        got = state[name]
        if tensor.ndim == 1:
            assert torch.equal(got, tensor), name
        elif bound == 0:
            assert got.dtype == KEPT[kind] and torch.equal(got, tensor.to(KEPT[kind])), name
        else:
            assert got.dtype == torch.float32
            assert (got - tensor).abs().max() <= bound * tensor.abs().max() + 1e-6, name


def test_llama3_rope_of_a_file_without_our_key(tmp_path):
    """A llama.cpp file has rope_freqs alone: Llama 3's scaling is read back from them."""
    hf_config, model = tiny("llama3-tied")
    llama3 = {**LLAMA3, "original_max_position_embeddings": 8192}
    path = tmp_path / "l3.gguf"
    gguf_io.write_gguf({**hf_config, "rope_parameters": llama3}, model.state_dict(), None, path)
    rewrite(path, drop=gguf_io.ROPE_KEY)
    read, _, _ = gguf_io.read_gguf(path)
    assert read["rope_scaling"] == {key: value for key, value in llama3.items() if key != "rope_theta"}


@pytest.mark.parametrize("scaling, keys", [
    ({"rope_type": "linear", "factor": 2.0}, {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0},
     {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32,
      "rope.scaling.yarn_beta_fast": 32.0}),
    ({"rope_type": "dynamic", "factor": 2.0}, {}),  # llama.cpp has no dynamic NTK: only our key holds it
])
def test_rope_scaling_keys_and_back(tmp_path, scaling, keys):
    hf_config, model = tiny("llama")
    path = tmp_path / "rope.gguf"
    gguf_io.write_gguf({**hf_config, "rope_parameters": {**scaling, "rope_theta": 1e4}}, model.state_dict(), None, path)
    fields, _ = metadata(path)
    assert {key: fields.get(f"llama.{key}") for key in keys} == pytest.approx(keys)
    assert gguf_io.read_gguf(path)[0]["rope_scaling"] == scaling
    if keys:  # llama.cpp's own file, without our key, says as much
        rewrite(path, drop=gguf_io.ROPE_KEY)
        assert gguf_io.read_gguf(path)[0]["rope_scaling"] == scaling


def test_sentencepiece_merges_from_scores_as_llama_cpp_writes_them(tmp_path, tokenizers_dir):
    """llama.cpp writes no merges for a SentencePiece vocabulary: read_gguf rebuilds them from the scores."""
    path = write(tmp_path, "llama", tokenizers_dir["sentencepiece"])
    rewrite(path, drop="tokenizer.ggml.merges")
    _, _, files = gguf_io.read_gguf(path)
    source = Tokenizer.from_file(str(tokenizers_dir["sentencepiece"] / "tokenizer.json"))
    rebuilt = Tokenizer.from_str(files["tokenizer.json"])
    for text in TEXTS + CORPUS[:4]:
        assert rebuilt.encode(text).ids == source.encode(text).ids, text


def test_chatglm_fused_query_key_value_is_split(tmp_path):
    """ChatGLM's own checkpoints give llama.cpp one attn_qkv per layer: read as q, k and v."""
    path = write(tmp_path, "glm", None)

    def fuse(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fused = {}
        for name, data in tensors.items():
            if ".attn_q." in name:
                parts = [tensors[name.replace(".attn_q.", f".attn_{part}.")] for part in "qkv"]
                fused[name.replace(".attn_q.", ".attn_qkv.")] = np.concatenate(parts)
            elif ".attn_k." not in name and ".attn_v." not in name:
                fused[name] = data
        return fused

    rewrite(path, tensors=fuse)
    assert "blk.0.attn_qkv.weight" in metadata(path)[1]
    config, state, _ = gguf_io.read_gguf(path)
    assert config["attention_bias"] is True
    for name, tensor in tiny("glm")[1].state_dict().items():
        assert torch.equal(state[name], tensor), name


def rewrite(path: Path, drop: str = "", tensors: Callable[[dict], dict] | None = None) -> None:
    """Rewrite the GGUF at ``path`` without metadata ``drop``, its F32 tensors passed through ``tensors``."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(None, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in (drop, "general.architecture"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    data = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    for name, array in (tensors or (lambda same: same))(data).items():
        writer.add_tensor(name, array)
    out = path.with_suffix(".rewritten")
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.replace(path)


# ---- the pre-tokenizer's name -----------------------------------------------------------------------

def test_pre_tokenizer_named_by_hash_when_llama_cpp_knows_the_tokenizer(tmp_path, tokenizers_dir, monkeypatch):
    ids = Tokenizer.from_file(str(tokenizers_dir["byte-level"] / "tokenizer.json")).encode(gguf_io.CHECK_TEXT).ids
    monkeypatch.setitem(gguf_io.KNOWN_HASHES, hashlib.sha256(str(ids).encode()).hexdigest(), "deepseek-r1-qwen")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fields, _ = metadata(write(tmp_path, "qwen2", tokenizers_dir["byte-level"]))
    assert fields["tokenizer.ggml.pre"] == "deepseek-r1-qwen"


def test_unknown_tokenizer_gets_the_pre_type_of_its_regex_and_says_so(tmp_path, tokenizers_dir):
    with pytest.warns(UserWarning, match="writing tokenizer.ggml.pre 'qwen2'"):
        write(tmp_path, "qwen2", tokenizers_dir["byte-level"])
    gpt2 = _byte_level(tmp_path / "gpt2", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    with pytest.warns(UserWarning, match="'gpt-2'"):
        path = write(tmp_path, "qwen2", gpt2, name="gpt2.gguf")
    _, _, files = gguf_io.read_gguf(path)
    source, rebuilt = Tokenizer.from_file(str(gpt2 / "tokenizer.json")), Tokenizer.from_str(files["tokenizer.json"])
    assert all(rebuilt.encode(text).ids == source.encode(text).ids for text in TEXTS)


# ---- refusals ---------------------------------------------------------------------------------------

def test_write_refusals(tmp_path, tokenizers_dir):
    hf_config, model = tiny("llama")
    state = model.state_dict()
    cases = [
        ({**hf_config, "model_type": "gpt2"}, state, "f16", "model_type 'gpt2' cannot be written to GGUF"),
        (hf_config, state, "q4_k", "GGUF type 'q4_k' is not supported"),
        ({**hf_config, "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, state, "f16",
         "cannot express partial_rotary_factor"),
        ({**hf_config, "rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope"}}, state, "f16",
         "cannot express rope_type 'longrope'"),
        ({**hf_config, "model_type": "qwen2", "use_sliding_window": True}, state, "f16", "has no sliding window"),
        ({**hf_config, "vocab_size": 1000}, state, "f16", "vocab_size 1000 does not match the embedding's 512 rows"),
        (hf_config, {**state, "model.layers.0.mlp.experts.weight": torch.zeros(2, 2)}, "f16", "has no name in GGUF"),
    ]
    minicpm3_config, minicpm3 = tiny("minicpm3")
    cases.append(({**minicpm3_config, "scale_emb": 10}, minicpm3.state_dict(), "f16", "fixes scale_emb=12"))
    for config, weights, dtype, message in cases:
        with pytest.raises(CpmliveError, match=message):
            gguf_io.write_gguf(config, weights, None, tmp_path / "x.gguf", dtype)
        assert list(tmp_path.iterdir()) == [], message  # nothing written, no temporary left
    small = {**hf_config, "vocab_size": 300}
    cut = {**state, "model.embed_tokens.weight": state["model.embed_tokens.weight"][:300]}
    with pytest.raises(CpmliveError, match="past the embedding's 300 rows"):
        gguf_io.write_gguf(small, cut, tokenizers_dir["byte-level"], tmp_path / "x.gguf")
    regex = tmp_path / "regex"
    regex.mkdir()
    data = json.loads((tokenizers_dir["byte-level"] / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|."
    (regex / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CpmliveError, match="knows neither this tokenizer nor its pre-tokenizer"):
        gguf_io.write_gguf(hf_config, state, regex, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_read_refusals(tmp_path, monkeypatch):
    other = gguf.GGUFWriter(None, "gpt2")
    other.add_block_count(1)
    other.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    other.write_header_to_file(tmp_path / "gpt2.gguf")
    other.write_kv_data_to_file()
    other.write_tensors_to_file()
    other.close()
    with pytest.raises(CpmliveError, match=r"architecture 'gpt2' is not supported \(supported: llama, qwen2"):
        gguf_io.read_gguf(tmp_path / "gpt2.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(CpmliveError, match="not a readable GGUF file"):
        gguf_io.read_gguf(tmp_path / "text.gguf")
    monkeypatch.setitem(gguf_io.TENSOR_TYPES, "q8_0", Q.MXFP4)
    path = write(tmp_path, "llama", None, "q8_0")
    with pytest.raises(CpmliveError, match=r"of type MXFP4, which is not supported \(supported: F32, F16, BF16, Q4_0"):
        gguf_io.read_gguf(path)


def test_the_gguf_verbs_through_the_cli(tmp_path, capsys):
    """convert DIR OUT.gguf --to gguf, generate FILE.gguf and convert FILE.gguf DIR: the same ids as
    the source directory (float32 written, nothing lost), a refused file leaves nothing behind."""
    import os

    from cpmlive.cli import main
    from decoder_helpers import tiny_hf_dir

    import cpmlive

    source = tiny_hf_dir(tmp_path / "qwen2", "qwen2")
    path = tmp_path / "out" / "model.gguf"
    assert main(["convert", str(source), str(path), "--to", "gguf", "--dtype", "f32"]) == 0
    prompt = "今天天气不错"
    expected = cpmlive.load(source).generate_ids([prompt], max_new_tokens=8, min_new_tokens=8)[0]
    capsys.readouterr()
    assert main(["generate", str(path), prompt, "--max-new-tokens", "8", "--min-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == expected
    back = tmp_path / "back"
    assert main(["convert", str(path), str(back), "--to", "hf"]) == 0
    assert cpmlive.load(back).generate_ids([prompt], max_new_tokens=8, min_new_tokens=8)[0] == expected
    assert (back / "tokenizer.json").is_file() and (back / "tokenizer_config.json").is_file()
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "cpmlive" / "gguf"
    before = sorted(cache.iterdir())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    capsys.readouterr()
    assert main(["generate", str(bad), prompt]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and sorted(cache.iterdir()) == before
    assert main(["convert", str(tmp_path / "qwen2"), str(tmp_path / "x.gguf"), "--to", "gguf", "--vocab",
                 str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "x.gguf").exists()
