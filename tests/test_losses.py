"""medseg.losses: the registry and the deep-supervision loss (heads upsampled, or targets
downsampled)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet

from medseg.config import ConfigError, ModelConfig
from medseg.losses import build_loss
from medseg.models import build_model, swap_instance_norms


def _blocky_labels(shape: tuple[int, ...], classes: int, block: int = 2) -> torch.Tensor:
    """Labels constant on blocks of `block` voxels per axis, so nearest-neighbour downsampling
    by up to `block` is exact."""
    coarse = torch.randint(0, classes, (2, 1, *(s // block for s in shape)), generator=_seeded())
    for axis in (2, 3, 4):
        coarse = coarse.repeat_interleave(block, axis)
    return coarse


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_per_patch_dice_averages_the_patches_and_batch_dice_pools_them() -> None:
    y = _blocky_labels((8, 8, 8), 3)
    y[1][y[1] == 2] = 0  # label 2 only in the first patch: the two Dice kinds then differ
    logits = torch.randn(2, 3, 8, 8, 8, generator=_seeded())
    per_patch = build_loss("dice_ce_case")
    separately = (per_patch(logits[:1], y[:1]) + per_patch(logits[1:], y[1:])) / 2
    torch.testing.assert_close(per_patch(logits, y), separately)
    assert abs(float(build_loss("dice_ce")(logits, y) - separately)) > 1e-3


def test_deep_supervision_loss_on_the_heads_grid_downsamples_the_target() -> None:
    y = _blocky_labels((8, 8, 8), 3)
    full = torch.randn(2, 3, 8, 8, 8, generator=_seeded())
    half = torch.randn(2, 3, 4, 4, 4, generator=_seeded())
    plain = build_loss("dice_ce")
    expected = (plain(full, y) + 0.5 * plain(half, y[..., ::2, ::2, ::2])) / 1.5
    torch.testing.assert_close(build_loss("dice_ce", 1, "heads")([full, half], y), expected)


def test_deep_supervision_loss_on_the_full_grid_upsamples_the_heads() -> None:
    y = _blocky_labels((8, 8, 8), 3)
    full = torch.randn(2, 3, 8, 8, 8, generator=_seeded())
    half = torch.randn(2, 3, 4, 4, 4, generator=_seeded())
    plain = build_loss("dice_ce")
    big = half.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    expected = (plain(full, y) + 0.5 * plain(big, y)) / 1.5
    torch.testing.assert_close(build_loss("dice_ce", 1)([full, half], y), expected)


def test_full_grid_loss_is_dynunets_deep_supervision_exactly() -> None:
    """medseg's U-Net + full-grid loss computes what MONAI's DynUNet (heads upsampled in its
    forward pass) + a per-head loss computed, gradients included: older runs stay reproducible."""
    cfg = ModelConfig(filters=(4, 8, 16, 32), patch_size=(16, 16, 16), deep_supervision=2)
    torch.manual_seed(0)
    ours = build_model(cfg, 1, 3).train()
    theirs = _dynunet(cfg).to(memory_format=torch.channels_last_3d).train()  # as built
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, 16, 16, 16, generator=_seeded())
    y = _blocky_labels((16, 16, 16), 3)
    plain = build_loss("dice_ce")
    stacked = theirs(x)
    heads = zip((1, 0.5, 0.25), stacked.unbind(1), strict=True)
    ref = sum(w * plain(h, y) for w, h in heads) / 1.75
    loss = build_loss("dice_ce", 2)(ours(x), y)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    ref.backward()
    loss.backward()
    grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-6, atol=1e-7)


def _dynunet(cfg: ModelConfig) -> torch.nn.Module:
    return swap_instance_norms(
        DynUNet(
            3,
            1,
            3,
            [[3] * 3] * 4,
            [[1] * 3, [2] * 3, [2] * 3, [2] * 3],
            [[2] * 3] * 3,
            filters=list(cfg.filters),
            norm_name=("instance", {"affine": True}),
            deep_supervision=True,
            deep_supr_num=2,
        )
    )


def test_perfect_heads_at_every_resolution_give_near_zero_loss() -> None:
    y = _blocky_labels((16, 16, 8), 4, block=4)

    def logits(labels: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
        return 30.0 * onehot

    heads = [logits(y), logits(y[..., ::2, ::2, ::2]), logits(y[..., ::4, ::4, ::4])]
    assert float(build_loss("dice_ce", 2, "heads")(heads, y)) < 1e-3
    wrong = [heads[0], heads[1], logits((y[..., ::4, ::4, ::4] + 1) % 4)]
    assert float(build_loss("dice_ce", 2, "heads")(wrong, y)) > 0.1  # the lowest head counts


def test_without_deep_supervision_the_loss_takes_one_tensor() -> None:
    y = _blocky_labels((8, 8, 8), 2)
    x = torch.randn(2, 2, 8, 8, 8, generator=_seeded())
    assert build_loss("dice", 0)(x, y).shape == ()


def test_unknown_loss_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="dice_ce"):
        build_loss("focal")
