"""Per-label statistics of a label map on its image: volume, intensity, centroid, bounding box.

`label_statistics` returns, and `write_stats_json` writes, one case in this layout (values
illustrate it)::

    {
      "case": "hippocampus_143",
      "source": "/data/imagesTr/hippocampus_143.nii.gz",
      "shape": [32, 45, 41],
      "spacing_mm": [1.0, 1.0, 1.0],
      "voxel_volume_mm3": 1.0,
      "labels": [
        {"value": 1, "name": "Anterior", "voxels": 1466, "volume_ml": 1.466,
         "mean_intensity": 81.2, "std_intensity": 14.9,
         "centroid_voxel": [16.1, 22.4, 19.0],
         "centroid_ras_mm": [17.1, 23.4, 20.0], "centroid_lps_mm": [-17.1, -23.4, 20.0],
         "bbox_min_voxel": [8, 10, 7], "bbox_max_voxel": [24, 35, 30]},
        {"value": 2, "name": "Posterior", "voxels": 0, "volume_ml": 0.0,
         "mean_intensity": null, "std_intensity": null, "centroid_voxel": null,
         "centroid_ras_mm": null, "centroid_lps_mm": null,
         "bbox_min_voxel": null, "bbox_max_voxel": null}
      ]
    }

Labels are every named value > 0 plus any unnamed value present, in increasing order; a label
absent from the map has 0 voxels, 0.0 mL and null for the rest. Volume in mL is
``voxels * |det(affine[:3, :3])| / 1000``. Intensities are of channel 0 (std with ddof=0).
The centroid is the affine applied to the mean voxel index. Bounding boxes are inclusive voxel
indices per array axis. JSON has no NaN or infinity: such values are written as null.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.export.labels import bounding_boxes, label_centroid, label_name
from medseg.io import Volume, atomic_path, check_label_array, strip_suffix

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "case",
    "value",
    "name",
    "voxels",
    "volume_ml",
    "mean_intensity",
    "std_intensity",
    *(f"centroid_ras_{a}_mm" for a in "xyz"),
    *(f"centroid_lps_{a}_mm" for a in "xyz"),
    *(f"bbox_{end}_{a}" for end in ("min", "max") for a in "ijk"),
)

_MEASURED = (
    "mean_intensity",
    "std_intensity",
    "centroid_voxel",
    "centroid_ras_mm",
    "centroid_lps_mm",
    "bbox_min_voxel",
    "bbox_max_voxel",
)


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3: |det| of the affine's 3x3 part."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def label_statistics(
    labels: np.ndarray, volume: Volume, names: Mapping[int, str], case: str | None = None
) -> dict[str, Any]:
    """Statistics of every label of a label map (layout in the module docstring).

    Args:
        labels: non-negative integer array of shape (X, Y, Z), on the grid of `volume`.
        volume: the image; channel 0 gives the intensities, its affine the geometry.
        names: label value -> name; background 0 is not reported.
        case: case name; defaults to the volume's file name without its suffix.

    Returns:
        A JSON-ready dict (NaN-free: missing values are None).
    """
    check_label_array(labels, volume.shape, volume.source)
    affine = np.asarray(volume.affine, dtype=np.float64)
    boxes = bounding_boxes(labels)
    values = sorted({int(v) for v in names if int(v) > 0} | set(boxes))
    image = volume.array[0]
    rows = [
        {"value": v, "name": label_name(v, names)}
        | _measure(labels, image, affine, v, boxes.get(v))
        for v in values
    ]
    return {
        "case": case if case is not None else strip_suffix(Path(volume.source).name),
        "source": str(volume.source),
        "shape": list(volume.shape),
        "spacing_mm": list(volume.spacing),
        "voxel_volume_mm3": voxel_volume_mm3(affine),
        "labels": rows,
    }


def _measure(
    labels: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    value: int,
    box: tuple[slice, slice, slice] | None,
) -> dict[str, Any]:
    """One label's statistics, computed inside its bounding box `box` (None when absent)."""
    if box is None:
        return {"voxels": 0, "volume_ml": 0.0} | dict.fromkeys(_MEASURED)
    mask = labels[box] == value
    count = int(np.count_nonzero(mask))
    intensity = image[box][mask].astype(np.float64)
    centroid = label_centroid(labels, value, box)
    ras = affine @ np.append(centroid, 1.0)
    return {
        "voxels": count,
        "volume_ml": count * voxel_volume_mm3(affine) / 1000.0,
        "mean_intensity": float(intensity.mean()),
        "std_intensity": float(intensity.std()),
        "centroid_voxel": centroid.tolist(),
        "centroid_ras_mm": ras[:3].tolist(),
        "centroid_lps_mm": [float(-ras[0]), float(-ras[1]), float(ras[2])],
        "bbox_min_voxel": [s.start for s in box],
        "bbox_max_voxel": [s.stop - 1 for s in box],
    }


def write_stats_json(stats: Mapping[str, Any], path: Path) -> Path:
    """Write one case's `label_statistics` as strict JSON (NaN and infinity become null)."""
    path = Path(path)
    text = json.dumps(_finite(stats), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    log.debug("wrote %s", path)
    return path


def stats_rows(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One case's statistics as flat CSV rows (columns `CSV_COLUMNS`; None for missing)."""
    rows = []
    for label in stats["labels"]:
        row: dict[str, Any] = {"case": stats["case"]}
        row |= {key: label[key] for key in CSV_COLUMNS[1:7]}
        for key, axes in (("centroid_ras", "xyz"), ("centroid_lps", "xyz")):
            coords = label[f"{key}_mm"] or [None] * 3
            row |= {f"{key}_{a}_mm": c for a, c in zip(axes, coords, strict=True)}
        for end in ("min", "max"):
            bounds = label[f"bbox_{end}_voxel"] or [None] * 3
            row |= {f"bbox_{end}_{a}": b for a, b in zip("ijk", bounds, strict=True)}
        rows.append(row)
    return rows


def write_stats_csv(stats: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write the statistics of a batch of cases as one CSV: a row per (case, label).

    Args:
        stats: `label_statistics` results, one per case.
        path: output ``.csv``; missing values (absent labels, NaN) are empty cells.
    """
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for case in stats:
            writer.writerows(_finite(stats_rows(case)))
    log.debug("wrote %s", path)
    return path


def _finite(value: Any) -> Any:
    """A copy of nested dicts/lists with NaN and infinity replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value
