"""Training: k-fold split, cached preprocessing, patch training, validation, checkpoints.

Reproducible and resumable: every epoch reseeds its sampler and augmentations from
``(seed, epoch)``, and ``last.pt`` (written atomically after each epoch) holds the model,
optimizer, scheduler, scaler and history, so a resumed run continues exactly as an
uninterrupted one would.
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
from torch.utils.data import DataLoader, RandomSampler

from medseg import __version__, runs
from medseg import config as config_mod
from medseg.config import Config, ConfigError
from medseg.datasets import Case, DatasetError, load_dataset
from medseg.evaluation import confusion, dice
from medseg.inference import Window, resolve_device, sliding_window_probabilities
from medseg.io import atomic_path
from medseg.losses import build_loss
from medseg.models import build_model
from medseg.planning import Plan, make_plan, save_plan
from medseg.transforms import IMAGE, LABEL, train_transforms, unwrapped_errors, val_transforms

log = logging.getLogger(__name__)

GRAD_CLIP = 12.0


class TrainingError(ValueError):
    """Training cannot start as asked (a user error)."""


@dataclass(frozen=True)
class Split:
    """Case names used for training and for validation."""

    train: tuple[str, ...]
    val: tuple[str, ...]


def kfold_split(names: list[str], folds: int, fold: int, seed: int) -> Split:
    """Shuffle case names with `seed`, cut them into `folds` parts and hold out part `fold`."""
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


def train(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = False) -> Path:
    """Train a model and fill `run_dir` with everything `medseg predict` needs.

    Args:
        cfg: the configuration (``data.root`` must name a dataset folder). Ignored when
            resuming: the run folder's stored configuration is used.
        run_dir: the run folder; created, or continued with `resume`.
        resume: continue the run in `run_dir` from its ``last.pt``.
        progress: show a progress bar with loss and ETA.

    Returns:
        The run folder.
    """
    run_dir = Path(run_dir)
    if resume:
        cfg = _resume_config(run_dir)
    elif (run_dir / runs.LAST).exists():
        raise TrainingError(
            f"{run_dir}: already holds a run; pass --resume to continue it "
            "or choose another --run-dir"
        )
    _check_names(cfg)
    if cfg.data.root is None:
        raise ConfigError(
            "data.root is not set: name the dataset folder in the config or as data.root=PATH"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with _log_to(run_dir / runs.LOG):
        return _train(cfg, run_dir, resume, progress)


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
    dataset = load_dataset(cfg.data.root)  # type: ignore[arg-type]
    if not resume:
        _check(dataset, progress)
    split = kfold_split(
        [c.name for c in dataset.cases], cfg.train.folds, cfg.train.fold, cfg.train.seed
    )
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
        trainer = _Trainer(cfg, plan, device, train_cases, val_cases)
        if resume:
            trainer.restore(runs.load_checkpoint(run_dir / runs.LAST))
        trainer.fit(run_dir, progress)
    _final_validation(run_dir, val_cases, device, progress)
    _record_wall_time(run_dir, time.perf_counter() - start)
    return run_dir


def _record_wall_time(run_dir: Path, seconds: float) -> None:
    """Add this session's wall time (data loading to final validation) to run.json."""
    path = run_dir / runs.INFO
    info = json.loads(path.read_text())
    info["wall_seconds"] = round(info.get("wall_seconds", 0.0) + seconds, 1)
    runs.write_json(info, path)
    log.info("finished in %.1f min (wall time, this session)", seconds / 60)


def _check(dataset: Any, progress: bool) -> None:
    """Refuse to train on a dataset with problems; list them (as `medseg check` does)."""
    from medseg.check import check_cases

    problems = check_cases(dataset, dataset.cases, progress)
    if problems:
        listed = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DatasetError(
            f"{dataset.root}: {len(problems)} problem(s) found: {listed}{more}. "
            f"Run 'medseg check {dataset.root}' for the full list."
        )


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
    ) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        self.channels_last = cfg.model.spatial_dims == 3
        torch.manual_seed(cfg.train.seed)
        net = build_model(cfg.model, len(plan.channels), len(plan.labels))
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        self.net = net.to(device)
        self.loss_fn = build_loss(cfg.train.loss)
        self.optimizer = _optimizer(cfg, self.net)
        self.steps_per_epoch = cfg.train.iterations_per_epoch or max(
            1, math.ceil(len(train_cases) / cfg.train.batch_size)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _lr_lambda(
                cfg,
                self.steps_per_epoch * cfg.train.epochs,
                self.steps_per_epoch * cfg.train.warmup_epochs,
            ),
        )
        self.amp = cfg.train.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        fixed, random = train_transforms(cfg, plan)
        self.random = random
        self.train_ds = _cached(_items(train_cases), fixed, cfg.data.cache)
        self.val_ds = _cached(_items(val_cases), val_transforms(plan), cfg.data.cache)
        self.start_epoch, self.history = 0, []
        self.best = {"dice": -1.0, "epoch": -1}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a ``last.pt`` checkpoint."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.history = list(state["history"])
        self.best = dict(state["best"])
        log.info("resuming after epoch %d", self.start_epoch)

    def fit(self, run_dir: Path, progress: bool) -> None:
        """Run the remaining epochs, validating and checkpointing as configured."""
        epochs = self.cfg.train.epochs
        with _progress_bar(progress, (epochs - self.start_epoch) * self.steps_per_epoch) as bar:
            for epoch in range(self.start_epoch, epochs):
                start = time.perf_counter()
                loss = self._train_epoch(epoch, bar)
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "train_loss": loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                if (epoch + 1) % self.cfg.train.val_every == 0 or epoch == epochs - 1:
                    row.update(self._validate())
                row["seconds"] = time.perf_counter() - start
                self.history.append(row)
                self._checkpoint(run_dir, epoch, row)
                _write_metrics(self.history, run_dir)
                log.info("epoch %d/%d: %s", epoch + 1, epochs, _describe(row))

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
        return float(np.mean(losses))

    def _step(self, batch: dict[str, Any]) -> float:
        memory = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        x = torch.as_tensor(batch[IMAGE]).to(self.device).contiguous(memory_format=memory)
        y = torch.as_tensor(batch[LABEL]).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss = self.loss_fn(self.net(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def _validate(self) -> dict[str, float]:
        """Per-label Dice on the validation cases, in the preprocessed (resampled) space."""
        self.net.eval()
        labels = {v: n for v, n in self.plan.labels.items() if v != 0}
        counts = {v: np.zeros(3, np.int64) for v in labels}
        for item in self.val_ds:
            window = Window(
                self.cfg.model.patch_size, self.cfg.infer.overlap, self.cfg.infer.sw_batch_size
            )
            probs = sliding_window_probabilities(self._predictor, item[IMAGE], window, self.device)
            pred = torch.argmax(probs, 0).numpy()
            ref = np.asarray(item[LABEL][0]).astype(np.int64)
            for v in labels:
                counts[v] += confusion(ref, pred, v)
        scores = {f"val_dice_{name}": dice(*counts[v]) for v, name in labels.items()}
        scores["val_dice_mean"] = float(np.nanmean(list(scores.values())))
        return scores

    def _predictor(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, enabled=self.amp):
            return self.net(x)

    def _checkpoint(self, run_dir: Path, epoch: int, row: dict[str, Any]) -> None:
        model_state = self.net.state_dict()
        score = row.get("val_dice_mean")
        if score is not None and not math.isnan(score) and score > self.best["dice"]:
            self.best = {"dice": float(score), "epoch": epoch}
            runs.save_checkpoint(
                {"model": model_state, "epoch": epoch, "val_dice_mean": score}, run_dir / runs.BEST
            )
        runs.save_checkpoint(
            {
                "model": model_state,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch,
                "history": self.history,
                "best": self.best,
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
        return {IMAGE: torch.as_tensor(out[IMAGE]), LABEL: torch.as_tensor(out[LABEL]).long()}


def _cached(items: list[dict[str, Any]], transform: Any, cache: bool) -> Any:
    if cache:
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=None, progress=False)
    return Dataset(items, transform)


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


def _lr_lambda(cfg: Config, total: int, warmup: int) -> Any:
    schedule = cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
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
    val = [(r["epoch"] + 1, r["val_dice_mean"]) for r in history if "val_dice_mean" in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation Dice (mean)")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("medseg training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _describe(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items()
        if k != "epoch"
    )


def _final_validation(
    run_dir: Path, val_cases: list[Case], device: torch.device, progress: bool
) -> None:
    """Predict the held-out cases with the best weights on their original grids and score them."""
    from medseg.evaluation import evaluate_folders, write_results
    from medseg.predict import PredictOptions, predict_cases

    run = runs.load_run(run_dir, device)
    out = run_dir / runs.VALIDATION
    options = PredictOptions(overwrite=True, formats=("nifti",))
    predict_cases(run, [(c.name, list(c.images)) for c in val_cases], out, options, progress)
    ref_dir = out / "reference"
    ref_dir.mkdir(exist_ok=True)
    for case in val_cases:
        link = ref_dir / f"{case.name}.nii.gz"
        link.unlink(missing_ok=True)
        link.symlink_to(Path(case.label).resolve())  # type: ignore[arg-type]
    results = evaluate_folders(out, ref_dir, run.plan.labels)
    write_results(results, out / "metrics.json")
    means = results["mean"]
    log.info(
        "final validation (original grids, %d cases): %s; foreground mean Dice %.4f",
        len(val_cases),
        {k: v["dice"] for k, v in means["labels"].items()},
        means["foreground_mean"]["dice"],
    )


class _Bar:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Any:
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
        yield _Bar(progress, progress.add_task("train", total=total, loss="-"))


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
