"""`medseg demo`: the whole path on the bundled cases, as a new user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.cli import app


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output", str(out)])
    assert result.exit_code == 0, result.output
    prediction = out / "predictions" / "hippocampus_320.nii.gz"
    assert prediction.is_file()
    assert str(prediction) in result.output
    info = json.loads((out / "run" / "run.json").read_text())
    assert "hippocampus_320" not in info["train_cases"] + info["val_cases"]  # held out
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["cases"]) == ["hippocampus_320"]
    # A short CPU training already segments the unseen case far better than chance.
    assert metrics["mean"]["foreground_mean"]["dice"] > 0.5


def test_demo_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "thesis.docx").write_text("precious")
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a medseg demo folder" in result.output
    assert (tmp_path / "thesis.docx").exists()
