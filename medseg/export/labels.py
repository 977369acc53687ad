"""What a label map holds: validation, values present, and each value's name, colour and codes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.export.anatomy import GENERIC, RGB, Code, laterality, lookup_anatomy
from medseg.export.colors import label_colors


@dataclass(frozen=True)
class LabelInfo:
    """Everything an export format says about one label value.

    Attributes:
        value: the label value in the map (> 0).
        name: its name, from the label names or ``label_<value>`` when it has none.
        color: display colour, RGB 0-255, distinct from every other label of the same names
            (`medseg.export.colors.label_colors`).
        category: segmented property category code.
        type: segmented property type code.
        name_generated: True when the name was made up because the label names lack it.
        color_generated: True when the colour comes from the palette, not the anatomy table
            (an anatomy colour varied to tell siblings apart counts as the table's).
        laterality: the side the name states (Left, Right, Right and left) as a modifier of
            `type`, or None.
    """

    value: int
    name: str
    color: RGB
    category: Code
    type: Code
    name_generated: bool
    color_generated: bool
    laterality: Code | None = None

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
    """Name, colour and codes of one label value (see `medseg.export.anatomy`).

    The colour is the one `label_colors(names)` gives the value, so it depends on the whole
    mapping: asking value by value gives the colours `describe_labels` gives (for the values
    `names` holds; an unnamed value is coloured as if it were the only one).

    Raises:
        ValueError: `value` is not > 0 (0 is the background, which has no colour).
    """
    if int(value) < 1:
        raise ValueError(f"label values to describe must be > 0 (0 is background), got {value}")
    return _describe(int(value), names, label_colors(names, [int(value)]))


def describe_labels(values: list[int], names: Mapping[int, str]) -> list[LabelInfo]:
    """`describe_label` for each value, in the order given, colours computed once."""
    colors = label_colors(names, values)
    return [_describe(int(v), names, colors) for v in values]


def _describe(value: int, names: Mapping[int, str], colors: Mapping[int, RGB]) -> LabelInfo:
    name = label_name(value, names)
    anatomy = lookup_anatomy(name)
    return LabelInfo(
        value=value,
        name=name,
        color=colors[value],
        category=(anatomy or GENERIC).category,
        type=(anatomy or GENERIC).type,
        name_generated=value not in names or not names[value],
        color_generated=anatomy is None,
        laterality=laterality(name),
    )


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
