"""CPM-1 decoding speed: ours against HF ``GPT2LMHeadModel`` on the same weights, and the 2.6B
shape in int8 against this machine's memory roofline.

1. Batch-1 greedy decoding at a ~350M GPT-2 shape (24 x 1024, 16 heads, CPM-1's 30,000 pieces),
   fp32: HF ``generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)`` against our
   ``generate_ids``; both hold the same random weights, so the ids must be identical.
2. The ``cpm1-2.6b`` shape in int8 (weights and the tied head; built layer by layer, never in
   float), greedy tokens/s against the bound the measured read bandwidth sets: every token
   streams all int8 weights once.
3. Memory of conversion and loading: the ~350M shape as a float16 Megatron release (two
   model-parallel shards), converted to ours and loaded, each in a fresh process; peak resident
   memory (``VmHWM``, which counts mapped file pages too) above a process that only imports.

    python benchmarks/cpm1.py                 # both parts
    python benchmarks/cpm1.py --skip-2.6b     # part 1 only
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpmlive.model.cpm1.config import Cpm1Config
from cpmlive.config import QuantConfig
from cpmlive.model.registry import preset
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.checkpoint import model_from_state_dict
from cpmlive.model.cpm1.model import Cpm1, build_cpm1
from cpmlive.model.cpm1.convert import hf_to_ours
from cpmlive.model.runtime.quant import QuantizedEmbedding, QuantizedLinear, install_quantized_layers, quantize_int8

from decode import compare, quiet_transformers, table
from quantize import read_bandwidth

SHAPE_350M = Cpm1Config(vocab_size=30000, dim_model=1024, dim_ff=4096, num_layers=24, num_heads=16, dim_head=64,
                        half=False, max_length=1024)
EOD = 7


def hf_model(config: Cpm1Config, seed: int = 0):
    transformers = quiet_transformers()
    torch.manual_seed(seed)
    data = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "dtype")}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**data, bos_token_id=None, eos_token_id=None))
    return model.eval()


def ours_from(hf, config: Cpm1Config) -> Cpm1:
    model = build_cpm1(config, seed=None)
    model.load_state_dict(hf_to_ours(dict(hf.state_dict()), config, "hf"))
    return model.eval()


def stored_half(hf, config: Cpm1Config) -> Cpm1:
    """Ours from the weights in float16, as CPM-1 is released, its matrices kept in float16 and
    multiplied in float32 (``cpmlive.load(..., stored_weights=True)``)."""
    state = {k: v.half() for k, v in hf_to_ours(dict(hf.state_dict()), config, "hf").items()}
    half = Cpm1Config.from_dict({**config.to_dict(), "half": True})
    return model_from_state_dict(half, state, torch.float32, keep_matrices=True)


def decode_350m(new_tokens: int, prompt_tokens: int, repeats: int) -> list[list[str]]:
    hf = hf_model(SHAPE_350M)
    rows = decode_case(hf, ours_from(hf, SHAPE_350M), "fp32 weights, both", new_tokens, prompt_tokens, repeats)
    hf.half().float()  # the float16 release's values, which HF holds in float32 on a CPU
    rows += decode_case(hf, stored_half(hf, SHAPE_350M), "float16 release: HF fp32 copy, ours fp16 matrices",
                        new_tokens, prompt_tokens, repeats)
    return rows


def decode_case(hf, ours: Cpm1, label: str, new_tokens: int, prompt_tokens: int, repeats: int) -> list[list[str]]:
    prompt = torch.randint(10, SHAPE_350M.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    options = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    results: dict[str, list[int]] = {}

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)
        results["hf"] = out[0, prompt_tokens:].tolist()

    def run_ours():
        with torch.inference_mode():
            results["ours"] = generate_ids(ours, [prompt[0].tolist()], options, EOD)[0]

    times = compare({"hf": run_hf, "ours": run_ours}, repeats)
    hf_s, ours_s = statistics.median(times["hf"]), statistics.median(times["ours"])
    parameters = sum(p.numel() for p in ours.parameters())
    return [[f"~350M ({parameters / 1e6:.0f}M), {label}, {prompt_tokens} + {new_tokens} tokens",
             f"{new_tokens / hf_s:.1f}", f"{new_tokens / ours_s:.1f}", f"**{hf_s / ours_s:.2f}x**",
             "identical" if results["hf"] == results["ours"] else "DIFFERENT"]]


@torch.no_grad()
def random_int8_cpm1(config: Cpm1Config, seed: int = 0) -> Cpm1:
    """The model on the meta device with int8 layers, each drawn in float32 and quantized on its own."""
    quantization = QuantConfig(bits=8)
    config = Cpm1Config.from_dict({**config.to_dict(), "half": False, "quantization": quantization.to_dict()})
    with torch.device("meta"):
        model = Cpm1(config)
        install_quantized_layers(model, quantization)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            weight = torch.randn(module.out_features, module.in_features, generator=generator)
            weight *= 0.02 if isinstance(module, QuantizedEmbedding) else 1 / math.sqrt(module.in_features)
            module.set_codes(*quantize_int8(weight))
            del weight
    for name, parameter in list(model.named_parameters()):
        if parameter.is_meta:
            owner, _, leaf = name.rpartition(".")
            value = torch.randn(parameter.shape, generator=generator) * 0.02 if parameter.dim() == 2 else (
                torch.ones(parameter.shape) if "norm" in owner and leaf == "weight" else torch.zeros(parameter.shape))
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(value))
    return model.eval()


def int8_2p6b(new_tokens: int, bandwidth: float) -> list[list[str]]:
    started = time.perf_counter()
    model = random_int8_cpm1(preset("cpm1-2.6b"))
    built = time.perf_counter() - started
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    prompt = torch.randint(10, 30000, (1, 16), generator=torch.Generator().manual_seed(2))[0].tolist()
    options = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.inference_mode():
        generate_ids(model, [prompt], GenerationConfig(max_new_tokens=2, min_new_tokens=2), EOD)
        start = time.perf_counter()
        generate_ids(model, [prompt], options, EOD)
        seconds = time.perf_counter() - start
    rate = new_tokens / seconds
    roofline = bandwidth * 1e9 / weight_bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return [[f"cpm1-2.6b int8 ({sum(p.numel() for p in model.state_dict().values()) / 1e9:.2f}B), 16 + {new_tokens}",
             f"{weight_bytes / 1e9:.2f}", f"{rate:.2f}", f"{roofline:.2f}", f"{rate / roofline:.0%}",
             f"{built:.0f}", f"{peak:.1f}"]]


PEAK = "import re; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"


def peak_mb(code: str) -> float:
    """Peak resident MB of a fresh Python running ``code`` (then reading its own VmHWM)."""
    out = subprocess.run([sys.executable, "-c", f"{code}\n{PEAK}"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def megatron_release(hf, root: Path) -> int:
    """The weights as CPM-Generate ships them: float16, two column/row-parallel shards; returns bytes."""
    state = {k: v.half() for k, v in hf.state_dict().items()}
    shards: list[dict] = [{}, {}]

    def put(name, tensor, dim=None):
        for rank in (0, 1):
            shards[rank][name] = tensor if dim is None else tensor.chunk(2, dim)[rank].clone()

    put("word_embeddings.weight", state["transformer.wte.weight"], 0)
    put("position_embeddings.weight", state["transformer.wpe.weight"])
    for layer in range(SHAPE_350M.num_layers):
        h, m = f"transformer.h.{layer}.", f"transformer.layers.{layer}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            put(f"{m}{ours}.weight", state[f"{h}{theirs}.weight"])
            put(f"{m}{ours}.bias", state[f"{h}{theirs}.bias"])
        q, k, v = state[h + "attn.c_attn.weight"].t().chunk(3, 0)
        qb, kb, vb = state[h + "attn.c_attn.bias"].chunk(3)
        for rank in (0, 1):
            shards[rank][m + "attention.query_key_value.weight"] = torch.cat([t.chunk(2, 0)[rank] for t in (q, k, v)])
            shards[rank][m + "attention.query_key_value.bias"] = torch.cat([t.chunk(2)[rank] for t in (qb, kb, vb)])
        put(m + "attention.dense.weight", state[h + "attn.c_proj.weight"].t(), 1)
        put(m + "attention.dense.bias", state[h + "attn.c_proj.bias"])
        put(m + "mlp.dense_h_to_4h.weight", state[h + "mlp.c_fc.weight"].t(), 0)
        put(m + "mlp.dense_h_to_4h.bias", state[h + "mlp.c_fc.bias"], 0)
        put(m + "mlp.dense_4h_to_h.weight", state[h + "mlp.c_proj.weight"].t(), 1)
        put(m + "mlp.dense_4h_to_h.bias", state[h + "mlp.c_proj.bias"])
    put("transformer.final_layernorm.weight", state["transformer.ln_f.weight"])
    put("transformer.final_layernorm.bias", state["transformer.ln_f.bias"])
    (root / "release").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    for rank, shard in enumerate(shards):
        torch.save({"module": shard, "mp_world_size": 2}, root / "release" / f"mp_rank_{rank:02d}_model_states.pt")
    return sum(f.stat().st_size for f in (root / "release").iterdir())


def conversion_memory() -> list[list[str]]:
    hf = hf_model(SHAPE_350M)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = megatron_release(hf, root / "megatron") / 1e6
        del hf
        base = peak_mb("import torch, cpmlive, cpmlive.model.cpm1.convert")
        convert = peak_mb(f"from cpmlive.model.cpm1.convert import convert; convert({str(root / 'megatron')!r}, "
                          f"{str(root / 'ours')!r})")
        load = peak_mb(f"import cpmlive.model.cpm1.convert as c; m, _ = c.load_pretrained({str(root / 'ours')!r}, "
                       "keep_matrices=True)")
        load32 = peak_mb(f"import torch, cpmlive.model.cpm1.convert as c; "
                         f"m, _ = c.load_pretrained({str(root / 'ours')!r}, dtype=torch.float32)")
    return [["convert the Megatron release to ours", f"{size:.0f}", f"{convert - base:.0f}",
             f"{(convert - base) / size:.2f}"],
            ["load ours, float16 matrices kept", f"{size:.0f}", f"{load - base:.0f}", f"{(load - base) / size:.2f}"],
            ["load ours as float32 (2x the bytes by definition)", f"{size:.0f}", f"{load32 - base:.0f}",
             f"{(load32 - base) / size:.2f}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8-tokens", type=int, default=16)
    parser.add_argument("--skip-2.6b", dest="skip_big", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    rows = decode_350m(args.new_tokens, args.prompt_tokens, args.repeats)
    print(table(["case", "HF tok/s", "ours tok/s", "ours / HF", "greedy ids vs HF"], rows))
    if not args.skip_memory:
        print("\n" + table(["~350M, float16", "checkpoint MB", "peak RSS above imports, MB", "x checkpoint"],
                            conversion_memory()))
    if args.skip_big:
        return
    bandwidth = read_bandwidth()
    print(f"\nread bandwidth (summing 1 GiB, this run): {bandwidth:.1f} GB/s\n")
    rows = int8_2p6b(args.int8_tokens, bandwidth)
    print(table(["case", "weights GB", "tok/s", "roofline tok/s", "of roofline", "build s", "peak RSS GB"], rows))


if __name__ == "__main__":
    main()
