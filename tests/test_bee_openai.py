"""CPM-Bee on the OpenAI routes (issue 32): `serve bee-demo` answered by the official `openai`
client and by LangChain's `ChatOpenAI`; a completion is the text-generation task, a conversation
the dialogue task of the release's tutorial; streamed equals unstreamed; bad input is a 400."""

import json

import openai
import pytest

import cpmlive
from cpmlive.data.bee_chat import BeeDialogue, prompt_markup, text_task
from cpmlive.errors import CpmliveError
from cpmlive.serve.app import create_app
from serving import serving
from test_cli import assert_clean_error, run

PROMPT = "打开一个新的文本文档，"
CONVERSATION = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
                {"role": "user", "content": "怎么保存文档？"}]


@pytest.fixture(scope="module")
def lm():
    return cpmlive.load("bee-demo")


@pytest.fixture(scope="module")
def client(lm):
    with serving(create_app(lm)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), url


def test_text_and_dialogue_tasks_are_the_releases_forms():
    assert text_task("a < b，<sep>c") == {"input": "a << b，<sep>c", "<ans>": ""}
    assert BeeDialogue().render(CONVERSATION) == {
        "input": "用户： 你好\n<sep>AI： 你好！有什么可以帮你？\n<sep>用户： 怎么保存文档？\n<sep>AI：", "<ans>": ""}
    assert prompt_markup("x <<ans> y") == "x <<ans> y"  # already escaped: the characters
    for text, fragment in [("x <ans> y", "<ans> is CPM-Bee task markup"), ("<root>", "<root> is"), ("  ", "empty")]:
        with pytest.raises(CpmliveError, match=fragment):
            prompt_markup(text)
    for messages, fragment in [([{"role": "system", "content": "be kind"}, *CONVERSATION], "not 'system'"),
                               (CONVERSATION[:2], "last turn must be the user's"), ([], "empty conversation")]:
        with pytest.raises(CpmliveError, match=fragment):
            BeeDialogue().render(messages)


def test_generate_stream_and_chat_fill_the_tasks(lm):
    task = text_task(PROMPT)
    assert lm.generate(PROMPT, max_new_tokens=12) == (lm.bee(task, max_new_tokens=12)["<ans>"] or "").replace("<<", "<")
    assert "".join(lm.stream(PROMPT, max_new_tokens=12)) == lm.generate(PROMPT, max_new_tokens=12)
    reply = lm.chat(CONVERSATION, max_new_tokens=12)
    assert reply == (lm.bee(BeeDialogue().render(CONVERSATION), max_new_tokens=12)["<ans>"] or "").replace("<<", "<")
    assert lm.generate(PROMPT, max_new_tokens=12, num_beams=2)  # beam search: the job path
    whole = lm.generate(PROMPT, max_new_tokens=12)
    stop = whole[3:5]
    assert "".join(lm.stream(PROMPT, max_new_tokens=12, stop=[stop])) == whole[:whole.find(stop)]


def test_the_openai_client_completes_and_chats(lm, client):
    api, _ = client
    served = api.models.list().data[0].id
    completion = api.completions.create(model=served, prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.choices[0].text == lm.generate(PROMPT, max_new_tokens=12)
    assert completion.usage.prompt_tokens == len(lm.prompt_request(PROMPT, lm._options(12, {})).ids)
    streamed = "".join(c.choices[0].text for c in api.completions.create(model=served, prompt=PROMPT, max_tokens=12,
                                                                         temperature=0, stream=True))
    assert streamed == completion.choices[0].text
    sampled = api.completions.create(model=served, prompt=PROMPT, max_tokens=12, temperature=0.9, n=2, seed=5,
                                     logprobs=1)
    again = api.completions.create(model=served, prompt=PROMPT, max_tokens=12, temperature=0.9, n=2, seed=5,
                                   logprobs=1)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert all(c.logprobs.token_logprobs and c.logprobs.token_logprobs[0] <= 0 for c in sampled.choices)
    whole = completion.choices[0].text
    cut = api.completions.create(model=served, prompt=PROMPT, max_tokens=12, temperature=0, stop=[whole[3:5]])
    assert cut.choices[0].text == whole[:whole.find(whole[3:5])] and cut.choices[0].finish_reason == "stop"
    chat = api.chat.completions.create(model=served, messages=CONVERSATION, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == lm.chat(CONVERSATION, max_new_tokens=12)
    pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model=served, messages=CONVERSATION, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    # OpenAI's current name for the limit, which LangChain sends: the same answer
    current = api.chat.completions.create(model=served, messages=CONVERSATION, max_completion_tokens=12, temperature=0)
    assert current.choices[0].message.content == chat.choices[0].message.content
    assert current.usage.completion_tokens <= 12


@pytest.mark.parametrize("call,fragment", [
    (lambda api, m: api.chat.completions.create(model=m, messages=CONVERSATION, max_tokens=4,
                                                max_completion_tokens=5), "differ: give one"),
    (lambda api, m: api.chat.completions.create(model=m, messages=[{"role": "system", "content": "x"},
                                                                   *CONVERSATION]), "not 'system'"),
    (lambda api, m: api.completions.create(model=m, prompt="写 <ans> 吧"), "<ans> is CPM-Bee task markup"),
    (lambda api, m: api.completions.create(model=m, prompt=PROMPT, extra_body={"guided_regex": "[0-9]+"}),
     "without drafts or grammars"),
])
def test_bad_requests_are_400s_and_the_server_keeps_serving(lm, client, call, fragment):
    api, _ = client
    served = api.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match=fragment):
        call(api, served)
    assert api.completions.create(model=served, prompt=PROMPT, max_tokens=2).choices[0].finish_reason


def test_langchain_chat_model_talks_to_the_server(lm, client, monkeypatch):
    monkeypatch.setenv("LANGSMITH_TRACING", "false")
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    api, url = client
    model = ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=api.models.list().data[0].id, temperature=0,
                       max_tokens=12, max_retries=0)
    history = [HumanMessage(CONVERSATION[0]["content"]), AIMessage(CONVERSATION[1]["content"]),
               HumanMessage(CONVERSATION[2]["content"])]
    assert model.invoke(history).content == lm.chat(CONVERSATION, max_new_tokens=12)
    assert "".join(chunk.content for chunk in model.stream(history)) == lm.chat(CONVERSATION, max_new_tokens=12)


def test_the_prompt_field_is_configurable(lm, monkeypatch):
    monkeypatch.setattr(lm, "bee_text_field", "document")
    expected = lm.bee({"document": PROMPT, "<ans>": ""}, max_new_tokens=12)["<ans>"] or ""
    assert lm.generate(PROMPT, max_new_tokens=12) == expected.replace("<<", "<")
    assert_clean_error(run("serve", "bee-demo", "--bee-prompt-field", "<ans>"), "must be a plain task key")


def test_chat_and_generate_verbs_on_cpm_bee(lm):
    result = run("chat", "bee-demo", "--max-new-tokens", "12", stdin="你好\n怎么保存文档？\n".encode())
    assert result.returncode == 0, result.stderr.decode()
    first = lm.chat(CONVERSATION[:1], max_new_tokens=12)
    second = lm.chat([*CONVERSATION[:1], {"role": "assistant", "content": first}, CONVERSATION[2]],
                     max_new_tokens=12)
    assert result.stdout.decode().splitlines() == [first, second]
    shown = json.loads(run("generate", "bee-demo", PROMPT, "--max-new-tokens", "12", "--json").stdout)
    assert shown["text"] == lm.generate(PROMPT, max_new_tokens=12)
    assert_clean_error(run("chat", "bee-demo", "--system", "be kind", stdin=b"hi\n"), "not 'system'")
