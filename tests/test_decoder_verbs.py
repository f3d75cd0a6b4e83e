"""Every inference verb on HF decoder directories as they come (``tests/decoder_helpers.py``: a
Qwen2-style byte-level/ChatML one and a Llama-style SentencePiece one, random weights), checked
against HF transformers where it has a reference: generate (greedy, beam, stream, sample) and its
stop ids, the defaults of ``generation_config.json``, chat with the model's own template, tokenize,
info of a sharded bf16 directory, evaluate, ``--memory-limit``, the server through the official
``openai`` client, and the one-line refusals of bad input."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import cpmlive
from cpmlive.cli import main
from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig, generate_ids, hf_generation_defaults, with_defaults

from decoder_helpers import hf_model, tiny_hf_dir
from serving import serving

PROMPT = "这部电影"
PROMPTS = [PROMPT, "今天天气不错，我们去公园玩。"]
CHAT = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "这部电影怎么样？"}]


@pytest.fixture(scope="module")
def directories(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: tiny_hf_dir(root / name, name) for name in ("qwen2", "llama")}


@pytest.fixture(scope="module")
def references(directories) -> dict[str, torch.nn.Module]:
    return {name: hf_model(path) for name, path in directories.items()}


@pytest.fixture(scope="module")
def models(directories) -> dict[str, cpmlive.api.LM]:
    return {name: cpmlive.load(path) for name, path in directories.items()}


def cli(capsys, *args: object, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def hf_new_ids(model: torch.nn.Module, ids: list[int], **options: object) -> list[int]:
    """HF ``generate``'s new ids, the stop id that ended them dropped (ours leave it out)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             **options)[0, len(ids):].tolist()
    stops = model.generation_config.eos_token_id
    stops = {stops} if isinstance(stops, int) else set(stops or ())
    return next((out[:i] for i, token in enumerate(out) if token in stops), out)


def with_generation_config(source: Path, target: Path, **fields: object) -> Path:
    shutil.copytree(source, target)
    (target / "generation_config.json").write_text(json.dumps(fields), encoding="utf-8")
    return target


# ---- generate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_greedy_and_beam_ids_equal_hf_generate(name, directories, references, models, capsys):
    lm, reference = models[name], references[name]
    for prompt, beams in zip(PROMPTS, (1, 3)):
        expected = hf_new_ids(reference, lm.encode_prompt(prompt), max_new_tokens=12, do_sample=False, num_beams=beams)
        assert lm.generate_ids([prompt], max_new_tokens=12, num_beams=beams)[0] == expected, (prompt, beams)
    code, out, err = cli(capsys, "generate", directories[name], PROMPT, "--max-new-tokens", "12", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["ids"] == lm.generate_ids([PROMPT], max_new_tokens=12)[0]
    assert result["text"] == lm.tokenizer.decode(result["ids"])
    code, out, _ = cli(capsys, "generate", directories[name], PROMPT, "--max-new-tokens", "12", "--stream")
    assert code == 0 and out == result["text"] + "\n"
    assert "".join(lm.stream(PROMPT, max_new_tokens=12)) == result["text"]
    code, out, _ = cli(capsys, "generate", directories[name], PROMPT, "--max-new-tokens", "4", "--do-sample",
                       "--seed", "3", "--top-k", "20", "--num-return-sequences", "2", "--json")
    assert code == 0 and len(json.loads(out)["texts"]) == 2


def test_text_decoded_a_token_at_a_time_is_the_text(models):
    """The engine's text of a growing list of ids equals decoding the list at once: SentencePiece's
    leading spaces and characters split over byte tokens come out whole (decoding each token
    alone loses the spaces and gives U+FFFD for each piece of a character)."""
    from cpmlive.infer.engine import IncrementalText

    text = "Hello world 你好，影院 hello"
    for lm in models.values():
        ids = lm.tokenizer.encode(text)
        pieces = IncrementalText(lm.tokenizer)
        released = [pieces.add(token) for token in ids]
        assert pieces.flush() == lm.tokenizer.decode(ids) == text.strip()
        assert all(later.startswith(earlier) and "\ufffd" not in later
                   for earlier, later in zip(released, released[1:]))
    assert "".join(models["llama"].tokenizer.decode([token]) for token in ids) != text


def test_every_stop_id_of_the_generation_config_ends_generation(directories, tmp_path):
    source = directories["qwen2"]
    lm = cpmlive.load(source)
    free = lm.generate_ids([PROMPT], max_new_tokens=24)[0]
    position, stop = next((i, t) for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    stops = sorted(lm.tokenizer.stop_ids | {stop})
    path = with_generation_config(source, tmp_path / "stops", eos_token_id=stops, do_sample=False)
    stopping, reference = cpmlive.load(path), hf_model(path)
    assert stopping.tokenizer.stop_ids == set(stops)
    ids = stopping.encode_prompt(PROMPT)
    assert stopping.generate_ids([PROMPT], max_new_tokens=24)[0] == free[:position]
    assert hf_new_ids(reference, ids, max_new_tokens=24) == free[:position]
    assert "".join(stopping.stream(PROMPT, max_new_tokens=24)) == stopping.tokenizer.decode(free[:position])
    for options in ({"num_beams": 3}, {"min_new_tokens": position + 3}):
        expected = hf_new_ids(reference, ids, max_new_tokens=24, do_sample=False, **options)
        assert stopping.generate_ids([PROMPT], max_new_tokens=24, **options)[0] == expected, options


def test_generation_config_supplies_the_defaults(directories, tmp_path, capsys):
    path = with_generation_config(directories["llama"], tmp_path / "defaults", do_sample=False, max_new_tokens=7,
                                  repetition_penalty=1.3, eos_token_id=2)
    lm, reference = cpmlive.load(path), hf_model(path)
    ids = lm.generate_ids([PROMPT])[0]
    assert len(ids) == 7 and ids == hf_new_ids(reference, lm.encode_prompt(PROMPT))
    assert ids != lm.generate_ids([PROMPT], repetition_penalty=1.0)[0]
    code, out, err = cli(capsys, "generate", path, PROMPT, "--json")
    assert code == 0 and json.loads(out)["ids"] == ids, err
    assert len(lm.generate_ids([PROMPT], max_new_tokens=3)[0]) == 3  # the caller's value wins

    sampling = with_generation_config(directories["llama"], tmp_path / "sampling", do_sample=True, temperature=0.7,
                                      top_p=0.8, eos_token_id=[2])
    defaults = hf_generation_defaults(sampling)
    assert defaults == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 50}  # HF's top_k
    assert with_defaults({"num_beams": 2}, defaults)["num_beams"] == 2 and "do_sample" not in with_defaults(
        {"num_beams": 2}, defaults)
    assert with_defaults({"do_sample": False}, defaults)["do_sample"] is False
    sampler = cpmlive.load(sampling)
    first, second = (sampler.generate_ids([PROMPT], max_new_tokens=8, seed=seed)[0] for seed in (1, 2))
    assert first != second  # sampled, as the config asks
    assert sampler.generate_ids([PROMPT], max_new_tokens=8, do_sample=False)[0] == lm.generate_ids(
        [PROMPT], max_new_tokens=8, repetition_penalty=1.0)[0]
    code, out, err = cli(capsys, "generate", sampling, PROMPT, "--greedy", "--max-new-tokens", "8", "--json")
    assert code == 0 and json.loads(out)["ids"] == lm.generate_ids([PROMPT], max_new_tokens=8,
                                                                     repetition_penalty=1.0)[0]
    ignored = hf_generation_defaults(with_generation_config(directories["llama"], tmp_path / "greedy", temperature=0.0,
                                                            do_sample=False))
    assert ignored == {"do_sample": False}  # HF ignores the sampling fields of a config that does not sample


# ---- chat ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_chat_renders_the_model_template_as_hf(name, directories, models, capsys, monkeypatch):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(directories[name])
    lm = models[name]
    template = lm.chat_template()
    for messages in (CHAT, CHAT[:2], CHAT[1:2]):
        assert template.render(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert lm.encode_chat(messages, template) == list(expected)  # Llama's <s> once
    end = {"qwen2": "<|im_end|>", "llama": "</s>"}[name]
    assert template.stop_ids == {reference.convert_tokens_to_ids(end)}
    answer = lm.chat([{"role": "user", "content": "你好"}], max_new_tokens=6)
    code, out, err = cli(capsys, "chat", directories[name], "--max-new-tokens", "6", stdin="你好\n",
                         monkeypatch=monkeypatch)
    assert code == 0 and out == answer + "\n", err


def test_chat_stops_at_the_templates_end_of_turn(directories, tmp_path):
    """A model whose EOS is not the token that closes a turn (a base model's ``<|endoftext|>``)
    still ends its chat answer there, as its template closes the assistant's turn."""
    path = tmp_path / "base"
    shutil.copytree(directories["qwen2"], path)
    (path / "generation_config.json").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}),
                                                encoding="utf-8")
    lm = cpmlive.load(path)
    turn_end = lm.tokenizer.token_to_id("<|im_end|>")
    assert turn_end not in lm.tokenizer.stop_ids and lm.chat_template().stop_ids == {turn_end}

    messages = [{"role": "user", "content": "你好"}]
    prompt = lm.encode_chat(messages, lm.chat_template())

    def end_turn_after_three(logits, histories):
        if len(histories[0]) == len(prompt) + 3:
            logits[:, turn_end] = 1e4
        return logits

    first = generate_ids(lm.model, [prompt], GenerationConfig(max_new_tokens=3), lm.stop_ids)[0]
    assert len(first) == 3
    assert lm.chat(messages, max_new_tokens=20, logits_processor=end_turn_after_three) == lm.tokenizer.decode(first)


# ---- tokenize, info, evaluate, --memory-limit --------------------------------------------------------


def test_tokenize_as_hf(directories, capsys):
    import transformers

    for name, path in directories.items():
        reference = transformers.AutoTokenizer.from_pretrained(path)
        for target in (path, path / "tokenizer.json"):
            code, out, err = cli(capsys, "tokenize", target, PROMPTS[1], "--json")
            assert code == 0, err
            result = json.loads(out)
            assert result["ids"] == reference.encode(PROMPTS[1], add_special_tokens=False), name
            assert result["pieces"] == reference.convert_ids_to_tokens(result["ids"])


def test_info_and_stored_dtype_of_a_sharded_bf16_directory(directories, tmp_path, capsys):
    path = tmp_path / "bf16"
    half = hf_model(directories["qwen2"]).to(torch.bfloat16)
    half.save_pretrained(path, max_shard_size="150KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(directories["qwen2"] / name, path / name)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    code, out, err = cli(capsys, "info", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["model_type"], info["format"], info["dtypes"]) == ("decoder", "hf", ["bfloat16"])
    assert info["parameters"] == sum(p.numel() for p in half.parameters())
    kept = cpmlive.load(path, stored_weights=True)
    assert kept.model.layers[0].attn.project_q.weight.dtype == torch.bfloat16
    ids = torch.tensor([kept.encode_prompt(PROMPT)])
    import transformers

    upcast = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # the same values
    with torch.no_grad():
        ours = kept.model.logits(kept.model(ids))
        expected = upcast(ids).logits
    assert (ours - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    assert kept.generate_ids([PROMPT], max_new_tokens=8) == cpmlive.load(path).generate_ids([PROMPT], max_new_tokens=8)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_evaluate_bits_per_char_equals_hf_loss(name, directories, references, models, tmp_path, capsys):
    lines = ["今天天气不错，我们去公园玩。", "这部电影很好看，演员演得很好。", "Hello world 你好"]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = cli(capsys, "evaluate", directories[name], "--text", tmp_path / "text.txt", "--json")
    assert code == 0, err
    score = json.loads(out)
    tokenizer = models[name].tokenizer
    nats = 0.0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(line)]])
            nats += references[name](ids, labels=ids).loss.item() * (ids.size(1) - 1)
    chars = sum(map(len, lines))
    assert score["chars"] == chars
    assert score["bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-4)


def test_memory_limit_decodes_the_same_ids(directories, models, capsys):
    code, out, err = cli(capsys, "generate", directories["llama"], PROMPT, "--max-new-tokens", "8", "--json",
                         "--memory-limit", "0.7MB")
    assert code == 0, err
    assert json.loads(out)["ids"] == models["llama"].generate_ids([PROMPT], max_new_tokens=8)[0]


def test_an_embedding_with_more_rows_than_tokens_generates_as_hf(directories, tmp_path):
    """Qwen pads its embedding past the tokenizer's tokens: such a directory loads and decodes as HF's."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "padded"
    shutil.copytree(directories["qwen2"], path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    weights = load_file(path / "model.safetensors")
    rows = config["vocab_size"]
    save_file({k: torch.cat([v, v.new_zeros(64, v.size(1))]) if v.size(0) == rows else v for k, v in weights.items()},
              path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": rows + 64}), encoding="utf-8")
    lm = cpmlive.load(path)
    assert lm.config.vocab_size == lm.tokenizer.vocab_size + 64
    ids = lm.generate_ids([PROMPT], max_new_tokens=8)[0]
    assert ids == hf_new_ids(hf_model(path), lm.encode_prompt(PROMPT), max_new_tokens=8, do_sample=False)


# ---- the server ---------------------------------------------------------------------------------------


def test_completions_and_chat_through_the_openai_client(directories):
    import openai

    from cpmlive.serve.app import create_app

    lm = cpmlive.load(directories["qwen2"])
    expected = lm.generate(PROMPT, max_new_tokens=6)
    messages = [{"role": "user", "content": "你好"}]
    answer = lm.chat(messages, max_new_tokens=6)
    with serving(create_app(lm)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
        assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(lm.encode_prompt(PROMPT))
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=name, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
        assert streamed == expected
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == answer
        assert chat.usage.prompt_tokens == len(lm.encode_chat(messages, lm.chat_template()))
        pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=name, messages=messages, max_tokens=6, temperature=0, stream=True) if chunk.choices]
        assert "".join(pieces) == answer
        # no max_tokens and no temperature: the generation config's greedy 32 tokens
        default = client.completions.create(model=name, prompt=PROMPT)
        assert default.choices[0].text == lm.generate(PROMPT)
        with pytest.raises(openai.BadRequestError, match="at most"):
            client.completions.create(model=name, prompt=PROMPT * 80, max_tokens=4)


def test_the_task_routes_answer_or_refuse_in_one_line(models):
    from fastapi.testclient import TestClient

    from cpmlive.serve.app import create_app

    with TestClient(create_app(models["qwen2"])) as client:
        titles = client.post("/v1/title", json={"article": "今天天气不错，我们去公园玩。这部电影很好看。", "n": 2,
                                                "num_beams": 2, "samples": 1})
        assert titles.status_code == 200, titles.text
        assert isinstance(titles.json()["titles"], list)
        refused = client.post("/v1/classify", json={"text": "这部电影很好看"})
        assert refused.status_code == 400 and "no classification adapter" in refused.text
        refused = client.post("/v1/fill", json={"text": "今天<mask>不错"})
        assert refused.status_code == 400 and "Llama-family" in refused.text


# ---- bad input ----------------------------------------------------------------------------------------


def broken(directory: Path, target: Path, case: str) -> Path:
    shutil.copytree(directory, target)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    if case == "architecture":
        config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    elif case == "tokenizer":
        (target / "tokenizer.json").unlink()
    elif case == "vocabulary":
        from safetensors.torch import load_file, save_file

        weights = load_file(target / "model.safetensors")
        save_file({k: v[:600] if v.size(0) == config["vocab_size"] else v for k, v in weights.items()},
                  target / "model.safetensors", metadata={"format": "pt"})
        config["vocab_size"] = 600
    elif case == "generation":
        (target / "generation_config.json").write_text('{"max_new_tokens": 0}', encoding="utf-8")
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


@pytest.mark.parametrize("case, fragment", [
    ("architecture", "'gpt_neox'"),
    ("tokenizer", "no tokenizer.json"),
    ("vocabulary", "the tokenizer has 700 tokens, the embedding only 600 rows"),
    ("generation", "generation_config.json: max_new_tokens must be at least 1"),
    ("context", "this model takes at most 256"),
])
def test_bad_input_is_one_line(case, fragment, directories, tmp_path, capsys):
    path = directories["qwen2"] if case == "context" else broken(directories["qwen2"], tmp_path / case, case)
    prompt = PROMPTS[1] * 30 if case == "context" else PROMPT
    for verb in (["generate", path, prompt], ["chat", path]):
        if case == "context" and verb[0] == "chat":
            continue
        code, out, err = cli(capsys, *verb)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and out == "" and len(lines) == 1 and fragment in lines[0], (verb, err)


def test_a_bad_generation_config_value_is_refused_naming_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "top_p": 2}', encoding="utf-8")
    with pytest.raises(CpmliveError, match=r"generation_config.json: top_p must be in \(0, 1\]"):
        hf_generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(CpmliveError, match="must be a JSON object"):
        hf_generation_defaults(tmp_path)
