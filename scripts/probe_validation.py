"""Re-score trained runs' validation cases under inference variants, without training.

Answers "is the model the limit, or how it is applied?" for a finished run: the held-out cases
of the first run's fold are predicted in the preprocessed space (the same grid as the label for
1 mm data such as hippocampus; no post-processing) with

- ``--overlap F``: sliding-window overlap,
- ``--whole-image``: one window covering the whole (padded) image instead of the trained patch,
- ``--background-bias B``: background probability multiplied by exp(B) before the argmax
  (B > 0 shrinks the foreground; a test of systematic over-segmentation),
- several run folders: their softmax outputs averaged (an ensemble),
- ``--training-cases N``: the first N of the run's *training* cases instead (under- or
  over-fitting: Dice on cases the model has seen against the held-out Dice),
- ``--tta AXES``: mirrored copies along these spatial axes averaged (0=x, 1=y, 2=z), whatever
  the run was trained to mirror (``medseg predict --tta`` only uses the trained axes),
- ``--split-axis AXIS`` (two foreground labels only): how planar the split between the two
  labels is along AXIS (slices holding both labels, in the reference and in the prediction), and
  the mean Dice once the predicted foreground is re-split at one plane across AXIS: at the plane
  that agrees most with the prediction, and at the plane that fits the reference best (an upper
  bound: what placing the plane right would give); and how far the prediction's own plane sits
  from the reference's (mean and SD in slices: a mean far from 0 would be a bias a shift could
  remove).

Examples::

    python scripts/probe_validation.py runs/bench_hippo
    python scripts/probe_validation.py runs/bench_hippo --whole-image
    python scripts/probe_validation.py runs/bench_hippo --background-bias 0.25
    python scripts/probe_validation.py runs/a runs/b runs/c        # same fold, averaged
    python scripts/probe_validation.py runs/bench_hippo --training-cases 40
    python scripts/probe_validation.py runs/bench_hippo --tta 0
    python scripts/probe_validation.py runs/bench_hippo --split-axis 1   # Anterior/Posterior

Also printed: the Dice of all foreground labels taken as one (how much of the per-label error is
the boundary between labels). Last line: mean Dice over the cases per label, ``NAME=0.XXXX``
each, then ``mean=0.XXXX``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset

from medseg.config import downsampling_factors
from medseg.evaluation import confusion, dice
from medseg.inference import Window, sliding_window_probabilities, use_physical_cores
from medseg.models import run_network
from medseg.runs import Run, load_run
from medseg.transforms import IMAGE, LABEL, val_transforms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders trained on the same fold")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--whole-image", action="store_true")
    parser.add_argument("--background-bias", type=float, default=0.0)
    parser.add_argument("--training-cases", type=int, default=0, help="score N training cases")
    parser.add_argument("--tta", type=int, nargs="*", default=[], help="axes mirrored at test time")
    parser.add_argument("--split-axis", type=int, choices=(0, 1, 2), help="see the module doc")
    args = parser.parse_args()
    use_physical_cores()
    runs = [load_run(path, "cpu") for path in args.runs]
    info = json.loads((args.runs[0] / "run.json").read_text())
    for path in args.runs[1:]:
        if json.loads((path / "run.json").read_text())["val_cases"] != info["val_cases"]:
            raise SystemExit(f"{path}: validated on other cases than {args.runs[0]}")
    labels = {v: n for v, n in runs[0].plan.labels.items() if v != 0}
    scores: dict[int, list[float]] = {v: [] for v in labels}
    union: list[float] = []  # all foreground labels as one: how much is the labels' split
    if args.split_axis is not None and len(labels) != 2:
        raise SystemExit(f"--split-axis needs two foreground labels, the run has {len(labels)}")
    planes: list[tuple[int, int, float, float, int]] = []
    names = info["train_cases"][: args.training_cases] if args.training_cases else info["val_cases"]
    for item in Dataset(_items(info["dataset"], names), val_transforms(runs[0].plan)):
        image = item[IMAGE].as_tensor()
        probs = sum(_probabilities(run, image, args) for run in runs)
        probs[0] *= math.exp(args.background_bias)
        pred = torch.argmax(probs, 0).numpy()
        ref = np.asarray(item[LABEL][0]).astype(np.int64)
        for v in labels:
            scores[v].append(dice(*confusion(ref, pred, v)))
        union.append(dice(*confusion((ref > 0).astype(np.int64), (pred > 0).astype(np.int64), 1)))
        if args.split_axis is not None:
            planes.append(_plane_split(ref, pred, args.split_axis, tuple(labels)))
    means = {name: float(np.mean(scores[v])) for v, name in labels.items()}
    kind = "training" if args.training_cases else "validation"
    print(f"{len(runs)} run(s), {len(scores[next(iter(labels))])} {kind} cases")
    print(f"all foreground labels as one label: Dice {np.mean(union):.4f}")
    if planes:
        mixed_ref, mixed_pred, own, best, offset = np.array(planes, dtype=float).T
        print(
            f"split along axis {args.split_axis}: slices holding both labels per case: reference "
            f"{mixed_ref.mean():.2f} (none in {int((mixed_ref == 0).sum())} of {len(planes)} "
            f"cases), prediction {mixed_pred.mean():.2f}"
        )
        print(
            f"predicted foreground re-split at one plane: Dice {own.mean():.4f} at the "
            f"prediction's plane, {best.mean():.4f} at the reference's best plane"
        )
        print(
            f"prediction's plane minus the reference's, in slices: mean {offset.mean():+.2f}, "
            f"SD {offset.std():.2f}"
        )
    cells = [f"{name}={value:.4f}" for name, value in means.items()]
    print(" ".join([*cells, f"mean={np.mean(list(means.values())):.4f}"]))


def _plane_split(
    ref: np.ndarray, pred: np.ndarray, axis: int, labels: tuple[int, ...]
) -> tuple[int, int, float, float, int]:
    """Slices along `axis` holding both labels (reference, prediction); the mean Dice of the
    predicted foreground split at one plane: the plane (and side) agreeing most with the
    prediction, and the one scoring best against the reference; and the prediction's own plane
    minus the reference's own plane (each the plane agreeing most with its volume)."""
    other = tuple(a for a in range(ref.ndim) if a != axis)

    def mixed(volume: np.ndarray) -> int:
        return int(np.logical_and(*((volume == v).any(axis=other) for v in labels)).sum())

    def score(k: int, low: int, high: int) -> float:
        split = np.where(pred > 0, _split(pred.shape, axis, k, low, high), 0)
        return float(np.mean([dice(*confusion(ref, split, v)) for v in labels]))

    splits = _splits(pred.shape[axis], labels)
    own = splits[_own_split(pred, axis, labels)]  # the reference must not decide it
    best = max(score(*s) for s in splits)
    offset = own[0] - splits[_own_split(ref, axis, labels)][0]
    return mixed(ref), mixed(pred), score(*own), best, offset


def _splits(size: int, labels: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Every (plane, label below it, label above it) across an axis of `size` slices."""
    return [(k, low, high) for k in range(size + 1) for low, high in (labels, labels[::-1])]


def _split(shape: tuple[int, ...], axis: int, k: int, low: int, high: int) -> np.ndarray:
    return np.where(np.indices(shape)[axis] < k, low, high)


def _own_split(volume: np.ndarray, axis: int, labels: tuple[int, ...]) -> int:
    """Index in `_splits` of the split whose labels agree most with the volume's foreground
    (ties: the first)."""
    foreground = volume > 0
    agreement = [
        int((_split(volume.shape, axis, *s) == volume)[foreground].sum())
        for s in _splits(volume.shape[axis], labels)
    ]
    return int(np.argmax(agreement))


def _items(dataset: str, names: list[str]) -> list[dict[str, object]]:
    root = Path(dataset)
    return [
        {
            IMAGE: [str(root / "imagesTr" / f"{name}.nii.gz")],
            LABEL: str(root / "labelsTr" / f"{name}.nii.gz"),
        }
        for name in names
    ]


def _probabilities(run: Run, image: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    net = run.network.eval()
    patch = tuple(run.config.model.patch_size)
    if args.whole_image:
        factors = downsampling_factors(run.config.model)
        patch = tuple(
            max(p, math.ceil(s / f) * f)
            for p, s, f in zip(patch, image.shape[1:], factors, strict=True)
        )

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return run_network(net, x)

    window = Window(patch, args.overlap, 2, tuple(args.tta))
    return sliding_window_probabilities(predictor, image, window)


if __name__ == "__main__":
    main()
