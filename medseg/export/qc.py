"""Quality-control pictures: each label's axial, coronal and sagittal slices through its centroid.

Image and labels are first reoriented to the RAS axis order nearest the affine (nibabel
`io_orientation`), so every scan shows the same way up whatever its storage order, and each
panel's aspect ratio comes from the voxel spacing, so a 0.8 x 0.8 x 5 mm scan is not squashed.
Slices follow the **radiological convention**: the patient's right is on the left of the screen
in axial and coronal views (marked R and L), anterior is on the left in sagittal views, and
superior (or anterior, in axial views) is up. The image is channel 0 in grey, windowed to its
1st-99th percentiles; every label on a slice is outlined in its colour (`medseg.export.anatomy`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from medseg.export.labels import (
    bounding_boxes,
    describe_labels,
    label_centroid,
)
from medseg.export.stats import voxel_volume_mm3
from medseg.io import Volume, atomic_path, check_label_array, ras_spacing, strip_suffix

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

VIEWS = ("axial", "coronal", "sagittal")
MAX_ROWS = 12
PANEL_INCHES = 3.0
LEGEND_INCHES = 3.2
# Per view: the RAS axis it cuts, its (row, column) axes, and the (left, right, top, bottom)
# orientation markers of a panel drawn by `view_slice` with origin="lower".
VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_ROW_COL = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
_MARKERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def display_aspect(spacing: Sequence[float], view: str) -> float:
    """Height over width of one displayed pixel (matplotlib's ``aspect``) for a view.

    Args:
        spacing: voxel size in mm along the RAS axes (x, y, z) of the reoriented volume.
        view: "axial", "coronal" or "sagittal".

    Returns:
        Row spacing over column spacing of that view: axial y/x, coronal z/x, sagittal z/y.
    """
    if view not in _ROW_COL:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {tuple(spacing)}")
    row, col = _ROW_COL[view]
    return float(spacing[row]) / float(spacing[col])


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a (X, Y, Z) array to the RAS axis order nearest `affine` (a view, no resampling).

    Returns:
        The array with axes (R, A, S), each increasing towards right, anterior, superior, and
        the voxel size in mm along those axes.
    """
    affine = np.asarray(affine, dtype=np.float64)
    return apply_orientation(array, io_orientation(affine)), ras_spacing(affine)


def view_slice(array_ras: np.ndarray, view: str, index: int) -> np.ndarray:
    """One slice of a RAS array, laid out for ``imshow(origin="lower")`` in radiological view.

    Args:
        array_ras: (R, A, S) array from `to_ras`.
        view: "axial" (cuts S), "coronal" (cuts A) or "sagittal" (cuts R).
        index: slice index along the cut axis.

    Returns:
        2D array (rows, columns): axial (A, L<-R), coronal (S, L<-R), sagittal (S, P<-A).
    """
    return np.take(array_ras, index, axis=VIEW_AXIS[view])[::-1].T


@dataclass(frozen=True)
class _Scene:
    """What every panel draws from: RAS arrays, colours, grey window and voxel size."""

    image: np.ndarray
    labels: np.ndarray
    lut: np.ndarray
    window: tuple[float, float]
    spacing: tuple[float, float, float]


def qc_figure(
    labels: np.ndarray, volume: Volume, names: Mapping[int, str], max_rows: int = MAX_ROWS
) -> Figure:
    """The QC figure: a row of three views per label present, largest `max_rows` labels first.

    Args:
        labels: non-negative integer array of shape (X, Y, Z), on the grid of `volume`.
        volume: the image (channel 0 is shown) and its affine.
        names: label value -> name.
        max_rows: most labels shown; the rest are listed by name under the legend.

    Returns:
        A matplotlib Figure (no pyplot state; Agg renders it).
    """
    from matplotlib.figure import Figure

    check_label_array(labels, volume.shape, volume.source)
    labels_ras, spacing = to_ras(labels, volume.affine)
    image_ras, _ = to_ras(volume.array[0], volume.affine)
    boxes = bounding_boxes(labels_ras)
    counts = np.bincount(labels_ras.ravel())
    infos = sorted(describe_labels(sorted(boxes), names), key=lambda i: -counts[i.value])
    lut = np.zeros((len(counts), 3))
    for info in infos:
        lut[info.value] = np.array(info.color) / 255.0
    scene = _Scene(image_ras, labels_ras, lut, display_window(image_ras), spacing)

    shown = infos[:max_rows]
    rows = [(i.name, label_centroid(labels_ras, i.value, boxes[i.value])) for i in shown]
    rows = rows or [("no labels", (np.array(labels_ras.shape) - 1) / 2)]
    fig = Figure(figsize=(3 * PANEL_INCHES + LEGEND_INCHES, len(rows) * PANEL_INCHES + 0.8))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (title, centre), row_axes in zip(rows, axes, strict=True):
        index = np.rint(centre).astype(int)
        for ax, view in zip(row_axes, VIEWS, strict=True):
            _draw(ax, scene, view, int(index[VIEW_AXIS[view]]))
        row_axes[0].set_ylabel(title, fontsize=9)

    ml = voxel_volume_mm3(volume.affine) / 1000.0
    _legend(fig, [(i.color, f"{i.value} {i.name}: {counts[i.value] * ml:.2f} mL") for i in shown])
    if len(infos) > len(shown):
        rest = ", ".join(i.name for i in infos[len(shown) :])
        note = f"{len(infos) - len(shown)} smaller labels not shown: {rest}"
        fig.text(0.99, 0.005, note[:300], ha="right", va="bottom", fontsize=7, wrap=True)
    case = strip_suffix(Path(volume.source).name)
    fig.suptitle(
        f"{case}: {len(infos)} labels. Radiological convention: patient right on screen left",
        fontsize=10,
    )
    fig.subplots_adjust(
        left=0.04, right=3 * PANEL_INCHES / fig.get_figwidth(), top=1 - 0.5 / fig.get_figheight()
    )
    return fig


def write_qc_png(labels: np.ndarray, volume: Volume, names: Mapping[int, str], path: Path) -> Path:
    """Write the `qc_figure` of a label map as a PNG, atomically.

    Args:
        labels: non-negative integer array of shape (X, Y, Z), on the grid of `volume`.
        volume: the image and its affine.
        names: label value -> name.
        path: output ``.png``.

    Returns:
        `path`.
    """
    path = Path(path)
    fig = qc_figure(labels, volume, names)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    log.debug("wrote %s", path)
    return path


def outline_rgba(labels_2d: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGBA overlay of label boundaries: opaque where a labelled pixel touches another value.

    Args:
        labels_2d: integer (rows, columns) slice.
        lut: (max value + 1, 3) RGB colours in 0-1, indexed by label value.

    Returns:
        (rows, columns, 4) float array, transparent off the boundaries.
    """
    edge = np.zeros(labels_2d.shape, dtype=bool)
    for axis in (0, 1):
        change = np.diff(labels_2d, axis=axis) != 0
        before = [slice(None)] * 2
        after = [slice(None)] * 2
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        edge[tuple(before)] |= change
        edge[tuple(after)] |= change
    # The outermost pixels of a label touching the slice border are a boundary too.
    border = np.zeros_like(edge)
    border[[0, -1], :] = border[:, [0, -1]] = True
    edge = (edge | border) & (labels_2d > 0)
    rgba = np.zeros((*labels_2d.shape, 4))
    rgba[edge, :3] = lut[labels_2d[edge]]
    rgba[edge, 3] = 1.0
    return rgba


def _draw(ax: Axes, scene: _Scene, view: str, index: int) -> None:
    """Image slice in grey, label outlines on top, orientation markers, slice in the title."""
    style = {"origin": "lower", "interpolation": "nearest"}
    vmin, vmax = scene.window
    ax.imshow(view_slice(scene.image, view, index), cmap="gray", vmin=vmin, vmax=vmax, **style)
    ax.imshow(outline_rgba(view_slice(scene.labels, view, index), scene.lut), **style)
    ax.set_aspect(display_aspect(scene.spacing, view))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{view} {'RAS'[VIEW_AXIS[view]]}={index}", fontsize=8)
    left, right, top, bottom = _MARKERS[view]
    marker = {"color": "yellow", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **marker)
    ax.text(0.98, 0.5, right, ha="right", va="center", **marker)
    ax.text(0.5, 0.98, top, ha="center", va="top", **marker)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **marker)


def display_window(image: np.ndarray) -> tuple[float, float]:
    """Robust display range: the 1st and 99th percentiles (a unit range when flat)."""
    low, high = (float(v) for v in np.percentile(image, [1, 99]))
    return (low, high) if high > low else (low, low + 1.0)


def _legend(fig: Figure, entries: list[tuple[tuple[int, int, int], str]]) -> None:
    from matplotlib.patches import Patch

    if not entries:
        return
    handles = [Patch(facecolor=np.array(rgb) / 255.0, label=text) for rgb, text in entries]
    x = 3 * PANEL_INCHES / fig.get_figwidth() + 0.01
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(x, 1 - 0.5 / fig.get_figheight()),
        fontsize=8,
        frameon=False,
        title="label: volume",
        title_fontsize=8,
    )
