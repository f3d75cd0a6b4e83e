"""Post-training quantization: choose the int8 / int4 codes of every linear layer.

* ``rtn``: round to nearest on each row (int8) or group (int4) grid.
* ``gptq``: GPTQ (Frantar et al., 2022): columns are rounded one at a time, and the rounding
  error of each is spread over the columns not yet rounded so as to minimise the error of the
  layer's output on calibration inputs, ``||W X - Q X||²``, through the inverse Hessian
  ``(2 X Xᵀ + damping)⁻¹`` (its Cholesky factor, in blocks of ``GPTQ_BLOCK`` columns with
  lazy updates). Blocks are quantized in order; each block's inputs come from the blocks before
  it already quantized, as the paper does.
* ``awq``: activation-aware scaling (Lin et al., 2023): input channels that carry large
  activations are scaled up in the weight before rounding and down in the input, which costs
  nothing at run time because the division is folded into what makes the input (an RMSNorm's
  weight, ``project_v`` for the attention output, ``w_1`` for the FFN output); the exponent of
  ``s = mean|x|^alpha`` is searched per layer group on calibration inputs; then round to nearest.

The tied embedding / head is int8 round-to-nearest per row in every method (int8 rounding of
it is near free, and GPTQ would need the head's own inputs for a table the input also reads).
The model's layers become :class:`cpmlive.model.runtime.quant.QuantizedLinear`; the formats are
described there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cpmlive.config import QuantConfig
from cpmlive.data.bee import text_batches
from cpmlive.data.layout import GENERATION, PromptBatch, build_batch
from cpmlive.errors import CpmliveError
from cpmlive.utils import check_output, replace_submodule
from cpmlive.model.stack import Block, Transformer
from cpmlive.model.checkpoint import checkpoint_vocab, save_checkpoint
from cpmlive.model.registry import family_of, owners
from cpmlive.model.fingerprint import weights_fingerprint
from cpmlive.model.runtime.quant import (
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8,
    int4_codes,
    int4_group_params,
    is_quantized,
    pack_int4,
    quantize_int4,
    quantize_int8,
)

GPTQ_BLOCK = 128
GPTQ_DAMPING = 0.01  # share of the mean Hessian diagonal added to it
DEFAULT_SAMPLES = 64
DEFAULT_SAMPLE_TOKENS = 256
CALIBRATION_BATCH = 8
AWQ_GRID = 20
AWQ_MAX_ROWS = 4096

Progress = Callable[[str], None]


# ---- calibration text --------------------------------------------------------------------------


def read_calibration_text(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (one-line errors for a missing, binary or
    empty file)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CpmliveError(f"{path}: calibration file not found") from None
    except UnicodeDecodeError as exc:
        raise CpmliveError(f"{path}: the calibration file is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CpmliveError(f"{path}: cannot read the calibration file ({exc.strerror or exc})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CpmliveError(f"{path}: the calibration file is empty")
    return lines


def calibration_rows(token_lines: Iterable[list[int]], samples: int = DEFAULT_SAMPLES,
                     length: int = DEFAULT_SAMPLE_TOKENS) -> list[list[int]]:
    """At most ``samples`` windows of ``length`` tokens from the documents' tokens run together
    (the last window may be shorter): the text the codes are fitted to."""
    stream = [token for line in token_lines for token in line]
    if not stream:
        raise CpmliveError("the calibration text has no tokens")
    rows = [stream[i:i + length] for i in range(0, min(len(stream), samples * length), length)]
    if len(rows) < samples:
        warnings.warn(f"calibration: the text gives {len(rows)} row{'s' * (len(rows) != 1)} of up to {length} tokens "
                      f"({len(stream)} tokens), not the {samples} asked for: the codes are fitted to that little text "
                      "(give more calibration text)", stacklevel=2)
    return rows


def calibration_batches(rows: list[list[int]], bos_id: int, prompt_length: int,
                        batch_size: int = CALIBRATION_BATCH) -> list[PromptBatch]:
    """Rows laid out as the model reads a text to score or continue it (only ``<s>`` is context)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        group = [[bos_id] + row for row in rows[start:start + batch_size]]
        batches.append(build_batch(group, GENERATION, prompt_length,
                                   context_rows=[[True] + [False] * (len(r) - 1) for r in group]))
    return batches


# ---- round to nearest --------------------------------------------------------------------------


def rtn_codes(weight: Tensor, config: QuantConfig) -> tuple[Tensor, ...]:
    return quantize_int8(weight) if config.bits == 8 else quantize_int4(weight, config.group_size)


# ---- GPTQ ------------------------------------------------------------------------------------------


class HessianCollector:
    """Accumulates ``2 / n * Σ x xᵀ`` over the rows a linear layer reads (its valid positions)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.hessian = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        rows = x.reshape(-1, x.size(-1)).double()
        total = self.rows + rows.size(0)
        self.hessian.mul_(self.rows / total).add_(rows.T @ rows, alpha=2.0 / total)
        self.rows = total


def gptq_codes(weight: Tensor, hessian: Tensor, config: QuantConfig,
               damping: float = GPTQ_DAMPING, block: int = GPTQ_BLOCK) -> tuple[Tensor, ...]:
    """GPTQ codes and scales (int4: and zero points) of ``weight`` ``[out, in]`` for inputs of
    Hessian ``hessian`` ``[in, in]``."""
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise CpmliveError("GPTQ: the calibration inputs' Hessian is not positive definite; "
                           "give more calibration text") from None
    out_features, in_features = w.shape
    group = config.group_size if config.bits == 4 else in_features
    grid = _Grid(config, out_features, in_features)
    if config.bits == 8:
        grid.fit(0, w)
    codes = torch.zeros_like(w)
    for first in range(0, in_features, block):
        last = min(first + block, in_features)
        w_block = w[:, first:last].clone()
        errors = torch.zeros_like(w_block)
        inverse = upper[first:last, first:last]
        for i in range(last - first):
            column = first + i
            if config.bits == 4 and column % group == 0:
                grid.fit(column, torch.cat([w_block[:, i:], w[:, last:]], dim=1)[:, :group])
            q, dequantized = grid.round(column, w_block[:, i])
            codes[:, column] = q
            error = (w_block[:, i] - dequantized) / inverse[i, i]
            w_block[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, last:] -= errors @ upper[first:last, last:]
    return grid.result(codes)


class _Grid:
    """The quantization grid of each row (int8) or row x group (int4), fitted as GPTQ goes."""

    def __init__(self, config: QuantConfig, out_features: int, in_features: int) -> None:
        self.config = config
        self.group = config.group_size if config.bits == 4 else in_features
        groups = in_features // self.group
        self.scale = torch.ones(out_features, groups, dtype=torch.float64)
        self.zero = torch.zeros(out_features, groups, dtype=torch.float64)

    def fit(self, column: int, values: Tensor) -> None:
        index = column // self.group
        if self.config.bits == 8:
            self.scale[:, index] = (values.abs().amax(dim=1) / 127).clamp(min=1e-12)
        else:
            self.scale[:, index], self.zero[:, index] = int4_group_params(values)

    def round(self, column: int, values: Tensor) -> tuple[Tensor, Tensor]:
        index = column // self.group
        scale, zero = self.scale[:, index], self.zero[:, index]
        if self.config.bits == 8:
            q = torch.round(values / scale).clamp(-127, 127)
            return q, q * scale
        q = int4_codes(values, scale, zero)
        return q, (q - zero) * scale

    def result(self, codes: Tensor) -> tuple[Tensor, ...]:
        if self.config.bits == 8:
            return codes.to(torch.int8), self.scale[:, 0].float()
        return pack_int4(codes.to(torch.uint8)), self.scale.float(), self.zero.to(torch.uint8)


# ---- whole models ----------------------------------------------------------------------------------


def block_linears(block: Block) -> dict[str, nn.Linear]:
    return {name: module for name, module in block.named_modules() if type(module) is nn.Linear}


class _StopForward(Exception):
    """Raised by a hook once the block being calibrated has run: later blocks are not needed."""


@torch.no_grad()
def feed_inputs(model: Transformer, modules: dict[str, nn.Module], batches: list[PromptBatch],
                consume: Callable[[str, Tensor], None], stop_after: nn.Module | None = None) -> None:
    """Run the calibration batches through ``model`` and hand ``consume(name, rows)`` the valid
    input rows of each of ``modules``; with ``stop_after``, the forward stops once that module
    has run (the layers after it are not needed)."""
    valid: list[Tensor] = []

    def collect(name: str) -> Callable:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            consume(name, x[valid[0][:, -x.size(1):]])
        return hook

    def stop(*_args: object) -> None:
        raise _StopForward

    handles = [module.register_forward_pre_hook(collect(name)) for name, module in modules.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        for batch in batches:
            valid[:] = [batch.valid]
            try:
                model(**batch.as_inputs())
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()


def feed_block_inputs(model: Transformer, block: Block, batches: list[PromptBatch],
                      consume: Callable[[str, Tensor], None]) -> None:
    """:func:`feed_inputs` for the linear layers of ``block``, the blocks before it as they are
    now (already quantized)."""
    feed_inputs(model, block_linears(block), batches, consume, stop_after=block)


def block_hessians(model: Transformer, block: Block, batches: list[PromptBatch]) -> dict[str, HessianCollector]:
    """The Hessian of every linear layer of ``block`` on the calibration batches."""
    collectors = {name: HessianCollector(layer) for name, layer in block_linears(block).items()}
    feed_block_inputs(model, block, batches, lambda name, rows: collectors[name].add(rows))
    return collectors


# ---- AWQ -----------------------------------------------------------------------------------------


def block_input_samples(model: Transformer, block: Block, batches: list[PromptBatch],
                        max_rows: int = AWQ_MAX_ROWS) -> dict[str, Tensor]:
    """Up to ``max_rows`` input rows of each linear layer of ``block`` (evenly spaced)."""
    pieces: dict[str, list[Tensor]] = {}
    feed_block_inputs(model, block, batches, lambda name, rows: pieces.setdefault(name, []).append(rows.float()))
    samples = {}
    for name, parts in pieces.items():
        rows = torch.cat(parts)
        step = max(1, rows.size(0) // max_rows)
        samples[name] = rows[::step][:max_rows]
    return samples


def fake_quantized(weight: Tensor, config: QuantConfig) -> Tensor:
    """``weight`` rounded to its grid and back to floats (round to nearest), in its own dtype."""
    with torch.no_grad():
        if config.bits == 8:
            return dequantize_int8(*quantize_int8(weight), dtype=weight.dtype)
        return dequantize_int4(*quantize_int4(weight, config.group_size), config.group_size, dtype=weight.dtype)


def awq_search(x: Tensor, weights: list[Tensor], config: QuantConfig, grid: int = AWQ_GRID,
               shared: Tensor | None = None) -> Tensor:
    """AWQ's per-input-channel scale ``s = mean|x|^alpha`` (normalised), with the ``alpha`` in
    ``0, 1/grid, ... (grid-1)/grid`` whose rounded ``W * s`` applied to ``x / s`` best reproduces
    every layer's float output; ``alpha = 0`` (no scaling, plain RTN) is one of them. ``shared``
    maps each input channel to the channel of its source it is a copy of (grouped values): the
    channels of one source channel get one scale, from their mean magnitude."""
    magnitude = x.abs().mean(dim=0)
    if shared is not None:
        sources = int(shared.max()) + 1
        totals = torch.zeros(sources, dtype=magnitude.dtype).index_add_(0, shared, magnitude)
        counts = torch.zeros(sources, dtype=magnitude.dtype).index_add_(0, shared, torch.ones_like(magnitude))
        magnitude = (totals / counts.clamp(min=1))[shared]
    references = [x @ w.float().T for w in weights]
    best_error, best_scale = math.inf, torch.ones_like(magnitude)
    for step in range(grid):
        scale = magnitude.pow(step / grid).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        scaled_x = x / scale
        error = sum((scaled_x @ fake_quantized(w.float() * scale, config).T - ref).pow(2).mean().item()
                    for w, ref in zip(weights, references))
        if error < best_error:
            best_error, best_scale = error, scale
    return best_scale


@torch.no_grad()
def awq_scale_block(block: Block, samples: dict[str, Tensor], config: QuantConfig) -> None:
    """Search and fold AWQ scales into ``block``'s float weights; what it computes is unchanged:
    each scaled layer's input is divided by ``s`` where it is made (an RMSNorm's weight, or the
    rows of the product that feeds it, and its bias) and its weight columns are multiplied by ``s``.

    Grouped attention (fewer value heads than query heads) reads each value channel in every head
    of its group, so those channels share one scale. An attention without q/k/v products
    (latent attention) is rounded without scaling."""
    groups: list[tuple[str, list[Tensor], list[nn.Linear], Tensor | None]] = []
    attn = getattr(block, "attn", None)
    if attn is not None and all(hasattr(attn, name) for name in ("project_q", "project_k", "project_v")):
        groups.append(("attn.project_q", [block.attn_norm.weight], [attn.project_q, attn.project_k, attn.project_v],
                       None))
        bias = getattr(attn, "bias_v", None)
        groups.append(("attn.attention_out", [attn.project_v.weight] + ([bias] if bias is not None else []),
                       [attn.attention_out], _value_channels(attn)))
    if hasattr(block, "ffn"):
        ffn = block.ffn
        groups.append(("ffn.w_0", [block.ffn_norm.weight], [ffn.w_0, ffn.w_1], None))
        groups.append(("ffn.w_out", [ffn.w_1.weight], [ffn.w_out], None))
    for input_name, sources, layers, shared in groups:
        scale = awq_search(samples[input_name], [layer.weight for layer in layers], config, shared=shared)
        for layer in layers:
            layer.weight.mul_(scale.to(layer.weight.dtype))
        if shared is not None:
            scale = torch.zeros(sources[0].size(0), dtype=scale.dtype).index_copy_(0, shared, scale)
        for source in sources:
            # a norm's weight and a bias scale their output channels; a linear layer's rows are its outputs
            source.div_((scale if source.dim() == 1 else scale[:, None]).to(source.dtype))


def _value_channels(attn: nn.Module) -> Tensor | None:
    """For grouped attention (``num_kv_heads`` < ``num_heads``), the value channel each channel
    of the attention output's input reads (HF's ``repeat_kv``: head ``h`` reads value head
    ``h // (num_heads / num_kv_heads)``); None when every head has its own values."""
    heads, kv_heads = getattr(attn, "num_heads", 0), getattr(attn, "num_kv_heads", 0)
    if not kv_heads or kv_heads == heads:
        return None
    width = attn.attention_out.in_features // heads
    channel = torch.arange(heads * width)
    return (channel // width // (heads // kv_heads)) * width + channel % width


def quantize_model(model: Transformer, config: QuantConfig, batches: list[PromptBatch] | None = None,
                   progress: Progress | None = None) -> Transformer:
    """Quantize ``model`` in place (its config gains ``quantization``); GPTQ and AWQ need ``batches``."""
    check_quantizable(model, config)
    if config.method != "rtn" and not batches:
        raise CpmliveError(f"{config.method.upper()} needs calibration text: pass --calibration FILE")
    model.eval()
    blocks = model.blocks()
    for index, block in enumerate(blocks):
        hessians = block_hessians(model, block, batches) if config.method == "gptq" else {}
        if config.method == "awq":
            awq_scale_block(block, block_input_samples(model, block, batches), config)
        for name, layer in block_linears(block).items():
            if config.method == "gptq":
                codes = gptq_codes(layer.weight, hessians[name].hessian, config)
            else:
                codes = rtn_codes(layer.weight, config)
            quantized = QuantizedLinear(layer.in_features, layer.out_features, config)
            quantized.set_codes(*codes)
            replace_submodule(block, name, quantized)
        if progress is not None:
            progress(f"layer {index + 1}/{len(blocks)}")
    if config.embedding:
        table = model.input_embedding
        quantized_table = QuantizedEmbedding(table.num_embeddings, table.embedding_dim, config)
        quantized_table.set_codes(*quantize_int8(table.weight))
        model.input_embedding = quantized_table
    model.config = dataclasses.replace(model.config, quantization=config)
    return model


def check_quantizable(model: Transformer, config: QuantConfig) -> None:
    """Refuse, before any work, a model that is already quantized or a group size that does not
    divide every layer's inputs."""
    if is_quantized(model) or model.config.quantization is not None:
        raise CpmliveError("the model is already quantized: quantize its float checkpoint instead")
    if model.config.moe is not None:
        raise CpmliveError("a MoEfied model cannot be quantized (yet): quantize before moefying")
    if config.bits == 4:
        widths = sorted({layer.in_features for block in model.blocks() for layer in block_linears(block).values()})
        bad = [w for w in widths if w % config.group_size]
        if bad:
            raise CpmliveError(f"group size {config.group_size} does not divide the layers' {bad[0]} inputs "
                               f"(widths: {', '.join(map(str, widths))})")



# ---- checkpoints ---------------------------------------------------------------------------------


def quantize_checkpoint(src: str | Path, out: str | Path, config: QuantConfig,
                        calibration: str | Path | None = None, samples: int = DEFAULT_SAMPLES,
                        sample_tokens: int = DEFAULT_SAMPLE_TOKENS, force: bool = False,
                        progress: bool = True) -> Path:
    """Quantize a float checkpoint (any format, ``"demo"`` too) into the model directory ``out``
    (written atomically: an interrupted run leaves nothing there)."""
    kind = family_of(src)
    if config.method != "rtn" and not kind.can("calibrate"):
        raise CpmliveError(f"{src}: GPTQ/AWQ calibration is {owners('calibrate')}'s ({kind.name}: use --method rtn)")
    out = check_output(out, force)
    model, directory = kind.load(src, dtype=torch.float32)
    if model.config.quantization is not None:
        raise CpmliveError(f"{src}: already quantized ({model.config.quantization.scheme}); "
                           "quantize its float checkpoint instead")
    check_quantizable(model, config)
    config = dataclasses.replace(config, source=weights_fingerprint(model.config.to_dict(), model.state_dict()))
    vocab = checkpoint_vocab(directory)
    batches = None
    if calibration is not None:
        lines = read_calibration_text(calibration)
        if vocab is None:
            raise CpmliveError(f"{src}: no {kind.vocab_name} to tokenize the calibration text with")
        tokenizer = kind.tokenizer.from_file(vocab)
        if kind.can("bee"):  # CPM-Bee reads tasks: each line the answer of a text task
            batches = text_batches(tokenizer, lines, samples, sample_tokens)
            count = sum(int(batch.valid.size(0)) for batch in batches)
        else:
            rows = calibration_rows((tokenizer.encode(line) for line in lines), samples, sample_tokens)
            batches, count = calibration_batches(rows, tokenizer.bos_id, model.config.prompt_length), len(rows)
        config = dataclasses.replace(config, calibration={
            "file": Path(calibration).name, "sha256": hashlib.sha256(Path(calibration).read_bytes()).hexdigest(),
            "rows": count, "tokens_per_row": sample_tokens})
    elif config.method != "rtn":
        raise CpmliveError(f"method {config.method} needs calibration text: pass --calibration FILE")
    bar = tqdm(total=len(model.blocks()), desc=f"quantize {config.scheme} {config.method}", unit="layer",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with bar:
        quantize_model(model, config, batches, progress=lambda _message: bar.update(1))
    return save_checkpoint(model.state_dict(), model.config, out, vocab=vocab)


__all__ = ["calibration_batches", "calibration_rows", "fake_quantized", "feed_inputs", "gptq_codes",
           "quantize_checkpoint", "quantize_model", "read_calibration_text", "rtn_codes"]
