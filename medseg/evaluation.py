"""Segmentation metrics: pure functions on arrays, then a thin layer over folders of label maps.

Empty rule of the pure metrics (each states it): a ratio whose denominator is 0 is NaN, so Dice
and IoU are NaN when reference and prediction are both empty for a label, and 0 when exactly one
is; precision is NaN when nothing is predicted, recall NaN when the reference is empty. HD95 is
NaN when both are empty and inf when exactly one is.

A label is *missed* in a case when only the reference holds it, *spurious* when only the
prediction does. `evaluate_case` scores these by the ``empty`` policy (`EMPTY_POLICIES`):

- ``"worst"`` (default, as Metrics Reloaded (Maier-Hein et al., Nat. Methods 2024) asks, so
  that failures cannot vanish from a mean): their HD95 is the image diagonal in mm
  (`image_diagonal`), and a missed label's precision (0/0) is 0. A spurious label's recall stays
  NaN: an empty reference has nothing to recall, and Metrics Reloaded's reference code also
  leaves it undefined; Dice, IoU and precision 0 and the worst HD95 already score the error.
- ``"exclude"``: the pure inf and NaN are kept, so means skip those cases (the earlier behaviour).

Either way the summary counts the missed and spurious cases per label. Means skip NaN and inf;
JSON has no NaN/inf tokens, so `write_results` writes both as ``null`` (and the CSV an empty
cell). Which case a value stood for can be read from that row's ``n_ref`` and ``n_pred``.

`evaluate_folders` returns, and `write_results` writes, this layout (background is listed under
"labels" so the block reads back with `medseg.datasets.read_label_names`; metrics cover only
foreground labels, keyed by name; the tumour was missed on a 512 x 512 x 100 grid of
0.8 x 0.8 x 2.5 mm, whose diagonal is 630.9 mm)::

    {
      "labels": {"0": "background", "1": "liver", "2": "tumour"},
      "empty": "worst",
      "cases": {
        "case_001": {
          "liver": {"dice": 0.95, "iou": 0.905, "precision": 0.96, "recall": 0.94,
                    "hd95": 2.1, "tp": 9400, "fp": 392, "fn": 600,
                    "n_ref": 10000, "n_pred": 9792},
          "tumour": {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                     "hd95": 630.9, "tp": 0, "fp": 0, "fn": 120, "n_ref": 120, "n_pred": 0}
        }
      },
      "mean": {
        "labels": {
          "liver": {"dice": 0.95, "iou": 0.905, "precision": 0.96, "recall": 0.94,
                    "hd95": 2.1, "n_cases": 1, "n_missed": 0, "n_spurious": 0},
          "tumour": {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                     "hd95": 630.9, "n_cases": 1, "n_missed": 1, "n_spurious": 0}
        },
        "foreground_mean": {"dice": 0.475, "iou": 0.4525}
      }
    }

``empty`` is the policy the values were scored with. ``n_cases`` counts the cases where the label
is in the reference or the prediction (Dice is defined); ``n_missed`` and ``n_spurious`` count
the missed and spurious cases among them. The CSV next to the JSON has the columns in
`CSV_COLUMNS`: one row per (case, label), then one row per label with case ``mean`` (count
columns empty).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io import atomic_path, is_image_file, load_labels, same_grid, strip_suffix

log = logging.getLogger(__name__)

FLOAT_METRICS = ("dice", "iou", "precision", "recall", "hd95")
COUNT_METRICS = ("tp", "fp", "fn", "n_ref", "n_pred")
CSV_COLUMNS = ("case", "label", *FLOAT_METRICS, *COUNT_METRICS)
EMPTY_POLICIES = ("worst", "exclude")


class EvaluationError(ValueError):
    """Prediction and reference folders do not pair up (a user error)."""


# --- pure metrics ---------------------------------------------------------------------------


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
        (`evaluate_case` may replace that inf, see the module docstring).
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
            so means skip those cases (module docstring).

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


# --- folders and files ----------------------------------------------------------------------


def evaluate_folders(
    pred_dir: Path, ref_dir: Path, labels: dict[int, str], empty: str = "worst"
) -> dict[str, Any]:
    """Score every reference label map against the prediction file of the same name.

    Files pair by name without image suffix (``case_001.nii.gz`` <-> ``case_001.nii``).
    Predictions without a reference are ignored with a warning. Spacing for HD95, and the
    image diagonal for the worst-case HD95, come from the reference.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps.
        labels: label value -> name, background 0 included (`medseg.datasets.read_label_names`).
        empty: policy for missed and spurious labels, ``"worst"`` or ``"exclude"``
            (`evaluate_case`).

    Returns:
        {"labels": {str(value): name}, "empty": policy, "cases": {case: `evaluate_case`
        output}, "mean": `summarize` output}; the layout is shown in the module docstring.

    Raises:
        EvaluationError: an unknown policy, a folder is missing or holds no label maps, a
            reference has no prediction, a pair differs in shape or affine, or a file holds
            undeclared labels.
        medseg.io.ImageError: a file cannot be read as a label map.
    """
    try:
        _check_policy(empty)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    refs = _image_files(Path(ref_dir), "reference")
    preds = _image_files(Path(pred_dir), "prediction")
    _check_pairing(refs, preds, Path(pred_dir))
    cases = {case: _evaluate_pair(refs[case], preds[case], labels, empty) for case in sorted(refs)}
    return {
        "labels": {str(value): name for value, name in labels.items()},
        "empty": empty,
        "cases": cases,
        "mean": summarize(cases),
    }


def write_results(results: dict[str, Any], json_path: Path) -> tuple[Path, Path]:
    """Write `evaluate_folders` results as JSON and as a CSV with the same stem, atomically.

    NaN and inf are written as ``null`` in the JSON (it has no such tokens) and as empty cells
    in the CSV.

    Returns:
        (json_path, csv_path).
    """
    json_path = Path(json_path)
    csv_path = json_path.with_suffix(".csv")
    text = json.dumps(_json_safe(results), indent=2, allow_nan=False)
    with atomic_path(json_path) as tmp:
        tmp.write_text(text + "\n")
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_rows(results))
    log.info("wrote %s and %s", json_path, csv_path)
    return json_path, csv_path


def format_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for printing the per-label means (the CLI renders them with rich).

    Returns:
        (header, rows): one row per label with mean Dice, IoU, HD95 (mm), the case count and
        the missed and spurious counts, then a "foreground mean" row; undefined values show
        as "-".
    """
    header = ["label", "dice", "iou", "hd95 (mm)", "cases", "missed", "spurious"]
    mean = results["mean"]
    rows = [
        [name, _fmt(s["dice"]), _fmt(s["iou"]), _fmt(s["hd95"])]
        + [str(s[count]) for count in ("n_cases", "n_missed", "n_spurious")]
        for name, s in mean["labels"].items()
    ]
    fg = mean["foreground_mean"]
    rows.append(["foreground mean", _fmt(fg["dice"]), _fmt(fg["iou"]), "-", "-", "-", "-"])
    return header, rows


def empty_rule_note(empty: str) -> str:
    """One sentence for readers of a table: how the means treat empty labels under `empty`."""
    _check_policy(empty)
    if empty == "exclude":
        return (
            "Dice and IoU skip cases where a label is absent from both sides; HD95 (mm) also "
            "skips missed and spurious cases (one side empty), and precision skips missed ones."
        )
    return (
        "Dice and IoU skip cases where a label is absent from both sides. A missed label (in the "
        "reference, not predicted) or a spurious one (predicted, not in the reference) scores "
        "HD95 = the image diagonal in mm, a missed one also precision 0; recall skips spurious "
        "cases, where it is undefined."
    )


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


def _image_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: {what} folder not found")
    files: dict[str, Path] = {}
    # Slicer .seg.nrrd files sit beside predicted label maps; they are not label maps to score.
    candidates = (
        p for p in folder.iterdir() if is_image_file(p) and not p.name.endswith(".seg.nrrd")
    )
    for path in sorted(candidates):
        case = strip_suffix(path.name)
        if case in files:
            raise EvaluationError(
                f"{folder}: {files[case].name} and {path.name} are the same case; keep one"
            )
        files[case] = path
    if not files:
        raise EvaluationError(f"{folder}: {what} folder holds no image files")
    return files


def _check_pairing(refs: dict[str, Path], preds: dict[str, Path], pred_dir: Path) -> None:
    missing = sorted(set(refs) - set(preds))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise EvaluationError(
            f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} reference cases "
            f"({shown}); predict them first or remove them from the reference folder"
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning(
            "ignoring %d predictions without a reference: %s", len(extra), ", ".join(extra[:5])
        )


def _evaluate_pair(
    ref_path: Path, pred_path: Path, labels: dict[int, str], empty: str
) -> dict[str, dict[str, float | int]]:
    ref, pred = load_labels(ref_path), load_labels(pred_path)
    if ref.array.shape != pred.array.shape:
        raise EvaluationError(
            f"{pred_path} has shape {pred.array.shape} but {ref_path} has {ref.array.shape}; "
            "predictions must lie on the reference grid"
        )
    if not same_grid(ref.affine, pred.affine, ref.array.shape, pred.array.shape):
        raise EvaluationError(
            f"{pred_path} and {ref_path} have different affines; predictions must lie on the "
            "reference grid (resample the prediction with nearest neighbour)"
        )
    try:
        metrics = evaluate_case(ref.array, pred.array, labels, ref.spacing, empty)
    except ValueError as err:
        raise EvaluationError(f"{pred_path} vs {ref_path}: {err}") from None
    log.debug("evaluated %s", strip_suffix(ref_path.name))
    return metrics


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def _csv_cell(value: float | int) -> str:
    return "" if isinstance(value, float) and not math.isfinite(value) else str(value)


def _csv_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = [
        [case, name, *(_csv_cell(m[c]) for c in CSV_COLUMNS[2:])]
        for case, per_label in results["cases"].items()
        for name, m in per_label.items()
    ]
    for name, s in results["mean"]["labels"].items():
        means = [_csv_cell(s[m]) for m in FLOAT_METRICS]
        rows.append(["mean", name, *means, *[""] * len(COUNT_METRICS)])
    return rows


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "-"
