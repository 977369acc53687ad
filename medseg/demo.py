"""`medseg demo`: the whole path on bundled real data, with no download.

Nine of the ten bundled hippocampus cases form a training dataset (one fold of it validates);
the tenth is never trained on: it is predicted and evaluated at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from medseg.config import load_config
from medseg.datasets import load_dataset
from medseg.io import ImageError

log = logging.getLogger(__name__)

MARKER = ".medseg-demo"
PARTS = ("dataset", "test", "run", "predictions", "metrics.json", "metrics.csv")


@dataclass
class DemoResult:
    """Where the demo put everything, and the held-out case's metrics."""

    output: Path
    run_dir: Path
    prediction: Path
    metrics_json: Path
    metrics_csv: Path
    metrics: dict[str, Any] = field(repr=False, default_factory=dict)

    def outputs(self) -> dict[str, Path]:
        """Human-readable name -> path, in the order a user would open them."""
        case = self.prediction.name.removesuffix(".nii.gz")
        return {
            "training dataset": self.output / "dataset",
            "run folder": self.run_dir,
            "training curve": self.run_dir / "training_curve.png",
            "validation metrics": self.run_dir / "validation" / "metrics.json",
            "held-out prediction": self.prediction,
            "  Slicer segmentation": self.prediction.with_name(f"{case}.seg.nrrd"),
            "  QC picture": self.prediction.with_name(f"{case}.png"),
            "  volumes and stats": self.prediction.with_name(f"{case}.stats.json"),
            "held-out metrics": self.metrics_json,
            "held-out metrics CSV": self.metrics_csv,
        }


def bundled_dataset() -> Path:
    """The bundled hippocampus dataset folder (MSD layout, CC-BY-SA 4.0, see ATTRIBUTION.md)."""
    return Path(str(resources.files("medseg") / "data" / "hippocampus_demo"))


def run_demo(output: Path, progress: bool = False) -> DemoResult:
    """Train on 9 bundled cases, predict the 10th, evaluate it; returns where outputs are."""
    from medseg.evaluation import evaluate_folders, write_results
    from medseg.predict import PredictOptions, predict
    from medseg.training import train

    output = _prepare(Path(output))
    source = load_dataset(bundled_dataset())
    *train_cases, test_case = source.cases
    _write_dataset(source.root, train_cases, output / "dataset")
    test_image = _copy(test_case.images[0], output / "test" / "images" / test_case.images[0].name)
    _copy(test_case.label, output / "test" / "labels" / test_case.label.name)  # type: ignore[arg-type]
    demo_yaml = Path(str(resources.files("medseg") / "data" / "demo.yaml"))
    cfg = load_config(demo_yaml, [f"data.root={output / 'dataset'}"])
    run_dir = train(cfg, output / "run", progress=progress)
    prediction = predict(
        [test_image], output / "predictions", run_dir, PredictOptions(device="cpu")
    )[0]
    metrics = evaluate_folders(output / "predictions", output / "test" / "labels", source.labels)
    json_path, csv_path = write_results(metrics, output / "metrics.json")
    return DemoResult(output, run_dir, prediction, json_path, csv_path, metrics)


def _prepare(output: Path) -> Path:
    if output.exists() and any(output.iterdir()):
        if not (output / MARKER).exists():
            raise ImageError(
                f"{output}: folder exists and is not a medseg demo folder; choose another --output"
            )
        for part in PARTS:  # only what an earlier demo created
            target = output / part
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("created by medseg demo\n")
    return output


def _write_dataset(source: Path, cases: list[Any], target: Path) -> None:
    meta = json.loads((source / "dataset.json").read_text())
    meta["training"] = []
    for case in cases:
        image = _copy(case.images[0], target / "imagesTr" / case.images[0].name)
        label = _copy(case.label, target / "labelsTr" / case.label.name)
        meta["training"].append(
            {"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{label.name}"}
        )
    meta["numTraining"] = len(cases)
    (target / "dataset.json").write_text(json.dumps(meta, indent=2))
    shutil.copy2(source / "ATTRIBUTION.md", target / "ATTRIBUTION.md")


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
