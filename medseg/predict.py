"""Prediction of files, folders and DICOM series with a trained run: inputs in, label maps out.

Input names become output names: ``scan.nii.gz`` -> ``OUT/scan.nii.gz``, a DICOM series folder
``CT_series/`` -> ``OUT/CT_series.nii.gz`` (a folder holding several series gives one output per
series, named by folder, series number, description and a hash of the series identifier).
Multi-channel models (and models trained on the nnU-Net layout) group ``CASE_0000``,
``CASE_0001``, ... files into case ``CASE``; a file without such a suffix is a whole case (for a
multi-channel model, a 4D file holding every channel).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.config import ConfigError
from medseg.engines import ENGINES, build_predictor, resolve_engine
from medseg.inference import Window, configured_window, predict_volume, resolve_device
from medseg.io import (
    ImageError,
    Volume,
    WriteError,
    is_dicom_dir,
    is_image_file,
    load_labels,
    load_volume,
    read_description,
    save_labels,
    strip_suffix,
)
from medseg.io.dicom import DicomSeries, list_series
from medseg.postprocessing import keep_largest_component
from medseg.runs import Run, latest_run, load_run

log = logging.getLogger(__name__)

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")

Input = Path | DicomSeries
Item = tuple[str, list[Input]]
"""(output name, channel files; or one file holding every channel, or one DICOM series)."""

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
    allow_unfinished: bool = False
    """Predict with a run whose training did not finish (its last.pt), or an ensemble with
    unfinished folds; refused otherwise."""
    postprocess: bool = True
    """Apply the run's postprocessing.json; training's final validation predicts without it,
    since it decides it on those predictions."""

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
    run = load_run(
        model_dir if model_dir is not None else latest_run(), device, options.allow_unfinished
    )
    items = resolve_inputs(inputs, len(run.plan.channels), run.plan.layout == "nnunet")
    return predict_cases(run, items, output_dir, options, progress)


def resolve_inputs(inputs: Sequence[Path], n_channels: int, channel_suffix: bool) -> list[Item]:
    """Turn paths into (output name, channel files) items.

    Args:
        inputs: files, folders of files, or DICOM folders (each series in one becomes an item).
        n_channels: channels the model takes.
        channel_suffix: the model was trained on the nnU-Net layout: ``CASE_0000`` names channel
            0 of case ``CASE`` (for several channels the suffix is always read so).

    Raises:
        ImageError: a missing input, a folder without images, a case lacking channel files, or
            two inputs that would be written to the same output.
    """
    files: list[Path] = []
    series: list[DicomSeries] = []
    for path in map(Path, inputs):
        if is_dicom_dir(path):
            series += list_series(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if is_image_file(p))
            folders = sorted(p for p in path.iterdir() if is_dicom_dir(p))
            if not found and not folders:
                raise ImageError(
                    f"{path}: folder holds no images (.nii.gz, .nrrd, .mha) or DICOM series"
                )
            files += found
            series += [s for folder in folders for s in list_series(folder)]
        elif path.exists():
            files.append(path)
        else:
            raise ImageError(f"{path}: file not found")
    items = _group(files, n_channels, channel_suffix or n_channels > 1) + _series_items(series)
    _refuse_collisions(items)
    return items


def _group(files: list[Path], n_channels: int, by_suffix: bool) -> list[Item]:
    """Channel files ``CASE_XXXX`` (XXXX < `n_channels`, read only `by_suffix`) grouped into
    cases; every other file is a case of its own (``liver_0007`` for a one-channel model)."""
    cases: dict[str, dict[int, Path]] = {}
    whole: list[Path] = []
    for path in files:
        match = CHANNEL_SUFFIX.match(strip_suffix(path.name)) if by_suffix else None
        if match is not None and int(match["channel"]) < n_channels:
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            whole.append(path)
    items: list[Item] = []
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(n_channels)):
            raise ImageError(
                f"case {case}: found channel(s) {sorted(channels)}, the model takes "
                f"{n_channels} (_0000 to _{n_channels - 1:04d})"
            )
        items.append((safe_name(case), [channels[c] for c in range(n_channels)]))
    return items + [(safe_name(strip_suffix(p.name)), [p]) for p in whole]


def _series_items(series: list[DicomSeries]) -> list[Item]:
    """One item per series, named by its folder, or, where a folder holds several, by folder,
    series number, description and a hash of the series identifier."""
    per_folder = Counter(s.folder for s in series)
    items: list[Item] = []
    for s in series:
        name = s.folder.name
        if per_folder[s.folder] > 1:
            digest = hashlib.sha256(s.uid.encode()).hexdigest()[:6]
            name = "_".join(p for p in (name, s.number, s.description, digest) if p)
        items.append((safe_name(name), [s]))
    return items


def _refuse_collisions(items: list[Item]) -> None:
    """Two inputs that would be written to one output name are an error naming both."""
    seen: dict[str, Input] = {}
    for name, paths in items:
        if name in seen:
            raise ImageError(
                f"{seen[name]} and {paths[0]} would both be written as {name}.nii.gz; "
                "rename one (or predict them into different --output folders)"
            )
        seen[name] = paths[0]


def safe_name(name: str) -> str:
    """A file name that stays inside the output folder (no separators, no leading dots)."""
    cleaned = SAFE_NAME.sub("_", name).lstrip(".")
    return cleaned or "scan"


class BatchError(ImageError):
    """Some scans of a batch could not be predicted; the others were (a user error).

    Attributes:
        failures: (output name, why) of each scan that failed.
        written: the label maps of the scans that succeeded (or were already complete).
    """

    def __init__(self, failures: list[tuple[str, str]], written: list[Path]) -> None:
        self.failures, self.written = failures, written
        listed = "; ".join(f"{name}: {why}" for name, why in failures)
        super().__init__(
            f"{len(failures)} of {len(failures) + len(written)} scans could not be predicted "
            f"(the others were written): {listed}"
        )


def predict_cases(
    run: Run,
    items: list[Item],
    output_dir: Path,
    options: PredictOptions | None = None,
    progress: bool = False,
) -> list[Path]:
    """Predict (name, channel files) items with a loaded run; see `predict`.

    A scan that cannot be read or does not fit the model is logged and skipped; the batch goes
    on, and a `BatchError` listing every failure is raised at the end. A write error (disk full,
    permissions) ends the batch at once.
    """
    options = options or PredictOptions()
    window = configured_window(run.config, options.overlap, options.tta)
    device = next(run.network.parameters()).device
    engine = resolve_engine(options.engine, run, device)
    predictor = build_predictor(run, engine, device)
    settings = _settings_stamp(run, window, engine, options.postprocess)
    formats = _requested(options.formats, items)
    written: list[Path] = []
    failures: list[tuple[str, str]] = []
    for name, paths in _iterate(items, progress):
        out = Path(output_dir) / f"{name}.nii.gz"
        stamp = f"{settings} input={input_id(paths)}"
        if not options.overwrite and _complete(out, formats, stamp):
            log.info("%s: already predicted by this model from this input, skipped", out)
            written.append(out)
            continue
        try:
            volume = load_volume(paths)
            labels = predict_volume(predictor, volume, run.plan, window, device)
            if run.largest_component and options.postprocess:
                labels = keep_largest_component(labels, run.largest_component)
            written.append(_write_outputs(labels, volume, run.plan.labels, out, formats, stamp))
        except WriteError:
            raise
        except ImageError as err:
            log.error("%s: not predicted: %s", name, err)
            failures.append((name, str(err)))
            continue
        log.debug("%s -> %s", paths[0], out)
    if "stats" in formats and written:
        _write_batch_stats(written, Path(output_dir) / BATCH_STATS)
    if failures:
        raise BatchError(failures, written)
    return written


def _settings_stamp(run: Run, window: Window, engine: str, postprocess: bool) -> str:
    """What made an output, for the NIfTI ``descrip`` field (with `input_id`, <= 79 chars)."""
    tta = ",".join(str(a) for a in window.tta) or "-"
    raw = "" if postprocess else " raw"
    return f"medseg model={run.weights_id} ov={window.overlap:g} tta={tta} {engine}{raw}"


def input_id(paths: list[Input]) -> str:
    """10 hex digits identifying the input files: their resolved paths, sizes and modification
    times (every file of a DICOM series), so a replaced scan or another folder's scan of the
    same name is predicted again instead of keeping an older output."""
    digest = hashlib.sha256()
    for path in paths:
        for file in path.files if isinstance(path, DicomSeries) else (path,):
            try:
                info = file.stat()
                digest.update(f"{file.resolve()}|{info.st_size}|{info.st_mtime_ns}|".encode())
            except OSError:  # unreadable: the read that follows says why
                digest.update(f"{file}|missing|".encode())
    return digest.hexdigest()[:10]


def _write_outputs(
    labels: np.ndarray,
    volume: Volume,
    names: dict[int, str],
    out: Path,
    formats: tuple[str, ...],
    stamp: str,
) -> Path:
    """Every requested output of one scan, the stamped NIfTI last; all of them or none."""
    try:
        _write_extras(labels, volume, names, out, formats)
        # The NIfTI goes last: its presence with this stamp marks the scan as complete.
        return save_labels(labels, like=volume, path=out, description=stamp)
    except Exception:
        _remove_outputs(out, formats)
        raise


def _remove_outputs(out: Path, formats: tuple[str, ...]) -> None:
    for fmt in formats:
        with contextlib.suppress(OSError):  # e.g. the folder itself could not be made
            sibling(out, fmt).unlink(missing_ok=True)


def _requested(formats: tuple[str, ...], items: list[Item]) -> tuple[str, ...]:
    if "dicom-seg" in formats:
        not_dicom = [paths[0] for _, paths in items if not isinstance(paths[0], DicomSeries)]
        if not_dicom:
            raise ImageError(
                f"{not_dicom[0]}: --formats dicom-seg needs DICOM series folders as input"
            )
    return tuple(dict.fromkeys(("nifti", *formats)))


def sibling(nifti: Path, fmt: str) -> Path:
    """The file of output format `fmt` that belongs to label map ``NAME.nii.gz``."""
    return nifti.with_name(nifti.name.removesuffix(".nii.gz") + FORMATS[fmt])


def _complete(out: Path, formats: tuple[str, ...], stamp: str) -> bool:
    """Whether every output of a scan exists, made by these settings from this input. An empty
    result has no DICOM-SEG (it needs a segment), so its absence does not count then."""
    if not out.is_file() or read_description(out) != stamp:
        return False
    missing = [fmt for fmt in formats if not sibling(out, fmt).is_file()]
    if missing == ["dicom-seg"]:
        return not load_labels(out).array.any()
    return not missing


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
