"""Prediction of files, folders and DICOM series with a trained run: inputs in, label maps out.

Input names become output names: ``scan.nii.gz`` -> ``OUT/scan.nii.gz``, a DICOM series folder
``CT_series/`` -> ``OUT/CT_series.nii.gz``. Multi-channel models (and models trained on the
nnU-Net layout) group ``CASE_0000``, ``CASE_0001``, ... files into case ``CASE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.config import ConfigError
from medseg.engines import ENGINES, build_predictor, resolve_engine
from medseg.inference import configured_window, predict_volume, resolve_device
from medseg.io import (
    ImageError,
    Volume,
    is_dicom_dir,
    is_image_file,
    load_volume,
    read_description,
    save_labels,
    strip_suffix,
)
from medseg.postprocessing import keep_largest_component
from medseg.runs import Run, latest_run, load_run

log = logging.getLogger(__name__)

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")

Item = tuple[str, list[Path]]

# Output format -> file name suffix, next to NAME.nii.gz.
FORMATS = {
    "nifti": ".nii.gz",
    "seg-nrrd": ".seg.nrrd",
    "ctbl": ".ctbl",
    "stats": ".stats.json",
    "png": ".png",
    "dicom-seg": ".dcm",
}
DEFAULT_FORMATS = ("nifti", "seg-nrrd", "ctbl", "stats", "png")
BATCH_STATS = "stats.csv"


@dataclass(frozen=True)
class PredictOptions:
    """How `predict` runs; None means the run's own ``infer`` setting."""

    device: str = "auto"
    """auto, cpu or cuda."""
    overlap: float | None = None
    """Sliding-window overlap."""
    tta: bool | None = None
    """Mirroring test-time augmentation (along the training mirror axes)."""
    overwrite: bool = False
    """Redo scans whose output already exists from the same model and settings."""
    formats: tuple[str, ...] = DEFAULT_FORMATS
    """Outputs per scan (see `FORMATS`); the NIfTI label map is always written."""
    engine: str = "auto"
    """torch, onnx (the run's model.onnx, see `medseg export`) or auto (onnx on CPU when
    exported, else torch)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ConfigError(
                f"unknown output format {unknown[0]!r}; choose from {', '.join(FORMATS)}"
            )


def predict(
    inputs: Sequence[Path],
    output_dir: Path,
    model_dir: Path | None = None,
    options: PredictOptions | None = None,
    progress: bool = False,
) -> list[Path]:
    """Segment every scan in `inputs` and write ``OUTPUT_DIR/NAME.nii.gz`` on each input's grid.

    Rerunning into the same folder skips scans already written by the same model with the
    same settings (recorded in the NIfTI ``descrip`` field), so an interrupted batch resumes;
    outputs are written atomically, so a crash never leaves a partial file.

    Args:
        inputs: image files, folders of images, or DICOM series folders.
        output_dir: where label maps are written.
        model_dir: a run folder, or an ensemble folder of ``fold_K`` run folders (their
            softmax outputs are averaged); None = the most recent run under ./runs.
        options: device, overlap, TTA, overwrite, output formats, engine.
        progress: show a progress bar.

    Returns:
        The label-map files, one per input scan (skipped ones included).
    """
    options = options or PredictOptions()
    device = resolve_device(options.device)
    run = load_run(model_dir if model_dir is not None else latest_run(), device)
    items = resolve_inputs(inputs, len(run.plan.channels), run.plan.layout == "nnunet")
    return predict_cases(run, items, output_dir, options, progress)


def resolve_inputs(inputs: Sequence[Path], n_channels: int, channel_suffix: bool) -> list[Item]:
    """Turn paths into (output name, channel files) items.

    Args:
        inputs: files, folders of files, or DICOM series folders.
        n_channels: channels the model takes.
        channel_suffix: group ``CASE_XXXX`` files into cases (always on for several channels).
    """
    files: list[Path] = []
    series: list[Path] = []
    for path in map(Path, inputs):
        if is_dicom_dir(path):
            series.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if is_image_file(p))
            subseries = sorted(p for p in path.iterdir() if is_dicom_dir(p))
            if not found and not subseries:
                raise ImageError(
                    f"{path}: folder holds no images (.nii.gz, .nrrd, .mha) or DICOM series"
                )
            files += found
            series += subseries
        elif path.exists():
            files.append(path)
        else:
            raise ImageError(f"{path}: file not found")
    items = _group(files, n_channels, channel_suffix or n_channels > 1)
    items += [(safe_name(p.name), [p]) for p in series]
    names = [name for name, _ in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ImageError(f"several inputs would be written as {duplicates[0]}.nii.gz; rename one")
    return items


def _group(files: list[Path], n_channels: int, by_suffix: bool) -> list[Item]:
    if not by_suffix:
        return [(safe_name(strip_suffix(p.name)), [p]) for p in files]
    cases: dict[str, dict[int, Path]] = {}
    for path in files:
        match = CHANNEL_SUFFIX.match(strip_suffix(path.name))
        if match is None:
            if n_channels > 1:
                raise ImageError(
                    f"{path}: this model takes {n_channels} channels; name channel files "
                    "CASE_0000, CASE_0001, ... so they can be grouped"
                )
            cases.setdefault(strip_suffix(path.name), {})[0] = path
            continue
        cases.setdefault(match["case"], {})[int(match["channel"])] = path
    items = []
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(n_channels)):
            raise ImageError(
                f"case {case}: found channel(s) {sorted(channels)}, the model takes "
                f"{n_channels} (_0000 to _{n_channels - 1:04d})"
            )
        items.append((safe_name(case), [channels[c] for c in range(n_channels)]))
    return items


def safe_name(name: str) -> str:
    """A file name that stays inside the output folder (no separators, no leading dots)."""
    cleaned = SAFE_NAME.sub("_", name).lstrip(".")
    return cleaned or "scan"


def predict_cases(
    run: Run,
    items: list[Item],
    output_dir: Path,
    options: PredictOptions | None = None,
    progress: bool = False,
) -> list[Path]:
    """Predict (name, channel files) items with a loaded run; see `predict`."""
    options = options or PredictOptions()
    window = configured_window(run.config, options.overlap, options.tta)
    device = next(run.network.parameters()).device
    engine = resolve_engine(options.engine, run, device)
    predictor = build_predictor(run, engine, device)
    stamp = (
        f"medseg model {run.weights_id} overlap {window.overlap:g} tta {list(window.tta)} {engine}"
    )
    formats = _requested(options.formats, items)
    written = []
    for name, paths in _iterate(items, progress):
        out = Path(output_dir) / f"{name}.nii.gz"
        if not options.overwrite and _complete(out, formats, stamp):
            log.info("%s: already predicted by this model, skipped", out)
            written.append(out)
            continue
        volume = load_volume(paths)
        labels = predict_volume(predictor, volume, run.plan, window, device)
        if run.largest_component:
            labels = keep_largest_component(labels, run.largest_component)
        try:
            _write_extras(labels, volume, run.plan.labels, out, formats)
            # The NIfTI goes last: its presence with this stamp marks the scan as complete.
            written.append(save_labels(labels, like=volume, path=out, description=stamp))
        except Exception:
            _remove_outputs(out, formats)  # all of a scan's outputs, or none
            raise
        log.debug("%s -> %s", paths[0], out)
    if "stats" in formats:
        _write_batch_stats(written, Path(output_dir) / BATCH_STATS)
    return written


def _remove_outputs(out: Path, formats: tuple[str, ...]) -> None:
    for fmt in formats:
        with contextlib.suppress(OSError):  # e.g. the folder itself could not be made
            sibling(out, fmt).unlink(missing_ok=True)


def _requested(formats: tuple[str, ...], items: list[Item]) -> tuple[str, ...]:
    if "dicom-seg" in formats:
        not_dicom = [paths[0] for _, paths in items if not is_dicom_dir(paths[0])]
        if not_dicom:
            raise ImageError(
                f"{not_dicom[0]}: --formats dicom-seg needs DICOM series folders as input"
            )
    return tuple(dict.fromkeys(("nifti", *formats)))


def sibling(nifti: Path, fmt: str) -> Path:
    """The file of output format `fmt` that belongs to label map ``NAME.nii.gz``."""
    return nifti.with_name(nifti.name.removesuffix(".nii.gz") + FORMATS[fmt])


def _complete(out: Path, formats: tuple[str, ...], stamp: str) -> bool:
    if not out.is_file() or read_description(out) != stamp:
        return False
    return all(sibling(out, fmt).is_file() for fmt in formats)


def _write_extras(
    labels: np.ndarray, volume: Volume, names: dict[int, str], out: Path, formats: tuple[str, ...]
) -> None:
    from medseg import export

    case = out.name.removesuffix(".nii.gz")
    if "seg-nrrd" in formats:
        export.write_seg_nrrd(labels, volume, names, sibling(out, "seg-nrrd"))
    if "ctbl" in formats:
        export.write_color_table(names, sibling(out, "ctbl"))
    if "stats" in formats:
        stats = export.label_statistics(labels, volume, names, case=case)
        export.write_stats_json(stats, sibling(out, "stats"))
    if "png" in formats:
        export.write_qc_png(labels, volume, names, sibling(out, "png"))
    if "dicom-seg" in formats:
        if labels.any():
            export.write_dicom_seg(labels, volume, names, sibling(out, "dicom-seg"))
        else:  # a DICOM Segmentation needs at least one segment
            log.warning("%s: nothing segmented, so no DICOM-SEG is written", case)


def _write_batch_stats(written: list[Path], path: Path) -> None:
    from medseg import export

    stats = [json.loads(sibling(out, "stats").read_text()) for out in written]
    export.write_stats_csv(stats, path)


def _iterate(items: list[Item], progress: bool):  # type: ignore[no-untyped-def]
    if not progress or len(items) < 2:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description="predicting")
