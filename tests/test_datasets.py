"""medseg.datasets: MSD and nnU-Net v2 raw layouts become a Dataset; bad folders fail clearly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from medseg.datasets import DatasetError, load_dataset

HIPPOCAMPUS_LABELS = {0: "background", 1: "Anterior", 2: "Posterior"}


def test_msd_demo(demo_dataset: Path) -> None:
    ds = load_dataset(demo_dataset)

    assert ds.layout == "msd"
    assert ds.channels == ("MRI",)
    assert ds.labels == HIPPOCAMPUS_LABELS
    assert ds.file_ending == ".nii.gz"
    names = sorted(p.name.removesuffix(".nii.gz") for p in (demo_dataset / "imagesTr").iterdir())
    assert [c.name for c in ds.cases] == names
    assert len(names) == 10
    for case in ds.cases:
        assert case.images == (demo_dataset / "imagesTr" / f"{case.name}.nii.gz",)
        assert case.label == demo_dataset / "labelsTr" / f"{case.name}.nii.gz"
        assert case.images[0].is_file() and case.label.is_file()
    meta = json.loads((demo_dataset / "dataset.json").read_text())
    assert meta["numTraining"] == len(meta["training"]) == 10
    assert meta["training"] == sorted(meta["training"], key=lambda e: e["image"])


def test_msd_shared_hippocampus(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "hippocampus")

    assert ds.layout == "msd"
    assert len(ds.cases) == 200
    assert ds.labels == HIPPOCAMPUS_LABELS
    assert ds.channels == ("MRI",)
    assert [c.name for c in ds.cases] == sorted(c.name for c in ds.cases)


def test_nnunet_brats_two_channels(shared_data: Path) -> None:
    root = shared_data / "brats_subset"
    ds = load_dataset(root)

    assert ds.layout == "nnunet"
    assert ds.channels == ("FLAIR", "T1")
    assert ds.labels == {0: "background", 1: "whole_tumor"}
    assert len(ds.cases) == 8
    for case in ds.cases:
        assert [p.name for p in case.images] == [
            f"{case.name}_0000.nii.gz",
            f"{case.name}_0001.nii.gz",
        ]
        assert case.label == root / "labelsTr" / f"{case.name}.nii.gz"


def test_nnunet_labels_keyed_by_name(shared_data: Path) -> None:
    root = shared_data / "totalseg_examples" / "CT"
    by_name = json.loads((root / "dataset.json").read_text())["labels"]
    ds = load_dataset(root)

    assert ds.layout == "nnunet"
    assert ds.channels == ("CT",)
    assert [c.name for c in ds.cases] == ["example_ct", "example_ct_sm"]
    assert ds.labels == {int(value): name for name, value in by_name.items()}
    assert (ds.labels[0], ds.labels[1], ds.labels[5]) == ("background", "spleen", "liver")
    assert list(ds.labels) == sorted(ds.labels)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _nnunet(root: Path, labels: dict | None = None, **extra) -> None:
    """A two-channel nnU-Net folder with one complete case `c1` (empty files suffice)."""
    meta = {
        "channel_names": {"0": "FLAIR", "1": "T1"},
        "labels": labels or {"background": 0, "tumour": 1},
        "file_ending": ".nii.gz",
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    for name in ("imagesTr/c1_0000.nii.gz", "imagesTr/c1_0001.nii.gz", "labelsTr/c1.nii.gz"):
        _touch(root / name)


def _msd(root: Path) -> None:
    meta = {
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior"},
        "training": [{"image": "./imagesTr/h_001.nii.gz", "label": "./labelsTr/h_001.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    _touch(root / "imagesTr" / "h_001.nii.gz")


def _no_json(root: Path) -> None:
    _touch(root / "imagesTr" / "c1_0000.nii.gz")


def _bad_json(root: Path) -> None:
    (root / "dataset.json").write_text('{"labels": {"0": "background",}')


def _missing_channel(root: Path) -> None:
    _nnunet(root)
    (root / "imagesTr" / "c1_0001.nii.gz").unlink()


def _missing_label(root: Path) -> None:
    _nnunet(root)
    (root / "labelsTr" / "c1.nii.gz").unlink()


def _no_background(root: Path) -> None:
    _nnunet(root, labels={"tumour": 1, "oedema": 2})


def _no_channels(root: Path) -> None:
    _nnunet(root)
    meta = json.loads((root / "dataset.json").read_text())
    del meta["channel_names"]
    (root / "dataset.json").write_text(json.dumps(meta))


BAD_DATASETS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing_dataset_json": (_no_json, "dataset.json not found"),
    "invalid_json": (_bad_json, "not valid JSON"),
    "missing_channel_file": (_missing_channel, "case c1 lacks channel file c1_0001.nii.gz"),
    "missing_label_nnunet": (_missing_label, "c1.nii.gz: file of case c1 not found"),
    "missing_label_msd": (_msd, "h_001.nii.gz: file of case h_001 not found"),
    "labels_without_background": (_no_background, "must declare background as value 0"),
    "no_channel_names_or_modality": (_no_channels, "neither 'channel_names'"),
}


@pytest.mark.parametrize(("make", "message"), BAD_DATASETS.values(), ids=BAD_DATASETS.keys())
def test_bad_dataset(tmp_path: Path, make: Callable[[Path], None], message: str) -> None:
    make(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    assert message in str(info.value)


def test_missing_labels_named(tmp_path: Path) -> None:
    _nnunet(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    del meta["labels"]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="'labels'"):
        load_dataset(tmp_path)
