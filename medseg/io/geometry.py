"""Grid geometry: spacing along array and RAS axes, and one tolerance for "the same grid"."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from nibabel.orientations import io_orientation

GRID_TOLERANCE_MM = 0.1
"""Two grids are one when no voxel centre moves by more than this (a tenth of a typical voxel;
float32 headers and DICOM's decimal strings stay far below it). Every grid check uses it."""


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes (column norms of the affine)."""
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the R, A, S axes, once the array is reoriented to RAS."""
    out = [0.0, 0.0, 0.0]
    for spacing, (ras_axis, _) in zip(voxel_spacing(affine), io_orientation(affine), strict=True):
        out[int(ras_axis)] = spacing
    return tuple(out)  # type: ignore[return-value]


def ras_shape(shape: Sequence[int], affine: np.ndarray) -> tuple[int, int, int]:
    """Spatial shape (X, Y, Z) along the R, A, S axes, once the array is reoriented to RAS."""
    out = [0, 0, 0]
    for size, (ras_axis, _) in zip(shape[:3], io_orientation(affine), strict=True):
        out[int(ras_axis)] = int(size)
    return tuple(out)  # type: ignore[return-value]


def grid_offset_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance in mm between where two voxel-to-world affines put a voxel of `shape`.

    The maps are affine, so the largest distance over the grid is at one of its corners.
    """
    corners = np.array(list(itertools.product(*[(0, max(int(n) - 1, 0)) for n in shape[:3]])))
    points = np.c_[corners, np.ones(len(corners))] @ (np.asarray(affine_a) - affine_b).T
    return float(np.linalg.norm(points[:, :3], axis=1).max())


def same_grid(
    affine_a: np.ndarray, affine_b: np.ndarray, shape_a: Sequence[int], shape_b: Sequence[int]
) -> bool:
    """True when two grids have the same shape and every voxel centre agrees within
    `GRID_TOLERANCE_MM`."""
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        return False
    return grid_offset_mm(affine_a, affine_b, shape_a) <= GRID_TOLERANCE_MM
