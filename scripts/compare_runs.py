"""Pool the held-out cases of several runs and compare two such pools case by case.

Each run folder's final validation (``RUN/validation/metrics.json``, written by ``medseg train``
and ``scripts/bench_train.py``) scores its own held-out cases. Runs of different folds together
hold out every case once; this prints, per pool, the per-label and mean foreground Dice over all
their cases (each case's labels averaged, then the cases). With ``--against``, a second pool on
the same cases: the mean paired per-case difference and its standard error, which tells a real
difference between two recipes from the noise of the cases.

Example (docs/recipe.md: learning rate 1e-2 against 3e-3 over five folds)::

    python scripts/compare_runs.py runs/lr10_f0 runs/lr10_f1 runs/lr10_f2 runs/lr10_f3 \\
        runs/lr10_f4 --against runs/f0 runs/f1 runs/f2 runs/f3 runs/f4
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def case_dice(runs: list[Path]) -> dict[str, dict[str, float]]:
    """Case name -> label name -> Dice, over the held-out cases of `runs`."""
    cases: dict[str, dict[str, float]] = {}
    for run in runs:
        path = run / "validation" / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: is {run} a finished run folder?")
        for name, labels in json.loads(path.read_text())["cases"].items():
            if name in cases:
                raise SystemExit(f"{name} is held out by more than one of the runs given")
            cases[name] = {label: float(row["dice"]) for label, row in labels.items()}
    return cases


def describe(cases: dict[str, dict[str, float]]) -> str:
    labels = sorted({label for row in cases.values() for label in row})
    per_label = {
        label: np.nanmean([row.get(label, np.nan) for row in cases.values()]) for label in labels
    }
    text = ", ".join(f"{label} {value:.4f}" for label, value in per_label.items())
    return f"{len(cases)} cases: {text}, mean {np.nanmean(list(per_label.values())):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (e.g. one per fold)")
    parser.add_argument("--against", type=Path, nargs="+", help="run folders of a second recipe")
    args = parser.parse_args()
    first = case_dice(args.runs)
    print(f"runs: {describe(first)}")
    if not args.against:
        return
    second = case_dice(args.against)
    print(f"against: {describe(second)}")
    if first.keys() != second.keys():
        raise SystemExit("the two pools do not hold out the same cases")
    diff = np.array(
        [np.nanmean(list(first[c].values())) - np.nanmean(list(second[c].values())) for c in first]
    )
    error = diff.std(ddof=1) / math.sqrt(len(diff))
    print(f"paired per-case difference: {diff.mean():+.4f} (standard error {error:.4f})")


if __name__ == "__main__":
    main()
