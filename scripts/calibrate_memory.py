"""Calibrate the planner's training-memory estimate (medseg.memory_model.FEATURE_FACTOR etc.).

Each configuration runs in a fresh process: build medseg's U-Net, then two training steps as
medseg.training runs them (channels-last 3D input, DiceCE loss on the softmax, backward, AdamW)
on CPU in fp32, and record the peak resident memory (Linux ``VmHWM``) above the level after the
model and batch were built, less gradients and AdamW moments (12 bytes per parameter, which the
planner counts separately). The parent then fits

    peak bytes = 4 x batch x (FEATURE_FACTOR x sum_l filters_l x voxels_l
                              + OUTPUT_FACTOR x classes x patch voxels)

by least squares and prints measured against estimated memory per configuration, and the
process baseline (python + torch + MONAI + medseg imported), used as OVERHEAD_GIB["cpu"].

Example (the docs/planning.md numbers)::

    nice -n 19 python scripts/calibrate_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medseg.config import ModelConfig

# (spatial_dims, patch, strides or None, filters, batch, classes, deep supervision, its grid)
CASES = [
    (3, [32, 32, 32], None, [16, 32, 64, 128], 2, 3, 0, "full"),
    (3, [64, 64, 64], None, [16, 32, 64, 128, 256], 2, 3, 0, "full"),
    (3, [96, 96, 64], None, [16, 32, 64, 128, 256, 256], 2, 2, 0, "full"),
    (3, [64, 64, 64], None, [16, 32, 64, 128], 1, 32, 0, "full"),
    (3, [48, 48, 48], None, [16, 32, 64, 128], 2, 118, 0, "full"),
    (
        3,
        [128, 128, 16],
        [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
        [16, 32, 64, 128, 256],
        2,
        2,
        0,
        "full",
    ),
    (2, [256, 256], None, [16, 32, 64, 128, 256, 256], 4, 3, 0, "full"),
]
DEEP_SUPERVISION_CASES = [
    (3, [64, 64, 64], None, [16, 32, 64, 128, 256], 2, 3, 2, "full"),
    (3, [48, 48, 48], None, [16, 32, 64, 128], 2, 118, 2, "full"),
    (3, [48, 48, 48], None, [16, 32, 64, 128], 2, 118, 2, "heads"),
]
"""Checked against the estimate, not fitted (``--deep-supervision``)."""


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model_config(spec: list) -> ModelConfig:
    """The ModelConfig of one CASES entry."""
    from medseg.config import ModelConfig

    dims, patch, strides, filters, _batch, _classes, deep, grid = spec
    return ModelConfig(
        spatial_dims=dims,
        patch_size=tuple(patch),
        filters=tuple(filters),
        strides=None if strides is None else tuple(tuple(s) for s in strides),
        deep_supervision=deep,
        deep_supervision_grid=grid,
    )


def measure(spec: list) -> dict:
    """Peak memory of one training step (run in a fresh process)."""
    import torch

    from medseg.losses import build_loss
    from medseg.models import build_model

    dims, patch, _strides, _filters, batch, classes, deep, grid = spec
    torch.set_num_threads(1)
    baseline = _rss_kib("VmRSS")
    net = build_model(_model_config(spec), 1, classes).train()
    params = sum(p.numel() for p in net.parameters())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = build_loss("dice_ce", deep, grid)
    memory = torch.channels_last_3d if dims == 3 else torch.contiguous_format
    x = torch.randn(batch, 1, *patch).contiguous(memory_format=memory)
    y = torch.randint(0, classes, (batch, 1, *patch))
    before = _rss_kib("VmRSS")
    for _ in range(2):  # the second step sees AdamW's state and the allocator's steady state
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()  # one sample as is (training doubles it: run_network)
        optimizer.step()
    peak = _rss_kib("VmHWM")
    # gradients and AdamW's two moments (the weights were allocated before `before`)
    step_bytes = (peak - before) * 1024 - 12 * params
    return {"baseline_kib": baseline, "step_bytes": step_bytes, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--deep-supervision",
        action="store_true",
        help="also measure configurations with deep supervision (compared, not fitted)",
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return

    from medseg.memory_model import (
        FEATURE_FACTOR,
        OUTPUT_FACTOR,
        activation_elements,
        parameter_count,
    )

    rows = []
    for spec in CASES + (DEEP_SUPERVISION_CASES if args.deep_supervision else []):
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        batch, classes = spec[4], spec[5]
        model = _model_config(spec)
        features, outputs = activation_elements(model, classes)
        rows.append((spec, result, 4 * batch * features, 4 * batch * outputs))
        estimated_params = parameter_count(model, 1, classes)
        print(f"{spec}: {result['params']} parameters, planner estimates {estimated_params}")
    fitted = [r for r in rows if r[0] not in DEEP_SUPERVISION_CASES]
    a = np.array([[r[2], r[3]] for r in fitted], dtype=float)
    b = np.array([r[1]["step_bytes"] for r in fitted], dtype=float)
    (feature_factor, output_factor), *_ = np.linalg.lstsq(a, b, rcond=None)
    print(f"fit: FEATURE_FACTOR={feature_factor:.1f} OUTPUT_FACTOR={output_factor:.1f}")
    print(f"in medseg.memory_model: FEATURE_FACTOR={FEATURE_FACTOR} OUTPUT_FACTOR={OUTPUT_FACTOR}")
    print(
        "dims patch strides filters batch classes deep-supervision grid"
        " | measured GiB | planner estimate GiB"
    )
    for spec, result, f_bytes, o_bytes in rows:
        estimate = FEATURE_FACTOR * f_bytes + OUTPUT_FACTOR * o_bytes
        print(f"{spec} | {result['step_bytes'] / 2**30:.2f} | {estimate / 2**30:.2f}")
    baselines = [r[1]["baseline_kib"] / 2**20 for r in rows]
    print(f"process baseline (imports): {max(baselines):.2f} GiB")


if __name__ == "__main__":
    main()
