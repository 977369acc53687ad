"""DICOM Segmentation objects that reference the source series (highdicom, BINARY type).

Each pixel of each source instance takes the label of the voxel **at the same physical point**:
pixel (row r, column c) lies at ``IPP + c * dc * row_dir + r * dr * col_dir`` (LPS, from
ImagePositionPatient, ImageOrientationPatient and PixelSpacing ``[dr, dc]``), which the inverse
of the volume's affine (RAS; x and y negated for LPS) takes to a voxel index. Nothing is assumed
about how the reader ordered slices or axes; a grid that does not line up with the instances is
an error.
One segment per label value present, numbered 1..N in increasing value order, with the label's
name, colour (CIELab) and SNOMED category/type codes (`medseg.export.anatomy`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.export.anatomy import Code
from medseg.export.labels import LabelInfo, describe_labels, present_values
from medseg.io import GRID_TOLERANCE_MM, ImageError, Volume, atomic_path, check_label_array

if TYPE_CHECKING:
    from highdicom.seg import SegmentDescription
    from pydicom import Dataset
    from pydicom.sr.coding import Code as DicomCode

log = logging.getLogger(__name__)

SERIES_NUMBER = 1000  # high, so the segmentation sorts after the acquired series in viewers
# Type 2 patient/study attributes the segmentation copies from its source (present, maybe empty).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def write_dicom_seg(
    labels: np.ndarray,
    like: Volume,
    names: Mapping[int, str],
    path: Path,
    source_series: Path | None = None,
) -> Path:
    """Write a label map as a DICOM Segmentation of its source series, atomically.

    Args:
        labels: non-negative integer array of shape (X, Y, Z), on the grid of `like` (the
            volume `medseg.io.load_volume` read from the series).
        like: that volume; its affine places every voxel in patient space.
        names: label value -> name (background 0 is not a segment).
        path: output file, e.g. ``NAME.seg.dcm``.
        source_series: folder of the single-frame DICOM series; defaults to the series `like`
            was read from (``like.series``, which names its files when a folder holds several).

    Returns:
        `path`.

    Raises:
        ImageError: the folder holds no series, several series, multi-frame instances,
            instances without the UIDs a segmentation must reference, or slices that do not
            lie on the volume's grid.
        ValueError: `labels` has the wrong shape, negative values or no label > 0.
        TypeError: `labels` is not an integer array.
    """

    check_label_array(labels, like.shape, like.source)
    folder = Path(source_series if source_series is not None else like.source)
    files = like.series.files if source_series is None and like.series is not None else None
    instances = read_series(folder, files)
    values = present_values(labels)
    if not values:
        raise ValueError(f"labels for {folder} hold no label > 0; a DICOM-SEG needs a segment")
    segment_of = np.zeros(max(values) + 1, dtype=np.uint16)
    segment_of[values] = np.arange(1, len(values) + 1)
    frames = np.stack([segment_of[instance_labels(labels, like.affine, ds)] for ds in instances])
    try:
        segmentation = _segmentation(instances, frames, describe_labels(values, names))
    except (ValueError, AttributeError) as err:  # highdicom checks the source instances
        raise ImageError(
            f"{folder}: cannot make a DICOM Segmentation of this series ({err})"
        ) from None
    path = Path(path)
    with atomic_path(path) as tmp:
        segmentation.save_as(tmp)
    log.debug("wrote %s (%d segments, %d source instances)", path, len(values), len(instances))
    return path


def _segmentation(instances: list[Dataset], frames: np.ndarray, infos: list[LabelInfo]) -> Any:
    """highdicom's BINARY Segmentation of `instances` with one frame per instance."""
    import highdicom as hd

    return hd.seg.Segmentation(
        source_images=instances,
        pixel_array=frames.astype(np.uint8 if len(infos) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(infos),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        **_equipment(),
        content_label="MEDSEG",
        content_description="medseg automatic segmentation",
        series_description="medseg segmentation",
    )


def read_series(folder: Path, files: Sequence[Path] | None = None) -> list[Dataset]:
    """The image instances of a single-frame DICOM series, sorted along the slice normal.

    `files` names the series' files where `folder` holds several series (see
    `medseg.io.dicom.list_series`); None reads every file of a folder holding one series.

    Pixel data is not read. Blank SOP Class/Instance UIDs and missing patient/study attributes
    are filled as `_complete` describes.

    Raises:
        ImageError: no image instances, several series, multi-frame instances, or blank
            Study/Series Instance UIDs.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    candidates = files if files is not None else (p for p in Path(folder).iterdir() if p.is_file())
    for file in sorted(Path(f) for f in candidates):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            datasets.append(_complete(ds))
    if not datasets:
        raise ImageError(f"{folder}: no DICOM image instances with a position and orientation")
    _check_series(folder, datasets)
    normal = _normal(datasets[0])
    return sorted(datasets, key=lambda ds: float(np.dot(_position(ds), normal)))


def instance_labels(labels: np.ndarray, affine: np.ndarray, ds: Dataset) -> np.ndarray:
    """The label map sampled on one instance's pixels, matched by physical position.

    Args:
        labels: (X, Y, Z) label map whose voxel (i, j, k) lies at RAS ``affine @ (i, j, k, 1)``.
        affine: 4x4 voxel-to-RAS matrix in mm.
        ds: a single-frame image instance.

    Returns:
        (Rows, Columns) array: the label at each pixel centre.

    Raises:
        ImageError: a pixel centre is not on a voxel centre, or lies outside the volume.
    """
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    row_dir, col_dir = _directions(ds)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    origin = to_voxel[:3, :3] @ (_position(ds) * lps_to_ras) + to_voxel[:3, 3]
    step_col = to_voxel[:3, :3] @ (col_spacing * row_dir * lps_to_ras)  # next column
    step_row = to_voxel[:3, :3] @ (row_spacing * col_dir * lps_to_ras)  # next row
    rows, cols = np.arange(int(ds.Rows)), np.arange(int(ds.Columns))
    index = origin + rows[:, None, None] * step_row + cols[None, :, None] * step_col
    nearest = np.rint(index).astype(np.int64)
    offset_mm = np.linalg.norm((index - nearest) @ np.asarray(affine)[:3, :3].T, axis=-1)
    if offset_mm.max() > GRID_TOLERANCE_MM:
        raise ImageError(
            f"instance {ds.SOPInstanceUID}: its pixels do not lie on the volume's voxel grid; "
            "pass the volume read from this series"
        )
    if (nearest < 0).any() or (nearest >= np.array(labels.shape)).any():
        raise ImageError(
            f"instance {ds.SOPInstanceUID} lies (partly) outside the volume of shape "
            f"{labels.shape}; pass the volume read from this series"
        )
    return labels[nearest[..., 0], nearest[..., 1], nearest[..., 2]]


def _descriptions(infos: list[LabelInfo]) -> list[SegmentDescription]:
    """highdicom segment descriptions, numbered 1..N in the order of `infos`.

    A label's side goes in SegmentedPropertyTypeModifierCodeSequence inside its type item
    (highdicom 0.28's SegmentDescription takes no modifier, so it is added to the dataset).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medseg import __version__

    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, info in enumerate(infos, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=info.name[:64],
            segmented_property_category=_code(info.category),
            segmented_property_type=_code(info.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*info.color),
        )
        if info.laterality is not None:
            modifier = hd.sr.CodedConcept.from_code(_code(info.laterality))
            type_item = description.SegmentedPropertyTypeCodeSequence[0]
            type_item.SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    return descriptions


def _code(code: Code) -> DicomCode:
    from pydicom.sr.coding import Code as DicomCode

    return DicomCode(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _equipment() -> dict[str, str]:
    from medseg import __version__

    return {
        "manufacturer": "medseg",
        "manufacturer_model_name": "medseg",
        "software_versions": __version__,
        "device_serial_number": "0",
    }


def _complete(ds: Dataset) -> Dataset:
    """Fill what anonymisers often drop and a segmentation copies from its source.

    Blank SOP Class/Instance UIDs come from the file meta header (the same instance identity);
    missing type 2 patient and study attributes are added empty, as the standard allows.
    """
    for keyword in _TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
    return ds


def _check_series(folder: Path, datasets: list[Dataset]) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise ImageError(
            f"{folder}: holds {len(series)} series ({', '.join(sorted(series))}); "
            "put each series in its own folder"
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not all(ds.get(keyword) for ds in datasets):
            raise ImageError(
                f"{folder}: instances have no {keyword} (removed by anonymisation?); a DICOM "
                "Segmentation must reference it. Export .seg.nrrd instead, or restore the UIDs"
            )
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise ImageError(f"{folder}: multi-frame instances are not supported for DICOM-SEG")


def _directions(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Unit LPS directions of increasing column index (row direction) and row index."""
    cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return cosines[:3], cosines[3:]


def _normal(ds: Dataset) -> np.ndarray:
    row_dir, col_dir = _directions(ds)
    return np.cross(row_dir, col_dir)


def _position(ds: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in ds.ImagePositionPatient])
