"""The only package that reads or writes image files; every volume keeps its geometry.

- `volumes`: `load_volume` / `load_labels` (MONAI's readers) and `save_labels`, arrays in the
  file's own voxel order with their voxel-to-RAS affine;
- `dicom`: the series in a DICOM folder, and the check that their slices lie on the grid read;
- `geometry`: spacing along array and RAS axes, and the one "same grid" tolerance in mm;
- `files`: suffixes, atomic writes, and the user-error types.
"""

from __future__ import annotations

from medseg.io.files import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageError,
    WriteError,
    atomic_path,
    image_suffix,
    is_dicom_dir,
    is_image_file,
    strip_suffix,
)
from medseg.io.geometry import (
    GRID_TOLERANCE_MM,
    grid_offset_mm,
    ras_shape,
    ras_spacing,
    same_grid,
    voxel_spacing,
)
from medseg.io.volumes import (
    LabelMap,
    Volume,
    check_label_array,
    label_dtype,
    load_labels,
    load_volume,
    read_description,
    read_geometry,
    save_labels,
)

__all__ = [
    "DICOM_SUFFIXES",
    "GRID_TOLERANCE_MM",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ImageError",
    "LabelMap",
    "Volume",
    "WriteError",
    "atomic_path",
    "check_label_array",
    "grid_offset_mm",
    "image_suffix",
    "is_dicom_dir",
    "is_image_file",
    "label_dtype",
    "load_labels",
    "load_volume",
    "ras_shape",
    "ras_spacing",
    "read_description",
    "read_geometry",
    "same_grid",
    "save_labels",
    "strip_suffix",
    "voxel_spacing",
]
