"""The only module that reads or writes image files; every volume keeps its geometry.

Reading goes through MONAI's readers (nibabel for NIfTI, ITK for NRRD, MHA and DICOM series).
Arrays stay in the file's own voxel order together with the voxel-to-world affine in RAS mm,
so a label map written with `save_labels(labels, like=volume)` lies on exactly the input grid.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima", "")
GRID_TOLERANCE_MM = 0.1
"""Two grids are one when no voxel centre moves by more than this (a tenth of a typical voxel;
float32 headers and DICOM's decimal strings stay far below it). Every grid check uses it."""


class ImageError(ValueError):
    """An image file is missing, unreadable or unusable (a user error)."""


class WriteError(ImageError):
    """An output cannot be written: folder not writable, disk full (a user error)."""


@dataclass(frozen=True, eq=False)
class Volume:
    """An intensity image with its geometry.

    Attributes:
        array: float32 array of shape (C, X, Y, Z), channel first, in the file's voxel order.
        affine: 4x4 matrix mapping voxel indices (i, j, k, 1) to RAS world coordinates in mm.
        source: the file (first channel) or DICOM series folder it was read from.
        header: the NIfTI header of the source when it is a NIfTI file, reused when writing.
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path
    header: nib.Nifti1Header | None = None

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


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes (column norms of the affine)."""
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the R, A, S axes, once the array is reoriented to RAS."""
    out = [0.0, 0.0, 0.0]
    for spacing, (ras_axis, _) in zip(voxel_spacing(affine), io_orientation(affine), strict=True):
        out[int(ras_axis)] = spacing
    return tuple(out)  # type: ignore[return-value]


def ras_shape(shape: Sequence[int], affine: np.ndarray) -> tuple[int, int, int]:
    """Spatial shape (X, Y, Z) along the R, A, S axes, once the array is reoriented to RAS."""
    out = [0, 0, 0]
    for size, (ras_axis, _) in zip(shape[:3], io_orientation(affine), strict=True):
        out[int(ras_axis)] = int(size)
    return tuple(out)  # type: ignore[return-value]


def grid_offset_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance in mm between where two voxel-to-world affines put a voxel of `shape`.

    The maps are affine, so the largest distance over the grid is at one of its corners.
    """
    corners = np.array(list(itertools.product(*[(0, max(int(n) - 1, 0)) for n in shape[:3]])))
    points = np.c_[corners, np.ones(len(corners))] @ (np.asarray(affine_a) - affine_b).T
    return float(np.linalg.norm(points[:, :3], axis=1).max())


def same_grid(
    affine_a: np.ndarray, affine_b: np.ndarray, shape_a: Sequence[int], shape_b: Sequence[int]
) -> bool:
    """True when two grids have the same shape and every voxel centre agrees within
    `GRID_TOLERANCE_MM`."""
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        return False
    return grid_offset_mm(affine_a, affine_b, shape_a) <= GRID_TOLERANCE_MM


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


def is_dicom_dir(path: Path) -> bool:
    """True when `path` is a folder holding DICOM files (a series)."""
    if not path.is_dir():
        return False
    for child in sorted(path.iterdir())[:20]:
        if child.is_file() and _has_dicom_magic(child):
            return True
    return False


def is_image_file(path: Path) -> bool:
    """True for files whose suffix medseg reads as an image."""
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image suffix: ``scan.nii.gz`` -> ``scan``."""
    lower = name.lower()
    for suffix in (*IMAGE_SUFFIXES, ".dcm"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(paths: Path | Sequence[Path]) -> Volume:
    """Read an image (one file per channel, a 4D multi-channel NIfTI, or a DICOM series folder).

    Args:
        paths: one path or one path per channel; all channels must share one grid.

    Returns:
        The image as float32 (C, X, Y, Z) with its affine.

    Raises:
        ImageError: missing or unreadable file, wrong dimensionality, empty axis,
            NaN/Inf voxels, or channels on different grids.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
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
    header = _nifti_header(paths[0])
    return Volume(array=array, affine=affine, source=paths[0], header=header)


def load_labels(path: Path) -> LabelMap:
    """Read a label map and check that every value is a non-negative integer.

    Float label files are accepted when their values are whole numbers (a real quirk of
    MSD and BraTS files); anything else raises `ImageError`.
    """
    path = Path(path)
    data, affine = _read(path)
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


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (same suffix); rename it onto `path` on success.

    Readers never see a half-written file, and a crash leaves no partial output behind.
    """
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
        )
    except OSError as err:
        raise WriteError(f"{path}: cannot write ({err.strerror or err})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs follow the umask
        os.replace(tmp, path)
    except OSError as err:  # disk full, quota, permissions: nothing partial is left behind
        raise WriteError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array in file voxel order and its RAS affine, read by a MONAI reader."""
    from monai.data import ITKReader, NibabelReader

    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        if not is_dicom_dir(path):
            raise ImageError(f"{path}: folder holds no DICOM series")
        reader = ITKReader(affine_lps_to_ras=True)
    elif path.name.lower().endswith(NIFTI_SUFFIXES):
        reader = NibabelReader(squeeze_non_spatial_dims=True)
    elif path.name.lower().endswith(IMAGE_SUFFIXES):
        reader = ITKReader(affine_lps_to_ras=True)
    else:
        raise ImageError(
            f"{path}: not a supported image ({', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)"
        )
    try:
        native = reader.read(str(path))
        data, meta = reader.get_data(native)
    except Exception as err:  # readers raise many types for corrupt input
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    affine = np.asarray(meta["affine"], dtype=np.float64)
    return np.asarray(data), affine


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


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_description(path: Path) -> str | None:
    """The ``descrip`` text of a NIfTI file, or None when it is missing or unreadable."""
    try:
        raw = nib.load(str(path)).header["descrip"]
    except Exception:  # any unreadable file counts as absent
        return None
    return bytes(np.asarray(raw).item()).decode("ascii", "replace").rstrip("\x00").strip()


def read_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and RAS affine of an image without loading its voxels when possible.

    NIfTI headers are read directly; other formats are loaded in full.
    """
    path = Path(path)
    if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        try:
            image = nib.load(str(path))
        except Exception as err:
            raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
        return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)
    data, affine = _read(path)
    return tuple(int(s) for s in data.shape[:3]), affine
