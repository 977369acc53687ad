"""Shared fixtures: the demo dataset shipped in the package and the optional shared data."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets in ../shared/data; skips the test in clones that lack them."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not available")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def demo_dataset() -> Path:
    """The 10-case MSD hippocampus subset shipped in medseg/data/hippocampus_demo."""
    return Path(str(files("medseg") / "data" / "hippocampus_demo"))


TINY = [
    "model.filters=[4,8,16]",
    "model.deep_supervision=1",
    "model.patch_size=[32,32,32]",
    "train.epochs=2",
    "train.iterations_per_epoch=2",
    "train.batch_size=2",
    "train.val_every=1",
    "train.device=cpu",
    "infer.device=cpu",
]


@pytest.fixture(scope="session")
def tiny_overrides(demo_dataset: Path) -> list[str]:
    """Overrides for a seconds-long CPU training on the bundled dataset."""
    return [f"data.root={demo_dataset}", *TINY]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    """A run folder trained for a few steps (weights are meaningless; the files are real)."""
    from medseg.config import load_config
    from medseg.training import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return train(load_config(None, tiny_overrides), run_dir)


def read_sitk(path: Path):  # noqa: ANN201 - SimpleITK image
    """Read a file, or a DICOM series folder, independently of medseg (SimpleITK, LPS)."""
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def write_dicom_series(
    folder: Path,
    positions: list[tuple[float, float, float]],
    rows_cols: tuple[int, int] = (8, 10),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    series: tuple[str, int, str] | None = None,
    study_uid: str | None = None,
) -> Path:
    """Write a tiny single-frame CT series (one file per position, LPS mm) with pydicom.

    Each slice's pixels are its slice index times 100 plus the column index, so a reader's
    slice order and axes can be checked. `series` is (SeriesInstanceUID, number, description).
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid, number, description = series or (generate_uid(), 1, "test series")
    study = study_uid or generate_uid(entropy_srcs=["medseg-test-study"])
    rows, cols = rows_cols
    for k, position in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = instance = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, instance
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study, "frame of reference"])
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Patient", "medseg-test"
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = number, description, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
        ds.SliceThickness = "2.5"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        pixels = 100 * k + np.tile(np.arange(cols, dtype=np.int16), (rows, 1))
        ds.PixelData = pixels.astype(np.int16).tobytes()
        ds.save_as(folder / f"slice_{number}_{k:03d}.dcm", enforce_file_format=True)
    return folder


def even_positions(n: int, step: float = 2.5) -> list[tuple[float, float, float]]:
    """Slice positions (LPS mm) of an axial series without tilt or gaps."""
    return [(-10.0, -20.0, 30.0 + step * k) for k in range(n)]
