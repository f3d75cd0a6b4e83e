"""CPM-Bee tasks in the engine's continuous batch against the job path, one run.

``--tasks`` clients each send one greedy task (a mix of the README's translation, continuation,
fill-in and question tasks). Before the engine took CPM-Bee tasks, each request was a job of its
own, run one after another (``serial jobs``); a single client could at best send them all as one
job (``one job of all``: ``fill_tasks`` on the list, which pads every task to the longest and runs
until the last is done). In the batch each task is a request: it leaves as soon as it is done and
the next step is narrower. Decoded positions per second, best of ``--repeats``; the filled tasks
must agree. Run by hand on an otherwise idle machine.

    python benchmarks/bee_batch.py [--tasks 8] [--tokens 24] [--repeats 3] [--model bee-demo]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import cpmlive  # noqa: E402
from cpmlive.infer.bee import fill_tasks  # noqa: E402
from cpmlive.infer.generate import GenerationConfig  # noqa: E402

TASKS = [
    {"input": "打开一个新的文本文档。", "prompt": "中翻英", "<ans>": ""},
    {"input": "要插入图片，", "prompt": "往后写", "<ans>": ""},
    {"document": "在「格式」菜单中选择<mask_0>，然后单击<mask_1>。", "<ans>": {"<mask_0>": "", "<mask_1>": ""}},
    {"input": "Select the text that you want to format.", "prompt": "英翻中", "<ans>": ""},
    {"input": "单击「文件」菜单，然后选择「保存」。", "question": "应该选择哪一项？", "<ans>": ""},
]


def timed(run, repeats: int) -> tuple[float, object]:
    result = run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bee-demo")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = cpmlive.load(args.model)
    tasks = [TASKS[i % len(TASKS)] for i in range(args.tasks)]
    config = GenerationConfig(max_new_tokens=args.tokens)

    def serial():
        return [fill_tasks(lm.model, lm.tokenizer, [task], config)[0][0] for task in tasks]

    def one_job():
        return fill_tasks(lm.model, lm.tokenizer, tasks, config)[0]

    def batch():
        handles = [lm.engine.submit(lm.bee_request(task, config)) for task in tasks]
        results = [lm.bee_result(handle) for handle in handles]
        batch.positions = sum(h.completion_tokens for h in handles)
        return results

    seconds = {}
    outputs = {}
    for name, run in [("serial jobs", serial), ("one job of all", one_job), ("continuous batch", batch)]:
        seconds[name], outputs[name] = timed(run, args.repeats)
    positions = batch.positions
    same = outputs["serial jobs"] == outputs["one job of all"] == outputs["continuous batch"]
    print(f"{args.model}: {args.tasks} greedy tasks, max_new_tokens {args.tokens}, {positions} decoded positions; "
          f"answers agree: {same}")
    print("| path | seconds | positions/s | x serial jobs |")
    print("|---|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.3f} | {positions / value:.1f} | {seconds['serial jobs'] / value:.2f}x |")


if __name__ == "__main__":
    main()
