"""`plan_dataset` and `plan_config`: a dataset fingerprint -> a complete, validated `Config`.

They apply the rules of `medseg.planner.spacing`, `.network` and `.recipe` in order: spacing
and slice axis first, then the network for the median resampled image, then the training
settings for that network.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from medseg.config import AugmentConfig, Config, DataConfig, TrainConfig, replace
from medseg.datasets import load_dataset
from medseg.fingerprint import Fingerprint, compute_fingerprint
from medseg.memory_model import MemoryBudget, cache_gib, memory_budget
from medseg.planner.network import fit_network
from medseg.planner.recipe import (
    cross_validation_folds,
    fit_batch,
    flip_axes,
    foreground_fraction,
    uses_nonzero_mask,
)
from medseg.planner.spacing import (
    choose_slice_axis,
    is_anisotropic,
    resampled_median_shape,
    resampled_shapes,
    target_spacing,
)
from medseg.preprocessing_plan import network_axes

log = logging.getLogger(__name__)


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


def _with_device(cfg: Config, device: str) -> Config:
    return replace(cfg, **{"train.device": device, "infer.device": device})
