"""One run's training state and loop (`_Trainer`: network, optimizer, schedule, weight average,
epochs, in-loop validation, checkpoints) and its data: cached preprocessing, then the random
augmentations per epoch.

Every epoch reseeds its sampler and augmentations from ``(seed, epoch)`` and ``last.pt`` holds
all the state, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.data.utils import set_rnd, worker_init_fn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, RandomSampler

from medseg import config as config_mod
from medseg import runs
from medseg.config import Config
from medseg.datasets import Case
from medseg.evaluation import confusion, dice
from medseg.inference import configured_window, sliding_window_probabilities
from medseg.losses import build_loss
from medseg.models import build_model, run_network
from medseg.preprocessing_plan import Plan
from medseg.training.budget import (
    IN_LOOP_VALIDATION_SHARE,
    WARM_UP_MATTERS_S,
    _Clock,
    _lr_lambda,
    in_loop_validation_fits,
    resampled_voxels,
)
from medseg.training.progress import IN_LOOP_DICE, _describe, _progress_bar, _write_metrics
from medseg.transforms import IMAGE, LABEL, plain_tensor, train_transforms, val_transforms

log = logging.getLogger(__name__)

GRAD_CLIP = 12.0
CACHE = "cache"
"""The disk cache's folder in a run (or ensemble) folder when ``data.cache_dir`` is null."""


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
        self.val_voxels = [resampled_voxels(case, plan.target_spacing) for case in val_cases]
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


def _items(cases: list[Case]) -> list[dict[str, Any]]:
    return [{IMAGE: list(c.images), LABEL: c.label, "name": c.name} for c in cases]


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
