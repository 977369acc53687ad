"""Self-configuring planning (nnU-Net's experiment planner): a dataset fingerprint -> a Config.

`plan_dataset(root)` fingerprints a dataset and returns a complete, validated `Config`: target
spacing, 2D or 3D, patch size, network depth with per-axis strides, filters, batch size fitted
to a memory budget, normalisation and augmentation. Optimiser, learning rate, schedule and epochs
stay at the `TrainConfig` defaults. docs/planning.md lists every rule with its nnU-Net source.

- `medseg.planner.plan`: `plan_dataset`, `plan_config`, which apply the rules below in order.
- `medseg.planner.spacing`: target spacing, anisotropy, resampled shapes, 2D slice axis.
- `medseg.planner.network`: strides, filters, the patch fitted to memory and the voxel caps.
- `medseg.planner.recipe`: folds, batch size, mirroring, foreground fraction, nonzero mask.
- `medseg.planner.output`: the planned YAML (`write_planned_config`) and `summary`.
- The memory model the fits use is `medseg.memory_model` (`memory_budget` is re-exported here).
"""

from medseg.memory_model import MemoryBudget, memory_budget
from medseg.planner.network import (
    BASE_FILTERS,
    CPU_MAX_IMAGE_FRACTION,
    CPU_MAX_PATCH_VOXELS,
    CPU_MIN_BOTTLENECK,
    DEEP_SUPERVISION_HEADS,
    GPU_MAX_PATCH_VOXELS,
    HEADS_GRID_MIN_CLASSES,
    INITIAL_PATCH_VOXELS,
    MAX_FILTERS,
    MAX_LEVELS,
    MIN_BATCH,
    MIN_FEATURE_MAP,
    MIN_PATCH,
    filters_for,
    fit_network,
    initial_patch,
    network_for,
    pool_strides,
    shrink_to_image_fraction,
)
from medseg.planner.output import PLANNED_KEYS, planned_keys, summary, write_planned_config
from medseg.planner.plan import plan_config, plan_dataset
from medseg.planner.recipe import (
    CPU_MAX_BATCH,
    DATASET_BATCH_FRACTION,
    DEFAULT_FOLDS,
    DIRECTION_WORDS,
    NONZERO_MASK_FRACTION,
    cross_validation_folds,
    fit_batch,
    flip_axes,
    foreground_fraction,
    uses_nonzero_mask,
)
from medseg.planner.spacing import (
    ANISOTROPIC_PERCENTILE,
    ANISOTROPY_RATIO,
    MIN_3D_SLICES,
    choose_slice_axis,
    is_anisotropic,
    resampled_median_shape,
    resampled_shapes,
    target_spacing,
)

__all__ = [
    "ANISOTROPIC_PERCENTILE",
    "ANISOTROPY_RATIO",
    "BASE_FILTERS",
    "CPU_MAX_BATCH",
    "CPU_MAX_IMAGE_FRACTION",
    "CPU_MAX_PATCH_VOXELS",
    "CPU_MIN_BOTTLENECK",
    "DATASET_BATCH_FRACTION",
    "DEEP_SUPERVISION_HEADS",
    "DEFAULT_FOLDS",
    "DIRECTION_WORDS",
    "GPU_MAX_PATCH_VOXELS",
    "HEADS_GRID_MIN_CLASSES",
    "INITIAL_PATCH_VOXELS",
    "MAX_FILTERS",
    "MAX_LEVELS",
    "MIN_3D_SLICES",
    "MIN_BATCH",
    "MIN_FEATURE_MAP",
    "MIN_PATCH",
    "NONZERO_MASK_FRACTION",
    "PLANNED_KEYS",
    "MemoryBudget",
    "choose_slice_axis",
    "cross_validation_folds",
    "filters_for",
    "fit_batch",
    "fit_network",
    "flip_axes",
    "foreground_fraction",
    "initial_patch",
    "is_anisotropic",
    "memory_budget",
    "network_for",
    "plan_config",
    "plan_dataset",
    "planned_keys",
    "pool_strides",
    "resampled_median_shape",
    "resampled_shapes",
    "shrink_to_image_fraction",
    "summary",
    "target_spacing",
    "uses_nonzero_mask",
    "write_planned_config",
]
