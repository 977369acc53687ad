"""medseg.transforms: label types, the preprocessed cache, slice-wise plans along any axis,
normalisation over the nonzero region, and run folders written before these existed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt

from medseg import training
from medseg.config import load_config
from medseg.datasets import load_dataset
from medseg.inference import Window, predict_volume
from medseg.io import Volume, load_volume
from medseg.preprocessing_plan import ChannelNorm, Plan, load_plan, make_plan
from medseg.training.trainer import _Augmented, _cached, _items
from medseg.transforms import (
    IMAGE,
    LABEL,
    LoadCased,
    NormalizeChannelsd,
    background_floor,
    cached_label_dtype,
    preprocessing,
    train_transforms,
)

MRI = (ChannelNorm("zscore"),)


def _volume(array: np.ndarray, spacing: tuple[float, float, float], origin=(0.0, 0.0, 0.0)):
    """A one-channel in-memory volume with a diagonal (RAS) affine."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return Volume(array[None].astype(np.float32), affine, Path("synthetic.nii.gz"))


def _image(plan: Plan, volume: Volume) -> torch.Tensor:
    return mt.Compose(preprocessing(plan, keys=[IMAGE]))({IMAGE: volume})[IMAGE]


# ---- labels in the cache ----


@pytest.mark.parametrize(
    ("top", "dtype"), [(2, torch.int8), (127, torch.int8), (128, torch.int16), (300, torch.int16)]
)
def test_label_dtype_is_the_smallest_signed_integer_type(top: int, dtype: torch.dtype) -> None:
    assert cached_label_dtype({0: "background", top: "x"}) == dtype


def test_cached_labels_are_int8_and_train_as_long(demo_dataset: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"data.root={demo_dataset}",
            "train.augment.affine_prob=1.0",  # the nearest-neighbour RandAffined path too
            "train.augment.flip_axes=[0,1,2]",
        ],
    )
    dataset = load_dataset(demo_dataset)
    plan = make_plan(dataset, cfg)
    fixed, random = train_transforms(cfg, plan)
    items = _items(list(dataset.cases[:2]))
    cached = _cached(items, fixed, cfg.data, plan, tmp_path / "unused")
    item = cached[0]
    assert item[LABEL].dtype == torch.int8 and item[IMAGE].dtype == torch.float32
    assert set(torch.unique(item[LABEL]).tolist()) == {0, 1, 2}
    batch_item = _Augmented(cached, random)[0]
    assert batch_item[LABEL].dtype == torch.long
    assert tuple(batch_item[LABEL].shape[1:]) == cfg.model.patch_size
    assert set(torch.unique(batch_item[LABEL]).tolist()) <= {0, 1, 2}


class _FloatLabels(torch.utils.data.Dataset):
    """The cached items with float32 labels, as medseg cached them before."""

    def __init__(self, base) -> None:  # noqa: ANN001 - a MONAI dataset
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        item[LABEL] = item[LABEL].float()
        return item


def test_small_integer_labels_sample_the_same_patches_as_float_labels(
    demo_dataset: Path, tmp_path: Path
) -> None:
    """Seed for seed, the training patches of the compact cache are those of float32 labels:
    with uint8 labels MONAI's sampler took foreground voxels for background ones."""
    from monai.data.utils import set_rnd
    from monai.transforms.utils import map_binary_to_indices

    cfg = load_config(None, [f"data.root={demo_dataset}", "train.augment.affine_prob=0.5"])
    dataset = load_dataset(demo_dataset)
    plan = make_plan(dataset, cfg)
    fixed, random = train_transforms(cfg, plan)
    cached = _cached(_items(list(dataset.cases[:3])), fixed, cfg.data, plan, tmp_path / "unused")
    label = cached[0][LABEL]
    foreground, background = map_binary_to_indices(label)
    assert len(foreground) + len(background) == label.numel()  # none counted twice
    patches = []
    for items in (cached, _FloatLabels(cached)):
        set_rnd(random, seed=3)
        augmented = _Augmented(items, random)
        patches.append([augmented[i % 3] for i in range(12)])
    for compact, wide in zip(*patches, strict=True):
        assert torch.equal(compact[IMAGE], wide[IMAGE]) and torch.equal(compact[LABEL], wide[LABEL])


@pytest.mark.slow
def test_disk_cache_trains_end_to_end(tmp_path: Path, tiny_overrides: list[str]) -> None:
    cache = tmp_path / "cache"
    overrides = [*tiny_overrides, "train.epochs=1", "data.cache=disk", f"data.cache_dir={cache}"]
    run_dir = training.train(load_config(None, overrides), tmp_path / "run")
    assert (run_dir / "model.pt").is_file()
    assert load_config(run_dir / "config.yaml").data.cache == "disk"
    [folder] = cache.iterdir()  # one folder per preprocessing
    files = sorted(folder.glob("*.pt"))
    # written when a case is first used: the 2 validation cases and the sampled training ones
    assert 2 < len(files) <= 10
    default = [*tiny_overrides, "train.epochs=1", "data.cache=disk"]
    run_dir = training.train(load_config(None, default), tmp_path / "default")
    assert len(list((run_dir / "cache").glob("*/*.pt"))) == len(files)  # in the run folder
    for file in files:
        item = torch.load(file, weights_only=True)  # tensors and plain data only
        assert item[LABEL].dtype == torch.int8 and item[IMAGE].dtype == torch.float32


# ---- slice-wise plans keep their slices ----


def test_2d_plans_do_not_interpolate_across_slices() -> None:
    array = np.zeros((16, 7, 20), np.float32)
    for j in range(7):
        array[:, j, :] = 10 * j + 1  # coronal slices of constant value
    volume = _volume(array, (1.0, 2.5, 1.0))
    plan = Plan((0.7, 1.0, 0.7), ("MRI",), {0: "bg", 1: "x"}, (ChannelNorm("none"),), "msd", 1)
    image = _image(plan, volume)[0]
    assert image.shape[-1] == 7  # slices last, none added
    assert [torch.unique(image[..., j]).tolist() for j in range(7)] == [
        [10.0 * j + 1] for j in range(7)
    ]
    assert tuple(image.shape[:2]) == (22, 28)  # in-plane resampled to 0.7 mm


ORIENTATIONS = {
    "ras": np.diag([0.9, 1.1, 1.3]),
    # array axes -> world y (A), z flipped (I), x flipped (L): stored like no RAS file
    "permuted": np.array([[0.0, 0.0, -1.3], [0.9, 0.0, 0.0], [0.0, -1.1, 0.0]]),
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("singleton", [0, 1, 2])
def test_slice_wise_prediction_lands_on_the_input_grid(singleton: int, orientation: str) -> None:
    """A single slice along any axis, stored in any orientation, through preprocessing, the
    2D window and back: each voxel's label is its own intensity's (nothing is resampled)."""
    shape = [18, 22, 26]
    shape[singleton] = 1
    array = np.random.default_rng(singleton).uniform(0, 1, shape).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = ORIENTATIONS[orientation], (5.0, -7.0, 3.0)
    volume = Volume(array[None], affine, Path("synthetic.nii.gz"))
    ras_axis = [int(np.argmax(np.abs(affine[:3, k]))) for k in range(3)]  # array axis -> RAS
    spacing = tuple(float(np.abs(affine[:3, ras_axis.index(a)]).max()) for a in range(3))
    plan = Plan(
        spacing,
        ("MRI",),
        {0: "bg", 1: "bright"},
        (ChannelNorm("none"),),
        "msd",
        ras_axis[singleton],
    )

    def bright(x: torch.Tensor) -> torch.Tensor:  # (B, 1, a, b) -> logits of "x > 0.5"
        return torch.cat([torch.zeros_like(x), x - 0.5], dim=1)

    labels = predict_volume(bright, volume, plan, Window((16, 16), skip_empty=False))
    assert labels.shape == tuple(shape)
    np.testing.assert_array_equal(labels, (array > 0.5).astype(labels.dtype))


def _coronal_dataset(demo_dataset: Path, root: Path, n_cases: int = 6) -> None:
    """An nnU-Net dataset of single coronal slices (X, 1, Z) cut from the demo cases."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for image in sorted((demo_dataset / "imagesTr").glob("*.nii.gz"))[:n_cases]:
        case = image.name.removesuffix(".nii.gz")
        source = nib.load(image)
        labels = np.asarray(nib.load(demo_dataset / "labelsTr" / image.name).dataobj)
        y = int(np.argmax((labels > 0).sum(axis=(0, 2))))  # the slice with most foreground
        affine = source.affine @ np.array([[1, 0, 0, 0], [0, 3, 0, y], [0, 0, 1, 0], [0, 0, 0, 1]])
        data = np.asarray(source.dataobj, dtype=np.float32)[:, y : y + 1]
        nib.save(nib.Nifti1Image(data, affine), root / "imagesTr" / f"{case}_0000.nii.gz")
        label = labels[:, y : y + 1].astype(np.uint8)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
    meta = {
        "channel_names": {"0": "MRI"},
        "file_ending": ".nii.gz",
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": n_cases,
    }
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.slow
def test_coronal_slices_plan_train_and_predict_on_their_grid(
    tmp_path: Path, demo_dataset: Path
) -> None:
    from medseg.config import with_overrides
    from medseg.planner import plan_dataset
    from medseg.runs import load_run

    root = tmp_path / "coronal"
    _coronal_dataset(demo_dataset, root)
    cfg, _ = plan_dataset(root, memory_gb=4, device="cpu")
    assert cfg.model.spatial_dims == 2 and cfg.model.slice_axis == 1  # no 16-slice padding
    assert len(cfg.model.patch_size) == 2
    tiny = ["train.epochs=1", "train.iterations_per_epoch=2", "train.val_every=1"]
    run_dir = training.train(with_overrides(cfg, tiny), tmp_path / "run")
    run = load_run(run_dir)
    assert run.plan.slice_axis == 1
    case = next((root / "imagesTr").glob("*.nii.gz"))
    volume = load_volume([case])
    labels = predict_volume(
        lambda x: run.network(x), volume, run.plan, Window(run.config.model.patch_size)
    )
    assert labels.shape == volume.shape == nib.load(case).shape


# ---- z-score over the nonzero region ----


def _brain(size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A ball of positive intensities with a zero-valued hole inside, zero around it; and the
    ball (the brain, hole included)."""
    grid = np.indices((size,) * 3) - (size - 1) / 2
    radius = np.sqrt((grid**2).sum(0))
    ball = radius < size / 2 - 2
    brain = np.where(ball, np.random.default_rng(0).uniform(50, 150, radius.shape), 0.0)
    brain[radius < 1.5] = 0.0  # dark voxels inside the brain (e.g. stored as 0)
    return brain.astype(np.float32), ball


def test_nonzero_normalisation_does_not_depend_on_the_field_of_view() -> None:
    brain, ball = _brain()
    padded = np.zeros((48, 48, 48), np.float32)
    padded[12:36, 12:36, 12:36] = brain
    masked = (ChannelNorm("zscore", nonzero_mask=True),)
    small, large = (
        _image(Plan((1.0, 1.0, 1.0), ("MRI",), {0: "bg"}, norms), _volume(a, (1, 1, 1)))[0]
        for a, norms in ((brain, masked), (padded, masked))
    )
    np.testing.assert_allclose(large[12:36, 12:36, 12:36], small, atol=1e-5)
    assert float(large.abs()[:12].max()) == 0.0  # outside the brain: 0
    values = torch.from_numpy(brain[ball])  # statistics of the brain, its hole included
    expected = (torch.from_numpy(brain) - values.mean()) / values.std()
    np.testing.assert_allclose(small[ball], expected[ball], atol=1e-5)
    assert float(small[12, 12, 12]) < -2  # the hole is normalised with the brain, not set to 0
    # over the whole field of view (the old behaviour) the brain's values depend on the padding
    plain = _image(Plan((1.0, 1.0, 1.0), ("MRI",), {0: "bg"}, MRI), _volume(padded, (1, 1, 1)))
    whole = _image(Plan((1.0, 1.0, 1.0), ("MRI",), {0: "bg"}, MRI), _volume(brain, (1, 1, 1)))
    assert not np.allclose(plain[0, 12:36, 12:36, 12:36], whole[0], atol=1e-2)


def test_multichannel_mask_is_shared_and_no_single_background_value() -> None:
    brain, _ = _brain(16)
    image = torch.from_numpy(np.stack([brain, 2 * brain + 3 * (brain > 0)]))
    norms = (ChannelNorm("zscore", nonzero_mask=True), ChannelNorm("zscore", nonzero_mask=True))
    out = NormalizeChannelsd(norms, ("T1", "T2"))({IMAGE: _meta(image)})[IMAGE]
    assert torch.equal(out[0] == 0, out[1] == 0)
    # 0 outside the brain is above dark tissue: empty windows are those equal to it
    assert float(out[0].min()) < 0 and background_floor(out[0], norms[0]) == 0.0
    assert background_floor(out[0], MRI[0]) == float(out[0].min())


def _meta(array: torch.Tensor):  # noqa: ANN202 - MetaTensor
    from monai.data import MetaTensor

    return MetaTensor(array.float(), affine=torch.eye(4, dtype=torch.float64))


# ---- run folders written before slice axes, masks and cache modes ----


def test_old_run_files_preprocess_as_before(tmp_path: Path, demo_dataset: Path) -> None:
    """plan.json and config.yaml as medseg wrote them before: a 2D run resampled z too."""
    (tmp_path / "plan.json").write_text(
        json.dumps(
            {
                "spacing": [1.0, 1.0, 2.0],
                "channels": ["MRI"],
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "normalization": [
                    {"scheme": "zscore", "lower": 0.0, "upper": 0.0, "mean": 0.0, "std": 1.0}
                ],
                "layout": "msd",
            }
        )
    )
    (tmp_path / "config.yaml").write_text(
        f"data:\n  root: {demo_dataset}\n  spacing: [1.0, 1.0, 2.0]\n  normalization: auto\n"
        "  cache: true\nmodel:\n  spatial_dims: 2\n  patch_size: [32, 48]\n"
    )
    cfg, plan = load_config(tmp_path / "config.yaml"), load_plan(tmp_path / "plan.json")
    assert cfg.data.cache == "memory" and not cfg.data.nonzero_mask
    assert plan.slice_axis is None and not plan.normalization[0].nonzero_mask
    case = load_dataset(demo_dataset).cases[0]
    before = mt.Compose(  # the pipeline those runs were trained and predicted with
        [
            LoadCased(plan.labels),
            mt.Orientationd(keys=[IMAGE], axcodes="RAS"),
            mt.Spacingd(keys=[IMAGE], pixdim=(1.0, 1.0, 2.0), mode="bilinear"),
            NormalizeChannelsd(plan.normalization, plan.channels),
        ]
    )
    expected = before({IMAGE: list(case.images)})[IMAGE]
    now = _image(plan, load_volume(list(case.images)))
    assert torch.equal(now.as_tensor(), expected.as_tensor())
    assert load_config(overrides=["data.cache=false"]).data.cache == "off"
