"""Sliding-window inference that returns labels on the input's own grid, in bounded memory.

`predict_volume` owns no files and loads no model: it takes a predictor (any callable from a
batch of windows to logits) and an in-memory `Volume`, preprocesses it as the plan says, runs
a sliding window with Gaussian blending, and maps the probabilities back to the input grid
where it takes the argmax.

The window is streamed: windows run grouped by their start along the last preprocessed axis,
and as soon as a group is done the planes before the next group's start are final; that slab
is normalised, turned into probabilities and handed to `medseg.slabs.SlabMapper`, which labels
the input voxels that fall into it. Neither the probabilities of the whole preprocessed image
nor any float map at the input's resolution is ever held. Window positions, the Gaussian
importance map and the blending follow MONAI's `sliding_window_inference`, so the result is
the same as running it on the whole image, then MONAI's `Invertd` and the argmax.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference

from medseg.config import Config, ConfigError
from medseg.io import Volume
from medseg.preprocessing_plan import Plan
from medseg.slabs import Slab, SlabMapper
from medseg.transforms import (
    IMAGE,
    background_floor,
    plain_tensor,
    preprocessing,
    unwrapped_errors,
)

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]
Slices = tuple[slice, ...]

SLICE_CHUNK = 16
"""Axial slices per slab for slice-wise (2D) models."""
EMPTY_TOLERANCE = 1e-5
"""A window is empty when no voxel differs from its channel's background floor by more than
this (`medseg.transforms.background_floor`)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def physical_cores() -> int:
    """CPU cores this process may use, not counting SMT siblings (hyper-threads)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    siblings = set()
    for cpu in cpus:  # torch has no physical-core query and psutil is not a dependency
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            siblings.add(path.read_text().strip())
        except OSError:
            return len(cpus)
    return max(1, len(siblings) or os.cpu_count() or 1)


def use_physical_cores() -> int:
    """Run torch's CPU kernels on one thread per physical core (SMT threads only contend)."""
    cores = physical_cores()
    torch.set_num_threads(cores)
    return cores


@dataclass(frozen=True)
class Window:
    """How the sliding window runs.

    Attributes:
        roi_size: window size; 3 numbers for a 3D model, 2 for a slice-wise 2D model
            (windows then run over slices along the last preprocessed axis, which
            preprocessing makes the plan's slice axis).
        overlap: window overlap fraction.
        batch_size: windows per forward pass.
        tta: spatial axes mirrored at test time; every combination of them is run and the
            softmax outputs averaged (2^n passes per window); () = none. Use the axes the
            model was trained to mirror (`tta_axes`): mirroring a left/right-specific model
            along x would swap its sides.
        skip_empty: windows (3D) or slices (2D) whose input is all background (CT: air below
            the clip floor; z-scored MRI: the image's minimum, e.g. zero padding; z-scored over
            the nonzero region: 0, outside it) are not run and get background probability 1.
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    batch_size: int = 2
    tta: tuple[int, ...] = ()
    skip_empty: bool = True


def predict_volume(
    predictor: Predictor,
    volume: Volume,
    plan: Plan,
    window: Window,
    device: torch.device | None = None,
) -> np.ndarray:
    """Segment one volume and return labels on its own grid.

    On CUDA the windows run under fp16 autocast with the blending buffers on the GPU; if the
    GPU runs out of memory the buffers move to the CPU and the volume is redone.

    Args:
        predictor: maps (B, C, *roi) to logits (B, K, *roi), K = ``len(plan.labels)``.
        volume: the input image, any orientation and spacing.
        plan: preprocessing used in training (spacing, normalisation, labels).
        window: window size, overlap, batch, TTA, empty-window skipping.
        device: where the predictor runs (default CPU).

    Returns:
        Integer labels (uint8 up to 256 classes) of shape ``volume.shape`` (X, Y, Z) in the
        file's voxel order.
    """
    device = device or torch.device("cpu")
    pre = mt.Compose(preprocessing(plan, keys=[IMAGE]))
    with unwrapped_errors():
        image = pre({IMAGE: volume})[IMAGE]
    floors = background_floors(image, plan) if window.skip_empty else None
    pixels = plain_tensor(image)
    try:
        return _labels(predictor, volume, image, pixels, plan, window, floors, device, device)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        log.warning("CUDA out of memory: redoing %s with the buffers on the CPU", volume.source)
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        return _labels(predictor, volume, image, pixels, plan, window, floors, device, cpu)


def _labels(
    predictor: Predictor,
    volume: Volume,
    image: MetaTensor,
    pixels: torch.Tensor,
    plan: Plan,
    window: Window,
    floors: list[float] | None,
    device: torch.device,
    buffer_device: torch.device,
) -> np.ndarray:
    mapper = SlabMapper(
        volume.affine, volume.shape, np.asarray(image.affine), pixels.shape[1:], buffer_device
    )
    slabs = stream_probabilities(
        predictor, pixels.to(buffer_device), window, floors, len(plan.labels), device
    )
    for slab in slabs:
        mapper.add(slab)
    return mapper.labels()


def background_floors(image: torch.Tensor, plan: Plan) -> list[float] | None:
    """Per-channel normalised value of "nothing there", or None when a channel has none."""
    floors = [background_floor(image[c], norm) for c, norm in enumerate(plan.normalization)]
    return None if any(f is None for f in floors) else [float(f) for f in floors]  # type: ignore[arg-type]


def sliding_window_probabilities(
    predictor: Predictor,
    image: torch.Tensor,
    window: Window,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Softmax probabilities for a whole preprocessed image (no window is skipped).

    Args:
        predictor: maps a batch (B, C, *roi) to logits (B, K, *roi).
        image: (C, X, Y, Z) preprocessed image.
        window: window size, overlap, batch and TTA.
        device: where the predictor runs; the result is on the CPU.

    Returns:
        (K, X, Y, Z) float32 probabilities.
    """
    device = device or torch.device("cpu")
    pixels = plain_tensor(image)
    out: torch.Tensor | None = None
    for slab in stream_probabilities(predictor, pixels.to(device), window, None, None, device):
        if out is None:
            out = torch.empty((slab.probs.shape[0], *pixels.shape[1:]), dtype=torch.float32)
        out[..., slab.start : slab.stop] = slab.probs.float().cpu()
    assert out is not None  # every image yields at least one slab
    return out


def stream_probabilities(
    predictor: Predictor,
    image: torch.Tensor,
    window: Window,
    floors: Sequence[float] | None,
    n_classes: int | None,
    device: torch.device,
) -> Iterator[Slab]:
    """Probabilities of a preprocessed image, slab by slab along its last axis.

    Consecutive slabs share one plane (the last of one is the first of the next), so a
    consumer can interpolate across the seam. A slab is only valid until the next is asked for.

    Args:
        predictor: maps (B, C, *roi) to logits (B, K, *roi).
        image: (C, X, Y, Z) preprocessed image; blending buffers live on its device.
        window: window size, overlap, batch size, TTA.
        floors: per-channel background values for skipping empty windows; None = skip none.
        n_classes: K; may be None only when `floors` is None (then taken from the first output).
        device: where the predictor runs.
    """
    forward = _forward_fn(predictor, window.tta, device)
    if len(window.roi_size) == 2:
        return _stream_slices(forward, image, window, floors, n_classes)
    return _stream_windows(forward, image, window, floors, n_classes)


def tta_axes(cfg: Config, tta: bool) -> tuple[int, ...]:
    """The spatial axes test-time augmentation mirrors: those the model was trained to mirror.

    A model trained without mirroring has none to average over; asking for TTA then logs a
    warning (nnU-Net likewise only mirrors along its training mirror axes).
    """
    if not tta:
        return ()
    axes = tuple(a for a in cfg.train.augment.flip_axes if a < cfg.model.spatial_dims)
    if not axes:
        log.warning(
            "TTA skipped: the model was trained without mirroring (train.augment.flip_axes)"
        )
    return axes


def configured_window(cfg: Config, overlap: float | None = None, tta: bool | None = None) -> Window:
    """The window a config's ``infer`` section asks for (training validation and predict share
    it), with `overlap` and `tta` overriding the config when given."""
    infer = cfg.infer
    overlap = infer.overlap if overlap is None else overlap
    mirror = tta_axes(cfg, infer.tta if tta is None else tta)
    return Window(cfg.model.patch_size, overlap, infer.sw_batch_size, mirror)


def _forward_fn(predictor: Predictor, tta: tuple[int, ...], device: torch.device) -> Predictor:
    """Logits for a batch of windows: on `device`, under autocast on CUDA, mirrored with TTA.

    With TTA the mirrored softmax outputs are averaged per window and returned as log
    probabilities (softmax(log p) = p), which blend like logits.
    """
    dims = tuple(2 + a for a in tta)  # (B, C, *spatial)
    flips = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]

    def run(x: torch.Tensor) -> torch.Tensor:
        if device.type != "cuda":
            return predictor(x.to(device))
        with torch.autocast("cuda", dtype=torch.float16):
            return predictor(x.to(device, non_blocking=True))

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if len(flips) == 1:
                return run(x)
            total = None
            for dims in flips:
                logits = run(torch.flip(x, dims) if dims else x).float()
                probs = torch.softmax(torch.flip(logits, dims) if dims else logits, dim=1)
                total = probs if total is None else total.add_(probs)
            assert total is not None
            return torch.log(total.div_(len(flips)).clamp_min_(torch.finfo(total.dtype).tiny))

    return forward


def _stream_windows(
    forward: Predictor,
    image: torch.Tensor,
    window: Window,
    floors: Sequence[float] | None,
    n_classes: int | None,
) -> Iterator[Slab]:
    """3D windows grouped by their start along Z; one slab per group (see module docstring)."""
    roi = tuple(window.roi_size)
    padded, pads = _pad_to(image, roi)
    size = tuple(padded.shape[1:])
    interval = scan_interval(size, roi, window.overlap)
    windows = dense_patch_slices(size, roi, interval)
    occupied = _occupied(padded, windows, floors)
    groups: dict[int, list[Slices]] = {}
    for s, busy in zip(windows, occupied, strict=True):
        group = groups.setdefault(s[2].start, [])
        if busy:
            group.append(s)
    blend = _Blend(size, roi, padded.device, n_classes)
    starts = sorted(groups)
    for g, start in enumerate(starts):
        todo = groups[start]
        for i in range(0, len(todo), window.batch_size):
            batch = todo[i : i + window.batch_size]
            logits = forward(torch.stack([padded[(slice(None), *s)] for s in batch]))
            for s, out in zip(batch, logits, strict=True):
                blend.add(s, out)
        stop = starts[g + 1] if g + 1 < len(starts) else size[2]
        first, probs = blend.finish(stop)
        slab = _crop(probs, first, pads, image.shape[1:])
        if slab is not None:
            yield slab
        blend.advance(stop)


def scan_interval(size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Step between window starts per axis, as MONAI's sliding_window_inference places them
    (MONAI keeps this rule private; the windows must match its for equal results)."""
    steps = []
    for s, r in zip(size, roi, strict=True):
        steps.append(int(r) if r == s else max(1, int(r * (1 - overlap))))
    return tuple(steps)


class _Blend:
    """Gaussian-weighted sums of window logits for the planes that are not final yet.

    The buffer is (K, X, Y, D) so that a window's (K, rx, ry, rz) logits add in their own
    memory order; plane `base` is at depth 0. After `advance`, depth 0 keeps the last final
    plane (as probabilities) for the consumer's interpolation across the seam.
    """

    def __init__(
        self, size: tuple[int, ...], roi: tuple[int, ...], device: torch.device, k: int | None
    ) -> None:
        self.size, self.roi, self.device = size, roi, device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.weight = compute_importance_map(roi, mode="gaussian", device=device, dtype=self.dtype)
        self.weights = torch.zeros((size[0], size[1], roi[2] + 1), dtype=self.dtype, device=device)
        self.sums = None if k is None else self._sums(k)
        self.base, self.kept = 0, False

    def _sums(self, k: int) -> torch.Tensor:
        shape = (k, self.size[0], self.size[1], self.roi[2] + 1)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def add(self, s: Slices, logits: torch.Tensor) -> None:
        """Add one window's logits (K, rx, ry, rz) at window slices `s`."""
        if self.sums is None:
            self.sums = self._sums(logits.shape[0])
        planes = slice(s[2].start - self.base, s[2].stop - self.base)
        target = self.sums[:, s[0], s[1], planes]
        target.addcmul_(logits.to(self.device).contiguous(), self.weight)
        self.weights[s[0], s[1], planes] += self.weight

    def finish(self, stop: int) -> tuple[int, torch.Tensor]:
        """Probabilities (K, X, Y, n) of the final planes up to `stop`, and the first plane.

        The first plane is the kept plane of the previous slab when there is one.
        """
        assert self.sums is not None  # set from n_classes or by the first window
        planes = slice(int(self.kept), stop - self.base)
        probs, weights = self.sums[..., planes], self.weights[..., planes]
        probs.div_(weights.clamp_min(torch.finfo(self.dtype).tiny))
        probs.sub_(probs.amax(0, keepdim=True)).exp_()  # softmax in place: no second copy
        probs.div_(probs.sum(0, keepdim=True))
        unseen = weights == 0  # only skipped (empty) windows cover these voxels: background
        if bool(unseen.any()):
            probs.masked_fill_(unseen, 0.0)
            probs[0].masked_fill_(unseen, 1.0)
        return self.base, self.sums[..., : stop - self.base]

    def advance(self, stop: int) -> None:
        """Drop the planes before `stop - 1`; plane `stop - 1` moves to depth 0."""
        assert self.sums is not None
        shift, depth = stop - 1 - self.base, self.sums.shape[-1]
        if shift > 0:
            for buffer in (*self.sums, self.weights):  # one class at a time: small temporaries
                buffer[..., : depth - shift] = buffer[..., shift:].clone()
                buffer[..., depth - shift :] = 0
        self.base, self.kept = stop - 1, True


def _pad_to(image: torch.Tensor, roi: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Pad symmetrically with 0 up to the window size, as sliding_window_inference does."""
    before = [max(r - s, 0) // 2 for r, s in zip(roi, image.shape[1:], strict=True)]
    after = [max(r - s, 0) - b for r, s, b in zip(roi, image.shape[1:], before, strict=True)]
    if not any(before) and not any(after):
        return image, before
    pad = [p for b, a in zip(reversed(before), reversed(after), strict=True) for p in (b, a)]
    return F.pad(image, pad, mode="constant", value=0.0), before


def _crop(probs: torch.Tensor, first: int, pads: list[int], shape: Sequence[int]) -> Slab | None:
    """The part of a padded slab (K, X', Y', n) that lies in the unpadded image."""
    lo, hi = max(first, pads[2]), min(first + probs.shape[-1], pads[2] + shape[2])
    if lo >= hi:
        return None
    x, y = slice(pads[0], pads[0] + shape[0]), slice(pads[1], pads[1] + shape[1])
    return Slab(lo - pads[2], probs[:, x, y, lo - first : hi - first])


def _occupied(
    image: torch.Tensor, windows: Sequence[Slices], floors: Sequence[float] | None
) -> list[bool]:
    """Which windows hold anything other than the background floors (all without floors)."""
    if floors is None:
        return [True] * len(windows)
    floor = torch.as_tensor(floors, dtype=image.dtype, device=image.device)
    excess = (image - floor.view(-1, 1, 1, 1)).abs().amax(0)  # (X, Y, Z): off some floor?
    peaks = torch.stack([excess[s].amax() for s in windows]).cpu()  # one sync for all windows
    return [bool(p > EMPTY_TOLERANCE) for p in peaks]


def _stream_slices(
    forward: Predictor,
    image: torch.Tensor,
    window: Window,
    floors: Sequence[float] | None,
    n_classes: int | None,
) -> Iterator[Slab]:
    """Slice-wise (2D) models: MONAI's 2D sliding window over chunks of slices (the last axis).

    Slices do not blend with each other, so each chunk is final at once; empty slices are
    skipped whole (individual in-plane windows are not).
    """
    kept: torch.Tensor | None = None
    depth = image.shape[-1]
    for z0 in range(0, depth, SLICE_CHUNK):
        chunk = image[..., z0 : z0 + SLICE_CHUNK].permute(3, 0, 1, 2)  # (n, C, X, Y)
        busy = _busy_slices(chunk, floors)
        probs = None
        if bool(busy.any()):
            with torch.inference_mode():
                logits = sliding_window_inference(
                    chunk[busy].contiguous(),
                    tuple(window.roi_size),
                    window.batch_size,
                    forward,
                    overlap=window.overlap,
                    mode="gaussian",
                )
            n_classes = logits.shape[1]
            probs = torch.zeros((chunk.shape[0], *logits.shape[1:]), device=image.device)
            probs[busy] = torch.softmax(logits.float(), dim=1).to(image.device)
        if probs is None:
            assert n_classes is not None  # floors (hence skipping) come with n_classes
            probs = torch.zeros((chunk.shape[0], n_classes, *chunk.shape[2:]), device=image.device)
        probs[~busy, 0] = 1.0
        planes = probs.permute(1, 2, 3, 0)  # (K, X, Y, n)
        slab = planes if kept is None else torch.cat([kept, planes], dim=-1)
        yield Slab(z0 - (kept is not None), slab)
        kept = planes[..., -1:].clone()


def _busy_slices(chunk: torch.Tensor, floors: Sequence[float] | None) -> torch.Tensor:
    """(n,) bool: slices of a (n, C, X, Y) chunk holding anything other than the floors."""
    if floors is None:
        return torch.ones(chunk.shape[0], dtype=torch.bool, device=chunk.device)
    floor = torch.as_tensor(floors, dtype=chunk.dtype, device=chunk.device).view(1, -1, 1, 1)
    return (chunk - floor).abs().amax(dim=(1, 2, 3)) > EMPTY_TOLERANCE
