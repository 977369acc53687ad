"""ONNX export and the onnxruntime engine: same masks as torch, one-line user errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app
from medseg.engines import resolve_engine
from medseg.io import load_labels
from medseg.predict import PredictOptions, predict
from medseg.runs import load_run

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with model.onnx written by `medseg export`."""
    run = tmp_path_factory.mktemp("onnx") / "run"
    shutil.copytree(tiny_run, run)
    result = runner.invoke(app, ["export", str(run), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(run / "model.onnx")
    return run


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    values = [v for v in np.union1d(np.unique(a), np.unique(b)) if v != 0]
    return min(2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in values)


@pytest.mark.parametrize("case", ["hippocampus_143", "hippocampus_320"])
def test_onnx_engine_agrees_with_torch(
    exported: Path, demo_dataset: Path, tmp_path: Path, case: str
) -> None:
    image = demo_dataset / "imagesTr" / f"{case}.nii.gz"
    masks = {}
    for engine in ("torch", "onnx"):
        options = PredictOptions("cpu", formats=("nifti",), engine=engine)
        [out] = predict([image], tmp_path / engine, exported, options)
        masks[engine] = load_labels(out).array
    assert masks["torch"].any()
    assert _dice(masks["onnx"], masks["torch"]) >= 0.99


def test_auto_engine_uses_onnx_on_cpu_only_when_exported(exported: Path, tiny_run: Path) -> None:
    cpu = torch.device("cpu")
    assert resolve_engine("auto", load_run(exported), cpu) == "onnx"
    assert resolve_engine("auto", load_run(tiny_run), cpu) == "torch"
    assert resolve_engine("auto", load_run(exported), torch.device("cuda")) == "torch"


def test_onnx_engine_without_export_is_a_user_error(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    image = demo_dataset / "imagesTr" / "hippocampus_143.nii.gz"
    args = ["predict", str(image), "--model", str(tiny_run), "--output", str(tmp_path)]
    result = runner.invoke(app, [*args, "--device", "cpu", "--engine", "onnx"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "medseg export" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "--format must be onnx"),
        (["--output", "x.onnx"], None),
    ],
    ids=["format", "missing-run"],
)
def test_export_user_errors(tmp_path: Path, args: list[str], message: str | None) -> None:
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), *args])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert (message or "model folder not found") in result.output


def test_unknown_engine_is_a_user_error(tiny_run: Path, demo_dataset: Path) -> None:
    image = demo_dataset / "imagesTr" / "hippocampus_143.nii.gz"
    result = runner.invoke(
        app, ["predict", str(image), "--model", str(tiny_run), "--engine", "tvm"]
    )
    assert result.exit_code == 2
    assert "--engine must be one of" in result.output
