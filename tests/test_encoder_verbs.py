"""The encoder-decoders and encoders through the verbs that apply to them (issue 34): the OpenAI
routes with the official client (T5's completions, EVA's dialogue as chat, BERT's embeddings),
fill, evaluate (against HF's loss), quantize, --memory-limit and the one-line refusals of what
does not apply."""

from __future__ import annotations

import base64
import json
import shutil
import struct

import openai
import pytest
import torch
from serving import serving

import cpmlive
from cpmlive.cli import main
from cpmlive.errors import CpmliveError
from cpmlive.infer.score import score_texts
from cpmlive.resources import demo_dir
from cpmlive.serve.app import create_app

transformers = pytest.importorskip("transformers")

PROMPT = "今天天气不错，"
DIALOGUE = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么事？"},
            {"role": "user", "content": "今天天气怎么样"}]


@pytest.fixture(scope="module")
def eva(tmp_path_factory):
    """cpm2-demo as a dialogue model (EVA's form): the same weights, ``dialogue`` on."""
    directory = tmp_path_factory.mktemp("eva") / "eva-demo"
    shutil.copytree(demo_dir("cpm2-demo"), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "dialogue": True}))
    return cpmlive.load(directory)


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_t5_completions_through_the_openai_client():
    lm = cpmlive.load("t5-demo")
    with serving(create_app(lm)) as url:
        api = client_for(url)
        served = api.models.list().data[0].id
        completion = api.completions.create(model=served, prompt=PROMPT, max_tokens=8, temperature=0)
        assert completion.choices[0].text == lm.generate(PROMPT, max_new_tokens=8)
        streamed = "".join(c.choices[0].text for c in api.completions.create(
            model=served, prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
        assert streamed == completion.choices[0].text
        with pytest.raises(openai.BadRequestError, match="cannot embed|cannot chat"):
            api.chat.completions.create(model=served, messages=DIALOGUE, max_tokens=4)


def test_eva_dialogue_is_the_originals_form_and_chats_through_the_server(eva):
    sep, start = eva.tokenizer.sep_id, eva.tokenizer.sentinel(0)
    utterances = [eva.tokenizer.encode(m["content"]) for m in DIALOGUE]
    expected_row = [t for u in utterances for t in u + [sep]] + [start, start]
    assert eva.encode_chat(DIALOGUE, eva.chat_template()) == expected_row
    options = eva._options(10, {})
    reply = eva.engine.submit(eva.request(expected_row, options, stop_ids=frozenset({sep}))).result()
    assert eva.chat(DIALOGUE, max_new_tokens=10) == reply.text
    with serving(create_app(eva)) as url:
        api = client_for(url)
        served = api.models.list().data[0].id
        chat = api.chat.completions.create(model=served, messages=DIALOGUE, max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == reply.text
        pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
            model=served, messages=DIALOGUE, max_tokens=10, temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == reply.text
        for messages, fragment in ((DIALOGUE[:1] + [{"role": "assistant", "content": "  "}] + DIALOGUE[2:],
                                    "an empty turn"),
                                   ([{"role": "system", "content": "你是助手"}] + DIALOGUE, "only user and assistant"),
                                   ([{"role": "user", "content": "a<sep>b"}], "the dialogue's own markup")):
            with pytest.raises(openai.BadRequestError, match=fragment):
                api.chat.completions.create(model=served, messages=messages, max_tokens=4)
        assert api.chat.completions.create(model=served, messages=DIALOGUE, max_tokens=2).choices


def test_an_empty_turn_is_one_line_on_the_command_line(eva, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    with pytest.raises(CpmliveError, match="an empty turn"):
        eva.chat([{"role": "user", "content": ""}])


def test_bert_embeddings_through_the_openai_client():
    lm = cpmlive.load("bert-demo")
    texts = ["今天天气不错", "北京是中国的首都"]
    with serving(create_app(lm)) as url:
        api = client_for(url)
        served = api.models.list().data[0].id
        answer = api.embeddings.create(model=served, input=texts)
        expected = lm.embed(texts, normalize=True)
        assert [d.index for d in answer.data] == [0, 1]
        assert torch.allclose(torch.tensor([d.embedding for d in answer.data]), torch.tensor(expected), atol=1e-6)
        assert answer.usage.prompt_tokens == sum(len(lm.tokenizer.encode_for_model(t)) for t in texts)
        raw = api.embeddings.with_raw_response.create(model=served, input="你好", encoding_format="base64")
        packed = json.loads(raw.text)["data"][0]["embedding"]
        vector = struct.unpack(f"<{lm.config.dim_model}f", base64.b64decode(packed))
        assert torch.allclose(torch.tensor(vector), torch.tensor(lm.embed("你好", normalize=True)), atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="BERT cannot generate text"):
            api.completions.create(model=served, prompt=PROMPT, max_tokens=4)
        with pytest.raises(openai.BadRequestError):
            api.embeddings.create(model=served, input=["x"] * 65)
        assert api.embeddings.create(model=served, input="好").data


def test_bert_fills_each_mask_with_one_token(capsys):
    lm = cpmlive.load("bert-demo")
    text = "北京是中国的<mask>都。"
    ids = lm.tokenizer.encode_for_model("北京是中国的") [:-1] + [lm.tokenizer.mask_id] + \
        lm.tokenizer.encode("都。") + [lm.tokenizer.eos_id]
    with torch.no_grad():
        logits = lm.model.logits(lm.model(torch.tensor([ids])))[0]
    best = lm.tokenizer.decode([int(logits[ids.index(lm.tokenizer.mask_id)].argmax())])
    assert lm.fill(text) == text.replace("<mask>", best)
    assert main(["fill", "bert-demo", text]) == 0
    assert capsys.readouterr().out.strip() == text.replace("<mask>", best)


def test_t5_evaluate_is_hfs_loss_of_the_decoders_span(tmp_path):
    """bits/char of a text: HF's summed cross-entropy of the decoder writing it from an empty input."""
    lm = cpmlive.load("t5-demo")
    config = lm.config
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.dim_model, d_kv=config.dim_head, d_ff=config.dim_ff,
        num_layers=config.num_encoder_layers, num_decoder_layers=config.num_layers, num_heads=config.num_heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)).eval()
    from cpmlive.model.t5.convert import ours_to_hf

    state = {k: v.float() for k, v in ours_to_hf(lm.model.state_dict()).items()}
    hf.lm_head.weight = torch.nn.Parameter(state["lm_head.weight"])  # untied first (transformers 5 ties every T5)
    hf.load_state_dict(state, strict=False)
    text = "北京是中国的首都。今天天气不错。"
    ids = lm.tokenizer.encode(text)
    with torch.no_grad():
        loss = hf(input_ids=torch.tensor([lm.tokenizer.encode_for_model("")]), labels=torch.tensor([ids])).loss
    score = score_texts(lm.model.float(), lm.tokenizer, [text])
    assert score.tokens == len(ids)
    assert abs(score.nats - loss.item() * len(ids)) < 1e-3 * len(ids)


def test_quantize_covers_the_encoder_and_a_memory_limit_decodes_the_same(tmp_path, capsys):
    assert main(["quantize", "t5-demo", str(tmp_path / "q8"), "--bits", "8"]) == 0
    quantized = cpmlive.load(tmp_path / "q8")
    kinds = {type(quantized.model.encoder_layers[0].attn.project_q).__name__,
             type(quantized.model.layers[0].cross.project_k).__name__}
    assert kinds == {"QuantizedLinear"}
    assert quantized.generate(PROMPT, max_new_tokens=6) == quantized.generate(PROMPT, max_new_tokens=6)
    limited = cpmlive.load("t5-demo", memory_limit="14MB")
    assert "streamed from the checkpoint" in limited.model.weight_stream.describe()
    assert limited.generate(PROMPT, max_new_tokens=6) == cpmlive.load("t5-demo").generate(PROMPT, max_new_tokens=6)


def test_what_does_not_apply_is_one_line(capsys, tmp_path):
    (tmp_path / "text.txt").write_text("今天天气不错\n", encoding="utf-8")
    for argv, fragment in ((["generate", "bert-demo", "你好"], "BERT cannot generate text"),
                           (["evaluate", "bert-demo", "--text", str(tmp_path / "text.txt")], "BERT cannot generate"),
                           (["fill", "bert-demo", "今天<mask>", "--blank-length", "2"], "blank lengths"),
                           (["chat", "t5-demo"], "T5 cannot chat")):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert fragment in error and error.count("\n") == 1, argv


@pytest.mark.parametrize("model", ["t5-demo", "cpm2-demo"])
def test_lora_finetune_and_merge(model, tmp_path, capsys):
    """LoRA on an encoder-decoder learns an input -> answer mapping; merged, it answers the same."""
    rows = [{"input": f"问题{i}：天气如何", "output": "很好"} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["finetune", "--model", model, "--data", str(data), "--out", str(out), "max_steps=40",
                 "eval_every=40", "batch_size=4", "lr=0.02", "max_input_tokens=32", "max_output_tokens=4",
                 "delta.target_modules=[project_q,project_v,w_0,w_1,w_out]", "progress=false"]) == 0
    tuned = cpmlive.load(model, adapter=out / "best")
    answer = tuned.generate("问题3：天气如何", max_new_tokens=4)
    assert answer == "很好"
    assert main(["merge", model, str(out / "best"), str(tmp_path / "merged")]) == 0
    merged = cpmlive.load(tmp_path / "merged")
    assert merged.generate("问题3：天气如何", max_new_tokens=4) == answer
    assert main(["finetune", "--model", model, "--data", str(data), "--out", str(tmp_path / "c"), "task=classify",
                 "max_steps=1", "progress=false"]) == 2
    assert "fine-tunes on generation tasks" in capsys.readouterr().err
