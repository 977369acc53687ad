"""medseg.predict: input resolution, output naming and writing on the input grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_sitk

from medseg.config import ConfigError
from medseg.io import ImageError
from medseg.predict import PredictOptions, predict, resolve_inputs, safe_name

CPU = PredictOptions(device="cpu")


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    for p in paths:
        p.write_bytes(b"")
    return paths


def test_single_channel_names_are_kept(tmp_path: Path) -> None:
    a, b = _touch(tmp_path, "scan.nii.gz", "patient_2024.nrrd")
    assert resolve_inputs([a, b], 1, channel_suffix=False) == [("scan", [a]), ("patient_2024", [b])]


def test_channel_files_are_grouped(tmp_path: Path) -> None:
    files = _touch(tmp_path, "b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz")
    items = resolve_inputs([tmp_path], 2, channel_suffix=True)
    assert [name for name, _ in items] == ["a", "b"]
    assert [p.name for p in items[1][1]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    assert len(files) == 4


def test_missing_channel_is_reported(tmp_path: Path) -> None:
    _touch(tmp_path, "a_0000.nii.gz")
    with pytest.raises(ImageError, match="case a: found channel"):
        resolve_inputs([tmp_path], 2, channel_suffix=True)


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        resolve_inputs([tmp_path / "nope.nii.gz"], 1, channel_suffix=False)


def test_folder_without_images(tmp_path: Path) -> None:
    _touch(tmp_path, "notes.txt")
    with pytest.raises(ImageError, match="holds no images"):
        resolve_inputs([tmp_path], 1, channel_suffix=False)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("../../etc/passwd", "_.._etc_passwd"), (".hidden", "hidden"), ("a b", "a_b")],
)
def test_safe_name_stays_in_folder(raw: str, clean: str) -> None:
    assert safe_name(raw) == clean
    assert "/" not in safe_name(raw)


def test_predict_writes_on_input_grid(tiny_run: Path, demo_dataset: Path, tmp_path: Path) -> None:
    image = demo_dataset / "imagesTr" / "hippocampus_320.nii.gz"
    [out] = predict([image], tmp_path / "out", tiny_run, CPU)
    assert out == tmp_path / "out" / "hippocampus_320.nii.gz"
    _assert_same_grid(out, image)


@pytest.mark.parametrize(
    "relative",
    [
        "sct_example/imagesTr/t2_0000.nii.gz",  # PSR orientation
        "sct_example/imagesTr/t2s_0000.nii.gz",  # 7.5 mm slices
        "spleen_crop/imagesTr/spleen_2_crop_0000.nii.gz",  # 0.8 x 0.8 x 5 mm
        "hippocampus_dicom/Study1/13_HCropVolume",  # DICOM series -> 13_HCropVolume.nii.gz
        "pyradiomics_cases/raw_nrrd/brain1_image.nrrd",  # NRRD, 6.5 mm slices
    ],
)
def test_predict_real_files_on_input_grid(
    tiny_run: Path, shared_data: Path, tmp_path: Path, relative: str
) -> None:
    source = shared_data / relative
    [out] = predict([source], tmp_path, tiny_run, CPU)
    expected_name = source.name if source.is_dir() else source.name.split(".")[0]
    assert out.name == f"{expected_name}.nii.gz"
    _assert_same_grid(out, source)


def test_predict_latest_run_default(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_run, tmp_path / "runs" / "copy")
    monkeypatch.chdir(tmp_path)
    [out] = predict([demo_dataset / "imagesTr" / "hippocampus_143.nii.gz"], tmp_path / "o")
    assert out.is_file()


def _assert_same_grid(output: Path, source: Path) -> None:
    out, ref = read_sitk(output), read_sitk(source)
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-5)
    assert out.GetPixelIDTypeAsString() == "8-bit unsigned integer"


def test_default_outputs_per_scan(tiny_run: Path, demo_dataset: Path, tmp_path: Path) -> None:
    predict([demo_dataset / "imagesTr" / "hippocampus_320.nii.gz"], tmp_path, tiny_run, CPU)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hippocampus_320.ctbl",
        "hippocampus_320.nii.gz",
        "hippocampus_320.png",
        "hippocampus_320.seg.nrrd",
        "hippocampus_320.stats.json",
        "stats.csv",
    ]


def test_dicom_seg_needs_dicom_input(tiny_run: Path, demo_dataset: Path, tmp_path: Path) -> None:
    options = PredictOptions("cpu", formats=("dicom-seg",))
    with pytest.raises(ImageError, match="needs DICOM series folders"):
        predict([demo_dataset / "imagesTr" / "hippocampus_320.nii.gz"], tmp_path, tiny_run, options)


def test_dicom_series_to_dicom_seg(
    tiny_run: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom

    import medseg.predict

    def bright(predictor, volume, *args):  # noqa: ANN001, ANN202 - a model that finds something
        return (volume.array[0] > volume.array[0].mean()).astype(np.int32)

    monkeypatch.setattr(medseg.predict, "predict_volume", bright)

    series = shared_data / "hippocampus_dicom" / "Study1" / "13_HCropVolume"
    options = PredictOptions("cpu", formats=("nifti", "dicom-seg"))
    [out] = predict([series], tmp_path, tiny_run, options)
    seg = pydicom.dcmread(tmp_path / "13_HCropVolume.dcm")
    assert seg.Modality == "SEG"
    source = pydicom.dcmread(next(series.glob("*.dcm")))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert out.name == "13_HCropVolume.nii.gz"


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown output format 'jpeg'"):
        PredictOptions(formats=("jpeg",))


def test_mha_input_keeps_its_grid(tiny_run: Path, demo_dataset: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(demo_dataset / "imagesTr" / "hippocampus_149.nii.gz"))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated in-plane
    image.SetOrigin((10.0, -20.0, 5.5))
    image.SetSpacing((0.9, 1.1, 1.3))
    source = tmp_path / "rotated.mha"
    sitk.WriteImage(image, str(source))
    options = PredictOptions("cpu", formats=("nifti",))
    [out] = predict([source], tmp_path / "out", tiny_run, options)
    assert out.name == "rotated.nii.gz"
    _assert_same_grid(out, source)


# --- ensembles and post-processing ---


def _ensemble(tiny_run: Path, root: Path, folds: int = 2) -> Path:
    for k in range(folds):
        shutil.copytree(tiny_run, root / f"fold_{k}", ignore=shutil.ignore_patterns("*.onnx"))
    # the ensemble's own post-processing decision (training pools the folds to make it)
    shutil.copy(tiny_run / "postprocessing.json", root / "postprocessing.json")
    return root


def _labels(path: Path) -> np.ndarray:
    from medseg.io import load_labels

    return load_labels(path).array


def test_ensemble_of_copies_equals_single_run(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    from medseg.runs import load_run

    image = demo_dataset / "imagesTr" / "hippocampus_320.nii.gz"
    options = PredictOptions("cpu", formats=("nifti",), engine="torch")
    [single] = predict([image], tmp_path / "single", tiny_run, options)
    ensemble = _ensemble(tiny_run, tmp_path / "ensemble")
    assert len(load_run(ensemble).folds) == 2
    [averaged] = predict([image], tmp_path / "averaged", ensemble, options)
    assert (_labels(averaged) == _labels(single)).mean() > 0.999


def test_ensemble_stamp_covers_every_fold(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    import torch

    from medseg.io import read_description
    from medseg.runs import load_run

    ensemble = _ensemble(tiny_run, tmp_path / "ensemble")
    before = load_run(ensemble).weights_id
    weights = ensemble / "fold_1" / "model.pt"
    state = torch.load(weights, weights_only=True)
    first = next(iter(state["model"]))
    state["model"][first] = state["model"][first] + 1.0
    torch.save(state, weights)
    assert load_run(ensemble).weights_id != before
    image = demo_dataset / "imagesTr" / "hippocampus_320.nii.gz"
    [out] = predict([image], tmp_path / "out", ensemble, PredictOptions("cpu", formats=("nifti",)))
    assert load_run(ensemble).weights_id in str(read_description(out))


def test_latest_run_finds_an_ensemble(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.runs import latest_run

    _ensemble(tiny_run, tmp_path / "runs" / "cv")
    monkeypatch.chdir(tmp_path)
    assert latest_run() == Path("runs") / "cv"


def test_postprocessing_keeps_largest_components(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    from scipy import ndimage

    from medseg.postprocessing import keep_largest_component

    image = demo_dataset / "imagesTr" / "hippocampus_143.nii.gz"
    options = PredictOptions("cpu", formats=("nifti",))
    [raw] = predict([image], tmp_path / "raw", tiny_run, options)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "postprocessing.json").write_text('{"largest_component": [1, 2]}')
    [cleaned] = predict([image], tmp_path / "cleaned", run, options)
    got = _labels(cleaned)
    np.testing.assert_array_equal(got, keep_largest_component(_labels(raw), [1, 2]))
    for value in (1, 2):
        assert ndimage.label(got == value)[1] <= 1


def test_malformed_postprocessing_is_a_user_error(tiny_run: Path, tmp_path: Path) -> None:
    from medseg.runs import RunError, load_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "postprocessing.json").write_text('{"largest_component": "liver"}')
    with pytest.raises(RunError, match="postprocessing.json"):
        load_run(run)


def test_ensemble_folds_must_match(tiny_run: Path, tmp_path: Path) -> None:
    import json

    from medseg.runs import RunError, load_run

    ensemble = _ensemble(tiny_run, tmp_path / "ensemble")
    plan_file = ensemble / "fold_1" / "plan.json"
    plan = json.loads(plan_file.read_text())
    plan["spacing"] = [2.0, 2.0, 2.0]
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(RunError, match="must share"):
        load_run(ensemble)


# --- input grouping: which files are channels of one case ---


def test_case_file_and_channel_file_of_one_name_collide(tmp_path: Path) -> None:
    """For a model trained on the nnU-Net layout, a.nii.gz and a_0000.nii.gz are both case a."""
    _touch(tmp_path, "a.nii.gz", "a_0000.nii.gz")
    with pytest.raises(ImageError, match="would both be written as a.nii.gz") as info:
        resolve_inputs([tmp_path], 1, channel_suffix=True)
    assert "a_0000.nii.gz" in str(info.value)


def test_four_digit_case_numbers_are_not_channels(tmp_path: Path) -> None:
    """liver_0001 is case liver_0001 for a one-channel model, not channel 1 of case liver."""
    a, b = _touch(tmp_path, "liver_0001.nii.gz", "liver_0002.nii.gz")
    items = resolve_inputs([tmp_path], 1, channel_suffix=True)
    assert items == [("liver_0001", [a]), ("liver_0002", [b])]


def test_a_file_without_channel_suffix_holds_every_channel(tmp_path: Path) -> None:
    """A multi-channel model takes MSD's 4D files (all channels in one) beside channel files."""
    files = _touch(tmp_path, "a_0000.nii.gz", "a_0001.nii.gz", "brats_004.nii.gz")
    items = resolve_inputs([tmp_path], 2, channel_suffix=False)
    assert items == [("a", files[:2]), ("brats_004", [files[2]])]


def _two_channel_msd(demo_dataset: Path, root: Path, n_cases: int = 6) -> list[Path]:
    """An MSD dataset of 4D two-channel images (channels last), as Task01 BraTS stores them."""
    import json

    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries, images = [], []
    for image in sorted((demo_dataset / "imagesTr").glob("*.nii.gz"))[:n_cases]:
        source = nib.load(image)
        data = np.asarray(source.dataobj, dtype=np.float32)
        nib.save(
            nib.Nifti1Image(np.stack([data, 2 * data + 5], -1), source.affine),
            root / "imagesTr" / image.name,
        )
        shutil.copy(demo_dataset / "labelsTr" / image.name, root / "labelsTr" / image.name)
        entries.append({"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{image.name}"})
        images.append(root / "imagesTr" / image.name)
    meta = {
        "modality": {"0": "T1", "1": "T1_rescaled"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": entries,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return images


@pytest.mark.slow
def test_msd_four_dimensional_images_are_predicted(demo_dataset: Path, tmp_path: Path) -> None:
    """predict reads the 4D multi-channel files a model was trained on, as training does."""
    from conftest import TINY

    from medseg.config import load_config
    from medseg.training import train

    images = _two_channel_msd(demo_dataset, tmp_path / "data")
    overrides = [f"data.root={tmp_path / 'data'}", *TINY, "train.epochs=1"]
    run = train(load_config(None, overrides), tmp_path / "run")
    written = predict(images[:2], tmp_path / "out", run, PredictOptions("cpu", formats=("nifti",)))
    assert [p.name for p in written] == [p.name for p in images[:2]]
    import nibabel as nib

    for out, image in zip(written, images, strict=False):
        assert nib.load(out).shape == nib.load(image).shape[:3]
        np.testing.assert_allclose(nib.load(out).affine, nib.load(image).affine, atol=1e-5)


# --- unfinished runs ---


def test_unfinished_run_is_refused_unless_allowed(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medseg.runs import RunError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.pt").unlink()  # stopped during training: only last.pt
    image = demo_dataset / "imagesTr" / "hippocampus_320.nii.gz"
    options = PredictOptions("cpu", formats=("nifti",))
    with pytest.raises(RunError, match="did not finish.*--resume.*--allow-unfinished"):
        predict([image], tmp_path / "out", run, options)
    allowed = PredictOptions("cpu", formats=("nifti",), allow_unfinished=True)
    with caplog.at_level("WARNING", logger="medseg.runs"):
        [out] = predict([image], tmp_path / "out", run, allowed)
    assert out.is_file() and "predicting with it anyway" in caplog.text


def test_ensemble_with_an_unfinished_fold_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    from medseg.config import load_config, replace, save_config
    from medseg.runs import RunError, load_run

    ensemble = _ensemble(tiny_run, tmp_path / "ensemble", folds=2)
    cfg = replace(load_config(tiny_run / "config.yaml"), **{"train.folds": 3})
    save_config(cfg, ensemble / "ensemble.yaml")  # trained with --folds all: 3 folds
    with pytest.raises(RunError, match=r"fold\(s\) 2 of 3 did not finish"):
        load_run(ensemble)
    shutil.copytree(tiny_run, ensemble / "fold_2")
    (ensemble / "fold_2" / "model.pt").unlink()
    with pytest.raises(RunError, match=r"fold\(s\) 2 of 3 did not finish"):
        load_run(ensemble)
    assert len(load_run(ensemble, allow_unfinished=True).folds) == 3
