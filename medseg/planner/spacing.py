"""Planning rules for the voxel grid: target spacing, anisotropy, resampled shapes, 2D or 3D.

docs/planning.md lists each rule with its nnU-Net source.
"""

from __future__ import annotations

import numpy as np

from medseg.fingerprint import Fingerprint
from medseg.planner.network import MIN_PATCH

ANISOTROPY_RATIO = 3.0
"""A dataset is anisotropic when its largest median spacing exceeds 3x the smallest (nnU-Net)."""
ANISOTROPIC_PERCENTILE = 10.0
"""Percentile of the low-resolution axis' spacings used as its target when anisotropic."""
MIN_3D_SLICES = MIN_PATCH
"""An axis of fewer median (resampled) voxels than this plans a 2D network sliced along it."""


def is_anisotropic(spacing: tuple[float, ...]) -> bool:
    """True when the largest spacing exceeds `ANISOTROPY_RATIO` times the smallest."""
    return max(spacing) > ANISOTROPY_RATIO * min(spacing)


def target_spacing(spacings: np.ndarray) -> tuple[float, float, float]:
    """Target spacing: the median per axis, except for anisotropic data (nnU-Net's rule).

    When the largest median spacing exceeds 3x the smallest, the low-resolution axis gets the
    10th percentile of its spacings instead of the median (finer, so fewer cases lose slices),
    but never below the next-largest median spacing.

    Args:
        spacings: (N, 3) per-case spacings in mm along x, y, z.
    """
    target = np.median(spacings, axis=0)
    if is_anisotropic(tuple(target)):
        axis = int(np.argmax(target))
        others = np.delete(target, axis)
        low = float(np.percentile(spacings[:, axis], ANISOTROPIC_PERCENTILE))
        target[axis] = max(low, float(others.max()))
    return tuple(round(float(s), 5) for s in target)  # type: ignore[return-value]


def resampled_median_shape(fingerprint: Fingerprint, spacing: tuple[float, ...]) -> np.ndarray:
    """Median shape (x, y, z) over cases after resampling to `spacing`, in (fractional) voxels."""
    return np.median(resampled_shapes(fingerprint, spacing), axis=0)


def resampled_shapes(
    fingerprint: Fingerprint, spacing: tuple[float, ...], keep_axis: int | None = None
) -> np.ndarray:
    """(N, 3) per-case shapes after resampling to `spacing`, in (fractional) voxels; the axis
    `keep_axis` (a 2D plan's slice axis) keeps each case's own spacing."""
    target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), fingerprint.spacings.shape)
    if keep_axis is not None:
        target = target.copy()
        target[:, keep_axis] = fingerprint.spacings[:, keep_axis]
    # rounded: header spacings such as 0.9999999 mm must not turn 16 slices into 15.99
    return np.round(fingerprint.shapes * fingerprint.spacings / target, 3)


def choose_slice_axis(median_shape: np.ndarray) -> int | None:
    """None (3D), or the axis a 2D network slices along: the thinnest axis of the median image
    when it has fewer than `MIN_3D_SLICES` voxels (z on a tie).

    A 3D patch needs >= 16 voxels along an axis to pool it twice down to a 4-voxel feature map;
    thinner images are segmented slice by slice along that axis (nnU-Net slices along its first
    axis after transposing, the coarsest one), so a single coronal slice is not padded to 16.
    """
    thinnest = 2 - int(np.argmin(median_shape[::-1]))  # argmin from z backwards: ties go to z
    return thinnest if median_shape[thinnest] < MIN_3D_SLICES else None
