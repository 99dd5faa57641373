"""torch.distributed for ``torchrun -m gpdc train``: gloo on CPU, nccl on CUDA; rank 0 writes.

The objective (``gpdc.GPD``: teacher and student losses summed, one backward) is wrapped in standard
DistributedDataParallel, which all-reduces the gradients and broadcasts the buffers; this module only
sets up the process group and sums evaluation counts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GpdcError


def init() -> tuple[int, int, torch.device]:
    """(rank, world size, device) — initialises the process group when launched by torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(values: list[float], device) -> list[float]:
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: DDP broadcasts them before each forward, so after an
    epoch's last step each rank still holds its own, which evaluation and the checkpoint must not see."""
    if world() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b, 0)


def ranks_differ(module, device) -> float:
    """The largest difference between ranks of any parameter or buffer of ``module`` (0.0: all identical; DDP keeps
    them so, a hand-made second backward would not)."""
    if world() == 1:
        return 0.0
    flat = torch.cat([t.detach().double().flatten() for t in module.state_dict().values() if t.is_floating_point()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).max()) if len(flat) else 0.0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sync_batchnorm(objective: nn.Module, device: torch.device) -> None:
    """Every BatchNorm of ``objective`` (teacher and shared student) becomes a SyncBatchNorm in place. The new module
    takes over the old one's parameter and buffer tables, so the state_dict keys stay (checkpoints, fold) and the
    shared student's BatchNorms, which own no parameters (they read the teacher's), stay so."""
    if world() > 1 and device.type != "cuda":
        raise GpdcError("train.sync_bn needs GPUs: torch's SyncBatchNorm runs on CUDA only. Leave it off on CPU (each "
                        "rank then normalises over its own part of the batch).")
    for module in list(objective.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                module.add_module(name, _synced(child))


def _synced(bn: nn.modules.batchnorm._BatchNorm) -> nn.SyncBatchNorm:
    sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    sync._parameters, sync._buffers = bn._parameters, bn._buffers
    sync.train(bn.training)
    return sync
