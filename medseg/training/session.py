"""One training session, from a configuration to a filled run folder: `train` (one fold) and
`train_folds` (all of them, an ensemble). Checks the dataset, plans the preprocessing, writes
the run files, logs to ``train.log``, trains, validates, and records the session in
``run.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from monai.utils import set_determinism

from medseg import __version__, datasets, runs
from medseg import config as config_mod
from medseg.config import Config, ConfigError
from medseg.datasets import Case, DatasetError, load_dataset
from medseg.inference import resolve_device
from medseg.preprocessing_plan import Plan, make_plan, save_plan
from medseg.training.budget import _training_budget
from medseg.training.errors import TrainingError
from medseg.training.splits import Split, _check_same_split, kfold_split, subset_training
from medseg.training.trainer import CACHE, _Trainer
from medseg.training.validation import _final_validation, _pool_cross_validation
from medseg.transforms import unwrapped_errors

log = logging.getLogger(__name__)


def train(cfg: Config | None, run_dir: Path, resume: bool = False, progress: bool = False) -> Path:
    """Train a model and fill `run_dir` with everything `medseg predict` needs.

    Args:
        cfg: the configuration (``data.root`` must name a dataset folder). Ignored when
            resuming (may be None then): the run folder's stored configuration is used.
        run_dir: the run folder; created, or continued with `resume`.
        resume: continue the run in `run_dir` from its ``last.pt``.
        progress: show a progress bar with loss and ETA.

    Returns:
        The run folder.
    """
    run_dir = Path(run_dir)
    if resume:
        cfg = _resume_config(run_dir)
        for stale in run_dir.glob(".*.tmp*"):  # half-written by a killed run; never renamed
            stale.unlink()
    elif (run_dir / runs.LAST).exists():
        raise TrainingError(
            f"{run_dir}: already holds a run; pass --resume to continue it "
            "or choose another --run-dir"
        )
    cfg = _given(cfg)
    _check_names(cfg)
    if cfg.data.root is None:
        raise ConfigError(
            "data.root is not set: name the dataset folder in the config or as data.root=PATH"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with _log_to(run_dir / runs.LOG):
        return _train(cfg, run_dir, resume, progress)


def train_folds(
    cfg: Config | None, run_dir: Path, resume: bool = False, progress: bool = False
) -> Path:
    """Train every fold into ``RUN/fold_K`` (an ensemble `medseg predict` averages).

    A time budget (``train.max_minutes``) is shared equally between the folds. Afterwards the
    held-out predictions of all folds are pooled (``RUN/crossval``) to score the
    cross-validation and to decide the ensemble's post-processing.

    Args:
        cfg: the configuration; ``train.fold`` is ignored. When resuming, the ensemble's stored
            configuration (``RUN/ensemble.yaml``) is used instead; `cfg` may then be None.
        run_dir: the ensemble folder.
        resume: skip finished folds and continue an interrupted one.
        progress: show progress bars.
    """
    run_dir = Path(run_dir)
    stored = run_dir / runs.ENSEMBLE_CONFIG
    if resume and stored.is_file():
        cfg = config_mod.load_config(stored)
    elif resume and cfg is None:
        raise TrainingError(f"{run_dir}: nothing to resume ({runs.ENSEMBLE_CONFIG} not found)")
    cfg = _given(cfg)
    fold_dirs = [run_dir / f"fold_{k}" for k in range(cfg.train.folds)]
    if not resume and any((d / runs.LAST).exists() for d in fold_dirs):
        raise TrainingError(
            f"{run_dir}: already holds trained folds; pass --resume to finish them "
            "or choose another --run-dir"
        )
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save_config(cfg, stored)
    budget = cfg.train.max_minutes
    per_fold = None if budget is None else budget / cfg.train.folds
    for fold, fold_dir in enumerate(fold_dirs):
        if (fold_dir / runs.MODEL).is_file():
            log.info("fold %d already trained, skipped", fold)
            continue
        fold_cfg = config_mod.replace(
            cfg,
            **{
                "train.fold": fold,
                "train.max_minutes": per_fold,
                "data.cache_dir": cfg.data.cache_dir or run_dir / CACHE,  # the folds share it
            },
        )
        train(fold_cfg, fold_dir, resume and (fold_dir / runs.LAST).is_file(), progress)
    _pool_cross_validation(run_dir, fold_dirs)
    return run_dir


def _given(cfg: Config | None) -> Config:
    """`cfg`; a new run (nothing to resume) without one is a user error."""
    if cfg is None:
        raise ConfigError("no configuration given: name a config file or a dataset folder")
    return cfg


def _check_names(cfg: Config) -> None:
    """Registry names are checked before anything is written."""
    from medseg.losses import loss_builder
    from medseg.models import model_builder

    model_builder(cfg.model.name)
    loss_builder(cfg.train.loss)


def _resume_config(run_dir: Path) -> Config:
    if not (run_dir / runs.LAST).is_file():
        raise TrainingError(f"{run_dir}: nothing to resume ({runs.LAST} not found)")
    return config_mod.load_config(run_dir / runs.CONFIG)


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool) -> Path:
    start = time.perf_counter()
    root = Path(cfg.data.root)  # type: ignore[arg-type]
    dataset = load_dataset(root) if resume else _checked_dataset(root, progress)
    split = kfold_split(
        [c.name for c in dataset.cases], cfg.train.folds, cfg.train.fold, cfg.train.split_seed
    )
    split = subset_training(split, cfg.train.train_cases, cfg.train.split_seed)
    if resume:
        _check_same_split(run_dir, split)
    by_name = {c.name: c for c in dataset.cases}
    train_cases = [by_name[n] for n in split.train]
    val_cases = [by_name[n] for n in split.val]
    log.info(
        "dataset %s: %d training, %d validation cases (fold %d of %d)",
        dataset.root,
        len(train_cases),
        len(val_cases),
        cfg.train.fold,
        cfg.train.folds,
    )
    plan = _plan(cfg, dataset, train_cases, run_dir, resume)
    cfg = config_mod.replace(cfg, **{"data.spacing": list(plan.spacing)})
    if not resume:
        _write_run_files(cfg, plan, split, run_dir)
    device = resolve_device(cfg.train.device)
    set_determinism(seed=cfg.train.seed)
    with unwrapped_errors():
        cache_dir = cfg.data.cache_dir or run_dir / CACHE
        trainer = _Trainer(cfg, plan, device, train_cases, val_cases, cache_dir)
        if resume:
            trainer.restore(runs.load_checkpoint(run_dir / runs.LAST))
        elif cfg.train.max_minutes is not None:
            validation = trainer.time_validation_pass()
            trainer.set_budget(_training_budget(cfg.train.max_minutes, start, validation))
        trainer.fit(run_dir, progress)
    _final_validation(run_dir, val_cases, device, progress)
    _record_session(run_dir, time.perf_counter() - start, device)
    return run_dir


def _record_session(run_dir: Path, seconds: float, device: torch.device) -> None:
    """Record this training session in run.json: add its wall time (data loading to final
    validation) and name the machine it ran on (timings mean little without it; a resumed run
    keeps the last session's)."""
    path = run_dir / runs.INFO
    info = json.loads(path.read_text())
    info["wall_seconds"] = round(info.get("wall_seconds", 0.0) + seconds, 1)
    info["machine"] = machine_description(device)
    runs.write_json(info, path)
    log.info("finished in %.1f min (wall time, this session)", seconds / 60)


def machine_description(device: torch.device) -> str:
    """What trained: the GPU's name on CUDA, else the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{_cpu_name()}, {torch.get_num_threads()} threads"


def _cpu_name() -> str:
    # platform.processor() is often empty on Linux; /proc/cpuinfo names the model there.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _checked_dataset(root: Path, progress: bool) -> datasets.Dataset:
    """The dataset, refused with its problems listed when it has any (as `medseg check`)."""
    from medseg.check import check_dataset

    dataset, problems = check_dataset(root, progress)
    if dataset is None:
        raise DatasetError(problems[0].message)
    if problems:
        listed = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DatasetError(
            f"{root}: {len(problems)} problem(s) found: {listed}{more}. "
            f"Run 'medseg check {root}' for the full list."
        )
    return dataset


def _plan(cfg: Config, dataset: Any, train_cases: list[Case], run_dir: Path, resume: bool) -> Plan:
    if resume:
        return runs.load_plan(run_dir / runs.PLAN)
    # Statistics come from the training cases only: validation cases stay unseen.
    return make_plan(dataclasses.replace(dataset, cases=tuple(train_cases)), cfg)


def _write_run_files(cfg: Config, plan: Plan, split: Split, run_dir: Path) -> None:
    config_mod.save_config(cfg, run_dir / runs.CONFIG)
    save_plan(plan, run_dir / runs.PLAN)
    runs.write_json({str(k): v for k, v in plan.labels.items()}, run_dir / runs.LABELS)
    info = {
        "medseg_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": str(Path(cfg.data.root).resolve()),  # type: ignore[arg-type]
        "fold": cfg.train.fold,
        "folds": cfg.train.folds,
        "train_cases": list(split.train),
        "val_cases": list(split.val),
        "validation_held_out": cfg.train.folds > 1,
    }
    runs.write_json(info, run_dir / runs.INFO)


@contextmanager
def _log_to(path: Path) -> Any:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("medseg")
    previous = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()
