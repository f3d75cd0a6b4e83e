"""Pretraining in several processes: FSDP2 (``fully_shard``) over every Block and the root.

``torchrun --nproc-per-node N -m cpmlive pretrain ...`` sets ``WORLD_SIZE``;
:func:`cpmlive.train.launch.pretrain` then runs :class:`DistributedTrainer`, the single-process
:class:`~cpmlive.train.pretrain.Trainer` with these differences:

* **process group**: gloo on CPU; on CUDA ``cpu:gloo,cuda:nccl`` (nccl for the model, gloo
  for the CPU tensors of offloaded state dicts), device ``cuda:LOCAL_RANK``. Every rank seeds
  the same way, so every rank builds the same model before it is sharded.
* **data**: every rank draws the same global batch from its own copy of the stream and keeps
  rows ``rank::world``. The stream position is therefore the same on every rank, the global
  batch per step equals the single-process one, and a checkpoint does not depend on the
  number of ranks.
* **loss**: the token mean over the global batch. Each rank all-reduces its (loss sum,
  target count) before ``backward`` and back-propagates ``local_sum * world / global_count``;
  FSDP's gradient reduction averages over the ranks, which leaves exactly the gradient of
  the global mean. The logged figures (loss, per-objective losses, tokens) are global.
* **checkpoints**: sharded (:mod:`cpmlive.train.sharded`): every rank writes its own shards
  of the model and the optimizer with torch.distributed.checkpoint into one build directory,
  which rank 0 completes (trainer state, config) and renames into place; nothing is gathered,
  so no rank holds more than its shards. ``--resume`` loads a sharded checkpoint into any
  number of ranks (or one process), resharding; a single-process checkpoint is read whole by
  rank 0 and sharded onto the ranks (``broadcast_from_rank0``). ``cpmlive convert RUN/step-N
  OUT`` consolidates a sharded checkpoint into a model directory.
* **reporting**: metrics, progress and files on rank 0 only; throughput counts every rank's
  tokens; cost and CO2e count ``world_size`` devices.

Options (recipe keys, ignored by a single process):

* ``fsdp_mixed_precision``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``:
  parameters are gathered and used in bf16, gradients reduced in fp32, and the optimizer
  updates fp32 shards (checkpoints stay fp32). Works with gloo on CPU too (torch 2.13).
  ``precision: bf16`` (autocast) can be combined with it.
* ``fsdp_cpu_offload``: ``CPUOffloadPolicy``: sharded parameters, gradients and optimizer
  state live in host memory (pinned on CUDA) and the optimizer step runs on the CPU. On a
  CPU-only machine everything is in host memory already; the option runs, to no effect.

Every rank has the same torch RNG state (one seed; a checkpoint holds rank 0's), so with
``dropout_p > 0`` the ranks draw the same dropout masks for their different rows, and the
CUDA RNG is not checkpointed: the dropout stream of a resumed run differs (dropout is 0 in the
presets, where resuming is exact).
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from cpmlive.data.objectives import IGNORE_INDEX, TASK_NAMES, Batch
from cpmlive.errors import CpmliveError
from cpmlive.model.loss import masked_lm_loss
from cpmlive.model.checkpoint import new_build_directory
from cpmlive.train.checkpoints import TRAINER_STATE, checkpoint_dir, publish, resume_point, warn, write_into
from cpmlive.train.core import autocast, keeping_fused_choice, resolve_device, set_rng_state
from cpmlive.train.pretrain import PretrainConfig, RunState, Trainer, trainer_header
from cpmlive.train.sharded import SHARDED, load_sharded, save_sharded, write_sharded_config


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among ``world_size`` and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CpmliveError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def is_distributed_launch() -> bool:
    """True when torchrun started this process (even as its only rank: that is how one GPU
    trains), or another launcher started it as one of several."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size_from_env() > 1


def init_distributed(timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment."""
    world = world_size_from_env()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise CpmliveError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


def device_mesh(env: DistEnv, tp_size: int = 1):
    """The ranks as a ``(dp, tp)`` DeviceMesh (rank ``r`` is data-parallel rank ``r // tp`` and
    tensor-parallel rank ``r % tp``: a tensor-parallel group is consecutive ranks, one node's
    GPUs when ``tp`` is at most the GPUs per node); 1-D (``dp`` only) without tensor parallelism."""
    from torch.distributed.device_mesh import init_device_mesh

    if env.world_size % tp_size:
        raise CpmliveError(f"tp_size {tp_size} does not divide the {env.world_size} ranks")
    if tp_size == 1:
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp",))
    return init_device_mesh(env.device.type, (env.world_size // tp_size, tp_size), mesh_dim_names=("dp", "tp"))


def check_tensor_parallel(model: nn.Module, tp_size: int) -> None:
    """Refuse, in one line, a model tensor parallelism cannot split as :func:`tensor_parallel` does."""
    from cpmlive.model.stack import Attention, FeedForward

    config = model.config
    kv = getattr(config, "num_kv_heads", config.num_heads)
    if config.num_heads % tp_size or kv % tp_size:
        raise CpmliveError(f"tp_size {tp_size} does not divide the model's {config.num_heads} heads "
                           f"({kv} key/value heads)")
    if config.dim_ff % tp_size:
        raise CpmliveError(f"tp_size {tp_size} does not divide the model's dim_ff {config.dim_ff}")
    for index, block in enumerate(model.layers):
        attn, ffn = getattr(block, "attn", None), getattr(block, "ffn", None)
        splittable_attn = attn is None or (isinstance(attn, Attention) or type(attn).__name__ == "DecoderAttention")
        if not splittable_attn or (attn is not None and getattr(attn, "bias_q", None) is not None):
            raise CpmliveError(f"tensor parallelism splits bias-free q/k/v/out projections (CPM-Ant, CPM-Bee, "
                               f"Llama-style decoders); block {index}'s {type(attn).__name__} is not one")
        if ffn is not None and not isinstance(ffn, FeedForward):
            raise CpmliveError(f"tensor parallelism splits the gated FFN; block {index}'s {type(ffn).__name__} "
                               "(experts or GPT-2's MLP) is not split")


class _HeadSlice(torch.autograd.Function):
    """A rank's heads of the whole position bias; backward sums the bias's gradient over the
    tensor-parallel ranks (each saw its heads only), so every rank's copy of the position-bias
    table gets the gradient one process would (Megatron's "copy to the tensor-parallel region")."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, heads: slice, group) -> torch.Tensor:
        ctx.heads, ctx.group, ctx.shape = heads, group, bias.shape
        return bias[:, heads]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_zeros(ctx.shape)
        full[:, ctx.heads] = grad
        dist.all_reduce(full, group=ctx.group)
        return full, None, None


def tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron's split of every block over the ``tp`` ranks (``parallelize_module``): q, k, v and
    the FFN's two input projections column-wise (each rank computes its heads and its share of
    the FFN's width), the attention and FFN outputs row-wise (partial sums all-reduced before the
    residual). Embeddings, norms and the position bias stay whole on every rank; each rank's
    attention reads its heads' slice of the bias."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_tensor_parallel(model, tp_mesh.size())
    rank, size = tp_mesh.get_local_rank(), tp_mesh.size()
    local_heads = model.config.num_heads // size
    heads = slice(rank * local_heads, (rank + 1) * local_heads)
    group = tp_mesh.get_group()
    for block in model.layers:
        plan = {}
        if hasattr(block, "attn"):
            plan.update({f"attn.{name}": ColwiseParallel() for name in ("project_q", "project_k", "project_v")})
            plan["attn.attention_out"] = RowwiseParallel()
            block.attn.tp_bias = lambda bias: _HeadSlice.apply(bias, heads, group)
        if hasattr(block, "ffn"):
            plan.update({"ffn.w_0": ColwiseParallel(), "ffn.w_1": ColwiseParallel(), "ffn.w_out": RowwiseParallel()})
        parallelize_module(block, tp_mesh, plan)


def shard_model(model: nn.Module, env: DistEnv, cpu_offload: bool = False,
                mixed_precision: bool = False, mesh=None) -> nn.Module:
    """Tensor parallelism over the mesh's ``tp`` dimension, if it has one, then ``fully_shard``
    every transformer Block and the root (embeddings, position bias, output norm) over its
    ``dp`` dimension. The model is changed in place (FSDP2 swaps its class) and returned."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = device_mesh(env) if mesh is None else mesh
    if env.device.type != "cpu" and not cpu_offload:
        model.to(env.device)
    if "tp" in (mesh.mesh_dim_names or ()):
        tensor_parallel(model, mesh["tp"])
    kwargs: dict[str, Any] = {"mesh": mesh["dp"]}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Pinned host memory needs CUDA; on a CPU-only machine the "offload" keeps plain memory.
    kwargs["offload_policy"] = (CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if cpu_offload
                                else OffloadPolicy())
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def rows_of_rank(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rows ``rank::world_size`` of a global batch."""
    return Batch(**{f.name: getattr(batch, f.name)[rank::world_size] for f in fields(Batch)})


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _state_options(**extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in ``Optimizer.state_dict`` index order."""
    names = {id(param): name for name, param in model.named_parameters()}
    try:
        return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    except KeyError:
        raise CpmliveError("the optimizer holds a parameter the model does not name") from None


def optimizer_state_to_names(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An index-keyed optimizer state (``Optimizer.state_dict()``, what single-process
    checkpoints hold) keyed by parameter name, as ``set_optimizer_state_dict`` takes it."""
    count = sum(len(group["params"]) for group in state["param_groups"])
    if count != len(names):
        raise CpmliveError(f"the checkpoint's optimizer holds {count} parameters, this model {len(names)}")
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}


def _broadcast(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_on_main(action: Callable[[], Any], is_main: bool, world: int) -> Any:
    """Rank 0 runs ``action``; every rank returns its result, or raises: its CpmliveError as one
    line on every rank, any other failure as itself on rank 0 and as one line on the others (they
    must not wait forever on a broadcast rank 0 never reaches)."""
    result, error, failure = None, None, None
    if is_main:
        try:
            result = action()
        except CpmliveError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001  (re-raised below, after the others are told)
            failure, error = exc, f"rank 0 failed: {type(exc).__name__}: {_first_line(exc)}"
    if world > 1:
        result, error = _broadcast((result, error))
    if failure is not None:
        raise failure
    if error is not None:
        raise CpmliveError(error)
    return result


class DistributedTrainer(Trainer):
    """:class:`Trainer` on one rank of a torchrun job; see the module notes."""

    def __init__(self, config: PretrainConfig, resume: str | None = None, env: DistEnv | None = None) -> None:
        self.env = env if env is not None else init_distributed()
        self.rank, self.world_size, self.device = self.env.rank, self.env.world_size, self.env.device
        self.is_main = self.env.is_main
        tp = config.tp_size
        if self.world_size % tp:
            raise CpmliveError(f"tp_size {tp} does not divide the {self.world_size} ranks")
        # data parallelism is over the tp groups: the ranks of one group see the same rows
        self.dp_size, self.dp_rank = self.world_size // tp, self.rank // tp
        if config.batch_size % self.dp_size:
            raise CpmliveError(f"batch_size {config.batch_size} is not a multiple of the {self.dp_size} "
                               "data-parallel ranks: every rank needs the same number of rows")
        self.mesh = device_mesh(self.env, tp)
        self.dp_group = self.mesh["dp"].get_group() if tp > 1 else None
        self._pending: tuple[Any, Path, Path, dict[str, Any]] | None = None
        self._checkpoint_group = None
        super().__init__(config, resume)

    # ---- hooks of Trainer -------------------------------------------------------------------

    def training_device(self) -> torch.device:
        return self.env.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return shard_model(model, self.env, cpu_offload=self.config.fsdp_cpu_offload,
                           mixed_precision=self.config.fsdp_mixed_precision, mesh=self.mesh)

    def on_main(self, check: Callable[[], None]) -> None:
        """Rank 0 checks the run directory (only it needs to see it); every rank raises its error."""
        run_on_main(check, self.is_main, self.world_size)

    def stop_agreed(self, requested: bool) -> bool:
        """Every rank stops after the same step when any of them was signalled (they would
        otherwise wait on each other's collectives)."""
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, float], int]:
        config = self.config
        local = rows_of_rank(batch, self.dp_rank, self.dp_size).to(self.device)
        with autocast(config.precision, self.device):
            loss, per_task = masked_lm_loss(self.model, local)
        selected = local.target != IGNORE_INDEX
        count = selected.sum()
        tasks = local.task[selected]
        figures = [loss.detach().double() * count, count.double()]
        for task, name in TASK_NAMES.items():
            n = (tasks == task).sum()
            figures += [torch.where(n > 0, per_task[name].double() * n, 0.0), n.double()]
        figures.append(local.valid.sum().double())
        totals = torch.stack(figures)
        dist.all_reduce(totals, group=self.dp_group)
        total_count = totals[1].item()
        # FSDP averages gradients over the data-parallel ranks: scale by dp / global count so the
        # result is the gradient of the token mean over the whole global batch.
        scale = count.item() * self.dp_size / total_count / config.grad_accum
        (loss * scale).backward()
        values = totals.tolist()
        per_task_mean = {name: values[2 + 2 * i] / values[3 + 2 * i] if values[3 + 2 * i] else math.nan
                         for i, name in enumerate(TASK_NAMES.values())}
        return values[0] / total_count, per_task_mean, int(values[-1])

    def clip_gradients(self) -> float:
        """The global gradient norm and the clip, over gradients that may live on two meshes
        (tensor-parallel ones on ``(dp, tp)``, the rest on ``dp``): one norm per mesh, reduced
        there, then combined."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.model.parameters() if p.grad is not None]
        groups: dict[Any, list[torch.Tensor]] = {}
        for param in params:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(mesh, []).append(param.grad)
        norms = [_full(torch.nn.utils.get_total_norm(grads, 2.0)).float() for grads in groups.values()]
        total = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
        coef = self.config.grad_clip / (total + 1e-6)
        if coef < 1.0:
            for param in params:
                param.grad.mul_(coef)
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        model, config = self.model, self.config
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for batch in self.val_batches:
            local = rows_of_rank(batch, self.dp_rank, self.dp_size).to(self.device)
            with autocast(config.precision, self.device):
                loss, _ = masked_lm_loss(model, local)
            n = int((local.target != IGNORE_INDEX).sum())
            if n:
                totals += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        dist.all_reduce(totals, group=self.dp_group)
        model.train(was_training)
        model.reshard()  # the root keeps its gathered parameters after a forward; free them
        return totals[0].item() / max(totals[1].item(), 1)

    @torch.no_grad()
    def parameter_stats(self) -> dict[str, list[float]]:
        """The single-process figures, from each parameter gathered whole (one at a time)."""
        stats = {}
        for name, param in self.model.named_parameters():
            data = _full(param.detach()).float()
            if self.is_main:
                std = data.std().item() if data.numel() > 1 else 0.0
                stats[name] = [round(data.mean().item(), 6), round(std, 6), round(data.abs().max().item(), 6)]
        return stats

    def save(self) -> Path | None:
        """Every rank writes its own shards (DCP) into one build directory; rank 0 then adds the
        trainer state and the model's config and renames it into place: nothing is gathered.

        With ``async_checkpoint`` the shards are staged in host memory and written by a
        background thread over a separate gloo group while training goes on; the checkpoint is
        completed (renamed, ``latest`` moved) at the next save or when the run ends, so until
        then ``latest`` still names the previous one."""
        self.finish_pending_save()
        target = checkpoint_dir(self.run_dir, self.state.step)

        def make() -> Path:
            try:
                return new_build_directory(target)
            except OSError as exc:
                raise CpmliveError(f"could not write checkpoint {target} ({exc.strerror or exc})") from None

        build = run_on_main(make, self.is_main, self.world_size)
        self.model.reshard()
        header = {**trainer_header(self.stream, self.state, self.config), "world_size": self.world_size}
        if self.config.async_checkpoint:
            if self._checkpoint_group is None:
                self._checkpoint_group = dist.new_group(backend="gloo")
            future = save_sharded(build / SHARDED, self.model, self.optimizer, group=self._checkpoint_group)
            self._pending = (future, build, target, header)
            return target
        error = None
        try:
            save_sharded(build / SHARDED, self.model, self.optimizer)
        except Exception as exc:  # noqa: BLE001  (DCP raises CheckpointException on every rank)
            error = _save_error(target, exc)
        self._complete(build, target, header, error)
        return target

    def finish_pending_save(self) -> None:
        """Wait for an asynchronous save and complete its checkpoint (every rank)."""
        if self._pending is None:
            return
        future, build, target, header = self._pending
        self._pending = None
        error = None
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001
            error = _save_error(target, exc)
        self._complete(build, target, header, error)

    def _complete(self, build: Path, target: Path, header: dict[str, Any], error: str | None) -> None:
        errors = [None] * self.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)

        def finish() -> None:
            if error is not None:
                shutil.rmtree(build, ignore_errors=True)
                raise CpmliveError(error)
            try:
                write_into(build, target, lambda directory: self._write_header(directory, header))
                publish(self.run_dir, target, self.config.keep_checkpoints)
            except BaseException:
                shutil.rmtree(build, ignore_errors=True)
                raise

        run_on_main(finish, self.is_main, self.world_size)  # also the barrier: nobody runs ahead of a checkpoint

    def _write_header(self, build: Path, header: dict[str, Any]) -> None:
        write_sharded_config(build / SHARDED, self.model.config, self.vocab_path)
        torch.save(header, build / TRAINER_STATE)

    def run(self) -> RunState:
        try:
            state = super().run()
        except KeyboardInterrupt:  # every rank stops at the same step: the checkpoint it started completes
            self.finish_pending_save()
            raise
        self.finish_pending_save()
        return state

    def _resume(self, resume: str) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        whole: dict[str, Any] = {"model": {}, "optimizer": {}}  # a single-process checkpoint, on rank 0

        def read() -> dict[str, Any] | None:
            point = resume_point(self.run_dir, resume, self.read_checkpoint)
            if point is None:
                return None
            path, (model_state, trainer) = point
            if model_state is not None:
                whole["model"] = model_state
                whole["optimizer"] = optimizer_state_to_names(trainer["optimizer"],
                                                              parameter_names(self.model, self.optimizer))
            return {"path": path, "sharded": model_state is None,
                    "header": {key: trainer[key] for key in ("stream", "state", "rng")}}

        found = run_on_main(read, self.is_main, self.world_size)
        if found is None:
            return
        if found["sharded"]:  # every rank reads its own shards, resharded to this run's layout
            load_sharded(found["path"], self.model, self.optimizer)
        else:  # a single-process checkpoint: rank 0 read it whole, every rank gets its shards
            set_model_state_dict(self.model, whole["model"], options=_state_options(broadcast_from_rank0=True))
            with keeping_fused_choice(self.optimizer):
                set_optimizer_state_dict(self.model, self.optimizer, whole["optimizer"],
                                         options=_state_options(broadcast_from_rank0=True))
        whole.clear()
        header = found["header"]
        self.stream.load_state_dict(header["stream"])
        self.state = RunState(**header["state"])
        set_rng_state(header["rng"])


class Replicas:
    """Data parallelism for the recipes that train adapters, heads or a model one process holds
    (``finetune``, ``align``): every rank keeps the whole model, as HF accelerate's DDP does
    with PEFT, and averages the trainable gradients after each backward (one flat all-reduce).

    Each step every rank draws the same global batch and keeps rows ``rank::world``; a rank's
    loss is weighted by its share of what the recipe's loss is a mean over (target tokens,
    pairs, samples): ``local mean * local weight * world / global weight``, so the averaged
    gradient is the single-process one. Only rank 0 writes files (checkpoints, adapters, logs)
    and evaluates; the others take its results. One process is the same object with a world of 1.
    """

    def __init__(self, env: DistEnv | None = None) -> None:
        self.env = env
        self.rank = env.rank if env is not None else 0
        self.world = env.world_size if env is not None else 1
        self.is_main = self.rank == 0

    @classmethod
    def join(cls) -> "Replicas":
        """This process's place: a torchrun job's rank, or one process alone."""
        return cls(init_distributed()) if is_distributed_launch() else cls()

    def device_for(self, name: str) -> torch.device:
        """The device a recipe's ``device`` key gives this process: its own alone; in a job the
        rank's (``cuda:LOCAL_RANK`` on GPUs), with a warning when the key asked for another kind."""
        wanted = resolve_device(name)  # refuses a bad or missing device either way
        if self.env is None:
            return wanted
        if name != "auto" and wanted.type != self.env.device.type and self.is_main:
            warn(f"device={name} is ignored under torchrun: each rank runs on {self.env.device.type}")
        return self.env.device

    def rows(self, items: list) -> list:
        return items[self.rank::self.world]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise CpmliveError(f"batch_size {batch_size} is not a multiple of the {self.world} ranks: "
                               "every rank needs the same number of rows")

    def _sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def total(self, count: int) -> int:
        """A count summed over the ranks (tokens read)."""
        return int(self._sum([float(count)])[0])

    def share(self, weight: float) -> tuple[float, float]:
        """(the factor this rank's mean loss is scaled by, the global weight)."""
        (total,) = self._sum([float(weight)])
        return (weight * self.world / total if total else 0.0), total

    def weighted_mean(self, value: float, weight: float) -> float:
        """The global mean of a per-rank mean over ``weight`` items."""
        total, count = self._sum([value * weight, float(weight)])
        return total / count if count else value

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank figures averaged over the ranks (logging)."""
        names = sorted(values)
        return dict(zip(names, [v / self.world for v in self._sum([float(values[n]) for n in names])]))

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Every trainable gradient averaged over the ranks. One a rank did not produce counts as
        zeros there; one no rank produced stays None, so the optimizer skips the parameter as one
        process would (AdamW would otherwise move it by its momentum)."""
        if self.world == 1 or not params:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        params = [p for p, anywhere in zip(params, present.tolist()) if anywhere]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for param, averaged in zip(params, _unflatten_dense_tensors(flat, grads)):
            if param.grad is None:
                param.grad = averaged
            else:
                param.grad.copy_(averaged)

    def on_main(self, action: Callable[[], Any]) -> Any:
        """Rank 0 runs ``action``; every rank returns its result or raises (:func:`run_on_main`)."""
        return run_on_main(action, self.is_main, self.world)

    def stop_agreed(self, requested: bool) -> bool:
        if self.world == 1:
            return requested
        return bool(self._sum([1.0 if requested else 0.0])[0])

    def shard_frozen(self, model: nn.Module) -> nn.Module:
        """A frozen model the recipe only reads (a full-tuning reference or reward model) sharded
        with FSDP2 over the ranks: each holds 1/N of it and gathers one block at a time. Every
        rank must then call it equally often (a collective per block), so whatever reads it runs
        on every rank (training steps and evaluation alike)."""
        if self.world == 1:
            return model
        from torch.distributed.fsdp import fully_shard

        mesh = device_mesh(self.env)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def close(self, finished: bool = True) -> None:
        """Leave the process group: after a barrier when the run finished (a failed rank must not
        wait for the others at one they never reach)."""
        if self.env is not None and dist.is_initialized():
            if finished:
                dist.barrier()
            gc.collect()  # what still holds the group goes first (see run_distributed)
            dist.destroy_process_group()
            gc.collect()


def _save_error(target: Path, exc: Exception) -> str:
    return f"could not write checkpoint {target} ({_first_line(exc)})"


def run_distributed(config: PretrainConfig, resume: str | None = None) -> RunState:
    """Join the torchrun job, train, leave the process group.

    The trainer (whose FSDP state and device mesh hold the process group) is freed and the
    group destroyed while the interpreter is fully alive: a gloo group torn down during
    interpreter shutdown can abort the process ("terminate called without an active
    exception") after a successful run."""
    owned = not dist.is_initialized()  # a caller's own process group is left to the caller
    env = init_distributed()
    trainer = None
    try:
        trainer = DistributedTrainer(config, resume, env)
        state = trainer.run()
        dist.barrier()
        return state
    finally:
        del trainer
        gc.collect()
        if owned:
            dist.destroy_process_group()
            gc.collect()


__all__ = [
    "DistEnv", "DistributedTrainer", "Replicas", "check_tensor_parallel", "device_mesh", "init_distributed",
    "is_distributed_launch", "optimizer_state_to_names", "parameter_names", "rows_of_rank", "run_distributed",
    "run_on_main", "shard_model", "tensor_parallel",
]
