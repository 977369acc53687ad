"""The self-describing run folder: layout, safe checkpoints, and loading a trained model.

A run folder holds ``config.yaml`` (resolved), ``plan.json`` (spacing, normalisation, labels),
``labels.json``, ``run.json`` (versions, data split), ``best.pt``/``last.pt`` (tensors and plain
data only), ``metrics.csv``, ``training_curve.png`` and ``train.log``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.config import Config, ConfigError, load_config
from medseg.io import atomic_path
from medseg.planning import Plan, load_plan

CONFIG, PLAN, LABELS, INFO = "config.yaml", "plan.json", "labels.json", "run.json"
METRICS, CURVE, LOG = "metrics.csv", "training_curve.png", "train.log"
BEST, LAST = "best.pt", "last.pt"
VALIDATION = "validation"


class RunError(ValueError):
    """A run folder is missing, incomplete or holds an unsafe checkpoint (a user error)."""


@dataclass
class Run:
    """A trained model ready for inference.

    Attributes:
        path: the run folder.
        config: the resolved training configuration.
        plan: preprocessing the model expects.
        network: the model in eval mode on its device.
    """

    path: Path
    config: Config
    plan: Plan
    network: torch.nn.Module
    fingerprint: str = ""
    """First 12 hex digits of the weights file's SHA-256: which model made an output."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without executing code: tensors and plain containers only.

    Raises:
        RunError: missing file, or a pickle that needs arbitrary objects (refused, not run).
    """
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(
            f"{path}: refusing to load checkpoint: it is corrupt or holds objects other than "
            f"tensors and plain data ({first})"
        ) from None


def find_checkpoint(run_dir: Path) -> Path:
    """best.pt when present, else last.pt."""
    for name in (BEST, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    raise RunError(f"{run_dir}: no weights ({BEST} or {LAST}); is training finished?")


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> Run:
    """Load config, plan and the best weights of a run folder."""
    from medseg.models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: model folder not found")
    for name in (CONFIG, PLAN):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir}: not a medseg run folder ({name} missing)")
    try:
        cfg = load_config(run_dir / CONFIG)
    except ConfigError as err:
        raise RunError(f"{run_dir / CONFIG}: {err}") from None
    plan = load_plan(run_dir / PLAN)
    network = build_model(cfg.model, len(plan.channels), len(plan.labels))
    weights = find_checkpoint(run_dir)
    state = load_checkpoint(weights)
    try:
        network.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise RunError(f"{run_dir}: weights do not match the configured network ({err})") from None
    fingerprint = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return Run(run_dir, cfg, plan, network.to(device).eval(), fingerprint)


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The most recently modified run folder (one holding weights) under `runs_root`."""
    candidates = [p.parent for name in (BEST, LAST) for p in runs_root.glob(f"**/{name}")]
    if not candidates:
        raise RunError(
            f"no trained model found under {runs_root.resolve()}; train one with "
            "'medseg train CONFIG --run-dir runs/NAME' or pass --model RUN_DIR"
        )
    return max(set(candidates), key=lambda p: max(f.stat().st_mtime for f in p.glob("*.pt")))


def write_json(data: Any, path: Path) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
