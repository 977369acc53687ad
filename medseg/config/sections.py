"""The configuration's sections: frozen dataclasses, each field validated in `__post_init__`.

A bad value raises `ConfigError` naming the dotted key (``train.epochs must be >= 1, got 0``);
`medseg.config.loading` builds these from YAML and checks unknown keys and types first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (a user error)."""


# raised and caught everywhere as medseg.config.ConfigError; tracebacks name it so too
ConfigError.__module__ = "medseg.config"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset is and how volumes are preprocessed."""

    root: Path | None = None
    """Dataset folder holding dataset.json (MSD or nnU-Net v2 raw layout)."""
    spacing: tuple[float, float, float] | None = None
    """Target voxel spacing in mm (x, y, z after RAS reorientation); null = dataset median.
    2D models keep each case's own spacing along `model.slice_axis` (that entry is unused)."""
    normalization: str = "auto"
    """auto (CT -> dataset percentiles, others -> per-image z-score), zscore, ct or none."""
    nonzero_mask: bool = False
    """z-scored channels take their mean and std from the image's nonzero region (all channels,
    holes filled) and are 0 outside it, so zero padding around skull-stripped MR does not change
    the result (nnU-Net's use_mask_for_norm). The planner turns it on when the median case's
    nonzero bounding box is under 3/4 of the image (docs/planning.md)."""
    cache: str = "memory"
    """Where the preprocessed training and validation cases are kept: memory (fastest; needs RAM
    for the whole dataset), disk (MONAI PersistentDataset in `cache_dir`, read back each time)
    or off (preprocessed again at every use). The planner picks memory or disk from the
    dataset's estimated size. Old configs' true/false mean memory/off."""
    cache_dir: Path | None = None
    """Folder of the disk cache, one subfolder per preprocessing (plan and medseg version), so
    runs of the same data can share it; delete it at any time. null = ``cache/`` in the run
    folder (an ensemble's, for all of its folds)."""

    def __post_init__(self) -> None:
        _check(
            self.normalization in NORMALIZATIONS,
            f"data.normalization must be one of {sorted(NORMALIZATIONS)}, "
            f"got {self.normalization!r}",
        )
        _check(
            self.cache in CACHES,
            f"data.cache must be one of {', '.join(CACHES)}, got {self.cache!r}",
        )
        if self.spacing is not None:
            _check(
                len(self.spacing) == 3 and all(s > 0 for s in self.spacing),
                f"data.spacing must be three positive numbers or null, got {list(self.spacing)}",
            )


NORMALIZATIONS = {"auto", "zscore", "ct", "none"}
CACHES = ("memory", "disk", "off")


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture."""

    name: str = "unet"
    """Registered network name (see medseg.models.MODELS)."""
    spatial_dims: int = 3
    """3 = volumetric U-Net; 2 = slice-wise U-Net on slices along `slice_axis`."""
    slice_axis: int = 2
    """2D models: the RAS axis the slices are taken along (2 = axial x-y slices, 1 = coronal
    x-z, 0 = sagittal y-z); its spacing is not resampled, each case keeps its own (nnU-Net).
    Ignored by 3D models."""
    filters: tuple[int, ...] = (16, 32, 64, 128)
    """Feature channels per resolution level; its length sets the depth."""
    patch_size: tuple[int, ...] = (40, 56, 40)
    """Training patch and sliding-window size in voxels (2 numbers when spatial_dims is 2: the
    slice's in-plane axes in RAS order, e.g. x and z for coronal slices)."""
    norm: str = "instance"
    """Normalisation layer: instance or batch."""
    deep_supervision: int = 0
    """Extra low-resolution outputs trained with down-weighted losses (0 = off; < levels - 1)."""
    deep_supervision_grid: str = "full"
    """Where each extra output's loss is computed: full (the output upsampled to the
    full-resolution grid, as MONAI's DynUNet does) or heads (the label map downsampled to the
    output's own grid, as nnU-Net does: a third less training time with 118 classes, no
    difference with 3). The planner picks heads from 16 classes up (docs/planning.md)."""
    res_block: bool = False
    """Residual blocks: each level's two convolutions get a skip connection (MONAI's
    UnetResBlock). Measured no better than plain blocks on hippocampus (docs/recipe.md)."""
    strides: tuple[tuple[int, ...], ...] | None = None
    """Per-level, per-axis downsampling strides, e.g. [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
    (first level all 1, then 1 or 2 per axis); null = 2 on every axis at every level."""

    def __post_init__(self) -> None:
        _check(
            self.spatial_dims in (2, 3),
            f"model.spatial_dims must be 2 or 3, got {self.spatial_dims}",
        )
        _check(
            self.slice_axis in (0, 1, 2),
            f"model.slice_axis must be 0 (sagittal), 1 (coronal) or 2 (axial), "
            f"got {self.slice_axis}",
        )
        _check(
            len(self.filters) >= 3,
            f"model.filters needs at least 3 levels (U-Net depth), got {list(self.filters)}",
        )
        _check(
            all(f >= 1 for f in self.filters),
            f"model.filters must be positive, got {list(self.filters)}",
        )
        _check(
            len(self.patch_size) == self.spatial_dims,
            f"model.patch_size must have {self.spatial_dims} numbers for spatial_dims="
            f"{self.spatial_dims}, got {list(self.patch_size)}",
        )
        if self.strides is None:
            factor = 2 ** (len(self.filters) - 1)
            _check(
                all(p >= factor and p % factor == 0 for p in self.patch_size),
                f"model.patch_size must be multiples of {factor} (2^(levels-1) for "
                f"{len(self.filters)} levels), got {list(self.patch_size)}",
            )
        else:
            self._check_strides()
        _check(
            0 <= self.deep_supervision < len(self.filters) - 1,
            f"model.deep_supervision must be in [0, {len(self.filters) - 2}] for "
            f"{len(self.filters)} levels, got {self.deep_supervision}",
        )
        _check(
            self.deep_supervision_grid in ("full", "heads"),
            "model.deep_supervision_grid must be full or heads, "
            f"got {self.deep_supervision_grid!r}",
        )
        _check(
            self.norm in ("instance", "batch"),
            f"model.norm must be instance or batch, got {self.norm!r}",
        )

    def _check_strides(self) -> None:
        strides = [list(level) for level in self.strides or ()]
        _check(
            len(strides) == len(self.filters),
            f"model.strides must have one entry per level ({len(self.filters)}), got {strides}",
        )
        _check(
            all(len(level) == self.spatial_dims for level in strides),
            f"model.strides entries must have {self.spatial_dims} numbers (one per axis), "
            f"got {strides}",
        )
        _check(
            all(s == 1 for s in strides[0]),
            f"model.strides[0] must be all 1 (the first level keeps full resolution), "
            f"got {strides[0]}",
        )
        _check(
            all(s in (1, 2) for level in strides for s in level),
            f"model.strides must be 1 or 2 per axis, got {strides}",
        )
        factors = downsampling_factors(self)
        _check(
            all(p % f == 0 for p, f in zip(self.patch_size, factors, strict=True)),
            f"model.patch_size must be multiples of {factors} per axis (the product of "
            f"model.strides along each axis), got {list(self.patch_size)}",
        )


def level_strides(model: ModelConfig) -> list[list[int]]:
    """Per-level, per-axis strides: ``model.strides``, or 1 then 2 on every axis by default."""
    if model.strides is not None:
        return [list(level) for level in model.strides]
    levels, dims = len(model.filters), model.spatial_dims
    return [[1] * dims] + [[2] * dims for _ in range(levels - 1)]


def downsampling_factors(model: ModelConfig) -> list[int]:
    """Total downsampling per axis (product of the strides); patch sizes must be multiples."""
    factors = [1] * model.spatial_dims
    for level in level_strides(model):
        factors = [f * s for f, s in zip(factors, level, strict=True)]
    return factors


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentations applied to training patches."""

    flip_axes: tuple[int, ...] = ()
    """Axes of the network's input mirrored with probability 0.5 each: 3D the RAS axes (0=x,
    1=y, 2=z); 2D the slice's in-plane axes in RAS order (0, 1: x, y for axial slices, x, z
    for coronal, y, z for sagittal)."""
    rotate_degrees: float = 15.0
    """Maximum rotation about each axis, in degrees (0 disables affine augmentation)."""
    scale: float = 0.15
    """Maximum relative zoom in or out."""
    affine_prob: float = 0.2
    """Probability of applying the random rotation/scaling to a patch."""
    intensity_prob: float = 0.15
    """Probability of each intensity augmentation (scale, shift, gamma, noise)."""

    def __post_init__(self) -> None:
        _check(
            all(a in (0, 1, 2) for a in self.flip_axes),
            f"train.augment.flip_axes must be 0, 1 or 2, got {list(self.flip_axes)}",
        )
        _check(
            0 <= self.rotate_degrees <= 180,
            f"train.augment.rotate_degrees must be in [0, 180], got {self.rotate_degrees}",
        )
        _check(0 <= self.scale < 1, f"train.augment.scale must be in [0, 1), got {self.scale}")
        for name in ("affine_prob", "intensity_prob"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"train.augment.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data split and schedule."""

    epochs: int = 60
    """Number of epochs (an upper bound when max_minutes is set)."""
    max_minutes: float | None = None
    """Wall-clock budget for the whole training command; the learning-rate schedule follows
    elapsed time so the run ends converged within it. null = train for `epochs`."""
    iterations_per_epoch: int | None = None
    """Batches per epoch; null = one pass over the training cases."""
    batch_size: int = 4
    """Patches per batch."""
    optimizer: str = "adamw"
    """adamw or sgd (Nesterov, momentum 0.99)."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 1e-5
    """Weight decay."""
    warmup_epochs: int = 1
    """Linear warm-up epochs before the cosine/poly decay."""
    schedule: str = "cosine"
    """Learning-rate decay: cosine or poly (nnU-Net's (1 - t)^0.9)."""
    loss: str = "dice_ce"
    """Loss name (see medseg.losses.LOSSES): dice_ce, dice_ce_case (Dice per patch) or dice."""
    foreground_fraction: float = 0.5
    """Fraction of patches centred on a foreground voxel (foreground oversampling)."""
    ema: float = 0.0
    """Decay per step of an exponential moving average of the weights, which is then what is
    validated and saved (e.g. 0.999); 0 = off, the last weights."""
    folds: int = 5
    """Number of cross-validation folds the cases are split into; 1 = train on every case
    and validate on the training cases (for datasets too small to hold any out)."""
    fold: int = 0
    """Which fold is held out for validation."""
    seed: int = 0
    """Seed for weights, patch sampling and augmentation (not for the folds: `split_seed`)."""
    split_seed: int = 0
    """Seed of the case shuffle that makes the folds. Separate from `seed`, so runs with other
    training seeds validate on the same held-out cases."""
    train_cases: int | None = None
    """Train on only this many of the fold's training cases, a fixed random subset (drawn with
    `split_seed`; smaller subsets lie inside larger ones), for learning curves: Dice against the
    number of annotated cases. The held-out cases do not change. null = all of them."""
    val_every: int = 5
    """Validate (sliding window, per-label Dice) every N epochs and at the last epoch."""
    num_workers: int = 0
    """Data-loading worker processes (0 = in the main process; best on small CPUs)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    amp: bool = True
    """Mixed precision on CUDA (ignored on CPU)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation settings."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(
            self.max_minutes is None or self.max_minutes > 0,
            f"train.max_minutes must be > 0 or null, got {self.max_minutes}",
        )
        _check(
            self.iterations_per_epoch is None or self.iterations_per_epoch >= 1,
            f"train.iterations_per_epoch must be >= 1 or null, got {self.iterations_per_epoch}",
        )
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(
            self.optimizer in ("adamw", "sgd"),
            f"train.optimizer must be adamw or sgd, got {self.optimizer!r}",
        )
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}"
        )
        _check(
            self.schedule in ("cosine", "poly"),
            f"train.schedule must be cosine or poly, got {self.schedule!r}",
        )
        _check(
            0 <= self.foreground_fraction <= 1,
            f"train.foreground_fraction must be in [0, 1], got {self.foreground_fraction}",
        )
        _check(0 <= self.ema < 1, f"train.ema must be in [0, 1), got {self.ema}")
        _check(self.folds >= 1, f"train.folds must be >= 1, got {self.folds}")
        _check(
            0 <= self.fold < self.folds,
            f"train.fold must be in [0, {self.folds - 1}], got {self.fold}",
        )
        _check(
            self.train_cases is None or self.train_cases >= 1,
            f"train.train_cases must be >= 1 or null, got {self.train_cases}",
        )
        _check(self.val_every >= 1, f"train.val_every must be >= 1, got {self.val_every}")
        _check(self.num_workers >= 0, f"train.num_workers must be >= 0, got {self.num_workers}")
        _check(
            self.device in DEVICES,
            f"train.device must be one of {sorted(DEVICES)}, got {self.device!r}",
        )


DEVICES = {"auto", "cpu", "cuda"}


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window inference."""

    overlap: float = 0.5
    """Fraction of overlap between neighbouring windows."""
    sw_batch_size: int = 2
    """Windows evaluated per forward pass."""
    tta: bool = False
    """Average predictions over mirrored copies (test-time augmentation), along the axes the
    model was trained to mirror (train.augment.flip_axes): 2^n passes per window."""
    device: str = "auto"
    """auto, cpu or cuda."""

    def __post_init__(self) -> None:
        _check(0 <= self.overlap < 1, f"infer.overlap must be in [0, 1), got {self.overlap}")
        _check(
            self.sw_batch_size >= 1, f"infer.sw_batch_size must be >= 1, got {self.sw_batch_size}"
        )
        _check(
            self.device in DEVICES,
            f"infer.device must be one of {sorted(DEVICES)}, got {self.device!r}",
        )


@dataclass(frozen=True)
class Config:
    """The whole medseg configuration; mirrors the YAML file section by section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
