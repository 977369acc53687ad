"""Dataset fingerprint: what planning needs to know about a dataset (nnU-Net's "fingerprint").

Per case, the shape and spacing along the RAS axes (read from headers) and how much of the
image its nonzero voxels span. Per channel, statistics of the foreground (label > 0)
intensities, sampled across cases. Per label, the fraction of cases that contain it and its
median size in voxels and mL. `medseg plan` saves it as JSON next to the planned config, so a
reader can see what the plan was derived from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from monai.transforms.utils import generate_spatial_bounding_box

from medseg.datasets import Case, Dataset, DatasetError
from medseg.io import (
    LabelMap,
    Volume,
    atomic_path,
    load_labels,
    load_volume,
    ras_shape,
    ras_spacing,
    read_geometry,
)

log = logging.getLogger(__name__)

SAMPLES_PER_CASE = 10_000
"""Foreground voxels sampled per case and channel (nnU-Net samples 10,000 too)."""
PERCENTILES = (0.5, 99.5)
"""The clipping percentiles of CT normalisation (nnU-Net's)."""

T = TypeVar("T")


@dataclass(frozen=True)
class CaseGeometry:
    """Shape (voxels) and spacing (mm) of one case along the RAS axes (x, y, z)."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    nonzero_fraction: float = 1.0
    """Voxels of the bounding box of the nonzero voxels (any channel) over the image's voxels:
    nnU-Net's relative size after cropping (1.0 in fingerprints written before it was kept)."""


@dataclass(frozen=True)
class IntensityStats:
    """Statistics of one channel's sampled foreground intensities."""

    channel: str
    mean: float
    std: float
    median: float
    lower: float
    """0.5th percentile."""
    upper: float
    """99.5th percentile."""
    min: float
    max: float

    @classmethod
    def of(cls, channel: str, values: np.ndarray) -> IntensityStats:
        """Statistics of `values` (1D); zeros when `values` is empty (no foreground at all)."""
        if values.size == 0:
            return cls(channel, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        lower, median, upper = np.percentile(values, [PERCENTILES[0], 50, PERCENTILES[1]])
        return cls(
            channel,
            float(values.mean()),
            float(values.std()),
            float(median),
            float(lower),
            float(upper),
            float(values.min()),
            float(values.max()),
        )


@dataclass(frozen=True)
class LabelStats:
    """How often and how large one foreground label is.

    Attributes:
        value, name: the label value and its dataset.json name.
        case_fraction: fraction of cases whose label map contains the value.
        median_voxels, median_ml: median size over the cases that contain it (0 if none do).
    """

    value: int
    name: str
    case_fraction: float
    median_voxels: float
    median_ml: float


@dataclass(frozen=True)
class Fingerprint:
    """A dataset's fingerprint; see the module docstring.

    Attributes:
        dataset: the dataset folder, as given.
        layout: "msd" or "nnunet".
        channels: input channel names.
        labels: label value -> name, background included.
        cases: per-case RAS geometry, in case order.
        intensities: one entry per channel.
        label_stats: one entry per foreground label, in value order.
    """

    dataset: str
    layout: str
    channels: tuple[str, ...]
    labels: dict[int, str]
    cases: tuple[CaseGeometry, ...]
    intensities: tuple[IntensityStats, ...]
    label_stats: tuple[LabelStats, ...]

    @property
    def spacings(self) -> np.ndarray:
        """(N, 3) spacings in mm along x, y, z."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes(self) -> np.ndarray:
        """(N, 3) shapes in voxels along x, y, z."""
        return np.array([c.shape for c in self.cases], dtype=np.int64)

    @property
    def median_spacing(self) -> tuple[float, float, float]:
        """Median spacing per axis in mm."""
        return tuple(float(s) for s in np.median(self.spacings, axis=0))  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON (label keys as strings), with the median spacing for readers."""
        raw = asdict(self)
        raw["labels"] = {str(k): v for k, v in self.labels.items()}
        raw["median_spacing"] = list(self.median_spacing)
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Fingerprint:
        """Inverse of `to_json`."""
        return cls(
            dataset=str(raw["dataset"]),
            layout=str(raw["layout"]),
            channels=tuple(raw["channels"]),
            labels={int(k): str(v) for k, v in raw["labels"].items()},
            cases=tuple(
                CaseGeometry(
                    c["name"],
                    tuple(c["shape"]),  # type: ignore[arg-type]
                    tuple(c["spacing"]),  # type: ignore[arg-type]
                    float(c.get("nonzero_fraction", 1.0)),
                )
                for c in raw["cases"]
            ),
            intensities=tuple(IntensityStats(**s) for s in raw["intensities"]),
            label_stats=tuple(LabelStats(**s) for s in raw["label_stats"]),
        )


def compute_fingerprint(
    dataset: Dataset, root: Path | str | None = None, seed: int = 0, progress: bool = False
) -> Fingerprint:
    """Fingerprint `dataset`: geometry from headers, then one pass over the voxels.

    Args:
        dataset: the dataset (its labelled cases).
        root: the dataset folder as the user gave it (recorded); default ``dataset.root``.
        seed: seed of the foreground sampling.
        progress: show a progress bar.

    Raises:
        ImageError: an unreadable image or label file.
        DatasetError: a case whose channel count or label grid does not match.
    """
    geometry = tuple(case_geometry(case) for case in dataset.cases)
    rng = np.random.default_rng(seed)
    channels = list(range(len(dataset.channels)))
    samples: dict[int, list[np.ndarray]] = {c: [] for c in channels}
    foreground = [v for v in dataset.labels if v != 0]
    counts = np.zeros((len(dataset.cases), len(foreground)), dtype=np.int64)
    nonzero = np.ones(len(dataset.cases))
    for i, case in enumerate(_iterate(dataset.cases, progress, "fingerprint")):
        image, labels = load_case(dataset, case)
        add_foreground_samples(samples, image, labels, rng)
        nonzero[i] = nonzero_fraction(image.array)
        if labels is not None:
            counts[i] = label_counts(labels.array, foreground)
    geometry = tuple(
        dataclasses.replace(g, nonzero_fraction=round(float(f), 4))
        for g, f in zip(geometry, nonzero, strict=True)
    )
    ml_per_voxel = np.array([np.prod(g.spacing) / 1000.0 for g in geometry])
    label_stats = tuple(
        _label_stats(value, dataset.labels[value], counts[:, j], ml_per_voxel)
        for j, value in enumerate(foreground)
    )
    intensities = tuple(
        IntensityStats.of(name, _concat(samples[c])) for c, name in enumerate(dataset.channels)
    )
    fingerprint = Fingerprint(
        str(dataset.root if root is None else root),
        dataset.layout,
        dataset.channels,
        dict(dataset.labels),
        geometry,
        intensities,
        label_stats,
    )
    log.info(
        "fingerprint: %d cases, median spacing %s mm",
        len(geometry),
        [round(s, 3) for s in fingerprint.median_spacing],
    )
    return fingerprint


def case_geometry(case: Case) -> CaseGeometry:
    """RAS shape and spacing of a case's first image, from its header when possible."""
    shape, affine = read_geometry(case.images[0])
    return CaseGeometry(case.name, ras_shape(shape, affine), ras_spacing(affine))


def nonzero_fraction(image: np.ndarray) -> float:
    """Voxels of the bounding box of `image`'s nonzero voxels (any channel) over all its voxels.

    Args:
        image: (C, X, Y, Z); an all-zero image gives 0.
    """
    if not image.any():
        return 0.0
    start, end = generate_spatial_bounding_box(image, select_fn=lambda x: x != 0)
    return float(np.prod(np.subtract(end, start)) / np.prod(image.shape[1:]))


def load_case(dataset: Dataset, case: Case) -> tuple[Volume, LabelMap | None]:
    """A case's image and label map, checked to have the declared channels and one grid shape.

    Raises:
        ImageError: an unreadable file.
        DatasetError: wrong channel count, or a label map whose shape differs from the image's.
    """
    image = load_volume(case.images)
    if image.array.shape[0] != len(dataset.channels):
        raise DatasetError(
            f"{case.images[0]}: has {image.array.shape[0]} channel(s), dataset.json declares "
            f"{len(dataset.channels)}; run `medseg check {dataset.root}`"
        )
    if case.label is None:
        return image, None
    labels = load_labels(case.label)
    if labels.array.shape != image.shape:
        raise DatasetError(
            f"{case.label}: label shape {labels.array.shape} differs from image shape "
            f"{image.shape}; run `medseg check {dataset.root}`"
        )
    return image, labels


def add_foreground_samples(
    samples: dict[int, list[np.ndarray]],
    image: Volume,
    labels: LabelMap | None,
    rng: np.random.Generator,
) -> None:
    """Append up to `SAMPLES_PER_CASE` foreground intensities per channel to `samples`.

    Args:
        samples: channel index -> list of 1D arrays, extended in place (only the channels
            present as keys are sampled).
        image: the case's image, (C, X, Y, Z).
        labels: its label map; None samples the whole image.
        rng: the sampling generator, shared across cases so a dataset samples reproducibly.
    """
    mask = labels.array > 0 if labels is not None else np.ones(image.shape, bool)
    for c, parts in samples.items():
        values = image.array[c][mask]
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        parts.append(values)


def sample_foreground(
    dataset: Dataset, channels: list[int], seed: int = 0, progress: bool = False
) -> dict[int, np.ndarray]:
    """Foreground (label > 0) intensities of `channels`, sampled across all cases of `dataset`.

    Returns:
        channel index -> 1D float32 array of sampled values.
    """
    rng = np.random.default_rng(seed)
    samples: dict[int, list[np.ndarray]] = {c: [] for c in channels}
    for case in _iterate(dataset.cases, progress, "sampling intensities"):
        image, labels = load_case(dataset, case)
        add_foreground_samples(samples, image, labels, rng)
    return {c: _concat(parts) for c, parts in samples.items()}


def label_counts(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Voxel count of each of `values` in an integer label array."""
    if not values:
        return np.zeros(0, dtype=np.int64)
    top = max(values)
    flat = labels.ravel()
    counts = np.bincount(flat[flat <= top], minlength=top + 1)
    return counts[values].astype(np.int64)


def save_fingerprint(fingerprint: Fingerprint, path: Path) -> None:
    """Write the fingerprint as JSON, atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(fingerprint.to_json(), indent=1))


def load_fingerprint(path: Path) -> Fingerprint:
    """Read a fingerprint written by `save_fingerprint`."""
    return Fingerprint.from_json(json.loads(Path(path).read_text()))


def _label_stats(value: int, name: str, counts: np.ndarray, ml_per_voxel: np.ndarray) -> LabelStats:
    present = counts > 0
    if not present.any():
        return LabelStats(value, name, 0.0, 0.0, 0.0)
    return LabelStats(
        value,
        name,
        float(present.mean()),
        float(np.median(counts[present])),
        float(np.median(counts[present] * ml_per_voxel[present])),
    )


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _iterate(items: Iterable[T], progress: bool, description: str) -> Iterator[T]:
    if not progress:
        yield from items
        return
    from rich.progress import track

    yield from track(list(items), description=description, transient=True)
