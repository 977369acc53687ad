"""medseg.training: split, run-folder contents, reproducibility and exact resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from medseg import runs, training
from medseg.config import ConfigError, load_config
from medseg.training import (
    TrainingError,
    kfold_split,
    machine_description,
    subset_training,
    train,
)
from medseg.training.trainer import _Augmented, _Trainer

NAMES = [f"case_{i:03d}" for i in range(23)]


@pytest.mark.parametrize("fold", range(5))
def test_kfold_split_partitions_cases(fold: int) -> None:
    split = kfold_split(NAMES, 5, fold, seed=0)
    assert set(split.train).isdisjoint(split.val)
    assert sorted(split.train + split.val) == NAMES
    assert len(split.val) in (4, 5)


def test_kfold_folds_cover_every_case_once() -> None:
    held = [n for fold in range(5) for n in kfold_split(NAMES, 5, fold, seed=3).val]
    assert sorted(held) == NAMES


def test_one_fold_trains_and_validates_on_every_case() -> None:
    split = kfold_split(NAMES[:1], 1, 0, seed=0)
    assert split.train == split.val == (NAMES[0],)


def test_kfold_split_too_few_cases() -> None:
    with pytest.raises(TrainingError, match="cannot be split into 5 folds"):
        kfold_split(NAMES[:3], 5, 0, seed=0)


def test_training_subsets_are_nested_and_keep_the_validation_cases() -> None:
    split = kfold_split(NAMES, 5, 0, seed=0)
    small, large = (subset_training(split, n, seed=0) for n in (5, 12))
    assert len(small.train) == 5 and len(large.train) == 12
    assert set(small.train) < set(large.train) < set(split.train)
    assert small.val == large.val == split.val
    assert small.train == tuple(sorted(small.train))
    assert subset_training(split, None, seed=0) == split
    assert subset_training(split, 5, seed=1).train != small.train


def test_training_subset_larger_than_the_fold() -> None:
    with pytest.raises(TrainingError, match="only 18 training cases"):
        subset_training(kfold_split(NAMES, 5, 0, seed=0), 19, seed=0)


def test_run_folder_is_self_describing(tiny_run: Path) -> None:
    names = {p.name for p in tiny_run.iterdir()}
    assert names == {
        "config.yaml",
        "plan.json",
        "labels.json",
        "run.json",
        "model.pt",
        "postprocessing.json",
        "last.pt",
        "metrics.csv",
        "training_curve.png",
        "train.log",
        "validation",
    }
    labels = json.loads((tiny_run / "labels.json").read_text())
    assert labels == {"0": "background", "1": "Anterior", "2": "Posterior"}
    plan = json.loads((tiny_run / "plan.json").read_text())
    assert plan["spacing"] == [1.0, 1.0, 1.0]
    assert plan["normalization"][0]["scheme"] == "zscore"
    info = json.loads((tiny_run / "run.json").read_text())
    assert set(info["train_cases"]).isdisjoint(info["val_cases"])
    assert len(info["train_cases"]) == 8 and len(info["val_cases"]) == 2
    assert load_config(tiny_run / "config.yaml").data.spacing == (1.0, 1.0, 1.0)
    assert info["machine"] == machine_description(torch.device("cpu"))
    assert info["machine"].endswith(f", {torch.get_num_threads()} threads")
    assert not info["machine"].startswith(",")  # a CPU name comes first


def test_metrics_csv_has_one_row_per_epoch(tiny_run: Path) -> None:
    rows = list(csv.DictReader((tiny_run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        assert float(row["train_loss"]) > 0
        assert 0 <= float(row["val_pooled_dice_mean"]) <= 1
        assert {"val_pooled_dice_Anterior", "val_pooled_dice_Posterior"} <= row.keys()


def test_final_validation_scores_held_out_cases(tiny_run: Path) -> None:
    info = json.loads((tiny_run / "run.json").read_text())
    written = sorted(p.name for p in (tiny_run / "validation").glob("*.nii.gz"))
    assert written == sorted(f"{n}.nii.gz" for n in info["val_cases"])
    metrics = json.loads((tiny_run / "validation" / "metrics.json").read_text())
    assert sorted(metrics["cases"]) == sorted(info["val_cases"])


def test_checkpoints_hold_plain_data_only(tiny_run: Path) -> None:
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "history", "clock"} <= state.keys()


def test_training_batches_are_plain_tensors() -> None:
    """MONAI's transforms return MetaTensors; the network must get plain tensors (speed)."""
    from monai.data import MetaTensor

    image, label = MetaTensor(torch.rand(1, 4, 4, 4)), MetaTensor(torch.ones(1, 4, 4, 4))
    item = {"image": image, "label": label}
    out = _Augmented([item], lambda d: [d])[0]
    assert type(out["image"]) is torch.Tensor and type(out["label"]) is torch.Tensor
    assert out["label"].dtype == torch.long
    assert torch.equal(out["image"], image.as_tensor())


def test_existing_run_needs_resume(tiny_run: Path, tiny_overrides: list[str]) -> None:
    with pytest.raises(TrainingError, match="--resume"):
        train(load_config(None, tiny_overrides), tiny_run)


def test_training_seed_keeps_the_split(
    tmp_path: Path, tiny_run: Path, tiny_overrides: list[str]
) -> None:
    """Another training seed validates on the same held-out cases; `split_seed` changes them."""
    info = json.loads((tiny_run / runs.INFO).read_text())
    seeded = train(load_config(None, [*tiny_overrides, "train.seed=1"]), tmp_path / "seed1")
    seeded_info = json.loads((seeded / runs.INFO).read_text())
    assert seeded_info["val_cases"] == info["val_cases"]
    assert seeded_info["train_cases"] == info["train_cases"]
    names = [*info["train_cases"], *info["val_cases"]]
    assert kfold_split(names, 5, 0, seed=1).val != tuple(info["val_cases"])  # split_seed=1 differs


def test_training_on_a_subset_records_it(
    tmp_path: Path, tiny_run: Path, tiny_overrides: list[str]
) -> None:
    full = json.loads((tiny_run / runs.INFO).read_text())
    run_dir = train(load_config(None, [*tiny_overrides, "train.train_cases=3"]), tmp_path / "n3")
    info = json.loads((run_dir / runs.INFO).read_text())
    assert len(info["train_cases"]) == 3 and set(info["train_cases"]) < set(full["train_cases"])
    assert info["val_cases"] == full["val_cases"]


def test_resume_refuses_a_changed_split(tmp_path: Path, tiny_run: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    info = json.loads((run_dir / runs.INFO).read_text())
    info["train_cases"], info["val_cases"] = (
        info["train_cases"][1:],
        [
            info["train_cases"][0],
            *info["val_cases"],
        ],
    )
    (run_dir / runs.INFO).write_text(json.dumps(info))
    with pytest.raises(TrainingError, match="start a new run instead of resuming"):
        train(load_config(None), run_dir, resume=True)


@pytest.mark.parametrize("train_fn", [train, training.train_folds], ids=["one", "all"])
def test_new_run_without_config_is_refused(tmp_path: Path, train_fn) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="no configuration given"):
        train_fn(None, tmp_path / "new")


def test_resume_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(load_config(None), tmp_path / "empty", resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_resume_equals_uninterrupted(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch, ema: float
) -> None:
    """A run stopped after epoch 1 and resumed ends with the weights of a straight run (and, with
    `train.ema`, the same moving average)."""
    cfg = load_config(None, [*tiny_overrides, "train.epochs=3", f"train.ema={ema}"])
    straight = train(cfg, tmp_path / "straight")

    class Crash(Exception):
        pass

    original = _Trainer._checkpoint

    def checkpoint_then_crash(self, run_dir, epoch):  # noqa: ANN001, ANN202
        original(self, run_dir, epoch)
        if epoch == 0:
            raise Crash

    monkeypatch.setattr(_Trainer, "_checkpoint", checkpoint_then_crash)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed")
    monkeypatch.setattr(_Trainer, "_checkpoint", original)
    assert runs.load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 0
    resumed = train(load_config(None), tmp_path / "resumed", resume=True)

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    for key in a.get("ema", {}):
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=1e-5, atol=1e-6)
    assert ("ema" in a) == (ema > 0)
    losses_a = [row["train_loss"] for row in a["history"]]
    losses_b = [row["train_loss"] for row in b["history"]]
    assert losses_b == pytest.approx(losses_a, rel=1e-5)


def test_moving_average_is_what_is_saved(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """With `train.ema`, model.pt holds the averaged weights, not the last ones."""
    run = train(load_config(None, [*tiny_overrides, "train.ema=0.5"]), tmp_path / "ema")
    last = torch.load(run / "last.pt", weights_only=True)
    saved = runs.load_checkpoint(run / "model.pt")["model"]
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    assert saved.keys() == last["model"].keys() == averaged.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], averaged[key])
    moved = [k for k in saved if saved[k].is_floating_point()]
    assert any(not torch.equal(saved[k], last["model"][k]) for k in moved)
    assert int(last["ema"]["n_averaged"]) == 4  # 2 epochs of 2 steps


def _two_channel_nnunet(demo_dataset: Path, root: Path, n_cases: int = 5) -> list[str]:
    """An nnU-Net v2 raw dataset whose second channel is a rescaled copy of the first."""
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = []
    for image in sorted((demo_dataset / "imagesTr").glob("*.nii.gz"))[:n_cases]:
        case = image.name.removesuffix(".nii.gz")
        source = nib.load(image)
        data = np.asarray(source.dataobj, dtype=np.float32)
        for channel, array in enumerate((data, 2.0 * data + 5.0)):
            nib.save(
                nib.Nifti1Image(array, source.affine),
                root / "imagesTr" / f"{case}_{channel:04d}.nii.gz",
            )
        (root / "labelsTr" / f"{case}.nii.gz").write_bytes(
            (demo_dataset / "labelsTr" / image.name).read_bytes()
        )
        names.append(case)
    meta = {
        "channel_names": {"0": "T1", "1": "T1_rescaled"},
        "file_ending": ".nii.gz",
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": n_cases,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return names


def test_two_channel_nnunet_layout(tmp_path: Path, demo_dataset: Path) -> None:
    from medseg.predict import PredictOptions, predict

    names = _two_channel_nnunet(demo_dataset, tmp_path / "data")
    overrides = [f"data.root={tmp_path / 'data'}", *TINY, "train.epochs=1"]
    run_dir = train(load_config(None, overrides), tmp_path / "run")
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["channels"] == ["T1", "T1_rescaled"] and plan["layout"] == "nnunet"
    written = predict(
        [tmp_path / "data" / "imagesTr"], tmp_path / "out", run_dir, PredictOptions("cpu")
    )
    assert sorted(p.name for p in written) == sorted(f"{n}.nii.gz" for n in names)


def test_undeclared_label_value_is_reported(tmp_path: Path, demo_dataset: Path) -> None:
    from medseg.datasets import DatasetError

    _two_channel_nnunet(demo_dataset, tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "Anterior": 1}
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(meta))
    overrides = [f"data.root={tmp_path / 'data'}", *TINY, "train.epochs=1"]
    with pytest.raises(DatasetError, match=r"label value\(s\) \[2\] not declared"):
        train(load_config(None, overrides), tmp_path / "run")


def test_slice_wise_2d_model(tmp_path: Path, tiny_overrides: list[str], demo_dataset: Path) -> None:
    from medseg.predict import PredictOptions, predict

    overrides = [*tiny_overrides, "model.spatial_dims=2", "model.patch_size=[32,32]"]
    run_dir = train(load_config(None, overrides), tmp_path / "run")
    image = demo_dataset / "imagesTr" / "hippocampus_320.nii.gz"
    [out] = predict([image], tmp_path / "out", run_dir, PredictOptions("cpu", formats=("nifti",)))
    import nibabel as nib

    assert nib.load(out).shape == nib.load(image).shape
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == 2 and "val_pooled_dice_mean" in rows[-1]


@pytest.mark.slow
def test_time_budget_ends_converged(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """A budgeted run stops on its own, before its epoch cap, with the LR decayed to ~0."""
    overrides = [*tiny_overrides, "train.epochs=10000", "train.max_minutes=0.75"]
    run = train(load_config(None, overrides), tmp_path / "budget")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert 1 < len(rows) < 10000
    peak = load_config(run / "config.yaml").train.lr
    assert float(rows[-1]["lr"]) < 0.02 * peak
    assert not rows[-1].get("val_pooled_dice_mean")  # budget spent: the final validation follows
    assert (run / "validation" / "metrics.json").is_file()
    assert (run / "model.pt").is_file()
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["clock"]["budget"] < 0.75 * 60


@pytest.mark.parametrize(
    ("cost", "budget", "elapsed", "fits"),
    [
        (15.0, 834.0, 100.0, True),  # hippocampus: 40 small cases against a 14-min budget
        (150.0, 161.0, 65.0, False),  # BraTS: one pass costs most of the training budget
        (15.0, 834.0, 825.0, False),  # it would run past the budget
        (15.0, None, 10_000.0, True),  # no budget
        (None, 161.0, 0.0, True),  # not timed yet (a resumed run)
    ],
)
def test_in_loop_validation_fits_the_budget(
    cost: float | None, budget: float | None, elapsed: float, fits: bool
) -> None:
    assert training.in_loop_validation_fits(cost, budget, elapsed) is fits


@pytest.mark.slow
def test_unaffordable_in_loop_validation_is_skipped(
    tmp_path: Path,
    tiny_overrides: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A budgeted run whose validation pass costs too much trains through; the final one runs."""
    # patched where `in_loop_validation_fits` reads it
    monkeypatch.setattr("medseg.training.budget.IN_LOOP_VALIDATION_SHARE", 0.0)
    overrides = [
        *tiny_overrides,
        "train.epochs=10000",
        "train.val_every=1",
        "train.max_minutes=0.6",
    ]
    with caplog.at_level("INFO", logger="medseg.training"):
        run = train(load_config(None, overrides), tmp_path / "budget")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) > 1 and not any(row.get("val_pooled_dice_mean") for row in rows)
    assert "in-loop validation skipped from epoch 1" in caplog.text
    assert (run / "validation" / "metrics.json").is_file()


def test_budget_too_small_is_refused(tmp_path: Path, tiny_overrides: list[str]) -> None:
    with pytest.raises(TrainingError, match="leaves no time to train"):
        train(load_config(None, [*tiny_overrides, "train.max_minutes=0.05"]), tmp_path / "r")


@pytest.mark.slow
def test_all_folds_pool_validation_and_decide_postprocessing(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    cfg = load_config(None, [*tiny_overrides, "train.folds=2", "train.epochs=1"])
    run = training.train_folds(cfg, tmp_path / "ens")
    folds = [run / "fold_0", run / "fold_1"]
    assert all((f / "model.pt").is_file() for f in folds)
    held = [json.loads((f / "run.json").read_text())["val_cases"] for f in folds]
    assert set(held[0]).isdisjoint(held[1])
    pooled = json.loads((run / "crossval" / "metrics.json").read_text())
    assert sorted(pooled["cases"]) == sorted(held[0] + held[1])
    decision = json.loads((run / "postprocessing.json").read_text())
    assert set(decision["largest_component"]) <= {1, 2}
    assert set(decision["validation_dice"]) == {"Anterior", "Posterior"}
    with pytest.raises(TrainingError, match="--resume"):
        training.train_folds(cfg, run)
    before = (folds[0] / "model.pt").stat().st_mtime_ns
    shutil.rmtree(folds[1])
    training.train_folds(None, run, resume=True)  # the stored config; fold 0 is kept
    assert (folds[0] / "model.pt").stat().st_mtime_ns == before
    assert load_config(folds[1] / "config.yaml").train.epochs == 1  # not the default
    assert (folds[1] / "model.pt").is_file()


def _dataset_as(demo_dataset: Path, root: Path, suffix: str, n_cases: int = 6) -> list[str]:
    """The first demo cases as an nnU-Net v2 dataset of `suffix` files (nnU-Net's
    ``file_ending``), written by SimpleITK."""
    import SimpleITK as sitk

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = []
    for image in sorted((demo_dataset / "imagesTr").glob("*.nii.gz"))[:n_cases]:
        case = image.name.removesuffix(".nii.gz")
        sitk.WriteImage(sitk.ReadImage(str(image)), str(root / "imagesTr" / f"{case}_0000{suffix}"))
        label = sitk.ReadImage(str(demo_dataset / "labelsTr" / image.name))
        sitk.WriteImage(
            sitk.Cast(label, sitk.sitkUInt8), str(root / "labelsTr" / f"{case}{suffix}")
        )
        names.append(case)
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "file_ending": suffix,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return names


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_final_validation_reads_references_in_their_own_format(
    tmp_path: Path, demo_dataset: Path, suffix: str
) -> None:
    """Training, and resuming, a dataset of .nrrd/.mha/.nii labels scores them (the references
    were linked as NAME.nii.gz, which only a NIfTI reader can open)."""
    _dataset_as(demo_dataset, tmp_path / "data", suffix)
    overrides = [f"data.root={tmp_path / 'data'}", *TINY, "train.folds=2", "train.epochs=1"]
    run = train(load_config(None, overrides), tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    references = sorted(p.name for p in (run / "validation" / "reference").iterdir())
    assert references == sorted(f"{case}{suffix}" for case in info["val_cases"])
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    assert sorted(metrics["cases"]) == sorted(info["val_cases"])
    train(None, run, resume=True)  # a finished run resumes into its final validation again
    again = json.loads((run / "validation" / "metrics.json").read_text())
    assert again["mean"] == metrics["mean"]


@pytest.mark.slow
def test_rerun_final_validation_decides_postprocessing_on_raw_predictions(
    tmp_path: Path, tiny_run: Path
) -> None:
    """A second final validation must not score post-processed masks as raw ones: the first
    decision's postprocessing.json is in place then, and applying it flipped the decision."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    first = json.loads((run / "postprocessing.json").read_text())
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    runs.write_json({"largest_component": [1, 2]}, run / "postprocessing.json")
    train(None, run, resume=True)
    assert json.loads((run / "postprocessing.json").read_text()) == first
    assert json.loads((run / "validation" / "metrics.json").read_text())["mean"] == metrics["mean"]


def test_validation_time_is_estimated_from_the_largest_case(
    tmp_path: Path, tiny_overrides: list[str], demo_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final-validation reserve comes from the largest validation case, scaled by voxels,
    not from whichever case comes first."""
    from medseg.datasets import load_dataset
    from medseg.preprocessing_plan import make_plan

    cfg = load_config(None, tiny_overrides)
    plan = make_plan(load_dataset(demo_dataset), cfg)
    cases = sorted(load_dataset(demo_dataset).cases, key=lambda c: c.name, reverse=True)
    voxels = [training.resampled_voxels(c, plan.spacing) for c in cases]
    assert len(set(voxels)) == len(voxels)  # the demo cases differ in size
    trainer = _Trainer(cfg, plan, torch.device("cpu"), cases[:2], cases)
    timed = []
    monkeypatch.setattr(trainer, "_time_validation", lambda i: timed.append(i) or 30.0)
    estimate = trainer.time_validation_pass()
    largest = int(np.argmax(voxels))
    assert timed == [largest] and largest != 0
    assert estimate == pytest.approx(30.0 * sum(voxels) / voxels[largest])
