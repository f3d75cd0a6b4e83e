"""A 10B-shape CPM-Ant (random weights) in int8 on this machine: build, generate, peak memory.

The float model would need ~37 GB, more than this machine has, so it is never made: the model is
built on the meta device with int8 layers, and each layer's weight is drawn in float32 and
quantized on its own (one layer's floats, ~170 MB, at a time). Then a few greedy tokens are
generated and the peak resident memory is reported.

    python benchmarks/quantize_10b.py [--preset ant-10b] [--new-tokens 4] [--activations none|int8]
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from cpmlive.config import QuantConfig
from cpmlive.model.registry import preset
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.model.ant.model import CpmAnt
from cpmlive.model.stack import RMSNorm
from cpmlive.model.runtime.quant import QuantizedLinear, install_quantized_layers, quantize_int8


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


@torch.no_grad()
def random_int8_model(name: str, activations: str, seed: int = 0) -> CpmAnt:
    config = preset(name)
    quantization = QuantConfig(bits=8, activations=activations)
    config = type(config).from_dict({**config.to_dict(), "half": False, "quantization": quantization.to_dict()})
    with torch.device("meta"):
        model = CpmAnt(config)
        install_quantized_layers(model, quantization)
    generator = torch.Generator().manual_seed(seed)
    for module_name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            weight = torch.randn(module.out_features, module.in_features, generator=generator)
            weight /= math.sqrt(module.in_features)
            codes, scale = quantize_int8(weight)
            module.set_codes(codes, scale)
            del weight
        elif isinstance(module, RMSNorm):
            module.weight = torch.nn.Parameter(torch.ones(module.weight.shape))
        elif isinstance(module, torch.nn.Embedding):
            module.weight = torch.nn.Parameter(torch.randn(module.weight.shape, generator=generator) * 0.02)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ant-10b")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--activations", choices=["none", "int8"], default="none")
    args = parser.parse_args()
    started = time.perf_counter()
    model = random_int8_model(args.preset, args.activations)
    built = time.perf_counter() - started
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"{args.preset}: {model.config.num_layers} layers, d_model {model.config.dim_model}; "
          f"{nbytes / 1e9:.2f} GB of int8 codes, scales and float tables; built in {built:.0f} s; "
          f"peak RSS {peak_gb():.2f} GB")
    prompt = [[6] + list(range(100, 116))]
    options = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    started = time.perf_counter()
    first = generate_ids(model, prompt, GenerationConfig(max_new_tokens=1), 7)
    one = time.perf_counter() - started
    started = time.perf_counter()
    ids = generate_ids(model, prompt, options, 7)
    seconds = time.perf_counter() - started
    rate = (args.new_tokens - 1) / max(seconds - one, 1e-9)
    print(f"generated {ids[0]} (first token {first[0]}); {args.new_tokens} tokens in {seconds:.1f} s, "
          f"decode {rate:.2f} tokens/s; peak RSS {peak_gb():.2f} GB (machine: "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
