"""Training: k-fold split, cached preprocessing, patch training, validation, checkpoints.

Reproducible and resumable: every epoch reseeds its sampler and augmentations from
``(seed, epoch)``, and ``last.pt`` (written atomically after each epoch) holds the model,
optimizer, scheduler, scaler, weight average (``train.ema``) and history, so a resumed run
continues exactly as an uninterrupted one would.

Modules, each importing only those listed before it:

- ``errors``: `TrainingError`, training that cannot start as asked (a user error).
- ``splits``: `kfold_split`, `subset_training` and the resume check that a run keeps its split.
- ``budget``: the training clock, the learning-rate schedule that follows it, the time budget
  (`in_loop_validation_fits`, `resampled_voxels`) and its constants (``MIN_TRAIN_SECONDS``,
  ``VALIDATION_MARGIN``, ``IN_LOOP_VALIDATION_SHARE``, ...); patch them there, not here.
- ``progress``: the progress bar, the per-epoch log line, ``metrics.csv`` and its curve.
- ``trainer``: `_Trainer` (the epochs, in-loop validation, checkpoints) and its cached data.
- ``validation``: the final validation on the original grids, the post-processing decision,
  the cross-validation pooled over folds.
- ``session``: `train` and `train_folds`, from a configuration to a filled run folder.
"""

from __future__ import annotations

from medseg.training.budget import in_loop_validation_fits, resampled_voxels
from medseg.training.errors import TrainingError
from medseg.training.progress import IN_LOOP_DICE
from medseg.training.session import machine_description, train, train_folds
from medseg.training.splits import Split, kfold_split, subset_training
from medseg.training.trainer import CACHE
from medseg.training.validation import CROSSVAL

__all__ = [
    "CACHE",
    "CROSSVAL",
    "IN_LOOP_DICE",
    "Split",
    "TrainingError",
    "in_loop_validation_fits",
    "kfold_split",
    "machine_description",
    "resampled_voxels",
    "subset_training",
    "train",
    "train_folds",
]
