"""CPM-1 against HF ``GPT2LMHeadModel`` on the same weights: logits, cached decoding, greedy ids,
padding; checkpoints in HF's layout and in the Megatron release's two model-parallel shards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import cpmlive
from cpmlive.model.cache import left_to_right
from cpmlive.model.cpm1.config import Cpm1Config
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.model.cpm1.model import build_cpm1
from cpmlive.model.cpm1.convert import convert, hf_to_ours, ours_to_hf
from cpmlive.model.registry import family_of

from cpm1_helpers import hf_gpt2, train_spm

CONFIG = Cpm1Config(vocab_size=3000, dim_model=64, dim_ff=256, num_layers=2, num_heads=4, dim_head=16, half=False,
                    max_length=128)


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm") / "spiece.model")


@pytest.fixture(scope="module")
def hf_model():
    return hf_gpt2(CONFIG, seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model, spiece):
    path = tmp_path_factory.mktemp("cpm1") / "hf"
    hf_model.save_pretrained(path)
    shutil.copyfile(spiece, path / "spiece.model")
    return path


def ours_from_hf(hf_model):
    state = hf_to_ours(dict(hf_model.state_dict()), CONFIG, "hf")
    model = build_cpm1(CONFIG)
    model.load_state_dict(state)
    return model.eval()


def test_logits_equal_hf_gpt2(hf_model):
    ours = ours_from_hf(hf_model)
    ids = torch.randint(0, CONFIG.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf_model(ids).logits
        logits = ours.logits(ours(ids))
    assert (logits - reference).abs().max().item() <= 1e-4


def test_state_dict_round_trip_is_exact(hf_model):
    ours = ours_from_hf(hf_model)
    back = ours_to_hf(ours.state_dict(), CONFIG)
    reference = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    assert set(back) == set(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)


def test_cached_decoding_equals_the_full_forward(hf_model):
    ours = ours_from_hf(hf_model)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours.logits(ours(ids))
        cache = ours.new_cache(2, 30)
        steps = [ours.logits(ours(ids[:, :10], cache=cache))[:, -1]]
        steps += [ours.logits(ours(ids[:, t:t + 1], cache=cache))[:, -1] for t in range(10, 30)]
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 9:29], atol=1e-5)


def test_left_padding_gives_every_token_its_unpadded_position(hf_model):
    ours = ours_from_hf(hf_model)
    ids = torch.randint(1, CONFIG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], 1)
    with torch.no_grad():
        reference = hf_model(ids).logits
        logits = ours.logits(ours(padded, valid=valid))[:, 5:]
    assert (logits - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masks_stay_finite_in_half_precision(hf_model, dtype):
    ours = ours_from_hf(hf_model).to(dtype)
    ids = torch.randint(1, CONFIG.vocab_size, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :4] = False  # padding rows see nothing: a -inf fill would make them NaN
    seen, _ = left_to_right(ids, None, valid, None, None, CONFIG.max_length)
    bias = ours.attention_mask(seen, dtype)
    assert torch.isfinite(bias).all()
    with torch.no_grad():
        assert torch.isfinite(ours.logits(ours(ids, valid=valid)).float()).all()


def test_greedy_ids_equal_hf_generate(hf_dir, hf_model, spiece):
    lm = cpmlive.load(hf_dir)
    prompt = "今天天气不错，我们去公园玩。"
    ids = lm.encode_prompt(prompt)
    assert ids == lm.tokenizer.encode(prompt)  # the pieces alone: no special token added
    ours = lm.generate_ids([prompt], max_new_tokens=12, min_new_tokens=12)[0]
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                      pad_token_id=lm.tokenizer.pad_id)[0, len(ids):].tolist()
    assert ours == reference
    beams = lm.generate_ids([prompt], max_new_tokens=6, num_beams=3)[0]
    with torch.no_grad():
        hf_beams = hf_model.generate(torch.tensor([ids]), do_sample=False, num_beams=3, max_new_tokens=6,
                                     eos_token_id=lm.tokenizer.eos_id, pad_token_id=lm.tokenizer.pad_id,
                                     early_stopping=True)[0, len(ids):].tolist()
    assert beams == [t for t in hf_beams if t != lm.tokenizer.pad_id][:len(beams)]


def test_batched_and_streamed_generation_equal_single_prompts(hf_dir):
    lm = cpmlive.load(hf_dir)
    prompts = ["今天天气不错", "我们去公园玩。这本书写得很好", "好"]
    batched = lm.generate(prompts, max_new_tokens=8)
    assert batched == [lm.generate(p, max_new_tokens=8) for p in prompts]
    assert "".join(lm.stream(prompts[1], max_new_tokens=8)) == batched[1]
    samples = lm.generate(prompts, max_new_tokens=8, do_sample=True, seed=4)
    assert samples == lm.generate(prompts, max_new_tokens=8, do_sample=True, seed=4)


def test_hf_layout_converts_to_ours_and_back_in_fp16(hf_dir, hf_model, tmp_path):
    import transformers

    ours_dir = convert(hf_dir, tmp_path / "ours", to="ours", dtype="float16")
    config = json.loads((ours_dir / "config.json").read_text())
    assert config["model_type"] == "cpm1" and config["half"] is True and (ours_dir / "spiece.model").is_file()
    assert family_of(ours_dir).model_type == "cpm1"
    back = convert(ours_dir, tmp_path / "hf16", to="hf")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(back, dtype=torch.float32).eval()
    ids = torch.randint(0, CONFIG.vocab_size, (1, 20))
    with torch.no_grad():
        expected = hf_model.half().float()(ids).logits
        hf_model.float()
        assert (reloaded(ids).logits - expected).abs().max().item() <= 1e-4
    assert json.loads((back / "config.json").read_text())["dtype"] == "float16"


# ---- the Megatron release: two model-parallel shards ------------------------------------------


def megatron_shards(hf_model, ranks: int = 2) -> list[dict]:
    """Split HF weights as Megatron-LM's model-parallel layers hold them (mpu/layers.py): column-
    parallel rows (qkv per rank [q_r; k_r; v_r], h_to_4h, vocabulary) and row-parallel columns."""
    state = hf_model.state_dict()
    shards = [{} for _ in range(ranks)]

    def put(name, tensor, dim=None):
        for rank in range(ranks):
            shards[rank][name] = tensor if dim is None else tensor.chunk(ranks, dim)[rank].clone()

    put("word_embeddings.weight", state["transformer.wte.weight"], 0)
    put("position_embeddings.weight", state["transformer.wpe.weight"])
    for layer in range(CONFIG.num_layers):
        hf, mg = f"transformer.h.{layer}.", f"transformer.layers.{layer}."
        put(mg + "input_layernorm.weight", state[hf + "ln_1.weight"])
        put(mg + "input_layernorm.bias", state[hf + "ln_1.bias"])
        q, k, v = state[hf + "attn.c_attn.weight"].t().chunk(3, 0)
        qb, kb, vb = state[hf + "attn.c_attn.bias"].chunk(3)
        for rank in range(ranks):
            shards[rank][mg + "attention.query_key_value.weight"] = torch.cat([t.chunk(ranks, 0)[rank]
                                                                                for t in (q, k, v)])
            shards[rank][mg + "attention.query_key_value.bias"] = torch.cat([t.chunk(ranks)[rank]
                                                                              for t in (qb, kb, vb)])
        put(mg + "attention.dense.weight", state[hf + "attn.c_proj.weight"].t(), 1)
        put(mg + "attention.dense.bias", state[hf + "attn.c_proj.bias"])
        put(mg + "post_attention_layernorm.weight", state[hf + "ln_2.weight"])
        put(mg + "post_attention_layernorm.bias", state[hf + "ln_2.bias"])
        put(mg + "mlp.dense_h_to_4h.weight", state[hf + "mlp.c_fc.weight"].t(), 0)
        put(mg + "mlp.dense_h_to_4h.bias", state[hf + "mlp.c_fc.bias"], 0)
        put(mg + "mlp.dense_4h_to_h.weight", state[hf + "mlp.c_proj.weight"].t(), 1)
        put(mg + "mlp.dense_4h_to_h.bias", state[hf + "mlp.c_proj.bias"])
    put("transformer.final_layernorm.weight", state["transformer.ln_f.weight"])
    put("transformer.final_layernorm.bias", state["transformer.ln_f.bias"])
    return [{k: v.half() for k, v in shard.items()} for shard in shards]


def write_release(root, shards, layout: str = "deepspeed"):
    (root / "iter_0080000").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("iter_0080000")
    for rank, shard in enumerate(shards):
        if layout == "deepspeed":  # CPM-Generate: 80000/mp_rank_00_model_states.pt, weights under "module"
            torch.save({"module": shard, "mp_world_size": len(shards), "iteration": 80000},
                       root / "iter_0080000" / f"mp_rank_{rank:02d}_model_states.pt")
        else:  # Megatron-LM: release/mp_rank_00/model_optim_rng.pt, weights under "model"
            (root / "iter_0080000" / f"mp_rank_{rank:02d}").mkdir()
            torch.save({"model": shard, "iteration": 80000},
                       root / "iter_0080000" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")
    return root


@pytest.mark.parametrize("layout", ["deepspeed", "megatron-lm"])
def test_megatron_shards_merge_to_the_hf_model(hf_model, spiece, tmp_path, layout):
    release = write_release(tmp_path / "release", megatron_shards(hf_model), layout)
    shutil.copyfile(spiece, release / "chinese_vocab.model")
    assert family_of(release).model_type == "cpm1"
    out = convert(release, tmp_path / "ours", to="ours")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_heads"], config["dim_ff"], config["half"]) == (4, 256, True)
    lm = cpmlive.load(out, dtype="float32")
    ids = torch.randint(0, CONFIG.vocab_size, (1, 16))
    with torch.no_grad():
        expected = hf_model.half().float()(ids).logits
        hf_model.float()
        assert (lm.model.logits(lm.model(ids)) - expected).abs().max().item() <= 1e-4


def test_a_missing_megatron_shard_is_named(hf_model, tmp_path):
    release = write_release(tmp_path / "release", megatron_shards(hf_model))
    (release / "iter_0080000" / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CpmliveError, match="mp_rank_01 is missing"):
        convert(release, tmp_path / "out")
    unrecorded = write_release(tmp_path / "bare", megatron_shards(hf_model), "megatron-lm")
    shutil.rmtree(unrecorded / "iter_0080000" / "mp_rank_01")
    with pytest.raises(CpmliveError, match="shard is missing"):
        convert(unrecorded, tmp_path / "out2", config_path=None)


def test_info_converts_no_weight_data(hf_dir, hf_model, tmp_path, monkeypatch):
    """`cpmlive info` reads a CPM-1 checkpoint's headers, as CPM-Ant's does: the tensors its
    layouts convert (HF's fused q/k/v, Megatron's ranks) are shapes and dtypes, no weight data."""
    import cpmlive.model.cpm1.convert as cpm1_convert

    release = write_release(tmp_path / "release", megatron_shards(hf_model))
    expected = {path: cpm1_convert.read_state(cpm1_convert.resolve(path))[0] for path in (hf_dir, release)}

    def without_data(conversion):
        def checked(state, *args):
            for shard in state if isinstance(state, list) else [state]:
                assert all(tensor.is_meta for tensor in shard.values()), "info converted weight data"
            return conversion(state, *args)
        return checked

    monkeypatch.setattr(cpm1_convert, "hf_to_ours", without_data(cpm1_convert.hf_to_ours))
    monkeypatch.setattr(cpm1_convert, "megatron_to_ours", without_data(cpm1_convert.megatron_to_ours))
    for path, fmt in ((hf_dir, "hf"), (release, "megatron")):
        info = cpm1_convert.checkpoint_info(path)
        state = expected[path]
        assert (info["format"], info["model_type"], info["tensors"]) == (fmt, "cpm1", len(state))
        assert info["dtypes"] == sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
        assert info["parameters"] == sum(t.numel() for t in state.values())


def test_the_other_family_is_refused(tmp_path, hf_dir, ant_vocab_path):
    from cpmlive.model.ant.model import build_model
    from cpmlive.model.checkpoint import save_checkpoint

    ant = save_checkpoint(build_model(preset("tiny")), preset("tiny"), tmp_path / "ant", vocab=ant_vocab_path)
    as_cpm1 = tmp_path / "ant-as-cpm1"
    shutil.copytree(ant, as_cpm1)
    (as_cpm1 / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "vocab_size": 30720}))
    with pytest.raises(CpmliveError, match=r"config says CPM-1 \(GPT-2\), but the weights are a CPM-Ant"):
        cpmlive.load(as_cpm1)
    cpm1_as_ant = tmp_path / "cpm1-as-ant"
    shutil.copytree(hf_dir, cpm1_as_ant)
    (cpm1_as_ant / "config.json").write_text(preset("tiny").to_json())
    with pytest.raises(CpmliveError, match="weights are a CPM-1"):
        cpmlive.load(cpm1_as_ant)
