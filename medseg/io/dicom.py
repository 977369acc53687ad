"""DICOM series: which series a folder holds, and whether their slices lie on the grid read.

ITK (the reader MONAI uses) reads a series as a regular grid: directions orthogonalised, the slice
spacing averaged, and only a warning when the slices are not evenly spaced or are sheared. A
series acquired with gantry tilt, or missing a slice, would be segmented millimetres off, so
every slice's ImagePositionPatient is compared with the affine that was read (as
`medseg.export.dicom_seg` matches pixels), and a series whose slices do not lie on it is refused:
medseg does not resample such series itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.files import ImageError
from medseg.io.geometry import GRID_TOLERANCE_MM

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_HEADER_TAGS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "NumberOfFrames",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
)
TILT_TOLERANCE_DEGREES = 0.05
"""A slice step further than this from the slice normal is reported as a gantry tilt."""


@dataclass(frozen=True)
class DicomSeries:
    """One image series in a DICOM folder (a folder may hold several).

    Attributes:
        folder: the folder holding its files.
        uid: GDCM's series identifier (the SeriesInstanceUID, plus the details GDCM splits a
            series on, such as orientation), as MONAI's ITKReader names series.
        files: its files in GDCM's slice order.
        description: SeriesDescription ("" when absent).
        number: SeriesNumber ("" when absent).
    """

    folder: Path
    uid: str
    files: tuple[Path, ...]
    description: str = ""
    number: str = ""

    def __str__(self) -> str:
        label = " ".join(
            p for p in (f"#{self.number}" if self.number else "", self.description) if p
        )
        return f"{self.folder} [series {label or self.uid}]"


def list_series(folder: Path) -> list[DicomSeries]:
    """The image series in a DICOM folder, found as MONAI's ITKReader finds them (GDCM, series
    details on, split by SeriesDate), ordered by series number, description and identifier.

    Raises:
        ImageError: the folder holds no DICOM image series.
    """
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")
    names.SetDirectory(str(folder))
    found = []
    for uid in names.GetSeriesUIDs():
        files = tuple(Path(f) for f in names.GetFileNames(uid))
        header = _header(files[0])
        number = str(header.get("SeriesNumber", "") or "").strip()
        description = str(header.get("SeriesDescription", "") or "").strip()
        found.append(DicomSeries(Path(folder), str(uid), files, description, number))
    if not found:
        raise ImageError(f"{folder}: folder holds no DICOM image series")
    return sorted(found, key=lambda s: (_as_number(s.number), s.description, s.uid))


def check_slice_positions(series: DicomSeries, affine: np.ndarray, n_slices: int) -> None:
    """Refuse a series whose slices do not lie on the grid `affine` describes.

    The files, in the order of their position along the slice axis, must be the centres of
    voxels (0, 0, k), k = 0 .. n_slices - 1, of the volume read, within `GRID_TOLERANCE_MM`.
    Multi-frame files and files without positions are not checked (no position per file).

    Args:
        series: the series read.
        affine: its voxel-to-RAS affine as read (slices along the third array axis).
        n_slices: the volume's size along that axis.

    Raises:
        ImageError: gantry tilt, uneven spacing (a missing slice), or duplicate positions.
    """
    headers = [_header(f) for f in series.files]
    if any(_frames(h) > 1 or "ImagePositionPatient" not in h for h in headers):
        return
    ras = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers]) * _LPS_TO_RAS
    affine = np.asarray(affine, dtype=np.float64)
    if len(ras) == n_slices:
        along = (np.c_[ras, np.ones(len(ras))] @ np.linalg.inv(affine).T)[:, 2]
        grid = np.c_[np.zeros((n_slices, 2)), np.arange(n_slices), np.ones(n_slices)]
        deviation = np.linalg.norm(ras[np.argsort(along)] - (grid @ affine.T)[:, :3], axis=1)
        if deviation.max() <= GRID_TOLERANCE_MM:
            return
        where = f"a slice lies {deviation.max():.1f} mm off the regular grid ITK reads"
    else:
        where = f"{len(ras)} files make {n_slices} slices"
    raise ImageError(
        f"{series}: {_irregularity(ras * _LPS_TO_RAS, headers[0])}; {where}. medseg does not "
        "resample such series: resample it first (e.g. load it in 3D Slicer, whose DICOM import "
        "corrects gantry tilt, and save it as NRRD or NIfTI), then segment that file"
    )


def _irregularity(lps: np.ndarray, first: Any) -> str:
    """What is wrong with slice positions (LPS mm): tilt, uneven spacing or duplicates."""
    cosines = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    ordered = lps[np.argsort(lps @ normal)]
    steps = np.diff(ordered, axis=0)
    if len(steps) == 0:
        return "its slice position does not match the volume read"
    along = steps @ normal
    lengths = np.linalg.norm(steps, axis=1)
    if lengths.min() <= GRID_TOLERANCE_MM:
        return "two or more of its slices share one position (duplicate slices)"
    tilt = math.degrees(math.acos(float(np.clip((np.abs(along) / lengths).min(), 0.0, 1.0))))
    if tilt > TILT_TOLERANCE_DEGREES:
        return f"its slices are sheared by {tilt:.1f} degrees (gantry tilt)"
    return (
        f"its slice spacing varies from {along.min():.2f} to {along.max():.2f} mm "
        "(a missing slice?)"
    )


def _header(path: Path) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except Exception as err:  # pydicom raises many types for corrupt files
        raise ImageError(
            f"{path}: cannot read DICOM header ({type(err).__name__}: {err})"
        ) from None


def _frames(header: Any) -> int:
    try:
        return int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf
