"""After training: the final validation (held-out cases predicted on their original grids and
scored), the post-processing decision, and the pooled cross-validation of all folds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import runs
from medseg.datasets import Case
from medseg.evaluation import confusion, dice
from medseg.io import image_suffix, is_image_file, strip_suffix

log = logging.getLogger(__name__)

CROSSVAL = "crossval"


def _final_validation(
    run_dir: Path, val_cases: list[Case], device: torch.device, progress: bool
) -> None:
    """Predict the held-out cases with the final weights on their original grids, score them,
    and decide the post-processing on them."""
    from medseg.evaluation import evaluate_folders, write_results
    from medseg.predict import PredictOptions, predict_cases

    run = runs.load_run(run_dir, device)
    out = run_dir / runs.VALIDATION
    # raw predictions: post-processing is decided on them (and scored both ways) below
    options = PredictOptions(overwrite=True, formats=("nifti",), postprocess=False)
    predict_cases(run, [(c.name, list(c.images)) for c in val_cases], out, options, progress)
    ref_dir = out / "reference"
    _link_cases(ref_dir, {c.name: Path(c.label) for c in val_cases})  # type: ignore[arg-type]
    results = evaluate_folders(out, ref_dir, run.plan.labels)
    write_results(results, out / "metrics.json")
    _decide_postprocessing(out, run.plan.labels, run_dir)
    means = results["mean"]
    log.info(
        "final validation (original grids, %d cases): %s; foreground mean Dice %.4f",
        len(val_cases),
        {k: v["dice"] for k, v in means["labels"].items()},
        means["foreground_mean"]["dice"],
    )


def _decide_postprocessing(pred_dir: Path, labels: dict[int, str], run_dir: Path) -> None:
    """Keep-largest-component per label, only where it raises that label's mean validation Dice.

    nnU-Net's rule; the decision and the Dice with and without it go to ``postprocessing.json``,
    which `medseg predict` applies.
    """
    from medseg.io import load_labels
    from medseg.postprocessing import keep_largest_component

    foreground = {v: n for v, n in labels.items() if v != 0}
    raw: dict[int, list[float]] = {v: [] for v in foreground}
    kept: dict[int, list[float]] = {v: [] for v in foreground}
    references = _case_files(pred_dir / "reference")
    for case, pred_path in sorted(_case_files(pred_dir).items()):
        pred = load_labels(pred_path).array
        ref = load_labels(references[case]).array
        for v in foreground:
            raw[v].append(dice(*confusion(ref, pred, v)))
            kept[v].append(dice(*confusion(ref, keep_largest_component(pred, [v]), v)))
    decision: dict[str, Any] = {"largest_component": [], "validation_dice": {}}
    for v, name in foreground.items():
        before, after = float(np.nanmean(raw[v])), float(np.nanmean(kept[v]))
        if after > before:
            decision["largest_component"].append(v)
        decision["validation_dice"][name] = {"raw": before, "largest_component": after}
    runs.write_json(decision, run_dir / runs.POSTPROCESSING)
    log.info(
        "post-processing: keep the largest component of %s",
        [foreground[v] for v in decision["largest_component"]] or "no label",
    )


def _pool_cross_validation(run_dir: Path, fold_dirs: list[Path]) -> None:
    """Score all folds' held-out predictions together and decide the ensemble post-processing."""
    from medseg.evaluation import evaluate_folders, write_results

    pooled = run_dir / CROSSVAL
    (pooled / "reference").mkdir(parents=True, exist_ok=True)
    for fold_dir in fold_dirs:
        validation = fold_dir / runs.VALIDATION
        references = _case_files(validation / "reference")
        predictions = _case_files(validation)
        _link_cases(pooled, predictions)
        _link_cases(pooled / "reference", {case: references[case] for case in predictions})
    labels = runs.load_plan(fold_dirs[0] / runs.PLAN).labels
    results = evaluate_folders(pooled, pooled / "reference", labels)
    write_results(results, pooled / "metrics.json")
    log.info(
        "cross-validation (%d cases): foreground mean Dice %.4f",
        len(results["cases"]),
        results["mean"]["foreground_mean"]["dice"],
    )
    _decide_postprocessing(pooled, labels, run_dir)


def _case_files(folder: Path) -> dict[str, Path]:
    """Case name -> label-map file of a folder, whatever each file's image format."""
    return {strip_suffix(p.name): p for p in sorted(folder.iterdir()) if is_image_file(p)}


def _link_cases(folder: Path, files: dict[str, Path]) -> None:
    """Symlink ``folder/CASE<suffix>`` to each file, keeping its own suffix (a reference may be
    .nrrd or .mha: the link is read by its name), replacing what an earlier run left there for
    that case (a link, or a copy of one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case, target in files.items():
        for old in folder.iterdir():
            if strip_suffix(old.name) == case and (old.is_symlink() or old.is_file()):
                old.unlink()
        (folder / f"{case}{image_suffix(target.name)}").symlink_to(target.resolve())
