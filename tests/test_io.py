"""medseg.io: reading keeps geometry, label maps land on exactly the input grid, bad input fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import read_sitk

from medseg.io import (
    ImageError,
    atomic_path,
    grid_offset_mm,
    label_dtype,
    load_labels,
    load_volume,
    same_grid,
    save_labels,
)


def _edges(channel: np.ndarray) -> np.ndarray:
    """Intensity thresholds that split a channel into three classes."""
    return np.percentile(channel, [50, 90]).astype(np.float32)


def _labels(channels: list[np.ndarray], edges: list[np.ndarray]) -> np.ndarray:
    """Label map in {0..3**C - 1}: each channel's class (0, 1, 2) as one base-3 digit."""
    out = np.zeros(channels[0].shape, dtype=np.uint8)
    for c, (channel, edge) in enumerate(zip(channels, edges, strict=True)):
        out += (np.digitize(channel.astype(np.float32), edge) * 3**c).astype(np.uint8)
    return out


@pytest.mark.parametrize(
    ("name", "file_dtype"),
    [("hippocampus_143.nii.gz", "uint8"), ("hippocampus_243.nii.gz", "float32")],
)
def test_load_volume_demo(demo_dataset: Path, name: str, file_dtype: str) -> None:
    path = demo_dataset / "imagesTr" / name
    assert nib.load(path).get_data_dtype() == np.dtype(file_dtype)

    volume = load_volume(path)

    expected = nib.load(path).get_fdata()
    assert volume.array.shape == (1, *expected.shape)
    assert volume.array.dtype == np.float32
    assert volume.shape == expected.shape
    np.testing.assert_allclose(volume.spacing, (1.0, 1.0, 1.0), atol=1e-4)
    np.testing.assert_allclose(volume.array[0], expected, rtol=1e-6)
    assert volume.header is not None
    assert volume.source == path


def test_load_labels_demo(demo_dataset: Path) -> None:
    """Every shipped label map (one is stored as float32) loads as integers on its image grid."""
    names = sorted(p.name for p in (demo_dataset / "labelsTr").iterdir())
    assert len(names) == 10
    dtypes = {str(nib.load(demo_dataset / "labelsTr" / n).get_data_dtype()) for n in names}
    assert dtypes == {"uint8", "float32"}
    for name in names:
        labels = load_labels(demo_dataset / "labelsTr" / name)
        volume = load_volume(demo_dataset / "imagesTr" / name)
        assert np.issubdtype(labels.array.dtype, np.integer)
        assert labels.array.shape == volume.shape
        assert set(np.unique(labels.array)) <= {0, 1, 2}
        np.testing.assert_allclose(labels.affine, volume.affine, atol=1e-5)


ROUND_TRIP = {
    "psr_orientation": ["sct_example/imagesTr/t2_0000.nii.gz"],
    "thick_slices_7.5mm": ["sct_example/imagesTr/t2s_0000.nii.gz"],
    "spleen_0.8x0.8x5mm": ["spleen_crop/imagesTr/spleen_2_crop_0000.nii.gz"],
    "ct_dicom_series": ["totalseg_examples/CT_dicom/example_ct_dicom"],
    "mr_dicom_series": ["hippocampus_dicom/Study1/13_HCropVolume"],
    "nrrd": ["pyradiomics_cases/raw_nrrd/brain1_image.nrrd"],
    "two_channels": [
        "brats_subset/imagesTr/BraTS18_0_0000.nii.gz",
        "brats_subset/imagesTr/BraTS18_0_0001.nii.gz",
    ],
}


@pytest.mark.parametrize("relpaths", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_save_labels_keeps_input_grid(shared_data: Path, tmp_path: Path, relpaths: list[str]):
    """Each output voxel lies at the same physical point as the input voxel it labels."""
    paths = [shared_data / p for p in relpaths]
    volume = load_volume(paths)
    assert volume.array.shape[0] == len(paths)
    edges = [_edges(channel) for channel in volume.array]

    out = save_labels(_labels(list(volume.array), edges), like=volume, path=tmp_path / "seg.nii.gz")

    inputs = [read_sitk(p) for p in paths]
    written = sitk.ReadImage(str(out))
    ref = inputs[0]
    assert written.GetSize() == ref.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(written.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), ref.GetDirection(), atol=1e-5)
    assert written.GetPixelID() == sitk.sitkUInt8
    expected = _labels([sitk.GetArrayFromImage(image) for image in inputs], edges)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)
    assert len(np.unique(expected)) > 1
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize(
    ("max_label", "dtype"),
    [(0, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.uint32)],
)
def test_label_dtype(max_label: int, dtype: type) -> None:
    assert label_dtype(max_label) is dtype


def test_save_labels_uint16_above_255(demo_dataset: Path, tmp_path: Path) -> None:
    volume = load_volume(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    labels = np.zeros(volume.shape, dtype=np.int64)
    labels[0, 0, 0], labels[1, 2, 3] = 300, 7

    out = save_labels(labels, like=volume, path=tmp_path / "many.nii.gz")

    assert nib.load(out).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(load_labels(out).array, labels)


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (np.zeros((2, 2, 2), dtype=np.uint8), ValueError, "labels have shape"),
        (None, TypeError, "must be an integer array"),
    ],
    ids=["wrong_shape", "float_labels"],
)
def test_save_labels_rejects(demo_dataset: Path, tmp_path: Path, labels, error, match) -> None:
    volume = load_volume(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    labels = np.zeros(volume.shape, dtype=np.float32) if labels is None else labels
    with pytest.raises(error, match=match):
        save_labels(labels, like=volume, path=tmp_path / "seg.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_save_labels_rejects_negative(demo_dataset: Path, tmp_path: Path) -> None:
    volume = load_volume(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    labels = np.zeros(volume.shape, dtype=np.int16)
    labels[0, 0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        save_labels(labels, like=volume, path=tmp_path / "seg.nii.gz")


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_save_labels_file_mode_follows_umask(demo_dataset: Path, tmp_path: Path) -> None:
    volume = load_volume(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    umask = os.umask(0)
    os.umask(umask)
    out = save_labels(np.zeros(volume.shape, np.uint8), like=volume, path=tmp_path / "s.nii.gz")
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_load_labels_float_file_from_shared(shared_data: Path) -> None:
    """Real MSD label files stored as float32 with whole values load as integers."""
    labels_dir = shared_data / "hippocampus" / "labelsTr"
    floats = [
        p
        for p in sorted(labels_dir.glob("*.nii.gz"))
        if np.issubdtype(nib.load(p).get_data_dtype(), np.floating)
    ]
    assert floats, "expected at least one float32 hippocampus label file"
    for path in floats:
        labels = load_labels(path)
        assert labels.array.dtype == np.int32
        np.testing.assert_array_equal(labels.array, nib.load(path).get_fdata())
        assert set(np.unique(labels.array)) <= {0, 1, 2}


def _write_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([0.5, 0.5, 2.0, 1.0])), path)
    return path


def test_load_labels_accepts_whole_floats(tmp_path: Path) -> None:
    array = np.zeros((4, 5, 6), dtype=np.float32)
    array[1, 2, 3], array[2, 2, 2] = 1.0, 2.0
    labels = load_labels(_write_nifti(tmp_path / "labels.nii.gz", array))
    assert np.issubdtype(labels.array.dtype, np.integer)
    np.testing.assert_array_equal(labels.array, array)


@pytest.mark.parametrize(("value", "match"), [(0.5, "non-integer"), (-1.0, "negative")])
def test_load_labels_rejects(tmp_path: Path, value: float, match: str) -> None:
    array = np.zeros((4, 5, 6), dtype=np.float32)
    array[1, 2, 3] = value
    with pytest.raises(ImageError, match=match):
        load_labels(_write_nifti(tmp_path / "labels.nii.gz", array))


def _nan_image(tmp_path: Path) -> Path:
    array = np.ones((4, 5, 6), dtype=np.float32)
    array[1, 1, 1] = np.nan
    return _write_nifti(tmp_path / "nan.nii.gz", array)


def _text_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("not an image\n")
    return path


BAD_IMAGES = {
    "missing": (lambda d: d / "missing.nii.gz", "file not found"),
    "text_as_nifti": (lambda d: _text_file(d, "x.nii.gz"), "cannot read image"),
    "2d": (lambda d: _write_nifti(d / "2d.nii.gz", np.zeros((8, 9), np.float32)), "3D image"),
    "nan": (_nan_image, "NaN"),
    "unsupported_suffix": (lambda d: _text_file(d, "x.txt"), "not a supported image"),
}


@pytest.mark.parametrize(("make", "match"), BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
def test_load_volume_rejects(tmp_path: Path, make, match: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageError, match=match) as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_atomic_path_writes_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != target
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def _rotated(affine: np.ndarray, degrees: float) -> np.ndarray:
    """`affine` rotated about the world z axis through its origin."""
    t = np.radians(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    out = affine.copy()
    out[:3, :3] = rotation[:3, :3] @ affine[:3, :3]
    return out


GRID_PAIRS = {
    "identical": (lambda a: a, True),
    "shifted_0.05mm": (lambda a: a + np.pad([[0.05], [0], [0]], ((0, 1), (3, 0))), True),
    "shifted_0.2mm": (lambda a: a + np.pad([[0.2], [0], [0]], ((0, 1), (3, 0))), False),
    # 0.6 degrees changes no affine entry by 0.01 (the old per-entry tolerance) but moves the
    # far corner of a 512 x 0.8 mm axis by about 4 mm
    "rotated_0.6deg": (lambda a: _rotated(a, 0.6), False),
}


@pytest.mark.parametrize(("change", "same"), GRID_PAIRS.values(), ids=GRID_PAIRS.keys())
def test_same_grid_is_one_tolerance_in_mm(change, same: bool) -> None:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-200.0, -180.0, 40.0)
    other = change(affine)
    assert same_grid(affine, other, (512, 512, 100), (512, 512, 100)) is same
    assert not same_grid(affine, affine, (512, 512, 100), (512, 512, 99))


def test_rotation_below_the_old_per_entry_tolerance_is_a_different_grid() -> None:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    other = _rotated(affine, 0.6)
    assert np.abs(other - affine).max() < 1e-2
    assert grid_offset_mm(affine, other, (512, 512, 100)) > 4.0


def test_grid_offset_is_the_largest_voxel_displacement() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    other = _rotated(affine, 90.0)
    # the corner (9, 0, 0) moves to (0, 9, 0): 9 * sqrt(2) mm; the corner (9, 9, 0) goes further
    assert grid_offset_mm(affine, other, (10, 10, 1)) == pytest.approx(np.hypot(9, 9) * np.sqrt(2))


def test_channels_of_different_shapes_are_refused(tmp_path: Path) -> None:
    a = _write_nifti(tmp_path / "a_0000.nii.gz", np.zeros((4, 5, 6), np.float32))
    b = _write_nifti(tmp_path / "a_0001.nii.gz", np.zeros((4, 5, 7), np.float32))
    with pytest.raises(ImageError, match="different grid"):
        load_volume([a, b])


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_geometry_of_itk_files_comes_from_the_header(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner reads every case's geometry: NRRD/MHA headers must not load the voxels,
    and give what the full read gives (an oblique, anisotropic grid)."""
    import medseg.io.volumes as volumes

    image = sitk.GetImageFromArray(np.zeros((5, 7, 9), np.int16))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 5.5))
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    volume = load_volume(path)
    monkeypatch.setattr(volumes, "_read", lambda *a, **k: pytest.fail("the voxels were read"))
    shape, affine = volumes.read_geometry(path)
    assert shape == volume.shape == (9, 7, 5)
    np.testing.assert_allclose(affine, volume.affine, atol=1e-9)
