"""Evaluation of a folder of predictions against a folder of references, and its files.

Pairs files by case name, scores each pair with `medseg.evaluation.metrics.evaluate_case`,
writes the JSON and CSV laid out as the `medseg.evaluation` package docstring shows, and
formats the per-label means for the CLI table and the HTML report.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from medseg.evaluation.metrics import (
    COUNT_METRICS,
    FLOAT_METRICS,
    _check_policy,
    evaluate_case,
    summarize,
)
from medseg.io import atomic_path, is_image_file, load_labels, same_grid, strip_suffix

log = logging.getLogger(__name__)

CSV_COLUMNS = ("case", "label", *FLOAT_METRICS, *COUNT_METRICS)


class EvaluationError(ValueError):
    """Prediction and reference folders do not pair up (a user error)."""


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
        output}, "mean": `summarize` output}; the layout is shown in the `medseg.evaluation`
        docstring.

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
