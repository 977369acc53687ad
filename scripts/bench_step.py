"""Training-step throughput of a config's network: training volumes per second on this machine.

Times forward + backward + AdamW steps on random patches (no data loading), so that recipe
ingredients that change only the cost (memory format, precision, batch and patch size, deep
supervision, threads) can be compared in seconds instead of full training runs.

Examples::

    python scripts/bench_step.py                                  # configs/hippocampus_3d.yaml
    python scripts/bench_step.py --contiguous                     # without channels-last
    python scripts/bench_step.py --torch-norm                     # torch's InstanceNorm3d
    python scripts/bench_step.py --bf16                           # bfloat16 autocast on CPU
    python scripts/bench_step.py model.patch_size=[40,56,40] train.batch_size=2
    python scripts/bench_step.py train.batch_size=1 [--single-as-is]  # torch's batch-1 slow path

Last line: ``vol_per_s=X.XX ms_per_step=X``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medseg.config import load_config
from medseg.losses import build_loss
from medseg.models import build_model, run_network, swap_instance_norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/hippocampus_3d.yaml"))
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--contiguous", action="store_true", help="no channels-last 3D (network run as is)"
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument(
        "--torch-norm",
        action="store_true",
        help="torch's InstanceNorm3d instead of medseg's ChannelsLastInstanceNorm3d",
    )
    parser.add_argument(
        "--single-as-is",
        action="store_true",
        help="batch 1 run as one sample, not as two copies (medseg.models.run_network)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    memory = torch.contiguous_format
    if cfg.model.spatial_dims == 3 and not args.contiguous:
        memory = torch.channels_last_3d
    net = build_model(cfg.model, 1, args.classes)
    if args.torch_norm:
        swap_instance_norms(net, torch.nn.InstanceNorm3d)
    net = net.to(memory_format=memory).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    model = cfg.model  # the training loss
    loss_fn = build_loss(cfg.train.loss, model.deep_supervision, model.deep_supervision_grid)
    batch = cfg.train.batch_size
    x = torch.randn(batch, 1, *cfg.model.patch_size).contiguous(memory_format=memory)
    y = torch.randint(0, args.classes, (batch, 1, *cfg.model.patch_size))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            as_is = args.single_as_is or args.contiguous  # run_network makes 3D channels-last
            out = net(x) if as_is else run_network(net, x)
        outs = [o.float() for o in out] if isinstance(out, list) else out.float()
        loss_fn(outs, y).backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator and oneDNN kernel selection
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"threads={torch.get_num_threads()} patch={list(cfg.model.patch_size)} batch={batch}")
    print(f"vol_per_s={batch / seconds:.2f} ms_per_step={seconds * 1000:.0f}")


if __name__ == "__main__":
    main()
