"""Which cases train and which validate: the k-fold split, the training subset, and the check
that a resumed run keeps its split."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg import runs
from medseg.training.errors import TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Case names used for training and for validation."""

    train: tuple[str, ...]
    val: tuple[str, ...]


def kfold_split(names: list[str], folds: int, fold: int, seed: int) -> Split:
    """Shuffle case names with `seed`, cut them into `folds` parts and hold out part `fold`.

    One fold means no held-out cases: every case trains and is also used for validation.
    """
    if folds == 1:
        log.warning("train.folds=1: validation runs on the training cases (not held out)")
        return Split(tuple(sorted(names)), tuple(sorted(names)))
    if len(names) < folds:
        raise TrainingError(
            f"{len(names)} cases cannot be split into {folds} folds; "
            f"set train.folds <= {len(names)}"
        )
    order = np.random.default_rng(seed).permutation(sorted(names))
    held = set(np.array_split(order, folds)[fold].tolist())
    return Split(
        tuple(n for n in sorted(names) if n not in held),
        tuple(n for n in sorted(names) if n in held),
    )


def subset_training(split: Split, count: int | None, seed: int) -> Split:
    """Keep `count` of the split's training cases, drawn with `seed` (nested: the first
    `count` of one shuffle), and all of its validation cases. None keeps every case."""
    if count is None:
        return split
    if count > len(split.train):
        raise TrainingError(
            f"train.train_cases={count}, but this fold has only {len(split.train)} training cases"
        )
    keep = set(np.random.default_rng(seed).permutation(list(split.train))[:count].tolist())
    return Split(tuple(n for n in split.train if n in keep), split.val)


def _check_same_split(run_dir: Path, split: Split) -> None:
    """A resumed run must keep its split: training on its validation cases would leak them."""
    info = json.loads((run_dir / runs.INFO).read_text())
    if tuple(info["train_cases"]) != split.train or tuple(info["val_cases"]) != split.val:
        raise TrainingError(
            f"{run_dir}: the dataset now splits into other training and validation cases than "
            "this run was started with (cases added or removed, or a run from a medseg version "
            "whose split followed train.seed); start a new run instead of resuming"
        )
