"""Prediction of files, folders and DICOM series with a trained run: inputs in, label maps out.

Input names become output names: ``scan.nii.gz`` -> ``OUT/scan.nii.gz``, a DICOM series folder
``CT_series/`` -> ``OUT/CT_series.nii.gz``. Multi-channel models (and models trained on the
nnU-Net layout) group ``CASE_0000``, ``CASE_0001``, ... files into case ``CASE``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from medseg.inference import predict_volume, resolve_device
from medseg.io import (
    ImageError,
    is_dicom_dir,
    is_image_file,
    load_volume,
    save_labels,
    strip_suffix,
)
from medseg.runs import Run, latest_run, load_run

log = logging.getLogger(__name__)

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")

Item = tuple[str, list[Path]]


def predict(
    inputs: Sequence[Path],
    output_dir: Path,
    model_dir: Path | None = None,
    device: str = "auto",
    overlap: float | None = None,
    tta: bool | None = None,
    progress: bool = False,
) -> list[Path]:
    """Segment every scan in `inputs` and write ``OUTPUT_DIR/NAME.nii.gz`` on each input's grid.

    Args:
        inputs: image files, folders of images, or DICOM series folders.
        output_dir: where label maps are written.
        model_dir: a run folder; None = the most recent run under ./runs.
        device: auto, cpu or cuda.
        overlap, tta: override the run's inference settings.
        progress: show a progress bar.

    Returns:
        The written label-map files.
    """
    torch_device = resolve_device(device)
    run = load_run(model_dir if model_dir is not None else latest_run(), torch_device)
    items = resolve_inputs(inputs, len(run.plan.channels), run.plan.layout == "nnunet")
    return predict_cases(run, items, output_dir, torch_device, overlap, tta, progress)


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
    device: torch.device | None = None,
    overlap: float | None = None,
    tta: bool | None = None,
    progress: bool = False,
) -> list[Path]:
    """Predict (name, channel files) items with a loaded run; see `predict`."""
    infer = run.config.infer
    overlap = infer.overlap if overlap is None else overlap
    tta = infer.tta if tta is None else tta
    device = device or torch.device("cpu")
    written = []
    for name, paths in _iterate(items, progress):
        volume = load_volume(paths)
        if volume.array.shape[0] != len(run.plan.channels):
            raise ImageError(
                f"{paths[0]}: has {volume.array.shape[0]} channel(s), the model takes "
                f"{len(run.plan.channels)} ({', '.join(run.plan.channels)})"
            )
        labels = predict_volume(
            _predictor(run),
            volume,
            run.plan,
            run.config.model.patch_size,
            overlap,
            infer.sw_batch_size,
            tta,
            device,
        )
        written.append(save_labels(labels, like=volume, path=Path(output_dir) / f"{name}.nii.gz"))
        log.debug("%s -> %s", paths[0], written[-1])
    return written


def _predictor(run: Run):  # type: ignore[no-untyped-def]
    network = run.network
    channels_last = run.config.model.spatial_dims == 3

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return network(x)

    return forward


def _iterate(items: list[Item], progress: bool):  # type: ignore[no-untyped-def]
    if not progress or len(items) < 2:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description="predicting")
