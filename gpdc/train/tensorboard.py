"""``OUT/tb``: TensorBoard event files of a run (rank 0): losses and lr per step, accuracies, losses and images/s per
epoch, and the gap between the teachers and the student as a figure. A resumed run appends; events a killed run
wrote after its last checkpoint are purged, so the curves match an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

from .plot import gap_figure


class TensorBoard:
    def __init__(self, folder: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=first_step or None)

    def step(self, step: int, losses: dict[str, float], lr: float) -> None:
        for k, v in losses.items():
            self.writer.add_scalar(f"step/{k}", v, step)
        self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, metrics: list[dict]) -> None:
        row = metrics[-1]
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(f"epoch/{k}", v, row["epoch"])
        self.writer.add_figure("gap", gap_figure(metrics), row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
