"""Which CPU product runs each quantized weight format fastest, measured here, in one run.

For one ``[out, in]`` linear layer (default 4096 x 4096) at a few row counts it times the fp32
product (``F.linear``) and every product this torch build offers for the formats
``cpmlive.model.runtime.quant`` stores:

* int8 per output channel, weight-only: dequantize-then-``F.linear``, ``torch._weight_int8pack_mm``;
* int8 per output channel with int8 activations (dynamic, per token): our per-token quantization
  followed by ``torch._int_mm``, and fbgemm's ``quantized.linear_dynamic`` (per-tensor activations);
* int4 group-wise: dequantize-then-``F.linear``, ``torch._weight_int4pack_mm_for_cpu``;

and, for products of at most ``native.MAX_ROWS`` rows (weight-only int8: ``quant.INT8_NATIVE_MAX_ROWS``),
our own loops (``cpmlive.model.runtime.native``)
for fp32, bf16, int8 weight-only, int8 x int8 and int4, besides oneDNN's fp32 inner product
(what the model uses for fp32 decoding without them).

It prints milliseconds, the speed-up over fp32, the weight bytes read per product and the
bandwidth that implies, and the largest error against the dequantized float product.

    python benchmarks/quant_kernels.py [--dim 4096] [--rows 1 16 128] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from cpmlive.model.runtime import kernels, native, quant


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def candidates(weight: torch.Tensor, group_size: int) -> dict[str, tuple]:
    """name -> (make a callable of x, weight bytes, the float weight its numbers follow)."""
    q8, s8 = quant.quantize_int8(weight)
    w8 = quant.dequantize_int8(q8, s8)
    packed4, s4, z4 = quant.quantize_int4(weight, group_size)
    w4 = quant.dequantize_int4(packed4, s4, z4, group_size)
    out_features, in_features = weight.shape
    bytes8 = q8.numel() + s8.numel() * 4
    bytes4 = packed4.numel() + s4.numel() * 4 + z4.numel()
    runs: dict[str, tuple] = {"fp32 F.linear": (lambda x: F.linear(x, weight), weight.numel() * 4, weight)}
    if kernels._ONEDNN_LINEAR is not None:
        runs["fp32 oneDNN inner product"] = (lambda x: kernels._ONEDNN_LINEAR(x, weight, None, "none", [], ""),
                                             weight.numel() * 4, weight)
    if native.available():
        bf16 = weight.to(torch.bfloat16)
        runs["fp32 cpmlive native"] = (lambda x: native.matvec(x, weight), weight.numel() * 4, weight)
        runs["bf16 cpmlive native"] = (lambda x: native.matvec(x, bf16), weight.numel() * 2, bf16.float())
    runs["int8 dequantize + F.linear"] = (lambda x: F.linear(x, quant.dequantize_int8(q8, s8)), bytes8, w8)
    runs["int8 _weight_int8pack_mm"] = (lambda x: torch._weight_int8pack_mm(x, q8, s8), bytes8, w8)
    q8t = q8.t().contiguous()
    runs["w8a8 per-token + _int_mm"] = (lambda x: quant.int8_matmul_per_token(x, q8t, s8), bytes8, w8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(w8, s8.double(), torch.zeros(out_features, dtype=torch.long), 0,
                                             torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qweight, None)
    runs["w8a8 fbgemm linear_dynamic"] = (lambda x: torch.ops.quantized.linear_dynamic(x, packed, False), bytes8, w8)
    if native.available():
        runs["int8 cpmlive native"] = (lambda x: native.matvec_int8(x, q8, s8, False), bytes8, w8)
        runs["w8a8 cpmlive native"] = (lambda x: native.matvec_int8(x, q8, s8, True), bytes8, w8)
        runs["int4 cpmlive native"] = (lambda x: native.matvec_int4(x, packed4, s4, z4, group_size), bytes4, w4)
    runs["int4 dequantize + F.linear"] = (
        lambda x: F.linear(x, quant.dequantize_int4(packed4, s4, z4, group_size)), bytes4, w4)
    codes = quant.unpack_int4(packed4).to(torch.int32)
    tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    scales_zeros = quant.int4_scales_and_zeros(s4, z4)
    runs["int4 _weight_int4pack_mm_for_cpu"] = (
        lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiled, group_size, scales_zeros), bytes4, w4)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(args.dim, args.dim) / args.dim**0.5
    runs = candidates(weight, args.group_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.dim}x{args.dim} weight\n")
    print("| product | rows | ms | vs fp32 | weight MB | GB/s | max error |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        x = torch.randn(rows, args.dim)
        base = None
        for name, (fn, nbytes, reference) in runs.items():
            limit = quant.INT8_NATIVE_MAX_ROWS if name == "int8 cpmlive native" else native.MAX_ROWS
            if "native" in name and rows > limit:
                continue
            ms = timed(lambda: fn(x), args.repeats)
            base = base or ms
            error = (fn(x) - F.linear(x, reference)).abs().max().item()
            print(f"| {name} | {rows} | {ms:.2f} | {base / ms:.2f}x | {nbytes / 1e6:.1f} | "
                  f"{nbytes / ms / 1e6:.1f} | {error:.2e} |")


if __name__ == "__main__":
    main()
