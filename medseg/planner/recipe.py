"""Planning rules for training: folds, batch size, mirroring axes, foreground oversampling and
normalisation over the nonzero region.

docs/planning.md lists each rule with its nnU-Net source; docs/recipe.md the CPU measurements.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

from medseg.config import ModelConfig
from medseg.fingerprint import Fingerprint
from medseg.memory_model import MemoryBudget, estimate_memory_gib
from medseg.planner.network import MIN_BATCH
from medseg.preprocessing_plan import channel_scheme

NONZERO_MASK_FRACTION = 0.75
"""z-score over the nonzero region when the median case's nonzero bounding box holds less than
3/4 of the image (nnU-Net's `median_relative_size_after_cropping < 3/4`)."""
DEFAULT_FOLDS = 5
"""Cross-validation folds when the dataset has at least that many cases (nnU-Net)."""
DATASET_BATCH_FRACTION = 0.05
"""One batch covers at most 5% of the dataset's voxels (nnU-Net)."""
CPU_MAX_BATCH = {2: 16, 3: 2}
"""On CPU, throughput per volume does not grow with the 3D batch (4.00 vs 4.16 volumes/s for
batch 2 vs 4), so the smallest batch gives the most updates per CPU-minute: +0.003 validation
Dice in a 15-minute hippocampus budget (docs/recipe.md). 16 slices is the 2D batch of
configs/hippocampus_2d.yaml."""

DIRECTION_WORDS = {
    0: {"left", "right"},
    1: {"anterior", "posterior", "ventral", "dorsal"},
    2: {"superior", "inferior", "upper", "lower", "cranial", "caudal"},
}
"""Label-name words tied to one RAS axis; mirroring along that axis would contradict them."""


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
