"""``gpdc train``: epochs of GPD (or a baseline), evaluation, metrics, checkpoints and resume.

Determinism: the model is built after ``torch.manual_seed(seed)``; each epoch's sample order is a
permutation drawn from a generator seeded by (seed, epoch) and sharded rank::world, so a resumed
run (model, optimiser, scheduler, EMA and the global RNG restored from ``last.ckpt``) continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write
from ..branch_plan import plans_at
from ..errors import GpdcError, InternalError
from ..expansion import expand
from ..gpd import GPD
from ..export import ExportError, check_onnx, export_onnx
from ..models import load_model
from ..spec import Spec, TrainSpec, load_spec, with_overrides
from ..weights import load_weights
from . import distributed
from .allocator import keep_freed_memory
from .data import Data, load_data
from .loader import Batches
from .plot import plot_gap
from .session import Session
from .step import Baseline, Logits, logits_of
from .tensorboard import TensorBoard


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
    if device.type == "cpu":
        keep_freed_memory()  # each step's large tensors reuse the last step's pages
    data = load_data(data_ref, tuple(spec.input_shape[2:]) if len(spec.input_shape) == 4 else (32, 32), spec.data)
    out_dir = _out_dir(out, student_ref)
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
    x0 = data.train[0][0].unsqueeze(0)
    roles = _roles(model, static, x0, data, spec, cfg, device)
    if rank == 0 and log is not None:
        _log_features(roles.objective, spec, static is not None, log)
    session = Session.create(roles.objective, cfg, device, world)
    start, metrics = session.restore(ckpt_path, device) if resume else (0, [])
    if rank == 0:
        _create(out_dir)  # once the run is known to start: a refused one leaves nothing behind

    per_rank = max(1, cfg.batch_size // world)
    train_batches = Batches(data.train, per_rank, device, spec.data, seed, rank, world, shuffle=True)
    test_batches = Batches(data.test, 256, device, spec.data, seed, rank, world, shuffle=False)
    static_acc = evaluate(roles.static, test_batches, device) if roles.static is not None else None
    plans = plans_at(roles.exp.teacher, x0.repeat(2, *[1] * (x0.dim() - 1)).to(device), per_rank) if roles.exp else {}
    last = cfg.epochs if stop_after is None else min(cfg.epochs, start + stop_after)
    tb = TensorBoard(out_dir / "tb", start * len(train_batches)) if rank == 0 else None
    for epoch in range(start, last):
        t0 = time.perf_counter()
        task = (progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(train_batches), loss="")
                if progress and rank == 0 else None)

        def on_step(step: int, losses: dict) -> None:
            if tb is not None:
                tb.step(epoch * len(train_batches) + step, losses, session.lr)
            if task is not None:
                progress.update(task, advance=1, loss=" ".join(f"{k} {v:.3f}" for k, v in losses.items()))

        lr_now = session.lr
        stats = session.train_epoch(epoch, train_batches, on_step)
        if task is not None:
            progress.update(task, description=f"epoch {epoch + 1}/{cfg.epochs}: evaluating")
        distributed.broadcast_buffers(roles.objective)
        with session.averaged():
            student_acc = evaluate(roles.student, test_batches, device)
            teacher_acc = evaluate(roles.teacher, test_batches, device) if roles.teacher is not None else None
        drift = distributed.ranks_differ(roles.objective, device)
        if drift:
            raise InternalError(f"internal error: after epoch {epoch + 1} the ranks' weights differ by up to {drift:.3g}; "
                                "DistributedDataParallel should keep them identical. This is a gpdc bug; please report it.")
        images, skipped = distributed.all_sum([stats["images"], len(train_batches.skipped)], device)
        metrics.append({"epoch": epoch + 1, "student_acc": student_acc, "teacher_acc": teacher_acc,
                        "static_acc": static_acc, **stats["losses"], "lr": lr_now, "seconds": time.perf_counter() - t0,
                        "step_seconds": stats["step_seconds"], "images_per_second": images / max(stats["step_time"], 1e-9),
                        "skipped_images": skipped})
        if rank == 0:
            _save_epoch(out_dir, session, roles, metrics, save_every, tb)
            if log is not None:
                log(epoch_line(metrics[-1], cfg.epochs))
    if tb is not None:
        tb.close()
    if rank == 0 and last == cfg.epochs:
        _finish(out_dir, roles, session, data, export, metrics, plans, log or (lambda line: None))
    distributed.barrier()
    return metrics


@dataclass
class Roles:
    """Who is trained and evaluated: the objective, the student and dynamic teacher as evaluated (their logits), the
    static teacher, the expansion (None for a baseline) and the user's model."""

    objective: nn.Module
    student: nn.Module
    teacher: nn.Module | None
    static: nn.Module | None
    exp: object | None
    model: nn.Module


def _roles(model: nn.Module, static: nn.Module | None, x0: torch.Tensor, data: Data, spec: Spec, cfg: TrainSpec,
           device: torch.device) -> Roles:
    """The objective of the spec's train section (GPD or a baseline) on ``device``, after checking that the models
    run on the data's images and the student has one output per class."""
    if static is not None:
        static.requires_grad_(False)
        static.train(cfg.static_teacher_train_mode)
    logits = logits_of(model.eval(), x0, cfg.logits, "the student")
    static_logits = logits_of(static, x0, cfg.teacher_logits, "the static teacher") if static is not None else None
    with torch.no_grad():
        n_out = logits(x0).shape[-1]
    if n_out != data.num_classes:
        raise GpdcError(f"the student has {n_out} outputs but {data.name} has {data.num_classes} classes; build the "
                        "model with a matching classifier.")
    input_shape = [2, *x0.shape[1:]]
    if cfg.gpd:
        exp = expand(model, spec.model_copy(update={"input_shape": input_shape}))
        objective = GPD(exp, static, cfg)
        student, teacher = (exp.student, exp.teacher) if logits is model else (
            Logits(exp.student, logits.path), Logits(exp.teacher, logits.path))
        roles = Roles(objective, student, teacher, static_logits, exp, model)
    else:
        roles = Roles(Baseline(model, static, cfg, spec.features, input_shape), logits, None, static_logits, None, model)
    roles.objective.to(device)
    if cfg.sync_bn:
        distributed.sync_batchnorm(roles.objective, device)
    if cfg.channels_last:
        roles.objective.to(memory_format=torch.channels_last)
    return roles


def _log_features(objective, spec: Spec, with_teacher: bool, log: Callable[[str], None]) -> None:
    """What feature distillation does in this run: each distilled pair, or why the spec's taps go unused."""
    kd = spec.train.kd
    for i, pair in enumerate(objective.describe_features(), 1):
        log(f"{kd} feature {i}: " + " | ".join(f"{who} {what}" for who, what in pair.items()))
    if spec.features.student and not spec.train.feature_kd:
        log(f"features: not used: train.kd is {kd}, which distils logits (reviewkd or fitnet distil features)")
    elif spec.train.feature_kd and not with_teacher:
        log(f"train.kd: {kd} needs a static teacher (--teacher); this run distils nothing from one")


def _out_dir(out: str | None, student_ref: str) -> Path:
    stem = student_ref.split(":", 1)[1] if ":" in student_ref else Path(student_ref).stem
    return Path(out) if out else Path("out") / f"train_{stem}"


def _create(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GpdcError(f"cannot create the output folder {out_dir} ({e.strerror}); pass a writable --out.") from None


def _save_epoch(out_dir: Path, session: Session, roles: Roles, metrics: list[dict], save_every: int | None,
                tb: TensorBoard) -> None:
    """metrics.jsonl, last.ckpt (and every ``save_every`` epochs a kept copy), best/, TensorBoard: rank 0's writes."""
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write(out_dir / "metrics.jsonl", lambda p: Path(p).write_text(lines))
    epoch = metrics[-1]["epoch"]
    state = session.state(epoch - 1, metrics)
    atomic_write(out_dir / "last.ckpt", lambda p: torch.save(state, p))
    if save_every and epoch % save_every == 0:
        atomic_write(out_dir / f"epoch_{epoch:04d}.ckpt", lambda p: torch.save(state, p))
    if metrics[-1]["student_acc"] >= max(m["student_acc"] for m in metrics):
        with session.averaged():
            _save_best(out_dir, roles.exp, roles.model, metrics[-1])
    tb.epoch(metrics)


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


def _finish(out_dir: Path, roles: Roles, session: Session, data: Data, export: bool, metrics: list[dict], plans: dict,
            log: Callable[[str], None]) -> None:
    """The run's products: the folded student, the teacher, the ONNX export with its check, report.json, gap.png."""
    exp, model = roles.exp, roles.model
    with session.averaged():
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
              "branch_plans": plans,  # how each branch block ran at the per-rank batch
              "features": roles.objective.describe_features()}  # the distilled pairs, per network
    log(f"folded the student into {type(folded).__name__}: {out_dir / 'student.safetensors'}")
    if export:
        x = data.test[0][0].unsqueeze(0).repeat(2, *[1] * data.test[0][0].dim())
        try:
            export_onnx(folded, x, out_dir / "student.onnx")
        except ExportError as e:  # the trained and folded weights are written: keep the run, say why there is no ONNX
            report["onnx"] = {"ok": False, "error": str(e)}
            log(f"no student.onnx: {e}")
        else:
            report["onnx"] = check_onnx(out_dir / "student.onnx", folded, x).as_dict()
            log(f"exported {out_dir / 'student.onnx'}: onnxruntime max abs {report['onnx']['max_abs']:.2e}, "
                + ("equal" if report["onnx"]["ok"] else "DIFFERS"))
    atomic_write(out_dir / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    if metrics:
        plot_gap(metrics, out_dir / "gap.png")
