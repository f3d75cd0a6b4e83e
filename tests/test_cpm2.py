"""The CPM-2 family against running reference code, on random weights.

* ModelCenter's ``CPM2`` and ``CPM2Tokenizer`` (OpenBMB's ``model-center`` 1.0.2 from PyPI, run on
  the CPU over a stand-in for ``bmtrain``'s distribution wrappers, ``modelcenter_stubs.py``): the
  tokenizer's ids on the demo's vocabulary, and the model's logits from its own state dict and
  config, read in the ``modelcenter`` layout (its length-scaled products folded into our weights).
* The original code's layout (BAAI's release: fused q/k/v, model-parallel shards): its formulas are
  T5 v1.1's (gated tanh GELU, no attention scaling, one relative table per stack, an untied
  unscaled head), so HF's ``T5ForConditionalGeneration`` computes it: its weights are written in
  the original's names here (fusing and splitting written out) and read back.
* EVA 2.0's HF port (T5's names, erf GELU, scores divided by ``sqrt(d_kv)``): HF's T5 with its
  activation set to erf GELU and its query rows divided by ``sqrt(d_kv)`` computes it.
* The mixture of experts: each token's output is its best expert's, written out token by token;
  a missing expert or an expert count the weights do not have is refused in one line.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from modelcenter_stubs import import_model_center, init_parameters
from torch import nn

import cpmlive
from cpmlive.cli import main
from cpmlive.errors import CpmliveError
from cpmlive.model.cpm2 import convert as cpm2_convert
from cpmlive.model.cpm2.config import Cpm2Config
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.model.cpm2.model import BaseLayer, build_cpm2
from cpmlive.model.formats import read_files
from cpmlive.model.registry import family_of
from cpmlive.resources import demo_dir
from cpmlive.tokenizer.cpm2 import Cpm2Tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = demo_dir("cpm2-demo") / "vocab.txt"
SIZE = 4096
TEXTS = ["今天天气不错，我们去公园散步。", "CPM-2 is a 11B model; 它有 26240 个词。\n第二行  两个空格",
         "ＡＢＣ全角字符和罕见字：龘靐", "<sep>不是特殊的吗？"]


@pytest.fixture(scope="module")
def modelcenter():
    return import_model_center()


def _randomize(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("layernorm.weight"):
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.normal_(0, 0.3, generator=generator)


# ---- the tokenizer ------------------------------------------------------------------------------


def test_the_tokenizer_gives_modelcenters_ids(modelcenter):
    from model_center.tokenizer import CPM2Tokenizer

    reference = CPM2Tokenizer(str(VOCAB), space_token="\u2582", line_token="\u2583")
    ours = Cpm2Tokenizer.from_file(VOCAB)
    for text in TEXTS[:3]:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))
    # A literal special token is read as that token (a rendered EVA dialogue); ModelCenter reads its characters.
    assert ours.encode("你好<sep>") == ours.encode("你好") + [ours.sep_id]


def test_the_tokenizer_keeps_an_empty_line_as_a_token(tmp_path):
    """EVA's vocabulary has the empty token on line 9: every later id stays where the original has it."""
    tokens = Cpm2Tokenizer.from_file(VOCAB)
    lines = [tokens.id_to_token(i) for i in range(SIZE)]
    lines[9] = ""
    (tmp_path / "vocab.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    reread = Cpm2Tokenizer.from_file(tmp_path / "vocab.txt")
    assert reread.vocab_size == SIZE and reread.token_to_id("<s_0>") == tokens.token_to_id("<s_0>")
    with pytest.raises(CpmliveError, match="vocabulary has 4096 tokens, the model expects 4000"):
        Cpm2Tokenizer.for_model(VOCAB, 4000)


# ---- ModelCenter's CPM2 -------------------------------------------------------------------------


def _modelcenter_model(modelcenter, attn_scale: bool):
    from model_center.model import CPM2, CPM2Config

    config = CPM2Config(vocab_size=SIZE, dim_model=32, num_heads=4, dim_head=8, dim_ff=48, num_encoder_layers=2,
                        num_decoder_layers=2, half=False, length_scale=True, attn_scale=attn_scale,
                        ffn_activate_fn="gated_gelu", tied=False)
    torch.manual_seed(0)
    model = CPM2(config)
    init_parameters(model)
    _randomize(model)
    return model.eval(), config


@pytest.mark.parametrize("attn_scale", [True, False])
def test_logits_equal_modelcenters_cpm2(modelcenter, tmp_path, attn_scale):
    reference, config = _modelcenter_model(modelcenter, attn_scale)
    directory = tmp_path / "mc"
    directory.mkdir()
    torch.save(reference.state_dict(), directory / "pytorch_model.pt")
    (directory / "config.json").write_text(json.dumps(config.__dict__, default=str), encoding="utf-8")
    shutil.copy(VOCAB, directory / "vocab.txt")
    assert family_of(directory).model_type == "cpm2"
    lm = cpmlive.load(directory)
    assert lm.config.ffn == "gated-gelu-erf" and lm.config.attention_scale == attn_scale
    encoder = torch.tensor([lm.tokenizer.encode_for_model(TEXTS[0])[:12], lm.tokenizer.encode_for_model(TEXTS[1])[:12]])
    lengths = torch.tensor([12, 9])
    decoder = torch.tensor([[3906, 17, 99, 3, 42], [3906, 8, 200, 31, 7]])
    with torch.no_grad():
        expected = reference(input_ids=encoder, length=lengths, decoder_input_ids=decoder,
                             decoder_length=torch.tensor([5, 5]), output_logits=True).logits
        valid = torch.arange(12)[None] < lengths[:, None]
        got = lm.model.logits(lm.model.seq2seq(encoder, decoder, valid))
    assert (got - expected).abs().max() < 1e-4
    written = cpm2_convert.convert(directory, tmp_path / "back", to="modelcenter")
    again = torch.load(directory / "pytorch_model.pt")
    back = read_files(sorted(written.glob("*.safetensors")))
    assert set(back) == set(again) and all(torch.allclose(back[k], again[k], atol=1e-6) for k in again)


# ---- the original's layout, through HF's T5 -----------------------------------------------------


def _hf_t5(act: str = "gelu_new", d_kv: int = 8):
    config = transformers.T5Config(vocab_size=SIZE, d_model=32, d_kv=d_kv, d_ff=48, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=3906)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    _randomize(model)
    model.lm_head.weight = nn.Parameter(torch.randn(SIZE, 32, generator=torch.Generator().manual_seed(2)))
    if act == "gelu":
        for module in model.modules():
            if hasattr(module, "act") and hasattr(module, "wi_0"):
                module.act = nn.GELU()
    return model


def _original_state(hf: nn.Module) -> dict[str, torch.Tensor]:
    """HF T5's weights in the original code's names (q, k, v fused; k, v fused in cross-attention)."""
    state, out = hf.state_dict(), {}
    out["word_embeds.weight"] = state["shared.weight"]
    out["encoder.word_embeds.weight"] = out["decoder.word_embeds.weight"] = state["shared.weight"]
    out["lm_head.weight"] = state["lm_head.weight"]
    for stack in ("encoder", "decoder"):
        out[f"{stack}.final_layernorm.weight"] = state[f"{stack}.final_layer_norm.weight"]
        for block in range(2):
            hf_block, ours = f"{stack}.block.{block}.layer", f"{stack}.blocks.{block}"
            attention = f"{hf_block}.0.SelfAttention"
            out[f"{ours}.self_attn.layer_norm.weight"] = state[f"{hf_block}.0.layer_norm.weight"]
            out[f"{ours}.self_attn.self_attn.project.weight"] = torch.cat(
                [state[f"{attention}.{m}.weight"] for m in "qkv"])
            out[f"{ours}.self_attn.self_attn.dense.weight"] = state[f"{attention}.o.weight"]
            if block == 0:
                out[f"{ours}.self_attn.self_attn.relative_attention_bias.weight"] = state[
                    f"{attention}.relative_attention_bias.weight"]
            ffn = 2 if stack == "decoder" else 1
            if stack == "decoder":
                cross = f"{hf_block}.1.EncDecAttention"
                out[f"{ours}.cross_attn.layer_norm.weight"] = state[f"{hf_block}.1.layer_norm.weight"]
                out[f"{ours}.cross_attn.cross_attn.project_q.weight"] = state[f"{cross}.q.weight"]
                out[f"{ours}.cross_attn.cross_attn.project_kv.weight"] = torch.cat(
                    [state[f"{cross}.k.weight"], state[f"{cross}.v.weight"]])
                out[f"{ours}.cross_attn.cross_attn.dense.weight"] = state[f"{cross}.o.weight"]
            out[f"{ours}.ff.layer_norm.weight"] = state[f"{hf_block}.{ffn}.layer_norm.weight"]
            for matrix in ("wi_0", "wi_1", "wo"):
                out[f"{ours}.ff.dense_relu_dense.{matrix}.weight"] = state[
                    f"{hf_block}.{ffn}.DenseReluDense.{matrix}.weight"]
    return out


def _split_in_two(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Two model-parallel shards as the original's ``change_mp.py`` splits them."""
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, tensor in state.items():
        if tensor.dim() == 1:
            parts = [tensor, tensor]
        elif name.endswith(("project.weight", "project_kv.weight")):
            fused = 3 if name.endswith("project.weight") else 2
            pieces = [piece.chunk(2) for piece in tensor.chunk(fused)]
            parts = [torch.cat([piece[rank] for piece in pieces]) for rank in range(2)]
        elif name.endswith(("project_q.weight", "word_embeds.weight", "lm_head.weight", "wi_0.weight", "wi_1.weight")):
            parts = list(tensor.chunk(2, dim=0))
        else:
            parts = list(tensor.chunk(2, dim=1))
        for rank in range(2):
            shards[rank][name] = parts[rank].clone()
    return shards


def _original_config(path) -> None:
    path.write_text(json.dumps({"vocab_size": SIZE, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
                                "num_decoder_layers": 2, "num_heads": 4, "layer_norm_epsilon": 1e-6,
                                "feed_forward_proj": "relu", "decoder_start_token_id": 3906}), encoding="utf-8")


def _logits(model_or_hf, encoder, decoder, ours: bool):
    with torch.no_grad():
        if ours:
            return model_or_hf.logits(model_or_hf.seq2seq(encoder, decoder))
        return model_or_hf(input_ids=encoder, decoder_input_ids=decoder).logits


def test_the_original_layout_and_its_shards_compute_t5_v1_1(tmp_path):
    hf = _hf_t5()
    state = _original_state(hf)
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "model.pt")
    _original_config(single / "config.json")
    sharded = tmp_path / "release" / "100000"
    sharded.mkdir(parents=True)
    for rank, shard in enumerate(_split_in_two(state)):
        torch.save({"module": shard, "iteration": 100000}, sharded / f"mp_rank_{rank:02d}_model_states.pt")
    _original_config(tmp_path / "release" / "config.json")
    encoder, decoder = torch.tensor([[5, 17, 99, 3, 42, 8, 3906]]), torch.tensor([[3906, 7, 12, 64]])
    expected = _logits(hf, encoder, decoder, ours=False)
    for where in (single, tmp_path / "release"):
        model, _ = cpm2_convert.load_pretrained(where)
        assert (_logits(model, encoder, decoder, ours=True) - expected).abs().max() < 1e-4
    written = cpm2_convert.convert(single, tmp_path / "ours")
    back = cpm2_convert.convert(written, tmp_path / "original" / "model.pt", to="openbmb")
    again = torch.load(back)
    assert all(torch.equal(again[k], state[k]) for k in again) and set(state) - set(again) == {
        "encoder.word_embeds.weight", "decoder.word_embeds.weight"}


def test_eva2_hf_port_scales_scores_and_uses_erf_gelu(tmp_path):
    hf = _hf_t5(act="gelu")
    directory = tmp_path / "eva"
    hf.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("model_type", "architectures")} | {"attn_scale": True}
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(VOCAB, directory / "vocab.txt")
    assert family_of(directory).model_type == "cpm2"
    lm = cpmlive.load(directory)
    assert lm.config.attention_scale and lm.config.dialogue and lm.config.ffn == "gated-gelu-erf"
    with torch.no_grad():  # EVA 2.0's scores divided by sqrt(d_kv): the same as dividing every query
        for module in hf.modules():
            if isinstance(module, transformers.models.t5.modeling_t5.T5Attention):
                module.q.weight.div_(math.sqrt(8))
    encoder, decoder = torch.tensor([[5, 17, 99, 3, 42, 8, 3906]]), torch.tensor([[3906, 7, 12, 64]])
    expected = _logits(hf, encoder, decoder, ours=False)
    assert (_logits(lm.model, encoder, decoder, ours=True) - expected).abs().max() < 1e-4


# ---- the mixture of experts ----------------------------------------------------------------------


def _moe_config() -> Cpm2Config:
    return Cpm2Config(vocab_size=SIZE, dim_model=32, dim_ff=48, num_layers=2, num_encoder_layers=2, num_heads=4,
                      dim_head=8, half=False, max_length=64, decoder_start_id=3906, experts=4)


def test_each_token_takes_its_best_expert():
    model = build_cpm2(_moe_config(), seed=3)
    layer = next(m for m in model.modules() if isinstance(m, BaseLayer))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(x, residual=x)
        flat = got.reshape(-1, 32)
        for index, token in enumerate(x.reshape(-1, 32)):
            scores = torch.stack([e.norm(token) @ layer.centroids[i] for i, e in enumerate(layer.experts)])
            best = layer.experts[int(scores.argmax())]
            hidden = torch.nn.functional.gelu(best.ffn.w_0(best.norm(token)), approximate="tanh") * best.ffn.w_1(
                best.norm(token))
            assert torch.allclose(flat[index], token + best.ffn.w_out(hidden), atol=1e-5)


def test_a_mixture_round_trips_and_bad_experts_are_one_line(tmp_path, capsys):
    model = build_cpm2(_moe_config(), seed=3)
    written = save_checkpoint(model, model.config, tmp_path / "moe", vocab=VOCAB)
    original = cpm2_convert.convert(written, tmp_path / "original" / "model.pt", to="openbmb")
    state = torch.load(original)
    assert "encoder.blocks.0.ff.expert_centroids" in state
    assert "decoder.blocks.1.ff.experts.3.layer_norm.weight" in state
    reread, _ = cpm2_convert.load_pretrained(original)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reread.state_dict()[name], tensor)
    del state["decoder.blocks.1.ff.experts.3.dense_relu_dense.wo.weight"]
    del state["decoder.blocks.1.ff.experts.3.dense_relu_dense.wi_0.weight"]
    del state["decoder.blocks.1.ff.experts.3.dense_relu_dense.wi_1.weight"]
    del state["decoder.blocks.1.ff.experts.3.layer_norm.weight"]
    torch.save(state, original)
    assert main(["info", str(original)]) == 2
    assert capsys.readouterr().err.strip().endswith("layers.1 is missing expert 3 of 4")
    config = json.loads((original.parent / "config.json").read_text())
    (original.parent / "config.json").write_text(json.dumps({**config, "experts": 3}))
    assert main(["info", str(original)]) == 2
    assert "has 4 expert centroids, the config 3 experts" in capsys.readouterr().err


def test_the_demo_generates_through_the_engine():
    lm = cpmlive.load("cpm2-demo")
    assert lm.tokenizer.encode_for_model("你好")[-1] == lm.tokenizer.sentinel(0) == lm.config.decoder_start_id
    together = lm.generate_ids(TEXTS[:2], max_new_tokens=6)
    assert together == [lm.generate_ids([text], max_new_tokens=6)[0] for text in TEXTS[:2]]
