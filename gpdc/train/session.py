"""One training run's moving parts — the objective (in DDP and ``torch.compile`` when asked), its optimiser,
schedule, EMA and gradient scaler — with the checkpoint state they make together and one epoch of steps."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import GpdcError
from ..models import load_state_dict_strict
from ..spec import TrainSpec
from .ema import EMA
from .loader import Batches
from .step import train_step


@dataclass
class Session:
    cfg: TrainSpec
    objective: nn.Module
    runner: nn.Module  # the objective as stepped: in DistributedDataParallel, compiled
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, objective: nn.Module, cfg: TrainSpec, device: torch.device, world: int) -> "Session":
        params = list(objective.parameters())
        runner = objective if world == 1 else DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            runner = torch.compile(runner)
        optimizer = _optimizer(cfg, params)
        return cls(cfg, objective, runner, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg)),
                   EMA(params, cfg.ema) if cfg.ema else None,
                   torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def averaged(self):
        """Inside it, the parameters are their EMA (when there is one): what evaluation and export see."""
        return self.ema.swapped(self.params) if self.ema is not None else nullcontext()

    def train_epoch(self, epoch: int, batches: Batches, on_step: Callable[[int, dict], None]) -> dict:
        """One epoch of steps; ``on_step(step, losses)`` after each. Returns the mean losses, the mean step time,
        the images seen and the seconds the steps took."""
        self.objective.train()
        self.objective.set_epoch(epoch)  # feature losses' warm-up: a function of the epoch alone, so resume is exact
        sums: dict[str, float] = {}
        steps, step_time, images = 0, 0.0, 0
        for x, y in batches.epoch(epoch):
            t = time.perf_counter()
            losses = train_step(self.runner, self.params, self.cfg, x, y, self.optimizer, self.ema, self.scaler)
            step_time += time.perf_counter() - t
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            steps, images = steps + 1, images + len(y)
            on_step(steps, losses)
        self.scheduler.step()
        return {"losses": {k: v / max(steps, 1) for k, v in sums.items()}, "step_seconds": step_time / max(steps, 1),
                "images": images, "step_time": step_time}

    def state(self, epoch: int, metrics: list[dict]) -> dict:
        """What ``last.ckpt`` holds after ``epoch``: enough to continue exactly (the global RNG included)."""
        state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "metrics": json.dumps(metrics), "objective": self.objective.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def restore(self, path: Path, device: torch.device) -> tuple[int, list[dict]]:
        """Continue from the checkpoint at ``path``: (the first epoch to run, the metrics so far)."""
        state = _read_checkpoint(path, device)
        try:
            load_state_dict_strict(self.objective, state["objective"])
        except RuntimeError as e:
            raise GpdcError(f"--resume: {path} belongs to another model or spec (another ratio, strategy or branch "
                            f"set?): {str(e).splitlines()[0]} Resume with the spec and model that wrote it, or start "
                            "again without --resume (another --out keeps it).") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        return state["epoch"] + 1, json.loads(state["metrics"])


def _read_checkpoint(path: Path, device: torch.device) -> dict:
    """``last.ckpt``, or a clear error naming it when it is truncated, garbage or not one of gpdc's."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch says, the file is unreadable
        raise GpdcError(f"--resume: {path} cannot be read ({type(e).__name__}: it is truncated or not a checkpoint, "
                        "e.g. a run killed while writing one elsewhere). Delete it to start again, or restore a good "
                        "copy.") from None
    needed = {"objective", "optimizer", "scheduler", "rng", "epoch", "metrics"}
    if not isinstance(state, dict) or needed - set(state):
        raise GpdcError(f"--resume: {path} is not a gpdc training checkpoint (it lacks "
                        f"{', '.join(sorted(needed - set(state))) if isinstance(state, dict) else 'everything'}).")
    return state


def _optimizer(cfg: TrainSpec, params):
    """SGD or AdamW, fused where torch has it: one pass over each parameter per step instead of a loop of small ops
    (a GPD teacher with branches has ~9× a ResNet-18's parameters: 0.12 → 0.04 s per step on 2 cores). Not under
    fp16's GradScaler: the fused CPU step ignored its skip of overflowing steps here (the run diverged)."""
    cls, kw = (torch.optim.SGD, {"momentum": cfg.momentum, "nesterov": False}) if cfg.optimizer == "sgd" else (
        torch.optim.AdamW, {})
    if cfg.precision != "fp16":
        try:
            return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # a torch, device or dtype without the fused kernel
            pass
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


def _schedule(cfg: TrainSpec):
    def factor(epoch: int) -> float:
        if cfg.schedule == "step":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        if cfg.schedule == "constant":
            return 1.0
        warm = cfg.warmup_epochs if cfg.schedule == "warmup_cosine" else 0
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        t = (epoch - warm) / max(1, cfg.epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * t))

    return factor
