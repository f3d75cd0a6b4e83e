"""The training and compression verbs on the decoder family, against the reference where there
is one: LoRA / QLoRA adapters that HF PEFT loads on the HF model with the same logits, merged
checkpoints HF loads, the alignment recipes, int8 / W8A8 / int4 quantization (RTN, GPTQ, AWQ)
with grouped keys and untied heads, pruning by key/value group, distillation, and pretraining a
new model of the family with the causal objective (its loss equal to HF's)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import cpmlive
from cpmlive.cli import main
from cpmlive.config import QuantConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.registry import family_of
from cpmlive.tune import delta as deltas

from decoder_helpers import SHAPE, hf_model, texts, tiny_hf_dir

PROMPT = "今天天气不错，我们去公园玩。"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
EVERY_LINEAR = ["project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out", "output_head"]
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from a second thread, and on a busy machine OpenMP's waiting for
    it makes each small product many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """Llama: grouped keys (4 heads over 2), an untied head, a SentencePiece-style tokenizer."""
    return tiny_hf_dir(tmp_path_factory.mktemp("decoder") / "llama", "llama")


@pytest.fixture(scope="module")
def qwen2(llama, tmp_path_factory) -> Path:
    """Qwen2 (q/k/v biases, grouped keys, a tied head) on the Llama directory's tokenizer."""
    import transformers

    directory = tmp_path_factory.mktemp("decoder") / "qwen2"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(llama / name, directory / name)
    vocab = json.loads((llama / "config.json").read_text())["vocab_size"]
    torch.manual_seed(3)
    config = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SHAPE)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises the biases to zero: make them count
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def store(llama, tmp_path_factory) -> Path:
    """A token store of local text, tokenized with the Llama directory's ``tokenizer.json``."""
    from cpmlive.data.store import prepare

    root = tmp_path_factory.mktemp("store")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts()) + "\n", encoding="utf-8")
    prepare([str(corpus)], llama / "tokenizer.json", root / "data", val_fraction=0.1, progress=False, workers=1)
    for name in TOKENIZER_FILES:
        shutil.copyfile(llama / name, root / "data" / name)
    return root / "data"


def ids_of(lm) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode(PROMPT)])


def logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model.logits(lm.model(ids))


def loaded(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a PEFT adapter records no base hash
        return cpmlive.load(path, **kwargs)


def randomised_lora(lm, targets: list[str], seed: int = 0) -> None:
    """A LoRA adapter on ``targets`` with random (not zero) B, so that it changes the logits."""
    deltas.attach(lm.model, deltas.DeltaConfig(r=4, alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in deltas.adapter_tensors(lm.model, "default").values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    lm.model.eval()


# ---- LoRA: PEFT's layout, HF's names -----------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_lora_adapter_loads_in_peft_on_the_hf_model(architecture, request, tmp_path):
    from peft import PeftModel

    directory = request.getfixturevalue(architecture)
    lm = cpmlive.load(directory)
    ids = ids_of(lm)
    base = logits(lm, ids)
    targets = EVERY_LINEAR if architecture == "llama" else EVERY_LINEAR[:-1]  # qwen2's head is tied
    randomised_lora(lm, targets)
    ours = logits(lm, ids)
    assert (ours - base).abs().max() > 0.1
    deltas.save_adapter(lm.model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == (HF_NAMES if architecture == "llama" else HF_NAMES[:-1])
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as handle:
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in handle.keys()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf_model(directory), tmp_path / "adapter").eval()(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(cpmlive.load(directory, adapter=tmp_path / "adapter"), ids), ours,
                               atol=1e-5, rtol=0)


def test_bitfit_adapter_loads_in_peft_on_the_hf_model(llama, tmp_path):
    from peft import PeftModel

    lm = cpmlive.load(llama)
    deltas.attach(lm.model, deltas.DeltaConfig(method="bitfit"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in deltas.adapter_tensors(lm.model, "default").values():
            parameter.mul_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
    lm.model.eval()
    deltas.save_adapter(lm.model, tmp_path / "bitfit")
    config = json.loads((tmp_path / "bitfit" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["input_layernorm", "post_attention_layernorm", "norm"]
    ids = ids_of(lm)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # PEFT: "Unsupported layer type LlamaRMSNorm" (it tunes a copy all the same)
        theirs = PeftModel.from_pretrained(hf_model(llama), tmp_path / "bitfit").eval()(ids).logits
    torch.testing.assert_close(logits(lm, ids), theirs, atol=1e-4, rtol=0)


def test_an_adapter_peft_trained_on_the_hf_model_loads_into_ours(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(hf_model(llama), LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|down_proj)"))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    lm = loaded(llama, adapter=tmp_path / "peft")
    ids = ids_of(lm)
    with torch.no_grad():
        expected = theirs.eval()(ids).logits
    torch.testing.assert_close(logits(lm, ids), expected, atol=1e-4, rtol=0)
    (config,) = lm.model.delta_state.configs.values()
    assert config.target_modules == ["layers.0.attn.project_q", "layers.0.ffn.w_out", "layers.1.attn.project_q",
                                     "layers.1.ffn.w_out"]


def test_finetune_then_merge_gives_a_checkpoint_hf_loads(llama, tmp_path):
    rows = [{"input": f"{PROMPT}{i}", "output": "好"} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    delta = json.dumps({"method": "lora", "r": 4, "target_modules": ["project_q", "project_v", "w_1", "output_head"]})
    assert main(["finetune", "--model", str(llama), "--data", str(data), "--out", str(tmp_path / "run"),
                 "max_steps=2", "batch_size=4", "lr=0.05", "max_input_tokens=32", "max_output_tokens=4",
                 "progress=false", f"delta={delta}"]) == 0
    adapter = tmp_path / "run" / "best"
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj", "v_proj", "up_proj", "lm_head"]
    tuned = cpmlive.load(llama, adapter=adapter)
    ids = ids_of(tuned)
    assert main(["merge", str(llama), str(adapter), str(tmp_path / "merged")]) == 0
    merged = cpmlive.load(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids), logits(tuned, ids), atol=1e-4, rtol=0)
    family_of(tmp_path / "merged").convert(tmp_path / "merged", tmp_path / "merged-hf", to="hf")
    with torch.no_grad():
        theirs = hf_model(tmp_path / "merged-hf")(ids).logits
    torch.testing.assert_close(theirs, logits(tuned, ids), atol=1e-4, rtol=0)


def test_qlora_on_an_int4_base_loads_in_peft_on_its_dequantized_weights(llama, tmp_path):
    from peft import PeftModel

    from cpmlive.compress.quantize import quantize_checkpoint
    from cpmlive.tune.finetune import FinetuneConfig, Finetuner

    quantized = quantize_checkpoint(llama, tmp_path / "int4", QuantConfig(bits=4, group_size=32), progress=False)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"{PROMPT}{i}", "output": "好"}, ensure_ascii=False) + "\n"
                            for i in range(8)), encoding="utf-8")
    Finetuner(FinetuneConfig.from_dict({
        "model": str(quantized), "data": str(data), "out": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
        "lr": 0.05, "progress": False, "max_input_tokens": 32, "max_output_tokens": 4,
        "delta": {"method": "lora", "r": 4, "target_modules": ["project_q", "project_v", "w_out"]}})).run()
    lm = cpmlive.load(quantized, adapter=tmp_path / "run" / "best")
    assert type(lm.model.layers[0].attn.project_q).__name__ == "LoraQuantizedLinear"
    ids = ids_of(lm)
    family_of(quantized).convert(quantized, tmp_path / "dequantized", to="hf", dequantize=True)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf_model(tmp_path / "dequantized"), tmp_path / "run" / "best")(ids).logits
    torch.testing.assert_close(logits(lm, ids), theirs, atol=1e-4, rtol=0)
    with pytest.raises(CpmliveError, match="cannot be merged into quantized weights"):
        deltas.merge_checkpoint(quantized, tmp_path / "run" / "best", tmp_path / "merged")


def test_glm_adapters_refuse_the_reordered_and_fused_projections():
    from cpmlive.model.decoder.config import DecoderConfig
    from cpmlive.model.decoder.model import build_decoder

    config = DecoderConfig(architecture="glm", vocab_size=64, dim_model=32, dim_ff=48, num_layers=1, num_heads=2,
                           num_kv_heads=1, dim_head=16, max_length=32, partial_rotary_factor=0.5)
    model = build_decoder(config)
    deltas.attach(model, deltas.DeltaConfig(target_modules=["project_v", "w_out"]))  # HF has these as they are
    with pytest.raises(CpmliveError, match="'layers.0.attn.project_q' has no module of its own in the published"):
        deltas.attach(build_decoder(config), deltas.DeltaConfig())


# ---- alignment ---------------------------------------------------------------------------------


def test_the_alignment_recipes_run_on_a_decoder(llama, tmp_path):
    from cpmlive.align.recipes import TRAINERS, AlignConfig
    from cpmlive.train.metrics import read_records

    rows = [(f"{city}今天{thing}了吗？", f"{city}今天{thing}。", f"{thing}没有。")
            for city in ("北京", "上海") for thing in ("下雪", "开会")]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant",
                                                                                    "content": c}]},
                                      ensure_ascii=False) + "\n" for p, c, _ in rows), encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                             for p, c, r in rows), encoding="utf-8")

    def align(method: str, **extra) -> list[dict]:
        fields = dict(method=method, model=str(llama), data=str(sft if method == "sft" else pairs),
                      out=str(tmp_path / method), max_steps=1, eval_every=1, save_every=1, batch_size=2,
                      progress=False, max_input_tokens=48, max_output_tokens=8, lr=3e-3)
        TRAINERS[method](AlignConfig(**{**fields, **extra})).run()
        return [r for r in read_records(tmp_path / method) if r["type"] == "train"]

    assert align("sft")[0]["loss"] > 0
    assert align("rm")[0]["loss"] > 0
    assert (tmp_path / "rm" / "best" / "reward_head.safetensors").is_file()
    sft_adapter = str(tmp_path / "sft" / "best")
    assert align("dpo", adapter=sft_adapter)[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)
    rollouts = dict(eval_prompts=1, max_output_tokens=4)
    assert "objective/kl" in align("ppo", adapter=sft_adapter, reward_model=str(tmp_path / "rm" / "best"),
                                   ppo_epochs=1, **rollouts)[0]
    assert "reward" in json.dumps(align("grpo", reward="rouge", num_samples=2, **rollouts)[0])
    chat = cpmlive.load(llama, adapter=sft_adapter)
    assert isinstance(chat.chat([{"role": "user", "content": "北京今天下雪了吗？"}], max_new_tokens=3), str)


# ---- quantization ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text("\n".join(texts()[:200]) + "\n", encoding="utf-8")
    return path


def dequantized_lm(lm):
    """A float copy of a quantized model whose weights are its codes times their scales."""
    from cpmlive.model.checkpoint import model_from_state_dict
    from cpmlive.model.runtime.quant import dequantize_state

    config = lm.model.config.__class__.from_dict({**lm.model.config.to_dict(), "quantization": None})
    float_model = model_from_state_dict(config, dequantize_state(lm.model.state_dict()), source="dequantized")
    return type(lm)(float_model.eval(), lm.tokenizer)


# (architecture, scheme): the largest logit error against the float model, as a share of the largest logit
# (random weights of std 0.1 at width 64: int4 groups of 32 round coarsely; measured 0.017, 0.052, 0.27, 0.25, 0.23)
QUANTIZED = [("llama", QuantConfig(bits=8), 0.03), ("llama", QuantConfig(bits=8, activations="int8"), 0.08),
             ("llama", QuantConfig(bits=4, group_size=32), 0.35),
             ("llama", QuantConfig(bits=4, group_size=32, method="gptq"), 0.35),
             ("qwen2", QuantConfig(bits=4, group_size=32, method="awq"), 0.35)]


@pytest.mark.parametrize("architecture,scheme,tolerance", QUANTIZED,
                         ids=[f"{a}-{s.scheme}-{s.method}" for a, s, _ in QUANTIZED])
def test_quantized_checkpoints_load_generate_and_stay_close(architecture, scheme, tolerance, request, calibration,
                                                          tmp_path):
    from cpmlive.compress.quantize import quantize_checkpoint

    directory = request.getfixturevalue(architecture)
    cal = calibration if scheme.method != "rtn" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # little calibration text
        out = quantize_checkpoint(directory, tmp_path / "q", scheme, calibration=cal, samples=4, sample_tokens=32,
                                  progress=False)
    base, quantized = cpmlive.load(directory), cpmlive.load(out)
    assert quantized.model.config.quantization.scheme == scheme.scheme
    ids = ids_of(base)
    reference, approx = logits(base, ids), logits(quantized, ids)
    assert (approx - reference).abs().max() <= tolerance * reference.abs().max()
    # the integer products compute what the float model of the dequantized codes does (W8A8 also
    # rounds each token's inputs: measured 0.043)
    exact = logits(dequantized_lm(quantized), ids)
    assert (approx - exact).abs().max() <= (0.06 if scheme.activations == "int8" else 1e-4) * exact.abs().max()
    assert len(quantized.generate_ids([PROMPT], max_new_tokens=4)[0]) == 4


def test_awq_scales_fold_into_grouped_values_and_their_biases(qwen2, calibration):
    """AWQ's folding alone changes nothing the model computes: the value channel a group of query
    heads reads gets one scale, divided out of ``project_v``'s rows and its bias."""
    from cpmlive.compress.quantize import awq_scale_block, block_input_samples, calibration_batches, calibration_rows

    lm = cpmlive.load(qwen2)
    rows = calibration_rows((lm.tokenizer.encode(line) for line in texts()[:20]), 2, 32)
    batches = calibration_batches(rows, lm.tokenizer.bos_id, 0)
    ids = ids_of(lm)
    before = logits(lm, ids)
    for block in lm.model.layers:
        awq_scale_block(block, block_input_samples(lm.model, block, batches), QuantConfig(bits=4, group_size=32))
    assert lm.model.layers[0].attn.project_v.weight.shape[0] < lm.model.layers[0].attn.attention_out.in_features
    torch.testing.assert_close(logits(lm, ids), before, atol=1e-4, rtol=1e-4)


# ---- compression -------------------------------------------------------------------------------


def test_pruning_removes_whole_key_value_groups(qwen2, store):
    from cpmlive.compress.prune import GateTrainer, PruneConfig
    from cpmlive.data.store import TokenStore
    from cpmlive.data.stream import PretrainStream
    from cpmlive.model.loss import masked_lm_loss

    lm = cpmlive.load(qwen2)
    model = lm.model
    stream = PretrainStream(TokenStore(store, "train"), 96, 2, prompt_length=0, vocab_size=model.config.vocab_size,
                            objective="causal")
    gates = GateTrainer(model, PruneConfig(target=0.5, steps=2, target_warmup_steps=1, multiple_of=16))
    for _ in range(2):
        assert gates.step(lambda m: masked_lm_loss(m, stream.next_batch())[0])["loss"] > 0
    with torch.no_grad():  # close key/value group 1 and half of every FFN
        gates.masks.heads.log_alpha[1] = -5.0
        gates.masks.ffn_dims.log_alpha[:, :48] = -5.0
        gates.masks.attention.log_alpha.fill_(5.0)
        gates.masks.ffn.log_alpha.fill_(5.0)
    model.eval()
    gates.masks.eval()
    gates.masks.sample()
    ids = ids_of(lm)
    gated = logits(lm, ids)
    pruned = gates.finish()
    config = pruned.config
    assert (config.num_heads, config.num_kv_heads, config.dim_ff) == (2, 1, 48)
    assert pruned.layers[0].attn.bias_k.shape == (config.dim_head,)
    with torch.no_grad():
        torch.testing.assert_close(pruned.logits(pruned(ids)), gated, atol=1e-4, rtol=1e-4)


def test_compress_distills_a_decoder_from_its_teacher(llama, store, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {store}\nseq_length: 96\nbatch_size: 2\nsave_every: 2\nprogress: false\nsteps:\n"
                      "  - distill: {steps: 2, lr: 0.001, alpha: 0.5, hidden_weight: 0.1}\n"
                      "  - quantize: {bits: 8}\n", encoding="utf-8")
    assert main(["compress", str(llama), str(tmp_path / "out"), "--recipe", str(recipe)]) == 0
    record = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert [step["step"] for step in record["steps"]] == ["distill", "quantize"]
    metrics = (tmp_path / "out.run" / "step-1-distill" / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in metrics if '"train"' in line]) == 2
    student = cpmlive.load(tmp_path / "out")
    assert student.model.config.quantization.scheme == "int8"
    assert len(student.generate_ids([PROMPT], max_new_tokens=3)[0]) == 3


def test_compress_prunes_distills_and_quantizes_a_decoder(qwen2, store, tmp_path):
    """The whole recipe on grouped attention with biases: gates by k/v group with the teacher's
    distribution, recovery by distillation, GPTQ int4 of what is left."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {store}\nseq_length: 96\nbatch_size: 2\nsave_every: 4\nprogress: false\nsteps:\n"
                      "  - prune: {target: 0.5, steps: 6, target_warmup_steps: 2, mask_lr: 1.0, lagrangian_lr: 1.0,"
                      " multiple_of: 16, distill: {alpha: 0.5}}\n"
                      "  - distill: {steps: 2, lr: 0.001}\n"
                      "  - quantize: {bits: 4, group_size: 16, method: gptq}\n", encoding="utf-8")
    assert main(["compress", str(qwen2), str(tmp_path / "out"), "--recipe", str(recipe)]) == 0
    record = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert [step["step"] for step in record["steps"]] == ["prune", "distill", "quantize"]
    assert record["steps"][0]["parameters"] < record["parameters"]
    pruned = cpmlive.load(tmp_path / "out")
    config = pruned.model.config
    assert config.num_heads == 2 * config.num_kv_heads and config.quantization.scheme == "int4-g16"
    assert len(pruned.generate_ids([PROMPT], max_new_tokens=3)[0]) == 3


# ---- pretraining -------------------------------------------------------------------------------


def test_causal_pretraining_of_a_new_decoder(llama, store, tmp_path):
    from cpmlive.data.store import TokenStore
    from cpmlive.data.stream import PretrainStream
    from cpmlive.model.loss import masked_lm_loss

    lm = cpmlive.load(llama)
    vocab = lm.model.config.vocab_size
    stream = PretrainStream(TokenStore(store, "train"), 96, 2, prompt_length=0, vocab_size=vocab,
                            objective=family_of(llama).pretrain_objective)
    batch = stream.next_batch()
    reference = hf_model(llama)
    with torch.no_grad():
        ours = masked_lm_loss(lm.model, batch)[0].item()
        nats, count = 0.0, 0
        for row in range(batch.input_ids.size(0)):  # HF on each packed document alone
            for span in batch.span[row][batch.valid[row]].unique().tolist():
                keep = (batch.span[row] == span) & batch.valid[row]
                targets = batch.target[row][keep]
                out = reference(batch.input_ids[row][keep][None]).logits[0]
                nats += torch.nn.functional.cross_entropy(out, targets, reduction="sum").item()
                count += len(targets)
    assert ours == pytest.approx(nats / count, rel=1e-5)

    out = tmp_path / "run"
    assert main(["pretrain", "model=decoder-tiny", f"data={store}", "seq_length=96", "batch_size=2",
                 f"model_overrides={{vocab_size: {vocab}}}", "max_steps=3", "eval_every=3", "save_every=3",
                 "warmup_steps=1", "lr=0.003", "progress=false", f"out={out}"]) == 0
    trained = out / "checkpoints" / "step-0000003" / "model"
    assert {"tokenizer.json", "config.json"} <= {path.name for path in trained.iterdir()}
    model = cpmlive.load(trained)
    assert model.model.config.architecture == "llama" and model.model.config.num_kv_heads == 2
    assert len(model.generate_ids([PROMPT], max_new_tokens=3)[0]) == 3


def test_alignment_keeps_every_end_of_turn_token_of_a_tokenizer_without_bos(tmp_path):
    """Qwen's tokenizer has no BOS (its bos_id stands in with <|im_end|>): an alignment prompt is
    the text's ids as they are, its <|im_end|> tokens kept, nothing put before them; Llama's gets <s>."""
    from cpmlive.data.align import prompt_ids, text_ids
    from cpmlive.tokenizer.hf import HFTokenizer

    qwen = HFTokenizer(tiny_hf_dir(tmp_path / "qwen", "qwen2") / "tokenizer.json")
    chat = qwen.apply_chat_template([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"},
                                     {"role": "user", "content": "再见"}])
    ids = qwen.encode_for_model(chat)
    assert not qwen.adds_bos and ids.count(qwen.eos_id) == 4  # the template's system turn, then three
    assert prompt_ids(qwen, chat) == text_ids(qwen, chat) == ids
    llama = HFTokenizer(tiny_hf_dir(tmp_path / "llama", "llama") / "tokenizer.json")
    assert llama.adds_bos and prompt_ids(llama, "你好") == llama.encode_for_model("你好")
    assert text_ids(llama, "你好") == llama.encode_for_model("你好")[1:]
    templated = llama.apply_chat_template([{"role": "user", "content": "你好"}])  # writes <s> itself
    assert prompt_ids(llama, templated).count(llama.bos_id) == 1
