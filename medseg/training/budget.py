"""Training time: the clock (summed over resumed sessions), the learning-rate schedule that
follows it, the time budget left for training once the final validation is reserved, and
whether an in-loop validation pass fits that budget."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.datasets import Case
from medseg.training.errors import TrainingError

log = logging.getLogger(__name__)

FINAL_VALIDATION_OVERHEAD_S = 15.0  # loading the run, writing masks, computing HD95
MIN_TRAIN_SECONDS = 10.0  # a budget leaving less than this for training is refused
VALIDATION_MARGIN = 2.0
"""The final validation (original grids, files, HD95) takes longer than the in-loop pass timed
for the estimate: measured 1.0x on BraTS (240x240x155; 2.6x with earlier code), about 1.1-1.4x
on hippocampus, 1.6x on TotalSegmentator CT (118 classes); kept at 2 for safety."""
IN_LOOP_VALIDATION_SHARE = 0.1
"""Under a time budget, an in-loop validation pass estimated to cost more than this share of the
training budget is skipped (on BraTS-sized volumes one pass cost as much as all the training):
it only reports progress; the final validation scores the model either way."""
WARM_UP_MATTERS_S = 10.0
"""A first validation pass shorter than this is repeated for the estimate: for small volumes the
one-off allocation costs of the first pass would dominate it."""


class _Clock:
    """Training wall time, summed over resumed sessions, against an optional budget."""

    def __init__(self) -> None:
        self.budget: float | None = None
        self.previous = 0.0
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.previous + running

    def fraction(self) -> float:
        """Share of the budget spent (0 without a budget)."""
        return min(1.0, self.elapsed() / self.budget) if self.budget else 0.0

    def done(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget

    def state(self) -> dict[str, float | None]:
        return {"budget": self.budget, "elapsed": self.elapsed()}

    def restore(self, state: dict[str, float | None]) -> None:
        self.budget = state.get("budget")
        self.previous = float(state.get("elapsed") or 0.0)


def _lr_lambda(cfg: Config, total: int, warmup: int, clock: _Clock) -> Any:
    """Warm-up, then cosine/poly decay over steps or elapsed budget, whichever is further."""
    schedule = cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = max(min(1.0, (step - warmup) / max(1, total - warmup)), clock.fraction())
        if schedule == "poly":
            return (1 - t) ** 0.9
        return 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _training_budget(max_minutes: float, start: float, validation: float) -> float:
    """Seconds left for training once loading (since `start`, a ``time.perf_counter()``) is
    done and the final validation is reserved; `validation` is the estimated wall time of one
    validation pass (`_Trainer.time_validation_pass`; 0 when there is none to run)."""
    reserve = FINAL_VALIDATION_OVERHEAD_S + VALIDATION_MARGIN * validation if validation else 0.0
    log.info(
        "final validation: %.1f min reserved (a validation pass timed at %.1f s)",
        reserve / 60,
        validation,
    )
    spent = time.perf_counter() - start
    budget = max_minutes * 60 - spent - reserve
    if budget < MIN_TRAIN_SECONDS:
        raise TrainingError(
            f"train.max_minutes={max_minutes:g} leaves no time to train: loading took "
            f"{spent / 60:.1f} min and the final validation needs about {reserve / 60:.1f} min"
        )
    return budget


def in_loop_validation_fits(cost: float | None, budget: float | None, elapsed: float) -> bool:
    """Whether an in-loop validation pass of `cost` seconds fits a training `budget` (seconds)
    of which `elapsed` are spent: at most `IN_LOOP_VALIDATION_SHARE` of the budget, and no more
    than is left of it. Without a budget, or before any pass was timed, it always fits."""
    if budget is None or cost is None:
        return True
    return cost <= IN_LOOP_VALIDATION_SHARE * budget and cost <= budget - elapsed


def resampled_voxels(case: Case, spacing: tuple[float | None, ...]) -> float:
    """Voxels of a case once resampled to `spacing` (RAS mm; an axis without a positive
    target keeps its own spacing), from its header."""
    from medseg.fingerprint import case_geometry

    geometry = case_geometry(case)
    sizes = [
        n * (s / t if t is not None and t > 0 else 1.0)
        for n, s, t in zip(geometry.shape, geometry.spacing, spacing, strict=True)
    ]
    return float(np.prod(sizes))
