"""Running under ``torchrun``: the process group, who this process is, and the few collectives
the pipeline needs.

``torchrun --nproc_per_node N`` (and ``--nnodes``) starts N copies of ``robustprune run`` with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup`
joins them into one process group (gloo on the CPU, NCCL on CUDA, one GPU per process by its
local rank). Without those variables (a plain ``robustprune run``) nothing here does anything
and every helper is a no-op, so single-process code never branches on it.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from toolchain.errors import UserError

log = logging.getLogger(__name__)

# Ranks other than 0 wait at a barrier while rank 0 alone prunes, exports and validates, which
# can take hours: the default collective timeout (10-30 min) would kill them.
TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (``rank`` 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes artifacts and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_rank() -> int:
    """This process's rank as torchrun launched it (0 without torchrun), readable before
    :func:`setup`: rank 0 alone writes, even what it writes before the group exists."""
    return int(os.environ.get("RANK", "0"))


def current() -> World:
    """The running process group's view of this process (``World()`` when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str) -> tuple[World, str]:
    """Join the process group torchrun describes in the environment, if any.

    Args:
        device: the resolved device (``cpu``, ``cuda`` or ``cuda:N``).

    Returns:
        This process's :class:`World` and its device: ``cuda:<local rank>`` on CUDA.

    Raises:
        UserError: more processes on a node than it has GPUs.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return current(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} here); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    world = current()
    log.info("rank %d of %d (local rank %d), %s on %s", world.rank, world.size, local_rank, backend, device)
    return world, device


def teardown() -> None:
    """Leave the process group (after a last barrier, so no rank exits while others still talk)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable value; it travels between our own processes)."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    world = current()
    if not world.distributed:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def all_sum(values: list[float], device: str | torch.device = "cpu") -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64)."""
    if not current().distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sync_batchnorm(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Replace ``model``'s BatchNorm layers in place by SyncBatchNorm sharing their parameters
    and running statistics; returns what :func:`local_batchnorm` needs to undo it."""
    kinds: dict[str, type[nn.Module]] = {
        name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    for name in kinds:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(parent, attr)))
    return kinds


def local_batchnorm(model: nn.Module, kinds: dict[str, type[nn.Module]]) -> None:
    """Put back the BatchNorm layers :func:`sync_batchnorm` replaced (same parameters and
    statistics), so the trained model exports and saves as it was built."""
    for name, kind in kinds.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        sync = getattr(parent, attr)
        plain = kind(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
        # The very same tensors: what was trained (and any optimiser state on it) carries over.
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(plain, key, getattr(sync, key))
        plain.train(sync.training)
        setattr(parent, attr, plain)
