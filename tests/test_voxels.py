"""medseg.io.voxels: every voxel type a reader can return is accepted, turned into channels, or
refused with one line, type by type, on real files written with nibabel, pynrrd and SimpleITK."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medseg.cli import app
from medseg.io import ImageError, load_labels, load_volume

SHAPE = (6, 7, 8)
AFFINE = np.diag([0.8, 0.9, 2.0, 1.0])
VALUES = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 50  # whole numbers every type holds


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE, dtype=array.dtype), path)
    return path


def _nrrd(path: Path, array: np.ndarray) -> Path:
    nrrd.write(
        str(path), array, {"space": "left-posterior-superior", "space directions": np.eye(3)}
    )
    return path


def _sitk(path: Path, array: np.ndarray, vector: bool = False) -> Path:
    """`array` in (X, Y, Z[, C]) order written by SimpleITK (which takes (Z, Y, X[, C]))."""
    order = (2, 1, 0, 3) if vector else (2, 1, 0)
    sitk.WriteImage(sitk.GetImageFromArray(array.transpose(order), isVector=vector), str(path))
    return path


def _recoded(path: Path, code: int, bitpix: int) -> Path:
    """A uint8 NIfTI whose header claims another datatype code (one nibabel cannot decode)."""
    _nifti(path, VALUES.astype(np.uint8))
    raw = bytearray(path.read_bytes())
    raw[70:74] = struct.pack("<hh", code, bitpix)
    path.write_bytes(bytes(raw))
    return path


REAL = {
    **{
        f"nifti_{t}": (lambda p, t=t: _nifti(p / "x.nii.gz", VALUES.astype(t)))
        for t in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
    },
    "nifti_float32": lambda p: _nifti(p / "x.nii.gz", VALUES.astype(np.float32)),
    "nifti_float64": lambda p: _nifti(p / "x.nii", VALUES.astype(np.float64)),
    **{
        f"nrrd_{t}": (lambda p, t=t: _nrrd(p / "x.nrrd", VALUES.astype(t)))
        for t in ("int8", "uint8", "int64", "uint64", "float64")
    },
    **{
        f"mha_{t}": (lambda p, t=t: _sitk(p / "x.mha", VALUES.astype(t)))
        for t in ("int8", "uint16", "uint32", "float32", "float64")
    },
}


@pytest.mark.parametrize("make", REAL.values(), ids=REAL.keys())
def test_integer_and_float_voxels_are_read_as_float32(tmp_path: Path, make: Callable) -> None:
    volume = load_volume(make(tmp_path))
    assert volume.array.shape == (1, *SHAPE) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[0], VALUES)
    labels = load_labels(make(tmp_path))  # the same files as label maps
    np.testing.assert_array_equal(labels.array, VALUES)


COMPLEX = {
    "nifti_complex64": lambda p: _nifti(p / "x.nii.gz", (VALUES + 1j * VALUES).astype("complex64")),
    "nifti_complex128": lambda p: _nifti(p / "x.nii.gz", (VALUES + 2j).astype("complex128")),
    "nrrd_complex": lambda p: _sitk_complex(p / "x.nrrd"),
}


def _sitk_complex(path: Path) -> Path:
    real = sitk.GetImageFromArray(VALUES.astype(np.float32).transpose(2, 1, 0))
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(real, real), str(path))
    return path


@pytest.mark.parametrize("make", COMPLEX.values(), ids=COMPLEX.keys())
def test_complex_voxels_are_refused_with_what_to_do(tmp_path: Path, make: Callable) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageError, match="complex numbers") as info:
        load_volume(path)
    assert str(path) in str(info.value) and "np.abs" in str(info.value)
    with pytest.raises(ImageError, match="complex numbers"):
        load_labels(path)


def _rgb(path: Path, fields: str) -> Path:
    array = np.zeros(SHAPE, dtype=[(f, "u1") for f in fields])
    for i, f in enumerate(fields):
        array[f] = VALUES + i
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return path


VECTOR = {
    "nifti_rgb24": (lambda p: _rgb(p / "x.nii.gz", "RGB"), 3),
    "nifti_rgba32": (lambda p: _rgb(p / "x.nii.gz", "RGBA"), 4),
    "nrrd_vector3": (
        lambda p: _sitk(
            p / "x.nrrd", np.stack([VALUES + i for i in range(3)], -1).astype("u1"), True
        ),
        3,
    ),
    "mha_vector2_float": (
        lambda p: _sitk(p / "x.mha", np.stack([VALUES, VALUES + 1], -1).astype("f4"), True),
        2,
    ),
}


@pytest.mark.parametrize(("make", "components"), VECTOR.values(), ids=VECTOR.keys())
def test_vector_voxels_become_channels_and_are_no_label_map(
    tmp_path: Path, make: Callable, components: int
) -> None:
    path = make(tmp_path)
    volume = load_volume(path)
    assert volume.array.shape == (components, *SHAPE)
    for c in range(components):
        np.testing.assert_array_equal(volume.array[c], VALUES + c)
    with pytest.raises(ImageError, match=f"its voxels are {components} values"):
        load_labels(path)


ODD = {
    "nifti_1bit_binary": (lambda p: _recoded(p / "x.nii", 1, 1), "cannot read image"),
    "nifti_float128": (lambda p: _recoded(p / "x.nii", 1536, 128), "cannot read image"),
}


@pytest.mark.parametrize(("make", "message"), ODD.values(), ids=ODD.keys())
def test_types_no_reader_decodes_are_refused(tmp_path: Path, make: Callable, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_volume(make(tmp_path))


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (COMPLEX["nifti_complex64"], "voxels are complex numbers (complex64)"),
        (VECTOR["nifti_rgb24"][0], "has 3 channel(s), the model takes 1"),
    ],
    ids=["complex", "rgb"],
)
def test_predict_refuses_them_and_writes_nothing(
    tiny_run: Path, tmp_path: Path, make: Callable, message: str
) -> None:
    scan = make(tmp_path)
    code, output = _cli("predict", scan, "--model", tiny_run, "--output", tmp_path / "out")
    assert code == 2, output
    assert message in output and "Traceback" not in output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_check_lists_a_complex_training_image(demo_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    label = demo_dataset / "labelsTr" / "hippocampus_143.nii.gz"
    source = nib.load(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    data = np.asarray(source.dataobj).astype(np.complex64) * (1 + 1j)
    nib.save(nib.Nifti1Image(data, source.affine), root / "imagesTr" / "c_0000.nii.gz")
    (root / "labelsTr" / "c.nii.gz").write_bytes(label.read_bytes())
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}}
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    code, output = _cli("check", root)
    assert code == 2 and "c: " in output and "complex numbers" in output
