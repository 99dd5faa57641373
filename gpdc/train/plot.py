"""gap.png: student, dynamic teacher and static teacher accuracy per epoch — the preserved gap."""

from __future__ import annotations

import os
from pathlib import Path


def plot_gap(metrics: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = gap_figure(metrics)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def gap_figure(metrics: list[dict]):
    """The accuracies per epoch as a matplotlib figure (also TensorBoard's 'gap')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("static_acc", "static teacher"), ("teacher_acc", "dynamic teacher"), ("student_acc", "student")):
        if any(m.get(key) is not None for m in metrics):
            ax.plot(epochs, [100 * m[key] for m in metrics], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("GPD: the gap between the teachers and the student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
