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
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medseg.config import (
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
from medseg.memory_model import MemoryBudget, cache_gib, estimate_memory_gib, memory_budget
from medseg.preprocessing_plan import channel_scheme, network_axes

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
"""An axis of fewer median (resampled) voxels than this plans a 2D network sliced along it."""
NONZERO_MASK_FRACTION = 0.75
"""z-score over the nonzero region when the median case's nonzero bounding box holds less than
3/4 of the image (nnU-Net's `median_relative_size_after_cropping < 3/4`)."""
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
GPU_MAX_PATCH_VOXELS = 160**3
"""On GPU the patch is also capped in voxels, as on CPU. nnU-Net v2's plans for its 8 GB target
rarely exceed about 128^3 to 160^3 voxels in 3D; medseg's network has half of nnU-Net's filters,
so the same budget fits a larger patch, and the cap at the top of that range (4.1 M voxels)
keeps plans where nnU-Net's rules were tuned. A larger `--memory-gb` then buys batch size, not
an ever larger patch."""

PLANNED_KEYS = (
    "data.root",
    "data.spacing",
    "data.normalization",
    "data.nonzero_mask",
    "data.cache",
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
    slice_axis = choose_slice_axis(resampled_median_shape(fingerprint, spacing))
    shapes = resampled_shapes(fingerprint, spacing, slice_axis)
    axes = network_axes(slice_axis)
    median, in_plane = np.median(shapes, axis=0)[list(axes)], tuple(spacing[a] for a in axes)
    n_channels, n_classes = len(fingerprint.channels), len(fingerprint.labels)
    model = fit_network(median, in_plane, n_channels, n_classes, budget)
    if slice_axis is not None:
        model = dataclasses.replace(model, slice_axis=slice_axis)
    thick_3d_slices = is_anisotropic(spacing) and slice_axis is None
    augment = AugmentConfig(
        # mirroring slows convergence: measured -0.018 Dice after 10 epochs (docs/recipe.md),
        # more than a CPU budget can make up; GPU plans mirror as nnU-Net does
        flip_axes=flip_axes(fingerprint.labels.values(), axes) if budget.device == "cuda" else (),
        # out-of-plane rotation of thick slices interpolates across them; nnU-Net rotates
        # anisotropic data in-plane only, which AugmentConfig cannot express, so none
        rotate_degrees=0.0 if thick_3d_slices else AugmentConfig.rotate_degrees,
    )
    train = TrainConfig(
        folds=cross_validation_folds(len(fingerprint.cases)),
        batch_size=fit_batch(model, n_channels, n_classes, float(shapes.prod(1).sum()), budget),
        foreground_fraction=foreground_fraction(fingerprint, model, spacing),
        augment=augment,
    )
    cache = cache_gib(shapes, n_channels, n_classes)
    data = DataConfig(
        root=Path(fingerprint.dataset),
        spacing=spacing,
        normalization="auto",
        nonzero_mask=uses_nonzero_mask(fingerprint),
        cache="memory" if cache <= budget.cache_gigabytes else "disk",
    )
    return Config(data=data, model=model, train=train)


def uses_nonzero_mask(fingerprint: Fingerprint) -> bool:
    """Whether z-scored channels should be normalised over the nonzero region only: when some
    channel is z-scored and the median case's nonzero box is under `NONZERO_MASK_FRACTION`."""
    zscored = any(channel_scheme(c, "auto") == "zscore" for c in fingerprint.channels)
    fractions = [c.nonzero_fraction for c in fingerprint.cases]
    return zscored and float(np.median(fractions)) < NONZERO_MASK_FRACTION


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


def fit_batch(
    model: ModelConfig, in_channels: int, n_classes: int, total_voxels: float, budget: MemoryBudget
) -> int:
    """Largest batch that fits the budget, >= 2, covering <= 5% of the dataset's voxels.

    On CPU it is also capped at `CPU_MAX_BATCH` (measured slower per volume above).

    Args:
        total_voxels: the dataset's voxels after resampling.
    """
    fixed = estimate_memory_gib(model, in_channels, n_classes, 0, budget.device)
    per_sample = estimate_memory_gib(model, in_channels, n_classes, 1, budget.device) - fixed
    batch = int((budget.gigabytes - fixed) // per_sample)
    batch = min(batch, int(DATASET_BATCH_FRACTION * total_voxels // math.prod(model.patch_size)))
    if budget.device == "cpu":
        batch = min(batch, CPU_MAX_BATCH[model.spatial_dims])
    return max(MIN_BATCH, batch)


def flip_axes(label_names: Iterable[str], axes: Sequence[int]) -> tuple[int, ...]:
    """Mirror along every axis (nnU-Net) except those a label name is specific to.

    Mirroring x turns a left kidney into a right one; a label named for a side would then be
    taught on the wrong anatomy (TotalSegmentator trains without mirroring for this reason).

    Args:
        label_names: the dataset's label names.
        axes: the RAS axis of each network input axis (`network_axes`).

    Returns:
        Network input axes (indices into `axes`), as `train.augment.flip_axes` takes them.
    """
    words = {w for name in label_names for w in re.split(r"[^a-z]+", name.lower())}
    return tuple(i for i, a in enumerate(axes) if not DIRECTION_WORDS[a] & words)


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
    keys += ["model.slice_axis"] if cfg.model.spatial_dims == 2 else []
    keys += [f"{section}.device" for section in ("train", "infer") if cfg.train.device != "auto"]
    return keys


def summary(cfg: Config, fingerprint: Fingerprint, budget: MemoryBudget) -> str:
    """A few human-readable lines: spacing, 2D/3D, patch, batch, levels, normalisation, cache."""
    m, t = cfg.model, cfg.train
    memory = estimate_memory_gib(
        m, len(fingerprint.channels), len(fingerprint.labels), t.batch_size, budget.device
    )
    return "\n".join(
        [
            f"dataset        {fingerprint.dataset}: {len(fingerprint.cases)} case(s), "
            f"{len(fingerprint.channels)} channel(s), {len(fingerprint.labels) - 1} label(s)",
            f"spacing        {_spacing_line(cfg)}",
            f"network        {m.spatial_dims}D U-Net{_slices(m)}, {len(m.filters)} levels, "
            f"filters {list(m.filters)}",
            f"strides        {[list(level) for level in level_strides(m)]}",
            f"patch          {' x '.join(str(p) for p in m.patch_size)}",
            f"batch          {t.batch_size} (~{memory:.1f} of {budget.gigabytes:.1f} GiB on "
            f"{budget.device}; budget: {budget.source})",
            f"normalisation  {_normalisation_line(cfg, fingerprint)}",
            f"augmentation   flips on axes {list(t.augment.flip_axes)}, rotation "
            f"{t.augment.rotate_degrees:g} deg, foreground fraction {t.foreground_fraction}",
            f"cache          {_cache_line(cfg, fingerprint, budget)}",
        ]
    )


def _spacing_line(cfg: Config) -> str:
    spacing, m = cfg.data.spacing or (), cfg.model
    parts = [
        "own" if m.spatial_dims == 2 and a == m.slice_axis else f"{s:g}"
        for a, s in enumerate(spacing)
    ]
    anisotropic = " (anisotropic)" if spacing and is_anisotropic(spacing) else ""
    return f"{' x '.join(parts)} mm{anisotropic}"


def _slices(model: ModelConfig) -> str:
    names = {0: "sagittal", 1: "coronal", 2: "axial"}
    return f" on {names[model.slice_axis]} slices" if model.spatial_dims == 2 else ""


def _normalisation_line(cfg: Config, fingerprint: Fingerprint) -> str:
    schemes = [(c, channel_scheme(c, cfg.data.normalization)) for c in fingerprint.channels]
    masked = " over the nonzero region" if cfg.data.nonzero_mask else ""
    return ", ".join(f"{c}: {s}{masked if s == 'zscore' else ''}" for c, s in schemes)


def _cache_line(cfg: Config, fingerprint: Fingerprint, budget: MemoryBudget) -> str:
    """Where the preprocessed cases are kept and why, e.g. "disk in the run folder's cache/
    (estimated 73.2 > 12 GiB of RAM for it)"."""
    spacing = cfg.data.spacing or fingerprint.median_spacing
    keep = cfg.model.slice_axis if cfg.model.spatial_dims == 2 else None
    shapes = resampled_shapes(fingerprint, spacing, keep)
    size = cache_gib(shapes, len(fingerprint.channels), len(fingerprint.labels))
    folder = cfg.data.cache_dir or "the run folder's cache"
    where = f"disk in {folder}/" if cfg.data.cache == "disk" else cfg.data.cache
    ram = budget.cache_gigabytes
    if ram == math.inf:
        return f"{where} (estimated {size:.3g} GiB)"
    fits = f"{size:.3g} of {ram:.3g}" if size <= ram else f"{size:.3g} > {ram:.3g}"
    return f"{where} (estimated {fits} GiB of RAM for it)"


def _with_device(cfg: Config, device: str) -> Config:
    return replace(cfg, **{"train.device": device, "infer.device": device})
