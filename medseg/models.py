"""Network registry: a name in the config -> a builder taking the model config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet

from medseg.config import ConfigError, ModelConfig, level_strides


def build_unet(cfg: ModelConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """U-Net with skip connections (MONAI DynUNet): 3x3(x3) convolutions, strided downsampling.

    Each level after the first downsamples by ``cfg.strides`` (per axis, 1 or 2; default 2 on
    every axis), and the decoder upsamples by the same factors.

    With ``cfg.deep_supervision`` = n, training-mode forward passes return a list of 1 + n
    logit tensors: the full-resolution output, then n lower decoder levels' outputs at their own
    resolution (see `UNet`); eval mode returns only the first. Its instance norms are
    `ChannelsLastInstanceNorm3d`.

    Args:
        cfg: model section; ``filters`` sets the channels per level and the depth, ``strides``
            the per-level, per-axis downsampling, ``res_block`` residual blocks.
        in_channels: input image channels.
        out_channels: number of classes, background included.
    """
    levels = len(cfg.filters)
    kernel = [[3] * cfg.spatial_dims] * levels
    strides = level_strides(cfg)
    norm: str | tuple = ("instance", {"affine": True}) if cfg.norm == "instance" else "batch"
    net = UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(cfg.filters),
        norm_name=norm,
        deep_supervision=cfg.deep_supervision > 0,
        deep_supr_num=max(1, cfg.deep_supervision),
        res_block=cfg.res_block,
    )
    return swap_instance_norms(net)


class UNet(DynUNet):
    """MONAI's DynUNet whose deep-supervision outputs stay at their own resolution.

    DynUNet upsamples every supervision head to full resolution in its forward pass; with 118
    classes that doubled the training step (21.5 s against 11.7 s without the heads). Here the
    loss decides (`medseg.losses.DeepSupervisionLoss`): it upsamples them the same way, or
    compares them with a downsampled target as nnU-Net does. Same modules and state-dict keys
    as DynUNet; eval mode unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            return [out, *self.heads]
        return out


class ChannelsLastInstanceNorm3d(torch.nn.InstanceNorm3d):
    """3D instance norm that keeps channels-last tensors channels-last while training.

    torch's instance norm views the input as one (1, B*C, ...) batch, which first copies a
    channels-last tensor to channels-first (and the next convolution copies it back); per-sample
    batch norm computes the same statistics in the input's own layout: about 12% more training
    volumes per second for the hippocampus U-Net on 2 CPU cores (`scripts/bench_step.py
    --torch-norm` for the comparison). Evaluation and export use torch's own instance norm.
    Parameters and state-dict keys are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.track_running_stats or x.dim() != 5:
            return super().forward(x)
        samples = [
            F.batch_norm(s, None, None, self.weight, self.bias, True, 0.0, self.eps)
            for s in x.split(1)
        ]
        return torch.cat(samples) if len(samples) > 1 else samples[0]


def run_network(net: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``net(x)`` as medseg runs its networks: a 3D input channels-last (the layout its 3D
    networks are kept in), and a single 3D sample on the CPU as a batch of two copies.

    torch sends a 3x3x3 convolution of one small sample to its slow native kernel instead of
    oneDNN (a size heuristic in ATen). A hippocampus training step on one sample took 444 ms as
    is and 248 ms as two copies on 2 cores (`scripts/bench_step.py train.batch_size=1
    [--single-as-is]`); logits and gradients are the same. Returns what `net` returns: logits,
    or in training with deep supervision a list of them.
    """
    if x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if x.device.type == "cpu" and x.shape[0] == 1:
            out = net(torch.cat([x, x]))
            return [o[:1] for o in out] if isinstance(out, list) else out[:1]
    return net(x)


def swap_instance_norms(
    net: torch.nn.Module, cls: type[torch.nn.InstanceNorm3d] = ChannelsLastInstanceNorm3d
) -> torch.nn.Module:
    """Replace every 3D instance norm in `net` that is not a `cls` by one, parameters kept."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.InstanceNorm3d) and type(child) is not cls:
                swapped = cls(
                    child.num_features,
                    child.eps,
                    child.momentum,
                    child.affine,
                    child.track_running_stats,
                )
                swapped.load_state_dict(child.state_dict())
                setattr(module, name, swapped)
    return net


MODELS: dict[str, Callable[[ModelConfig, int, int], torch.nn.Module]] = {"unet": build_unet}


def model_builder(name: str) -> Callable[[ModelConfig, int, int], torch.nn.Module]:
    """The builder registered as `name`; unknown names list the valid ones."""
    if name not in MODELS:
        raise ConfigError(f"model.name {name!r} is unknown; choose one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(cfg: ModelConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """Build the network named by ``cfg.name``; 3D networks are kept channels-last, the layout
    `run_network` feeds them (+17% training volumes/s on CPU, docs/recipe.md)."""
    net = model_builder(cfg.name)(cfg, in_channels, out_channels)
    if cfg.spatial_dims == 3:
        net = net.to(memory_format=torch.channels_last_3d)
    return net
