"""Our CPM-Ant against outputs of the original OpenBMB code (../shared/fixtures/reference/ant-tiny)."""

import json

import pytest
import torch
import torch.nn.functional as F

from cpmlive.model.ant.config import AntConfig
from cpmlive.model.checkpoint import model_from_state_dict, read_safetensors
from cpmlive.model.openbmb import openbmb_to_ours

from conftest import REFERENCE

TINY = REFERENCE / "ant-tiny"
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    config = AntConfig.load(TINY / "config.json")
    model = model_from_state_dict(config, openbmb_to_ours(read_safetensors(TINY / "model.safetensors"), config))
    cases = read_safetensors(TINY / "cases.safetensors")
    meta = json.loads((TINY / "cases.json").read_text("utf-8"))
    return model, cases, meta


def generation_valid(length: torch.Tensor, total: int, prompt: int) -> torch.Tensor:
    """inference(): prompt always valid; text position P+i valid iff (L-P-1-i) < length."""
    text = torch.arange(total - prompt - 1, -1, -1)[None, :] < length[:, None]
    return torch.cat([torch.ones(length.size(0), prompt, dtype=torch.bool), text], dim=1)


def check_outputs(model, hidden, cases, prefix, valid):
    logits = model.logits(hidden)
    cols = cases["logit_columns"].long()
    v = valid
    assert (hidden[v] - cases[f"{prefix}.hidden"][v]).abs().max() < ATOL
    assert (logits[..., cols][v] - cases[f"{prefix}.logits_cols"][v]).abs().max() < ATOL
    lse = torch.logsumexp(logits.double(), -1).float()
    assert (lse[v] - cases[f"{prefix}.logsumexp"][v]).abs().max() < ATOL
    assert (logits.max(-1).values[v] - cases[f"{prefix}.max"][v]).abs().max() < ATOL
    assert torch.equal(logits.argmax(-1)[v].int(), cases[f"{prefix}.argmax"][v])


@torch.no_grad()
def test_generation_prefill_matches_openbmb(reference):
    model, cases, _ = reference
    inp = cases["gen.input"].long()
    valid = generation_valid(cases["gen.length"], inp.size(1), 32)
    hidden = model(inp, cases["gen.segment"], cases["gen.context"], cases["gen.span"], valid)
    text_valid = valid & cases["gen.context"].bool()
    check_outputs(model, hidden, cases, "gen", text_valid)
    assert (model.logits(hidden[:, -1]) - cases["gen.logits_last"]).abs().max() < ATOL


@torch.no_grad()
def test_packed_training_forward_and_loss_match_openbmb(reference):
    model, cases, meta = reference
    inp = cases["train.input"].long()
    valid = torch.arange(inp.size(1))[None, :] < cases["train.length"][:, None]
    hidden = model(inp, cases["train.segment"], cases["train.context"], cases["train.span"], valid)
    check_outputs(model, hidden, cases, "train", valid)
    logits = model.logits(hidden)
    loss = F.cross_entropy(logits.flatten(0, 1), cases["train.target"].flatten(), ignore_index=-100)
    assert abs(loss.item() - meta["cases"]["train"]["loss"]) < 1e-4


@torch.no_grad()
def test_cached_greedy_decoding_matches_openbmb(reference):
    model, cases, meta = reference
    inp = cases["gen.input"].long()
    batch, total = inp.shape
    valid = generation_valid(cases["gen.length"], total, 32)
    cache = model.new_cache(batch, total + 8)
    hidden = model(inp, cases["gen.segment"], cases["gen.context"], cases["gen.span"], valid, cache=cache)[:, -1]
    ones = torch.ones(batch, 1, dtype=torch.int32)
    cols = cases["logit_columns"].long()
    for step in range(8):
        logits = model.logits(hidden)
        assert (hidden - cases["decode.step_hidden"][step]).abs().max() < ATOL
        assert (logits[:, cols] - cases["decode.step_logits_cols"][step]).abs().max() < ATOL
        assert torch.equal(logits.argmax(-1).int(), cases["decode.step_argmax"][step])
        if step == 1:
            assert (logits - cases["decode.step_logits_full_1"]).abs().max() < ATOL
        if step == 7:
            break
        token = cases["decode.step_input"][step].long()[:, None]
        hidden = model(token, 2 * ones, ones, 0 * ones, ones.bool(), cache=cache)[:, -1]
    assert cases["decode.tokens"].tolist() == meta["cases"]["decode"]["greedy_tokens"]
