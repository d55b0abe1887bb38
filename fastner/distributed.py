"""Multi-process training with torch.distributed: `torchrun ... -m fastner train ...`.

torchrun (single node or multi-node: --nnodes, --node_rank, --master_addr/--master_port or the
--rdzv_* flags) starts one process per device and describes the job in environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `setup()` reads them and joins the
process group (nccl for CUDA devices, gloo for CPU). Without them it returns a single-process
context and every helper here is a no-op, so the training loop has one code path.

How the ranks split the work, and why the result equals a single process's:
- every rank draws the same length-bucketed batch order (same seed, same Python RNG) and takes
  a disjoint, strided shard of it (`shard`), padded by wrapping around so that every rank runs
  the same number of steps (a rank that ran out would hang the others in all-reduce);
- the tagger's loss is SUMMED over sentences, so gradients are SUMMED over ranks too (a DDP
  communication hook replaces DDP's default averaging): one step of N ranks with batches
  b_1..b_N is then exactly one single-process step on the union of b_1..b_N, whatever their
  sizes. `--batch-size` is per process; the global batch is N times that.
- dev evaluation, logging and every file write happen on rank 0; the evaluation result is
  broadcast, so early stopping and "best epoch" are decided identically everywhere.
- dropout masks come from a per-(seed, epoch, rank) generator state, so a run is reproducible
  for its seed and a resumed run continues as an uninterrupted one would.
"""
from __future__ import annotations

import datetime
import io
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as torch_dist
from torch import nn

T = TypeVar("T")

BACKEND_ENV = "FASTNER_DIST_BACKEND"  # override the backend choice: 'nccl' or 'gloo'
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """Where this process stands in the job. world_size 1 means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # setup() created the process group (cleanup() destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops in a single process) ------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def broadcast(self, obj: T, src: int = 0) -> T:
        """`obj` as rank `src` holds it (any picklable object)."""
        if not self.enabled:
            return obj
        holder = [obj if self.rank == src else None]
        torch_dist.broadcast_object_list(holder, src=src, device=self._collective_device())
        return holder[0]

    def all_sum(self, values: Sequence[float]) -> List[float]:
        """Elementwise sum of `values` over the ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._collective_device())
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor.tolist()

    def _collective_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo only CPU ones
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ---- training helpers ------------------------------------------------------------------

    def shard(self, batches: Sequence[T]) -> List[T]:
        """This rank's share of the epoch's batches (every rank holds the same `batches`)."""
        return shard(batches, self.rank, self.world_size)

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Seed torch's generators for (seed, epoch, rank): dropout differs between ranks, is
        the same for the same seed, and does not depend on what earlier epochs consumed."""
        if self.enabled:
            torch.manual_seed(_mix(seed, epoch, self.rank))

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for the training loss (see wrap_model)."""
        return wrap_model(model, self)

    def cleanup(self) -> None:
        cleanup(self)


def _mix(*numbers: int) -> int:
    # a fixed (not hash()-randomised) mix of small ints into a 63-bit seed
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (int(number) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class _Discard(io.TextIOBase):
    """A text stream that drops what it is given (the progress display of ranks other than 0)."""

    def write(self, text: str) -> int:
        return len(text)


def discard_stream() -> io.TextIOBase:
    return _Discard()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process (before or without setup())."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r} "
                         "(it is set by torchrun)") from None


def setup(device: Union[str, torch.device, None] = "cpu", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes, or return a single-process context.

    device: the device type to train on ('cpu', 'cuda'); under torchrun a CUDA run uses
    cuda:LOCAL_RANK (one process per GPU), whatever index was asked for.
    """
    from fastner.devices import resolve_device

    resolved = resolve_device(device)
    if not launched_by_torchrun() or _env_int("WORLD_SIZE") == 1:
        return DistContext(device=resolved)
    missing = [key for key in _ENV_KEYS if key not in os.environ]
    if missing:
        raise ValueError(f"distributed run: environment variables {missing} are missing "
                         "(start the job with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, "
                         "MASTER_ADDR and MASTER_PORT)")
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must lie in [0, WORLD_SIZE={world_size}), got {rank}")
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices "
                             "are visible: start at most one process per GPU (--nproc_per_node)")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if resolved.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_ENV} must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and resolved.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; train on --device cuda or use gloo")
    owns_group = not torch_dist.is_initialized()
    if owns_group:
        kwargs = {"device_id": resolved} if backend == "nccl" else {}
        torch_dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                      timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world_size, local_rank, resolved, backend, owns_group)


def cleanup(context: Optional[DistContext] = None) -> None:
    """Wait for every rank (so that none leaves while another still writes or talks), then
    leave the process group if setup() created it; a group someone else created stays."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    if context is not None and not context.enabled:
        return
    torch_dist.barrier()
    if context is None or context.owns_group:
        torch_dist.destroy_process_group()


def shard(batches: Sequence[T], rank: int, world_size: int) -> List[T]:
    """Rank `rank`'s batches: positions rank, rank + N, ... of `batches`, after wrapping around
    to a multiple of N, so every rank gets ceil(len / N) batches and, short of the wrap, the
    shards are disjoint and cover everything (like DistributedSampler, over batches)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    items = list(batches)
    if world_size == 1 or not items:
        return items
    padded_len = -(-len(items) // world_size) * world_size
    items += [items[i % len(items)] for i in range(padded_len - len(items))]
    return items[rank::world_size]


def _allreduce_sum_hook(process_group, bucket):
    # (no annotations: DDP checks them against the classes, and this module's are strings)
    # DDP's default hook divides by the world size (a mean over ranks); the tagger's loss is a
    # sum over sentences, so the gradient of the global batch is the sum over ranks.
    group = process_group if process_group is not None else torch_dist.group.WORLD
    work = torch_dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_model(model: nn.Module, context: DistContext) -> nn.Module:
    """`model` itself (its forward(words, chars, lengths, mask, tags) is the training loss), or
    DistributedDataParallel around it (gradients summed over ranks) when the job has several
    processes. The wrapper shares the model's parameters (the optimiser keeps using them)."""
    if not context.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # broadcast_buffers off: the tagger's buffers (CRF constraints, the frozen pretrained table)
    # are constants, equal everywhere
    ddp = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    ddp.register_comm_hook(None, _allreduce_sum_hook)
    return ddp


def loss_of(module: nn.Module, batch: Any) -> torch.Tensor:
    """The training loss of `batch` through the model or its DDP wrapper from wrap_model()."""
    return module(batch.words, batch.chars, batch.lengths, batch.mask, batch.tags)
