"""Dataset integrity check: every problem of every case, found before any training starts.

Like nnU-Net's ``--verify_dataset_integrity``, but it collects all problems instead of stopping
at the first, so a user fixes a dataset in one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.datasets import Case, Dataset, DatasetError, MissingFile, load_dataset
from medseg.io import ImageError, LabelMap, Volume, load_labels, load_volume, same_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One problem: which case, which file, what is wrong (with how to fix it)."""

    case: str
    path: Path | None
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.message}"


def check_dataset(root: Path, progress: bool = False) -> tuple[Dataset | None, list[Problem]]:
    """Check a dataset folder; returns the dataset (None if unreadable) and all problems:
    every missing file, then every problem of the cases that have all their files."""
    missing: list[MissingFile] = []
    try:
        dataset = load_dataset(root, missing)
    except DatasetError as err:
        return None, [Problem("dataset", Path(root) / "dataset.json", str(err))]
    problems = [Problem(m.case, m.path, m.message) for m in missing]
    return dataset, problems + check_cases(dataset, dataset.cases, progress)


def check_cases(dataset: Dataset, cases: Iterable[Case], progress: bool = False) -> list[Problem]:
    """Problems of the given cases of `dataset` (readability, grids, channels, label values)."""
    problems: list[Problem] = []
    for case in _iterate(list(cases), progress):
        problems += list(_check_case(dataset, case))
    return problems


def _check_case(dataset: Dataset, case: Case) -> Iterator[Problem]:
    try:
        image = load_volume(case.images)
    except ImageError as err:
        yield Problem(case.name, case.images[0], str(err))
        return
    if image.array.shape[0] != len(dataset.channels):
        yield Problem(
            case.name,
            case.images[0],
            f"{case.images[0]}: has {image.array.shape[0]} channel(s), dataset.json declares "
            f"{len(dataset.channels)}",
        )
    if case.label is None:
        return
    try:
        labels = load_labels(case.label)
    except ImageError as err:
        yield Problem(case.name, case.label, str(err))
        return
    for message in label_problems(labels, image, set(dataset.labels)):
        yield Problem(case.name, case.label, message)


def label_problems(labels: LabelMap, image: Volume, declared: set[int] | None) -> list[str]:
    """What is wrong with a label map for its image: grid, shape, undeclared values.

    Args:
        labels: the label map.
        image: the image it annotates.
        declared: label values dataset.json declares; None skips the value check.

    Returns:
        One message per problem (each names the label file and how to fix it).
    """
    problems = []
    if labels.array.shape != image.shape:
        problems.append(
            f"{labels.source}: label shape {labels.array.shape} differs from image shape "
            f"{image.shape} ({image.source})"
        )
    elif not same_grid(labels.affine, image.affine, labels.array.shape, image.shape):
        problems.append(
            f"{labels.source}: label origin/spacing/direction differ from the image's "
            f"({image.source}); resample the label onto the image grid (nearest neighbour)"
        )
    if declared is not None:
        undeclared = sorted(set(np.unique(labels.array).tolist()) - declared)
        if undeclared:
            problems.append(
                f"{labels.source}: label value(s) {undeclared[:10]} not declared in dataset.json "
                f"(declared: {sorted(declared)})"
            )
    return problems


def _iterate(cases: list[Case], progress: bool) -> Iterator[Case]:
    if not progress:
        yield from cases
        return
    from rich.progress import track

    yield from track(cases, description="checking", transient=True)
