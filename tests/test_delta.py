"""Delta tuning (LoRA, soft prompts, bitfit) against HF PEFT, the reference."""

import json
import threading

import pytest
import torch
from peft import LNTuningConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model
from safetensors import safe_open
from torch import nn

from cpmlive.cli import main
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.ant.model import CpmAnt, build_model
from cpmlive.model.checkpoint import load_model, save_checkpoint
from cpmlive.tune.delta import (CONFIG_NAME, SIDECAR_NAME, WEIGHTS_NAME, DeltaConfig, active_adapter, adapter_size,
                                adapter_tensors, attach, base_hash, base_state_dict, find_targets, load_adapter,
                                load_adapter_weights, merge, remove_adapter, save_adapter, set_active_adapter,
                                trainable_parameters, trainable_summary, unload)

CONFIG = preset("tiny")
QV = ["project_q", "project_v"]


def base(seed: int = 0) -> CpmAnt:
    return build_model(CONFIG, seed=seed)


def inputs(task: int = 2, batch: int = 2, length: int = 44, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    prompt = CONFIG.prompt_length
    ids = torch.randint(8, 2000, (batch, length), generator=generator)
    ids[:, :prompt] = torch.arange(prompt) + task * prompt
    context = torch.zeros(batch, length, dtype=torch.bool)
    context[:, : prompt + 4] = True
    segment = torch.full((batch, length), 2, dtype=torch.int32)
    segment[:, :prompt] = 0
    return {"input_ids": ids, "segment": segment, "context": context,
            "span": torch.zeros(batch, length, dtype=torch.int32), "valid": torch.ones(batch, length, dtype=torch.bool)}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.logits(model(**batch))


def randomize(model: nn.Module, name: str = "default", seed: int = 1) -> None:
    """Non-zero B (a fresh LoRA is the identity) and a visible change to prompts and scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_tensors(model, name).values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def peft_name(key: str, adapter: str = "default") -> str:
    """``layers.0.attn.project_q.lora_A.weight`` -> PEFT's in-model ``...lora_A.default.weight``."""
    head, _, tail = key.rpartition(".")
    return f"{head}.{adapter}.{tail}"


def copy_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    with torch.no_grad():
        for key, parameter in adapter_tensors(ours, "default").items():
            theirs.get_parameter(peft_name(key)).copy_(parameter)


def lora_model(seed: int = 0, **config: object) -> CpmAnt:
    model = attach(base(seed), DeltaConfig(**{"r": 4, "alpha": 8, **config}))
    randomize(model)
    return model


# ---- configuration and targets -------------------------------------------------------------------


def test_config_json_round_trip_and_strict_keys(tmp_path):
    config = DeltaConfig(r=4, alpha=32, dropout=0.05, target_modules=["project_k", "w_0"])
    config.save(tmp_path / "delta.json")
    assert DeltaConfig.load(tmp_path / "delta.json") == config
    assert DeltaConfig.from_json(config.to_json()) == config
    with pytest.raises(CpmliveError, match="unknown key 'rank'"):
        DeltaConfig.from_dict({"method": "lora", "rank": 4})
    for bad in ({"method": "adapter"}, {"r": 0}, {"dropout": 1.0}, {"alpha": -1}, {"target_modules": []},
                {"method": "prompt", "target_modules": ["x"]}):
        with pytest.raises(CpmliveError):
            DeltaConfig.from_dict(bad)
    assert DeltaConfig().targets == QV


def test_target_matching_follows_peft():
    model = base()
    assert find_targets(model, ["attn.project_q"], nn.Linear) == ["layers.0.attn.project_q", "layers.1.attn.project_q"]
    assert find_targets(model, ["layers.1.ffn.w_0"], nn.Linear) == ["layers.1.ffn.w_0"]
    assert find_targets(model, r"layers\.0\.attn\.project_[qv]", nn.Linear) == ["layers.0.attn.project_q",
                                                                               "layers.0.attn.project_v"]
    with pytest.raises(CpmliveError, match="'roject_q' matches no module"):
        find_targets(model, ["roject_q"], nn.Linear)
    with pytest.raises(CpmliveError, match="'project_q' matches no module"):  # a regex must match the full name
        find_targets(model, "project_q", nn.Linear)
    with pytest.raises(CpmliveError, match="'layers.0.attn' is a Attention"):
        find_targets(model, ["attn"], nn.Linear)
    with pytest.raises(CpmliveError, match="nothing_here"):
        attach(base(), DeltaConfig(target_modules=["project_q", "nothing_here"]))


def test_attach_keeps_base_keys_and_freezes_backbone():
    model = base()
    keys = list(model.state_dict())
    attach(model, DeltaConfig(r=4))
    assert list(base_state_dict(model)) == keys
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert "layers.0.attn.project_q.weight" in model.state_dict()
    theirs = get_peft_model(base(), LoraConfig(r=4, target_modules=QV))
    assert trainable_parameters(model) == theirs.get_nb_trainable_parameters()


# ---- LoRA against PEFT ---------------------------------------------------------------------------


def test_lora_matches_peft_train_and_inference():
    ours = lora_model(dropout=0.1)
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=QV), base())
    copy_to_peft(ours, theirs)
    batch = inputs()
    with torch.inference_mode():  # the adapter does change the output
        assert (logits(ours.eval(), batch) - logits(base().eval(), batch)).abs().max() > 1e-2
    for model in (ours, theirs):
        model.train()
    torch.manual_seed(5)
    ours_train = logits(ours, batch)
    torch.manual_seed(5)
    theirs_train = logits(theirs, batch)
    torch.testing.assert_close(ours_train, theirs_train, atol=1e-5, rtol=0)
    ours_train.square().mean().backward()
    theirs_train.square().mean().backward()
    for key, parameter in adapter_tensors(ours, "default").items():
        torch.testing.assert_close(parameter.grad, theirs.get_parameter(peft_name(key)).grad, atol=1e-6, rtol=1e-4)
    for model in (ours, theirs):
        model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-5, rtol=0)


def test_lora_generation_matches_peft():
    """KV-cached decoding: one row per step takes the oneDNN path of the base product."""
    ours = lora_model(target_modules=["project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out"])
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=[
        "project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out"]), base())
    copy_to_peft(ours, theirs)
    rows = [[6, 100, 200, 300], [6, 400, 500]]
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    with torch.inference_mode():
        expected = generate_ids(theirs.eval(), rows, config, stop_ids=7)
        assert generate_ids(ours.eval(), rows, config, stop_ids=7) == expected
        torch.testing.assert_close(logits(ours, inputs()), logits(theirs, inputs()), atol=1e-5, rtol=0)


def test_saved_adapter_has_peft_layout_and_loads_in_peft(tmp_path):
    ours = lora_model().eval()
    save_adapter(ours, tmp_path / "ad")
    peft_config = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4 and peft_config["lora_alpha"] == 8
    assert peft_config["bias"] == "none" and peft_config["task_type"] is None
    assert sorted(peft_config["target_modules"]) == QV
    with safe_open(str(tmp_path / "ad" / WEIGHTS_NAME), "pt") as handle:
        keys, metadata = sorted(handle.keys()), handle.metadata()
    assert keys[0] == "base_model.model.layers.0.attn.project_q.lora_A.weight" and len(keys) == 8
    assert metadata["cpmlive_base_hash"] == base_hash(ours)
    assert json.loads((tmp_path / "ad" / SIDECAR_NAME).read_text())["base_hash"] == base_hash(ours)

    theirs = PeftModel.from_pretrained(base(), tmp_path / "ad").eval()
    with torch.inference_mode():
        torch.testing.assert_close(logits(theirs.base_model.model, inputs()), logits(ours, inputs()), atol=1e-5, rtol=0)

    again = base()
    assert load_adapter(again, tmp_path / "ad") == "default"
    assert not any(p.requires_grad for p in again.parameters())
    torch.testing.assert_close(logits(again.eval(), inputs()), logits(ours, inputs()), atol=0, rtol=0)


def test_peft_saved_adapter_loads_into_ours(tmp_path):
    theirs = get_peft_model(base(), LoraConfig(r=4, lora_alpha=16, target_modules=["project_q", "w_1"]))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    assert_peft_save_loads_into_ours(theirs, tmp_path)


def test_unsupported_peft_options_are_refused(tmp_path):
    theirs = get_peft_model(base(), LoraConfig(r=4, target_modules=QV, use_rslora=True))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(CpmliveError, match="use_rslora=True is not supported"):
        load_adapter(base(), tmp_path / "peft")


# ---- merging --------------------------------------------------------------------------------------


def test_merge_equals_unmerged_and_restores_plain_linears():
    model = lora_model(target_modules=["project_q", "project_v", "w_out"]).eval()
    keys = list(base_state_dict(model))
    with torch.inference_mode():
        before = logits(model, inputs())
    merge(model)
    assert type(model.layers[0].attn.project_q) is nn.Linear and type(model.layers[1].ffn.w_out) is nn.Linear
    assert list(model.state_dict()) == keys and not hasattr(model, "delta_state")
    with torch.inference_mode():
        torch.testing.assert_close(logits(model, inputs()), before, atol=1e-5, rtol=0)


def test_merge_cli_writes_a_checkpoint_that_matches(tmp_path, capsys):
    save_checkpoint(base(), CONFIG, tmp_path / "base")
    model = lora_model().eval()
    save_adapter(model, tmp_path / "ad")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "merged")]) == 0
    assert "wrote" in capsys.readouterr().out
    merged = load_model(tmp_path / "merged")
    with torch.inference_mode():
        torch.testing.assert_close(logits(merged, inputs()), logits(model, inputs()), atol=1e-5, rtol=0)


def test_unload_gives_back_the_base():
    model = lora_model().eval()
    unload(model)
    assert all(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(logits(model, inputs()), logits(base().eval(), inputs()), atol=0, rtol=0)


# ---- the base hash --------------------------------------------------------------------------------


def test_base_hash_is_stable_across_dtypes_and_tells_weights_apart(tmp_path):
    assert base_hash(base()) == base_hash(base().half()) == base_hash(attach(base(), DeltaConfig()))
    assert base_hash(base()) != base_hash(base(seed=1))
    save_checkpoint(base(), CONFIG, tmp_path / "fp16", dtype=torch.float16)
    fp16 = load_model(tmp_path / "fp16")
    assert base_hash(fp16) == base_hash(base())
    save_adapter(lora_model(), tmp_path / "ad")
    load_adapter(fp16, tmp_path / "ad")  # trained on fp32, served from the fp16 copy


def test_other_base_is_refused(tmp_path, capsys):
    save_adapter(lora_model(), tmp_path / "ad")
    other = base(seed=1)
    message = f"trained on base {base_hash(base())}, this model is base {base_hash(other)}"
    with pytest.raises(CpmliveError, match=message):
        load_adapter(other, tmp_path / "ad")
    assert not hasattr(other, "delta_state")
    save_checkpoint(other, CONFIG, tmp_path / "other")
    assert main(["merge", str(tmp_path / "other"), str(tmp_path / "ad"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on base" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


# ---- several adapters -----------------------------------------------------------------------------


def single(config: DeltaConfig, source: nn.Module, name: str) -> CpmAnt:
    """A fresh base with only adapter ``name`` of ``source`` (the reference for selection)."""
    model = attach(base(), config)
    with torch.no_grad():
        for key, parameter in adapter_tensors(model, "default").items():
            parameter.copy_(adapter_tensors(source, name)[key])
    return model.eval()


def test_two_adapters_selected_per_call():
    a, b = DeltaConfig(r=4), DeltaConfig(r=2, alpha=4, target_modules=["project_k", "w_0"])
    model = attach(attach(base(), a, "a"), b, "b").eval()
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    assert [n for n, p in model.named_parameters() if p.requires_grad][0].endswith("lora_A.b.weight")
    batch = inputs()
    with torch.inference_mode():
        want_a, want_b = logits(single(a, model, "a"), batch), logits(single(b, model, "b"), batch)
        want_base = logits(base().eval(), batch)
        set_active_adapter(model, "a")
        torch.testing.assert_close(logits(model, batch), want_a, atol=0, rtol=0)
        with active_adapter(model, "b"):
            torch.testing.assert_close(logits(model, batch), want_b, atol=0, rtol=0)
            seen = {}
            thread = threading.Thread(target=lambda: seen.update(out=logits(model, batch)))
            thread.start()
            thread.join()
            torch.testing.assert_close(seen["out"], want_a, atol=0, rtol=0)  # other threads keep the default
            with active_adapter(model, None):
                torch.testing.assert_close(logits(model, batch), want_base, atol=0, rtol=0)
        torch.testing.assert_close(logits(model, batch), want_a, atol=0, rtol=0)
    with pytest.raises(CpmliveError, match="no adapter named 'c'"):
        set_active_adapter(model, "c")
    remove_adapter(model, "a")
    assert type(model.layers[0].attn.project_q) is nn.Linear


# ---- soft prompts and bitfit ----------------------------------------------------------------------


def train_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One AdamW step on a next-token loss; returns every parameter before the step."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = logits(model.train(), batch)
    loss = nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    return before


def changed_parameters(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def test_prompt_tuning_trains_only_its_rows_and_round_trips(tmp_path):
    model = attach(base(), DeltaConfig(method="prompt", task_id=5, init_task=2))
    with torch.inference_mode():  # starts as a copy of the generation prompt
        torch.testing.assert_close(logits(model.eval(), inputs(task=5)), logits(base().eval(), inputs(task=2)))
    batch = inputs(task=5)
    before = train_step(model, batch)
    prompt_rows = {"prompt_embedding.prompt_embeddings.default"}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == prompt_rows
    assert changed_parameters(model, before) == prompt_rows
    assert trainable_parameters(model)[0] == CONFIG.prompt_length * CONFIG.dim_model
    with torch.inference_mode():  # other tasks keep the base rows
        torch.testing.assert_close(logits(model.eval(), inputs(task=2)), logits(base().eval(), inputs(task=2)))

    save_adapter(model, tmp_path / "prompt")
    assert type(PeftConfig.from_pretrained(str(tmp_path / "prompt"))).__name__ == "PromptTuningConfig"
    with safe_open(str(tmp_path / "prompt" / WEIGHTS_NAME), "pt") as handle:
        assert list(handle.keys()) == ["prompt_embeddings"]
    again = base()
    load_adapter(again, tmp_path / "prompt")
    with torch.inference_mode():
        want = logits(model.eval(), batch)
        torch.testing.assert_close(logits(again.eval(), batch), want, atol=0, rtol=0)
        torch.testing.assert_close(logits(merge(again), batch), want, atol=1e-5, rtol=0)


def test_bitfit_trains_only_norm_scales_and_loads_in_peft(tmp_path):
    model = attach(base(), DeltaConfig(method="bitfit"))
    batch = inputs()
    before = train_step(model, batch)
    tuned = {n for n, p in model.named_parameters() if p.grad is not None}
    assert len(tuned) == 5 and all(".ln_tuning_layers.default.weight" in n for n in tuned)
    assert changed_parameters(model, before) == tuned

    save_adapter(model, tmp_path / "bitfit")
    assert json.loads((tmp_path / "bitfit" / CONFIG_NAME).read_text())["peft_type"] == "LN_TUNING"
    with pytest.warns(UserWarning, match="Unsupported layer type"):
        theirs = PeftModel.from_pretrained(base(), tmp_path / "bitfit").eval()
    again = base()
    load_adapter(again, tmp_path / "bitfit")
    with torch.inference_mode():
        want = logits(model.eval(), batch)
        torch.testing.assert_close(logits(theirs.base_model.model, batch), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(again.eval(), batch), want, atol=0, rtol=0)
        torch.testing.assert_close(logits(merge(again), batch), want, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
def test_peft_ln_tuning_loads_into_ours(tmp_path):
    theirs = get_peft_model(base(), LNTuningConfig(target_modules=["attn_norm", "ffn_norm", "output_norm"]))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "ln_tuning_layers" in name:
                parameter.uniform_(0.5, 1.5)
    assert_peft_save_loads_into_ours(theirs, tmp_path)


# ---- sizes ----------------------------------------------------------------------------------------


def test_ant_10b_lora_qv_counts_6_29m_trainable(capsys):
    with torch.device("meta"):
        model = CpmAnt(preset("ant-10b"))
    total = model.num_parameters()
    attach(model, DeltaConfig(r=8))
    assert trainable_parameters(model) == (6_291_456, total + 6_291_456)
    print(trainable_summary(model))
    line = capsys.readouterr().out.strip()
    assert line.startswith("trainable params: 6,291,456 || all params: ") and f"{total + 6_291_456:,d}" in line
    assert line.endswith(f"trainable%: {100 * 6_291_456 / (total + 6_291_456):.4f}")


def test_adapter_files_are_small(tmp_path):
    save_adapter(attach(base(), DeltaConfig(r=8)), tmp_path / "ad")
    save_checkpoint(base(), CONFIG, tmp_path / "full")
    size = adapter_size(tmp_path / "ad")
    assert size < 64 * 1024 and size * 100 < adapter_size(tmp_path / "full")


def test_load_adapter_weights_refills_in_place(tmp_path):
    trained = lora_model()
    save_adapter(trained, tmp_path / "ad")
    model = attach(base(), DeltaConfig(r=4, alpha=8))
    params = adapter_tensors(model, "default")
    assert load_adapter_weights(model, tmp_path / "ad") == "default"
    for key, parameter in adapter_tensors(model, "default").items():
        assert parameter is params[key] and parameter.requires_grad
        torch.testing.assert_close(parameter, adapter_tensors(trained, "default")[key], atol=0, rtol=0)
    other = attach(base(), DeltaConfig(r=2, alpha=8))
    with pytest.raises(CpmliveError, match="not shaped like the attached 'default'"):
        load_adapter_weights(other, tmp_path / "ad")


def assert_peft_save_loads_into_ours(theirs, tmp_path) -> None:
    """PEFT's ``save_pretrained`` output loads into ours (no base hash: a warning) with equal logits."""
    theirs.save_pretrained(tmp_path / "peft")
    ours = base()
    with pytest.warns(UserWarning, match="no base hash"):
        load_adapter(ours, tmp_path / "peft")
    with torch.inference_mode():
        torch.testing.assert_close(logits(ours.eval(), inputs()), logits(theirs.base_model.model.eval(), inputs()),
                                   atol=1e-5, rtol=0)
