"""Pure segmentation metrics on arrays: confusion counts, Dice, IoU, precision, recall, HD95.

Each function states its empty rule; `evaluate_case` applies the ``empty`` policy to missed
and spurious labels and `summarize` takes the means. The rule as a whole, and the layout the
results take in files, are in the `medseg.evaluation` package docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

FLOAT_METRICS = ("dice", "iou", "precision", "recall", "hd95")
COUNT_METRICS = ("tp", "fp", "fn", "n_ref", "n_pred")
EMPTY_POLICIES = ("worst", "exclude")


def confusion(ref: np.ndarray, pred: np.ndarray, label: int) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of one label value.

    Args:
        ref: integer reference label map, any shape, e.g. (X, Y, Z).
        pred: integer predicted label map of the same shape.
        label: the label value to score.

    Returns:
        (tp, fp, fn) voxel counts.
    """
    _check_shapes(ref, pred)
    return _mask_confusion(ref == label, pred == label)


def dice(tp: int, fp: int, fn: int) -> float:
    """Dice coefficient 2tp / (2tp + fp + fn); NaN when reference and prediction are both empty.

    When exactly one of them is empty the result is 0.
    """
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou(tp: int, fp: int, fn: int) -> float:
    """Intersection over union tp / (tp + fp + fn); NaN when both are empty, 0 when one is."""
    return _ratio(tp, tp + fp + fn)


def precision(tp: int, fp: int, fn: int) -> float:
    """Precision tp / (tp + fp); NaN when the prediction is empty (tp + fp == 0).

    `fn` is unused; it is accepted so that all metrics share one signature.
    """
    return _ratio(tp, tp + fp)


def recall(tp: int, fp: int, fn: int) -> float:
    """Recall (sensitivity) tp / (tp + fn); NaN when the reference is empty (tp + fn == 0)."""
    return _ratio(tp, tp + fn)


def hd95(ref_mask: np.ndarray, pred_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance between mask surfaces, in mm (MONAI).

    Axes of size 1 and their spacing are dropped first, so a 2D slice stored as (X, Y, 1) is
    scored in 2D: in 3D the erosion that finds the surface empties a one-voxel-thick mask, and
    the whole mask would count as surface, pulling the distance down.

    Args:
        ref_mask: boolean reference mask of shape (X, Y, Z) (any number of spatial axes).
        pred_mask: boolean predicted mask of the same shape.
        spacing: voxel size in mm along each array axis, e.g. (sx, sy, sz).

    Returns:
        The distance in mm; NaN when both masks are empty, inf when exactly one is empty
        (`evaluate_case` may replace that inf, see the `medseg.evaluation` docstring).
    """
    _check_shapes(ref_mask, pred_mask)
    _check_spacing(ref_mask.shape, spacing)
    ref_any, pred_any = bool(ref_mask.any()), bool(pred_mask.any())
    if not ref_any and not pred_any:
        return math.nan
    if ref_any != pred_any:
        return math.inf
    flat = tuple(axis for axis, size in enumerate(ref_mask.shape) if size == 1)
    ref_mask, pred_mask = ref_mask.squeeze(flat), pred_mask.squeeze(flat)
    spacing = [float(s) for axis, s in enumerate(spacing) if axis not in flat]
    if ref_mask.ndim == 0:  # a single voxel, set in both masks
        return 0.0
    from monai.metrics import compute_hausdorff_distance

    # MONAI wants one-hot (batch, channel, *spatial) arrays. Its own internals trigger a
    # deprecation warning (always_return_as_numpy) that means nothing to a medseg user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        distance = compute_hausdorff_distance(
            y_pred=np.asarray(pred_mask, dtype=bool)[None, None],
            y=np.asarray(ref_mask, dtype=bool)[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(distance.item())


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image's extent in mm: sqrt(sum((n * s)^2)) over the axes with n > 1.

    The extent is ``shape * spacing`` (the field of view, voxel edge to voxel edge), not
    ``(shape - 1) * spacing``, so this is larger than any distance between two voxel centres
    and a missed structure scored with it ranks below every found one. Axes of size 1 are
    left out, as in `hd95`, so (X, Y, 1) and (X, Y) give the same value.

    Args:
        shape: array shape, e.g. (X, Y, Z).
        spacing: voxel size in mm along each array axis.
    """
    _check_spacing(shape, spacing)
    extents = (n * float(s) for n, s in zip(shape, spacing, strict=True) if n > 1)
    return math.sqrt(sum(e**2 for e in extents))


def evaluate_case(
    ref: np.ndarray,
    pred: np.ndarray,
    labels: dict[int, str],
    spacing: Sequence[float],
    empty: str = "worst",
) -> dict[str, dict[str, float | int]]:
    """All metrics of one case for every foreground label.

    Args:
        ref: integer reference label map of shape (X, Y, Z).
        pred: integer predicted label map of the same shape.
        labels: label value -> name; value 0 (background) is not scored.
        spacing: voxel size in mm along each array axis, used for HD95.
        empty: ``"worst"``: a missed or spurious label gets HD95 = `image_diagonal` of `ref`,
            and a missed one precision 0; ``"exclude"``: the pure metrics' inf and NaN are kept,
            so means skip those cases (`medseg.evaluation` docstring).

    Returns:
        label name -> {"dice", "iou", "precision", "recall", "hd95", "tp", "fp", "fn",
        "n_ref", "n_pred"}.

    Raises:
        ValueError: different shapes, duplicate label names, label values in `ref` or `pred`
            that `labels` does not declare, or an unknown `empty` policy.
    """
    _check_policy(empty)
    _check_shapes(ref, pred)
    _check_declared(ref, labels, "reference")
    _check_declared(pred, labels, "prediction")
    foreground = {value: name for value, name in labels.items() if value != 0}
    if len(set(foreground.values())) != len(foreground):
        raise ValueError(f"label names must be unique, got {foreground}")
    worst = image_diagonal(ref.shape, spacing) if empty == "worst" else None
    return {
        name: _label_metrics(ref == value, pred == value, spacing, worst)
        for value, name in foreground.items()
    }


def summarize(per_case: dict[str, dict[str, dict[str, float | int]]]) -> dict[str, Any]:
    """Per-label means over cases, the missed and spurious counts, and the foreground mean.

    NaN and inf values are left out of each mean: a label absent from both sides, an undefined
    recall, and under ``empty="exclude"`` the HD95 and precision of missed or spurious cases
    (under ``"worst"`` they carry worst-case values and count). The missed and spurious counts
    come from ``n_ref`` and ``n_pred``, so they do not depend on the policy.

    Args:
        per_case: case name -> `evaluate_case` output.

    Returns:
        {"labels": {name: {"dice", "iou", "precision", "recall", "hd95", "n_cases",
        "n_missed", "n_spurious"}}, "foreground_mean": {"dice", "iou"}}, where the foreground
        mean is the mean over labels of the per-label means (labels with a NaN mean left out).
        A mean with no values is NaN.
    """
    names = list(dict.fromkeys(name for case in per_case.values() for name in case))
    per_label = {
        name: _label_summary([c[name] for c in per_case.values() if name in c]) for name in names
    }
    foreground = {m: _finite_mean(s[m] for s in per_label.values()) for m in ("dice", "iou")}
    return {"labels": per_label, "foreground_mean": foreground}


# --- helpers --------------------------------------------------------------------------------


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def _check_shapes(ref: np.ndarray, pred: np.ndarray) -> None:
    if ref.shape != pred.shape:
        raise ValueError(f"reference has shape {ref.shape} but prediction has {pred.shape}")


def _check_spacing(shape: Sequence[int], spacing: Sequence[float]) -> None:
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {tuple(spacing)} must have one value per axis of {tuple(shape)}")


def _check_policy(empty: str) -> None:
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {', '.join(EMPTY_POLICIES)}, got {empty!r}")


def _check_declared(array: np.ndarray, labels: dict[int, str], what: str) -> None:
    undeclared = sorted(set(np.unique(array).tolist()) - set(labels))
    if undeclared:
        raise ValueError(
            f"{what} holds label values {undeclared} not declared in the labels "
            f"{sorted(labels)}; pass the labels file the model was trained with"
        )


def _mask_confusion(ref_mask: np.ndarray, pred_mask: np.ndarray) -> tuple[int, int, int]:
    tp = int(np.count_nonzero(ref_mask & pred_mask))
    return tp, int(np.count_nonzero(pred_mask)) - tp, int(np.count_nonzero(ref_mask)) - tp


def _label_metrics(
    ref_mask: np.ndarray, pred_mask: np.ndarray, spacing: Sequence[float], worst: float | None
) -> dict[str, float | int]:
    """One label's metrics; `worst` (the worst HD95) replaces the undefined values of missed
    and spurious cases unless it is None (policy "exclude")."""
    tp, fp, fn = _mask_confusion(ref_mask, pred_mask)
    metrics: dict[str, float | int] = {
        "dice": dice(tp, fp, fn),
        "iou": iou(tp, fp, fn),
        "precision": precision(tp, fp, fn),
        "recall": recall(tp, fp, fn),
        "hd95": hd95(ref_mask, pred_mask, spacing),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_ref": tp + fn,
        "n_pred": tp + fp,
    }
    if worst is not None and _missed(metrics):
        metrics.update(precision=0.0, hd95=worst)
    elif worst is not None and _spurious(metrics):
        metrics.update(hd95=worst)  # recall stays NaN: an empty reference has nothing to find
    return metrics


def _missed(metrics: dict[str, float | int]) -> bool:
    return metrics["n_ref"] > 0 and metrics["n_pred"] == 0


def _spurious(metrics: dict[str, float | int]) -> bool:
    return metrics["n_ref"] == 0 and metrics["n_pred"] > 0


def _finite_mean(values: Iterable[float]) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _label_summary(rows: list[dict[str, float | int]]) -> dict[str, float | int]:
    summary: dict[str, float | int] = {m: _finite_mean(r[m] for r in rows) for m in FLOAT_METRICS}
    summary["n_cases"] = sum(1 for r in rows if not math.isnan(r["dice"]))
    summary["n_missed"] = sum(1 for r in rows if _missed(r))
    summary["n_spurious"] = sum(1 for r in rows if _spurious(r))
    return summary
