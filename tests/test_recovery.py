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
        for key in ("train_loss", "lr", "val_dice_mean"):
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
