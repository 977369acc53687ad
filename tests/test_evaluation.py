"""Metrics on hand-computed arrays, and folder evaluation on tiny NIfTI files."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.evaluation import (
    EvaluationError,
    confusion,
    dice,
    evaluate_case,
    evaluate_folders,
    format_table,
    hd95,
    iou,
    precision,
    recall,
    summarize,
    write_results,
)

LABELS = {0: "background", 1: "liver", 2: "tumour"}
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])

# 4x4x1 maps, drawn row by row (axis 0 down, axis 1 across).
REF = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 2, 0],
        [0, 0, 0, 0],
    ]
)[..., None]
PRED = np.array(
    [
        [1, 1, 1, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 2],
    ]
)[..., None]


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (1, (3, 1, 1)),  # liver: 3 shared, (0,2) extra, (1,1) missed
        (2, (0, 1, 1)),  # tumour: no overlap
        (0, (9, 2, 2)),  # background: 11 ref, 11 pred, 9 shared
        (5, (0, 0, 0)),  # absent everywhere
    ],
)
def test_confusion_counts_hand_computed(label: int, expected: tuple[int, int, int]) -> None:
    assert confusion(REF, PRED, label) == expected


def test_confusion_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion(REF, PRED[:3], 1)


@pytest.mark.parametrize(
    ("metric", "counts", "expected"),
    [
        (dice, (3, 1, 1), 6 / 8),
        (iou, (3, 1, 1), 3 / 5),
        (precision, (3, 1, 1), 3 / 4),
        (recall, (3, 1, 1), 3 / 4),
        (dice, (2, 0, 2), 4 / 6),
        (iou, (2, 0, 2), 2 / 4),
        (precision, (2, 0, 2), 1.0),
        (recall, (2, 0, 2), 2 / 4),
        (dice, (0, 1, 1), 0.0),
    ],
)
def test_metric_values_hand_computed(metric, counts: tuple[int, int, int], expected: float) -> None:
    assert metric(*counts) == pytest.approx(expected)


@pytest.mark.parametrize("metric", [dice, iou, precision, recall])
def test_metric_is_nan_when_both_empty(metric) -> None:
    assert math.isnan(metric(0, 0, 0))


@pytest.mark.parametrize(
    ("metric", "counts", "expected"),
    [
        (dice, (0, 5, 0), 0.0),  # reference empty
        (dice, (0, 0, 5), 0.0),  # prediction empty
        (iou, (0, 5, 0), 0.0),
        (iou, (0, 0, 5), 0.0),
        (precision, (0, 0, 5), math.nan),  # nothing predicted
        (recall, (0, 5, 0), math.nan),  # nothing to find
        (precision, (0, 5, 0), 0.0),
        (recall, (0, 0, 5), 0.0),
    ],
)
def test_metric_when_one_side_empty(metric, counts: tuple[int, int, int], expected: float) -> None:
    assert metric(*counts) == pytest.approx(expected, nan_ok=True)


def _point(shape: tuple[int, ...], index: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[index] = True
    return mask


@pytest.mark.parametrize(
    ("offset", "spacing", "expected"),
    [
        ((2, 0, 0), (1.5, 1.0, 1.0), 3.0),  # 2 voxels along the 1.5 mm axis
        ((0, 2, 0), (1.5, 1.0, 1.0), 2.0),
        ((0, 0, 3), (1.0, 1.0, 2.5), 7.5),
        ((0, 0, 0), (1.5, 1.0, 1.0), 0.0),
    ],
)
def test_hd95_single_voxels_anisotropic(offset, spacing, expected: float) -> None:
    shape = (6, 6, 6)
    ref = _point(shape, (1, 1, 1))
    pred = _point(shape, tuple(1 + o for o in offset))
    assert hd95(ref, pred, spacing) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ref_any", "pred_any", "check"),
    [(False, False, math.isnan), (True, False, math.isinf), (False, True, math.isinf)],
)
def test_hd95_empty_rule(ref_any: bool, pred_any: bool, check) -> None:
    shape = (4, 4, 4)
    empty = np.zeros(shape, dtype=bool)
    ref = _point(shape, (1, 1, 1)) if ref_any else empty
    pred = _point(shape, (2, 2, 2)) if pred_any else empty
    assert check(hd95(ref, pred, (1.0, 1.0, 1.0)))


def test_evaluate_case_per_label_metrics() -> None:
    result = evaluate_case(REF, PRED, LABELS, (1.0, 1.0, 1.0))
    assert list(result) == ["liver", "tumour"]
    liver = result["liver"]
    counts = [liver[k] for k in ("tp", "fp", "fn", "n_ref", "n_pred")]
    assert counts == [3, 1, 1, 4, 4]
    assert liver["dice"] == pytest.approx(0.75)
    assert liver["iou"] == pytest.approx(0.6)
    tumour = result["tumour"]
    assert tumour["dice"] == 0.0
    assert tumour["hd95"] == pytest.approx(math.sqrt(2))  # (2,2) to (3,3) in plane


def test_evaluate_case_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(REF, PRED[:3], LABELS, (1.0, 1.0, 1.0))


def test_evaluate_case_names_undeclared_prediction_values() -> None:
    pred = PRED.copy()
    pred[0, 0, 0], pred[3, 0, 0] = 7, 9
    with pytest.raises(ValueError, match=r"prediction holds label values \[7, 9\]"):
        evaluate_case(REF, pred, LABELS, (1.0, 1.0, 1.0))


def _row(dice_: float, hd: float) -> dict[str, float | int]:
    return {"dice": dice_, "iou": dice_, "precision": dice_, "recall": dice_, "hd95": hd}


def test_summarize_excludes_nan_and_infinite_hd95() -> None:
    per_case = {
        "a": {"liver": _row(0.8, 2.0), "tumour": _row(math.nan, math.nan)},
        "b": {"liver": _row(0.6, 4.0), "tumour": _row(0.0, math.inf)},
        "c": {"liver": _row(math.nan, math.nan), "tumour": _row(0.5, 1.0)},
    }
    summary = summarize(per_case)
    liver, tumour = summary["labels"]["liver"], summary["labels"]["tumour"]
    assert liver["dice"] == pytest.approx(0.7)
    assert liver["hd95"] == pytest.approx(3.0)
    assert (liver["n_cases"], liver["n_hd95_inf"]) == (2, 0)
    assert tumour["dice"] == pytest.approx(0.25)
    assert tumour["hd95"] == pytest.approx(1.0)
    assert (tumour["n_cases"], tumour["n_hd95_inf"]) == (2, 1)
    assert summary["foreground_mean"]["dice"] == pytest.approx((0.7 + 0.25) / 2)


def test_summarize_label_never_present_is_nan_and_left_out_of_foreground() -> None:
    summary = summarize({"a": {"liver": _row(0.8, 1.0), "tumour": _row(math.nan, math.nan)}})
    assert math.isnan(summary["labels"]["tumour"]["dice"])
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.8)


def _write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    _write(ref_dir / "case_a.nii.gz", REF)
    _write(pred_dir / "case_a.nii.gz", PRED)
    _write(ref_dir / "case_b.nii.gz", REF)
    _write(pred_dir / "case_b.nii", REF)  # perfect, other suffix
    return pred_dir, ref_dir


def test_evaluate_folders_pairs_by_name(folders: tuple[Path, Path], caplog) -> None:
    pred_dir, ref_dir = folders
    _write(pred_dir / "extra.nii.gz", PRED)
    with caplog.at_level(logging.WARNING, logger="medseg.evaluation"):
        results = evaluate_folders(pred_dir, ref_dir, LABELS)
    assert "extra" in caplog.text
    assert results["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert list(results["cases"]) == ["case_a", "case_b"]
    assert results["cases"]["case_a"]["liver"]["dice"] == pytest.approx(0.75)
    assert results["cases"]["case_b"]["liver"]["dice"] == pytest.approx(1.0)
    # spacing (1.5, 1, 2) from the affine: tumour voxels (2,2) and (3,3) are sqrt(1.5^2 + 1) apart
    assert results["cases"]["case_a"]["tumour"]["hd95"] == pytest.approx(math.sqrt(3.25))
    assert results["mean"]["labels"]["liver"]["dice"] == pytest.approx(0.875)
    assert results["mean"]["foreground_mean"]["dice"] == pytest.approx((0.875 + 0.5) / 2)


def test_evaluate_folders_missing_prediction(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    (pred_dir / "case_b.nii").unlink()
    with pytest.raises(EvaluationError, match=r"no prediction for 1 of 2 .*case_b"):
        evaluate_folders(pred_dir, ref_dir, LABELS)


def test_evaluate_folders_shape_mismatch(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    _write(pred_dir / "case_a.nii.gz", np.zeros((4, 4, 2)))
    expected = r"pred/case_a\.nii\.gz has shape .*ref/case_a\.nii\.gz"
    with pytest.raises(EvaluationError, match=expected):
        evaluate_folders(pred_dir, ref_dir, LABELS)


def test_evaluate_folders_affine_mismatch(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    _write(pred_dir / "case_a.nii.gz", PRED, affine=np.eye(4))
    with pytest.raises(EvaluationError, match="different affines"):
        evaluate_folders(pred_dir, ref_dir, LABELS)


def test_write_results_strict_json_and_csv(folders: tuple[Path, Path], tmp_path: Path) -> None:
    results = evaluate_folders(*folders, LABELS)
    json_path, csv_path = write_results(results, tmp_path / "out" / "metrics.json")
    assert csv_path == tmp_path / "out" / "metrics.csv"

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(json_path.read_text(), parse_constant=reject)
    assert data["cases"]["case_b"]["tumour"]["dice"] == 1.0
    assert data["cases"]["case_a"]["tumour"]["precision"] == 0.0
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["label"]) for r in rows] == [
        ("case_a", "liver"),
        ("case_a", "tumour"),
        ("case_b", "liver"),
        ("case_b", "tumour"),
        ("mean", "liver"),
        ("mean", "tumour"),
    ]
    assert float(rows[0]["dice"]) == pytest.approx(0.75)
    assert rows[0]["tp"] == "3"
    assert rows[4]["tp"] == ""


def test_write_results_nonfinite_become_null(tmp_path: Path) -> None:
    ref = np.zeros((3, 3, 1), dtype=int)
    pred = ref.copy()
    pred[1, 1, 0] = 1  # liver predicted but absent: hd95 inf; tumour absent: NaN
    cases = {"x": evaluate_case(ref, pred, LABELS, (1.0, 1.0, 1.0))}
    results = {"labels": {}, "cases": cases, "mean": summarize(cases)}
    json_path, csv_path = write_results(results, tmp_path / "m.json")
    data = json.loads(json_path.read_text(), parse_constant=float)
    assert data["cases"]["x"]["liver"]["hd95"] is None
    assert data["cases"]["x"]["tumour"]["dice"] is None
    assert "NaN" not in json_path.read_text() and "Infinity" not in json_path.read_text()
    assert csv_path.read_text().splitlines()[1].startswith("x,liver,0.0,0.0,0.0,,,0,1,0,0,1")


def test_format_table(folders: tuple[Path, Path]) -> None:
    header, rows = format_table(evaluate_folders(*folders, LABELS))
    assert header == ["label", "dice", "iou", "hd95 (mm)", "cases"]
    assert rows[0][:3] == ["liver", "0.8750", "0.8000"]
    assert rows[-1] == ["foreground mean", "0.6875", "0.6500", "-", "-"]
