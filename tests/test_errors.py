"""Bad input gets one clear line, exit code 2 and no partial output; unsafe files are refused.

Each crafted case names what is wrong; the assertion checks the exit code, a message fragment
that says what and where, the absence of a traceback, and that no output file appeared.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app

runner = CliRunner()
Maker = Callable[[Path], list[str]]


def run_cli(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def _demo_image(demo: Path) -> Path:
    return demo / "imagesTr" / "hippocampus_143.nii.gz"


# ---- predict: each maker writes a bad scan into `tmp` and returns the scan arguments ----


def truncated(tmp: Path, demo: Path) -> list[str]:
    data = _demo_image(demo).read_bytes()
    (tmp / "scan.nii.gz").write_bytes(data[: len(data) // 2])
    return [str(tmp / "scan.nii.gz")]


def not_gzip(tmp: Path, demo: Path) -> list[str]:
    (tmp / "scan.nii.gz").write_bytes(os.urandom(2000))
    return [str(tmp / "scan.nii.gz")]


def empty_file(tmp: Path, demo: Path) -> list[str]:
    (tmp / "scan.nii.gz").write_bytes(b"")
    return [str(tmp / "scan.nii.gz")]


def gzip_of_text(tmp: Path, demo: Path) -> list[str]:
    (tmp / "scan.nii.gz").write_bytes(gzip.compress(b"hello, not a NIfTI header" * 20))
    return [str(tmp / "scan.nii.gz")]


def text_as_nrrd(tmp: Path, demo: Path) -> list[str]:
    (tmp / "scan.nrrd").write_text("this is not an NRRD file\n")
    return [str(tmp / "scan.nrrd")]


def png_file(tmp: Path, demo: Path) -> list[str]:
    (tmp / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    return [str(tmp / "photo.png")]


def two_d(tmp: Path, demo: Path) -> list[str]:
    return [str(_nifti(tmp / "scan.nii.gz", np.ones((20, 20), np.float32)))]


def five_d(tmp: Path, demo: Path) -> list[str]:
    return [str(_nifti(tmp / "scan.nii.gz", np.ones((8, 8, 8, 2, 2), np.float32)))]


def two_channels(tmp: Path, demo: Path) -> list[str]:
    return [str(_nifti(tmp / "scan.nii.gz", np.ones((20, 20, 20, 2), np.float32)))]


def nan_voxels(tmp: Path, demo: Path) -> list[str]:
    array = np.ones((20, 20, 20), np.float32)
    array[3, 4, 5] = np.nan
    return [str(_nifti(tmp / "scan.nii.gz", array))]


def inf_voxels(tmp: Path, demo: Path) -> list[str]:
    array = np.ones((20, 20, 20), np.float32)
    array[0, 0, 0] = np.inf
    return [str(_nifti(tmp / "scan.nii.gz", array))]


def sheared(tmp: Path, demo: Path) -> list[str]:
    affine = np.eye(4)
    affine[0, 1] = 0.5  # shear: direction cosines no longer orthonormal
    return [str(_nifti(tmp / "scan.nii.gz", np.ones((20, 20, 20), np.float32), affine))]


def zero_spacing(tmp: Path, demo: Path) -> list[str]:
    path = _nifti(tmp / "scan.nii.gz", np.ones((20, 20, 20), np.float32))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[312:328] = bytes(16)  # srow_z: the sform (read first) loses its z axis
    path.write_bytes(gzip.compress(bytes(raw)))
    return [str(path)]


def missing(tmp: Path, demo: Path) -> list[str]:
    return [str(tmp / "nowhere.nii.gz")]


def empty_folder(tmp: Path, demo: Path) -> list[str]:
    (tmp / "scans").mkdir()
    (tmp / "scans" / "readme.txt").write_text("no images here")
    return [str(tmp / "scans")]


def unsupported_suffix(tmp: Path, demo: Path) -> list[str]:
    (tmp / "scan.txt").write_text("1 2 3")
    return [str(tmp / "scan.txt")]


PREDICT_CASES = {
    "truncated_nifti": (truncated, "scan.nii.gz: cannot read image"),
    "not_gzip": (not_gzip, "scan.nii.gz: cannot read image"),
    "empty_file": (empty_file, "scan.nii.gz: cannot read image"),
    "gzip_of_text": (gzip_of_text, "scan.nii.gz: cannot read image"),
    "text_as_nrrd": (text_as_nrrd, "scan.nrrd: cannot read image"),
    "png": (png_file, "photo.png: not a supported image"),
    "2d_image": (two_d, "expected a 3D image"),
    "5d_image": (five_d, "expected a 3D image"),
    "wrong_channels": (two_channels, "has 2 channel(s), the model takes 1"),
    "nan_voxels": (nan_voxels, "NaN or infinite voxels"),
    "inf_voxels": (inf_voxels, "NaN or infinite voxels"),
    "sheared_direction": (sheared, "direction cosines are not orthonormal"),
    "zero_spacing": (zero_spacing, "invalid voxel spacing"),
    "missing_file": (missing, "nowhere.nii.gz: file not found"),
    "folder_without_images": (empty_folder, "holds no images"),
    "unsupported_suffix": (unsupported_suffix, "scan.txt: not a supported image"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_bad_scan(case: str, tiny_run: Path, demo_dataset: Path, tmp_path: Path) -> None:
    maker, message = PREDICT_CASES[case]
    scans = maker(tmp_path, demo_dataset)
    out = tmp_path / "out"
    code, output = run_cli(["predict", *scans, "--model", str(tiny_run), "--output", str(out)])
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output
    assert not out.exists() or not any(out.iterdir())


# ---- models: missing, incomplete, unsafe ----


class Payload:
    """Pickles to a call that would create a file if it were ever run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.target}",))


def _copy_run(tiny_run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp / "run"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_any_corrupt_checkpoint_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """Random bytes fail in many ways inside the unpickler (KeyError, IndexError, ...)."""
    from medseg.runs import RunError, load_checkpoint

    path = tmp_path / "model.pt"
    rng = np.random.default_rng(0)
    for _ in range(300):
        path.write_bytes(rng.bytes(500))
        with pytest.raises(RunError, match="refusing to load checkpoint"):
            load_checkpoint(path)


def test_malicious_checkpoint_is_refused_and_never_runs(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    run = _copy_run(tiny_run, tmp_path)
    target = tmp_path / "pwned"
    state = torch.load(run / "model.pt", weights_only=True)
    state["extra"] = Payload(target)
    torch.save(state, run / "model.pt")
    code, output = run_cli(
        ["predict", str(_demo_image(demo_dataset)), "--model", str(run), "--output", str(tmp_path)]
    )
    assert code == 2, output
    assert "refusing to load checkpoint" in output
    assert not target.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: [(run / n).unlink() for n in ("model.pt", "last.pt")], "no weights"),
        (lambda run: (run / "config.yaml").unlink(), "not a medseg run folder"),
        (lambda run: (run / "model.pt").write_bytes(os.urandom(500)), "refusing to load"),
        (lambda run: (run / "config.yaml").write_text("train: {epochs: 0}\n"), "train.epochs"),
        (
            lambda run: (run / "config.yaml").write_text("model: {filters: [4, 8, 16, 32]}\n"),
            "weights do not match",
        ),
    ],
    ids=["no_weights", "no_config", "corrupt_weights", "bad_stored_config", "other_network"],
)
def test_broken_model_folder(
    damage: Callable[[Path], object],
    message: str,
    tiny_run: Path,
    demo_dataset: Path,
    tmp_path: Path,
) -> None:
    run = _copy_run(tiny_run, tmp_path)
    damage(run)
    out = tmp_path / "out"
    code, output = run_cli(
        ["predict", str(_demo_image(demo_dataset)), "--model", str(run), "--output", str(out)]
    )
    assert code == 2, output
    assert message in output
    assert not out.exists()


def test_missing_model_folder(demo_dataset: Path, tmp_path: Path) -> None:
    code, output = run_cli(
        ["predict", str(_demo_image(demo_dataset)), "--model", str(tmp_path / "none")]
    )
    assert code == 2 and "model folder not found" in output


# ---- outputs: not writable, disk full ----


def test_output_not_a_folder(tiny_run: Path, demo_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    code, output = run_cli(
        [
            "predict",
            str(_demo_image(demo_dataset)),
            "--model",
            str(tiny_run),
            "--output",
            str(blocker / "out"),
        ]
    )
    assert code == 2, output
    assert "cannot write" in output


def test_disk_full_leaves_nothing(
    tiny_run: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(image: object, filename: str) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    out = tmp_path / "out"
    code, output = run_cli(
        ["predict", str(_demo_image(demo_dataset)), "--model", str(tiny_run), "--output", str(out)]
    )
    assert code == 2, output
    assert "No space left on device" in output
    assert list(out.iterdir()) == []  # neither the output nor its temporary file


# ---- configs ----

CONFIG_CASES = {
    "unknown_key": ("train:\n  epoch: 3\n", "unknown config key train.epoch"),
    "unknown_section": ("trian:\n  epochs: 3\n", "unknown config key trian"),
    "wrong_type": ("train:\n  epochs: many\n", "train.epochs must be an integer"),
    "float_for_int": ("train:\n  batch_size: 2.5\n", "train.batch_size must be an integer"),
    "negative_lr": ("train:\n  lr: -1\n", "train.lr must be > 0"),
    "bad_optimizer": ("train:\n  optimizer: adam2\n", "train.optimizer must be adamw or sgd"),
    "bad_overlap": ("infer:\n  overlap: 1.0\n", "infer.overlap must be in [0, 1)"),
    "bad_dims": ("model:\n  spatial_dims: 4\n", "model.spatial_dims must be 2 or 3"),
    "bad_patch": (
        "model:\n  patch_size: [30, 48, 32]\n",
        "model.patch_size must be multiples of 8",
    ),
    "bad_model_name": ("model:\n  name: resnet9000\n", "model.name 'resnet9000' is unknown"),
    "bad_yaml": ("train: [epochs: 3\n", "not valid YAML"),
    "yaml_python_tag": ("!!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    "not_a_mapping": ("- 1\n- 2\n", "expected a mapping of sections"),
    "bad_spacing": ("data:\n  spacing: [1, 0, 1]\n", "data.spacing must be three positive"),
    "fold_out_of_range": ("train:\n  folds: 5\n  fold: 5\n", "train.fold must be in [0, 4]"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(
    case: str, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, message = CONFIG_CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(text)
    code, output = run_cli(
        ["train", "config.yaml", f"data.root={demo_dataset}", "--run-dir", "runs/x"]
    )
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.epochs"], "must look like section.key=value"),
        (["train=3"], "train must be a mapping"),
        ([], "data.root is not set"),
        (["data.root=/nonexistent"], "dataset.json not found"),
    ],
    ids=["override_without_value", "override_replaces_section", "no_data_root", "missing_root"],
)
def test_bad_override(args: list[str], message: str, tmp_path: Path) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("")
    code, output = run_cli(["train", str(config), *args, "--run-dir", str(tmp_path / "run")])
    assert code == 2, output
    assert message in output


# ---- datasets: `medseg check` lists every problem, `train` refuses to start ----


def _dataset(tmp: Path, demo: Path, n: int = 3) -> Path:
    root = tmp / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = sorted(p.name for p in (demo / "imagesTr").glob("*.nii.gz"))[:n]
    for name in names:
        case = name.removesuffix(".nii.gz")
        shutil.copy(demo / "imagesTr" / name, root / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(demo / "labelsTr" / name, root / "labelsTr" / name)
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _rewrite_label(root: Path, index: int, change: Callable[[nib.Nifti1Image], nib.Nifti1Image]):  # noqa: ANN202
    path = sorted((root / "labelsTr").iterdir())[index]
    nib.save(change(nib.load(path)), path)
    return path.name.removesuffix(".nii.gz")


def shape_mismatch(img: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine)


def shifted_origin(img: nib.Nifti1Image) -> nib.Nifti1Image:
    affine = img.affine.copy()
    affine[:3, 3] += 5.0
    return nib.Nifti1Image(np.asarray(img.dataobj), affine)


def undeclared_value(img: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    return nib.Nifti1Image(data, img.affine)


def fractional_label(img: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    return nib.Nifti1Image(data, img.affine)


DATASET_CASES = {
    "label_shape": (shape_mismatch, "differs from image shape"),
    "label_origin": (shifted_origin, "origin/spacing/direction differ"),
    "undeclared_value": (undeclared_value, "label value(s) [7] not declared in dataset.json"),
    "fractional_label": (fractional_label, "non-integer values"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_dataset_problem_is_reported_before_training(
    case: str, demo_dataset: Path, tmp_path: Path
) -> None:
    change, message = DATASET_CASES[case]
    root = _dataset(tmp_path, demo_dataset)
    name = _rewrite_label(root, 1, change)
    code, output = run_cli(["check", str(root)])
    assert code == 2, output
    assert f"{name}: " in output and message in output
    code, output = run_cli(
        [
            "train",
            "configs/hippocampus_3d.yaml",
            f"data.root={root}",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2, output
    assert "problem(s) found" in output and message in output
    assert not (tmp_path / "run" / "last.pt").exists()


def test_check_lists_every_problem(demo_dataset: Path, tmp_path: Path) -> None:
    root = _dataset(tmp_path, demo_dataset)
    first = _rewrite_label(root, 0, undeclared_value)
    second = _rewrite_label(root, 2, shape_mismatch)
    code, output = run_cli(["check", str(root)])
    assert code == 2
    assert first in output and second in output
    assert "2 problem(s) found" in output


def test_check_clean_dataset(demo_dataset: Path) -> None:
    code, output = run_cli(["check", str(demo_dataset)])
    assert code == 0, output
    assert "10 cases, no problems found" in output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda root: (root / "dataset.json").unlink(), "dataset.json not found"),
        (lambda root: (root / "dataset.json").write_text("{not json"), "not valid JSON"),
        (
            lambda root: [p.unlink() for p in (root / "imagesTr").iterdir()],
            "holds no labelled training cases",
        ),
        (lambda root: next((root / "labelsTr").iterdir()).unlink(), "not found"),
    ],
    ids=["no_dataset_json", "invalid_json", "empty_dataset", "missing_label_file"],
)
def test_broken_dataset_folder(
    edit: Callable[[Path], object], message: str, demo_dataset: Path, tmp_path: Path
) -> None:
    root = _dataset(tmp_path, demo_dataset)
    edit(root)
    code, output = run_cli(["check", str(root)])
    assert code == 2, output
    assert message in output


def test_resume_with_overrides_is_refused(tmp_path: Path) -> None:
    code, output = run_cli(
        [
            "train",
            "configs/hippocampus_3d.yaml",
            "train.epochs=50",
            "--run-dir",
            str(tmp_path),
            "--resume",
        ]
    )
    assert code == 2
    assert "--resume continues" in output and "train.epochs=50" in output


def test_verbose_user_error_keeps_exit_code_2_and_shows_the_traceback(
    demo_dataset: Path, tmp_path: Path
) -> None:
    args = ["evaluate", str(tmp_path / "p"), str(tmp_path / "r")]
    args += ["--labels", str(demo_dataset / "dataset.json")]
    code, output = run_cli(args)
    assert code == 2 and "Traceback" not in output and "folder not found" in output
    code, output = run_cli(["--verbose", *args])
    assert code == 2, output
    assert "Traceback" in output and "EvaluationError" in output and "folder not found" in output


def test_check_lists_every_missing_file(demo_dataset: Path, tmp_path: Path) -> None:
    """Every missing file is listed, with the problems of the cases that are complete."""
    root = _dataset(tmp_path, demo_dataset)
    labels = sorted((root / "labelsTr").iterdir())
    labels[0].unlink()
    labels[1].unlink()
    third = _rewrite_label(root, 0, undeclared_value)  # the third case, now first
    code, output = run_cli(["check", str(root)])
    assert code == 2, output
    assert str(labels[0]) in output and str(labels[1]) in output and third in output
    assert "3 problem(s) found" in output


def test_check_lists_channels_of_different_shapes(demo_dataset: Path, tmp_path: Path) -> None:
    root = _dataset(tmp_path, demo_dataset)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "MRI", "1": "MRI_copy"}
    (root / "dataset.json").write_text(json.dumps(meta))
    for i, image in enumerate(sorted((root / "imagesTr").glob("*_0000.nii.gz"))):
        data = np.asarray(nib.load(image).dataobj)
        second = data[:-1] if i == 1 else data  # the second case's channels differ in shape
        _nifti(
            image.with_name(image.name.replace("_0000", "_0001")), second, nib.load(image).affine
        )
    code, output = run_cli(["check", str(root)])
    assert code == 2, output
    assert "different grid" in output and "Traceback" not in output
    assert "1 problem(s) found" in output
