"""Memory to load a checkpoint: ours (``load_model``) against HF ``from_pretrained``.

The parent writes the same ~450M fp32 weights twice, with ``save_checkpoint`` and with HF
``save_pretrained``, then loads each in a fresh subprocess. The child imports torch,
transformers and cpmlive first, takes its RSS as the baseline, resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``; ``ru_maxrss`` where that is not allowed) and loads: the peak
RSS growth during the load, divided by the checkpoint's size on disk, is the number compared.

For completeness it then generates one token and reports the RSS after that too, split into
anonymous memory and file pages: both loaders map the safetensors file, so weights enter RSS
as clean file pages when first read (pages the kernel can drop under memory pressure).

    python benchmarks/load_memory.py            # ~450M
    python benchmarks/load_memory.py --quick    # ~80M
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        return status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(kind: str, path: str) -> None:
    import gc

    import torch
    import transformers

    from cpmlive.infer.generate import GenerationConfig, generate_ids
    from cpmlive.model.checkpoint import load_model

    transformers.logging.set_verbosity_error()
    gc.collect()
    base = status_bytes("VmRSS")
    base_anon, base_file = status_bytes("RssAnon"), status_bytes("RssFile")
    reset_ok = reset_peak()
    start = time.perf_counter()
    if kind == "ours":
        model = load_model(path)
    else:
        model = transformers.CpmAntForCausalLM.from_pretrained(path, dtype=torch.float32)
    seconds = time.perf_counter() - start
    load_peak = peak_bytes(reset_ok) - base
    after_load = status_bytes("VmRSS") - base

    reset_ok = reset_peak()
    prompt = [6, 1000, 2000, 3000]
    if kind == "ours":
        generate_ids(model, [prompt], GenerationConfig(max_new_tokens=1), stop_ids=7)
    else:
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=1, do_sample=False, eos_token_id=7, pad_token_id=0)
    first_peak = peak_bytes(reset_ok) - base
    after_first = status_bytes("VmRSS") - base
    anon, file = status_bytes("RssAnon") - base_anon, status_bytes("RssFile") - base_file
    print(json.dumps({"load_peak": load_peak, "after_load": after_load, "seconds": seconds,
                      "first_peak": first_peak, "after_first": after_first, "anon": anon, "file": file,
                      "peak_reset": reset_ok}))


def measure(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~80M instead of ~450M")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from decode import build_ours, count, hf_from_ours, millions, table

    from cpmlive.model.checkpoint import save_checkpoint

    shape = "80m" if args.quick else "450m"
    with tempfile.TemporaryDirectory(prefix="cpmlive-load-") as tmp:
        model = build_ours(shape)
        params = count(model)
        ours_dir, hf_dir = Path(tmp) / "ours", Path(tmp) / "hf"
        save_checkpoint(model, model.config, ours_dir)
        hf = hf_from_ours(model)
        hf.save_pretrained(hf_dir)
        del model, hf
        rows = []
        for kind, directory in (("ours load_model", ours_dir), ("HF from_pretrained", hf_dir)):
            size = weights_bytes(directory)
            result = measure(kind.split()[0].lower(), directory)
            rows.append([kind, f"{size / MiB:.0f}", f"{result['load_peak'] / MiB:.0f}",
                         f"{result['load_peak'] / size:.2f}x", f"{result['after_load'] / MiB:.0f}",
                         f"{result['seconds']:.2f}", f"{result['first_peak'] / MiB:.0f}",
                         f"{result['after_first'] / MiB:.0f} ({result['anon'] / MiB:.0f} + "
                         f"{result['file'] / MiB:.0f})"])
            reset = result["peak_reset"]
    print(f"{shape} fp32 checkpoint ({millions(params)} parameters; HF's also holds its untied lm_head); "
          f"peak = {'VmHWM after clear_refs' if reset else 'ru_maxrss'}, all numbers are growth over the "
          f"child's RSS after importing torch, transformers and cpmlive\n")
    print(table(["loader", "weights on disk MiB", "peak RSS growth in load MiB", "peak / size",
                 "RSS after load MiB", "load s", "peak RSS growth in a first 1-token generate MiB",
                 "RSS after it MiB (anon + file)"], rows))


if __name__ == "__main__":
    main()
