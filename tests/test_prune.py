"""Structured pruning and distillation: hard-concrete gates against their own distribution, the
sliced model against the gated one, the Lagrangian reaching its target, pruned checkpoints in
our verbs and in HF transformers, and the distillation loss against its definition."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpmlive.compress.distill import DistillConfig, distillation_loss, hidden_mse, soft_kl
from cpmlive.compress.prune import (
    GateTrainer, HardConcrete, PruneConfig, PruningMasks, binarise, prunable_parameters, pruned_model, sliced_state,
)
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.data.layout import GENERATION, build_batch
from cpmlive.data.objectives import make_instance, make_record, pack
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import load_model, model_from_state_dict, save_checkpoint
from cpmlive.model.ant.convert import convert
from cpmlive.model.loss import masked_lm_loss

from conftest import ANT_VOCAB

CONFIG = AntConfig.from_dict({**preset("tiny").to_dict(), "num_layers": 3, "vocab_size": 30720})


def random_model(seed: int = 1):
    model = build_model(CONFIG, seed=seed)
    with torch.no_grad():
        model.position_bias.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def packed_batch(seed: int = 0, rows: int = 4):
    rng = np.random.default_rng(seed)
    instances = [make_instance(make_record(rng.integers(10, 2000, 40).tolist(), task=int(rng.integers(1, 3))),
                               rng, prompt_length=CONFIG.prompt_length) for _ in range(rows)]
    return pack(instances, max_length=96, batch_size=rows, all_rows=True)


def probe_inputs():
    return build_batch([[6, 100, 200, 300, 400, 500]], GENERATION, CONFIG.prompt_length).as_inputs()


def set_gates(masks: PruningMasks, heads: list[int], attention: list[bool], ffn: list[bool], dims: int,
              kept_value: float = 10.0) -> None:
    with torch.no_grad():
        masks.heads.log_alpha.fill_(-10.0)
        masks.heads.log_alpha[heads] = kept_value
        masks.attention.log_alpha.copy_(torch.tensor([kept_value if a else -10.0 for a in attention]))
        masks.ffn.log_alpha.copy_(torch.tensor([kept_value if f else -10.0 for f in ffn]))
        masks.ffn_dims.log_alpha.fill_(-10.0)
        for layer in range(CONFIG.num_layers):
            masks.ffn_dims.log_alpha[layer, torch.randperm(CONFIG.dim_ff)[:dims]] = kept_value


# ---- gates ------------------------------------------------------------------------------------


def test_hard_concrete_keep_probability_matches_its_samples():
    gate = HardConcrete(4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -0.5, 0.5, 3.0]))
    gate.train()
    samples = torch.stack([gate() for _ in range(20000)])
    assert ((samples > 0).float().mean(0) - gate.keep_probability()).abs().max() < 0.015
    assert samples.min() >= 0 and samples.max() <= 1 and (samples == 0).any() and (samples == 1).any()
    gate.eval()
    assert gate()[0] == 0 and gate()[3] == 1


# ---- slicing -----------------------------------------------------------------------------------


def test_pruned_model_computes_what_the_gated_model_did():
    model = random_model()
    masks = PruningMasks(CONFIG)
    set_gates(masks, heads=[0, 2, 3], attention=[True, False, True], ffn=[True, True, False], dims=48)
    masks.attach(model)
    masks.eval()
    masks.sample()
    with torch.no_grad():
        gated = model.logits(model(**probe_inputs()))
    pruned = pruned_model(model, masks)
    assert pruned.config.num_heads == 3 and pruned.config.dim_ff == 48
    assert pruned.config.mask_modules == [[False, False], [True, False], [False, True]]
    assert pruned.position_bias.weight.shape[1] == 3
    with torch.no_grad():
        sliced = pruned.logits(pruned(**probe_inputs()))
    assert torch.allclose(sliced, gated, atol=1e-4, rtol=1e-4)
    assert pruned.num_parameters() < model.num_parameters()


def test_partly_open_gates_are_folded_into_the_sliced_weights():
    """Gates between 0 and 1 (log_alpha 1: 0.78) scale what survives; slicing folds them in."""
    model = random_model()
    masks = PruningMasks(CONFIG)
    set_gates(masks, heads=[0, 2, 3], attention=[True, True, True], ffn=[True, True, True], dims=40, kept_value=1.0)
    masks.attach(model)
    shape = binarise(masks)
    with torch.no_grad():  # close exactly what binarising drops, so both models hold the same units
        for h in set(range(CONFIG.num_heads)) - set(shape.heads):
            masks.heads.log_alpha[h] = -10.0
        for layer, kept in enumerate(shape.ffn_dims):
            closed = torch.ones(CONFIG.dim_ff, dtype=torch.bool)
            closed[kept] = False
            masks.ffn_dims.log_alpha[layer, closed] = -10.0
    masks.eval()
    masks.sample()
    assert 0.7 < masks._current["heads"][shape.heads[0]] < 0.8
    with torch.no_grad():
        gated = model.logits(model(**probe_inputs()))
    state, config = sliced_state(model, masks, shape)
    pruned = model_from_state_dict(config, state)
    with torch.no_grad():
        sliced = pruned.logits(pruned(**probe_inputs()))
    assert torch.allclose(sliced, gated, atol=1e-4, rtol=1e-4)


def test_closing_every_gate_is_refused():
    masks = PruningMasks(CONFIG)
    set_gates(masks, heads=[0], attention=[False] * 3, ffn=[False] * 3, dims=1)
    with pytest.raises(CpmliveError, match="nothing would be left"):
        binarise(masks)


def test_pruning_a_pruned_model_and_bad_targets_are_refused():
    masks = PruningMasks(CONFIG)
    removed = build_model(AntConfig.from_dict({**CONFIG.to_dict(),
                                               "mask_modules": [[True, False]] + [[False, False]] * 2}))
    with pytest.raises(CpmliveError, match="already has removed sub-blocks"):
        masks.attach(removed)
    for bad in (0, 1, 1.5, -0.1, "half"):
        with pytest.raises(CpmliveError, match="target"):
            PruneConfig(target=bad)


def test_pruned_checkpoint_loads_and_exports_to_hf_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model()
    masks = PruningMasks(CONFIG)
    set_gates(masks, heads=[1, 3], attention=[True, True, False], ffn=[False, True, True], dims=64)
    masks.attach(model)
    pruned = pruned_model(model, masks)
    path = save_checkpoint(pruned, pruned.config, tmp_path / "pruned", vocab=ANT_VOCAB)
    loaded = load_model(path)
    convert(path, tmp_path / "hf", to="hf")
    hf = transformers.CpmAntForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[6, 100, 200, 300, 400, 500]])
    with torch.no_grad():
        ours = loaded.logits(loaded(**probe_inputs()))[0, -1]
        theirs = hf(input_ids=ids).logits[0, -1, :CONFIG.vocab_size]
    assert torch.allclose(theirs, ours, atol=1e-3, rtol=1e-3)


# ---- the Lagrangian ---------------------------------------------------------------------------


def test_lagrangian_drives_the_expected_size_to_the_target():
    torch.manual_seed(0)
    model = random_model()
    config = PruneConfig(target=0.4, steps=100, target_warmup_steps=50, lr=1e-3)
    trainer = GateTrainer(model, config)
    batches = [packed_batch(seed) for seed in range(4)]
    logs = [trainer.step(lambda m, b=batches[i % 4]: masked_lm_loss(m, b)[0]) for i in range(config.steps)]
    assert logs[0]["expected_kept"] > 0.9
    assert abs(logs[-1]["expected_kept"] - 0.4) < 0.1, logs[-1]
    pruned = trainer.finish()
    kept = (prunable_parameters(pruned.config) if pruned.config.mask_modules is None else
            sum(4 * CONFIG.dim_model * pruned.config.dim_attention * (not a)
                + 3 * CONFIG.dim_model * pruned.config.dim_ff * (not f)
                for a, f in pruned.config.mask_modules))
    assert 0.2 < kept / prunable_parameters(CONFIG) < 0.6
    assert not any(module._forward_pre_hooks for module in model.modules())


# ---- distillation -------------------------------------------------------------------------------


def test_soft_kl_is_the_temperature_scaled_kl_divergence():
    student, teacher = torch.randn(5, 50), torch.randn(5, 50) * 2
    t = 3.0
    p = F.softmax(teacher.double() / t, -1)
    expected = (p * (p.log() - F.log_softmax(student.double() / t, -1))).sum() * t * t
    assert torch.allclose(soft_kl(student, teacher, t).double(), expected, rtol=1e-5)
    assert soft_kl(teacher, teacher, t).abs() < 1e-5


def test_distillation_of_a_model_from_itself_costs_nothing_but_its_lm_loss():
    model, batch = random_model(), packed_batch()
    loss, parts = distillation_loss(model, model, batch, DistillConfig(alpha=0.7, hidden_weight=1.0))
    assert parts["kl"].abs() < 1e-4 and parts["hidden_mse"] < 1e-10
    assert torch.allclose(parts["lm"], masked_lm_loss(model, batch)[0], rtol=1e-4)
    assert torch.allclose(loss, 0.3 * parts["lm"], rtol=1e-3, atol=1e-4)


def test_distillation_moves_a_student_towards_its_teacher():
    teacher, student = random_model(seed=1), random_model(seed=2)
    batch = packed_batch()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    config = DistillConfig(alpha=1.0, temperature=2.0)
    student.train()
    first = None
    for _ in range(30):
        loss, parts = distillation_loss(student, teacher, batch, config)
        first = first if first is not None else parts["kl"].item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert parts["kl"].item() < 0.5 * first


def test_bad_distillation_settings_and_mismatched_widths_are_refused():
    for bad in (dict(temperature=0), dict(alpha=1.5), dict(hidden_weight=-1)):
        with pytest.raises(CpmliveError):
            DistillConfig(**bad)
    with pytest.raises(CpmliveError, match="hidden states"):
        hidden_mse(torch.zeros(3, 4), torch.zeros(3, 5))
