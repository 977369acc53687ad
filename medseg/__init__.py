"""medseg: medical image segmentation on MONAI — train, predict on the input grid, evaluate."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "load_config", "predict", "train"]


def __getattr__(name: str) -> Any:
    # Lazy public API: `import medseg` stays light (no torch) until a function is used.
    if name == "load_config":
        from medseg.config import load_config

        return load_config
    if name == "train":
        from medseg.training import train

        return train
    if name == "predict":
        from medseg.predict import predict

        return predict
    if name == "evaluate":
        from medseg.evaluation import evaluate_folders

        return evaluate_folders
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
