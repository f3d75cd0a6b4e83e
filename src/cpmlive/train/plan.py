"""The memory planner: will this model train (or serve) on these devices, and in which layout?

``cpmlive plan MODEL_OR_PRESET --gpus N --gpu-memory 80GB`` prints, per device and for each
layout of N devices as tensor parallel (``tp``) x fully sharded data parallel (``dp``), what
DeepSpeed's estimators print and a little more:

* **parameters**: the FSDP2 shard (``P / N`` elements at the master precision, float32) plus
  two blocks gathered whole (the one computing and the one prefetched), split over ``tp``;
* **gradients**: the float32 shard plus one block's gradients before its reduce-scatter;
* **optimizer**: AdamW's two float32 moments of the shard;
* **activations** of one micro-batch (``--batch`` rows of ``--seq`` tokens) with and without
  activation checkpointing (with it: every block's input, plus one block recomputed);
* **kv cache**: serving ``--batch`` sequences of ``--seq`` tokens (keys and values of every
  attention layer in the serving dtype), beside the serving weights.

With ``--offload`` the shards (parameters, gradients, optimizer) live in host memory and only
the gathered blocks stay on the device; with ``--adapter lora`` the base weights are frozen in
the compute dtype and only the LoRA matrices have gradients and optimizer state.

Activations are **measured, not modelled**: the bytes our own blocks save for backward are
counted (``saved_tensors_hooks``) on small models of the same family at a few shapes, and the
exact linear law in the shapes (``b*s*h``, ``b*s*ff``, ``b*s*heads*dim_head``, ``b*heads*s^2``,
...) is solved for, per block and for the rest of the model. The law then gives any shape; the
tests hold it to a direct measurement at shapes it was not solved on.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from cpmlive.errors import CpmliveError

GiB = 1024**3
# The activation law's terms: a monomial of the dimensions, times b or 1, times 1, s or s^2.
DIMENSION_TERMS = ("1", "h", "f", "a", "d", "ad", "kd", "had", "hkd", "hf")
TP_SPLIT = {"f", "a", "ad", "kd", "had", "hkd", "hf"}  # split over tensor-parallel ranks (heads, FFN columns)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def parse_bytes(text: str) -> int:
    """``80GB``, ``24GiB``, ``6G``, ``512MB`` or a plain byte count (GB = GiB = 2^30, as GPUs are sold)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise CpmliveError(f"cannot read {text!r} as a size (e.g. 80GB, 24GiB, 512MB)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise CpmliveError(f"size {text!r} must be positive")
    return value


# ---- what the model holds ----------------------------------------------------------------------


def tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    from cpmlive.model.checkpoint import expected_shapes

    return expected_shapes(dataclasses.replace(config, quantization=None))


def parameter_count(config: Any) -> int:
    return sum(math.prod(shape) for shape in tensor_shapes(config).values())


def block_parameters(config: Any) -> int:
    """The largest transformer block's parameter count (what FSDP gathers at once)."""
    blocks: dict[str, int] = {}
    for name, shape in tensor_shapes(config).items():
        match = re.match(r"layers\.(\d+)\.", name)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + math.prod(shape)
    return max(blocks.values(), default=0)


def lora_parameters(config: Any, rank: int, targets: tuple[str, ...] = ("project_q", "project_v")) -> int:
    """LoRA's trainable count: ``rank * (in + out)`` for every targeted matrix (our default targets)."""
    total = 0
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 2 and name.endswith(".weight") and name.split(".")[-2] in targets:
            total += rank * (shape[0] + shape[1])
    return total


def attention_layers(config: Any) -> int:
    mask = getattr(config, "mask_modules", None)
    return sum(1 for attention_off, _ in mask if not attention_off) if mask else config.num_layers


def kv_heads(config: Any) -> int:
    return getattr(config, "num_kv_heads", config.num_heads)


def kv_cache_bytes(config: Any, batch: int, seq: int, dtype_bytes: int, tp: int = 1) -> int:
    """Keys and values of ``batch`` sequences of ``seq`` tokens, split over ``tp`` ranks."""
    per_token = attention_layers(config) * 2 * kv_heads(config) * config.dim_head * dtype_bytes
    return batch * seq * per_token // tp


# ---- activations, measured ---------------------------------------------------------------------


def _dimension_values(config: Any) -> dict[str, float]:
    h, f, a, d, k = config.dim_model, config.dim_ff, config.num_heads, config.dim_head, kv_heads(config)
    return {"1": 1, "h": h, "f": f, "a": a, "d": d, "ad": a * d, "kd": k * d, "had": h * a * d, "hkd": h * k * d,
            "hf": h * f}


def _features(config: Any, batch: int, seq: int, tp: int = 1) -> list[float]:
    """Every term of the law at this shape (the dimension monomials split by ``tp`` where they
    are split across tensor-parallel ranks)."""
    dims = _dimension_values(config)
    out = []
    for name in DIMENSION_TERMS:
        value = dims[name] / (tp if name in TP_SPLIT else 1)
        out += [value * bf * sf for bf in (batch, 1) for sf in (1, seq, seq * seq)]
    return out


def loss_bytes(config: Any, batch: int, seq: int, precision: str) -> int:
    """What the loss keeps for backward (``model.loss.LinearCrossEntropy``): the rows with a
    target, padded to ``LOSS_ROW_BUCKET``, and the gradient of their logits, in the compute
    dtype; every position is counted as a target (a causal LM's case; masked LM has fewer)."""
    from cpmlive.model.loss import LOSS_ROW_BUCKET

    rows = -(-batch * seq // LOSS_ROW_BUCKET) * LOSS_ROW_BUCKET
    return rows * (config.dim_model + config.vocab_size) * DTYPE_BYTES[precision]


def reads_tasks(config: Any) -> bool:
    """A family that trains on JSON tasks (CPM-Bee: its own inputs, a head over the answers)."""
    from cpmlive.model.registry import family

    return family(config.model_type).can("bee")


def _training_inputs(model: Any, batch: int, seq: int) -> Any:
    """A callable running one training forward of ``model`` on zeros (and returning a loss)."""
    from cpmlive.data.objectives import Batch
    from cpmlive.model.loss import masked_lm_loss

    zeros = {name: torch.zeros(batch, seq, dtype=dtype) for name, dtype in
             (("long", torch.long), ("int", torch.int32), ("bool", torch.bool))}
    valid = torch.ones(batch, seq, dtype=torch.bool)
    if reads_tasks(model.config):
        def bee() -> torch.Tensor:
            hidden = model(zeros["long"], zeros["int"], zeros["bool"], zeros["int"],
                           torch.zeros(batch, 1, dtype=torch.int32), zeros["int"], valid)
            return hidden.float().square().mean()  # the head saves the final hidden states, as this does
        return bee
    row = Batch(input_ids=zeros["long"], segment=zeros["int"], context=zeros["bool"], span=zeros["int"],
                valid=valid, target=zeros["long"], task=zeros["long"], position=zeros["int"],
                length=torch.full((batch,), seq))
    return lambda: masked_lm_loss(model, row)[0]


def measure_activations(config: Any, batch: int, seq: int, checkpointing: bool, precision: str = "fp32") -> int:
    """The bytes a training forward of ``config`` (small!) saves for backward: every saved
    tensor's storage once, parameters excluded."""
    from cpmlive.model.checkpoint import model_class

    with torch.device("meta"):  # no initialisation: the values do not change what is saved
        model = model_class(config)(config)
    model = model.to_empty(device="cpu")
    model.gradient_checkpointing = checkpointing
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    forward = _training_inputs(model, batch, seq)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = forward()
    del loss
    return sum(seen.values())


def _proxy(config: Any, h: int, f: int, a: int, d: int, k: int, layers: int) -> Any:
    changes = dict(dim_model=h, dim_ff=f, num_heads=a, dim_head=d, num_layers=layers, quantization=None,
                   vocab_size=min(config.vocab_size, 512))
    if hasattr(config, "num_kv_heads"):
        changes["num_kv_heads"] = k
    if getattr(config, "mask_modules", None) is not None:
        changes["mask_modules"] = [[False, False]] * layers
    changes["moe"] = None
    names = {f.name for f in dataclasses.fields(config) if f.init}
    return dataclasses.replace(config, **{key: value for key, value in changes.items() if key in names})


@dataclass(frozen=True)
class ActivationLaw:
    """Bytes per block and for the rest of the model, as coefficients of :func:`_features`."""

    block: tuple[float, ...]
    rest: tuple[float, ...]
    stored_block: tuple[float, ...]  # with activation checkpointing
    stored_rest: tuple[float, ...]
    residual: float  # the largest relative misfit on the measurements it was solved from

    def bytes(self, config: Any, batch: int, seq: int, checkpointing: bool, tp: int = 1,
              precision: str = "fp32", recompute: bool = True) -> int:
        """Activation bytes of one micro-batch. With checkpointing: every block's stored input,
        plus (``recompute``) one block's full activations while it is recomputed in backward."""
        feats = _features(config, batch, seq, tp)

        def apply(form: tuple[float, ...]) -> float:
            return sum(c * x for c, x in zip(form, feats))

        block_form, rest_form = (self.stored_block, self.stored_rest) if checkpointing else (self.block, self.rest)
        total = config.num_layers * apply(block_form) + apply(rest_form)
        if checkpointing and recompute:
            total += apply(self.block)
        if not reads_tasks(config):
            total += loss_bytes(config, batch, seq, precision)
        return int(round(total))


def _solve(rows: list[list[float]], values: list[float]) -> tuple[tuple[float, ...], float]:
    matrix = torch.tensor(rows, dtype=torch.float64)
    target = torch.tensor(values, dtype=torch.float64)
    scale = matrix.abs().amax(dim=0).clamp_min(1.0)
    solution = torch.linalg.lstsq(matrix / scale, target[:, None], driver="gelsd").solution[:, 0] / scale
    misfit = ((matrix @ solution - target).abs() / target.abs().clamp_min(1.0)).max().item()
    return tuple(solution.tolist()), misfit


@functools.lru_cache(maxsize=None)
def _law(config_json: str, model_type: str, precision: str) -> ActivationLaw:
    from cpmlive.model.registry import family

    config = family(model_type).config.from_dict(json.loads(config_json))
    # (heads, key/value heads) as the model has them: grouped (fewer key/value heads, which the
    # attention repeats) or not; grouped needs three pairs off one line to tell the two apart
    grouped = kv_heads(config) < config.num_heads
    heads = ((4, 2), (8, 4), (8, 2)) if grouped else ((2, 2), (4, 4))
    shapes = list(itertools.product((32, 48), (40, 72), heads, (8, 16), (1, 2), (40, 56, 72)))
    forms, worst = {}, 0.0
    for checkpointing in (False, True):
        per_block: list[float] = []
        rest: list[float] = []
        rows: list[list[float]] = []
        for h, f, (a, k), d, b, s in shapes:
            small = _proxy(config, h, f, a, d, k, 1)
            one = measure_activations(small, b, s, checkpointing, precision)
            two = measure_activations(_proxy(config, h, f, a, d, k, 2), b, s, checkpointing, precision)
            if not reads_tasks(config):
                one -= loss_bytes(small, b, s, precision)
                two -= loss_bytes(small, b, s, precision)
            per_block.append(two - one)
            rest.append(2 * one - two)
            rows.append(_features(small, b, s))
        (block, misfit_block), (others, misfit_rest) = _solve(rows, per_block), _solve(rows, rest)
        forms[checkpointing] = (block, others)
        worst = max(worst, misfit_block, misfit_rest)
    return ActivationLaw(block=forms[False][0], rest=forms[False][1], stored_block=forms[True][0],
                         stored_rest=forms[True][1], residual=worst)


def activation_law(config: Any, precision: str = "fp32") -> ActivationLaw:
    """The measured activation law of ``config``'s family (cached per family and precision)."""
    return _law(json.dumps(config.to_dict(), sort_keys=True), config.model_type, precision)


# ---- layouts -----------------------------------------------------------------------------------


@dataclass
class PlanRequest:
    gpus: int = 1
    gpu_memory: int = 80 * GiB
    tp: int | None = None  # None: every tensor-parallel size that divides the heads and the GPUs
    seq: int = 2048
    batch: int = 1
    offload: bool = False
    adapter: str | None = None  # "lora"
    lora_rank: int = 8
    precision: str = "bf16"  # compute (autocast and FSDP's gathered weights); masters stay float32
    serving_dtype: str = "bf16"

    def check(self, config: Any) -> None:
        if self.gpus < 1 or self.batch < 1 or self.seq < 1:
            raise CpmliveError("--gpus, --batch and --seq must be at least 1")
        if self.tp is not None and (self.tp < 1 or self.gpus % self.tp):
            raise CpmliveError(f"--tp {self.tp} does not divide --gpus {self.gpus}")  # the model's rules: tp_sizes
        if self.adapter not in (None, "lora"):
            raise CpmliveError(f"--adapter {self.adapter!r}: only lora is planned")
        if self.adapter is not None and (self.offload or (self.tp or 1) > 1):
            raise CpmliveError("--adapter plans fine-tuning, which runs as replicas (the whole model on each "
                               "device): --offload and --tp apply to pretraining's FSDP2")
        if self.precision not in ("fp32", "bf16"):
            raise CpmliveError(f"precision {self.precision!r}: fp32 or bf16")
        if self.seq > config.max_length:
            raise CpmliveError(f"--seq {self.seq} is longer than the model's {config.max_length} positions")


@dataclass
class Layout:
    tp: int
    dp: int
    per_device: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0  # per device, in host memory (--offload)
    fits: dict[str, bool] = field(default_factory=dict)


def tp_refusal(config: Any, tp: int) -> str | None:
    """Why pretraining would refuse to split ``config`` over ``tp`` ranks (its own rules, on the
    model built on the meta device), or None."""
    if tp == 1:
        return None
    from cpmlive.model.checkpoint import model_class
    from cpmlive.train.distributed import check_tensor_parallel

    with torch.device("meta"):
        model = model_class(config)(dataclasses.replace(config, quantization=None))
    try:
        check_tensor_parallel(model, tp)
    except CpmliveError as exc:
        return str(exc)
    return None


def tp_sizes(config: Any, request: PlanRequest) -> list[int]:
    """The tensor-parallel sizes to show: the one asked for, or every one the recipes take
    (dividing the GPUs, the heads and the FFN; fine-tuning with an adapter runs as replicas: 1)."""
    if request.tp is not None:
        refusal = tp_refusal(config, request.tp)
        if refusal is not None:
            raise CpmliveError(refusal.replace("tp_size", "--tp"))
        return [request.tp]
    if request.adapter is not None:
        return [1]
    return [t for t in range(1, request.gpus + 1) if request.gpus % t == 0 and tp_refusal(config, t) is None]


def layout(config: Any, request: PlanRequest, tp: int) -> Layout:
    """One layout's bytes per device. Pretraining (FSDP2, over ``tp`` x ``dp``): the blocks'
    float32 masters, gradients and AdamW moments are split over all N devices, the rest of the
    model (embeddings, position bias, norms: whole on every tensor-parallel rank) over ``dp``
    only; two blocks are gathered at a time in the compute dtype and the root stays gathered.
    Fine-tuning with an adapter (replicas): the whole float32 model on every device, the
    adapter's gradients and moments beside it."""
    n, compute = request.gpus, DTYPE_BYTES[request.precision]
    dp = n // tp
    params, block = parameter_count(config), block_parameters(config) / tp
    in_blocks = sum(math.prod(shape) for name, shape in tensor_shapes(config).items() if name.startswith("layers."))
    rest = params - in_blocks
    if request.adapter == "lora":
        trainable = lora_parameters(config, request.lora_rank)
        shard_params, gathered = (params + trainable) * 4, 0.0
        shard_grads, shard_optimizer, block_grads = trainable * 4, trainable * 8, 0.0
    else:
        split = in_blocks / n + rest / dp  # elements of the model this device holds a shard of
        shard_params, shard_grads, shard_optimizer = split * 4, split * 4, split * 8
        gathered = 2 * block * compute + rest * compute  # two blocks in flight, the root kept after forward
        block_grads = block * 4
    law = activation_law(config, request.precision)
    activations = law.bytes(config, request.batch, request.seq, False, tp, request.precision)
    checkpointed = law.bytes(config, request.batch, request.seq, True, tp, request.precision)
    serving_weights = params * DTYPE_BYTES[request.serving_dtype] / tp
    kv = kv_cache_bytes(config, request.batch, request.seq, DTYPE_BYTES[request.serving_dtype], tp)
    host = 0
    if request.offload:
        host = int(shard_params + shard_grads + shard_optimizer)
        shard_params = shard_grads = shard_optimizer = 0
    per_device = {"parameters_bytes": int(shard_params + gathered), "gradients_bytes": int(shard_grads + block_grads),
                  "optimizer_bytes": int(shard_optimizer), "activations_bytes": activations,
                  "activations_checkpointed_bytes": checkpointed}
    state = per_device["parameters_bytes"] + per_device["gradients_bytes"] + per_device["optimizer_bytes"]
    per_device["total_bytes"] = state + activations
    per_device["total_checkpointed_bytes"] = state + checkpointed
    per_device["serving_weights_bytes"] = int(serving_weights)
    per_device["kv_cache_bytes"] = kv
    per_device["serving_total_bytes"] = int(serving_weights) + kv
    limit = request.gpu_memory
    fits = {"train": per_device["total_bytes"] <= limit,
            "train_checkpointed": per_device["total_checkpointed_bytes"] <= limit,
            "serve": per_device["serving_total_bytes"] <= limit}
    return Layout(tp=tp, dp=dp, per_device=per_device, host_bytes=host, fits=fits)


def plan(config: Any, request: PlanRequest) -> list[Layout]:
    request.check(config)
    smallest = block_parameters(config) * DTYPE_BYTES[request.precision] / max(tp_sizes(config, request))
    if request.gpu_memory < smallest:
        raise CpmliveError(f"a device of {request.gpu_memory / GiB:.2f} GiB is smaller than one block of this model "
                           f"({smallest / GiB:.2f} GiB at {request.precision}): nothing can run on it")
    return [layout(config, request, tp) for tp in tp_sizes(config, request)]


def as_json(config: Any, request: PlanRequest, layouts: list[Layout]) -> dict[str, Any]:
    return {"model_type": config.model_type, "parameters": parameter_count(config),
            "request": {**dataclasses.asdict(request)},
            "activation_law_misfit": activation_law(config, request.precision).residual,
            "layouts": [{"tp": lay.tp, "dp": lay.dp, "per_device": lay.per_device, "host_bytes_per_device":
                         lay.host_bytes, "fits": lay.fits} for lay in layouts]}


def table(config: Any, request: PlanRequest, layouts: list[Layout]) -> str:
    def gib(value: int) -> str:
        return f"{value / GiB:.1f}"

    lines = [f"{parameter_count(config) / 1e9:.2f}B parameters; {request.gpus} x {request.gpu_memory / GiB:.0f} GiB; "
             f"micro-batch {request.batch} x {request.seq} tokens; {request.precision} compute, fp32 masters"
             + ("; shards offloaded to host memory" if request.offload else "")
             + (f"; LoRA rank {request.lora_rank} over a float32 replica on each device" if request.adapter else ""),
             "", "GiB per device | params | grads | optimizer | activations | act. (ckpt) | train | train (ckpt) "
             "| serve: weights + KV | fits",
             "---|---|---|---|---|---|---|---|---|---"]
    for lay in layouts:
        d = lay.per_device
        fits = [name for name, ok in (("train", lay.fits["train"]), ("train with checkpointing",
                                      lay.fits["train_checkpointed"]), ("serve", lay.fits["serve"])) if ok]
        lines.append(f"tp={lay.tp} dp={lay.dp} | {gib(d['parameters_bytes'])} | {gib(d['gradients_bytes'])} | "
                     f"{gib(d['optimizer_bytes'])} | {gib(d['activations_bytes'])} | "
                     f"{gib(d['activations_checkpointed_bytes'])} | {gib(d['total_bytes'])} | "
                     f"{gib(d['total_checkpointed_bytes'])} | {gib(d['serving_weights_bytes'])} + "
                     f"{gib(d['kv_cache_bytes'])} | {', '.join(fits) or 'nothing'}")
    if request.offload:
        lines.append(f"host memory per device for the offloaded shards: {gib(layouts[0].host_bytes)} GiB")
    misfit = activation_law(config, request.precision).residual
    fit = ("exact on every measurement" if misfit < 1e-6 else
           f"within {misfit:.0%} (the implementation switches paths with the shape)")
    lines.append("activations: our blocks' saved tensors, measured on small models of the family and solved for "
                 f"(dims x batch x seq^2); {fit}")
    return "\n".join(lines)


__all__ = ["ActivationLaw", "Layout", "PlanRequest", "activation_law", "as_json", "block_parameters",
           "kv_cache_bytes", "lora_parameters", "measure_activations", "parameter_count", "parse_bytes", "plan",
           "table"]
