"""Voxel types: what medseg accepts from each reader, decided in one place.

The type is read from the header before the voxels are (nibabel for NIfTI, SimpleITK's
header-only read for NRRD/MHA, pydicom for a DICOM series), because the readers convert
silently: numpy drops the imaginary part of complex voxels with only a warning, and MONAI's ITK
reader scrambles the axes of vector images or cannot read them at all.

The policy, by what a voxel of the file holds:

- integer or floating point, any width the readers decode: images are accepted as float32
  (NaN/Inf refused); label maps when every value is a whole number >= 0;
- boolean: accepted as 0/1;
- complex (NIfTI complex64/128/256, ITK complex pixels): refused, images and label maps alike;
  the message gives a command that saves the magnitude;
- several components (NIfTI RGB24/RGBA32, NRRD/MHA vector pixels, colour DICOM): in an image each
  component becomes a channel, so a model trained on that many channels takes it and any other
  refuses it, naming the count; a label map is refused;
- types the readers cannot decode (NIfTI's 1-bit DT_BINARY, float128 where numpy lacks it):
  refused ("cannot read image").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.files import NIFTI_SUFFIXES, ImageError

MAGNITUDE_COMMAND = (
    'python -c "import sys, nibabel as nib, numpy as np; i = nib.load(sys.argv[1]); '
    "nib.save(nib.Nifti1Image(np.abs(np.asarray(i.dataobj)).astype('float32'), i.affine), "
    'sys.argv[2])" IN.nii.gz OUT_magnitude.nii.gz'
)
"""A command that writes the magnitude of a complex NIfTI as float32 (nibabel only)."""


@dataclass(frozen=True)
class VoxelType:
    """What one voxel of a file holds.

    Attributes:
        kind: "real" (integer, float or bool), "complex" or "vector".
        components: values per voxel (1 for real and complex).
        name: the type as the header names it, for messages (e.g. "complex64", "RGB24").
    """

    kind: str
    components: int
    name: str


def file_voxel_type(path: Path, dicom_files: tuple[Path, ...] = ()) -> VoxelType:
    """The voxel type of an image file (or DICOM series, given its files), from its header.

    Raises:
        ImageError: the header cannot be read.
    """
    try:
        if dicom_files:
            return _dicom_type(dicom_files[0])
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return numpy_voxel_type(_nifti_dtype(path))
        return _itk_type(path)
    except ImageError as err:  # a type that is no number: name the file
        raise ImageError(f"{path}: {err}") from None
    except Exception as err:  # readers raise many types for corrupt headers
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


def numpy_voxel_type(dtype: np.dtype) -> VoxelType:
    """The voxel type of a numpy dtype: a structured dtype (nibabel's RGB24) is a vector."""
    dtype = np.dtype(dtype)
    if dtype.fields:
        name = {3: "RGB24", 4: "RGBA32"}.get(len(dtype.fields), str(dtype))
        return VoxelType("vector", len(dtype.fields), name)
    if dtype.kind == "c":
        return VoxelType("complex", 1, dtype.name)
    if dtype.kind in "biuf":
        return VoxelType("real", 1, dtype.name)
    raise ImageError(f"voxels of type {dtype} are not numbers")


def check_image_voxels(voxels: VoxelType, source: object) -> None:
    """Refuse complex images (the one rule for images; vectors become channels).

    Raises:
        ImageError: naming the type and the command that takes the magnitude.
    """
    if voxels.kind == "complex":
        raise ImageError(
            f"{source}: voxels are complex numbers ({voxels.name}); medseg segments real-valued "
            f"images. Save the magnitude first, e.g. {MAGNITUDE_COMMAND}"
        )


def check_label_voxels(voxels: VoxelType, source: object) -> None:
    """Refuse label maps whose voxels are not single real numbers.

    Raises:
        ImageError: complex or vector voxels, naming the type.
    """
    if voxels.kind != "real":
        what = "complex numbers" if voxels.kind == "complex" else f"{voxels.components} values"
        raise ImageError(
            f"{source}: a label map holds one integer per voxel, but its voxels are {what} "
            f"({voxels.name}); is this an image rather than labels?"
        )


def vector_to_channels_last(array: np.ndarray) -> np.ndarray:
    """A structured (RGB24-style) array as float32 with its components on a new last axis."""
    return np.stack([array[name].astype(np.float32) for name in array.dtype.names], axis=-1)


def _nifti_dtype(path: Path) -> np.dtype:
    import nibabel as nib

    return nib.load(str(path)).header.get_data_dtype()


def itk_header(path: Path) -> Any:
    """SimpleITK's file reader of `path` with its header read and no voxels (NRRD, MHA, ...).

    Raises:
        RuntimeError: SimpleITK cannot read the header.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path.resolve()))  # a symlinked .mhd finds its data file
    reader.ReadImageInformation()
    return reader


def _itk_type(path: Path) -> VoxelType:
    import SimpleITK as sitk

    reader = itk_header(path)
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    components = int(reader.GetNumberOfComponents())
    if name.startswith("complex"):
        return VoxelType("complex", 1, name)
    if components > 1 or name.startswith("vector"):
        return VoxelType("vector", components, name)
    return VoxelType("real", 1, name)


def _dicom_type(first: Path) -> VoxelType:
    import pydicom

    header: Any = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SamplesPerPixel"])
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if samples > 1:
        return VoxelType("vector", samples, f"{samples} samples per pixel (colour DICOM)")
    return VoxelType("real", 1, "DICOM")
