"""Greedy decoding speed: ours (``generate_ids``) against HF ``CpmAntForCausalLM.generate``.

Both models hold the same random weights (ours is built, HF adopts the same tensors), so the
generated ids must be identical; the script prints whether they are.

    python benchmarks/decode.py            # ~80M and ~450M at batch 1, ~80M at batch 16
    python benchmarks/decode.py --quick    # smaller: fewer tokens, ~80M only

The model builder here is shared with ``prefill.py`` and ``load_memory.py``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch

from cpmlive.model.ant.config import AntConfig
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.ant.model import CpmAnt, build_model
from cpmlive.model.ant.keys import ours_to_hf

EOS = 7
BOS = 6
VOCAB = 30720
SHAPES = {
    "80m": dict(dim_model=768, num_heads=12, dim_head=64, dim_ff=2048, num_layers=8),
    "450m": dict(dim_model=1280, num_heads=20, dim_head=64, dim_ff=3200, num_layers=22),
}


# ---- shared helpers ---------------------------------------------------------------------------


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    return transformers


def shape_config(shape: str) -> AntConfig:
    return AntConfig(vocab_size=VOCAB, half=False, **SHAPES[shape])


def build_ours(shape: str, seed: int = 0) -> CpmAnt:
    """Our model with random weights (a non-zero position bias, so the bias matters)."""
    model = build_model(shape_config(shape), seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        model.position_bias.weight.copy_(torch.randn(model.position_bias.weight.shape, generator=generator))
    return model.eval()


def hf_config(config: AntConfig):
    transformers = quiet_transformers()
    data = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type")}
    return transformers.CpmAntConfig(**data)


def hf_from_ours(model: CpmAnt):
    """HF ``CpmAntForCausalLM`` adopting the same tensors (its untied head and the
    vocab+prompt embedding table are the only copies)."""
    transformers = quiet_transformers()
    with torch.device("meta"):
        hf = transformers.CpmAntForCausalLM(hf_config(model.config))
    hf.load_state_dict(ours_to_hf(model.state_dict(), model.config), assign=True)
    return hf.eval()


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_rows(lengths: list[int], seed: int) -> list[list[int]]:
    """``<s>`` then random ids that are neither padding (0) nor ``</s>``."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(10, VOCAB, (n - 1,), generator=generator).tolist()
        rows.append([BOS] + ids)
    return rows


def left_pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[0] * (width - len(r)) + r for r in rows])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(runs: dict[str, callable], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every candidate ``warmup`` times, then ``repeats`` times interleaved (so machine
    noise hits both alike); return the seconds of each measured run."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            gc.collect()
            times[name].append(timed(fn))
    return times


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


# ---- decoding -----------------------------------------------------------------------------------


def hf_decode(hf, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    inputs = left_pad(rows)
    with torch.inference_mode():
        out = hf.generate(inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=EOS, pad_token_id=0)
    return out[:, inputs.size(1):].tolist()


def ours_decode(model: CpmAnt, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return generate_ids(model, rows, config, EOS)


def decode_case(label: str, ours: CpmAnt, hf, rows: list[list[int]], new_tokens: int, repeats: int,
                extra: dict[str, CpmAnt] | None = None) -> list[list[str]]:
    """End-to-end rate (prefill included: new tokens / seconds of the whole call) and the
    decode-phase rate (``B * (N - 1)`` tokens over ``t(N) - t(1)``: without the prefill)."""
    reference = hf_decode(hf, rows, new_tokens)  # also HF's warm-up
    same = ours_decode(ours, rows, new_tokens) == reference
    models = {"ours": ours, **(extra or {})}
    runs = {"hf": lambda n: hf_decode(hf, rows, n)}
    runs.update({name: (lambda n, model=model: ours_decode(model, rows, n)) for name, model in models.items()})
    for name in models:
        if name != "ours":
            runs[name](min(8, new_tokens))  # warm-up
    full = compare({name: (lambda fn=fn: fn(new_tokens)) for name, fn in runs.items()}, repeats, warmup=0)
    first = compare({name: (lambda fn=fn: fn(1)) for name, fn in runs.items()}, repeats, warmup=0)
    batch = len(rows)

    def rates(name: str) -> tuple[float, float]:
        whole, one = statistics.median(full[name]), statistics.median(first[name])
        return batch * new_tokens / whole, batch * (new_tokens - 1) / max(whole - one, 1e-9)

    hf_e2e, hf_decode_rate = rates("hf")
    out = []
    for name in models:
        e2e, decode_rate = rates(name)
        ids = ("identical" if same else "DIFFERENT") if name == "ours" else "-"
        out.append([label, name, f"{hf_e2e:.1f}", f"{e2e:.1f}", f"**{e2e / hf_e2e:.2f}x**",
                    f"{hf_decode_rate:.1f}", f"{decode_rate:.1f}", f"{decode_rate / hf_decode_rate:.2f}x", ids])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~80M only, 32 new tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (32 with --quick)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the ours-with-bf16-weights rows")
    args = parser.parse_args()
    quiet_transformers()
    torch.manual_seed(0)
    shapes = ["80m"] if args.quick else ["80m", "450m"]
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    prompt = 64
    batch_lengths = [16 + 4 * i for i in range(16)]  # 16 .. 76 tokens, left padded

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, greedy, exactly {new_tokens} new "
          f"tokens, fp32 unless labelled; medians of {args.repeats} interleaved runs after a warm-up\n")
    shape_rows, results = [], []
    for shape in shapes:
        ours = build_ours(shape)
        hf = hf_from_ours(ours)
        cfg = ours.config
        shape_rows.append([shape, str(cfg.dim_model), str(cfg.num_layers), f"{cfg.num_heads}x{cfg.dim_head}",
                           str(cfg.dim_ff), millions(count(ours)), millions(count(hf))])
        extra = {} if args.no_bf16 else {"ours, bf16 weights": build_model_copy(ours, torch.bfloat16)}
        rows = random_rows([prompt], seed=1)
        results += decode_case(f"{shape} batch 1, prompt {prompt}", ours, hf, rows, new_tokens, args.repeats,
                               extra)
        if shape == "80m":
            rows = random_rows(batch_lengths, seed=2)
            results += decode_case(f"{shape} batch 16, prompts {batch_lengths[0]}-{batch_lengths[-1]}", ours,
                                   hf, rows, new_tokens, args.repeats)
        del ours, hf, extra
        gc.collect()
    print(table(["shape", "d_model", "layers", "heads x dim", "d_ff", "params (ours)", "params (HF: untied head)"],
                shape_rows))
    print()
    print(table(["case", "ours", "HF tok/s", "ours tok/s", "ours / HF", "HF decode-phase tok/s",
                 "ours decode-phase tok/s", "decode-phase ours / HF", "generated ids vs HF"], results))


def build_model_copy(model: CpmAnt, dtype: torch.dtype) -> CpmAnt:
    with torch.device("meta"):
        copy = CpmAnt(model.config)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
    return copy.eval()


if __name__ == "__main__":
    main()
