"""Loss registry: a name in the config -> a MONAI loss on logits and integer labels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from medseg.config import ConfigError


def dice_ce() -> torch.nn.Module:
    """Soft Dice (foreground classes, batch-wise as in nnU-Net) plus cross-entropy, equal weight."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def dice_ce_case() -> torch.nn.Module:
    """As dice_ce, but Dice per patch, then averaged (the evaluation's per-case mean)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=False)


def dice() -> torch.nn.Module:
    """Soft Dice on the foreground classes only."""
    return DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


LOSSES: dict[str, Callable[[], torch.nn.Module]] = {
    "dice_ce": dice_ce,
    "dice_ce_case": dice_ce_case,
    "dice": dice,
}


def loss_builder(name: str) -> Callable[[], torch.nn.Module]:
    """The loss registered as `name`; unknown names list the valid ones."""
    if name not in LOSSES:
        raise ConfigError(f"train.loss {name!r} is unknown; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def build_loss(name: str, deep_supervision: int = 0, grid: str = "full") -> torch.nn.Module:
    """Build the loss named `name`; with deep supervision, for the network's list of outputs
    (`DeepSupervisionLoss`; `grid` is ``model.deep_supervision_grid``)."""
    loss = loss_builder(name)()
    return loss if deep_supervision == 0 else DeepSupervisionLoss(loss, grid == "full")


class DeepSupervisionLoss(torch.nn.Module):
    """`loss` over a deep-supervised network's outputs (full resolution first, then each lower
    decoder level at its own grid), weighted 1, 1/2, 1/4, ... and normalised to sum to 1.

    With `upsample_heads`, each head is upsampled (nearest) to the full-resolution grid, as
    MONAI's DynUNet does; otherwise the target is downsampled (nearest) to each head's grid, as
    nnU-Net does: with 118 classes a third to a half less time per training step
    (docs/planning.md). MONAI's own DeepSupervisionLoss does only the second, and takes no
    integer label maps.
    """

    def __init__(self, loss: torch.nn.Module, upsample_heads: bool = True) -> None:
        super().__init__()
        self.loss, self.upsample_heads = loss, upsample_heads

    def forward(self, outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(
            w * self.loss(*self._pair(out, target)) for w, out in zip(weights, outputs, strict=True)
        )
        return total / sum(weights)  # type: ignore[return-value]

    def _pair(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = target.shape[2:]
        if out.shape[2:] == grid:
            return out, target
        if self.upsample_heads:
            return F.interpolate(out, size=grid), target
        # integer tensors cannot be interpolated; label values are exact in float32
        small = F.interpolate(target.float(), size=out.shape[2:], mode="nearest-exact")
        return out, small.long()
