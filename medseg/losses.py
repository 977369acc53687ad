"""Loss registry: a name in the config -> a MONAI loss on logits and integer labels."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DiceCELoss, DiceLoss

from medseg.config import ConfigError


def dice_ce() -> torch.nn.Module:
    """Soft Dice (foreground classes, batch-wise as in nnU-Net) plus cross-entropy, equal weight."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def dice() -> torch.nn.Module:
    """Soft Dice on the foreground classes only."""
    return DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


LOSSES: dict[str, Callable[[], torch.nn.Module]] = {"dice_ce": dice_ce, "dice": dice}


def loss_builder(name: str) -> Callable[[], torch.nn.Module]:
    """The loss registered as `name`; unknown names list the valid ones."""
    if name not in LOSSES:
        raise ConfigError(f"train.loss {name!r} is unknown; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def build_loss(name: str) -> torch.nn.Module:
    """Build the loss named `name`."""
    return loss_builder(name)()
