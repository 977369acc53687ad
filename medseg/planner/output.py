"""What `medseg plan` writes and prints: the planned YAML (only the planned keys, with a header
naming the dataset and budget) beside its fingerprint, and the human-readable summary.
"""

from __future__ import annotations

import math
from pathlib import Path

from medseg.config import Config, ModelConfig, level_strides, save_config
from medseg.fingerprint import Fingerprint, save_fingerprint
from medseg.memory_model import MemoryBudget, cache_gib, estimate_memory_gib
from medseg.planner.spacing import is_anisotropic, resampled_shapes
from medseg.preprocessing_plan import channel_scheme

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
        "lr, schedule, epochs, ...) take the defaults of medseg/config/sections.py."
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
