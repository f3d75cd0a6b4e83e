"""CPM-Bee wherever a model goes: `cpmlive bee` (and its bad inputs), convert and info, evaluate,
int8 quantization, --memory-limit, LoRA fine-tuning into a PEFT-layout adapter, the engine,
``/v1/bee`` and the site's ``/bee`` page."""

import json
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import cpmlive
from cpmlive.model.registry import preset
from cpmlive.errors import CpmliveError
from cpmlive.data.bee import batch_prompts, prompt_for, tree_arrays
from cpmlive.infer.bee import fill_tasks
from cpmlive.infer.engine import Request
from cpmlive.infer.generate import GenerationConfig
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.model.registry import family_of
from cpmlive.serve.app import create_app

from conftest import ANT_VOCAB, FIXTURES, REFERENCE
from serving import chromium_page, serving
from test_cli import assert_clean_error, run

BEE = REFERENCE / "bee-tiny"
VOCAB = FIXTURES / "cpm-bee-vocab.txt"
TRANSLATE = {"input": "北京是中国的首都", "prompt": "中翻英", "<ans>": ""}
FILL = {"document": "今天天气是真的<mask_0>，我们去了<mask_1>", "<ans>": {"<mask_0>": "", "<mask_1>": ""}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The reference's tiny random CPM-Bee, converted from its OpenBMB file into our layout."""
    out = tmp_path_factory.mktemp("bee") / "tiny"
    result = run("convert", BEE / "model.safetensors", out, "--vocab", VOCAB)
    assert result.returncode == 0, result.stderr.decode()
    return out


@pytest.fixture(scope="module")
def lm(checkpoint):
    return cpmlive.load(checkpoint)


def test_convert_round_trips_the_openbmb_state(checkpoint, tmp_path):
    assert family_of(checkpoint).model_type == "cpm-bee"
    assert family_of(BEE / "model.safetensors").model_type == "cpm-bee"
    back = tmp_path / "back.pt"
    assert run("convert", checkpoint, back, "--to", "openbmb").returncode == 0
    original, again = load_file(BEE / "model.safetensors"), torch.load(back)
    assert sorted(original) == sorted(again)
    assert max((original[k] - again[k]).abs().max().item() for k in original) <= 1e-6
    assert json.loads(back.with_suffix(".json").read_text())["position_bias_num_segment_buckets"] == 256
    info = json.loads(run("info", checkpoint, "--json").stdout)
    assert info["model_type"] == "cpm-bee" and info["parameters"] == 2_843_584
    assert_clean_error(run("convert", checkpoint, tmp_path / "x.gguf", "--to", "gguf"),
                       "converts to ours or hf or openbmb")
    shown = json.loads(run("tokenize", checkpoint, "北京<mask_0>😀", "--json").stdout)
    assert shown == {"ids": [12247, 86583, 86584], "pieces": ["北京", "<mask_0>", "😀"],
                     "ext_table": {"86583": "<mask_0>", "86584": "😀"}}


def test_bee_cli_prints_the_filled_object(checkpoint, lm):
    result = run("bee", checkpoint, json.dumps(TRANSLATE, ensure_ascii=False), "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr.decode()
    shown = json.loads(result.stdout)
    assert shown == lm.bee(TRANSLATE, max_new_tokens=8) and shown["<ans>"]
    assert "\n  " in result.stdout.decode()  # pretty by default, one line with --json
    lines = run("bee", checkpoint, "--file", "-", "--json", "--num-beams", "3", "--max-new-tokens", "6",
                stdin=(json.dumps(TRANSLATE) + "\n" + json.dumps(FILL) + "\n").encode()).stdout.decode().splitlines()
    assert [json.loads(line) for line in lines] == lm.bee([TRANSLATE, FILL], max_new_tokens=6, num_beams=3)
    sampled = [run("bee", checkpoint, json.dumps(FILL), "--do-sample", "--seed", "3", "--json").stdout
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_bee_batches_equal_single_tasks(lm):
    """A batch shares one ext table, yet each task's answers are what it gets alone."""
    alone = [lm.bee(task, max_new_tokens=6, num_beams=2) for task in (TRANSLATE, FILL)]
    assert lm.bee([TRANSLATE, FILL], max_new_tokens=6, num_beams=2) == alone


QUESTION = {"question": "今天天气如何？", "<ans>": {"天气": "", "温度": ""}}


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3}, {"do_sample": True, "seed": 3, "top_k": 5},
                                     {"do_sample": True, "seed": 9, "temperature": 0.8, "min_new_tokens": 3}])
def test_tasks_in_the_continuous_batch_equal_their_job_path(lm, options):
    """Tasks of different widths and extra columns join the running batch while others decode
    (a task at a step of its own, each row its own extra columns and answer), yet each one's
    tokens are what the job path (``fill_tasks``) gives it alone."""
    config = GenerationConfig(max_new_tokens=16, **options)
    expected = [fill_tasks(lm.model, lm.tokenizer, [task], config)[1][0] for task in (TRANSLATE, FILL, QUESTION)]
    first = lm.engine.submit(lm.bee_request(TRANSLATE, config))
    events = iter(first)
    early = [next(events), next(events)]
    later = [lm.engine.submit(lm.bee_request(task, config)) for task in (FILL, QUESTION)]
    decoded = [[(e.token, e.answer) for e in [*early, *events] if e.token is not None]]
    decoded += [[(e.token, e.answer) for e in handle if e.token is not None] for handle in later]
    assert decoded == [[tuple(pair) for pair in result] for result in expected]
    if not options.get("do_sample"):  # (a seeded list gives task i seed + i; the job path draws from one generator)
        tasks = [TRANSLATE, FILL, QUESTION]
        assert lm.bee(tasks, max_new_tokens=16, **options) == fill_tasks(lm.model, lm.tokenizer, tasks, config)[0]


def test_a_task_streams_its_answers_in_order(lm):
    handle = lm.engine.submit(lm.bee_request(FILL, GenerationConfig(max_new_tokens=12)))
    events = list(handle)
    assert events[-1].finish_reason in ("stop", "length") and not events[-1].error
    texts: dict[int, str] = {}
    for event in events:
        texts[event.answer] = texts.get(event.answer, "") + event.text
    answers = [event.answer for event in events if event.token is not None]
    assert answers == sorted(answers) and set(answers) <= {1, 2}
    filled = lm.bee(FILL, max_new_tokens=12)
    assert [filled["<ans>"][key] for key in ("<mask_0>", "<mask_1>")] == [texts.get(1), texts.get(2)]


def test_the_engine_keeps_tasks_and_text_apart(lm):
    config = GenerationConfig(max_new_tokens=4)
    with pytest.raises(CpmliveError, match="fills tasks"):
        lm.engine.submit(Request([1, 2, 3], config))
    with pytest.raises(CpmliveError, match="without drafts"):
        lm.engine.submit(lm.bee_request(TRANSLATE, GenerationConfig(max_new_tokens=4, prompt_lookup_num_tokens=3)))
    ant = cpmlive.load("demo")
    with pytest.raises(CpmliveError, match="only a CPM-Bee model"):
        ant.engine.submit(Request([1, 2, 3], config, task=lm.bee_request(TRANSLATE, config).task))


@pytest.fixture(scope="module")
def ant_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ant") / "tiny"
    config = preset("tiny")
    save_checkpoint(build_model(config, seed=1), config, path, vocab=ANT_VOCAB)
    return path


@pytest.mark.parametrize("task,fragment", [
    ('{"input": "x", ', "invalid JSON"),
    ('{"input": "x"}', 'no "<ans>" field'),
    ('{"input": {"<ans>": ""}, "<ans>": ""}', "is not at the top level"),
    ('{"input": "x", "options": ["a", "b"], "<ans>": ""}', "options must be an object"),
    ('{"input": 3, "<ans>": ""}', "must be a string or an object of strings"),
    ('["x"]', "a task is a JSON object"),
    ('{"input": "<custom_token>", "<ans>": ""}', "unknown special token"),
    ('{"input": "x < y", "<ans>": ""}', "write a literal < as <<"),
])
def test_bad_tasks_are_one_line_errors(checkpoint, task, fragment):
    assert_clean_error(run("bee", checkpoint, task), fragment)


def test_other_bad_input_is_one_line_errors(checkpoint, ant_checkpoint):
    assert_clean_error(run("bee", checkpoint, json.dumps(TRANSLATE), "--max-new-tokens", "3000"),
                       "exceed the model's 2048 positions")
    assert_clean_error(run("bee", ant_checkpoint, json.dumps(TRANSLATE)), "needs a CPM-Bee checkpoint")
    assert_clean_error(run("bee", checkpoint), "no task given")
    assert_clean_error(run("fill", checkpoint, "你好<mask>"), "CPM-Bee")


def test_evaluate_scores_answers_and_text(checkpoint, tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps({**TRANSLATE, "<ans>": "Beijing"}, ensure_ascii=False) + "\n", encoding="utf-8")
    metrics = json.loads(run("evaluate", checkpoint, "--data", data, "--json").stdout)
    assert set(metrics) == {"exact_match", "rougeL", "answers"} and metrics["answers"] == 1
    text = tmp_path / "text.txt"
    text.write_text("北京是中国的首都\n", encoding="utf-8")
    loss = json.loads(run("evaluate", checkpoint, "--text", text, "--json").stdout)
    assert loss["documents"] == 1 and loss["bits_per_char"] > 0


def test_int8_and_memory_limit_keep_the_answers(checkpoint, lm, tmp_path):
    out = tmp_path / "int8"
    result = run("quantize", checkpoint, out, "--bits", "8")
    assert result.returncode == 0, result.stderr.decode()
    quantized = cpmlive.load(out)
    assert quantized.model.config.quantization.bits == 8
    task = [TRANSLATE, FILL]
    reference = lm.bee(task, max_new_tokens=6)
    assert quantized.bee(task, max_new_tokens=6)[0]["<ans>"]
    streamed = cpmlive.load(checkpoint, memory_limit="11.5MB")
    assert streamed.bee(task, max_new_tokens=6) == reference
    with pytest.raises(CpmliveError, match="smaller than"):
        cpmlive.load(checkpoint, memory_limit="1MB")


def test_lora_finetune_writes_a_peft_adapter_that_changes_answers(checkpoint, lm, tmp_path):
    rows = [{**TRANSLATE, "<ans>": "Beijing is the capital of China."},
            {"document": "今天<mask_0>很好", "<ans>": {"<mask_0>": "天气"}},
            {"input": "你好", "options": {"<option_0>": "hi", "<option_1>": "bye"}, "<ans>": "<option_0>"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 4), encoding="utf-8")
    out = tmp_path / "run"
    result = run("finetune", "--model", checkpoint, "--data", data, "--eval", data, "--out", out,
                 "max_steps=30", "batch_size=4", "lr=0.05", "eval_every=10", "save_every=10", "progress=false")
    assert result.returncode == 0, result.stderr.decode()
    config = json.loads((out / "best" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["project_q", "project_v"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in evals if r.get("type") == "eval"]
    assert losses[-1] < losses[0]
    tuned = cpmlive.load(checkpoint, adapter=out / "best")
    assert tuned.bee(TRANSLATE, max_new_tokens=12) != lm.bee(TRANSLATE, max_new_tokens=12)
    assert_clean_error(run("finetune", "--model", checkpoint, "--data", data, "--out", tmp_path / "p",
                           "delta.method=prompt"), "CPM-Bee cannot take a soft prompt")


def test_v1_bee_answers_and_refuses_bad_requests(lm):
    client = TestClient(create_app(lm))
    assert "CPM-Bee 任务" in client.get("/").text  # a CPM-Bee model's playground is the JSON-task page
    answer = client.post("/v1/bee", json={"task": TRANSLATE, "max_tokens": 8}).json()
    assert answer["result"] == lm.bee(TRANSLATE, max_new_tokens=8)
    batch = client.post("/v1/bee", json={"tasks": [TRANSLATE, FILL], "max_tokens": 6, "num_beams": 2}).json()
    assert batch["results"] == lm.bee([TRANSLATE, FILL], max_new_tokens=6, num_beams=2)
    for body, fragment in [({"task": {"input": "x"}}, "no \"<ans>\" field"),
                           ({"task": TRANSLATE, "tasks": [TRANSLATE]}, "either task"),
                           ({"task": {"<ans>": {}}}, "no answer to predict"),
                           ({"task": TRANSLATE, "max_tokens": 3000}, "max_tokens")]:
        response = client.post("/v1/bee", json=body)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["error"]["message"]
    served = client.get("/v1/models").json()["data"][0]["id"]
    completion = client.post("/v1/completions", json={"model": served, "prompt": "你好", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"] in ("stop", "length")
    fill = client.post("/v1/fill", json={"text": "你好<mask>"})
    assert fill.status_code == 400 and "lm.bee" in fill.json()["error"]["message"]


def test_v1_bee_on_an_ant_server_is_a_clear_400():
    client = TestClient(create_app(cpmlive.load("demo")))
    response = client.post("/v1/bee", json={"task": TRANSLATE})
    assert response.status_code == 400 and "needs a CPM-Bee checkpoint" in response.json()["error"]["message"]


def test_the_bee_page_in_chromium(lm, tmp_path):
    with serving(create_app(lm)) as url, chromium_page(1100, 800) as (page, errors):
        page.goto(f"{url}/")
        assert page.locator("nav.site a.page").all_text_contents() == ["CPM-Bee 任务"]
        page.select_option("#example", index=3)  # the <mask_k> fill-in example
        page.fill("#tokens", "6")
        page.click("#fill")
        page.wait_for_selector("#answers .path")
        paths = page.locator("#answers .path").all_text_contents()
        assert paths[0].endswith("<mask_0>")
        shown = json.loads(page.locator("#filled").text_content())
        task = json.loads(page.locator("#task").input_value())
        assert shown == lm.bee(task, max_new_tokens=6)
        page.fill("#task", "{not json")
        page.click("#fill")
        assert "not valid JSON" in page.locator("#error").text_content()
        page.screenshot(path=str(tmp_path / "bee.png"))
        assert not errors, errors


def test_tokenizer_of_the_3b_checkpoint_drops_the_tokens_it_lacks():
    """The published 3B config has 86580 tokens, the vocabulary 86583 (spec 7.1)."""
    from cpmlive.tokenizer.bee import BeeTokenizer

    tokenizer = BeeTokenizer.for_model(VOCAB, 86580)
    assert tokenizer.vocab_size == 86580
    ids, ext = tokenizer.encode("（全角）")
    assert all(i < 86580 or i in ext for i in ids) and "（" in ext.values()
    with pytest.raises(CpmliveError, match="86583 tokens"):
        BeeTokenizer.for_model(VOCAB, 80000)


def test_a_bee_python_api_error_for_ant_models():
    with pytest.raises(CpmliveError, match="needs a CPM-Bee checkpoint"):
        cpmlive.load("demo").bee(TRANSLATE)
    assert subprocess.run([sys.executable, "-c", "import cpmlive"]).returncode == 0


def test_v1_bee_streams_each_answer_as_it_is_decoded(lm):
    """Server-sent events: each answer's pieces in order, then each task's filled object, equal
    to the unstreamed answer."""
    client = TestClient(create_app(lm))
    body = {"tasks": [TRANSLATE, FILL], "max_tokens": 12}
    whole = client.post("/v1/bee", json=body).json()["results"]
    with client.stream("POST", "/v1/bee", json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    pieces: dict[tuple[int, int], str] = {}
    for event in events:
        if "text" in event:
            pieces[event["index"], event["answer"]] = pieces.get((event["index"], event["answer"]), "") + event["text"]
    results = {event["index"]: event["result"] for event in events if "result" in event}
    assert [results[0], results[1]] == whole
    assert pieces.get((0, 1), "") == (whole[0]["<ans>"] or "")
    assert [pieces.get((1, n), "") for n in (1, 2)] == [whole[1]["<ans>"][k] or "" for k in ("<mask_0>", "<mask_1>")]
    assert [e["path"] for e in events if e.get("index") == 1 and "text" in e][0] in (["<mask_0>"], ["<mask_1>"])
    refused = client.post("/v1/bee", json={**body, "stream": True, "num_beams": 2})
    assert refused.status_code == 400 and "cannot stream" in refused.json()["error"]["message"]


EXAMPLE = {"input": "北京是中国的首都", "prompt": "中翻英", "<ans>": "Beijing is the capital of China."}
OPTION_EXAMPLE = {"input": "你好", "options": {"<option_0>": "hi", "<option_1>": "bye"}, "<ans>": "<option_0>"}


def test_in_context_examples_are_packed_as_the_originals_pretraining_packs_them(lm):
    """Example k follows the task as sample k: all context, its answer without </s>, segments
    from its own root, its relation table appended at its offset, the ext table carried on."""
    tokenizer = lm.tokenizer
    alone = prompt_for(tokenizer, TRANSLATE)
    prompt = prompt_for(tokenizer, TRANSLATE, [EXAMPLE, OPTION_EXAMPLE])
    first, second = tree_arrays(tokenizer, EXAMPLE), tree_arrays(tokenizer, OPTION_EXAMPLE)
    n, a, b = len(alone.ids), len(first.ids), len(second.ids)
    assert prompt.ids == alone.ids + first.ids + second.ids and first.ids[-1] != tokenizer.eos_id
    assert prompt.sample_ids == [0] * n + [1] * a + [2] * b
    offsets = [0, alone.num_segments ** 2, alone.num_segments ** 2 + first.num_segments ** 2]
    assert prompt.rel_offsets == [offsets[0]] * n + [offsets[1]] * a + [offsets[2]] * b
    assert prompt.segments == alone.segments + first.segments + second.segments
    assert prompt.segment_counts == [alone.num_segments] * n + [first.num_segments] * a + [second.num_segments] * b
    assert torch.equal(prompt.segment_rel, torch.cat([alone.segment_rel, first.segment_rel, second.segment_rel]))
    assert "<option_1>" in prompt.extras.values()
    batch = batch_prompts([prompt], tokenizer.vocab_size)
    assert batch.inputs["context"].all() and batch.inputs["position"][0].tolist() == list(range(n + a + b))
    # the task reads the examples; an example reads only itself (the same states whatever the task says)
    other = prompt_for(tokenizer, {**TRANSLATE, "input": "上海是一个很大的城市"}, [EXAMPLE, OPTION_EXAMPLE])
    with torch.inference_mode():
        hidden = [lm.model(**batch_prompts([p], tokenizer.vocab_size).inputs)[0] for p in (prompt, other, alone)]
    assert torch.allclose(hidden[0][n:], hidden[1][len(other.ids) - a - b:], atol=1e-5)
    assert not torch.allclose(hidden[0][:n], hidden[2], atol=1e-3)


def test_examples_in_the_batch_the_job_the_cli_and_the_server(checkpoint, lm):
    config = GenerationConfig(max_new_tokens=10)
    expected = fill_tasks(lm.model, lm.tokenizer, [TRANSLATE, FILL], config, [EXAMPLE, OPTION_EXAMPLE])[0]
    assert lm.bee([TRANSLATE, FILL], max_new_tokens=10, examples=[EXAMPLE, OPTION_EXAMPLE]) == expected
    assert expected != fill_tasks(lm.model, lm.tokenizer, [TRANSLATE, FILL], config)[0]
    result = run("bee", checkpoint, json.dumps(TRANSLATE), "--example", json.dumps(EXAMPLE), "--example",
                 json.dumps(OPTION_EXAMPLE), "--max-new-tokens", "10", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == expected[0]
    assert_clean_error(run("bee", checkpoint, json.dumps(TRANSLATE), "--example", json.dumps(TRANSLATE)),
                       "--example 1: an in-context example shows its answer")
    client = TestClient(create_app(lm))
    answer = client.post("/v1/bee", json={"tasks": [TRANSLATE, FILL], "max_tokens": 10,
                                          "examples": [EXAMPLE, OPTION_EXAMPLE]}).json()
    assert answer["results"] == expected
    refused = client.post("/v1/bee", json={"task": TRANSLATE, "examples": [TRANSLATE]})
    assert refused.status_code == 400 and "shows its answer" in refused.json()["error"]["message"]


CALIBRATION = ["要插入图片，请选择「插入」菜单中的「图像」命令。", "选择要设置格式的文本，然后单击「格式」菜单。",
               "Select the text that you want to format.", "Choose Format - Character to open the dialog.",
               "在「文件」菜单中选择「保存」，然后输入文件名。", "To save a document, choose File - Save.",
               "单击「工具」菜单中的「选项」，可以更改默认设置。", "Opens the context menu of the current document.",
               "在表格中插入新的行或列。", "Inserts a new row or column into the table."]


def test_gptq_and_awq_calibrate_cpm_bee_and_qlora_tunes_the_codes(tmp_path):
    """int4 codes of bee-demo fitted on text tasks: GPTQ reads its calibration text better than
    round to nearest does; a LoRA adapter trains over the frozen codes (QLoRA)."""
    from cpmlive.compress.quantize import quantize_checkpoint
    from cpmlive.config import QuantConfig
    from cpmlive.infer.bee import text_loss

    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(CALIBRATION) + "\n", encoding="utf-8")
    bits = {}
    for method in ("rtn", "gptq", "awq"):
        out = quantize_checkpoint("bee-demo", tmp_path / method, QuantConfig(bits=4, group_size=32, method=method),
                                  calibration=None if method == "rtn" else text, progress=False)
        quantized = cpmlive.load(out)
        if method != "rtn":
            assert quantized.model.config.quantization.calibration["rows"] >= 1
        bits[method] = text_loss(quantized.model, quantized.tokenizer, CALIBRATION)["bits_per_char"]
    base = cpmlive.load("bee-demo")
    bits["float"] = text_loss(base.model, base.tokenizer, CALIBRATION)["bits_per_char"]
    assert bits["float"] < bits["gptq"] < bits["rtn"] and bits["awq"] < bits["rtn"] * 1.01, bits
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [EXAMPLE, OPTION_EXAMPLE] * 6),
                    encoding="utf-8")
    result = run("finetune", "--model", tmp_path / "gptq", "--data", data, "--eval", data, "--out", tmp_path / "run",
                 "max_steps=20", "batch_size=4", "lr=0.02", "eval_every=10", "save_every=10", "progress=false")
    assert result.returncode == 0, result.stderr.decode()
    losses = [r["val_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r.get("type") == "eval"]
    assert losses[-1] < losses[0]
    tuned = cpmlive.load(tmp_path / "gptq", adapter=tmp_path / "run" / "best")
    layer = tuned.model.layers[0].attn.project_q
    assert type(layer).__name__ == "LoraQuantizedLinear" and layer.weight.dtype == torch.uint8
    assert tuned.bee(EXAMPLE | {"<ans>": ""}, max_new_tokens=12)["<ans>"]
