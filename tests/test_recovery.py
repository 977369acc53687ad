"""Nothing is lost on a crash: killed training resumes exactly; batch prediction resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.predict import PredictOptions, predict
from medseg.training import train

CPU = PredictOptions(device="cpu")


def _medseg(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "medseg", *map(str, args)]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_straight_run(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    overrides = [*tiny_overrides, "train.epochs=4", "train.iterations_per_epoch=8"]
    straight = train(load_config(None, overrides), tmp_path / "straight")

    config = tmp_path / "empty.yaml"
    config.write_text("")
    run = tmp_path / "killed"
    process = subprocess.Popen(_medseg("train", config, *overrides, "--run-dir", run))
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("training wrote no checkpoint within 120 s")
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    stopped_after = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert stopped_after < 3, "the run finished before it could be killed"

    resumed = subprocess.run(_medseg("train", config, "--run-dir", run, "--resume"), check=False)
    assert resumed.returncode == 0

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-5, atol=1e-6)
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "lr", "val_pooled_dice_mean"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-5, abs=1e-7)
    assert not list(run.glob(".*tmp*")), "a half-written file of the killed run was left behind"


def _scans(demo: Path) -> list[Path]:
    return [demo / "imagesTr" / f"hippocampus_{n}.nii.gz" for n in ("143", "149")]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_rerun_skips_complete_scans_and_redoes_partial_ones(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    predict(_scans(demo_dataset), out, tiny_run, CPU)
    before = _mtimes(out)
    (out / "hippocampus_149.png").unlink()  # as if the process died while writing this scan
    time.sleep(0.01)
    predict(_scans(demo_dataset), out, tiny_run, CPU)
    after = _mtimes(out)
    assert after["hippocampus_143.nii.gz"] == before["hippocampus_143.nii.gz"]  # skipped
    assert after["hippocampus_149.nii.gz"] != before["hippocampus_149.nii.gz"]  # redone
    assert "hippocampus_149.png" in after

    predict(_scans(demo_dataset), out, tiny_run, PredictOptions("cpu", overwrite=True))
    assert _mtimes(out)["hippocampus_143.nii.gz"] != after["hippocampus_143.nii.gz"]


def test_other_model_or_settings_redo_the_scan(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    scans = _scans(demo_dataset)[:1]
    predict(scans, out, tiny_run, CPU)
    first = _mtimes(out)["hippocampus_143.nii.gz"]
    predict(scans, out, tiny_run, PredictOptions("cpu", overlap=0.25))
    assert _mtimes(out)["hippocampus_143.nii.gz"] != first


@pytest.mark.slow
def test_two_processes_share_an_output_folder(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = (
        "predict",
        demo_dataset / "imagesTr",
        "--model",
        tiny_run,
        "--output",
        out,
        "--formats",
        "nifti",
        "--device",
        "cpu",
    )
    processes = [subprocess.Popen(_medseg(*args)) for _ in range(2)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    reference = tmp_path / "reference"
    predict(
        [demo_dataset / "imagesTr"], reference, tiny_run, PredictOptions("cpu", formats=("nifti",))
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())  # no temporary files remain
    for name in names:
        a = np.asarray(nib.load(out / name).dataobj)
        b = np.asarray(nib.load(reference / name).dataobj)
        np.testing.assert_array_equal(a, b)


def test_replaced_scan_or_another_folder_is_predicted_again(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    """The stamp names the input: a scan replaced under the same name, or a scan of the same
    name from another folder, is predicted again instead of keeping the older mask."""
    import shutil

    out = tmp_path / "out"
    scan = tmp_path / "a" / "scan.nii.gz"
    scan.parent.mkdir()
    shutil.copy(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz", scan)
    [mask] = predict([scan], out, tiny_run, CPU)
    first = nib.load(mask).shape
    assert first == nib.load(scan).shape
    shutil.copy(demo_dataset / "imagesTr" / "hippocampus_165.nii.gz", scan)  # replaced
    predict([scan], out, tiny_run, CPU)
    assert nib.load(mask).shape == nib.load(scan).shape != first
    other = tmp_path / "b" / "scan.nii.gz"
    other.parent.mkdir()
    shutil.copy(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz", other)
    predict([other], out, tiny_run, CPU)
    assert nib.load(mask).shape == first
    before = mask.stat().st_mtime_ns
    predict([other], out, tiny_run, CPU)  # unchanged input: skipped
    assert mask.stat().st_mtime_ns == before


def test_stamp_fits_the_nifti_description_field(tiny_run: Path, tmp_path: Path) -> None:
    """The stamp is compared with the NIfTI descrip field, which keeps 79 characters."""
    from medseg.inference import Window
    from medseg.io.dicom import DicomSeries
    from medseg.predict import _settings_stamp, input_id
    from medseg.runs import load_run

    run = load_run(tiny_run)
    series = DicomSeries(tmp_path, "1.2.3", (tmp_path / "x.dcm",))
    window = Window((32, 32, 32), overlap=0.125, tta=(0, 1, 2))
    stamp = f"{_settings_stamp(run, window, 'onnx', False)} input={input_id([series])}"
    assert len(stamp) <= 79, stamp


def test_empty_result_needs_no_dicom_seg_to_be_complete(tmp_path: Path) -> None:
    """A DICOM Segmentation needs a segment, so an empty result has none; it is complete."""
    from medseg.io import load_volume, save_labels
    from medseg.predict import _complete

    volume = load_volume(_scans(Path(__file__).parents[1] / "medseg/data/hippocampus_demo")[0])
    out = tmp_path / "scan.nii.gz"
    formats = ("nifti", "dicom-seg")
    save_labels(np.zeros(volume.shape, np.uint8), volume, out, description="stamp")
    assert _complete(out, formats, "stamp")
    assert not _complete(out, formats, "another stamp")
    labels = np.zeros(volume.shape, np.uint8)
    labels[1, 1, 1] = 1
    save_labels(labels, volume, out, description="stamp")
    assert not _complete(out, formats, "stamp")  # something segmented: its DICOM-SEG is missing


def test_one_unreadable_scan_does_not_stop_the_batch(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from medseg.cli import app

    scans = tmp_path / "scans"
    scans.mkdir()
    good = _scans(demo_dataset)
    for path in good:
        (scans / path.name).write_bytes(path.read_bytes())
    (scans / "broken.nii.gz").write_bytes(good[0].read_bytes()[:500])  # truncated
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(scans), "-m", str(tiny_run), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "1 of 3 scans could not be predicted" in result.output
    assert "broken: " in result.output and "cannot read image" in result.output
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [p.name for p in good]
    assert "Traceback" not in result.output
    lines = (out / "stats.csv").read_text().splitlines()
    assert len({line.split(",")[0] for line in lines[1:]}) == 2  # the two predicted cases
