"""Dataset layouts users already have: Medical Segmentation Decathlon and nnU-Net v2 raw.

Both become a `Dataset`: channel names, label names keyed by value, and a list of `Case`s
with one image path per channel (or one 4D file) and an optional label path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset folder or its dataset.json is malformed (a user error)."""


@dataclass(frozen=True)
class Case:
    """One training or test case.

    Attributes:
        name: case identifier (file name without channel suffix and extension).
        images: one file per channel, or a single 4D file holding all channels.
        label: label map file, or None for unlabelled cases.
    """

    name: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """A dataset folder read from its dataset.json.

    Attributes:
        root: the folder holding dataset.json.
        layout: "msd" or "nnunet".
        channels: channel (modality) names in channel order, e.g. ("FLAIR", "T1").
        labels: label value -> name, background (0) included.
        cases: labelled training cases, sorted by name.
        file_ending: image file suffix, e.g. ".nii.gz".
    """

    root: Path
    layout: str
    channels: tuple[str, ...]
    labels: dict[int, str]
    cases: tuple[Case, ...]
    file_ending: str = ".nii.gz"


@dataclass(frozen=True)
class MissingFile:
    """A file a case needs that is not there (collected by `load_dataset` when asked to)."""

    case: str
    path: Path
    message: str


def load_dataset(root: Path | str, missing: list[MissingFile] | None = None) -> Dataset:
    """Read an MSD or nnU-Net v2 raw dataset folder.

    The layout is recognised from dataset.json: ``channel_names`` means nnU-Net v2 (cases
    discovered as ``imagesTr/CASE_XXXX<file_ending>``), ``modality`` with a ``training`` list
    means MSD.

    Args:
        root: the folder holding dataset.json.
        missing: if given, a case lacking a file is left out and described here instead of
            raising, so that `medseg check` can list every missing file at once.

    Raises:
        DatasetError: missing dataset.json, unknown layout, missing files (unless collected),
            or no cases.
    """
    root = Path(root)
    meta = read_dataset_json(root / "dataset.json")
    labels = parse_labels(meta, root / "dataset.json")
    found: list[MissingFile] = []
    if "channel_names" in meta:
        layout, channels = "nnunet", _names(meta["channel_names"], "channel_names", root)
        file_ending = str(meta.get("file_ending", ".nii.gz"))
        cases = _nnunet_cases(root, len(channels), file_ending, found)
    elif "modality" in meta:
        layout, channels = "msd", _names(meta["modality"], "modality", root)
        file_ending = ".nii.gz"
        cases = _msd_cases(root, meta, found)
    else:
        raise DatasetError(
            f"{root / 'dataset.json'}: neither 'channel_names' (nnU-Net v2) nor 'modality' (MSD) "
            "found; add one naming the input channels"
        )
    if found and missing is None:
        raise DatasetError(found[0].message)
    if missing is not None:
        missing += found
    if not cases and not found:
        raise DatasetError(f"{root}: dataset holds no labelled training cases")
    return Dataset(root, layout, channels, labels, tuple(cases), file_ending)


def read_dataset_json(path: Path) -> dict[str, Any]:
    """The parsed dataset.json, with a clear error when missing or malformed."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json not found; is this a dataset folder?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return meta


def read_label_names(path: Path | str) -> dict[int, str]:
    """Label value -> name from a dataset.json (MSD or nnU-Net v2), or a run's labels.json."""
    path = Path(path)
    meta = read_dataset_json(path)
    return parse_labels(meta if "labels" in meta else {"labels": meta}, path)


def parse_labels(meta: dict[str, Any], path: Path) -> dict[int, str]:
    """Label map from ``labels``: MSD keys values (``{"1": "liver"}``), nnU-Net keys names."""
    if "labels" not in meta:
        raise DatasetError(f"{path}: no 'labels' object; declare label values and names")
    raw = meta["labels"]
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: 'labels' must be a non-empty object")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if _is_int(key):
            number, name = int(key), value
        elif _is_int(value):
            number, name = int(value), key
        else:
            raise DatasetError(
                f"{path}: label {key!r}: {value!r} is neither value->name (MSD) nor name->value "
                "(nnU-Net); region-based labels (lists) are not supported"
            )
        if number in labels:
            raise DatasetError(f"{path}: label value {number} is declared twice")
        labels[number] = str(name)
    if 0 not in labels:
        raise DatasetError(f"{path}: labels must declare background as value 0")
    return dict(sorted(labels.items()))


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().isdigit()


def _names(raw: Any, key: str, root: Path) -> tuple[str, ...]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{root / 'dataset.json'}: '{key}' must be a non-empty object")
    try:
        ordered = sorted(raw.items(), key=lambda kv: int(kv[0]))
    except ValueError:
        raise DatasetError(
            f"{root / 'dataset.json'}: '{key}' keys must be channel numbers"
        ) from None
    return tuple(str(name) for _, name in ordered)


def _msd_cases(root: Path, meta: dict[str, Any], missing: list[MissingFile]) -> list[Case]:
    entries = meta.get("training")
    if not isinstance(entries, list):
        raise DatasetError(f"{root / 'dataset.json'}: MSD layout needs a 'training' list")
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(
                f"{root / 'dataset.json'}: training entry {entry!r} needs image and label"
            )
        image, label = root / entry["image"], root / entry["label"]
        name = _strip(image.name, ".nii.gz")
        if _present([image, label], name, missing):
            cases.append(Case(name, (image,), label))
    return sorted(cases, key=lambda c: c.name)


def _nnunet_cases(
    root: Path, n_channels: int, file_ending: str, missing: list[MissingFile]
) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(
            f"{images_dir}: folder not found (nnU-Net layout keeps images in imagesTr/)"
        )
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + "$")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        match = pattern.match(path.name)
        if match:
            found.setdefault(match["case"], {})[int(match["channel"])] = path
    cases = []
    for name, channels in sorted(found.items()):
        lacking = [
            images_dir / f"{name}_{c:04d}{file_ending}"
            for c in range(n_channels)
            if c not in channels
        ]
        missing += [
            MissingFile(name, p, f"{images_dir}: case {name} lacks channel file {p.name}")
            for p in lacking
        ]
        label = labels_dir / f"{name}{file_ending}"
        if _present([label], name, missing) and not lacking:
            cases.append(Case(name, tuple(channels[c] for c in range(n_channels)), label))
    return cases


def _present(paths: list[Path], case: str, missing: list[MissingFile]) -> bool:
    """Whether every file of a case exists; each one that does not is added to `missing`."""
    absent = [p for p in paths if not p.is_file()]
    missing += [MissingFile(case, p, f"{p}: file of case {case} not found") for p in absent]
    return not absent


def _strip(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if name.endswith(suffix) else name.rsplit(".", 1)[0]
