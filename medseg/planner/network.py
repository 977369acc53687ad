"""Planning rules for the network: per-axis strides (depth), filters, and the patch fitted to the
memory budget and the CPU or GPU voxel cap.

docs/planning.md lists each rule with its nnU-Net source or the measurement behind it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from medseg.config import ConfigError, ModelConfig, downsampling_factors
from medseg.memory_model import MemoryBudget, estimate_memory_gib

MIN_FEATURE_MAP = 4
"""An axis is pooled only while its feature map stays >= 4 voxels (nnU-Net)."""
MIN_PATCH = 4 * MIN_FEATURE_MAP
"""Smallest patch edge: room for two 2x poolings down to a 4-voxel map."""
MAX_LEVELS = {2: 7, 3: 6}
"""U-Net levels at most (6 = 5 poolings in 3D; 7 in 2D, as nnU-Net for 256-512 px slices)."""
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}
"""Starting patch volume before clipping to the median shape (nnU-Net v2)."""
BASE_FILTERS, MAX_FILTERS = 16, 256
"""Filters double per level from ModelConfig's default 16, capped (nnU-Net: 32 and 320 on GPU)."""
DEEP_SUPERVISION_HEADS = 2
"""Extra low-resolution outputs trained (docs/recipe.md: +0.003 Dice on hippocampus, same cost)."""
HEADS_GRID_MIN_CLASSES = 16
"""From this many classes (background included), deep-supervision losses are computed on each
head's own grid (nnU-Net) instead of the full one: hippocampus network steps on 2 CPU cores
(`scripts/bench_step.py --classes K model.deep_supervision_grid=G`, two runs each): 3 classes
no measurable difference, 16 about -15%, 32 about -14%, 118 -36% (520 -> 333 ms); the full grid
scored 0.885 against 0.883 on hippocampus (docs/recipe.md)."""
MIN_BATCH = 2
"""Smallest batch planned; the network is fitted so that this batch fits the budget."""
CPU_MAX_PATCH_VOXELS = 96 * 96 * 64
"""On CPU the patch is also capped in voxels: memory is rarely the limit there, time is. The
BraTS plan fitted to memory alone (128x160x96, 6 levels) takes 27.6 s per training step of
batch 2 on the project's 2 cores, so a 10-minute budget got one step; capped (96x96x64) it
takes 7.0 s (`scripts/bench_step.py --config configs/brats_subset.yaml --classes 2`)."""
CPU_MAX_IMAGE_FRACTION = 0.4
"""On CPU, when the whole median image fits under `CPU_MAX_PATCH_VOXELS`, the 3D patch holds at
most 40% of it (the network keeps the depth planned for the image): random patches smaller than
the image give more updates per CPU-minute and vary the context. Hippocampus (median
35x50x36): 24x40x24 (37%) gave 0.885 validation Dice in 15 minutes, 32x48x32 (78%) 0.882
(docs/recipe.md). Larger images are already cut to small patches by the voxel cap."""
CPU_MIN_BOTTLENECK = 3
"""Shrinking a patch to `CPU_MAX_IMAGE_FRACTION` keeps >= 3 voxels per axis at the lowest level."""
GPU_MAX_PATCH_VOXELS = 160**3
"""On GPU the patch is also capped in voxels, as on CPU. nnU-Net v2's plans for its 8 GB target
rarely exceed about 128^3 to 160^3 voxels in 3D; medseg's network has half of nnU-Net's filters,
so the same budget fits a larger patch, and the cap at the top of that range (4.1 M voxels)
keeps plans where nnU-Net's rules were tuned. A larger `--memory-gb` then buys batch size, not
an ever larger patch."""


def pool_strides(patch: tuple[int, ...], spacing: tuple[float, ...]) -> list[list[int]]:
    """Per-level, per-axis strides for a patch (nnU-Net v2's get_pool_and_conv_props).

    At each level the axes whose feature map stays >= `MIN_FEATURE_MAP` voxels and whose current
    spacing is less than twice the finest one are pooled (stride 2): a coarse axis of
    anisotropic data waits until pooling has made the others comparable. A lone axis pools only
    while it has >= 3x `MIN_FEATURE_MAP` voxels. At most `MAX_LEVELS` levels.
    """
    dims = len(patch)
    size, current = [float(p) for p in patch], [float(s) for s in spacing]
    strides = [[1] * dims]
    while len(strides) < MAX_LEVELS[dims]:
        poolable = [a for a in range(dims) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not poolable:
            break
        finest = min(current[a] for a in poolable)
        axes = [a for a in poolable if current[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * MIN_FEATURE_MAP:
            break
        strides.append([2 if a in axes else 1 for a in range(dims)])
        for a in axes:
            size[a] /= 2
            current[a] *= 2
    return strides


def filters_for(levels: int) -> tuple[int, ...]:
    """Filters per level: 16, 32, 64, ... capped at 256."""
    return tuple(min(BASE_FILTERS * 2**level, MAX_FILTERS) for level in range(levels))


def network_for(
    patch: tuple[int, ...], spacing: tuple[float, ...], round_down: bool = False, n_classes: int = 2
) -> ModelConfig:
    """U-Net for a patch: strides from `pool_strides`, patch rounded to their multiples.

    Rounded up (nnU-Net), or down with ``round_down``: the CPU plan, where every padded voxel
    costs compute that a small budget cannot spare (docs/recipe.md: the median-sized patch
    rounded down gave more Dice per CPU-minute than rounded up). Down never goes below the
    4-voxel feature map that `pool_strides` guarantees.
    """
    strides = pool_strides(patch, spacing)
    factors = [math.prod(level[a] for level in strides) for a in range(len(patch))]
    rounding = math.floor if round_down else math.ceil
    rounded = tuple(rounding(p / f) * f for p, f in zip(patch, factors, strict=True))
    return ModelConfig(
        spatial_dims=len(patch),
        filters=filters_for(len(strides)),
        patch_size=rounded,
        strides=tuple(tuple(level) for level in strides),
        deep_supervision=min(DEEP_SUPERVISION_HEADS, len(strides) - 2),
        deep_supervision_grid="heads" if n_classes >= HEADS_GRID_MIN_CLASSES else "full",
    )


def initial_patch(median_shape: np.ndarray, spacing: tuple[float, ...]) -> tuple[int, ...]:
    """The median shape, clipped to nnU-Net's starting box (256^3 voxels, aspect ~ 1/spacing)."""
    dims = len(spacing)
    inverse = 1 / np.asarray(spacing)
    box = inverse * (INITIAL_PATCH_VOXELS[dims] / np.prod(inverse)) ** (1 / dims)
    patch = np.minimum(np.round(box), np.round(median_shape))
    return tuple(max(MIN_PATCH, int(p)) for p in patch)


def fit_network(
    median_shape: np.ndarray,
    spacing: tuple[float, ...],
    in_channels: int,
    n_classes: int,
    budget: MemoryBudget,
) -> ModelConfig:
    """The largest network, from the median shape down, whose batch of `MIN_BATCH` fits the budget.

    The patch must also hold at most `CPU_MAX_PATCH_VOXELS` on CPU, `GPU_MAX_PATCH_VOXELS` on
    GPU. While either fails, the axis with the largest patch-to-median ratio shrinks by its
    downsampling factor and the strides are re-planned (nnU-Net v2). A CPU plan for small 3D
    images then shrinks the patch further (`shrink_to_image_fraction`).

    Raises:
        ConfigError: even the smallest patch (16 voxels per axis) does not fit.
    """
    cpu = budget.device == "cpu"
    max_voxels = CPU_MAX_PATCH_VOXELS if cpu else GPU_MAX_PATCH_VOXELS
    model = network_for(initial_patch(median_shape, spacing), spacing, cpu, n_classes)
    while (
        estimate_memory_gib(model, in_channels, n_classes, MIN_BATCH, budget.device)
        > budget.gigabytes
        or math.prod(model.patch_size) > max_voxels
    ):
        patch = np.array(model.patch_size)
        factors = np.array(downsampling_factors(model))
        axis = _axis_to_shrink(patch, factors, median_shape, np.full_like(patch, MIN_PATCH))
        if axis is None:
            need = estimate_memory_gib(model, in_channels, n_classes, MIN_BATCH, budget.device)
            raise ConfigError(
                f"--memory-gb {budget.gigabytes:g} is too small: the smallest network "
                f"(patch {list(model.patch_size)}, batch {MIN_BATCH}) needs ~{need:.1f} GiB"
            )
        patch[axis] -= factors[axis]
        model = network_for(tuple(int(p) for p in patch), spacing, cpu, n_classes)
    if cpu and len(median_shape) == 3 and np.prod(median_shape) <= CPU_MAX_PATCH_VOXELS:
        model = shrink_to_image_fraction(model, median_shape)
    return model


def shrink_to_image_fraction(model: ModelConfig, median_shape: np.ndarray) -> ModelConfig:
    """The same network with a patch of at most `CPU_MAX_IMAGE_FRACTION` of the median image.

    The axis with the largest patch-to-median ratio shrinks by its downsampling factor while
    the lowest level keeps `CPU_MIN_BOTTLENECK` voxels.
    """
    limit = CPU_MAX_IMAGE_FRACTION * float(np.prod(median_shape))
    patch = np.array(model.patch_size)
    factors = np.array(downsampling_factors(model))
    while np.prod(patch) > limit:
        axis = _axis_to_shrink(patch, factors, median_shape, CPU_MIN_BOTTLENECK * factors)
        if axis is None:
            break
        patch[axis] -= factors[axis]
    return dataclasses.replace(model, patch_size=tuple(int(p) for p in patch))


def _axis_to_shrink(
    patch: np.ndarray, factors: np.ndarray, median_shape: np.ndarray, floor: np.ndarray
) -> int | None:
    """The axis with the largest patch-to-median ratio that can lose its downsampling factor
    and stay >= `floor`; None when none can (nnU-Net v2's shrinking order)."""
    ratio = np.where(patch - factors >= floor, patch / median_shape, -np.inf)
    return int(np.argmax(ratio)) if np.isfinite(ratio).any() else None
