"""Several processes under torchrun: the process group, ranks, and the few collectives labelless uses.

``torchrun --nproc-per-node N -m labelless ...`` starts N copies of the command; each finds
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment. :func:`init` joins them into one
process group and puts each process on its own GPU (``cuda:LOCAL_RANK``). With CUDA the group
has two backends: NCCL for CUDA tensors (DistributedDataParallel's gradients) and gloo for CPU
tensors and Python objects (sweep rows, checkpoints, gathered logits); without CUDA, gloo alone.

A process started without torchrun never creates a process group: every helper here is then a
no-op (``rank() == 0``, ``world_size() == 1``, gathers and broadcasts hand back their input),
so the library runs exactly as a single process, with no overhead. So does one process under
torchrun: it joins a group of one, but with nobody to talk to nothing is wrapped in
DistributedDataParallel and no collective runs (docs/DISTRIBUTED.md has the measurements).

Example:
    >>> with session():                      # what ``labelless`` does around every command
    ...     rows = gather_objects(my_rows)   # one entry per rank, in rank order
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import LabellessError

__all__ = [
    "launched", "active", "init", "destroy", "session", "rank", "world_size", "local_rank", "is_main",
    "device", "barrier", "broadcast_object", "gather_objects", "on_main", "block", "gather_blocks",
    "sampler_shard", "mean", "broadcast_tensors", "broadcast_state", "wrap",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# -- the process group ---------------------------------------------------------------------


def launched() -> bool:
    """Whether torchrun (or a launcher setting the same variables) started this process."""
    return all(name in os.environ for name in _ENV)


def active() -> bool:
    """Whether this process is part of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def init() -> bool:
    """Join the process group torchrun described; False, doing nothing, without torchrun."""
    if active():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise LabellessError("this PyTorch build has no torch.distributed: run labelless without torchrun")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(_local_gpu())
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise LabellessError(f"cannot join the torchrun process group: {first}") from None
    log.debug("rank %d of %d joined (%s)", rank(), world_size(), dist.get_backend())
    return True


def _local_gpu() -> int:
    index, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if index >= count:
        raise LabellessError(f"LOCAL_RANK is {index} but this node has {count} GPU(s): "
                             f"use --nproc-per-node {count} or fewer")
    return index


def destroy() -> None:
    """Leave the process group (a no-op when there is none)."""
    if active():
        dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """Join the group on entry (under torchrun), leave it on exit; yields whether one is active.

    On success every rank waits for the others before leaving, so no rank exits while rank 0
    still writes. A group the caller created before is left alone.
    """
    owned = not active() and init()
    try:
        yield active()
        if owned:
            barrier()
    finally:
        if owned:
            destroy()


_alone = False  # rank 0 inside on_main(): the other ranks wait there, so it works as a group of one


def _several() -> bool:
    """Whether collectives have anyone to talk to: a group of two processes or more."""
    return active() and not _alone and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes take part (1 without torchrun, and for rank 0 inside :func:`on_main`)."""
    return dist.get_world_size() if active() and not _alone else 1


def local_rank() -> int:
    """This process's rank on its node: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def device(requested: str | torch.device | None = "auto") -> torch.device:
    """:func:`~labelless.evaluate.resolve_device`, where a bare ``cuda`` means this rank's GPU.

    Example:
        >>> device("auto")   # under torchrun, local rank 1 of a GPU node
        device(type='cuda', index=1)
    """
    from .evaluate import resolve_device

    chosen = resolve_device(requested)
    if chosen.type == "cuda" and chosen.index is None and active():
        return torch.device("cuda", local_rank())
    return chosen


# -- collectives ---------------------------------------------------------------------------


def barrier() -> None:
    """Wait until every rank arrives here."""
    if _several():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (anything picklable) on every rank."""
    if not _several():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _several():
        return [obj]
    boxes: list[Any] = [None] * world_size()
    dist.all_gather_object(boxes, obj)
    return boxes


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone; the other ranks wait and receive its result.

    Inside ``fn`` rank 0 works as a group of one: :func:`world_size` is 1 and every collective
    here (broadcasts, :func:`wrap`) is a no-op, so ``fn`` may call code written for torchrun
    (a short retraining, say) without waiting for ranks that are not there.
    When ``fn`` fails on rank 0, every rank fails with the same one-line message.
    """
    global _alone
    if not _several():
        return fn()
    outcome: tuple[str, Any] | None = None
    failure: BaseException | None = None
    if is_main():
        _alone = True
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others were told
            outcome, failure = ("error", str(exc)), exc
        finally:
            _alone = False
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if outcome[0] == "error":
        raise LabellessError(f"rank 0 failed: {outcome[1]}")
    return outcome[1]


def block(n: int) -> slice:
    """This rank's contiguous share of ``n`` items; shares differ in length by one at most."""
    size, me = world_size(), rank()
    return slice(me * n // size, (me + 1) * n // size)


def gather_blocks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` rows (computed for its :func:`block`) concatenated, on every rank."""
    if not _several():
        return local
    parts = [part for part in gather_objects(local.cpu()) if part.numel()]
    return torch.cat(parts) if parts else local.cpu()


def sampler_shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's share of an epoch's global ``order``, dealt as ``DistributedSampler`` does.

    The order is padded to a multiple of the world size by repeating its start, then rank r
    takes entries r, r + N, r + 2N, ...: every rank gets the same number of entries.
    """
    if world_size() == 1:
        return order
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(order)), num_replicas=world_size(), rank=rank(), shuffle=False)
    return order[torch.tensor(list(sampler), dtype=torch.long)]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks; non-finite on one rank makes it non-finite on all."""
    if not _several():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor, in place, with rank 0's."""
    if not _several():
        return
    for tensor in tensors:
        flat = tensor.data if tensor.is_contiguous() else tensor.data.contiguous()  # channels_last
        dist.broadcast(flat, src=0)
        if flat is not tensor.data:
            tensor.data.copy_(flat)


def broadcast_state(module: nn.Module) -> nn.Module:
    """``module`` with every parameter and buffer overwritten, in place, by rank 0's."""
    broadcast_tensors([*module.parameters(), *module.buffers()])
    return module


def wrap(module: nn.Module, on: torch.device, broadcast_buffers: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel among several processes; ``module`` itself otherwise.

    Only parameters that require gradients are synchronised, so frozen codebooks cost nothing.
    ``broadcast_buffers`` copies rank 0's buffers (BatchNorm statistics) to every rank before
    each forward pass.
    """
    if not _several():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [on.index if on.index is not None else torch.cuda.current_device()] if on.type == "cuda" else None
    # newer PyTorch calls the per-forward sync forward_sync_buffers (and always syncs buffers at the start)
    modern = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers" if modern else "broadcast_buffers": broadcast_buffers}
    return DistributedDataParallel(module, device_ids=ids, **sync)
