"""The command line: the whole path through typer, exit codes and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import load_config

runner = CliRunner()


def invoke(*args: str | Path):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_train_a_dataset_folder_plans_first(tmp_path: Path, demo_dataset: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*TINY, "model.strides=null"]  # the plan has strides for 4 levels, TINY 3
    result = invoke("train", demo_dataset, *overrides, "--max-minutes", "2", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert "network" in result.output and "patch" in result.output  # the plan's summary
    saved = load_config(run_dir / "config.yaml")
    assert saved.data.root == demo_dataset and saved.data.spacing is not None  # planned
    assert saved.model.filters == (4, 8, 16)  # overrides win over the plan
    assert 0 < saved.train.max_minutes < 2  # the planning time came off the budget
    assert (run_dir / "model.pt").is_file()


@pytest.mark.slow
def test_train_predict_evaluate(
    tmp_path: Path, tiny_overrides: list[str], demo_dataset: Path
) -> None:
    run_dir = tmp_path / "runs" / "cli"
    result = invoke(
        "train", Path("configs/hippocampus_3d.yaml"), *tiny_overrides, "--run-dir", run_dir
    )
    assert result.exit_code == 0, result.output
    assert (run_dir / "model.pt").is_file()

    images = [demo_dataset / "imagesTr" / f"hippocampus_{n}.nii.gz" for n in ("319", "320")]
    result = invoke(
        "predict", *images, "--model", run_dir, "--output", tmp_path / "out", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [
        "hippocampus_319.nii.gz",
        "hippocampus_320.nii.gz",
    ]

    refs = tmp_path / "refs"
    refs.mkdir()
    for n in ("319", "320"):
        (refs / f"hippocampus_{n}.nii.gz").write_bytes(
            (demo_dataset / "labelsTr" / f"hippocampus_{n}.nii.gz").read_bytes()
        )
    metrics = tmp_path / "metrics.json"
    result = invoke(
        "evaluate",
        tmp_path / "out",
        refs,
        "--labels",
        demo_dataset / "dataset.json",
        "--output",
        metrics,
    )
    assert result.exit_code == 0, result.output
    assert "Anterior" in result.output and "foreground mean" in result.output
    data = json.loads(metrics.read_text())
    assert set(data["cases"]) == {"hippocampus_319", "hippocampus_320"}
    assert {"dice", "iou", "tp", "fp", "fn", "n_ref", "n_pred"} <= data["cases"]["hippocampus_320"][
        "Anterior"
    ].keys()
    assert metrics.with_suffix(".csv").is_file()


def test_resume_needs_no_config(tmp_path: Path, tiny_run: Path) -> None:
    """`--resume` takes the run's stored config; a finished run resumes to the same model."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = torch.load(run_dir / "model.pt", weights_only=True)
    result = invoke("train", "--run-dir", run_dir, "--resume")
    assert result.exit_code == 0, result.output
    after = torch.load(run_dir / "model.pt", weights_only=True)
    for key, value in before["model"].items():
        torch.testing.assert_close(after["model"][key], value)
    # a config given anyway is not read, and the output says so
    result = invoke("train", "missing.yaml", "--run-dir", run_dir, "--resume")
    assert result.exit_code == 0, result.output
    assert "missing.yaml unused" in result.output


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "predict", "evaluate", "demo"):
        assert command in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.yaml"], "config file not found"),
        (["train", "--run-dir", "runs/x"], "name a config file or a dataset folder"),
        (["train", "--run-dir", "nowhere", "--resume"], "nothing to resume"),
        (["train", "configs/hippocampus_3d.yaml", "train.epochs=0"], "train.epochs must be >= 1"),
        (
            ["train", "configs/hippocampus_3d.yaml", "train.epoch=3"],
            "unknown config key train.epoch",
        ),
        (
            ["train", "configs/hippocampus_3d.yaml", "data.root=/nonexistent"],
            "dataset.json not found",
        ),
        (["predict", "missing.nii.gz", "--model", "nowhere"], "model folder not found"),
        (["predict", "x.nii.gz", "--device", "tpu"], "--device must be one of"),
        (["evaluate", "a", "b", "--labels", "missing.json"], "dataset.json not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_predict_without_runs_says_so(
    tmp_path: Path, demo_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("predict", demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    assert result.exit_code == 2
    assert "no trained model found" in result.output


def test_predict_unreadable_scan(tiny_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    result = invoke("predict", bad, "--model", tiny_run, "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "broken.nii.gz: cannot read image" in result.output
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
