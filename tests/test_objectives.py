"""CPM-Ant pretraining data (spec section 4) against the original pipeline's outputs, plus the
statistics and the no-leakage property the objectives rely on."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.data.objectives import (
    GENERATION, IGNORE_INDEX, INFILLING, Batch, BatchPacker, Instance, OriginalRng, chunk_document, make_instance,
    make_record, pack,
)
from cpmlive.model import loss as head_loss
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import model_from_state_dict, read_safetensors
from cpmlive.model.openbmb import openbmb_to_ours
from cpmlive.model.loss import LinearCrossEntropy, head_losses, masked_lm_loss

from conftest import REFERENCE

TINY = REFERENCE / "ant-tiny"
PROMPT = 32
INSTANCE_FIELDS = {"inputs": "input", "targets": "target", "context": "context",
                   "position": "position", "segment": "segment", "task": "task"}
ROW_FIELDS = {"ctx": "input_ids", "tgt": "target", "context": "context", "segment": "segment",
              "position": "position", "span": "span", "task": "task"}


def text_of(instance: Instance) -> slice:
    return slice(PROMPT, instance.length)


def instance_of_length(length: int, rng: np.random.Generator) -> Instance:
    return make_instance(make_record([10] * (length - PROMPT - 2), GENERATION), rng)


# ---- the original pipeline, bit for bit ---------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_samples() -> dict:
    return json.loads((REFERENCE / "ant-pretrain-samples.json").read_text("utf-8"))


def test_records_match_original_preprocessing(pretrain_samples):
    for sample in pretrain_samples["samples"]:
        record = sample["record"]
        rng = random.Random(sample["preprocess_seed"])
        assert chunk_document(record[6:-1], rng) == [record]
        assert record[0] == sample["global_task"]


def test_instances_match_original_dataset(pretrain_samples):
    for sample in pretrain_samples["samples"]:
        instance = make_instance(sample["record"], OriginalRng.seeded(sample["item_seed"]))
        expected = sample["item"]
        for key, attr in INSTANCE_FIELDS.items():
            assert getattr(instance, attr).tolist() == expected[key], (sample["item_seed"], key)
        assert instance.length == expected["length"]
        assert int((~instance.context).sum()) == sample["num_masked"]


def test_packed_row_matches_original_packer(pretrain_samples):
    instances = [make_instance(s["record"], OriginalRng.seeded(s["item_seed"]))
                 for s in pretrain_samples["samples"]]
    batch = pack(instances, max_length=1024, batch_size=1)
    row = pretrain_samples["packing"]["row"]
    for key, attr in ROW_FIELDS.items():
        assert getattr(batch, attr)[0].tolist() == row[key], key
    assert batch.length.tolist() == row["len_ctx"]
    assert torch.equal(batch.valid[0], torch.arange(1024) < row["len_ctx"][0])


def test_global_generators_replay_the_original_calls(pretrain_samples):
    sample = pretrain_samples["samples"][0]
    saved = random.getstate(), np.random.get_state()
    try:
        random.seed(sample["item_seed"])
        np.random.seed(sample["item_seed"])
        instance = make_instance(sample["record"], OriginalRng())
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    assert instance.context.tolist() == sample["item"]["context"]


@pytest.fixture(scope="module")
def tiny_reference():
    config = AntConfig.load(TINY / "config.json")
    model = model_from_state_dict(config, openbmb_to_ours(read_safetensors(TINY / "model.safetensors"), config))
    cases = read_safetensors(TINY / "cases.safetensors")
    meta = json.loads((TINY / "cases.json").read_text("utf-8"))["cases"]["train"]
    return model, cases, meta


def test_train_case_batch_and_loss_match_original(tiny_reference):
    model, cases, meta = tiny_reference
    seeds = [11, 12, 13, 14, 15]
    assert f"s = {seeds}" in meta["item_seeds"]
    instances = [make_instance(r["record"], OriginalRng.seeded(s)) for r, s in zip(meta["records"], seeds)]
    batch = pack(instances, max_length=128, batch_size=2)
    for name, attr in {"input": "input_ids", "context": "context", "segment": "segment", "span": "span",
                       "target": "target", "task": "task", "length": "length"}.items():
        expected = cases[f"train.{name}"]
        assert torch.equal(getattr(batch, attr).to(expected.dtype), expected), name
    with torch.no_grad():
        loss, per_task = masked_lm_loss(model, batch)
    assert abs(loss.item() - cases["train.loss"].item()) < 1e-4
    for name, value in meta["task_loss"].items():
        assert abs(per_task[name].item() - value) < 1e-4


# ---- records and chunking -----------------------------------------------------------------------


def test_record_headers():
    assert make_record([100, 101], INFILLING) == [1, 1, 4, 1, 0, 6, 100, 101, 7]
    assert make_record([100], GENERATION, bos_id=1, eos_id=2) == [2, 1, 3, 2, 1, 1, 100, 2]
    with pytest.raises(ValueError):
        make_record([100], 3)


def test_chunking_splits_and_stops_at_short_piece():
    ids = list(range(990 * 2 + 31))
    records = chunk_document(ids, random.Random(5))
    assert [r[2] - 2 for r in records] == [990, 990]
    assert records[1][6:-1] == ids[990:1980]
    draws = random.Random(5)
    expected = [INFILLING if draws.random() <= 0.5 else GENERATION for _ in range(3)]
    assert [r[0] for r in records] == expected[:2]
    assert chunk_document(list(range(31)), random.Random(0)) == []
    assert len(chunk_document(list(range(100)), random.Random(0), max_length=64, min_tokens=4)) == 4


# ---- statistics of our own (Generator) sampling -------------------------------------------------


def test_task_split_is_even():
    rng = random.Random(1234)
    tasks = [chunk_document(list(range(40)), rng)[0][0] for _ in range(4000)]
    # binomial sd is ~32: a seeded run far inside 6 sd
    assert abs(tasks.count(INFILLING) - 2000) < 200


@pytest.mark.parametrize("task", [INFILLING, GENERATION])
def test_masked_count_is_uniform_and_shape_is_right(task):
    rng = np.random.default_rng(task)
    tokens = list(range(100, 110))
    n = len(tokens) + 2
    counts = np.zeros(n, dtype=np.int64)
    eos_masked = 0
    for _ in range(11000):
        instance = make_instance(make_record(tokens, task), rng)
        context = instance.context[text_of(instance)]
        m = int((~context).sum())
        counts[m] += 1
        assert context[0], "the <s> of a segment is never masked"
        if task == GENERATION:
            assert context.tolist() == [True] * (n - m) + [False] * m
        eos_masked += not context[-1]
    observed = counts[1:]
    assert counts[0] == 0 and observed.min() > 0
    chi2 = float(((observed - 1000) ** 2 / 1000).sum())
    assert chi2 < 40  # 10 degrees of freedom: P(chi2 > 40) ~ 2e-5
    if task == INFILLING:
        # eos is masked with probability E[m]/(n-1) = 1/2 + 1/(2(n-1))
        assert abs(eos_masked / 11000 - (0.5 + 0.5 / (n - 1))) < 0.03


def test_targets_and_prompt_layout():
    rng = np.random.default_rng(0)
    for task in (INFILLING, GENERATION):
        instance = make_instance(make_record(list(range(100, 140)), task), rng)
        seg_type, seg_task = (1, 0) if task == INFILLING else (2, 1)
        assert instance.input[:PROMPT].tolist() == list(range(task * PROMPT, task * PROMPT + PROMPT))
        assert instance.context[:PROMPT].all() and (instance.target[:PROMPT] == IGNORE_INDEX).all()
        assert (instance.segment[:PROMPT] == 0).all() and (instance.segment[PROMPT:] == seg_type).all()
        assert (instance.task[PROMPT:] == seg_task).all()
        text = instance.input[PROMPT:]
        expected = np.where(instance.context[PROMPT + 1:], IGNORE_INDEX, text[1:]).tolist() + [IGNORE_INDEX]
        assert instance.target[PROMPT:].tolist() == expected
    assert make_instance(make_record(list(range(991)), INFILLING), rng) is None


# ---- packing ------------------------------------------------------------------------------------


def test_packer_is_first_fit_strict_and_emits_on_overflow():
    rng = np.random.default_rng(0)
    packer = BatchPacker(max_length=100, batch_size=2)
    results = [packer.add(instance_of_length(length, rng)) for length in (50, 50, 49, 40, 60)]
    assert results[:4] == [None] * 4
    batch = results[4]
    assert batch.length.tolist() == [99, 90]
    assert batch.span[0].tolist() == [0] * 50 + [1] * 49 + [2]
    assert batch.span[1].tolist() == [0] * 50 + [1] * 40 + [2] * 10
    assert (batch.task[1, 90:] == -1).all() and (batch.target[1, 90:] == IGNORE_INDEX).all()
    assert not batch.context[1, 90:].any() and not batch.valid[1, 90:].any() and batch.valid[1, :90].all()
    rest = packer.flush()
    assert rest.length.tolist() == [60] and packer.flush() is None


def test_pack_all_rows_and_dtypes():
    rng = np.random.default_rng(0)
    instances = [instance_of_length(length, rng) for length in (60, 60, 60, 60, 60)]
    assert pack(instances, 100, 2).length.tolist() == [60, 60]
    batch = pack(instances, 100, 2, all_rows=True).to("cpu")
    assert batch.length.tolist() == [60] * 5
    dtypes = {"input_ids": torch.long, "segment": torch.int32, "context": torch.bool, "span": torch.int32,
              "valid": torch.bool, "target": torch.long, "task": torch.long}
    for name, dtype in dtypes.items():
        assert getattr(batch, name).dtype == dtype, name
    with pytest.raises(ValueError):
        pack(instances, 50, 2)


# ---- no leakage through the attention mask ------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    config = dataclasses.replace(preset("tiny"), vocab_size=200)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():  # larger embeddings and bias than the training init: stronger signal
        for table in (model.input_embedding, model.prompt_embedding, model.segment_embedding,
                      model.position_bias):
            table.weight.normal_(generator=torch.Generator().manual_seed(1))
    return model


def packed_rows() -> Batch:
    rng = np.random.default_rng(7)
    instances = []
    for k in range(8):
        tokens = rng.integers(100, 200, size=int(rng.integers(6, 24))).tolist()
        instances.append(make_instance(make_record(tokens, (INFILLING, GENERATION)[k % 2]), rng))
    return pack(instances, max_length=128, batch_size=4, all_rows=True)


def test_target_token_never_leaks_backward_or_across_spans(small_model):
    batch = packed_rows()
    assert set(batch.task[batch.valid].tolist()) == {0, 1} and int(batch.span.max()) >= 2
    rows, steps = (batch.target != IGNORE_INDEX).nonzero(as_tuple=True)
    changed = batch.input_ids[rows].clone()
    index = torch.arange(len(rows))
    changed[index, steps + 1] = 100 + (changed[index, steps + 1] - 100 + 37) % 100
    assert not batch.context[rows, steps + 1].any()

    def run(input_ids):
        hidden = small_model(input_ids, batch.segment[rows], batch.context[rows], batch.span[rows],
                             batch.valid[rows])
        return hidden, small_model.logits(hidden)

    with torch.no_grad():
        hidden, logits = run(batch.input_ids[rows])
        new_hidden, new_logits = run(changed)
    column = torch.arange(batch.input_ids.size(1))[None, :]
    own_span = batch.span[rows] == batch.span[rows, steps + 1][:, None]
    unaffected = batch.valid[rows] & (~own_span | (column <= steps[:, None]))
    assert unaffected.sum() > 0 and (~unaffected & batch.valid[rows]).sum() > 0
    assert (hidden - new_hidden).abs()[unaffected].max() <= 1e-6
    assert (logits - new_logits).abs()[unaffected].max() <= 1e-6
    # the changed token itself is seen, so the check above is not vacuous
    assert (hidden[index, steps + 1] - new_hidden[index, steps + 1]).abs().amax(-1).min() > 1e-4


def test_loss_gathers_targets_and_backpropagates(small_model):
    batch = packed_rows()
    loss, per_task = masked_lm_loss(small_model, batch)
    hidden = small_model(batch.input_ids, batch.segment, batch.context, batch.span, batch.valid)
    full = torch.nn.functional.cross_entropy(small_model.logits(hidden).flatten(0, 1),
                                             batch.target.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - full.item()) < 1e-5
    has_target = batch.target != IGNORE_INDEX
    counts = {name: int((has_target & (batch.task == t)).sum()) for t, name in ((0, "mlm"), (1, "lm"))}
    weighted = sum(per_task[name].item() * counts[name] for name in counts) / sum(counts.values())
    assert abs(weighted - loss.item()) < 1e-5
    loss.backward()
    assert small_model.input_embedding.weight.grad is not None
    small_model.zero_grad(set_to_none=True)


def head_case(rows: int = 21, vocab: int = 50, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / dim**0.5
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[[2, 9, 20]] = IGNORE_INDEX
    return hidden, weight, targets


def reference_head(hidden, weight, targets, autocast: bool = False):
    """The plain autograd path: the logits, their float32 copy, cross-entropy."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("autocast,tolerance", [(False, 1e-5), (True, 2e-2)], ids=["fp32", "bf16-autocast"])
def test_linear_cross_entropy_matches_the_plain_path(monkeypatch, autocast, tolerance):
    monkeypatch.setattr(head_loss, "LOSS_ROW_BUCKET", 8)  # 21 rows: three blocks, the last partial
    hidden, weight, targets = head_case()
    ours = [t.clone().requires_grad_() for t in (hidden, weight)]
    theirs = [t.clone().requires_grad_() for t in (hidden, weight)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, losses = LinearCrossEntropy.apply(*ours, targets)
    expected = reference_head(*theirs, targets, autocast)
    (total / 18).backward()
    (expected.sum() / 18).backward()
    assert losses[[2, 9, 20]].eq(0).all() and not losses.requires_grad
    assert (losses - expected.detach()).abs().max() < tolerance * 10
    assert abs(total.item() - expected.sum().item()) < tolerance * 100
    for ours_leaf, their_leaf in zip(ours, theirs):
        scale = their_leaf.grad.abs().max()
        assert (ours_leaf.grad - their_leaf.grad).abs().max() < tolerance * scale


def test_linear_cross_entropy_frozen_head_and_no_grad(monkeypatch):
    monkeypatch.setattr(head_loss, "LOSS_ROW_BUCKET", 8)
    hidden, weight, targets = head_case(seed=1)
    leaf = hidden.clone().requires_grad_()
    total, _ = LinearCrossEntropy.apply(leaf, weight, targets)  # the head frozen (LoRA)
    total.backward()
    expected = hidden.clone().requires_grad_()
    reference_head(expected, weight, targets).sum().backward()
    assert weight.grad is None and (leaf.grad - expected.grad).abs().max() < 1e-5
    losses, gradient = head_losses(hidden, weight, targets)
    assert gradient is None and (losses - reference_head(hidden, weight, targets)).abs().max() < 1e-5
