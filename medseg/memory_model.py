"""The planner's memory model: training memory of a network, the budget it must fit, and the
size of the preprocessed-data cache.

`estimate_memory_gib` is calibrated on CPU (docs/planning.md, "Calibration of the memory
estimate"); `memory_budget` turns `--memory-gb`/`--device` into a `MemoryBudget`, whose
`cache_gigabytes` is the host RAM left for caching the preprocessed cases (`cache_gib`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from medseg.config import DEVICES, ConfigError, ModelConfig, level_strides

HOST_RAM_FRACTION = 0.75
"""The in-memory cache of preprocessed cases may fill 75% of system RAM, less a CPU plan's
training budget (so 50% by default on CPU); the rest is left to the system, the data loader's
patches and validation."""

CPU_MEMORY_FRACTION = 0.25
"""Default CPU budget: a quarter of system RAM (the rest holds the cached dataset and others)."""
GPU_REFERENCE_GIB = 8.0
"""Default GPU budget: nnU-Net v2 plans for an 8 GB target (`gpu_memory_target_in_gb`) on any
GPU, so a plan does not depend on the card it was made on; `--memory-gb` asks for more."""
GPU_MEMORY_FRACTION = 0.8
"""On a GPU smaller than the reference, the budget is 80% of its memory: the estimate is not
calibrated on GPUs (see `OVERHEAD_GIB`) and the allocator fragments."""

GIB = 2**30

# Memory model, calibrated once with `nice -n 19 python scripts/calibrate_memory.py` (torch
# 2.13 CPU): two training steps of medseg's DynUNet (DiceCE, AdamW, fp32) on 7 configurations
# (3D 32^3 to 96x96x64, anisotropic strides, 2D 256^2, 2 to 118 classes, batch 1 to 4); the
# peak RSS increase less gradients and AdamW moments fits 4 bytes x batch x (13.9 x
# sum over levels of filters x voxels + 5.2 x classes x patch voxels). With the rounded
# factors below, every configuration of 0.4 GiB or more is within 13% (the 0.12 GiB one is 36%
# under; OVERHEAD_GIB absorbs that). A hippocampus run (patch 32x48x32, batch 4) peaked
# at 1.0 GB with its cached dataset and validation; this model gives 0.75 GiB for training.
FEATURE_FACTOR = 14.0
OUTPUT_FACTOR = 5.5
BYTES_PER_ELEMENT = {"cpu": 4, "cuda": 2}
"""fp32 activations on CPU; fp16 under AMP on CUDA (an approximation: norms keep fp32)."""
OVERHEAD_GIB = {"cpu": 0.5, "cuda": 1.0}
"""Memory besides the network's: the Python/torch/MONAI process on CPU (0.35 GiB measured with
the model code imported; training imports more), the CUDA context and cuDNN workspace on GPU
(assumed, not measured: no GPU was available for the calibration)."""
BYTES_PER_PARAMETER = 16
"""fp32 weight, gradient and AdamW's two moments."""


@dataclass(frozen=True)
class MemoryBudget:
    """The memory a training run may use.

    Attributes:
        device: "cpu" or "cuda" (resolved, never "auto").
        gigabytes: the training budget in GiB (2^30 bytes).
        source: where the number came from, for the summary.
        cache_gigabytes: host RAM the preprocessed cases may fill when cached in memory
            (`HOST_RAM_FRACTION`); inf = no limit.
    """

    device: str
    gigabytes: float
    source: str
    cache_gigabytes: float = math.inf


def memory_budget(memory_gb: float | None = None, device: str = "auto") -> MemoryBudget:
    """The training memory budget: `memory_gb`, else a GPU reference or a share of system RAM.

    Args:
        memory_gb: budget in GiB; None = on CUDA `GPU_REFERENCE_GIB`, or
            `GPU_MEMORY_FRACTION` of the GPU's memory when that is less; on CPU
            `CPU_MEMORY_FRACTION` of system RAM.
        device: auto (CUDA when available), cpu or cuda.

    Raises:
        ConfigError: unknown device, cuda without a GPU, or a non-positive budget.
    """
    import torch

    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {sorted(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available; use --device cpu or auto")
    if memory_gb is not None and not memory_gb > 0:
        raise ConfigError(f"--memory-gb must be > 0, got {memory_gb}")
    resolved = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    if memory_gb is not None:
        gigabytes, source = float(memory_gb), "--memory-gb"
    elif resolved == "cuda":
        gigabytes, source = _gpu_budget(torch.cuda.get_device_properties(0).total_memory / GIB)
    else:
        gigabytes, source = (
            ram * CPU_MEMORY_FRACTION,
            f"{CPU_MEMORY_FRACTION:.0%} of {ram:.0f} GiB RAM",
        )
    training_ram = gigabytes if resolved == "cpu" else 0.0
    return MemoryBudget(
        resolved, gigabytes, source, max(0.0, HOST_RAM_FRACTION * ram - training_ram)
    )


def _gpu_budget(total: float) -> tuple[float, str]:
    """The default budget on a GPU of `total` GiB, and where it comes from."""
    if total * GPU_MEMORY_FRACTION < GPU_REFERENCE_GIB:
        return total * GPU_MEMORY_FRACTION, f"{GPU_MEMORY_FRACTION:.0%} of a {total:.0f} GiB GPU"
    return GPU_REFERENCE_GIB, f"nnU-Net's reference; the GPU has {total:.0f} GiB"


def cache_gib(shapes: np.ndarray, n_channels: int, n_classes: int) -> float:
    """GiB the preprocessed cases of `shapes` (N, 3) take in memory: float32 image channels and
    the label map in its smallest signed integer type (`transforms.cached_label_dtype`)."""
    label_bytes = 1 if n_classes <= 128 else 2
    return float(shapes.prod(1).sum()) * (4 * n_channels + label_bytes) / GIB


def estimate_memory_gib(
    model: ModelConfig, in_channels: int, n_classes: int, batch: int, device: str
) -> float:
    """Estimated peak training memory in GiB: activations, parameters with AdamW state, overhead.

    See the calibration note at `FEATURE_FACTOR`; ``device`` is "cpu" (fp32) or "cuda" (AMP).
    """
    features, outputs = activation_elements(model, n_classes)
    activations = FEATURE_FACTOR * features + OUTPUT_FACTOR * outputs
    total = batch * BYTES_PER_ELEMENT[device] * activations
    total += BYTES_PER_PARAMETER * parameter_count(model, in_channels, n_classes)
    return total / GIB + OVERHEAD_GIB[device]


def activation_elements(model: ModelConfig, n_classes: int) -> tuple[int, int]:
    """Per sample: sum over levels of filters x voxels, and classes x the voxels of the outputs
    the loss sees: the patch, plus each deep-supervision head at the full grid or its own."""
    size = list(model.patch_size)
    features, grids = 0, []
    for filters, level in zip(model.filters, level_strides(model), strict=True):
        size = [s // k for s, k in zip(size, level, strict=True)]
        features += filters * math.prod(size)
        grids.append(math.prod(size))
    heads = grids[1 : 1 + model.deep_supervision]
    if model.deep_supervision_grid == "full":
        heads = [grids[0]] * len(heads)
    return features, n_classes * (grids[0] + sum(heads))


def parameter_count(model: ModelConfig, in_channels: int, n_classes: int) -> int:
    """Approximate DynUNet parameters: two convolutions per encoder level, an up-convolution
    and two convolutions (on the concatenated skip) per decoder level, a 1x1 output head."""
    kernel = 3**model.spatial_dims
    up = 2**model.spatial_dims
    f = list(model.filters)
    count = n_classes * f[0]
    for level, filters in enumerate(f):
        previous = in_channels if level == 0 else f[level - 1]
        count += kernel * (previous * filters + filters * filters)
        if level < len(f) - 1:
            count += up * f[level + 1] * filters + kernel * 3 * filters * filters
    return count
