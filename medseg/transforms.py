"""MONAI dictionary transforms for training, validation and inference.

Items are dicts with ``image`` (channel paths or an in-memory `Volume`), optionally ``label``
(a path), and ``name``. Images and labels travel together through reorientation and
resampling; labels always use nearest-neighbour interpolation and never see intensity
transforms (they are listed only under `LABEL_KEYS`-aware transforms). Preprocessed labels are
kept in their smallest signed integer type (`cached_label_dtype`), so a cached dataset holds 1
byte per label voxel, not 4.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from scipy import ndimage

from medseg import __version__
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
            # float32 for MONAI's resampling; `preprocessing` casts it to `cached_label_dtype`.
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
        masked = any(n.nonzero_mask for n in self.norms)
        region = nonzero_region(out) if masked else None
        for c, norm in enumerate(self.norms):
            out[c] = normalize_channel(out[c], norm, region)
        d[IMAGE] = out
        return d


def nonzero_region(image: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) bool: voxels nonzero in any channel of a (C, X, Y, Z) image, holes filled
    (nnU-Net's `create_nonzero_mask`: dark voxels inside a skull-stripped brain stay in)."""
    nonzero = (image != 0).any(0).cpu().numpy()
    return torch.from_numpy(ndimage.binary_fill_holes(nonzero)).to(image.device)


def normalize_channel(
    x: torch.Tensor, norm: ChannelNorm, region: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalise one channel (any shape) by `norm.scheme`.

    Args:
        x: the channel.
        norm: how to normalise it.
        region: for ``norm.nonzero_mask``, the voxels the statistics come from (`nonzero_region`
            of all channels); default ``x != 0``. Voxels outside it become 0.
    """
    if norm.scheme == "zscore" and norm.nonzero_mask:
        region = x != 0 if region is None else region
        values = x[region]
        if values.numel() == 0:
            return torch.zeros_like(x)
        std = values.std() if values.numel() > 1 else values.new_tensor(0.0)
        scaled = (x - values.mean()) / (std if std > 0 else 1.0)
        return torch.where(region, scaled, torch.zeros_like(x))
    if norm.scheme == "zscore":
        std = x.std()
        return (x - x.mean()) / (std if std > 0 else 1.0)
    if norm.scheme == "ct":
        return (x.clamp(norm.lower, norm.upper) - norm.mean) / norm.std
    return x


def background_floor(x: torch.Tensor, norm: ChannelNorm) -> float | None:
    """The value "nothing there" takes in a channel normalised by `normalize_channel`.

    CT: anything below the clip floor (air), mapped exactly as the image was. z-score: the
    normalised image's minimum (zero padding or a constant background). z-score over the
    nonzero region: 0, the value of every voxel outside it (darker tissue inside lies below it,
    so prediction counts a window as empty when every voxel *equals* its floor, not when none
    exceeds it; for the other schemes the floor is the minimum and the two tests agree).
    None for ``none``.

    Args:
        x: the normalised channel (any shape).
        norm: how it was normalised.
    """
    if norm.scheme == "ct":
        return float(normalize_channel(torch.tensor([-math.inf]), norm)[0])
    if norm.scheme == "zscore":
        return 0.0 if norm.nonzero_mask else float(x.min())
    return None


def cached_label_dtype(labels: Mapping[int, str]) -> torch.dtype:
    """The smallest signed integer type that holds every label value (int8 up to 127).

    Signed: MONAI's patch sampler (`map_binary_to_indices`) inverts `torch.any` of the label,
    which stays uint8 for uint8 tensors, so `~` turned every voxel into background there and
    background-centred patches could centre on foreground; for int8 and wider it is boolean.
    """
    top = max(labels, default=0)
    return torch.int8 if top <= 127 else torch.int16 if top <= 32767 else torch.int32


def preprocessing(plan: Plan, keys: Sequence[str] = (IMAGE, LABEL)) -> list[mt.Transform]:
    """Load, reorient (RAS, or its permutation `Plan.array_axes`), resample to the plan's
    spacing (a 2D plan's slice axis keeps each case's own, so slices are never interpolated)
    and normalise intensities; labels end in `cached_label_dtype`."""
    modes = ["nearest" if k == LABEL else "bilinear" for k in keys]
    axes = plan.array_axes
    # MONAI's Spacing keeps an axis' original spacing where pixdim is <= 0
    pixdim = [-1.0 if a == plan.slice_axis else plan.spacing[a] for a in axes]
    steps = [
        LoadCased(plan.labels),
        mt.Orientationd(
            keys=list(keys),
            axcodes="".join("RAS"[a] for a in axes),
            labels=(("L", "R"), ("P", "A"), ("I", "S")),
        ),
        mt.Spacingd(keys=list(keys), pixdim=pixdim, mode=modes),
        NormalizeChannelsd(plan.normalization, plan.channels),
    ]
    if LABEL in keys:
        steps.append(mt.CastToTyped(keys=[LABEL], dtype=cached_label_dtype(plan.labels)))
    return steps


def pad_to_patch(cfg: Config, keys: Sequence[str] = (IMAGE, LABEL)) -> mt.Transform:
    """Pad volumes smaller than the patch (2D models: in-plane only)."""
    size = list(cfg.model.patch_size) + ([-1] if cfg.model.spatial_dims == 2 else [])
    return mt.SpatialPadd(keys=list(keys), spatial_size=size)


def train_transforms(cfg: Config, plan: Plan) -> tuple[mt.Compose, mt.Compose]:
    """Deterministic (cacheable) and random parts of the training pipeline.

    The deterministic part is `val_transforms`' (the padding to the patch is cheap and done
    after the cache), so a case cached for training serves validation in another fold.
    """
    random = [pad_to_patch(cfg), *random_patch(cfg), *augmentations(cfg)]
    return val_transforms(plan), mt.Compose(random)


def val_transforms(plan: Plan) -> mt.Compose:
    """Validation pipeline: preprocessing of the full volume, no cropping."""
    return mt.Compose(preprocessing(plan))


def cache_folder(root: Path, plan: Plan) -> Path:
    """The disk-cache folder (`data.cache: disk`) for cases preprocessed by `plan`: one per
    plan and medseg version, so a changed plan never reads another's files."""
    key = json.dumps({"plan": plan.to_json(), "medseg": __version__}, sort_keys=True)
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_key(item: Mapping[Hashable, Any]) -> bytes:
    """A case's file name in the disk cache (MONAI PersistentDataset's ``hash_func``): from
    its name and its files' absolute paths, sizes and modification times, so a case whose
    files were replaced is preprocessed again."""
    files = [*item[IMAGE], *([item[LABEL]] if item.get(LABEL) is not None else [])]
    stats = [
        (str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files
    ]
    text = json.dumps([str(item.get("name")), stats])
    return hashlib.sha256(text.encode()).hexdigest().encode()


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
        # the affine is not needed any more (plain tensors go to the network); updating it
        # warns for every coronal or sagittal patch
        steps.append(mt.SqueezeDimd(keys=keys, dim=-1, update_meta=False))
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
