"""medseg.fingerprint: RAS geometry from headers, foreground statistics, label frequency, size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.datasets import DatasetError, load_dataset
from medseg.fingerprint import (
    Fingerprint,
    IntensityStats,
    compute_fingerprint,
    label_counts,
    load_fingerprint,
    nonzero_fraction,
    save_fingerprint,
)


@pytest.fixture(scope="module")
def demo_fingerprint(demo_dataset: Path) -> Fingerprint:
    return compute_fingerprint(load_dataset(demo_dataset))


def _copy_dataset(src: Path, dst: Path, names: list[str]) -> Path:
    """An MSD dataset in `dst` with the given cases of `src`."""
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"] = [e for e in meta["training"] if Path(e["image"]).name in names]
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(src / sub / name, dst / sub / name)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_demo_geometry_and_labels(demo_dataset: Path, demo_fingerprint: Fingerprint) -> None:
    fp = demo_fingerprint
    assert fp.layout == "msd" and fp.channels == ("MRI",)
    assert [c.name for c in fp.cases] == sorted(c.name for c in fp.cases)
    assert len(fp.cases) == 10
    for case in fp.cases:  # the demo files are stored RAS, so RAS shape = file shape
        image = nib.load(demo_dataset / "imagesTr" / f"{case.name}.nii.gz")
        assert case.shape == image.shape
        np.testing.assert_allclose(case.spacing, (1, 1, 1), atol=1e-4)
    np.testing.assert_allclose(fp.median_spacing, (1, 1, 1), atol=1e-4)

    counts = {1: [], 2: []}
    for case in fp.cases:
        labels = np.asarray(nib.load(demo_dataset / "labelsTr" / f"{case.name}.nii.gz").dataobj)
        for value in counts:
            counts[value].append(int((labels == value).sum()))
    assert [s.name for s in fp.label_stats] == ["Anterior", "Posterior"]
    for stats in fp.label_stats:
        assert stats.case_fraction == 1.0
        assert stats.median_voxels == np.median(counts[stats.value])
        assert stats.median_ml == pytest.approx(stats.median_voxels / 1000, rel=1e-3)


def test_demo_intensities(demo_dataset: Path, demo_fingerprint: Fingerprint) -> None:
    """Every demo case has < 10,000 foreground voxels, so all are used: statistics are exact."""
    values = []
    for case in demo_fingerprint.cases:
        image = nib.load(demo_dataset / "imagesTr" / f"{case.name}.nii.gz").get_fdata()
        labels = np.asarray(nib.load(demo_dataset / "labelsTr" / f"{case.name}.nii.gz").dataobj)
        values.append(image[labels > 0])
    values = np.concatenate(values)
    (stats,) = demo_fingerprint.intensities
    assert stats.channel == "MRI"
    assert stats.mean == pytest.approx(values.mean(), rel=1e-5)
    assert stats.std == pytest.approx(values.std(), rel=1e-4)
    assert stats.median == pytest.approx(np.median(values))
    assert stats.lower == pytest.approx(np.percentile(values, 0.5), rel=1e-5)
    assert stats.upper == pytest.approx(np.percentile(values, 99.5), rel=1e-5)
    assert (stats.min, stats.max) == pytest.approx((values.min(), values.max()))


def test_json_round_trip(demo_fingerprint: Fingerprint, tmp_path: Path) -> None:
    path = tmp_path / "fp.json"
    save_fingerprint(demo_fingerprint, path)
    assert load_fingerprint(path) == demo_fingerprint
    raw = json.loads(path.read_text())
    assert raw["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert raw["median_spacing"] == pytest.approx([1, 1, 1], abs=1e-4)


def test_fingerprints_without_nonzero_fractions_still_load(
    demo_fingerprint: Fingerprint, tmp_path: Path
) -> None:
    raw = demo_fingerprint.to_json()
    for case in raw["cases"]:
        del case["nonzero_fraction"]  # as written before medseg recorded it
    old = Fingerprint.from_json(raw)
    assert [c.nonzero_fraction for c in old.cases] == [1.0] * len(old.cases)


def test_nonzero_fraction_is_the_nonzero_bounding_box() -> None:
    image = np.zeros((2, 10, 10, 10), np.float32)
    image[0, 2:4, :, 5] = 1.0
    image[1, 7, 3, 6] = -2.0  # any channel, any sign
    assert nonzero_fraction(image) == pytest.approx((6 * 10 * 2) / 1000)
    assert nonzero_fraction(np.zeros((1, 4, 4, 4))) == 0.0


def test_zero_padded_cases_record_their_nonzero_box(demo_dataset: Path, tmp_path: Path) -> None:
    names = ["hippocampus_143.nii.gz", "hippocampus_149.nii.gz"]
    root = _copy_dataset(demo_dataset, tmp_path / "ds", names)
    for sub in ("imagesTr", "labelsTr"):  # pad the first case with as many zeros along x
        path = root / sub / names[0]
        image = nib.load(path)
        array = np.asarray(image.dataobj)
        padded = np.concatenate([array, np.zeros_like(array)], axis=0)
        nib.save(nib.Nifti1Image(padded, image.affine), path)
    fp = compute_fingerprint(load_dataset(root))
    assert [c.nonzero_fraction for c in fp.cases] == [0.5, 1.0]


def test_odd_orientation_gives_ras_geometry(demo_dataset: Path, tmp_path: Path) -> None:
    """A case stored with permuted, flipped axes has the same RAS geometry and label sizes."""
    names = ["hippocampus_143.nii.gz", "hippocampus_149.nii.gz"]
    root = _copy_dataset(demo_dataset, tmp_path / "ds", names)
    for sub in ("imagesTr", "labelsTr"):
        path = root / sub / names[0]
        image = nib.load(path)
        array = np.flip(np.transpose(np.asarray(image.dataobj), (2, 0, 1)), 0)
        ras = nib.orientations.io_orientation(image.affine)
        # voxel (k', i, j) with k' = n - 1 - k  ->  original voxel (i, j, k)
        n = image.shape[2]
        to_original = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, n - 1], [0, 0, 0, 1.0]])
        assert (ras[:, 0] == [0, 1, 2]).all()
        nib.save(nib.Nifti1Image(array.copy(), image.affine @ to_original), path)

    odd = compute_fingerprint(load_dataset(root))
    plain = compute_fingerprint(load_dataset(_copy_dataset(demo_dataset, tmp_path / "ref", names)))
    assert nib.load(root / "imagesTr" / names[0]).shape != plain.cases[0].shape
    assert odd.cases == plain.cases
    assert odd.label_stats == plain.label_stats
    assert odd.intensities[0].median == plain.intensities[0].median


def test_label_grid_mismatch_is_a_dataset_error(demo_dataset: Path, tmp_path: Path) -> None:
    names = ["hippocampus_143.nii.gz", "hippocampus_149.nii.gz"]
    root = _copy_dataset(demo_dataset, tmp_path / "ds", names)
    label = root / "labelsTr" / names[1]
    image = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-2], image.affine), label)
    with pytest.raises(DatasetError, match=r"hippocampus_149.nii.gz: label shape .* differs"):
        compute_fingerprint(load_dataset(root))


def test_label_counts() -> None:
    labels = np.array([[0, 1, 1], [3, 3, 3], [9, 0, 2]])
    assert label_counts(labels, [1, 2, 3]).tolist() == [2, 1, 3]
    assert label_counts(labels, [5]).tolist() == [0]
    assert label_counts(labels, []).tolist() == []


def test_no_foreground_gives_zero_statistics() -> None:
    assert IntensityStats.of("CT", np.zeros(0, np.float32)) == IntensityStats(
        "CT", 0, 0, 0, 0, 0, 0, 0
    )


def test_spleen_is_anisotropic(shared_data: Path) -> None:
    fp = compute_fingerprint(load_dataset(shared_data / "spleen_crop"))
    (case,) = fp.cases
    assert case.shape == (164, 166, 26)
    np.testing.assert_allclose(case.spacing, (0.795, 0.795, 5.0), atol=1e-3)
    (spleen,) = fp.label_stats
    assert spleen.name == "spleen" and spleen.case_fraction == 1.0
    assert spleen.median_ml == pytest.approx(spleen.median_voxels * 0.7949**2 * 5 / 1000, rel=1e-3)
    assert fp.intensities[0].channel == "CT" and fp.intensities[0].min < fp.intensities[0].max
