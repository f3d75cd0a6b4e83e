"""How long a running stream pauses while a long job runs on the engine (issue 28, point 2).

Starts a stream on the demo model's engine, then runs the headline job on a long article
(``--chars`` characters, as ``/v1/title`` does with the shipped headline adapter) and records the
gaps between the stream's tokens while the job runs. Ours: the job runs in slices, the stream
takes a decoding step before each of the job's model calls. Reference: the same job run
exclusively (the engine before the change: the hook that interleaves is switched off for the
job), so the stream waits for the whole job. Prints both longest gaps and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/job_interleave.py
    OMP_NUM_THREADS=1 python benchmarks/job_interleave.py --chars 20000 --job classify

Run it by hand (it is not a test).
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import torch

import cpmlive
from cpmlive.infer.engine import Request
from cpmlive.infer.generate import GenerationConfig
from cpmlive.resources import adapter_path, shipped_adapters
from cpmlive.serve.tasks import ClassifyRequest, TitleRequest, labels_for, titles_for

TEXT = "今天天气不错我们去公园玩北京上海新闻报道记者经济发展人民政府会议工作，。"


def text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(TEXT) for _ in range(chars))


def longest_gap(lm: cpmlive.LM, job: str, chars: int, exclusive: bool) -> tuple[float, float]:
    """The stream's longest pause during the job, and the job's own duration (seconds)."""
    engine = lm.engine
    stamps: list[float] = []
    streaming = threading.Event()

    def sink(event: object) -> None:
        stamps.append(time.perf_counter())
        streaming.set()

    options = GenerationConfig(max_new_tokens=400, min_new_tokens=400)
    handle = engine.submit(Request(lm.encode_raw("今天天气不错，"), options), sink)
    streaming.wait(60)
    if job == "title":
        work, body = titles_for, TitleRequest(article=text(chars, 0))
    else:
        work, body = labels_for, ClassifyRequest(text=[text(min(chars, 2000), i) for i in range(64)])

    def run() -> object:
        if not exclusive:
            return work(lm, body)
        engine._between = True  # the interleaving hook does nothing: the job holds the engine alone
        try:
            return work(lm, body)
        finally:
            engine._between = False

    start = time.perf_counter()
    engine.call(run).result()
    end = time.perf_counter()
    handle.cancel()
    handle.done.wait(60)
    during = [start] + [t for t in stamps if start <= t <= end] + [end]
    return max(b - a for a, b in zip(during, during[1:])), end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["title", "classify"], default="title")
    parser.add_argument("--chars", type=int, default=99_999)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = cpmlive.load("demo")
    for name in shipped_adapters():
        lm.add_adapter(adapter_path(name))
    lm.use(None)
    lm.engine.start()
    ours, ours_job = longest_gap(lm, args.job, args.chars, exclusive=False)
    reference, reference_job = longest_gap(lm, args.job, args.chars, exclusive=True)
    lm.engine.stop()
    print(f"{args.job} job, {args.chars} characters: the stream's longest pause")
    print(f"  ours (sliced):          {ours:6.2f} s  (job {ours_job:.2f} s)")
    print(f"  reference (exclusive):  {reference:6.2f} s  (job {reference_job:.2f} s)")
    print(f"  ratio reference/ours:   {reference / ours:6.1f}x")


if __name__ == "__main__":
    main()
