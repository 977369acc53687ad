"""Sliding-window inference that returns labels on the input's own grid.

`predict_volume` owns no files and loads no model: it takes a predictor (any callable from a
batch of patches to logits) and an in-memory `Volume`, preprocesses it as the plan says,
runs MONAI's sliding window with Gaussian blending, inverts reorientation and resampling on
the probabilities, and takes the argmax on the original grid.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import SliceInferer, sliding_window_inference

from medseg.config import ConfigError
from medseg.io import Volume
from medseg.planning import Plan
from medseg.transforms import IMAGE, preprocessing, unwrapped_errors

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]
PRED = "pred"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Window:
    """How the sliding window runs.

    Attributes:
        roi_size: window size; 3 numbers for a 3D model, 2 for a slice-wise 2D model
            (windows then run over axial slices, the last axis).
        overlap: window overlap fraction.
        batch_size: windows per forward pass.
        tta: average over all mirrorings of the spatial axes (8 passes in 3D).
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    batch_size: int = 2
    tta: bool = False


def sliding_window_probabilities(
    predictor: Predictor,
    image: torch.Tensor,
    window: Window,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Softmax probabilities for a preprocessed image.

    Args:
        predictor: maps a batch (B, C, *roi) to logits (B, K, *roi).
        image: (C, X, Y, Z) preprocessed image.
        window: window size, overlap, batch and TTA.
        device: where the predictor runs; the result is on the CPU.

    Returns:
        (K, X, Y, Z) float32 probabilities.
    """
    device = device or torch.device("cpu")
    batch = image.as_tensor() if isinstance(image, MetaTensor) else image
    batch = batch[None].to(device)
    flips: list[tuple[int, ...]] = [()]
    if window.tta:
        axes = (2, 3, 4)
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    total = None
    for dims in flips:
        x = torch.flip(batch, dims) if dims else batch
        logits = _window(predictor, x, window)
        probs = torch.softmax(logits.float(), dim=1)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return (total / len(flips))[0].cpu()


def _window(predictor: Predictor, x: torch.Tensor, window: Window) -> torch.Tensor:
    roi, overlap, sw_batch = window.roi_size, window.overlap, window.batch_size
    with torch.inference_mode():
        if len(roi) == 2:
            inferer = SliceInferer(
                roi_size=tuple(roi),
                sw_batch_size=sw_batch,
                overlap=overlap,
                mode="gaussian",
                spatial_dim=2,
                progress=False,
            )
            return inferer(x, predictor)
        return sliding_window_inference(
            x, tuple(roi), sw_batch, predictor, overlap=overlap, mode="gaussian"
        )


def predict_volume(
    predictor: Predictor,
    volume: Volume,
    plan: Plan,
    window: Window,
    device: torch.device | None = None,
) -> np.ndarray:
    """Segment one volume and return labels on its own grid.

    Args:
        predictor: maps (B, C, *roi) to logits (B, K, *roi).
        volume: the input image, any orientation and spacing.
        plan: preprocessing used in training (spacing, normalisation, labels).
        window, device: see `sliding_window_probabilities`.

    Returns:
        Integer labels of shape ``volume.shape`` (X, Y, Z) in the file's voxel order.
    """
    pre = mt.Compose(preprocessing(plan, keys=[IMAGE]))
    with unwrapped_errors():
        data = pre({IMAGE: volume})
    image = data[IMAGE]
    probs = sliding_window_probabilities(predictor, image, window, device)
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    data[PRED] = MetaTensor(probs, affine=image.affine, meta=meta)
    data[PRED].applied_operations = list(image.applied_operations)
    inverse = mt.Invertd(keys=PRED, transform=pre, orig_keys=IMAGE, nearest_interp=False)
    restored = inverse(data)[PRED]
    labels = torch.argmax(restored, dim=0).numpy()
    if labels.shape != volume.shape:  # Invertd guarantees this; a mismatch is a bug, not input
        raise RuntimeError(f"inverted prediction has shape {labels.shape}, input {volume.shape}")
    return labels.astype(np.int32)
