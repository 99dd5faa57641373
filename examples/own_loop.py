"""GPD in your own training loop (README, "Your own loop"): one module, one backward, standard DDP.

    torchrun --nproc_per_node 2 examples/own_loop.py     # or plain `python examples/own_loop.py` (one process)
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gpdc
from model import build_model  # examples/model.py: a small CNN with BatchNorm

distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
torch.manual_seed(0)  # the same initial weights on every rank
exp = gpdc.expand(build_model(), {"input_shape": [2, 3, 32, 32], "expand": {"ratio": 2.0}})
gpd = gpdc.GPD(exp, train={"sce_weight": 3.0})  # dynamic teacher + shared student: their losses summed
model = DDP(gpd) if distributed else gpd  # all-reduces every gradient, the student's included
opt = torch.optim.SGD(gpd.parameters(), lr=0.05, momentum=0.9)
rank = dist.get_rank() if distributed else 0
g = torch.Generator().manual_seed(rank)  # each rank its own data
for step in range(5):
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    opt.zero_grad()
    out.loss.backward()  # one backward: teacher and student gradients together
    opt.step()
    loss = float(out.loss.detach())
student = exp.fold()  # the user's architecture with the trained student weights
if rank == 0:
    print(f"loss {loss:.3f}, folded student {type(student).__name__}", flush=True)
if distributed:  # every rank holds the same weights
    flat = torch.cat([p.detach().flatten() for p in gpd.parameters()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    if rank == 0:
        print(f"max difference between ranks {max(float((c - flat).abs().max()) for c in copies):.3g}", flush=True)
    del model, out  # DDP's reducer (also held by the last output) must go before its process group
    dist.barrier()
    dist.destroy_process_group()
