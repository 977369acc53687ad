"""Per-scan outputs that clinicians open in 3D Slicer and PACS, written next to the NIfTI map.

One module per format, all taking in-memory arrays (labels (X, Y, Z) on the grid of a
`medseg.io.Volume`) and writing atomically:

- `seg_nrrd.write_seg_nrrd`: 3D Slicer segmentation ``NAME.seg.nrrd``.
- `color_table.write_color_table`: Slicer colour table ``NAME.ctbl`` for the NIfTI label map.
- `stats.label_statistics`, `stats.write_stats_json`, `stats.write_stats_csv`: volume (mL),
  intensity, centroid and bounding box per label.
- `qc.write_qc_png`: axial/coronal/sagittal QC picture per label.
- `dicom_seg.write_dicom_seg`: DICOM Segmentation referencing the source DICOM series.

Names, DICOM codes and sides of each label come from `anatomy`, its colour from
`colors.label_colors` (one colour per label, distinct within the label names, shared by every
format).
Heavy dependencies (slicerio, matplotlib, highdicom, pydicom) are imported when a writer runs.
"""

from __future__ import annotations

from medseg.export.color_table import write_color_table
from medseg.export.dicom_seg import write_dicom_seg
from medseg.export.qc import display_aspect, qc_figure, write_qc_png
from medseg.export.seg_nrrd import write_seg_nrrd
from medseg.export.stats import label_statistics, write_stats_csv, write_stats_json

__all__ = [
    "display_aspect",
    "label_statistics",
    "qc_figure",
    "write_color_table",
    "write_dicom_seg",
    "write_qc_png",
    "write_seg_nrrd",
    "write_stats_csv",
    "write_stats_json",
]
