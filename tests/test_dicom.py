"""medseg.io.dicom: series in a folder, and slices that must lie on the grid that is read.

The series are written with pydicom (tests/conftest.py `write_dicom_series`), so these tests run
without ../shared/data: a regular series, one with gantry tilt, one missing a slice, one with a
duplicate slice, and a folder holding two series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import even_positions, write_dicom_series
from typer.testing import CliRunner

from medseg.cli import app
from medseg.io import ImageError, load_volume
from medseg.io.dicom import list_series
from medseg.predict import PredictOptions, predict

LPS = np.array([-1.0, -1.0, 1.0])


def tilted(n: int = 6, degrees: float = 10.0, step: float = 2.5) -> list[tuple[float, ...]]:
    """Axial slices whose origins shift along y with z: the gantry was tilted."""
    shift = step * np.tan(np.radians(degrees))
    return [(-10.0, -20.0 + shift * k, 30.0 + step * k) for k in range(n)]


def missing_slice(n: int = 7, gone: int = 3) -> list[tuple[float, ...]]:
    positions = even_positions(n)
    del positions[gone]
    return positions


def duplicate_slice(n: int = 5) -> list[tuple[float, ...]]:
    positions = even_positions(n)
    return [*positions, positions[2]]


def test_regular_series_puts_every_slice_where_its_header_says(tmp_path: Path) -> None:
    positions = even_positions(6)
    folder = write_dicom_series(tmp_path / "ct", positions)
    volume = load_volume(folder)
    assert volume.shape == (10, 8, 6)  # columns, rows, slices
    assert volume.series is not None and len(volume.series.files) == 6
    for k, position in enumerate(positions):
        centre = volume.affine @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(centre[:3], np.array(position) * LPS, atol=1e-4)
        np.testing.assert_array_equal(volume.array[0, :, 0, k], 100 * k + np.arange(10))


IRREGULAR = {
    "gantry_tilt": (tilted, "sheared by 10.0 degrees (gantry tilt)"),
    "missing_slice": (missing_slice, "slice spacing varies from 2.50 to 5.00 mm"),
    "duplicate_slice": (duplicate_slice, "share one position"),
}


@pytest.mark.parametrize(("positions", "message"), IRREGULAR.values(), ids=IRREGULAR.keys())
def test_irregular_series_is_refused(tmp_path: Path, positions, message: str) -> None:  # noqa: ANN001
    folder = write_dicom_series(tmp_path / "ct", positions())
    with pytest.raises(ImageError, match="does not resample such series") as info:
        load_volume(folder)
    assert message in str(info.value) and str(folder) in str(info.value)


def test_small_tilt_within_the_grid_tolerance_is_read(tmp_path: Path) -> None:
    """A tilt whose slices stay within 0.1 mm of the grid is harmless and read as it is."""
    folder = write_dicom_series(tmp_path / "ct", tilted(n=4, degrees=0.5, step=1.0))
    assert load_volume(folder).shape == (10, 8, 4)


def test_irregular_series_is_refused_by_predict(tiny_run: Path, tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "ct", tilted())
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", str(folder), "--model", str(tiny_run), "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "gantry tilt" in result.output and "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def _two_series(folder: Path) -> tuple[str, str]:
    first, second = "1.2.826.0.1.3680043.10.999.1", "1.2.826.0.1.3680043.10.999.2"
    write_dicom_series(folder, even_positions(6), series=(first, 2, "axial thin"))
    write_dicom_series(
        folder, even_positions(4, step=5.0), (6, 9), series=(second, 5, "axial thick")
    )
    return first, second


def test_folder_with_two_series_lists_both(tmp_path: Path) -> None:
    _two_series(tmp_path / "study")
    found = list_series(tmp_path / "study")
    assert [(s.number, s.description, len(s.files)) for s in found] == [
        ("2", "axial thin", 6),
        ("5", "axial thick", 4),
    ]
    with pytest.raises(ImageError, match="holds 2 DICOM series") as info:
        load_volume(tmp_path / "study")
    assert "#2 axial thin" in str(info.value) and "#5 axial thick" in str(info.value)
    assert load_volume(found[1]).shape == (9, 6, 4)


def test_each_series_of_a_folder_is_predicted_into_its_own_output(
    tiny_run: Path, tmp_path: Path
) -> None:
    import nibabel as nib
    import pydicom

    first, second = _two_series(tmp_path / "study")
    options = PredictOptions("cpu", formats=("nifti", "dicom-seg"))
    written = predict([tmp_path / "study"], tmp_path / "out", tiny_run, options)
    names = [p.name for p in written]
    assert len(names) == 2 and names[0].startswith("study_2_axial_thin_")
    assert names[1].startswith("study_5_axial_thick_")
    assert [nib.load(p).shape for p in written] == [(10, 8, 6), (9, 6, 4)]
    for out, uid in zip(written, (first, second), strict=True):
        seg = out.with_name(out.name.removesuffix(".nii.gz") + ".dcm")
        referenced = pydicom.dcmread(seg).ReferencedSeriesSequence[0].SeriesInstanceUID
        assert referenced == uid
