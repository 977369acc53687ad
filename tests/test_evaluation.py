"""Metrics on hand-computed arrays, and folder evaluation on tiny NIfTI files."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.cli import app
from medseg.evaluation import (
    EvaluationError,
    confusion,
    dice,
    empty_rule_note,
    evaluate_case,
    evaluate_folders,
    format_table,
    hd95,
    image_diagonal,
    iou,
    precision,
    recall,
    summarize,
    write_results,
)

LABELS = {0: "background", 1: "liver", 2: "tumour"}
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])
SPACING = (1.5, 1.0, 2.0)
DIAGONAL = math.sqrt(6.0**2 + 4.0**2)  # 4 x 4 x 1 at SPACING: the size-1 axis is left out

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


def _squares() -> tuple[np.ndarray, np.ndarray]:
    """An 8 x 8 reference square inside a 10 x 10 predicted one (2D, 12 x 12 grid)."""
    ref = np.zeros((12, 12), dtype=bool)
    ref[2:10, 2:10] = True
    pred = np.zeros((12, 12), dtype=bool)
    pred[1:11, 1:11] = True
    return ref, pred


def _hd95_without_squeeze(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> float:
    """HD95 as medseg computed it before singleton axes were dropped (MONAI on the raw array)."""
    from monai.metrics import compute_hausdorff_distance

    distance = compute_hausdorff_distance(
        pred[None, None], ref[None, None], include_background=True, percentile=95, spacing=spacing
    )
    return float(distance.item())


# Surfaces in 2D are the rings. Predicted ring to reference ring: 32 side voxels at one voxel
# step, 4 corners at one diagonal step (4/36 > 5%, so the 95th percentile is the diagonal);
# reference to predicted: one step. Kept as (X, Y, 1), erosion along the size-1 axis empties
# both masks, so every voxel is "surface": 64 predicted voxels at 0, 32 at one step, 4 (4%)
# at the diagonal, and the 95th percentile falls to the larger single step.
@pytest.mark.parametrize(
    ("in_plane", "expected_2d", "old_3d"),
    [
        ((1.0, 1.0), math.sqrt(2.0), 1.0),  # old value 29% too small
        ((1.5, 1.0), math.sqrt(1.5**2 + 1.0), 1.5),  # old value 17% too small
    ],
)
@pytest.mark.parametrize("flat_axis", [0, 2])
def test_hd95_of_2d_slice_stored_as_3d_equals_2d(
    in_plane: tuple[float, float], expected_2d: float, old_3d: float, flat_axis: int
) -> None:
    ref, pred = _squares()
    spacing = list(in_plane)
    spacing.insert(flat_axis, 2.5)  # the slice thickness must not matter
    ref3, pred3 = np.expand_dims(ref, flat_axis), np.expand_dims(pred, flat_axis)
    assert hd95(ref, pred, in_plane) == pytest.approx(expected_2d)
    assert hd95(ref3, pred3, spacing) == pytest.approx(expected_2d)
    assert _hd95_without_squeeze(ref3, pred3, tuple(spacing)) == pytest.approx(old_3d)


def test_hd95_single_voxel_grid() -> None:
    mask = np.ones((1, 1, 1), dtype=bool)
    assert hd95(mask, mask, (1.0, 2.0, 3.0)) == 0.0


@pytest.mark.parametrize(
    ("shape", "spacing", "expected"),
    [
        ((4, 4, 1), SPACING, DIAGONAL),
        ((4, 4), SPACING[:2], DIAGONAL),  # the same slice stored in 2D
        ((1, 4, 4), (2.0, 1.5, 1.0), DIAGONAL),
        ((2, 3, 4), (1.0, 1.0, 1.0), math.sqrt(4 + 9 + 16)),  # shape * spacing, not shape - 1
        ((1, 1, 1), (1.0, 1.0, 1.0), 0.0),
    ],
)
def test_image_diagonal(shape: tuple[int, ...], spacing, expected: float) -> None:
    assert image_diagonal(shape, spacing) == pytest.approx(expected)


def test_image_diagonal_rejects_wrong_spacing_length() -> None:
    with pytest.raises(ValueError, match="one value per axis"):
        image_diagonal((4, 4, 1), (1.0, 1.0))


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


MISSED_PRED = np.where(REF == 2, 0, REF)  # liver as in REF, tumour not predicted
SPURIOUS_REF = np.where(REF == 2, 0, REF)  # tumour absent from the reference...
SPURIOUS_PRED = REF.copy()  # ...but predicted


@pytest.mark.parametrize(
    ("ref", "pred", "expected"),
    [
        # (dice, iou, precision, recall, hd95) of the tumour
        (REF, MISSED_PRED, (0.0, 0.0, 0.0, 0.0, DIAGONAL)),
        (SPURIOUS_REF, SPURIOUS_PRED, (0.0, 0.0, 0.0, math.nan, DIAGONAL)),
    ],
    ids=["missed", "spurious"],
)
def test_evaluate_case_worst_case_for_one_side_empty(ref, pred, expected) -> None:
    tumour = evaluate_case(ref, pred, LABELS, SPACING)["tumour"]
    got = tuple(tumour[m] for m in ("dice", "iou", "precision", "recall", "hd95"))
    assert got == pytest.approx(expected, nan_ok=True)


@pytest.mark.parametrize(
    ("ref", "pred", "expected"),
    [
        (REF, MISSED_PRED, (0.0, 0.0, math.nan, 0.0, math.inf)),
        (SPURIOUS_REF, SPURIOUS_PRED, (0.0, 0.0, 0.0, math.nan, math.inf)),
    ],
    ids=["missed", "spurious"],
)
def test_evaluate_case_exclude_keeps_the_pure_values(ref, pred, expected) -> None:
    tumour = evaluate_case(ref, pred, LABELS, SPACING, empty="exclude")["tumour"]
    got = tuple(tumour[m] for m in ("dice", "iou", "precision", "recall", "hd95"))
    assert got == pytest.approx(expected, nan_ok=True)


def test_evaluate_case_both_empty_stays_nan_under_worst() -> None:
    liver_only = np.where(REF == 2, 0, REF)
    tumour = evaluate_case(liver_only, liver_only, LABELS, SPACING)["tumour"]
    assert all(math.isnan(tumour[m]) for m in ("dice", "iou", "precision", "recall", "hd95"))


def test_evaluate_case_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match=r"empty must be one of worst, exclude, got 'skip'"):
        evaluate_case(REF, PRED, LABELS, SPACING, empty="skip")


def _row(dice_: float, hd: float, n_ref: int = 1, n_pred: int = 1) -> dict[str, float | int]:
    return {
        "dice": dice_,
        "iou": dice_,
        "precision": dice_,
        "recall": dice_,
        "hd95": hd,
        "n_ref": n_ref,
        "n_pred": n_pred,
    }


def test_summarize_excludes_nan_and_infinite_values_and_counts_empty_sides() -> None:
    per_case = {
        "a": {"liver": _row(0.8, 2.0), "tumour": _row(math.nan, math.nan, 0, 0)},
        "b": {"liver": _row(0.6, 4.0), "tumour": _row(0.0, math.inf, 3, 0)},  # missed
        "c": {"liver": _row(math.nan, math.nan, 0, 0), "tumour": _row(0.5, 1.0)},
        "d": {"liver": _row(0.0, math.inf, 0, 2), "tumour": _row(0.0, math.inf, 0, 4)},
    }
    summary = summarize(per_case)
    liver, tumour = summary["labels"]["liver"], summary["labels"]["tumour"]
    assert liver["dice"] == pytest.approx(1.4 / 3)
    assert liver["hd95"] == pytest.approx(3.0)
    assert (liver["n_cases"], liver["n_missed"], liver["n_spurious"]) == (3, 0, 1)
    assert tumour["dice"] == pytest.approx(0.5 / 3)
    assert tumour["hd95"] == pytest.approx(1.0)
    assert (tumour["n_cases"], tumour["n_missed"], tumour["n_spurious"]) == (3, 1, 1)
    assert summary["foreground_mean"]["dice"] == pytest.approx((1.4 / 3 + 0.5 / 3) / 2)


def test_summarize_label_never_present_is_nan_and_left_out_of_foreground() -> None:
    summary = summarize({"a": {"liver": _row(0.8, 1.0), "tumour": _row(math.nan, math.nan, 0, 0)}})
    assert math.isnan(summary["labels"]["tumour"]["dice"])
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("empty", "hd95_mean", "precision_mean"),
    [
        ("worst", DIAGONAL / 2, 0.5),  # found (HD95 0, precision 1) and missed (DIAGONAL, 0)
        ("exclude", 0.0, 1.0),  # the missed case left out, as before the policy existed
    ],
)
def test_mean_hd95_and_precision_of_a_missed_structure(
    empty: str, hd95_mean: float, precision_mean: float
) -> None:
    cases = {
        "found": evaluate_case(REF, REF, LABELS, SPACING, empty),
        "missed": evaluate_case(REF, MISSED_PRED, LABELS, SPACING, empty),
    }
    tumour = summarize(cases)["labels"]["tumour"]
    assert tumour["hd95"] == pytest.approx(hd95_mean)
    assert tumour["precision"] == pytest.approx(precision_mean)
    assert tumour["dice"] == pytest.approx(0.5)
    assert (tumour["n_cases"], tumour["n_missed"], tumour["n_spurious"]) == (2, 1, 0)


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


def _spurious_liver_case(empty: str) -> dict[str, object]:
    ref = np.zeros((3, 3, 1), dtype=int)
    pred = ref.copy()
    pred[1, 1, 0] = 1  # liver predicted but absent (spurious); tumour absent: NaN
    cases = {"x": evaluate_case(ref, pred, LABELS, (1.0, 1.0, 1.0), empty)}
    return {"labels": {}, "empty": empty, "cases": cases, "mean": summarize(cases)}


def test_write_results_nonfinite_become_null(tmp_path: Path) -> None:
    json_path, csv_path = write_results(_spurious_liver_case("exclude"), tmp_path / "m.json")
    data = json.loads(json_path.read_text(), parse_constant=float)
    assert data["cases"]["x"]["liver"]["hd95"] is None  # inf under "exclude"
    assert data["cases"]["x"]["tumour"]["dice"] is None
    assert "NaN" not in json_path.read_text() and "Infinity" not in json_path.read_text()
    assert csv_path.read_text().splitlines()[1].startswith("x,liver,0.0,0.0,0.0,,,0,1,0,0,1")


def test_write_results_worst_case_hd95_is_a_number(tmp_path: Path) -> None:
    json_path, csv_path = write_results(_spurious_liver_case("worst"), tmp_path / "m.json")
    data = json.loads(json_path.read_text())
    assert data["empty"] == "worst"
    liver = data["cases"]["x"]["liver"]
    assert liver["hd95"] == pytest.approx(math.sqrt(18.0))  # 3 x 3 mm slice
    assert liver["recall"] is None  # nothing to find: undefined under either policy
    assert data["mean"]["labels"]["liver"]["n_spurious"] == 1
    assert csv_path.read_text().splitlines()[1].startswith(f"x,liver,0.0,0.0,0.0,,{math.sqrt(18)},")


def test_format_table(folders: tuple[Path, Path]) -> None:
    header, rows = format_table(evaluate_folders(*folders, LABELS))
    assert header == ["label", "dice", "iou", "hd95 (mm)", "cases", "missed", "spurious"]
    assert rows[0][:3] == ["liver", "0.8750", "0.8000"]
    assert rows[0][4:] == ["2", "0", "0"]
    assert rows[-1] == ["foreground mean", "0.6875", "0.6500", "-", "-", "-", "-"]


# Tumour per case: case_a off by one voxel (Dice 0, HD95 sqrt(1.5^2 + 1) at the fixture's
# spacing), case_b exact (1, 0), case_c missed and case_d spurious (0, DIAGONAL when "worst").
OFF_BY_ONE = math.sqrt(3.25)


@pytest.mark.parametrize(
    ("empty", "hd95_mean"),
    [("worst", (OFF_BY_ONE + 0.0 + 2 * DIAGONAL) / 4), ("exclude", (OFF_BY_ONE + 0.0) / 2)],
)
def test_format_table_counts_missed_and_spurious(
    folders: tuple[Path, Path], empty: str, hd95_mean: float
) -> None:
    pred_dir, ref_dir = folders
    _write(ref_dir / "case_c.nii.gz", REF)
    _write(pred_dir / "case_c.nii.gz", MISSED_PRED)
    _write(ref_dir / "case_d.nii.gz", SPURIOUS_REF)
    _write(pred_dir / "case_d.nii.gz", SPURIOUS_PRED)
    results = evaluate_folders(pred_dir, ref_dir, LABELS, empty)
    assert results["empty"] == empty
    _, rows = format_table(results)
    assert rows[1] == ["tumour", "0.2500", "0.2500", f"{hd95_mean:.4f}", "4", "1", "1"]
    assert rows[0][4:] == ["4", "0", "0"]  # the liver is found in every case


def test_evaluate_folders_rejects_unknown_policy(folders: tuple[Path, Path]) -> None:
    with pytest.raises(EvaluationError, match="empty must be one of worst, exclude"):
        evaluate_folders(*folders, LABELS, empty="drop")


def test_empty_rule_note_names_the_rule() -> None:
    assert "image diagonal" in empty_rule_note("worst")
    assert "skips missed and spurious" in empty_rule_note("exclude")
    with pytest.raises(ValueError, match="empty must be one of"):
        empty_rule_note("none")


# --- medseg evaluate on 2D slices stored as (X, Y, 1) ------------------------------------------

SLICE_AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])
SLICE_DIAGONAL = math.sqrt(12.0**2 + 12.0**2)  # 12 x 12 x 1 grid, 1 mm in plane


@pytest.fixture
def slice_folders(tmp_path: Path) -> dict[str, Path]:
    """Three 12 x 12 x 1 cases: liver found (8 x 8 reference in a 10 x 10 prediction), liver
    missed, and a spurious tumour voxel beside an exact liver."""
    ref_sq, pred_sq = (m.astype(np.uint8)[..., None] for m in _squares())
    empty = np.zeros_like(ref_sq)
    spurious = ref_sq.copy()
    spurious[0, 0, 0] = 2
    out = {"refs": tmp_path / "refs", "preds": tmp_path / "preds", "root": tmp_path}
    for case, ref, pred in (
        ("found", ref_sq, pred_sq),
        ("missed", ref_sq, empty),
        ("spurious", ref_sq, spurious),
    ):
        for folder, array in ((out["refs"], ref), (out["preds"], pred)):
            folder.mkdir(exist_ok=True)
            _write(folder / f"{case}.nii.gz", array, SLICE_AFFINE)
    out["labels"] = tmp_path / "dataset.json"
    out["labels"].write_text(json.dumps({"labels": {str(k): v for k, v in LABELS.items()}}))
    return out


def _table_rows(output: str) -> dict[str, list[str]]:
    """Rows of the rich table printed by `medseg evaluate`, keyed by their first cell."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split("[│┃]", line)[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize(
    ("extra", "liver_hd95", "tumour_hd95"),
    [
        # liver: found sqrt(2) (2D rings, not the 3D erosion's 1.0), missed, exact (0)
        ([], (math.sqrt(2) + SLICE_DIAGONAL + 0.0) / 3, SLICE_DIAGONAL),
        (["--empty", "exclude"], (math.sqrt(2) + 0.0) / 2, None),
    ],
    ids=["worst", "exclude"],
)
def test_cli_evaluate_prints_missed_and_spurious_columns(
    slice_folders: dict[str, Path], extra: list[str], liver_hd95: float, tumour_hd95: float | None
) -> None:
    out = slice_folders["root"] / "metrics.json"
    args = [slice_folders["preds"], slice_folders["refs"], "--labels", slice_folders["labels"]]
    args += ["--output", out, *extra]
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.output)
    assert rows["label"] == ["dice", "iou", "hd95 (mm)", "cases", "missed", "spurious"]
    assert rows["liver"][2:] == [f"{liver_hd95:.4f}", "3", "1", "0"]
    tumour = "-" if tumour_hd95 is None else f"{tumour_hd95:.4f}"
    assert rows["tumour"] == ["0.0000", "0.0000", tumour, "1", "0", "1"]
    precision = json.loads(out.read_text())["mean"]["labels"]["liver"]["precision"]
    # found 64/100, exact 1, missed 0 (worst) or left out (exclude)
    assert precision == pytest.approx((0.64 + 1.0) / (3 if not extra else 2))
    assert ("image diagonal" in " ".join(result.output.split())) == (not extra)


def test_cli_evaluate_rejects_unknown_empty_policy(slice_folders: dict[str, Path]) -> None:
    args = [slice_folders["preds"], slice_folders["refs"], "--labels", slice_folders["labels"]]
    args += ["--output", slice_folders["root"] / "m.json", "--empty", "drop"]
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    assert result.exit_code == 2
    assert "--empty must be worst or exclude, got 'drop'" in result.output
