"""3D Slicer colour tables (``NAME.ctbl``): load a NIfTI label map in Slicer with names and colours.

The format is Slicer's colour-table text file: ``#`` comment lines, then one line per label
``value name R G B A`` with 0-255 integers. Slicer splits lines on whitespace, so spaces in
names become underscores. Colours are the ones every medseg export of the same label names uses
(`medseg.export.colors.label_colors`); background 0 is black and fully transparent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from medseg.export.labels import describe_labels
from medseg.io import atomic_path

log = logging.getLogger(__name__)


def color_table_lines(names: Mapping[int, str]) -> list[str]:
    """The lines of the colour table for `names` (value -> name), background 0 always first."""
    values = sorted({0, *(int(v) for v in names)})
    if values[0] < 0:
        raise ValueError(f"label values must be non-negative, got {values[0]}")
    lines = ["# Color table written by medseg", f"# {len(values)} values"]
    rows = [(0, names.get(0) or "background", (0, 0, 0, 0))]
    rows += [(i.value, i.name, (*i.color, 255)) for i in describe_labels(values[1:], names)]
    for value, name, rgba in rows:
        lines.append(" ".join([str(value), _slicer_name(name), *map(str, rgba)]))
    return lines


def write_color_table(names: Mapping[int, str], path: Path) -> Path:
    """Write a Slicer colour table for the label names, atomically.

    Args:
        names: label value -> name, background 0 included or not.
        path: output file, e.g. ``NAME.ctbl`` next to ``NAME.nii.gz``.

    Returns:
        `path`.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(color_table_lines(names)) + "\n", encoding="utf-8")
    log.debug("wrote %s", path)
    return path


def _slicer_name(name: str) -> str:
    return re.sub(r"\s+", "_", name.strip()) or "unnamed"
