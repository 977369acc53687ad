"""MONAI dictionary transforms for training, validation and inference.

Items are dicts with ``image`` (channel paths or an in-memory `Volume`), optionally ``label``
(a path), and ``name``. Images and labels travel together through reorientation and
resampling; labels always use nearest-neighbour interpolation and never see intensity
transforms (they are listed only under `LABEL_KEYS`-aware transforms).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.check import label_problems
from medseg.config import Config
from medseg.datasets import DatasetError
from medseg.io import ImageError, Volume, load_labels, load_volume
from medseg.preprocessing_plan import ChannelNorm, Plan

IMAGE, LABEL = "image", "label"


class LoadCased(mt.MapTransform):
    """Read ``image`` (paths or `Volume`) and ``label`` into channel-first MetaTensors.

    Through `medseg.io`, so geometry handling lives in one place; checks that the label
    lies on the image grid.
    """

    def __init__(self, labels: Sequence[int] | None = None) -> None:
        super().__init__([IMAGE, LABEL], allow_missing_keys=True)
        self.labels = None if labels is None else {int(v) for v in labels}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        volume = d[IMAGE] if isinstance(d[IMAGE], Volume) else load_volume(d[IMAGE])
        d[IMAGE] = to_metatensor(volume.array, volume.affine, str(volume.source))
        if d.get(LABEL) is not None:
            labels = load_labels(d[LABEL])
            problems = label_problems(labels, volume, self.labels)
            if problems:
                raise ImageError(problems[0])
            # Same grid: give the label the image's exact affine so both resample identically.
            d[LABEL] = to_metatensor(
                labels.array[None].astype(np.float32), volume.affine, str(labels.source)
            )
        return d


@contextmanager
def unwrapped_errors() -> Iterator[None]:
    """Re-raise user errors that MONAI wrapped in ``RuntimeError('applying transform ...')``.

    MONAI chains the original exception as ``__cause__``; without unwrapping, a bad image
    found while caching a dataset would surface as a traceback instead of a one-line error.
    """
    try:
        yield
    except RuntimeError as err:
        cause: BaseException = err
        while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (ImageError, DatasetError)):
            raise cause from None
        raise


def to_metatensor(array: np.ndarray, affine: np.ndarray, source: str) -> MetaTensor:
    """Wrap a channel-first array with its affine for MONAI's spatial transforms."""
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array)),
        affine=torch.as_tensor(affine, dtype=torch.float64),
        meta={"filename_or_obj": source},
    )


def plain_tensor(x: Any) -> torch.Tensor:
    """`x` without MONAI's metadata: networks run on these (a MetaTensor input routes every
    operation through MONAI's metadata tracking, which costs time and is not needed there)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class NormalizeChannelsd(mt.MapTransform):
    """Per-channel intensity normalisation following the plan.

    MONAI's NormalizeIntensityd is per image; CT needs fixed dataset statistics and
    channels may mix schemes, which MONAI has no single transform for.
    """

    def __init__(self, norms: Sequence[ChannelNorm], names: Sequence[str]) -> None:
        super().__init__([IMAGE])
        self.norms, self.names = tuple(norms), tuple(names)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[IMAGE]
        if image.shape[0] != len(self.norms):
            raise ImageError(
                f"{image.meta.get('filename_or_obj', 'image')}: has {image.shape[0]} channel(s), "
                f"the model takes {len(self.norms)} ({', '.join(self.names)})"
            )
        out = image.clone().float()
        for c, norm in enumerate(self.norms):
            out[c] = normalize_channel(out[c], norm)
        d[IMAGE] = out
        return d


def normalize_channel(x: torch.Tensor, norm: ChannelNorm) -> torch.Tensor:
    """Normalise one channel (any shape) by `norm.scheme`."""
    if norm.scheme == "zscore":
        std = x.std()
        return (x - x.mean()) / (std if std > 0 else 1.0)
    if norm.scheme == "ct":
        return (x.clamp(norm.lower, norm.upper) - norm.mean) / norm.std
    return x


def background_floor(x: torch.Tensor, norm: ChannelNorm) -> float | None:
    """The value "nothing there" takes in a channel normalised by `normalize_channel`.

    CT: anything below the clip floor (air), mapped exactly as the image was. z-score: the
    normalised image's minimum (zero padding or a constant background). None for ``none``.

    Args:
        x: the normalised channel (any shape).
        norm: how it was normalised.
    """
    if norm.scheme == "ct":
        return float(normalize_channel(torch.tensor([-math.inf]), norm)[0])
    if norm.scheme == "zscore":
        return float(x.min())
    return None


def preprocessing(plan: Plan, keys: Sequence[str] = (IMAGE, LABEL)) -> list[mt.Transform]:
    """Load, reorient to RAS, resample to the plan's spacing and normalise intensities."""
    modes = ["nearest" if k == LABEL else "bilinear" for k in keys]
    return [
        LoadCased(plan.labels),
        mt.Orientationd(
            keys=list(keys), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))
        ),
        mt.Spacingd(keys=list(keys), pixdim=plan.spacing, mode=modes),
        NormalizeChannelsd(plan.normalization, plan.channels),
    ]


def pad_to_patch(cfg: Config, keys: Sequence[str] = (IMAGE, LABEL)) -> mt.Transform:
    """Pad volumes smaller than the patch (2D models: in-plane only)."""
    size = list(cfg.model.patch_size) + ([-1] if cfg.model.spatial_dims == 2 else [])
    return mt.SpatialPadd(keys=list(keys), spatial_size=size)


def train_transforms(cfg: Config, plan: Plan) -> tuple[mt.Compose, mt.Compose]:
    """Deterministic (cacheable) and random parts of the training pipeline."""
    fixed = mt.Compose([*preprocessing(plan), pad_to_patch(cfg)])
    return fixed, mt.Compose(random_patch(cfg) + augmentations(cfg))


def val_transforms(plan: Plan) -> mt.Compose:
    """Validation pipeline: preprocessing of the full volume, no cropping."""
    return mt.Compose(preprocessing(plan))


def random_patch(cfg: Config) -> list[mt.Transform]:
    """One patch per volume, centred on foreground with probability train.foreground_fraction."""
    keys = [IMAGE, LABEL]
    fg = cfg.train.foreground_fraction
    if cfg.model.spatial_dims == 3:
        size = list(cfg.model.patch_size)
    else:
        size = [*cfg.model.patch_size, 1]
    crop = mt.RandCropByPosNegLabeld(
        keys=keys,
        label_key=LABEL,
        spatial_size=size,
        pos=fg,
        neg=1.0 - fg,
        num_samples=1,
        allow_smaller=True,
    )
    steps: list[mt.Transform] = [crop]
    if cfg.model.spatial_dims == 2:
        steps.append(mt.SqueezeDimd(keys=keys, dim=-1))
    return steps


def augmentations(cfg: Config) -> list[mt.Transform]:
    """Spatial (labels nearest-neighbour) then intensity (image only) augmentations."""
    aug, keys = cfg.train.augment, [IMAGE, LABEL]
    steps: list[mt.Transform] = []
    if aug.affine_prob > 0 and (aug.rotate_degrees > 0 or aug.scale > 0):
        angle = math.radians(aug.rotate_degrees)
        rotate = [angle] * (3 if cfg.model.spatial_dims == 3 else 1)
        steps.append(
            mt.RandAffined(
                keys=keys,
                prob=aug.affine_prob,
                rotate_range=rotate,
                scale_range=[aug.scale] * cfg.model.spatial_dims,
                mode=["bilinear", "nearest"],
                padding_mode="border",
            )
        )
    for axis in aug.flip_axes:
        if axis < cfg.model.spatial_dims:
            steps.append(mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis))
    p = aug.intensity_prob
    if p > 0:
        steps += [
            mt.RandGaussianNoised(keys=[IMAGE], prob=p, std=0.1),
            mt.RandScaleIntensityd(keys=[IMAGE], prob=p, factors=0.25),
            mt.RandShiftIntensityd(keys=[IMAGE], prob=p, offsets=0.1),
            mt.RandAdjustContrastd(keys=[IMAGE], prob=p, gamma=(0.7, 1.5)),
        ]
    return steps
