"""The engine (``infer/engine.py``, ``infer/kv.py``) against decoding each request on its own
(``generate_ids``, itself tested against HF): continuous batching must not change what a request
gets, whatever joins or leaves the batch around it."""

import threading
import time

import pytest
import torch

from cpmlive.model.ant.config import AntConfig
from cpmlive.errors import CpmliveError
from cpmlive.infer.engine import Engine, Request
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.runtime import native
from cpmlive.model.ant.model import build_model
from cpmlive.tokenizer import AntTokenizer
from cpmlive.tune import delta

from conftest import ANT_VOCAB

CONFIG = AntConfig(vocab_size=30720, dim_model=64, dim_ff=96, num_layers=3, num_heads=4, dim_head=16,
                   prompt_length=4, max_length=160, half=False)


@pytest.fixture(scope="module")
def tokenizer():
    return AntTokenizer.from_file(ANT_VOCAB)


def small_model(seed=0):
    model = build_model(CONFIG, seed=seed).eval()
    with torch.no_grad():  # larger logits and a non-zero position bias, so that both matter
        generator = torch.Generator().manual_seed(seed + 1)
        model.position_bias.weight.normal_(generator=generator)
        model.input_embedding.weight.normal_(std=0.3, generator=generator)
    return model


@pytest.fixture(scope="module")
def model():
    return small_model()


def prompts(tokenizer, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        length = int(torch.randint(2, 30, (1,), generator=g))
        rows.append([tokenizer.bos_id] + torch.randint(10, 30000, (length,), generator=g).tolist())
    return rows


def alone(model, ids, options, eos_id, prompt_task=None):
    return generate_ids(model, [ids], options, eos_id, prompt_task)[0]


def run(engine, requests):
    handles = [engine.submit(r) for r in requests]
    return [h.result() for h in handles]


@pytest.mark.parametrize("count", [3, 7])
@pytest.mark.parametrize("blocks", ["native", "pytorch"])
def test_greedy_batch_equals_each_request_alone(model, tokenizer, count, blocks):
    if blocks == "pytorch":
        with native.switched_off():
            return test_greedy_batch_equals_each_request_alone(model, tokenizer, count, "native")
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, count)
    options = [GenerationConfig(max_new_tokens=n) for n in (5, 17, 9, 12, 3, 20, 8)[:count]]
    results = run(engine, [Request(ids, o) for ids, o in zip(rows, options)])
    for ids, o, result in zip(rows, options, results):
        assert result.ids == alone(model, ids, o, tokenizer.eos_id)
        assert result.finish_reason in ("length", "stop")
        assert result.text == tokenizer.decode(result.ids)
    assert engine.pool.bytes_reserved() == 0  # everything finished: the KV memory is given back


def test_native_step_takes_rows_of_different_lengths(model, tokenizer):
    assert native.available(), "a C compiler is needed (the CI installs gcc)"
    from cpmlive.model.runtime import native_decode

    calls = []
    real = native_decode.decode_blocks
    native_decode.decode_blocks = lambda *a: calls.append(a[4].write_columns().tolist()) or real(*a)
    try:
        engine = Engine(model, tokenizer)
        rows = prompts(tokenizer, 3, seed=3)
        first = engine.submit(Request(rows[0], GenerationConfig(max_new_tokens=6)))
        events = iter(first)
        head = [next(events), next(events)]  # it runs: the others join it at other columns
        later = run(engine, [Request(ids, GenerationConfig(max_new_tokens=6)) for ids in rows[1:]])
        got = [[e.token for e in head + list(events) if e.token is not None]] + [r.ids for r in later]
    finally:
        native_decode.decode_blocks = real
    assert any(len(set(columns)) > 1 for columns in calls)  # the rows were at different columns
    assert got == [alone(model, ids, GenerationConfig(max_new_tokens=6), tokenizer.eos_id) for ids in rows]


def test_requests_join_and_leave_a_running_batch(model, tokenizer):
    """A request submitted while others decode joins at the next step; the first ones leave
    when done; each gets what it would get alone."""
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, 6, seed=1)
    long = GenerationConfig(max_new_tokens=40)
    first = engine.submit(Request(rows[0], long))
    events = iter(first)
    seen = [next(events) for _ in range(3)]  # it is running
    later = [engine.submit(Request(ids, GenerationConfig(max_new_tokens=4 + i))) for i, ids in enumerate(rows[1:])]
    rest = list(events)
    got_first = [e.token for e in seen + rest if e.token is not None]
    assert got_first == alone(model, rows[0], long, tokenizer.eos_id)
    for i, (ids, handle) in enumerate(zip(rows[1:], later)):
        assert handle.result().ids == alone(model, ids, GenerationConfig(max_new_tokens=4 + i), tokenizer.eos_id)
    assert engine.steps < 40 + 5 * 8  # they ran together, not one after another


def test_sampling_per_request_with_its_own_seed(model, tokenizer):
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, 4, seed=2)
    options = [GenerationConfig(max_new_tokens=10, do_sample=True, temperature=t, top_k=k, top_p=p, seed=s,
                                repetition_penalty=r)
               for t, k, p, s, r in [(0.7, 0, 1.0, 1, 1.0), (1.3, 20, 1.0, 2, 1.2), (1.0, 0, 0.8, 3, 1.0),
                                     (0.9, 5, 0.9, 4, 1.0)]]
    results = run(engine, [Request(ids, o) for ids, o in zip(rows, options)])
    for ids, o, result in zip(rows, options, results):
        assert result.ids == alone(model, ids, o, tokenizer.eos_id)


def test_greedy_options_that_process_logits(model, tokenizer):
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, 2, seed=4)
    options = [GenerationConfig(max_new_tokens=12, repetition_penalty=1.5, no_repeat_ngram_size=2),
               GenerationConfig(max_new_tokens=8, min_new_tokens=8)]
    results = run(engine, [Request(ids, o) for ids, o in zip(rows, options)])
    for ids, o, result in zip(rows, options, results):
        assert result.ids == alone(model, ids, o, tokenizer.eos_id)


def test_stop_strings_cut_the_text_and_finish(model, tokenizer):
    engine = Engine(model, tokenizer)
    ids = prompts(tokenizer, 1, seed=5)[0]
    full = run(engine, [Request(ids, GenerationConfig(max_new_tokens=30))])[0]
    stop = full.text[5:7]
    cut = full.text.find(stop)
    streamed = engine.submit(Request(ids, GenerationConfig(max_new_tokens=30), stop=(stop, "never-seen")))
    events = list(streamed)
    text = "".join(e.text for e in events)
    assert text == full.text[:cut]
    assert events[-1].finish_reason == "stop"
    assert len([e for e in events if e.token is not None]) < len(full.ids)


def test_logprobs_are_the_models(model, tokenizer):
    engine = Engine(model, tokenizer)
    ids = prompts(tokenizer, 1, seed=6)[0]
    result = run(engine, [Request(ids, GenerationConfig(max_new_tokens=3), logprobs=2)])[0]
    from cpmlive.data.layout import GENERATION, build_batch

    batch = build_batch([ids], GENERATION, CONFIG.prompt_length)
    with torch.no_grad():
        logits = model.logits(model(**batch.as_inputs()))[0, -1].log_softmax(-1)
    assert result.logprobs[0] == pytest.approx(float(logits.max()), abs=1e-4)
    assert list(result.top_logprobs[0])[0] == result.ids[0] == int(logits.argmax())
    assert len(result.top_logprobs[0]) == 2


def lora_model():
    model = small_model(seed=7)
    for name, seed in (("a", 1), ("b", 2)):
        delta.attach(model, delta.DeltaConfig(method="lora", r=4, alpha=8,
                                              target_modules=["project_q", "project_v", "w_0"]), name=name)
        with torch.no_grad():
            for layer_name, param in model.named_parameters():
                if f"lora_B.{name}" in layer_name:
                    param.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model


def test_each_row_runs_its_own_adapter(tokenizer):
    model = lora_model()
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, 5, seed=8)
    names = ["a", None, "b", "a", "b"]
    results = run(engine, [Request(ids, GenerationConfig(max_new_tokens=8), adapter=n) for ids, n in zip(rows, names)])
    differ = 0
    for ids, name, result in zip(rows, names, results):
        with delta.active_adapter(model, name):
            want = alone(model, ids, GenerationConfig(max_new_tokens=8), tokenizer.eos_id)
        with delta.active_adapter(model, None):
            differ += want != alone(model, ids, GenerationConfig(max_new_tokens=8), tokenizer.eos_id)
        assert result.ids == want, name
    assert differ >= 2  # the adapters change the output, so the check means something


def test_cancel_frees_the_row_at_once(model, tokenizer):
    engine = Engine(model, tokenizer)
    ids = prompts(tokenizer, 1, seed=9)[0]
    handle = engine.submit(Request(ids, GenerationConfig(max_new_tokens=100, min_new_tokens=100)))
    events = iter(handle)
    next(events)
    handle.cancel()
    assert list(events)[-1].finish_reason == "cancelled"
    deadline = time.monotonic() + 5
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0


def test_jobs_run_on_the_driving_thread(model, tokenizer):
    engine = Engine(model, tokenizer)
    assert engine.call(lambda: threading.current_thread()).result(timeout=10) is threading.current_thread()
    engine.start()  # now a thread of its own drives it, and runs the jobs
    try:
        assert engine.call(lambda: threading.current_thread().name).result(timeout=10) == "cpmlive-engine"
        with pytest.raises(ValueError):
            engine.call(lambda: (_ for _ in ()).throw(ValueError("x"))).result(timeout=10)
        rows = prompts(tokenizer, 2, seed=11)
        got = run(engine, [Request(ids, GenerationConfig(max_new_tokens=5)) for ids in rows])
        assert [g.ids for g in got] == [alone(model, ids, GenerationConfig(max_new_tokens=5), tokenizer.eos_id)
                                        for ids in rows]
    finally:
        engine.stop()


def test_waiters_on_several_threads_share_the_driving(model, tokenizer):
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, 6, seed=12)
    options = GenerationConfig(max_new_tokens=9)
    results = [None] * len(rows)

    def wait(i):
        results[i] = engine.submit(Request(rows[i], options)).result().ids

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [alone(model, ids, options, tokenizer.eos_id) for ids in rows]


def test_bad_requests_are_refused_at_submit(model, tokenizer):
    engine = Engine(model, tokenizer)
    ids = prompts(tokenizer, 1)[0]
    with pytest.raises(CpmliveError, match="at most"):
        engine.submit(Request(ids, GenerationConfig(max_new_tokens=CONFIG.max_length)))
    with pytest.raises(CpmliveError, match="beam"):
        engine.submit(Request(ids, GenerationConfig(num_beams=2)))
    with pytest.raises(CpmliveError, match="adapter"):
        engine.submit(Request(ids, GenerationConfig(), adapter="nope"))


def test_a_failing_prefill_fails_only_its_request(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, 2, seed=10)
    good = engine.submit(Request(rows[0], GenerationConfig(max_new_tokens=30)))
    next(iter(good))
    real = engine._prefill

    def broken(handles, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_prefill", broken)
    bad = engine.submit(Request(rows[1], GenerationConfig(max_new_tokens=3)))
    with pytest.raises(CpmliveError, match="boom"):
        bad.result()
    monkeypatch.setattr(engine, "_prefill", real)
    assert good.result().finish_reason in ("length", "stop")


def test_the_token_budget_spreads_prefills_over_steps(model, tokenizer):
    """With a budget below two prompts, one waiting request joins per iteration while the
    running ones keep decoding; each still gets what it would alone."""
    engine = Engine(model, tokenizer, token_budget=1)
    rows = prompts(tokenizer, 3, seed=13)
    options = GenerationConfig(max_new_tokens=6)
    handles = [engine.submit(Request(ids, options)) for ids in rows]
    running = []
    with torch.inference_mode():
        for _ in range(3):
            engine._iterate()
            running.append(len(engine.running))
    assert running == [1, 2, 3]
    assert [h.result().ids for h in handles] == [alone(model, ids, options, tokenizer.eos_id) for ids in rows]


def test_a_failing_logits_processor_ends_only_its_request(model, tokenizer):
    engine = Engine(model, tokenizer)
    rows = prompts(tokenizer, 2, seed=14)

    def broken(logits, histories):
        raise ValueError("bad processor")

    good = engine.submit(Request(rows[0], GenerationConfig(max_new_tokens=8)))
    bad = engine.submit(Request(rows[1], GenerationConfig(max_new_tokens=8, logits_processor=broken)))
    with pytest.raises(CpmliveError, match="bad processor"):
        bad.result()
    assert good.result().ids == alone(model, rows[0], GenerationConfig(max_new_tokens=8), tokenizer.eos_id)
    with pytest.raises(CpmliveError, match="outside the vocabulary"):
        engine.submit(Request(rows[0], GenerationConfig(sequence_bias={(10**6,): 1.0})))


def test_after_stop_waiters_still_drive(model, tokenizer):
    engine = Engine(model, tokenizer)
    engine.start()
    engine.stop()
    ids = prompts(tokenizer, 1, seed=15)[0]
    handle = engine.submit(Request(ids, GenerationConfig(max_new_tokens=4)))
    assert handle.result().ids == alone(model, ids, GenerationConfig(max_new_tokens=4), tokenizer.eos_id)
