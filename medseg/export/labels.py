"""What a label map holds: validation, values present, and each value's name, colour and codes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.export.anatomy import GENERIC, RGB, Code, lookup_anatomy, palette_color


@dataclass(frozen=True)
class LabelInfo:
    """Everything an export format says about one label value.

    Attributes:
        value: the label value in the map (> 0).
        name: its name, from the label names or ``label_<value>`` when it has none.
        color: display colour, RGB 0-255.
        category: segmented property category code.
        type: segmented property type code.
        name_generated: True when the name was made up because the label names lack it.
        color_generated: True when the colour comes from the palette, not the anatomy table.
    """

    value: int
    name: str
    color: RGB
    category: Code
    type: Code
    name_generated: bool
    color_generated: bool

    @property
    def color_float(self) -> tuple[float, float, float]:
        """The colour as RGB in 0-1."""
        return tuple(round(c / 255.0, 6) for c in self.color)  # type: ignore[return-value]


def present_values(labels: np.ndarray) -> list[int]:
    """Sorted label values > 0 that occur in `labels`."""
    return [int(v) for v in np.unique(labels) if v > 0]


def label_name(value: int, names: Mapping[int, str]) -> str:
    """The name of `value`, or ``label_<value>`` when `names` lacks it."""
    name = names.get(int(value))
    return str(name) if name else f"label_{value}"


def describe_label(value: int, names: Mapping[int, str]) -> LabelInfo:
    """Name, colour and codes of one label value (see `medseg.export.anatomy`)."""
    name = label_name(value, names)
    anatomy = lookup_anatomy(name)
    known = anatomy is not None
    anatomy = anatomy or GENERIC
    return LabelInfo(
        value=int(value),
        name=name,
        color=anatomy.color if known else palette_color(int(value)),
        category=anatomy.category,
        type=anatomy.type,
        name_generated=int(value) not in names or not names[int(value)],
        color_generated=not known,
    )


def describe_labels(values: list[int], names: Mapping[int, str]) -> list[LabelInfo]:
    """`describe_label` for each value, in the order given."""
    return [describe_label(v, names) for v in values]


def bounding_boxes(labels: np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding box of every label value present, as index slices into `labels` (X, Y, Z).

    Values > 0 only; one pass over the array (`scipy.ndimage.find_objects`).
    """
    if not labels.size or labels.max() == 0:
        return {}
    boxes = ndimage.find_objects(labels, max_label=int(labels.max()))
    return {value: box for value, box in enumerate(boxes, start=1) if box is not None}


def label_centroid(labels: np.ndarray, value: int, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Mean voxel index (i, j, k) of `value`, searched inside its bounding box `box`."""
    index = np.nonzero(labels[box] == value)
    return np.array([axis.mean() + s.start for axis, s in zip(index, box, strict=True)])
