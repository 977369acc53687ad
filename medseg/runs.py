"""The self-describing run folder: layout, safe checkpoints, and loading a trained model.

A run folder holds ``config.yaml`` (resolved), ``plan.json`` (spacing, normalisation, labels),
``labels.json``, ``run.json`` (versions, data split), ``model.pt`` (the final weights) and
``last.pt`` (the resumable state; tensors and plain data only), ``metrics.csv``,
``training_curve.png``, ``train.log`` and ``postprocessing.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.config import Config, ConfigError, load_config
from medseg.io import atomic_path
from medseg.preprocessing_plan import Plan, load_plan

log = logging.getLogger(__name__)

CONFIG, PLAN, LABELS, INFO = "config.yaml", "plan.json", "labels.json", "run.json"
METRICS, CURVE, LOG = "metrics.csv", "training_curve.png", "train.log"
MODEL, BEST, LAST = "model.pt", "best.pt", "last.pt"  # best.pt: runs made before medseg 0.2
VALIDATION = "validation"
POSTPROCESSING = "postprocessing.json"
ONNX = "model.onnx"
FOLD_PREFIX = "fold_"  # an ensemble folder holds fold_0/, fold_1/, ..., each a run folder
ENSEMBLE_CONFIG = "ensemble.yaml"  # an ensemble's config (not config.yaml: that marks one run)


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
    weights_id: str = ""
    """First 12 hex digits of a SHA-256 over every member's weights and the post-processing
    settings: which model made an output."""
    members: tuple[Run, ...] = ()
    """An ensemble's folds (each a single run); empty for a single run."""
    largest_component: tuple[int, ...] = ()
    """Label values of which predict keeps only the largest component (postprocessing.json)."""

    @property
    def folds(self) -> tuple[Run, ...]:
        """The runs whose probabilities are averaged: the members, or the run itself."""
        return self.members or (self,)


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
    except Exception as err:  # a corrupt file can fail anywhere in the unpickler (KeyError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(
            f"{path}: refusing to load checkpoint: it is corrupt or holds objects other than "
            f"tensors and plain data ({first})"
        ) from None


def find_checkpoint(run_dir: Path) -> Path:
    """model.pt (final weights) when present, else best.pt (older runs), else last.pt."""
    for name in (MODEL, BEST, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    raise RunError(f"{run_dir}: no weights ({MODEL} or {LAST}); is training finished?")


def fold_dirs(model_dir: Path) -> list[Path]:
    """An ensemble folder's ``fold_K`` run folders in fold order; empty for a single run."""
    folds = [
        p
        for p in Path(model_dir).glob(f"{FOLD_PREFIX}*")
        if p.is_dir() and p.name[len(FOLD_PREFIX) :].isdigit()
    ]
    return sorted(folds, key=lambda p: int(p.name[len(FOLD_PREFIX) :]))


def load_run(
    run_dir: Path, device: torch.device | str = "cpu", allow_unfinished: bool = False
) -> Run:
    """Load a model folder: a single run folder, or an ensemble folder of ``fold_K`` runs.

    The folds of an ensemble must share the network, the spacing, the channels and labels
    and the normalisation schemes (CT statistics may differ: each fold applies its own).
    ``postprocessing.json`` in the model folder lists labels to reduce to their largest
    component.

    Args:
        run_dir: the run or ensemble folder.
        device: where the networks go.
        allow_unfinished: load a run whose training did not finish (its ``last.pt``), or an
            ensemble with unfinished or missing folds, with a warning; refused otherwise.

    Raises:
        RunError: a missing or incomplete folder, unsafe or mismatched weights, or an
            unfinished run without `allow_unfinished`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: model folder not found")
    folds = fold_dirs(run_dir) if not (run_dir / CONFIG).is_file() else []
    _check_finished(run_dir, folds, allow_unfinished)
    members = tuple(_load_single(d, device) for d in folds)
    run = members[0] if members else _load_single(run_dir, device)
    for member in members[1:]:
        _check_compatible(members[0], member)
    largest = _read_postprocessing(run_dir / POSTPROCESSING)
    digest = hashlib.sha256()
    for fold in members or (run,):
        digest.update(fold.weights_id.encode())
    digest.update(repr(largest).encode())
    return Run(
        run_dir,
        run.config,
        run.plan,
        run.network,
        digest.hexdigest()[:12],
        members if len(members) > 1 else (),
        largest,
    )


def unfinished(run_dir: Path, folds: list[Path]) -> str | None:
    """What is unfinished about a model folder (None when nothing is): a run without final
    weights, or an ensemble with a fold folder without them or, when it was trained with
    ``--folds all`` (``ensemble.yaml``), a fold of its ``train.folds`` not started at all."""
    finished = {d for d in folds or [run_dir] if any((d / n).is_file() for n in (MODEL, BEST))}
    if not folds:  # without any weights, loading says so
        started = (run_dir / LAST).is_file()
        return "its training did not finish (only last.pt)" if started and not finished else None
    indices = {int(d.name[len(FOLD_PREFIX) :]): d for d in folds}
    expected = set(indices)
    if (run_dir / ENSEMBLE_CONFIG).is_file():
        try:
            expected |= set(range(load_config(run_dir / ENSEMBLE_CONFIG).train.folds))
        except ConfigError as err:
            raise RunError(f"{run_dir / ENSEMBLE_CONFIG}: {err}") from None
    missing = sorted(k for k in expected if k not in indices or indices[k] not in finished)
    if not missing:
        return None
    return f"fold(s) {', '.join(map(str, missing))} of {len(expected)} did not finish training"


def _check_finished(run_dir: Path, folds: list[Path], allow: bool) -> None:
    problem = unfinished(run_dir, folds)
    if problem is None:
        return
    if not allow:
        raise RunError(
            f"{run_dir}: {problem}; finish it with 'medseg train --run-dir {run_dir} --resume' "
            "(add --folds all for an ensemble), or pass --allow-unfinished to predict with it"
        )
    log.warning("%s: %s; predicting with it anyway (--allow-unfinished)", run_dir, problem)


def _check_compatible(first: Run, other: Run) -> None:
    a, b = first.plan, other.plan
    same = (
        first.config.model == other.config.model
        and a.spacing == b.spacing
        and a.channels == b.channels
        and a.labels == b.labels
        and [n.scheme for n in a.normalization] == [n.scheme for n in b.normalization]
    )
    if not same:
        raise RunError(
            f"{other.path}: network, spacing, channels, labels or normalisation differ from "
            f"{first.path}; the folds of an ensemble must share them"
        )


def _read_postprocessing(path: Path) -> tuple[int, ...]:
    """Label values listed under ``largest_component`` in ``postprocessing.json`` (if any)."""
    if not path.is_file():
        return ()
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: cannot read post-processing settings ({err})") from None
    values = raw.get("largest_component", []) if isinstance(raw, dict) else None
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise RunError(f'{path}: expected {{"largest_component": [label values, ...]}}')
    return tuple(values)


def _load_single(run_dir: Path, device: torch.device | str) -> Run:
    """Config, plan and final weights of one run folder."""
    from medseg.models import build_model

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
    weights_id = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return Run(run_dir, cfg, plan, network.to(device).eval(), weights_id)


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The most recently modified run folder (one holding weights) under `runs_root`."""
    found = [p.parent for name in (MODEL, BEST, LAST) for p in runs_root.glob(f"**/{name}")]
    candidates = [_model_root(p) for p in found]
    if not candidates:
        raise RunError(
            f"no trained model found under {runs_root.resolve()}; train one with "
            "'medseg train CONFIG --run-dir runs/NAME' or pass --model RUN_DIR"
        )
    return max(set(candidates), key=lambda p: max(f.stat().st_mtime for f in p.glob("**/*.pt")))


def _model_root(run_dir: Path) -> Path:
    """The ensemble folder for a ``fold_K`` run inside one, else the run folder itself."""
    is_fold = run_dir.name.startswith(FOLD_PREFIX) and run_dir.name[len(FOLD_PREFIX) :].isdigit()
    return run_dir.parent if is_fold and not (run_dir.parent / CONFIG).is_file() else run_dir


def write_json(data: Any, path: Path) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
