"""Network registry and the channels-last instance norm (medseg.models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets import DynUNet

from medseg.config import ConfigError, ModelConfig
from medseg.models import (
    ChannelsLastInstanceNorm3d,
    build_model,
    run_network,
    swap_instance_norms,
)


def _pair(channels: int) -> tuple[torch.nn.InstanceNorm3d, ChannelsLastInstanceNorm3d]:
    torch.manual_seed(0)
    reference = torch.nn.InstanceNorm3d(channels, affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    swapped = ChannelsLastInstanceNorm3d(channels, affine=True)
    swapped.load_state_dict(reference.state_dict())
    return reference, swapped


@pytest.mark.parametrize("batch", [1, 3])
def test_channels_last_instance_norm_matches_torch_in_training(batch: int) -> None:
    reference, swapped = _pair(4)
    x = torch.randn(batch, 4, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d) * 3 + 1
    grad = torch.randn(batch, 4, 5, 6, 7)
    outputs, grads = [], []
    for norm in (reference, swapped):
        xi = x.detach().clone().requires_grad_(True)
        out = norm.train()(xi)
        out.backward(grad)
        outputs.append(out)
        grads.append((xi.grad, norm.weight.grad, norm.bias.grad))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # The point of the module: the output keeps the input's channels-last layout.
    assert outputs[1].is_contiguous(memory_format=torch.channels_last_3d)


def test_channels_last_instance_norm_in_eval_is_torch_instance_norm() -> None:
    reference, swapped = _pair(3)
    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(swapped.eval()(x), reference.eval()(x))


def test_unet_uses_channels_last_norms_and_keeps_dynunet_state_dict() -> None:
    cfg = ModelConfig(filters=(4, 8, 16), patch_size=(16, 16, 16), deep_supervision=1)
    net = build_model(cfg, 1, 3)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is ChannelsLastInstanceNorm3d for m in norms)
    # Checkpoints of a plain DynUNet (runs trained before the swap) load unchanged.
    plain = DynUNet(
        3,
        1,
        3,
        [[3] * 3] * 3,
        [[1] * 3, [2] * 3, [2] * 3],
        [[2] * 3, [2] * 3],
        filters=[4, 8, 16],
        norm_name=("instance", {"affine": True}),
        deep_supervision=True,
        deep_supr_num=1,
    )
    assert set(plain.state_dict()) == set(net.state_dict())
    net.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(net.eval()(x), plain.eval()(x))


def test_3d_networks_are_built_channels_last_and_2d_ones_contiguous() -> None:
    net = build_model(ModelConfig(filters=(4, 8, 16), patch_size=(16, 16, 16)), 1, 3)
    kernels = [p for p in net.parameters() if p.dim() == 5]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in kernels)
    flat = build_model(ModelConfig(spatial_dims=2, filters=(4, 8, 16), patch_size=(16, 16)), 1, 3)
    assert all(p.is_contiguous() for p in flat.parameters())


def test_residual_unet_has_residual_blocks_and_channels_last_norms() -> None:
    cfg = ModelConfig(filters=(4, 8, 16), patch_size=(16, 16, 16), deep_supervision=1)
    plain = build_model(cfg, 1, 3)
    net = build_model(dataclasses.replace(cfg, res_block=True), 1, 3)
    assert not any(isinstance(m, UnetResBlock) for m in plain.modules())
    assert any(isinstance(m, UnetResBlock) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is ChannelsLastInstanceNorm3d for m in norms)
    x = torch.randn(2, 1, 16, 16, 16)
    assert [o.shape for o in net.train()(x)] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    assert net.eval()(x).shape == (2, 3, 16, 16, 16)


def test_deep_supervision_heads_stay_at_their_resolution_per_axis() -> None:
    """Each head comes at its decoder level's grid (anisotropic strides too), not upsampled."""
    cfg = ModelConfig(
        filters=(4, 8, 16, 32),
        patch_size=(16, 16, 8),
        strides=((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
        deep_supervision=2,
    )
    net = build_model(cfg, 1, 5).train()
    shapes = [o.shape for o in net(torch.randn(2, 1, 16, 16, 8))]
    assert shapes == [(2, 5, 16, 16, 8), (2, 5, 8, 8, 8), (2, 5, 4, 4, 4)]


def test_swap_instance_norms_both_ways_and_leaves_other_layers_alone() -> None:
    net = torch.nn.Sequential(
        torch.nn.BatchNorm3d(2), torch.nn.InstanceNorm2d(2), torch.nn.InstanceNorm3d(2, affine=True)
    )
    with torch.no_grad():
        net[2].weight.fill_(2.0)
    swap_instance_norms(net)
    assert type(net[0]) is torch.nn.BatchNorm3d and type(net[1]) is torch.nn.InstanceNorm2d
    assert type(net[2]) is ChannelsLastInstanceNorm3d and float(net[2].weight.detach()[0]) == 2.0
    swap_instance_norms(net, torch.nn.InstanceNorm3d)
    assert type(net[2]) is torch.nn.InstanceNorm3d and float(net[2].weight.detach()[0]) == 2.0


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unet"):
        build_model(ModelConfig(name="resnet"), 1, 2)


@pytest.mark.parametrize("training", [True, False])
def test_run_network_gives_a_single_sample_the_same_logits_and_gradients(training: bool) -> None:
    cfg = ModelConfig(filters=(4, 8, 16), patch_size=(8, 16, 8), deep_supervision=1)
    torch.manual_seed(0)
    net = build_model(cfg, 1, 3).train(training)
    x = torch.randn(1, 1, 8, 16, 8)
    results = []
    for forward in (net, lambda t: run_network(net, t)):
        net.zero_grad(set_to_none=True)
        out = forward(x)
        outs = out if isinstance(out, list) else [out]  # deep-supervision heads in training
        sum(o.square().mean() for o in outs).backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in outs], grads))
    (ours, our_grads), (theirs, their_grads) = results[1], results[0]
    assert [o.shape for o in ours] == [o.shape for o in theirs]  # one sample in, one out
    assert len(ours) == (2 if training else 1)
    for our, their in zip(ours, theirs, strict=True):
        torch.testing.assert_close(our, their, rtol=1e-4, atol=1e-5)
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name, reference in their_grads.items():
        torch.testing.assert_close(our_grads[name], reference, rtol=1e-3, atol=1e-5)


def test_run_network_copies_only_a_single_3d_sample_and_feeds_3d_channels_last() -> None:
    calls: list[tuple[int, ...]] = []
    layouts: list[bool] = []

    def net(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        if t.dim() == 5:
            layouts.append(t.is_contiguous(memory_format=torch.channels_last_3d))
        return t

    run_network(net, torch.zeros(2, 2, 4, 4, 4))  # two channels: the layouts differ
    run_network(net, torch.zeros(1, 2, 4, 4))
    run_network(net, torch.zeros(1, 2, 4, 4, 4))
    assert calls == [(2, 2, 4, 4, 4), (1, 2, 4, 4), (2, 2, 4, 4, 4)]
    assert layouts == [True, True]
