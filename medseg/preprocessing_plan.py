"""The preprocessing plan a run needs: target spacing, slice axis and per-channel normalisation.

A `Plan` is computed once from the training cases and saved in the run folder, so that
prediction preprocesses new scans exactly as the training data was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.datasets import Dataset
from medseg.fingerprint import IntensityStats, case_geometry, sample_foreground
from medseg.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelNorm:
    """How one input channel is normalised.

    Attributes:
        scheme: "zscore" (per image), "ct" (clip to dataset foreground percentiles, then
            subtract the dataset foreground mean and divide by its std) or "none".
        lower, upper, mean, std: dataset statistics used by the "ct" scheme.
        nonzero_mask: "zscore" only: mean and std of the image's nonzero region, and 0 outside
            it (`data.nonzero_mask`; False in plans written before it existed).
    """

    scheme: str
    lower: float = 0.0
    upper: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    nonzero_mask: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything about the data that training fixed and prediction must reproduce.

    Attributes:
        spacing: target voxel spacing in mm along the RAS-oriented axes (x, y, z).
        channels: input channel names.
        labels: label value -> name, background included.
        normalization: one `ChannelNorm` per channel.
        layout: dataset layout the model was trained on ("msd" or "nnunet").
        slice_axis: 2D models: the RAS axis they slice along, which keeps each case's own
            spacing (its `spacing` entry is not used) and is moved last by the reorientation.
            None: 3D models, and 2D runs made before it existed (resampled along all three
            axes, sliced along z).
    """

    spacing: tuple[float, float, float]
    channels: tuple[str, ...]
    labels: dict[int, str]
    normalization: tuple[ChannelNorm, ...]
    layout: str = "msd"
    slice_axis: int | None = None

    @property
    def target_spacing(self) -> tuple[float | None, ...]:
        """Per RAS axis, the spacing cases are resampled to; None where each keeps its own."""
        return tuple(None if a == self.slice_axis else s for a, s in enumerate(self.spacing))

    @property
    def array_axes(self) -> tuple[int, ...]:
        """The RAS axis of each axis of a preprocessed array: 2D plans put their slice axis
        last (coronal slices: x, z, y), so slice-wise code always slices along the last axis."""
        if self.slice_axis is None:
            return (0, 1, 2)
        return (*network_axes(self.slice_axis), self.slice_axis)

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON (label keys as strings)."""
        raw = asdict(self)
        raw["labels"] = {str(k): v for k, v in self.labels.items()}
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Plan:
        """Inverse of `to_json`."""
        return cls(
            spacing=tuple(float(s) for s in raw["spacing"]),  # type: ignore[arg-type]
            channels=tuple(raw["channels"]),
            labels={int(k): str(v) for k, v in raw["labels"].items()},
            normalization=tuple(ChannelNorm(**n) for n in raw["normalization"]),
            layout=raw.get("layout", "msd"),
            slice_axis=raw.get("slice_axis"),
        )


def network_axes(slice_axis: int | None) -> tuple[int, ...]:
    """The RAS axes of a network's input in order: all three in 3D (`slice_axis` None), else
    the two in-plane axes of the slices."""
    return tuple(a for a in range(3) if a != slice_axis)


def make_plan(dataset: Dataset, cfg: Config) -> Plan:
    """Compute the plan for `dataset` (spacing from headers; CT statistics from voxels)."""
    spacing = cfg.data.spacing or median_spacing(dataset)
    schemes = [channel_scheme(name, cfg.data.normalization) for name in dataset.channels]
    stats: dict[int, ChannelNorm] = {}
    ct_channels = [i for i, s in enumerate(schemes) if s == "ct"]
    if ct_channels:
        stats = foreground_statistics(dataset, ct_channels)
    masked = cfg.data.nonzero_mask
    norms = tuple(
        stats.get(i, ChannelNorm(scheme, nonzero_mask=masked and scheme == "zscore"))
        for i, scheme in enumerate(schemes)
    )
    slice_axis = cfg.model.slice_axis if cfg.model.spatial_dims == 2 else None
    plan = Plan(
        tuple(spacing), dataset.channels, dict(dataset.labels), norms, dataset.layout, slice_axis
    )
    log.info(
        "plan: spacing %s, normalisation %s%s",
        plan.target_spacing,
        [n.scheme + " (nonzero region)" * n.nonzero_mask for n in norms],
        "" if slice_axis is None else f", slices along RAS axis {slice_axis}",
    )
    return plan


def channel_scheme(channel_name: str, setting: str) -> str:
    """Normalisation scheme for a channel: `setting` unless it is "auto" (CT -> "ct")."""
    if setting != "auto":
        return setting
    return "ct" if channel_name.strip().upper() == "CT" else "zscore"


def median_spacing(dataset: Dataset) -> tuple[float, float, float]:
    """Median voxel spacing over all cases, per RAS axis, read from image headers."""
    spacings = np.array([case_geometry(case).spacing for case in dataset.cases])
    return tuple(float(s) for s in np.median(spacings, axis=0))  # type: ignore[return-value]


def foreground_statistics(
    dataset: Dataset, channels: list[int], seed: int = 0
) -> dict[int, ChannelNorm]:
    """CT-style statistics of foreground (label > 0) intensities, sampled across all cases."""
    samples = sample_foreground(dataset, channels, seed)
    return {c: ct_norm(IntensityStats.of(dataset.channels[c], v)) for c, v in samples.items()}


def ct_norm(stats: IntensityStats) -> ChannelNorm:
    """The "ct" scheme from foreground statistics: clip to the 0.5-99.5 percentiles, standardise."""
    return ChannelNorm("ct", stats.lower, stats.upper, stats.mean, stats.std or 1.0)


def save_plan(plan: Plan, path: Path) -> None:
    """Write the plan as JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(plan.to_json(), indent=2))


def load_plan(path: Path) -> Plan:
    """Read a plan written by `save_plan`."""
    return Plan.from_json(json.loads(Path(path).read_text()))
