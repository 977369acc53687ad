"""Training: k-fold split, cached preprocessing, patch training, validation, checkpoints.

Reproducible and resumable: every epoch reseeds its sampler and augmentations from
``(seed, epoch)``, and ``last.pt`` (written atomically after each epoch) holds the model,
optimizer, scheduler, scaler, weight average (``train.ema``) and history, so a resumed run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.data.utils import set_rnd, worker_init_fn
from monai.utils import set_determinism
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, RandomSampler

from medseg import __version__, datasets, runs
from medseg import config as config_mod
from medseg.config import Config, ConfigError
from medseg.datasets import Case, DatasetError, load_dataset
from medseg.evaluation import confusion, dice
from medseg.inference import configured_window, resolve_device, sliding_window_probabilities
from medseg.io import atomic_path, image_suffix, is_image_file, strip_suffix
from medseg.losses import build_loss
from medseg.models import build_model, run_network
from medseg.preprocessing_plan import Plan, make_plan, save_plan
from medseg.transforms import (
    IMAGE,
    LABEL,
    plain_tensor,
    train_transforms,
    unwrapped_errors,
    val_transforms,
)

log = logging.getLogger(__name__)

GRAD_CLIP = 12.0
CROSSVAL = "crossval"
CACHE = "cache"
"""The disk cache's folder in a run (or ensemble) folder when ``data.cache_dir`` is null."""
FINAL_VALIDATION_OVERHEAD_S = 15.0  # loading the run, writing masks, computing HD95
MIN_TRAIN_SECONDS = 10.0  # a budget leaving less than this for training is refused
VALIDATION_MARGIN = 2.0
"""The final validation (original grids, files, HD95) takes longer than the in-loop pass timed
for the estimate: measured 1.0x on BraTS (240x240x155; 2.6x with earlier code), about 1.1-1.4x
on hippocampus, 1.6x on TotalSegmentator CT (118 classes); kept at 2 for safety."""
IN_LOOP_VALIDATION_SHARE = 0.1
"""Under a time budget, an in-loop validation pass estimated to cost more than this share of the
training budget is skipped (on BraTS-sized volumes one pass cost as much as all the training):
it only reports progress; the final validation scores the model either way."""
IN_LOOP_DICE = "val_pooled_dice"
"""Prefix of the in-loop validation columns: Dice of the voxel counts summed over the validation
cases on the resampled grid (cheap; the final validation's per-case mean on the original grids
is what `validation/metrics.json` reports)."""
WARM_UP_MATTERS_S = 10.0
"""A first validation pass shorter than this is repeated for the estimate: for small volumes the
one-off allocation costs of the first pass would dominate it."""


class TrainingError(ValueError):
    """Training cannot start as asked (a user error)."""


@dataclass(frozen=True)
class Split:
    """Case names used for training and for validation."""

    train: tuple[str, ...]
    val: tuple[str, ...]


def kfold_split(names: list[str], folds: int, fold: int, seed: int) -> Split:
    """Shuffle case names with `seed`, cut them into `folds` parts and hold out part `fold`.

    One fold means no held-out cases: every case trains and is also used for validation.
    """
    if folds == 1:
        log.warning("train.folds=1: validation runs on the training cases (not held out)")
        return Split(tuple(sorted(names)), tuple(sorted(names)))
    if len(names) < folds:
        raise TrainingError(
            f"{len(names)} cases cannot be split into {folds} folds; "
            f"set train.folds <= {len(names)}"
        )
    order = np.random.default_rng(seed).permutation(sorted(names))
    held = set(np.array_split(order, folds)[fold].tolist())
    return Split(
        tuple(n for n in sorted(names) if n not in held),
        tuple(n for n in sorted(names) if n in held),
    )


def subset_training(split: Split, count: int | None, seed: int) -> Split:
    """Keep `count` of the split's training cases, drawn with `seed` (nested: the first
    `count` of one shuffle), and all of its validation cases. None keeps every case."""
    if count is None:
        return split
    if count > len(split.train):
        raise TrainingError(
            f"train.train_cases={count}, but this fold has only {len(split.train)} training cases"
        )
    keep = set(np.random.default_rng(seed).permutation(list(split.train))[:count].tolist())
    return Split(tuple(n for n in split.train if n in keep), split.val)


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


def _pool_cross_validation(run_dir: Path, fold_dirs: list[Path]) -> None:
    """Score all folds' held-out predictions together and decide the ensemble post-processing."""
    from medseg.evaluation import evaluate_folders, write_results

    pooled = run_dir / CROSSVAL
    (pooled / "reference").mkdir(parents=True, exist_ok=True)
    for fold_dir in fold_dirs:
        validation = fold_dir / runs.VALIDATION
        references = _case_files(validation / "reference")
        predictions = _case_files(validation)
        _link_cases(pooled, predictions)
        _link_cases(pooled / "reference", {case: references[case] for case in predictions})
    labels = runs.load_plan(fold_dirs[0] / runs.PLAN).labels
    results = evaluate_folders(pooled, pooled / "reference", labels)
    write_results(results, pooled / "metrics.json")
    log.info(
        "cross-validation (%d cases): foreground mean Dice %.4f",
        len(results["cases"]),
        results["mean"]["foreground_mean"]["dice"],
    )
    _decide_postprocessing(pooled, labels, run_dir)


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
            trainer.set_budget(_training_budget(cfg.train.max_minutes, start, trainer))
        trainer.fit(run_dir, progress)
    _final_validation(run_dir, val_cases, device, progress)
    _record_session(run_dir, time.perf_counter() - start, device)
    return run_dir


def _check_same_split(run_dir: Path, split: Split) -> None:
    """A resumed run must keep its split: training on its validation cases would leak them."""
    info = json.loads((run_dir / runs.INFO).read_text())
    if tuple(info["train_cases"]) != split.train or tuple(info["val_cases"]) != split.val:
        raise TrainingError(
            f"{run_dir}: the dataset now splits into other training and validation cases than "
            "this run was started with (cases added or removed, or a run from a medseg version "
            "whose split followed train.seed); start a new run instead of resuming"
        )


def _training_budget(max_minutes: float, start: float, trainer: _Trainer) -> float:
    """Seconds left for training once loading is done and the final validation is reserved."""
    validation = trainer.time_validation_pass()
    reserve = FINAL_VALIDATION_OVERHEAD_S + VALIDATION_MARGIN * validation if validation else 0.0
    log.info(
        "final validation: %.1f min reserved (a validation pass timed at %.1f s)",
        reserve / 60,
        validation,
    )
    spent = time.perf_counter() - start
    budget = max_minutes * 60 - spent - reserve
    if budget < MIN_TRAIN_SECONDS:
        raise TrainingError(
            f"train.max_minutes={max_minutes:g} leaves no time to train: loading took "
            f"{spent / 60:.1f} min and the final validation needs about {reserve / 60:.1f} min"
        )
    return budget


def in_loop_validation_fits(cost: float | None, budget: float | None, elapsed: float) -> bool:
    """Whether an in-loop validation pass of `cost` seconds fits a training `budget` (seconds)
    of which `elapsed` are spent: at most `IN_LOOP_VALIDATION_SHARE` of the budget, and no more
    than is left of it. Without a budget, or before any pass was timed, it always fits."""
    if budget is None or cost is None:
        return True
    return cost <= IN_LOOP_VALIDATION_SHARE * budget and cost <= budget - elapsed


def resampled_voxels(case: Case, spacing: tuple[float | None, ...]) -> float:
    """Voxels of a case once resampled to `spacing` (RAS mm; an axis without a positive
    target keeps its own spacing), from its header."""
    from medseg.fingerprint import case_geometry

    geometry = case_geometry(case)
    sizes = [
        n * (s / t if t is not None and t > 0 else 1.0)
        for n, s, t in zip(geometry.shape, geometry.spacing, spacing, strict=True)
    ]
    return float(np.prod(sizes))


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


def _items(cases: list[Case]) -> list[dict[str, Any]]:
    return [{IMAGE: list(c.images), LABEL: c.label, "name": c.name} for c in cases]


class _Trainer:
    """Holds the state of one training run; `fit` runs the epochs."""

    def __init__(
        self,
        cfg: Config,
        plan: Plan,
        device: torch.device,
        train_cases: list[Case],
        val_cases: list[Case],
        cache_dir: Path | None = None,
    ) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        torch.manual_seed(cfg.train.seed)
        self.net = build_model(cfg.model, len(plan.channels), len(plan.labels)).to(device)
        self.loss_fn = build_loss(
            cfg.train.loss, cfg.model.deep_supervision, cfg.model.deep_supervision_grid
        )
        self.optimizer = _optimizer(cfg, self.net)
        self.ema = _moving_average(self.net, cfg.train.ema)
        self.steps_per_epoch = cfg.train.iterations_per_epoch or max(
            1, math.ceil(len(train_cases) / cfg.train.batch_size)
        )
        self.clock = _Clock()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _lr_lambda(
                cfg,
                self.steps_per_epoch * cfg.train.epochs,
                self.steps_per_epoch * cfg.train.warmup_epochs,
                self.clock,
            ),
        )
        self.amp = cfg.train.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        fixed, random = train_transforms(cfg, plan)
        self.random = random
        cache = cache_dir or Path(CACHE)
        self.train_ds = _cached(_items(train_cases), fixed, cfg.data, plan, cache)
        self.val_ds = _cached(_items(val_cases), val_transforms(plan), cfg.data, plan, cache)
        self.val_voxels = [resampled_voxels(case, plan.spacing) for case in val_cases]
        self.val_names = [case.name for case in val_cases]
        self.start_epoch, self.history = 0, []
        self.validation_seconds: float | None = None
        """Estimated wall time of one in-loop validation pass (None: not timed yet)."""
        self.skip_logged = False

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a ``last.pt`` checkpoint."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = int(state["epoch"]) + 1
        self.history = list(state["history"])
        self.clock.restore(state.get("clock", {}))
        log.info("resuming after epoch %d", self.start_epoch)

    def set_budget(self, seconds: float) -> None:
        """Fit the learning-rate schedule to `seconds` of training wall time."""
        self.clock.budget = seconds
        log.info(
            "time budget: %.1f min of training; the learning rate decays with elapsed time",
            seconds / 60,
        )

    def time_validation_pass(self) -> float:
        """Estimated wall time of an in-loop validation pass: the largest validation case (by
        resampled voxels, from the headers) timed, scaled by the voxels of all of them. Kept as
        `validation_seconds`, which decides whether in-loop passes fit a budget."""
        if not self.val_voxels:
            return 0.0
        largest = int(np.argmax(self.val_voxels))
        seconds = self._time_validation(largest)  # includes one-off allocation costs
        if seconds < WARM_UP_MATTERS_S:  # small cases: those costs dominate; time a second pass
            seconds = self._time_validation(largest)
        self.validation_seconds = seconds * sum(self.val_voxels) / self.val_voxels[largest]
        log.info(
            "validation: the largest of %d cases (%s) took %.1f s",
            len(self.val_voxels),
            self.val_names[largest],
            seconds,
        )
        return self.validation_seconds

    def _time_validation(self, index: int) -> float:
        start = time.perf_counter()
        self._validate([index])
        return time.perf_counter() - start

    def fit(self, run_dir: Path, progress: bool) -> None:
        """Run the remaining epochs (or until the time budget is spent), then save model.pt."""
        epochs = self.cfg.train.epochs
        total = self.clock.budget or (epochs - self.start_epoch) * self.steps_per_epoch
        self.clock.start()
        with _progress_bar(progress, total, self.clock) as bar:
            for epoch in range(self.start_epoch, epochs):
                start = time.perf_counter()
                loss = self._train_epoch(epoch, bar)
                spent = self.clock.done()
                last = epoch == epochs - 1 or spent
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "train_loss": loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                # When the budget is spent the final validation follows at once with the same
                # weights; validating here too would run past the budget.
                due = (epoch + 1) % self.cfg.train.val_every == 0 or last
                if due and not spent and self._validation_affordable(epoch):
                    validation_start = time.perf_counter()
                    row.update(self._validate())
                    self.validation_seconds = time.perf_counter() - validation_start
                row["seconds"] = time.perf_counter() - start
                row["elapsed_minutes"] = self.clock.elapsed() / 60
                self.history.append(row)
                self._checkpoint(run_dir, epoch)
                _write_metrics(self.history, run_dir)
                log.info("epoch %d/%d: %s", epoch + 1, epochs, _describe(row))
                if last:
                    break
        runs.save_checkpoint(
            {"model": self.weights().state_dict(), "epoch": self.history[-1]["epoch"]},
            run_dir / runs.MODEL,
        )

    def _validation_affordable(self, epoch: int) -> bool:
        """Whether an in-loop validation pass fits the time budget; logs the first skip."""
        budget, cost = self.clock.budget, self.validation_seconds
        if in_loop_validation_fits(cost, budget, self.clock.elapsed()):
            return True
        if not self.skip_logged:
            log.info(
                "in-loop validation skipped from epoch %d: one pass takes about %.0f s, over %d%% "
                "of the %.1f-min training budget or more than is left of it (the final "
                "validation still scores the model)",
                epoch + 1,
                cost,
                round(100 * IN_LOOP_VALIDATION_SHARE),
                budget / 60,
            )
            self.skip_logged = True
        return False

    def _train_epoch(self, epoch: int, bar: Any) -> float:
        seed = self.cfg.train.seed * 100_003 + epoch
        set_rnd(self.random, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        n = self.steps_per_epoch * self.cfg.train.batch_size
        sampler = RandomSampler(
            self.train_ds, replacement=n > len(self.train_ds), num_samples=n, generator=generator
        )
        loader = DataLoader(
            _Augmented(self.train_ds, self.random),
            batch_size=self.cfg.train.batch_size,
            sampler=sampler,
            num_workers=self.cfg.train.num_workers,
            worker_init_fn=worker_init_fn,
            generator=generator,
            drop_last=False,
        )
        self.net.train()
        losses = []
        for batch in loader:
            losses.append(self._step(batch))
            if bar is not None:
                bar.advance(losses[-1])
            if self.clock.done():
                log.info("time budget reached after %d steps of epoch %d", len(losses), epoch + 1)
                break
        return float(np.mean(losses))

    def _step(self, batch: dict[str, Any]) -> float:
        x = batch[IMAGE].to(self.device)
        y = batch[LABEL].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss = self.loss_fn(run_network(self.net, x), y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        return float(loss.detach())

    def weights(self) -> torch.nn.Module:
        """The network that is validated and saved: the moving average if `train.ema` is on."""
        return self.net if self.ema is None else self.ema.module

    def _validate(self, indices: list[int] | None = None) -> dict[str, float]:
        """Per-label Dice pooled over the validation cases (or those at `indices`): voxel counts
        summed over cases, in the preprocessed (resampled) space. Not the per-case mean on the
        original grids that the final validation reports; named ``val_pooled_dice_*``."""
        self.weights().eval()
        labels = {v: n for v, n in self.plan.labels.items() if v != 0}
        counts = {v: np.zeros(3, np.int64) for v in labels}
        window = configured_window(self.cfg)
        for index in range(len(self.val_ds)) if indices is None else indices:
            item = self.val_ds[index]
            probs = sliding_window_probabilities(self._predictor, item[IMAGE], window, self.device)
            pred = torch.argmax(probs, 0).numpy()
            ref = np.asarray(item[LABEL][0]).astype(np.int64)
            for v in labels:
                counts[v] += confusion(ref, pred, v)
        scores = {f"{IN_LOOP_DICE}_{name}": dice(*counts[v]) for v, name in labels.items()}
        scores[f"{IN_LOOP_DICE}_mean"] = float(np.nanmean(list(scores.values())))
        return scores

    def _predictor(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=self.amp):
            return run_network(self.weights(), x)

    def _checkpoint(self, run_dir: Path, epoch: int) -> None:
        runs.save_checkpoint(
            {
                "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                **({} if self.ema is None else {"ema": self.ema.state_dict()}),
                "epoch": epoch,
                "history": self.history,
                "clock": self.clock.state(),
            },
            run_dir / runs.LAST,
        )


class _Augmented(torch.utils.data.Dataset):
    """Applies the random part of the pipeline to cached, preprocessed items."""

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = self.transform(self.base[index])
        out = out[0] if isinstance(out, list) else out
        # Plain tensors: a MetaTensor batch routes every network op through MONAI's metadata
        # tracking (21.6 instead of 18.2 s per hippocampus epoch on 2 cores, docs/recipe.md).
        return {IMAGE: plain_tensor(out[IMAGE]), LABEL: plain_tensor(out[LABEL]).long()}


def _cached(
    items: list[dict[str, Any]],
    transform: Any,
    data: config_mod.DataConfig,
    plan: Plan,
    cache_dir: Path,
) -> Any:
    """The items through the deterministic `transform`, kept where ``data.cache`` says: in
    memory, on disk in `transforms.cache_folder` (read back with ``weights_only``: tensors and
    plain data; MetaTensors are stored as plain tensors, which the random part and validation
    take), or nowhere (preprocessed again at every use)."""
    if data.cache == "memory":
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=None, progress=False)
    if data.cache == "disk":
        from monai.data import PersistentDataset

        from medseg.transforms import cache_folder, cache_key

        folder = cache_folder(cache_dir, plan)
        log.info("disk cache of the preprocessed cases: %s", folder)
        return PersistentDataset(items, transform, folder, hash_func=cache_key, weights_only=True)
    return Dataset(items, transform)


def _moving_average(net: torch.nn.Module, decay: float) -> AveragedModel | None:
    """torch's exponential moving average of `net`'s weights, or None when `decay` is 0."""
    if decay == 0:
        return None
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _optimizer(cfg: Config, net: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(
            net.parameters(),
            lr=cfg.train.lr,
            momentum=0.99,
            nesterov=True,
            weight_decay=cfg.train.weight_decay,
        )
    return torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


class _Clock:
    """Training wall time, summed over resumed sessions, against an optional budget."""

    def __init__(self) -> None:
        self.budget: float | None = None
        self.previous = 0.0
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.previous + running

    def fraction(self) -> float:
        """Share of the budget spent (0 without a budget)."""
        return min(1.0, self.elapsed() / self.budget) if self.budget else 0.0

    def done(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget

    def state(self) -> dict[str, float | None]:
        return {"budget": self.budget, "elapsed": self.elapsed()}

    def restore(self, state: dict[str, float | None]) -> None:
        self.budget = state.get("budget")
        self.previous = float(state.get("elapsed") or 0.0)


def _lr_lambda(cfg: Config, total: int, warmup: int, clock: _Clock) -> Any:
    """Warm-up, then cosine/poly decay over steps or elapsed budget, whichever is further."""
    schedule = cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = max(min(1.0, (step - warmup) / max(1, total - warmup)), clock.fraction())
        if schedule == "poly":
            return (1 - t) ** 0.9
        return 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _write_metrics(history: list[dict[str, Any]], run_dir: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_path(run_dir / runs.METRICS) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    _plot_curve(history, run_dir / runs.CURVE)


def _plot_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [r["epoch"] + 1 for r in history]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [(r["epoch"] + 1, _in_loop_dice(r)) for r in history if _in_loop_dice(r) is not None]
    if val:
        ax2 = ax.twinx()
        label = "validation Dice, pooled over cases (resampled grid)"
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label=label)
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("medseg training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _in_loop_dice(row: dict[str, Any]) -> float | None:
    """A history row's in-loop validation Dice (``val_dice_mean`` in runs before the rename)."""
    value = row.get(f"{IN_LOOP_DICE}_mean", row.get("val_dice_mean"))
    return None if value in (None, "") else float(value)


def _describe(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items()
        if k != "epoch"
    )


def _final_validation(
    run_dir: Path, val_cases: list[Case], device: torch.device, progress: bool
) -> None:
    """Predict the held-out cases with the final weights on their original grids, score them,
    and decide the post-processing on them."""
    from medseg.evaluation import evaluate_folders, write_results
    from medseg.predict import PredictOptions, predict_cases

    run = runs.load_run(run_dir, device)
    out = run_dir / runs.VALIDATION
    # raw predictions: post-processing is decided on them (and scored both ways) below
    options = PredictOptions(overwrite=True, formats=("nifti",), postprocess=False)
    predict_cases(run, [(c.name, list(c.images)) for c in val_cases], out, options, progress)
    ref_dir = out / "reference"
    _link_cases(ref_dir, {c.name: Path(c.label) for c in val_cases})  # type: ignore[arg-type]
    results = evaluate_folders(out, ref_dir, run.plan.labels)
    write_results(results, out / "metrics.json")
    _decide_postprocessing(out, run.plan.labels, run_dir)
    means = results["mean"]
    log.info(
        "final validation (original grids, %d cases): %s; foreground mean Dice %.4f",
        len(val_cases),
        {k: v["dice"] for k, v in means["labels"].items()},
        means["foreground_mean"]["dice"],
    )


def _decide_postprocessing(pred_dir: Path, labels: dict[int, str], run_dir: Path) -> None:
    """Keep-largest-component per label, only where it raises that label's mean validation Dice.

    nnU-Net's rule; the decision and the Dice with and without it go to ``postprocessing.json``,
    which `medseg predict` applies.
    """
    from medseg.io import load_labels
    from medseg.postprocessing import keep_largest_component

    foreground = {v: n for v, n in labels.items() if v != 0}
    raw: dict[int, list[float]] = {v: [] for v in foreground}
    kept: dict[int, list[float]] = {v: [] for v in foreground}
    references = _case_files(pred_dir / "reference")
    for case, pred_path in sorted(_case_files(pred_dir).items()):
        pred = load_labels(pred_path).array
        ref = load_labels(references[case]).array
        for v in foreground:
            raw[v].append(dice(*confusion(ref, pred, v)))
            kept[v].append(dice(*confusion(ref, keep_largest_component(pred, [v]), v)))
    decision: dict[str, Any] = {"largest_component": [], "validation_dice": {}}
    for v, name in foreground.items():
        before, after = float(np.nanmean(raw[v])), float(np.nanmean(kept[v]))
        if after > before:
            decision["largest_component"].append(v)
        decision["validation_dice"][name] = {"raw": before, "largest_component": after}
    runs.write_json(decision, run_dir / runs.POSTPROCESSING)
    log.info(
        "post-processing: keep the largest component of %s",
        [foreground[v] for v in decision["largest_component"]] or "no label",
    )


def _case_files(folder: Path) -> dict[str, Path]:
    """Case name -> label-map file of a folder, whatever each file's image format."""
    return {strip_suffix(p.name): p for p in sorted(folder.iterdir()) if is_image_file(p)}


def _link_cases(folder: Path, files: dict[str, Path]) -> None:
    """Symlink ``folder/CASE<suffix>`` to each file, keeping its own suffix (a reference may be
    .nrrd or .mha: the link is read by its name), replacing what an earlier run left there for
    that case (a link, or a copy of one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case, target in files.items():
        for old in folder.iterdir():
            if strip_suffix(old.name) == case and (old.is_symlink() or old.is_file()):
                old.unlink()
        (folder / f"{case}{image_suffix(target.name)}").symlink_to(target.resolve())


class _Bar:
    """Steps done, or seconds of the budget spent when training against a clock."""

    def __init__(self, progress: Any, task: Any, clock: _Clock) -> None:
        self.progress, self.task, self.clock = progress, task, clock

    def advance(self, loss: float) -> None:
        if self.clock.budget:
            spent = min(self.clock.elapsed(), self.clock.budget)  # the last step may overrun
            self.progress.update(self.task, completed=spent, loss=f"{loss:.4f}")
        else:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")


@contextmanager
def _progress_bar(enabled: bool, total: float, clock: _Clock) -> Any:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, progress.add_task("train", total=total, loss="-"), clock)


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
