"""Training benchmark: validation Dice against wall time for a time budget.

Trains one fold of a config (default: configs/hippocampus_3d.yaml, fold 0 of 5) with
``--max-minutes``, then prints the validation curve (Dice in the preprocessed space, every
``train.val_every`` epochs), seconds per epoch, training images per second and the final
validation on the held-out cases' original grids (the predict path, as a user would get it).

The last line is machine-readable::

    minutes=X.X dice_mean=0.XXX

``minutes`` is the wall time of the whole training command (data loading, training, final
validation); ``dice_mean`` the mean foreground Dice of the final validation.

Example (the README numbers)::

    python scripts/bench_train.py --max-minutes 15 --run-dir runs/bench_hippo
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

from medseg.config import load_config
from medseg.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/hippocampus_3d.yaml"))
    parser.add_argument(
        "--max-minutes", type=float, default=15.0, help="time budget; 0 = train for train.epochs"
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench_train"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("monai", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    budget = args.max_minutes if args.max_minutes > 0 else None
    overrides = [*args.overrides, f"train.max_minutes={budget if budget else 'null'}"]
    cfg = load_config(args.config, overrides)
    start = time.perf_counter()
    train(cfg, args.run_dir)
    minutes = (time.perf_counter() - start) / 60
    report(args.run_dir, cfg.train.batch_size, minutes)


def report(run_dir: Path, batch_size: int, minutes: float) -> None:
    """Print the validation curve, throughput and the machine-readable last line."""
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    info = json.loads((run_dir / "run.json").read_text())
    steps = _steps_per_epoch(info, batch_size, run_dir)
    print("\nepoch  elapsed_min  seconds  train_loss  val_pooled_dice_mean")
    for row in rows:
        val = row.get("val_pooled_dice_mean") or ""
        val = f"{float(val):.4f}" if val else "-"
        print(
            f"{int(row['epoch']) + 1:5d}  {float(row['elapsed_minutes']):11.2f}  "
            f"{float(row['seconds']):7.1f}  {float(row['train_loss']):10.4f}  {val:>13}"
        )
    plain = [float(r["seconds"]) for r in rows if not r.get("val_pooled_dice_mean")]
    if plain:
        per_epoch = sorted(plain)[len(plain) // 2]
        print(f"\nmedian seconds per epoch (no validation): {per_epoch:.1f}")
        print(f"training images per second: {steps * batch_size / per_epoch:.2f}")
    final = json.loads((run_dir / "validation" / "metrics.json").read_text())["mean"]
    for name, scores in final["labels"].items():
        print(f"final validation {name}: Dice {scores['dice']:.4f}")
    dice_mean = final["foreground_mean"]["dice"]
    print(
        f"epochs: {len(rows)}, cases: {len(info['train_cases'])} train / "
        f"{len(info['val_cases'])} validation"
    )
    print(f"machine: {info.get('machine', 'not recorded')}, torch {info['torch_version']}")
    print(f"minutes={minutes:.1f} dice_mean={dice_mean:.3f}")


def _steps_per_epoch(info: dict, batch_size: int, run_dir: Path) -> int:
    cfg = load_config(run_dir / "config.yaml")
    if cfg.train.iterations_per_epoch:
        return cfg.train.iterations_per_epoch
    return -(-len(info["train_cases"]) // batch_size)


if __name__ == "__main__":
    main()
