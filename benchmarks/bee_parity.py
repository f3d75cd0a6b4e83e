"""CPM-Bee against the original OpenBMB implementation's recorded outputs (the shared fixtures
``reference/bee-tiny``, float32): per forward case the largest hidden-state, logit and
logsumexp differences, argmax agreement and the loss side by side; then the cached decoding
steps, and greedy / beam-3 generation token for token.

    python benchmarks/bee_parity.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cpmlive.model.bee.config import BeeConfig
from cpmlive.data.bee import batch_prompts, prompt_for
from cpmlive.infer.bee import fill_tasks
from cpmlive.infer.generate import GenerationConfig
from cpmlive.model.bee.model import CpmBee
from cpmlive.model.openbmb import openbmb_to_ours
from cpmlive.tokenizer.bee import BeeTokenizer

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
BEE = FIXTURES / "reference" / "bee-tiny"


def main() -> None:
    config = BeeConfig.load(BEE / "config.json")
    model = CpmBee(config)
    model.load_state_dict(openbmb_to_ours(load_file(BEE / "model.safetensors"), config))
    model.eval()
    tokenizer = BeeTokenizer.from_file(FIXTURES / "cpm-bee-vocab.txt")
    cases = json.loads((BEE / "cases.json").read_text(encoding="utf-8"))
    tensors = load_file(BEE / "cases.safetensors")
    print("| case | positions | max abs hidden | max abs logit | max abs logsumexp | argmax equal "
          "| loss (ours) | loss (original) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("textgen", "translate", "rating", "choice", "fill", "packed"):
        get = lambda field: tensors[f"{name}.{field}"]  # noqa: E731
        valid = torch.arange(get("input").size(1))[None, :] < get("length")[:, None]
        with torch.no_grad():
            hidden = model(get("input"), get("input_sub"), get("context"), get("segment"), get("segment_rel"),
                           get("num_segments"), valid, span=get("span"), sample_ids=get("sample_ids"),
                           segment_rel_offset=get("segment_rel_offset"))
            logits = model.logits(hidden, get("ext_table_ids"), get("ext_table_sub"))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), get("target").long().view(-1),
                                                 ignore_index=-100)
        columns = get("logit_columns").long()
        print(f"| {name} | {int(valid.sum())} | {(hidden - get('hidden'))[valid].abs().max():.2e} | "
              f"{(logits[..., columns] - get('logits_cols'))[valid].abs().max():.2e} | "
              f"{(logits.double().logsumexp(-1).float() - get('logsumexp'))[valid].abs().max():.2e} | "
              f"{bool(torch.equal(logits.argmax(-1)[valid], get('argmax')[valid].long()))} | "
              f"{loss.item():.6f} | {get('loss').item():.6f} |")
    rows = cases["cases"]["generate"]["rows"]
    objects = [cases["tasks"][row["task"]]["json_for_generation"] for row in rows]
    batch = batch_prompts([prompt_for(tokenizer, o) for o in objects], tokenizer.vocab_size)
    get = lambda field: tensors[f"generate.{field}"]  # noqa: E731
    cache = model.new_cache(5, batch.inputs["input_ids"].size(1) + 8)
    worst = 0.0
    with torch.no_grad():
        model(**batch.inputs, cache=cache)
        ones = torch.ones(5, 1, dtype=torch.bool)
        for step in range(8):
            column = lambda name: get(name)[step][:, None]  # noqa: E731
            hidden = model(column("step_input"), column("step_input_sub"), ones, column("step_segment"),
                           batch.inputs["segment_rel"], batch.inputs["num_segments"][:, -1:], ones,
                           position=column("step_position"), cache=cache)[:, -1]
            logits = model.logits(hidden, batch.ext_ids, batch.ext_subs)
            worst = max(worst, float((logits[:, get("step_logit_columns").long()]
                                      - get("step_logits_cols")[step]).abs().max()))
    print(f"\ncached decoding, 8 steps x 5 rows: max abs logit difference {worst:.2e}")
    for beams, key in ((1, "greedy"), (3, "beam3")):
        _, results = fill_tasks(model, tokenizer, objects, GenerationConfig(max_new_tokens=8, num_beams=beams))
        same = sum([list(p) for p in result] == row[f"{key}_result_ids"] for result, row in zip(results, rows))
        tokens = sum(len(row[f"{key}_result_ids"]) for row in rows)
        print(f"{key}: {same}/5 tasks token for token equal to the original ({tokens} tokens)")


if __name__ == "__main__":
    main()
