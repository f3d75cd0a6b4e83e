"""CPM-Bee prompt building (``data.bee.prompt_for``) against the original algorithm of commit
9317c12 (a per-segment copy of the ext table and a pair-by-pair relation loop, read from git),
on tasks of 250 ... 5000 ``<ans>`` leaves with the bee-demo vocabulary: seconds of each, the
ratio, and each one's growth when the leaves double. Both give equal prompts where both run.

    python benchmarks/bee_prompt.py [--leaves 250 500 1000 2000 5000] [--reference-max 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

from cpmlive.data import bee as ours
from cpmlive.resources import model_path
from cpmlive.tokenizer.bee import BeeTokenizer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_COMMIT = "9317c12"


def reference_module() -> types.ModuleType:
    """``data/bee.py`` as it was before, over the tokenizer's copying ``encode``."""
    source = subprocess.run(["git", "show", f"{REFERENCE_COMMIT}:src/cpmlive/data/bee.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("reference_bee")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, "reference_bee.py", "exec"), module.__dict__)
    return module


def task(leaves: int) -> dict:
    return {"input": "今天天气不错", "prompt": "问答", "<ans>": {f"问题{i}": "" for i in range(leaves)}}


def timed(build, tokenizer: BeeTokenizer, data: dict) -> tuple[float, object]:
    start = time.perf_counter()
    prompt = build(tokenizer, data)
    return time.perf_counter() - start, prompt


def same(prompt: ours.Prompt, expected: object) -> bool:
    """Equal prompts (ours keeps the relation table as a tensor, the original as a list)."""
    mine, theirs = dict(vars(prompt)), dict(vars(expected))
    return mine.pop("segment_rel").tolist() == theirs.pop("segment_rel") and mine == theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[250, 500, 1000, 2000, 5000])
    parser.add_argument("--reference-max", type=int, default=2000, help="largest task the reference builds")
    args = parser.parse_args()
    tokenizer = BeeTokenizer.from_file(model_path("bee-demo") / "vocab.txt")
    reference = reference_module()
    print("| <ans> leaves | segments | ours (s) | original (s) | original / ours | ours growth | original growth |")
    print("|---|---|---|---|---|---|---|")
    previous: tuple[float, float | None] | None = None
    for leaves in args.leaves:
        data = task(leaves)
        mine, prompt = timed(ours.prompt_for, tokenizer, data)
        theirs = None
        if leaves <= args.reference_max:
            theirs, expected = timed(reference.prompt_for, tokenizer, data)
            assert same(prompt, expected), f"{leaves} leaves: the prompts differ"
        growth = f"{mine / previous[0]:.2f}" if previous else ""
        old_growth = f"{theirs / previous[1]:.2f}" if previous and previous[1] and theirs else ""
        print(f"| {leaves} | {prompt.num_segments} | {mine:.3f} | {'' if theirs is None else f'{theirs:.2f}'} | "
              f"{'' if theirs is None else f'{theirs / mine:.1f}'} | {growth} | {old_growth} |", flush=True)
        previous = (mine, theirs)


if __name__ == "__main__":
    main()
