"""Self-configuring planning (nnU-Net's experiment planner): a dataset fingerprint -> a Config.

`plan_dataset(root)` fingerprints a dataset and returns a complete, validated `Config`: target
spacing, 2D or 3D, patch size, network depth with per-axis strides, filters, batch size fitted
to a memory budget, normalisation and augmentation. Optimiser, learning rate, schedule and epochs
stay at the `TrainConfig` defaults. docs/planning.md lists every rule with its nnU-Net source.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.config import (
    DEVICES,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    downsampling_factors,
    level_strides,
    replace,
    save_config,
)
from medseg.datasets import load_dataset
from medseg.fingerprint import Fingerprint, compute_fingerprint, save_fingerprint
from medseg.preprocessing_plan import channel_scheme

log = logging.getLogger(__name__)

ANISOTROPY_RATIO = 3.0
"""A dataset is anisotropic when its largest median spacing exceeds 3x the smallest (nnU-Net)."""
ANISOTROPIC_PERCENTILE = 10.0
"""Percentile of the low-resolution axis' spacings used as its target when anisotropic."""
MIN_FEATURE_MAP = 4
"""An axis is pooled only while its feature map stays >= 4 voxels (nnU-Net)."""
MIN_PATCH = 4 * MIN_FEATURE_MAP
"""Smallest patch edge: room for two 2x poolings down to a 4-voxel map."""
MIN_3D_SLICES = MIN_PATCH
"""Fewer median (resampled) axial slices than this plans a 2D network."""
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
DEFAULT_FOLDS = 5
MIN_BATCH = 2
DATASET_BATCH_FRACTION = 0.05
"""One batch covers at most 5% of the dataset's voxels (nnU-Net)."""
CPU_MAX_BATCH = {2: 16, 3: 2}
"""On CPU, throughput per volume does not grow with the 3D batch (4.00 vs 4.16 volumes/s for
batch 2 vs 4), so the smallest batch gives the most updates per CPU-minute: +0.003 validation
Dice in a 15-minute hippocampus budget (docs/recipe.md). 16 slices is the 2D batch of
configs/hippocampus_2d.yaml."""
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
CPU_MEMORY_FRACTION = 0.25
"""Default CPU budget: a quarter of system RAM (the rest holds the cached dataset and others)."""
GIB = 2**30

# Memory model, calibrated once with `nice -n 19 python scripts/calibrate_memory.py` (torch
# 2.13 CPU): two training steps of medseg's DynUNet (DiceCE, AdamW, fp32) on 7 configurations
# (3D 32^3 to 96x96x64, anisotropic strides, 2D 256^2, 2 to 118 classes, batch 1 to 4); the
# peak RSS increase less gradients and AdamW moments fits 4 bytes x batch x (13.9 x
# sum over levels of filters x voxels + 5.2 x classes x patch voxels). With the rounded
# factors below, every configuration of 0.4 GiB or more is within 13% (the 0.12 GiB one is 36%
# under; OVERHEAD_GIB absorbs that). A hippocampus run (patch 32x48x32, batch 4) peaked
# at 1.0 GB with its cached dataset and validation; this model gives 0.75 GiB for training.
FEATURE_FACTOR = 14.0
OUTPUT_FACTOR = 5.5
BYTES_PER_ELEMENT = {"cpu": 4, "cuda": 2}
"""fp32 activations on CPU; fp16 under AMP on CUDA (an approximation: norms keep fp32)."""
OVERHEAD_GIB = {"cpu": 0.5, "cuda": 1.0}
"""Memory besides the network's: the Python/torch/MONAI process on CPU (0.35 GiB measured with
the model code imported; training imports more), the CUDA context and cuDNN workspace on GPU
(assumed, not measured: no GPU was available for the calibration)."""
BYTES_PER_PARAMETER = 16
"""fp32 weight, gradient and AdamW's two moments."""

PLANNED_KEYS = (
    "data.root",
    "data.spacing",
    "data.normalization",
    "model.name",
    "model.spatial_dims",
    "model.filters",
    "model.patch_size",
    "model.strides",
    "model.deep_supervision",
    "model.deep_supervision_grid",
    "train.folds",
    "train.batch_size",
    "train.foreground_fraction",
    "train.augment",
)
"""Config keys `medseg plan` writes; the others keep their defaults (see `planned_keys`)."""

DIRECTION_WORDS = {
    0: {"left", "right"},
    1: {"anterior", "posterior", "ventral", "dorsal"},
    2: {"superior", "inferior", "upper", "lower", "cranial", "caudal"},
}
"""Label-name words tied to one RAS axis; mirroring along that axis would contradict them."""


@dataclass(frozen=True)
class MemoryBudget:
    """The memory a training run may use.

    Attributes:
        device: "cpu" or "cuda" (resolved, never "auto").
        gigabytes: the budget in GiB (2^30 bytes).
        source: where the number came from, for the summary.
    """

    device: str
    gigabytes: float
    source: str


def memory_budget(memory_gb: float | None = None, device: str = "auto") -> MemoryBudget:
    """The training memory budget: `memory_gb`, else the GPU's memory or a share of system RAM.

    Args:
        memory_gb: budget in GiB; None = all of the GPU's memory on CUDA, else
            `CPU_MEMORY_FRACTION` of system RAM.
        device: auto (CUDA when available), cpu or cuda.

    Raises:
        ConfigError: unknown device, cuda without a GPU, or a non-positive budget.
    """
    import torch

    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {sorted(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available; use --device cpu or auto")
    if memory_gb is not None and not memory_gb > 0:
        raise ConfigError(f"--memory-gb must be > 0, got {memory_gb}")
    resolved = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    if memory_gb is not None:
        return MemoryBudget(resolved, float(memory_gb), "--memory-gb")
    if resolved == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        return MemoryBudget(resolved, total, "GPU total memory")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return MemoryBudget(
        resolved, ram * CPU_MEMORY_FRACTION, f"{CPU_MEMORY_FRACTION:.0%} of {ram:.0f} GiB RAM"
    )


def plan_dataset(
    root: Path | str, memory_gb: float | None = None, device: str = "auto", progress: bool = False
) -> tuple[Config, Fingerprint]:
    """Fingerprint the dataset in `root` and plan a complete training config for it.

    Args:
        root: dataset folder holding dataset.json; recorded as given in ``data.root``.
        memory_gb: training memory budget in GiB (see `memory_budget`).
        device: auto, cpu or cuda: the device the budget and batch size are planned for.
        progress: show a progress bar while reading the cases.

    Raises:
        DatasetError, ImageError: a malformed dataset or unreadable case.
        ConfigError: a bad device or a budget too small for any network.
    """
    budget = memory_budget(memory_gb, device)
    fingerprint = compute_fingerprint(load_dataset(root), root=root, progress=progress)
    cfg = plan_config(fingerprint, budget)
    if device != "auto":
        cfg = _with_device(cfg, device)
    m = cfg.model
    log.info(
        "plan: %dD, patch %s, %d levels, batch %d (%s, %.1f GiB)",
        m.spatial_dims,
        list(m.patch_size),
        len(m.filters),
        cfg.train.batch_size,
        budget.device,
        budget.gigabytes,
    )
    return cfg, fingerprint


def plan_config(fingerprint: Fingerprint, budget: MemoryBudget) -> Config:
    """The planned config for a fingerprint (pure: no file access)."""
    spacing = target_spacing(fingerprint.spacings)
    median = resampled_median_shape(fingerprint, spacing)
    dims = choose_spatial_dims(median)
    model = fit_network(
        median[:dims], spacing[:dims], len(fingerprint.channels), len(fingerprint.labels), budget
    )
    batch = fit_batch(model, fingerprint, spacing, budget)
    anisotropic = is_anisotropic(spacing)
    augment = AugmentConfig(
        # mirroring slows convergence: measured -0.018 Dice after 10 epochs (docs/recipe.md),
        # more than a CPU budget can make up; GPU plans mirror as nnU-Net does
        flip_axes=flip_axes(fingerprint.labels.values(), dims) if budget.device == "cuda" else (),
        # out-of-plane rotation of thick slices interpolates across them; nnU-Net rotates
        # anisotropic data in-plane only, which AugmentConfig cannot express, so none
        rotate_degrees=0.0 if anisotropic and dims == 3 else AugmentConfig.rotate_degrees,
    )
    train = TrainConfig(
        folds=cross_validation_folds(len(fingerprint.cases)),
        batch_size=batch,
        foreground_fraction=foreground_fraction(fingerprint, model, spacing),
        augment=augment,
    )
    data = DataConfig(root=Path(fingerprint.dataset), spacing=spacing, normalization="auto")
    return Config(data=data, model=model, train=train)


def cross_validation_folds(n_cases: int) -> int:
    """5 folds (nnU-Net) when there are enough cases; fewer for tiny datasets, and 1 (train and
    validate on the single case) when there is only one."""
    return max(1, min(DEFAULT_FOLDS, n_cases))


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
    sizes_mm = fingerprint.shapes * fingerprint.spacings
    # rounded: header spacings such as 0.9999999 mm must not turn 16 slices into 15.99
    return np.round(np.median(sizes_mm / np.asarray(spacing), axis=0), 3)


def choose_spatial_dims(median_shape: np.ndarray) -> int:
    """3D, unless the median image has fewer than `MIN_3D_SLICES` axial slices (z).

    A 3D patch needs >= 16 voxels along an axis to pool it twice down to a 4-voxel feature map;
    thinner stacks are segmented slice by slice (medseg's 2D networks run on axial x-y slices).
    Thin x or y extents (rare) keep 3D and are padded to 16.
    """
    return 2 if median_shape[2] < MIN_3D_SLICES else 3


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

    On CPU the patch must also hold at most `CPU_MAX_PATCH_VOXELS`. While either fails, the
    axis with the largest patch-to-median ratio shrinks by its downsampling factor and the
    strides are re-planned (nnU-Net v2). A CPU plan for small 3D images then shrinks the patch
    further (`shrink_to_image_fraction`).

    Raises:
        ConfigError: even the smallest patch (16 voxels per axis) does not fit.
    """
    cpu = budget.device == "cpu"
    model = network_for(initial_patch(median_shape, spacing), spacing, cpu, n_classes)
    while estimate_memory_gib(model, in_channels, n_classes, MIN_BATCH, budget.device) > (
        budget.gigabytes
    ) or (cpu and math.prod(model.patch_size) > CPU_MAX_PATCH_VOXELS):
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


def fit_batch(
    model: ModelConfig, fingerprint: Fingerprint, spacing: tuple[float, ...], budget: MemoryBudget
) -> int:
    """Largest batch that fits the budget, >= 2, covering <= 5% of the dataset's voxels.

    On CPU it is also capped at `CPU_MAX_BATCH` (measured slower per volume above).
    """
    in_channels, n_classes = len(fingerprint.channels), len(fingerprint.labels)
    fixed = estimate_memory_gib(model, in_channels, n_classes, 0, budget.device)
    per_sample = estimate_memory_gib(model, in_channels, n_classes, 1, budget.device) - fixed
    batch = int((budget.gigabytes - fixed) // per_sample)
    total_voxels = float(np.sum(np.prod(fingerprint.shapes * fingerprint.spacings / spacing, 1)))
    batch = min(batch, int(DATASET_BATCH_FRACTION * total_voxels // math.prod(model.patch_size)))
    if budget.device == "cpu":
        batch = min(batch, CPU_MAX_BATCH[model.spatial_dims])
    return max(MIN_BATCH, batch)


def estimate_memory_gib(
    model: ModelConfig, in_channels: int, n_classes: int, batch: int, device: str
) -> float:
    """Estimated peak training memory in GiB: activations, parameters with AdamW state, overhead.

    See the calibration note at `FEATURE_FACTOR`; ``device`` is "cpu" (fp32) or "cuda" (AMP).
    """
    features, outputs = activation_elements(model, n_classes)
    activations = FEATURE_FACTOR * features + OUTPUT_FACTOR * outputs
    total = batch * BYTES_PER_ELEMENT[device] * activations
    total += BYTES_PER_PARAMETER * parameter_count(model, in_channels, n_classes)
    return total / GIB + OVERHEAD_GIB[device]


def activation_elements(model: ModelConfig, n_classes: int) -> tuple[int, int]:
    """Per sample: sum over levels of filters x voxels, and classes x the voxels of the outputs
    the loss sees: the patch, plus each deep-supervision head at the full grid or its own."""
    size = list(model.patch_size)
    features, grids = 0, []
    for filters, level in zip(model.filters, level_strides(model), strict=True):
        size = [s // k for s, k in zip(size, level, strict=True)]
        features += filters * math.prod(size)
        grids.append(math.prod(size))
    heads = grids[1 : 1 + model.deep_supervision]
    if model.deep_supervision_grid == "full":
        heads = [grids[0]] * len(heads)
    return features, n_classes * (grids[0] + sum(heads))


def parameter_count(model: ModelConfig, in_channels: int, n_classes: int) -> int:
    """Approximate DynUNet parameters: two convolutions per encoder level, an up-convolution
    and two convolutions (on the concatenated skip) per decoder level, a 1x1 output head."""
    kernel = 3**model.spatial_dims
    up = 2**model.spatial_dims
    f = list(model.filters)
    count = n_classes * f[0]
    for level, filters in enumerate(f):
        previous = in_channels if level == 0 else f[level - 1]
        count += kernel * (previous * filters + filters * filters)
        if level < len(f) - 1:
            count += up * f[level + 1] * filters + kernel * 3 * filters * filters
    return count


def flip_axes(label_names: Iterable[str], spatial_dims: int) -> tuple[int, ...]:
    """Mirror along every axis (nnU-Net) except those a label name is specific to.

    Mirroring x turns a left kidney into a right one; a label named for a side would then be
    taught on the wrong anatomy (TotalSegmentator trains without mirroring for this reason).
    """
    words = {w for name in label_names for w in re.split(r"[^a-z]+", name.lower())}
    return tuple(a for a in range(spatial_dims) if not DIRECTION_WORDS[a] & words)


def foreground_fraction(
    fingerprint: Fingerprint, model: ModelConfig, spacing: tuple[float, ...]
) -> float:
    """0.5 when some label is small (median < 1% of the patch volume), else nnU-Net's 0.33.

    Random patches rarely hit small structures, so they are oversampled more.
    """
    patch_ml = math.prod(model.patch_size) * math.prod(spacing) / 1000.0  # 2D: one slice
    sizes = [s.median_ml for s in fingerprint.label_stats if s.case_fraction > 0]
    small = not sizes or min(sizes) < 0.01 * patch_ml
    return 0.5 if small else 0.33


def write_planned_config(
    cfg: Config, fingerprint: Fingerprint, path: Path, budget: MemoryBudget | None = None
) -> Path:
    """Write the config to `path` with a header comment and the fingerprint beside it.

    Args:
        cfg: the planned config.
        fingerprint: the fingerprint it was planned from.
        path: the YAML file, ``NAME.yaml``.
        budget: the memory budget it was planned for, named in the header.

    Returns:
        The fingerprint file, ``NAME.fingerprint.json`` next to ``NAME.yaml``.
    """
    path = Path(path)
    fingerprint_path = path.with_name(f"{path.stem}.fingerprint.json")
    save_fingerprint(fingerprint, fingerprint_path)
    n = len(fingerprint.cases)
    target = f"{budget.device}, {budget.gigabytes:.1f} GiB ({budget.source})" if budget else "-"
    comment = (
        f"Planned by `medseg plan` from {fingerprint.dataset} ({n} case{'s' * (n != 1)}).\n"
        f"Planned for: {target}.\n"
        f"Dataset fingerprint: {fingerprint_path.name} (next to this file).\n"
        "Paths are relative to the directory you run medseg from. Keys not listed (optimizer,\n"
        "lr, schedule, epochs, ...) take the defaults of medseg/config.py."
    )
    save_config(cfg, path, comment=comment, only=planned_keys(cfg))
    return fingerprint_path


def planned_keys(cfg: Config) -> list[str]:
    """The dotted config keys the planner decides (the rest stay at their defaults)."""
    keys = [*PLANNED_KEYS]
    keys += [f"{section}.device" for section in ("train", "infer") if cfg.train.device != "auto"]
    return keys


def summary(cfg: Config, fingerprint: Fingerprint, budget: MemoryBudget) -> str:
    """A few human-readable lines: spacing, 2D/3D, patch, batch, levels, normalisation."""
    m, t = cfg.model, cfg.train
    norms = [f"{c}: {channel_scheme(c, cfg.data.normalization)}" for c in fingerprint.channels]
    memory = estimate_memory_gib(
        m, len(fingerprint.channels), len(fingerprint.labels), t.batch_size, budget.device
    )
    spacing = cfg.data.spacing or ()
    return "\n".join(
        [
            f"dataset        {fingerprint.dataset}: {len(fingerprint.cases)} case(s), "
            f"{len(fingerprint.channels)} channel(s), {len(fingerprint.labels) - 1} label(s)",
            f"spacing        {' x '.join(f'{s:g}' for s in spacing)} mm"
            + (" (anisotropic)" if is_anisotropic(spacing) else ""),
            f"network        {m.spatial_dims}D U-Net, {len(m.filters)} levels, "
            f"filters {list(m.filters)}",
            f"strides        {[list(level) for level in level_strides(m)]}",
            f"patch          {' x '.join(str(p) for p in m.patch_size)}",
            f"batch          {t.batch_size} (~{memory:.1f} of {budget.gigabytes:.1f} GiB on "
            f"{budget.device}; budget: {budget.source})",
            f"normalisation  {', '.join(norms)}",
            f"augmentation   flips on axes {list(t.augment.flip_axes)}, rotation "
            f"{t.augment.rotate_degrees:g} deg, foreground fraction {t.foreground_fraction}",
        ]
    )


def _with_device(cfg: Config, device: str) -> Config:
    return replace(cfg, **{"train.device": device, "infer.device": device})
