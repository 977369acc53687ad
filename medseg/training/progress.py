"""What a run reports while it trains: the progress bar, the per-epoch log line, and
``metrics.csv`` with its training curve."""

from __future__ import annotations

import csv
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg import runs
from medseg.io import atomic_path
from medseg.training.budget import _Clock

IN_LOOP_DICE = "val_pooled_dice"
"""Prefix of the in-loop validation columns: Dice of the voxel counts summed over the validation
cases on the resampled grid (cheap; the final validation's per-case mean on the original grids
is what `validation/metrics.json` reports)."""


def _write_metrics(history: list[dict[str, Any]], run_dir: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_path(run_dir / runs.METRICS) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    _plot_curve(history, run_dir / runs.CURVE)


def _plot_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [r["epoch"] + 1 for r in history]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [(r["epoch"] + 1, _in_loop_dice(r)) for r in history if _in_loop_dice(r) is not None]
    if val:
        ax2 = ax.twinx()
        label = "validation Dice, pooled over cases (resampled grid)"
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label=label)
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("medseg training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _in_loop_dice(row: dict[str, Any]) -> float | None:
    """A history row's in-loop validation Dice (``val_dice_mean`` in runs before the rename)."""
    value = row.get(f"{IN_LOOP_DICE}_mean", row.get("val_dice_mean"))
    return None if value in (None, "") else float(value)


def _describe(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items()
        if k != "epoch"
    )


class _Bar:
    """Steps done, or seconds of the budget spent when training against a clock."""

    def __init__(self, progress: Any, task: Any, clock: _Clock) -> None:
        self.progress, self.task, self.clock = progress, task, clock

    def advance(self, loss: float) -> None:
        if self.clock.budget:
            spent = min(self.clock.elapsed(), self.clock.budget)  # the last step may overrun
            self.progress.update(self.task, completed=spent, loss=f"{loss:.4f}")
        else:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")


@contextmanager
def _progress_bar(enabled: bool, total: float, clock: _Clock) -> Any:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, progress.add_task("train", total=total, loss="-"), clock)
