"""Prefill speed: one forward over a batch of prompts, ours against HF ``CpmAntForCausalLM``.

Same weights in both. A prefill is what generation does before its first token: every
position goes through the stack and the logits of the last position are taken (HF with
``logits_to_keep=1``, as its ``generate`` calls it, which still runs its final block over every
row; we call ``model(..., last=1)`` as our ``generate`` does, so our final block computes the keys
and values of every row but the output of the last row only).
Tokens/s counts the text tokens (the 32 task-prompt positions both add are not counted).

    python benchmarks/prefill.py            # ~80M and ~450M, batch 4 x 512
    python benchmarks/prefill.py --quick    # ~80M only, batch 2 x 256
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from decode import build_ours, compare, count, hf_from_ours, millions, quiet_transformers, random_rows, table

from cpmlive.data.layout import GENERATION
from cpmlive.infer.generate import build_batch
from cpmlive.model.ant.model import CpmAnt


def hf_prefill(hf, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def ours_prefill(model: CpmAnt, inputs: dict, autocast: bool) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(**inputs, last=1)
        return model.logits(hidden[:, -1]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~80M only, batch 2 x 256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_transformers()
    shapes = ["80m"] if args.quick else ["80m", "450m"]
    batch, length = (2, 256) if args.quick else (4, 512)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batch} x {length} tokens, "
          f"median of {args.repeats} (after 1 warm-up)\n")
    results = []
    for shape in shapes:
        ours = build_ours(shape)
        hf = hf_from_ours(ours)
        rows = random_rows([length] * batch, seed=3)
        inputs = build_batch(rows, GENERATION, ours.config.prompt_length).as_inputs()
        input_ids = torch.tensor(rows)
        reference = hf_prefill(hf, input_ids)
        fp32_error = (ours_prefill(ours, inputs, False) - reference).abs().max().item()
        bf16_error = (ours_prefill(ours, inputs, True) - reference).abs().max().item()
        times = compare({
            "hf": lambda hf=hf: hf_prefill(hf, input_ids),
            "fp32": lambda ours=ours: ours_prefill(ours, inputs, False),
            "bf16": lambda ours=ours: ours_prefill(ours, inputs, True),
        }, args.repeats)
        rate = {name: batch * length / statistics.median(t) for name, t in times.items()}
        label = f"{shape} ({millions(count(ours))})"
        results.append([label, "ours, bf16 autocast", f"{rate['hf']:.0f}", f"{rate['bf16']:.0f}",
                        f"{rate['bf16'] / rate['hf']:.2f}x", f"{bf16_error:.1e}"])
        results.append([label, "ours, fp32", f"{rate['hf']:.0f}", f"{rate['fp32']:.0f}",
                        f"{rate['fp32'] / rate['hf']:.2f}x", f"{fp32_error:.1e}"])
        del ours, hf
        gc.collect()
    print(table(["shape", "ours", "HF fp32 tok/s", "ours tok/s", "ours / HF", "max abs logit diff vs HF"], results))


if __name__ == "__main__":
    main()
