"""The BERT family against HF transformers on random weights, each architecture (BERT, RoBERTa)
with each published head (``…Model``'s pooler, ``…ForMaskedLM``, ``…ForSequenceClassification``),
saved by HF's own ``save_pretrained`` and read as published: hidden states, pooler, masked-token
logits and class logits within 1e-4 (padded rows too); sentence embeddings as sentence-transformers
pools them; the HF layout written back reads in HF to the same outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import cpmlive
from cpmlive.errors import CpmliveError
from cpmlive.model.bert import convert as bert_convert
from cpmlive.model.registry import family_of
from cpmlive.resources import demo_dir

transformers = pytest.importorskip("transformers")

TEXTS = ["今天天气不错，我们去公园散步。", "你好"]
HEADS = {"Model": ["pooler"], "ForMaskedLM": ["mlm"], "ForSequenceClassification": ["classifier"]}


def _vocab_size() -> int:
    return json.loads((demo_dir("bert-demo") / "config.json").read_text())["vocab_size"]


def _randomize(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.normal_(0, 0.3, generator=generator)


@pytest.fixture(scope="module", params=[(a, t) for a in ("Bert", "Roberta") for t in HEADS])
def pair(request, tmp_path_factory):
    architecture, task = request.param
    config = getattr(transformers, f"{architecture}Config")(
        vocab_size=_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, max_position_embeddings=64,
        pad_token_id=0 if architecture == "Bert" else 1)
    torch.manual_seed(0)
    hf = getattr(transformers, f"{architecture}{task}")(config).eval()
    _randomize(hf)
    directory = tmp_path_factory.mktemp(f"{architecture}{task}")
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir("bert-demo") / name, directory / name)
    return architecture, task, hf, cpmlive.load(directory), directory


def _batch(lm) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [lm.tokenizer.encode_for_model(text) for text in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([row + [lm.tokenizer.pad_id] * (width - len(row)) for row in rows])
    return ids, torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])


def test_the_family_reads_each_head(pair):
    architecture, task, _, lm, directory = pair
    assert family_of(directory).model_type == "bert" and lm.config.architecture == architecture.lower()
    # BERT's classifier reads the pooler; RoBERTa's has its own dense layer
    pooled = ["pooler"] if architecture == "Bert" and task == "ForSequenceClassification" else []
    assert lm.config.heads == pooled + HEADS[task]


def test_outputs_equal_hf(pair):
    _, task, hf, lm, _ = pair
    ids, mask = _batch(lm)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask)
        hidden = lm.model(ids, valid=mask.bool())
        if task == "Model":
            assert ((hidden - out.last_hidden_state).abs() * mask[..., None]).max() < 1e-4
            assert (lm.model.pooled(hidden) - out.pooler_output).abs().max() < 1e-4
        elif task == "ForMaskedLM":
            assert ((lm.model.logits(hidden) - out.logits).abs() * mask[..., None]).max() < 1e-4
        else:
            assert (lm.model.classify(hidden) - out.logits).abs().max() < 1e-4


def test_embeddings_pool_as_sentence_transformers(pair):
    _, task, hf, lm, _ = pair
    ids, mask = _batch(lm)
    with torch.no_grad():  # the encoder's states, whatever the head
        states = hf.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    got = lm.embed(TEXTS)
    assert torch.allclose(torch.tensor(got), mean, atol=1e-4)
    assert torch.allclose(torch.tensor(lm.embed(TEXTS, pooling="cls")), states[:, 0], atol=1e-4)
    normalized = torch.tensor(lm.embed(TEXTS, normalize=True))
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_the_hf_layout_written_back_reads_in_hf(pair, tmp_path):
    architecture, task, hf, lm, directory = pair
    ours = bert_convert.convert(directory, tmp_path / "ours")
    back = bert_convert.convert(ours, tmp_path / "hf", to="hf")
    reread = getattr(transformers, f"{architecture}{task}").from_pretrained(back).eval()
    ids, mask = _batch(lm)
    with torch.no_grad():
        expected, got = hf(input_ids=ids, attention_mask=mask), reread(input_ids=ids, attention_mask=mask)
    name = "last_hidden_state" if task == "Model" else "logits"
    assert (getattr(got, name) - getattr(expected, name)).abs().max() < 1e-5


def test_an_encoder_refuses_to_generate(pair):
    _, _, _, lm, _ = pair
    with pytest.raises(CpmliveError, match="BERT cannot generate text"):
        lm.generate("你好")


def test_a_classifier_checkpoint_classifies_through_the_api_and_the_server(pair):
    architecture, task, hf, lm, _ = pair
    if task != "ForSequenceClassification":
        with pytest.raises(CpmliveError, match="classification adapter"):
            lm.classify("你好")
        return
    ids, mask = _batch(lm)
    with torch.no_grad():
        expected = [hf.config.id2label[i] for i in hf(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()]
    assert lm.classify(TEXTS) == expected
    from serving import serving

    from cpmlive.serve.app import create_app

    with serving(create_app(lm)) as url:
        import httpx

        answer = httpx.post(f"{url}/v1/classify", json={"text": TEXTS}, timeout=60).json()
    assert answer["labels"] == expected


def test_lora_classification_finetune_learns_and_serves(tmp_path):
    """A new head over bert-demo with LoRA on its attention: it learns a separable task, resumes
    exactly, and its merged checkpoint classifies through the API as the run measured."""
    from cpmlive.cli import main

    rows = [{"input": f"{'今天天气很好' if i % 2 else '这部电影太差了'}{i}", "label": "好" if i % 2 else "差"}
            for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    args = ["finetune", "--model", "bert-demo", "--data", str(data), "--eval", str(data), "--out", str(out),
            "task=classify", "max_steps=24", "eval_every=12", "batch_size=8", "lr=0.01", "max_input_tokens=32",
            "progress=false"]
    assert main(args) == 0
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["accuracy"] == 100.0  # percent
    tuned = cpmlive.load(out / "best")
    assert tuned.config.labels == ["好", "差"] or tuned.config.labels == ["差", "好"]
    assert tuned.classify(["今天天气很好7", "这部电影太差了8"]) == ["好", "差"]
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["heads"][-1] == "classifier" and config["num_labels"] == 2
