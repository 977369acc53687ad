"""One display colour per label value of a label map, distinct within the map.

Each label starts from its anatomy colour (`anatomy.lookup_anatomy`) or, for names the table
lacks, its palette colour (`anatomy.palette_color`). Labels that start from the same anatomy
colour are siblings (vertebrae C1..L5, ribs, left and right kidney, lung lobes): the one with the
lowest value keeps the conventional colour, so a lone liver is Slicer's liver; each later sibling
takes the variant of that colour (lighter or darker, hue turned a little) nearest to it that is
at least `MIN_SIBLING_DELTA_E` (CIE76, in CIELab) from every sibling coloured before it and, when
one exists, `MIN_OTHER_DELTA_E` from every other colour of the map. Palette colours move the same
way when they come too close to a colour already taken. No two values of a map share an RGB.
The colours depend only on the value -> name mapping, so the colour table, .seg.nrrd, QC
picture, report and DICOM-SEG of one map agree; conventional colours of different structures
that the table itself makes close (small bowel and colon) stay as the table has them.
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Iterable, Mapping

import numpy as np

from medseg.export.anatomy import RGB, lookup_anatomy, palette_color

# CIE76 distance two siblings keep at least: ~2.3 is just noticeable, 10+ is plain at a glance.
MIN_SIBLING_DELTA_E = 12.0
# What a varied colour keeps from every other colour of the map, when it can (see `_variant`).
MIN_OTHER_DELTA_E = 8.0
# Variants: HLS lightness offsets x hue offsets (fractions of the colour wheel) around a colour.
_LIGHTNESS_STEPS = np.linspace(-0.36, 0.36, 19)
_HUE_STEPS = np.linspace(-0.12, 0.12, 13)
_LIGHTNESS_RANGE = (0.12, 0.9)  # keep variants off black and white
# sRGB (D65) linear RGB -> XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.119192, 0.9503041],
    ]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def label_colors(names: Mapping[int, str], extra: Iterable[int] = ()) -> dict[int, RGB]:
    """The colour of every label value > 0 of `names`, and of the `extra` values it lacks.

    Args:
        names: label value -> name (background 0 is skipped).
        extra: further label values (e.g. present in a map but unnamed); they are coloured after
            the named ones, so they never change a named label's colour.

    Returns:
        value -> RGB 0-255, no two values with the same RGB.
    """
    named = tuple(sorted((int(v), str(n) if n else "") for v, n in names.items() if int(v) > 0))
    unnamed = tuple(sorted({int(v) for v in extra if int(v) > 0} - {v for v, _ in named}))
    return dict(_assign(named, unnamed))


@functools.lru_cache(maxsize=64)
def _assign(
    named: tuple[tuple[int, str], ...], unnamed: tuple[int, ...]
) -> tuple[tuple[int, RGB], ...]:
    """`label_colors` on hashable arguments (cached: every format of one map asks again)."""
    bases = [(v, *_base_color(v, n)) for v, n in named] + [
        (v, palette_color(v), False) for v in unnamed
    ]
    colors: dict[int, RGB] = {}
    family: dict[RGB, list[RGB]] = {}
    for value, base, conventional in bases:
        if conventional and base not in family:
            colors[value], family[base] = base, [base]
    used = list(colors.values())
    for value, base, _ in bases:
        if value not in colors:
            siblings = family.setdefault(base, [])
            colors[value] = _variant(base, siblings, used)
            siblings.append(colors[value])
            used.append(colors[value])
    return tuple(sorted(colors.items()))


def _base_color(value: int, name: str) -> tuple[RGB, bool]:
    """The starting colour of a label, and whether it is the anatomy table's (conventional)."""
    anatomy = lookup_anatomy(name) if name else None
    return (anatomy.color, True) if anatomy is not None else (palette_color(value), False)


def _variant(base: RGB, siblings: list[RGB], used: list[RGB]) -> RGB:
    """The variant of `base` nearest to it that is far enough from `siblings` and `used`.

    Far enough: `MIN_SIBLING_DELTA_E` from each sibling and `MIN_OTHER_DELTA_E` from every colour
    of the map, relaxing the latter when no variant meets it; a family too large for any variant
    to keep its distance takes the free one farthest from its siblings. The RGB is never in
    `used`.
    """
    candidates, lab = _candidates(base)
    taken = set(used)
    free = np.array([c not in taken for c in candidates])
    if not free.any():
        return _first_free(base, taken)
    sibling = _min_distance(lab, siblings)
    other = _min_distance(lab, used)
    for other_min in (MIN_OTHER_DELTA_E, MIN_OTHER_DELTA_E / 2, 0.0):
        ok = np.flatnonzero(free & (sibling >= MIN_SIBLING_DELTA_E) & (other >= other_min))
        if ok.size:
            return candidates[ok[0]]
    return candidates[int(np.argmax(np.where(free, sibling, -1.0)))]


def _min_distance(lab: np.ndarray, colors: list[RGB]) -> np.ndarray:
    """CIE76 distance of each row of `lab` to the nearest of `colors` (inf when none)."""
    if not colors:
        return np.full(len(lab), np.inf)
    return np.linalg.norm(lab[:, None, :] - srgb_to_lab(colors)[None], axis=-1).min(1)


def _first_free(base: RGB, taken: set[RGB]) -> RGB:
    """The first RGB after `base` (as a 24-bit number) that is not taken."""
    start = (base[0] << 16) | (base[1] << 8) | base[2]
    codes = ((start + step) % (1 << 24) for step in range(1, len(taken) + 2))
    return next(
        c for c in (((n >> 16) & 255, (n >> 8) & 255, n & 255) for n in codes) if c not in taken
    )


@functools.lru_cache(maxsize=256)
def _candidates(base: RGB) -> tuple[tuple[RGB, ...], np.ndarray]:
    """Variants of `base` (HLS lightness and hue offsets), nearest first, and their CIELab."""
    hue, lightness, saturation = colorsys.rgb_to_hls(*(c / 255.0 for c in base))
    variants: dict[RGB, None] = {}
    for dl in _LIGHTNESS_STEPS:
        for dh in _HUE_STEPS:
            level = float(np.clip(lightness + dl, *_LIGHTNESS_RANGE))
            rgb = colorsys.hls_to_rgb((hue + dh) % 1.0, level, saturation)
            variants.setdefault(tuple(round(c * 255) for c in rgb), None)  # type: ignore[arg-type]
    colors = [base, *(c for c in variants if c != base)]
    lab = srgb_to_lab(colors)
    order = np.argsort(np.linalg.norm(lab - srgb_to_lab([base]), axis=1), kind="stable")
    return tuple(colors[i] for i in order), lab[order]


def srgb_to_lab(colors: Iterable[RGB]) -> np.ndarray:
    """CIELab (D65) of sRGB colours 0-255, shape (N, 3).

    The standard formula, vectorised: highdicom's `CIELabColor` converts one colour per object.
    """
    rgb = np.asarray(list(colors), dtype=np.float64).reshape(-1, 3) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)
