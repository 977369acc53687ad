"""3D Slicer colour tables (``NAME.ctbl``): load a NIfTI label map in Slicer with names and colours.

The format is Slicer's colour-table text file: ``#`` comment lines, then one line per label
``value name R G B A`` with 0-255 integers. Slicer splits lines on whitespace, so spaces in
names become underscores. Colours are the ones every medseg export uses
(`medseg.export.anatomy`); background 0 is black and fully transparent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from medseg.export.labels import describe_label
from medseg.io import atomic_path

log = logging.getLogger(__name__)


def color_table_lines(names: Mapping[int, str]) -> list[str]:
    """The lines of the colour table for `names` (value -> name), background 0 always first."""
    values = sorted({0, *(int(v) for v in names)})
    if values[0] < 0:
        raise ValueError(f"label values must be non-negative, got {values[0]}")
    lines = ["# Color table written by medseg", f"# {len(values)} values"]
    for value in values:
        if value == 0:
            name, rgba = names.get(0) or "background", (0, 0, 0, 0)
        else:
            info = describe_label(value, names)
            name, rgba = info.name, (*info.color, 255)
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
