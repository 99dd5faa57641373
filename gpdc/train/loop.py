"""``gpdc train``: epochs of GPD (or a baseline), evaluation, metrics, checkpoints and resume.

Determinism: the model is built after ``torch.manual_seed(seed)``; each epoch's sample order is a
permutation drawn from a generator seeded by (seed, epoch) and sharded rank::world, so a resumed
run (model, optimiser, scheduler, EMA and the global RNG restored from ``last.ckpt``) continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from typing import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..atomic import atomic_write
from ..branch_plan import plans_at
from ..errors import GpdcError, InternalError
from ..expansion import expand
from ..gpd import GPD
from ..export import check_onnx, export_onnx
from ..models import load_model, load_state_dict_strict
from ..spec import Spec, TrainSpec, load_spec, with_overrides
from ..weights import load_weights
from . import distributed
from .data import Data, load_data
from .loader import Batches
from .ema import EMA
from .plot import plot_gap
from .step import Baseline, Logits, logits_of, train_step
from .tensorboard import TensorBoard


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device) -> float:
    """Top-1 accuracy of ``model`` over the test set, each rank its share, summed across ranks."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in batches.epoch(0):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    c, t = distributed.all_sum([correct, total], device)
    return c / max(t, 1)


def train(student_ref: str, spec: Spec | str, data_ref: str = "digits", out: str | None = None, *,
          teacher_ref: str | None = None, teacher_weights: str | None = None, student_weights: str | None = None,
          epochs: int | None = None, lr: float | None = None, batch_size: int | None = None, seed: int = 0,
          resume: bool = False, entry: str = "build_model", teacher_entry: str | None = None, export: bool = True,
          progress=None, stop_after: int | None = None, save_every: int | None = None,
          log: Callable[[str], None] | None = None) -> list[dict]:
    """Train; returns the per-epoch metrics (also in OUT/metrics.jsonl; ``log`` gets one line per epoch).

    ``stop_after`` ends this run after that many epochs (a time-limited job); ``resume`` continues it."""
    spec = load_spec(spec)
    overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)) if v is not None}
    cfg = with_overrides(spec.train, overrides)
    rank, world, device = distributed.init()
    data = load_data(data_ref, tuple(spec.input_shape[2:]) if len(spec.input_shape) == 4 else (32, 32), spec.data)
    stem = student_ref.split(":", 1)[1] if ":" in student_ref else Path(student_ref).stem
    out_dir = Path(out) if out else Path("out") / f"train_{stem}"
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GpdcError(f"cannot create the output folder {out_dir} ({e.strerror}); pass a writable --out.") from None
    ckpt_path = out_dir / "last.ckpt"
    if resume and not ckpt_path.is_file():
        raise GpdcError(f"--resume: no checkpoint {ckpt_path}; run without --resume first (same --out).")
    if teacher_ref and not teacher_weights:
        raise GpdcError("--teacher needs --teacher-weights: a static teacher with random weights teaches nothing.")

    torch.manual_seed(seed)
    model = load_model(student_ref, entry, num_classes=data.num_classes if ":" in student_ref else None)
    if student_weights:
        load_weights(model, student_weights, "student")
    static = None
    if teacher_ref:
        static = load_model(teacher_ref, teacher_entry or entry, num_classes=data.num_classes if ":" in teacher_ref else None)
        load_weights(static, teacher_weights, "teacher")
        static.requires_grad_(False)
        static.train(cfg.static_teacher_train_mode)
    x0 = data.train[0][0].unsqueeze(0)
    logits = logits_of(model.eval(), x0, cfg.logits, "the student")
    if static is not None:
        static = logits_of(static, x0, cfg.teacher_logits, "the static teacher")
    with torch.no_grad():
        n_out = logits(x0).shape[-1]
    if n_out != data.num_classes:
        raise GpdcError(f"the student has {n_out} outputs but {data.name} has {data.num_classes} classes; build the "
                        "model with a matching classifier.")
    exp, teacher = None, None
    if cfg.gpd:
        exp = expand(model, spec.model_copy(update={"input_shape": [2, *x0.shape[1:]]}))
        objective = GPD(exp, static, cfg)
        student, teacher = (exp.student, exp.teacher) if logits is model else (
            Logits(exp.student, logits.path), Logits(exp.teacher, logits.path))
    else:
        objective = Baseline(logits, static, cfg)
        student = logits
    objective.to(device)
    if cfg.sync_bn:
        distributed.sync_batchnorm(objective, device)
    if cfg.channels_last:
        objective.to(memory_format=torch.channels_last)
    params = list(objective.parameters())
    runner = objective if world == 1 else DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    optimizer = _optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    ema = EMA(params, cfg.ema) if cfg.ema else None
    metrics: list[dict] = []
    start = 0
    if resume:
        state = _read_checkpoint(ckpt_path, device)
        try:
            load_state_dict_strict(objective, state["objective"])
        except RuntimeError as e:
            raise GpdcError(f"--resume: {ckpt_path} belongs to another model or spec (another ratio, strategy or "
                            f"branch set?): {str(e).splitlines()[0]} Resume with the spec and model that wrote it, or "
                            "start again without --resume (another --out keeps it).") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        start, metrics = state["epoch"] + 1, json.loads(state["metrics"])

    per_rank = max(1, cfg.batch_size // world)
    train_batches = Batches(data.train, per_rank, device, spec.data, seed, rank, world, shuffle=True)
    test_batches = Batches(data.test, 256, device, spec.data, seed, rank, world, shuffle=False)
    static_acc = evaluate(static, test_batches, device) if static is not None else None
    plans = plans_at(exp.teacher, x0.repeat(2, *[1] * (x0.dim() - 1)).to(device), per_rank) if exp else {}
    last = cfg.epochs if stop_after is None else min(cfg.epochs, start + stop_after)
    tb = TensorBoard(out_dir / "tb", start * len(train_batches)) if rank == 0 else None
    for epoch in range(start, last):
        t0 = time.perf_counter()
        objective.train()
        sums: dict[str, float] = {}
        steps, step_time = 0, 0.0
        task = (progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(train_batches), loss="")
                if progress and rank == 0 else None)
        images = 0
        for x, y in train_batches.epoch(epoch):
            images += len(y)
            ts = time.perf_counter()
            losses = train_step(runner, params, cfg, x, y, optimizer, ema, scaler)
            step_time += time.perf_counter() - ts
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            if tb is not None:
                tb.step(epoch * len(train_batches) + steps, losses, optimizer.param_groups[0]["lr"])
            if task is not None:
                progress.update(task, advance=1, loss=" ".join(f"{k} {v:.3f}" for k, v in losses.items()))
        if task is not None:
            progress.update(task, description=f"epoch {epoch + 1}/{cfg.epochs}: evaluating")
        distributed.broadcast_buffers(objective)
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        swap = ema.swapped(params) if ema is not None else nullcontext()
        with swap:
            student_acc = evaluate(student, test_batches, device)
            teacher_acc = evaluate(teacher, test_batches, device) if teacher is not None else None
        drift = distributed.ranks_differ(objective, device)
        if drift:
            raise InternalError(f"internal error: after epoch {epoch + 1} the ranks' weights differ by up to {drift:.3g}; "
                                "DistributedDataParallel should keep them identical. This is a gpdc bug; please report it.")
        images, skipped = distributed.all_sum([images, len(train_batches.skipped)], device)
        row = {"epoch": epoch + 1, "student_acc": student_acc, "teacher_acc": teacher_acc, "static_acc": static_acc,
               **{k: v / max(steps, 1) for k, v in sums.items()}, "lr": lr_now,
               "seconds": time.perf_counter() - t0, "step_seconds": step_time / max(steps, 1),
               "images_per_second": images / max(step_time, 1e-9), "skipped_images": skipped}
        metrics.append(row)
        if rank == 0:
            lines = "".join(json.dumps(m) + "\n" for m in metrics)
            atomic_write(out_dir / "metrics.jsonl", lambda p: Path(p).write_text(lines))
            state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": torch.get_rng_state(), "metrics": json.dumps(metrics), "objective": objective.state_dict()}
            if ema is not None:
                state["ema"] = ema.state_dict()
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            atomic_write(ckpt_path, lambda p: torch.save(state, p))
            if save_every and (epoch + 1) % save_every == 0:
                atomic_write(out_dir / f"epoch_{epoch + 1:04d}.ckpt", lambda p: torch.save(state, p))
            if student_acc >= max(m["student_acc"] for m in metrics):
                with ema.swapped(params) if ema is not None else nullcontext():
                    _save_best(out_dir, exp, model, row)
            tb.epoch(metrics)
            if log is not None:
                log(epoch_line(row, cfg.epochs))
    if tb is not None:
        tb.close()
    if rank == 0 and last == cfg.epochs:
        _finish(out_dir, exp, model, params, ema, data, spec, export, metrics, plans, log or (lambda line: None))
    distributed.barrier()
    return metrics


def epoch_line(row: dict, epochs: int) -> str:
    """The epoch's line for a log: losses, accuracies, lr, throughput."""
    acc = " ".join(f"{k.removesuffix('_acc')} {100 * row[k]:.2f}%" for k in ("student_acc", "teacher_acc", "static_acc")
                   if row.get(k) is not None)
    losses = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith("_loss"))
    skipped = f" | skipped {row['skipped_images']} unreadable images" if row.get("skipped_images") else ""
    return (f"epoch {row['epoch']}/{epochs} | {acc} | {losses} | lr {row['lr']:.3g} | "
            f"{row['images_per_second']:.0f} img/s | {row['seconds']:.1f}s{skipped}")


def _save_best(out_dir: Path, exp, model, row: dict) -> None:
    """``best/``: the folded student of the best epoch so far (by the student's accuracy) and its metrics."""
    best = out_dir / "best"
    best.mkdir(exist_ok=True)
    with torch.no_grad():
        sd = exp.fold_state_dict() if exp is not None else model.state_dict()
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}
    atomic_write(best / "student.safetensors", lambda p: save_file(tensors, p))
    atomic_write(best / "metrics.json", lambda p: Path(p).write_text(json.dumps(row, indent=2)))


def _finish(out_dir: Path, exp, model, params, ema, data: Data, spec: Spec, export: bool, metrics, plans,
            log: Callable[[str], None]) -> None:
    swap = ema.swapped(params) if ema is not None else nullcontext()
    with swap:
        if exp is not None:
            exp.teacher.cpu(), exp.student.cpu()
            folded_sd = exp.fold_state_dict()
            folded = exp.fold(state_dict=folded_sd)
            teacher_sd = {k: v.detach().clone().contiguous() for k, v in exp.teacher.state_dict().items()}
            atomic_write(out_dir / "teacher.safetensors", lambda p: save_file(teacher_sd, p))
        else:
            folded = model.cpu().eval()
            folded_sd = folded.state_dict()
        student_sd = {k: v.detach().clone().contiguous() for k, v in folded_sd.items()}
        atomic_write(out_dir / "student.safetensors", lambda p: save_file(student_sd, p))
    report = {"data": data.name, "epochs": len(metrics), "final": metrics[-1] if metrics else None,
              "branch_plans": plans}  # how each branch block ran at the per-rank batch
    log(f"folded the student into {type(folded).__name__}: {out_dir / 'student.safetensors'}")
    if export:
        x = data.test[0][0].unsqueeze(0).repeat(2, *[1] * data.test[0][0].dim())
        export_onnx(folded, x, out_dir / "student.onnx")
        report["onnx"] = check_onnx(out_dir / "student.onnx", folded, x).as_dict()
        log(f"exported {out_dir / 'student.onnx'}: onnxruntime max abs {report['onnx']['max_abs']:.2e}, "
            + ("equal" if report["onnx"]["ok"] else "DIFFERS"))
    atomic_write(out_dir / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    if metrics:
        plot_gap(metrics, out_dir / "gap.png")
