"""Volumes and label maps with their geometry: the readers and the label-map writer.

Reading goes through MONAI's readers (nibabel for NIfTI, ITK for NRRD, MHA and DICOM series).
Arrays stay in the file's own voxel order together with the voxel-to-world affine in RAS mm,
so a label map written with `save_labels(labels, like=volume)` lies on exactly the input grid.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.io.dicom import DicomSeries, check_slice_positions, list_series
from medseg.io.files import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageError,
    atomic_path,
    is_dicom_dir,
)
from medseg.io.geometry import same_grid, voxel_spacing
from medseg.io.voxels import (
    VoxelType,
    check_image_voxels,
    check_label_voxels,
    file_voxel_type,
    itk_header,
    numpy_voxel_type,
    vector_to_channels_last,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Volume:
    """An intensity image with its geometry.

    Attributes:
        array: float32 array of shape (C, X, Y, Z), channel first, in the file's voxel order.
        affine: 4x4 matrix mapping voxel indices (i, j, k, 1) to RAS world coordinates in mm.
        source: the file (first channel) or DICOM series folder it was read from.
        header: the NIfTI header of the source when it is a NIfTI file, reused when writing.
        series: the DICOM series it was read from, when it was (a folder may hold several).
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path
    header: nib.Nifti1Header | None = None
    series: DicomSeries | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return voxel_spacing(self.affine)


@dataclass(frozen=True, eq=False)
class LabelMap:
    """An integer label map with its geometry; never intensity-transformed or interpolated linearly.

    Attributes:
        array: integer array of shape (X, Y, Z).
        affine: 4x4 voxel-to-RAS-world matrix in mm.
        source: the file it was read from.
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return voxel_spacing(self.affine)


def check_label_array(labels: np.ndarray, shape: tuple[int, ...], source: Path | str) -> None:
    """Check that `labels` is a non-negative integer map of spatial shape `shape`.

    Args:
        labels: label map, expected shape (X, Y, Z).
        shape: the spatial shape of the image it belongs to.
        source: the image's file, named in the message.

    Raises:
        ValueError: wrong shape, negative values, or values beyond the uint32 range.
        TypeError: not an integer array.
    """
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels have shape {labels.shape}, but {source} has {tuple(shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got minimum {labels.min()}")
    if labels.size and labels.max() > np.iinfo(np.uint32).max:
        raise ValueError(f"label value {labels.max()} exceeds the uint32 range")


Source = Path | DicomSeries
"""What an image is read from: a file, a folder holding one DICOM series, or a `DicomSeries`."""


def load_volume(paths: Source | Sequence[Source]) -> Volume:
    """Read an image (one file per channel, a 4D multi-channel NIfTI, or a DICOM series).

    Args:
        paths: one source or one per channel; all channels must share one grid.

    Returns:
        The image as float32 (C, X, Y, Z) with its affine.

    Raises:
        ImageError: missing or unreadable file, wrong dimensionality, empty axis,
            NaN/Inf voxels, or channels on different grids.
    """
    paths = (
        [_source(paths)]
        if isinstance(paths, (str, Path, DicomSeries))
        else [_source(p) for p in paths]
    )
    if not paths:
        raise ImageError("no image path given")
    channels, affine = [], None
    for path in paths:
        data, aff = _read(path)
        if data.ndim == 4:  # multi-channel NIfTI (MSD stores modalities on the last axis)
            data = np.moveaxis(data, -1, 0)
        elif data.ndim == 3:
            data = data[None]
        else:
            raise ImageError(
                f"{path}: expected a 3D image (or 4D with channels last), got shape {data.shape}"
            )
        if channels and not same_grid(aff, affine, data.shape[1:], channels[0].shape[1:]):
            raise ImageError(
                f"{path}: channel lies on a different grid (shape {data.shape[1:]}) than "
                f"{paths[0]} (shape {channels[0].shape[1:]}); resample it onto that grid first"
            )
        affine = aff if affine is None else affine
        channels.append(data)
    array = np.concatenate(channels, axis=0).astype(np.float32, copy=False)
    _validate_array(array, paths[0])
    _validate_affine(affine, paths[0])
    first = paths[0]
    if isinstance(first, DicomSeries):
        return Volume(array=array, affine=affine, source=first.folder, series=first)
    return Volume(array=array, affine=affine, source=first, header=_nifti_header(first))


def _source(path: str | Source) -> Source:
    """A DICOM folder becomes its (single) series; files stay paths."""
    if isinstance(path, DicomSeries):
        return path
    path = Path(path)
    return _only_series(path) if path.is_dir() else path


def load_labels(path: Path) -> LabelMap:
    """Read a label map and check that every value is a non-negative integer.

    Float label files are accepted when their values are whole numbers (a real quirk of
    MSD and BraTS files); anything else raises `ImageError`.
    """
    path = Path(path)
    data, affine = _read(path, labels=True)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageError(f"{path}: expected a 3D label map, got shape {data.shape}")
    _validate_array(data[None], path)
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise ImageError(
            f"{path}: label map holds non-integer values; is this an image, not labels?"
        )
    if rounded.min() < 0:
        raise ImageError(f"{path}: label map holds negative values ({rounded.min():g})")
    return LabelMap(array=rounded.astype(np.int32), affine=affine, source=path)


def label_dtype(max_label: int) -> type[np.integer]:
    """Smallest unsigned integer type for labels up to `max_label` (uint8, then uint16)."""
    if max_label <= np.iinfo(np.uint8).max:
        return np.uint8
    if max_label <= np.iinfo(np.uint16).max:
        return np.uint16
    return np.uint32


def save_labels(
    labels: np.ndarray, like: Volume | LabelMap, path: Path, description: str = "medseg label map"
) -> Path:
    """Write an integer label map on exactly the grid of `like` as NIfTI, atomically.

    Args:
        labels: integer array of shape (X, Y, Z), the spatial shape of `like`.
        like: the volume whose grid (shape, affine, and NIfTI header when present) is kept.
        path: output ``.nii.gz`` or ``.nii`` file.
        description: text for the NIfTI ``descrip`` field (at most 79 characters kept).
    """
    check_label_array(labels, like.array.shape[-3:], like.source)
    dtype = label_dtype(int(labels.max()) if labels.size else 0)
    header = like.header.copy() if isinstance(like, Volume) and like.header is not None else None
    image = nib.Nifti1Image(labels.astype(dtype), like.affine, header=header)
    if header is None:
        image.set_qform(like.affine, code=1)
        image.set_sform(like.affine, code=1)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, float(labels.max() if labels.size else 0)
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
    with atomic_path(Path(path)) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def _read(path: Source, labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Array in file voxel order (components, if any, on a last axis) and its RAS affine.

    The voxel type is checked first (`medseg.io.voxels`: complex images and non-scalar label
    maps are refused); scalar files are read by MONAI's readers, vector ones as noted there.
    """
    if isinstance(path, DicomSeries) or path.is_dir():
        series = path if isinstance(path, DicomSeries) else _only_series(path)
        voxels = file_voxel_type(series.folder, series.files)
    elif not path.exists():
        raise ImageError(f"{path}: file not found")
    elif not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise ImageError(
            f"{path}: not a supported image ({', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)"
        )
    else:
        series, voxels = None, file_voxel_type(path)
    (check_label_voxels if labels else check_image_voxels)(voxels, series or path)
    if series is not None:
        data, affine = _read_series(series, voxels)
    elif voxels.kind == "vector" and path.name.lower().endswith(NIFTI_SUFFIXES):
        data, affine = _read_nifti_vectors(path)
    elif voxels.kind == "vector":
        data, affine = _read_sitk([path])
    else:
        data, affine = _read_monai(path)
    if np.iscomplexobj(data):  # a reader that decoded complex voxels the header did not name
        check_image_voxels(numpy_voxel_type(data.dtype), series or path)
    return (data.astype(np.uint8) if data.dtype == bool else data), affine


def _read_monai(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A scalar image file through MONAI's nibabel (NIfTI) or ITK reader."""
    from monai.data import ITKReader, NibabelReader

    nifti = path.name.lower().endswith(NIFTI_SUFFIXES)
    reader = (
        NibabelReader(squeeze_non_spatial_dims=True) if nifti else ITKReader(affine_lps_to_ras=True)
    )
    try:
        # resolved: a symlinked .mhd or .nhdr finds its data file beside the real header
        native = reader.read(str(path.resolve()))
        data, meta = reader.get_data(native)
    except Exception as err:  # readers raise many types for corrupt input
        if not nifti:  # ITK's Python wrapping lacks some pixel types (int8, int64): SimpleITK
            with contextlib.suppress(ImageError):
                return _read_sitk([path])
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    return np.asarray(data), np.asarray(meta["affine"], dtype=np.float64)


def _read_nifti_vectors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI of RGB24/RGBA32 voxels through nibabel (MONAI's reader cannot cast them):
    (X, Y, Z, components) float32."""
    try:
        image = nib.load(str(path))
        array = vector_to_channels_last(np.asarray(image.dataobj))
    except Exception as err:  # nibabel raises many types for corrupt input
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    return _squeeze_to_3d(array, path), np.asarray(image.affine, dtype=np.float64)


def _read_sitk(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """A file (or DICOM series) through SimpleITK, for what MONAI's ITK reader cannot read:
    vector pixels (which it also puts on the wrong axes) and pixel types ITK's Python wrapping
    lacks. (X, Y, Z) or (X, Y, Z, components) in ITK's index order, and the RAS affine."""
    import SimpleITK as sitk

    source = files[0] if len(files) == 1 else files[0].parent
    names = [str(f.resolve()) for f in files]
    try:
        image = sitk.ReadImage(names if len(names) > 1 else names[0])
    except Exception as err:  # SimpleITK raises RuntimeError with ITK's message
        raise ImageError(f"{source}: cannot read image ({type(err).__name__}: {err})") from None
    if image.GetDimension() != 3:
        raise ImageError(f"{source}: expected a 3D image, got {image.GetDimension()} dimensions")
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C])
    return np.moveaxis(array, (0, 1, 2), (2, 1, 0)), _sitk_affine(image)


def _squeeze_to_3d(array: np.ndarray, source: Path) -> np.ndarray:
    """(X, Y, Z, [1, ...], C) -> (X, Y, Z, C): singleton axes between space and components go."""
    spatial, components = array.shape[:-1], array.shape[-1]
    kept = [n for i, n in enumerate(spatial) if i < 3 or n != 1]
    if len(kept) != 3:
        raise ImageError(f"{source}: expected a 3D image of vectors, got shape {array.shape}")
    return array.reshape(*kept, components)


def _only_series(folder: Path) -> DicomSeries:
    """The one image series in a DICOM folder; a folder holding several is refused."""
    if not is_dicom_dir(folder):
        raise ImageError(f"{folder}: folder holds no DICOM series")
    series = list_series(folder)
    if len(series) > 1:
        listed = "; ".join(str(s).removeprefix(f"{folder} ") for s in series)
        raise ImageError(
            f"{folder}: holds {len(series)} DICOM series ({listed}); give medseg predict the "
            "folder (it segments each series into its own output) or put each in its own folder"
        )
    return series[0]


def _read_series(series: DicomSeries, voxels: VoxelType) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series as ITK reads it (through MONAI's ITKReader), checked slice by slice."""
    import itk
    from monai.data import ITKReader

    if voxels.kind == "vector":
        data, affine = _read_sitk(list(series.files))
        check_slice_positions(series, affine, data.shape[2])
        return data, affine
    files = [str(f) for f in series.files]
    warnings = itk.ProcessObject.GetGlobalWarningDisplay()
    itk.ProcessObject.SetGlobalWarningDisplay(False)  # uneven slices: refused below, in one line
    try:
        native = itk.imread(files if len(files) > 1 else files[0])
        data, meta = ITKReader(affine_lps_to_ras=True).get_data(native)
    except Exception as err:  # ITK raises many types for corrupt input
        raise ImageError(f"{series}: cannot read image ({type(err).__name__}: {err})") from None
    finally:
        itk.ProcessObject.SetGlobalWarningDisplay(warnings)
    affine = np.asarray(meta["affine"], dtype=np.float64)
    data = np.asarray(data)
    if data.ndim == 3:
        check_slice_positions(series, affine, data.shape[2])
    return data, affine


def _validate_array(array: np.ndarray, path: Path) -> None:
    if 0 in array.shape:
        raise ImageError(f"{path}: image has an empty axis (shape {array.shape[1:]})")
    if not np.isfinite(array).all():
        raise ImageError(f"{path}: image contains NaN or infinite voxels; fix or mask them first")


def _validate_affine(affine: np.ndarray, path: Path) -> None:
    spacing = np.asarray(voxel_spacing(affine))
    if not np.isfinite(affine).all() or (spacing <= 0).any():
        raise ImageError(f"{path}: header has zero or invalid voxel spacing {spacing.tolist()}")
    direction = affine[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise ImageError(
            f"{path}: direction cosines are not orthonormal (sheared or corrupt header); "
            "fix the header (e.g. re-save from 3D Slicer) before segmenting"
        )


def _nifti_header(path: Path) -> nib.Nifti1Header | None:
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return None
    header = nib.load(str(path)).header
    return header if isinstance(header, nib.Nifti1Header) else nib.Nifti1Header.from_header(header)


def read_description(path: Path) -> str | None:
    """The ``descrip`` text of a NIfTI file, or None when it is missing or unreadable."""
    try:
        raw = nib.load(str(path)).header["descrip"]
    except Exception:  # any unreadable file counts as absent
        return None
    return bytes(np.asarray(raw).item()).decode("ascii", "replace").rstrip("\x00").strip()


def read_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and RAS affine of an image without loading its voxels when possible.

    NIfTI headers are read by nibabel, NRRD/MHA headers by SimpleITK (the planner and the
    training budget read every case's geometry); DICOM series and other images with other than
    three dimensions are loaded in full.
    """
    path = Path(path)
    if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        try:
            image = nib.load(str(path))
        except Exception as err:
            raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
        return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)
    if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
        header = _sitk_header(path)
        if header is not None and header.GetDimension() == 3:
            return tuple(int(s) for s in header.GetSize()), _sitk_affine(header)
    data, affine = _read(path)
    return tuple(int(s) for s in data.shape[:3]), affine


def _sitk_header(path: Path) -> Any:
    """`itk_header` of `path`, or None when it is unreadable (the full read then says why)."""
    try:
        return itk_header(path)
    except RuntimeError:
        return None


def _sitk_affine(image: Any) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image or header (LPS in ITK), as MONAI's
    ITK reader computes it."""
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
