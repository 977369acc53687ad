"""One self-contained HTML evaluation report that opens anywhere, offline.

`write_report` turns `medseg.evaluation.evaluate_folders` results into a single ``.html`` file:
a header (case count, date, folders), the per-label mean table, a box and strip plot of the
per-case Dice of every label, and QC pictures of the worst cases (lowest foreground-mean Dice).
Each QC picture cuts the case in axial, coronal and sagittal slices where reference and
prediction disagree most, cropped around the labels, with the reference outlined as a solid line
and the prediction as a dashed one in each label's colour (`medseg.export.anatomy`), over the
intensity image when one is given and a neutral grey otherwise. Slices are shown in the
radiological convention of `medseg.export.qc` (patient right on screen left).

Pictures are PNG data URIs and the styles inline, so the file references nothing outside itself;
all text taken from files and names is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg import __version__
from medseg.evaluation import EvaluationError, empty_rule_note, format_table
from medseg.export.labels import describe_label
from medseg.export.qc import (
    PANEL_INCHES,
    VIEW_AXIS,
    VIEWS,
    display_aspect,
    display_window,
    to_ras,
    view_slice,
)
from medseg.io import (
    LabelMap,
    atomic_path,
    is_image_file,
    load_labels,
    load_volume,
    same_grid,
    strip_suffix,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

WORST_CASES = 3
CROP_MARGIN = 8
NEUTRAL_GREY = 0.35
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child, table.folders td { text-align: left; }
table.metrics tr:last-child td { font-weight: bold; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


def write_report(
    results: dict[str, Any],
    pred_dir: Path,
    ref_dir: Path,
    path: Path,
    images_dir: Path | None = None,
) -> Path:
    """Write the HTML report of an evaluation, atomically.

    Args:
        results: `medseg.evaluation.evaluate_folders` output for `pred_dir` against `ref_dir`
            (in memory, with NaN; not read back from JSON, where NaN is null).
        pred_dir: folder of predicted label maps (read again for the QC pictures).
        ref_dir: folder of reference label maps.
        path: output ``.html`` file.
        images_dir: optional folder of intensity images on the reference grids, named
            ``CASE.nii.gz`` or nnU-Net style ``CASE_0000.nii.gz`` (channel 0 is shown).

    Returns:
        `path`.

    Raises:
        EvaluationError: an image is missing from `images_dir` or lies on another grid.
    """
    path = Path(path)
    text = report_html(results, Path(pred_dir), Path(ref_dir), images_dir)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("wrote %s", path)
    return path


def report_html(
    results: dict[str, Any], pred_dir: Path, ref_dir: Path, images_dir: Path | None = None
) -> str:
    """The report as one HTML document (arguments as in `write_report`)."""
    names = {int(value): name for value, name in results["labels"].items()}
    folders = [("predictions", pred_dir), ("references", ref_dir)]
    folders += [("images", images_dir)] if images_dir is not None else []
    n_cases = len(results["cases"])
    date = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header, rows = format_table(results)
    parts = [
        f"<h1>Segmentation evaluation: {n_cases} cases</h1>",
        f'<p class="note">{_e(date)}, medseg {_e(__version__)}</p>',
        _table([], [[name, str(Path(p).resolve())] for name, p in folders], "folders"),
        "<h2>Mean per label</h2>",
        _table(header, rows, "metrics"),
        f'<p class="note">{_e(empty_rule_note(results["empty"]))}</p>',
        "<h2>Dice per case</h2>",
        _img(dice_figure(results, names), "Per-case Dice of every label"),
    ]
    worst = worst_cases(results)
    if worst:
        parts.append(f"<h2>Worst {len(worst)} cases (lowest foreground-mean Dice)</h2>")
        parts.append(
            '<p class="note">Solid line: reference; dashed line: prediction. Slices where they '
            "disagree most, radiological convention (patient right on screen left).</p>"
        )
    for case in worst:
        parts.append(_case_section(case, results, names, (pred_dir, ref_dir, images_dir)))
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>medseg evaluation: {n_cases} cases</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def case_dice(results: dict[str, Any]) -> dict[str, float]:
    """Foreground-mean Dice of every case: the mean over its labels with a defined Dice.

    NaN for a case where every label is absent from both reference and prediction.
    """
    out = {}
    for case, per_label in results["cases"].items():
        values = [m["dice"] for m in per_label.values() if _finite(m["dice"])]
        out[case] = float(np.mean(values)) if values else math.nan
    return out


def worst_cases(results: dict[str, Any], n: int = WORST_CASES) -> list[str]:
    """Up to `n` case names with the lowest foreground-mean Dice, worst first (NaN left out)."""
    scores = {case: d for case, d in case_dice(results).items() if math.isfinite(d)}
    return sorted(scores, key=lambda case: (scores[case], case))[:n]


def dice_figure(results: dict[str, Any], names: Mapping[int, str]) -> Figure:
    """Box plot of the per-case Dice of every label with the cases as jittered points.

    Args:
        results: `evaluate_folders` output.
        names: label value -> name, for the colours.

    Returns:
        A matplotlib Figure (no pyplot state).
    """
    from matplotlib.figure import Figure

    values = {value: name for value, name in names.items() if value != 0}
    data = [
        [
            m[name]["dice"]
            for m in results["cases"].values()
            if name in m and _finite(m[name]["dice"])
        ]
        for name in values.values()
    ]
    fig = Figure(figsize=(max(4.0, 1.3 * len(data) + 2.0), 3.6))
    ax = fig.subplots()
    positions = np.arange(1, len(data) + 1)
    ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)  # the same jitter on every run
    for pos, value, dices in zip(positions, values, data, strict=True):
        color = np.array(describe_label(value, names).color) / 255.0
        x = pos + rng.uniform(-0.15, 0.15, len(dices))
        ax.scatter(x, dices, s=18, color=color, edgecolors="black", linewidths=0.5, zorder=3)
    ax.set_xticks(
        positions, [f"{n}\n(n={len(d)})" for n, d in zip(values.values(), data, strict=True)]
    )
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def case_figure(
    ref: np.ndarray,
    pred: np.ndarray,
    affine: np.ndarray,
    names: Mapping[int, str],
    image: np.ndarray | None = None,
) -> Figure:
    """Axial, coronal and sagittal slices of one case with reference and prediction contours.

    Args:
        ref: integer reference label map (X, Y, Z).
        pred: integer predicted label map on the same grid.
        affine: their 4x4 voxel-to-RAS matrix.
        names: label value -> name, for colours and the legend.
        image: optional intensity image (X, Y, Z) on the same grid; grey background if None.

    Returns:
        A matplotlib Figure of one row of three panels with a legend below.
    """
    from matplotlib.figure import Figure

    ref_ras, spacing = to_ras(ref, affine)
    pred_ras, _ = to_ras(pred, affine)
    base = np.full(ref.shape, NEUTRAL_GREY) if image is None else image
    base_ras, _ = to_ras(base, affine)
    window = (0.0, 1.0) if image is None else display_window(base_ras)
    box = _crop_box((ref_ras > 0) | (pred_ras > 0))
    ref_ras, pred_ras, base_ras = ref_ras[box], pred_ras[box], base_ras[box]
    colors = {v: np.array(describe_label(v, names).color) / 255.0 for v in names if v != 0}

    fig = Figure(figsize=(3 * PANEL_INCHES, PANEL_INCHES + 0.9))
    for ax, view in zip(fig.subplots(1, 3), VIEWS, strict=True):
        index = _worst_slice(ref_ras, pred_ras, VIEW_AXIS[view])
        ax.imshow(
            view_slice(base_ras, view, index),
            cmap="gray",
            vmin=window[0],
            vmax=window[1],
            origin="lower",
            interpolation="nearest",
        )
        for value, color in colors.items():
            _contour(ax, view_slice(ref_ras, view, index) == value, color, "solid")
            _contour(ax, view_slice(pred_ras, view, index) == value, color, "dashed")
        ax.set_aspect(display_aspect(spacing, view))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
            f"{view} {'RAS'[VIEW_AXIS[view]]}={index + box[VIEW_AXIS[view]].start}", fontsize=9
        )
    _case_legend(fig, {v: (names[v], c) for v, c in colors.items()})
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.16, wspace=0.05)
    return fig


# --- helpers --------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}">' + (f"<tr>{head}</tr>" if head else "") + body + "</table>"


def _img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _case_section(
    case: str,
    results: dict[str, Any],
    names: Mapping[int, str],
    folders: tuple[Path, Path, Path | None],
) -> str:
    pred_dir, ref_dir, images_dir = folders
    ref = load_labels(_case_file(ref_dir, case, (case,)))
    pred = load_labels(_case_file(pred_dir, case, (case,)))
    image = None if images_dir is None else _case_image(Path(images_dir), case, ref)
    fig = case_figure(ref.array, pred.array, ref.affine, names, image)
    per_label = results["cases"][case]
    rows = [[name, _fmt(m["dice"])] for name, m in per_label.items()]
    rows.append(["foreground mean", _fmt(case_dice(results)[case])])
    return (
        f"<section><h3>{_e(case)}</h3>"
        + _table(["label", "dice"], rows, "metrics")
        + _img(fig, f"{case}: reference and prediction contours")
        + "</section>"
    )


def _case_file(folder: Path, case: str, stems: tuple[str, ...]) -> Path:
    """The image file in `folder` whose name without suffix is one of `stems`."""
    for stem in stems:
        for path in sorted(Path(folder).iterdir()):
            if is_image_file(path) and strip_suffix(path.name) == stem:
                return path
    expected = " or ".join(f"{stem}.nii.gz" for stem in stems)
    raise EvaluationError(f"{folder}: no file for case {case} (expected {expected})")


def _case_image(images_dir: Path, case: str, ref: LabelMap) -> np.ndarray:
    """Channel 0 of the case's image, checked to lie on the reference grid."""
    path = _case_file(images_dir, case, (case, f"{case}_0000"))
    volume = load_volume(path)
    if not same_grid(volume.affine, ref.affine, volume.shape, ref.array.shape):
        raise EvaluationError(
            f"{path} has shape {volume.shape} and does not lie on the grid of {ref.source} "
            f"{ref.array.shape}; pass the images the references were drawn on"
        )
    return volume.array[0]


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if _finite(value) else "-"


def _crop_box(foreground: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of the foreground widened by `CROP_MARGIN`, or the whole array."""
    if not foreground.any():
        return (slice(0, None),) * 3  # type: ignore[return-value]
    index = np.nonzero(foreground)
    return tuple(  # type: ignore[return-value]
        slice(max(int(i.min()) - CROP_MARGIN, 0), int(i.max()) + CROP_MARGIN + 1) for i in index
    )


def _worst_slice(ref: np.ndarray, pred: np.ndarray, axis: int) -> int:
    """Index along `axis` with the most disagreeing voxels, else the most labelled, else middle."""
    others = tuple(a for a in range(3) if a != axis)
    for mask in (ref != pred, (ref > 0) | (pred > 0)):
        counts = mask.sum(axis=others)
        if counts.any():
            return int(np.argmax(counts))
    return ref.shape[axis] // 2


def _contour(ax: Axes, mask: np.ndarray, color: np.ndarray, style: str) -> None:
    """Outline a 2D mask (drawn with ``origin="lower"``); padded so border contours close."""
    if not mask.any():
        return
    padded = np.pad(mask.astype(float), 1)
    rows, cols = np.arange(-1, mask.shape[0] + 1), np.arange(-1, mask.shape[1] + 1)
    ax.contour(cols, rows, padded, levels=[0.5], colors=[color], linestyles=style, linewidths=1.5)
    ax.set_xlim(-0.5, mask.shape[1] - 0.5)
    ax.set_ylim(-0.5, mask.shape[0] - 0.5)


def _case_legend(fig: Figure, labels: Mapping[int, tuple[str, np.ndarray]]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=f"{v} {n}") for v, (n, c) in labels.items()]
    handles += [
        Line2D([], [], color="black", lw=1.5, ls=ls, label=text)
        for ls, text in (("solid", "reference"), ("dashed", "prediction"))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
