"""medseg.inference: labels come back on the input grid, voxel for voxel."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import slabs
from medseg.config import ConfigError, load_config
from medseg.inference import (
    Window,
    predict_volume,
    resolve_device,
    scan_interval,
    sliding_window_probabilities,
    tta_axes,
)
from medseg.io import Volume, load_volume, ras_spacing
from medseg.preprocessing_plan import ChannelNorm, Plan


def threshold_predictor(x: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is 1 where the (z-scored) first channel is above its mean."""
    return torch.cat([-x[:, :1], x[:, :1]], dim=1)


def _plan(spacing: tuple[float, float, float]) -> Plan:
    return Plan(spacing, ("MRI",), {0: "background", 1: "bright"}, (ChannelNorm("zscore"),))


def _check_identity(path: Path, roi: tuple[int, ...], tta: tuple[int, ...] = ()) -> None:
    volume = load_volume(path)
    plan = _plan(ras_spacing(volume.affine))  # native spacing: reorientation only
    labels = predict_volume(threshold_predictor, volume, plan, Window(roi, tta=tta))
    expected = volume.array[0] > volume.array[0].mean()
    assert labels.shape == volume.shape
    assert np.issubdtype(labels.dtype, np.integer)
    # Every output voxel labels the input voxel at the same index, hence the same point.
    np.testing.assert_array_equal(labels, expected)


def test_demo_case_round_trip(demo_dataset: Path) -> None:
    _check_identity(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz", (16, 16, 16))


@pytest.mark.parametrize(
    "relative",
    [
        "sct_example/imagesTr/t2_0000.nii.gz",  # PSR orientation
        "sct_example/imagesTr/t2s_0000.nii.gz",  # 0.5 x 0.5 x 7.5 mm
        "spleen_crop/imagesTr/spleen_2_crop_0000.nii.gz",  # 0.8 x 0.8 x 5 mm
        "hippocampus_dicom/Study1/13_HCropVolume",  # DICOM series
    ],
)
@pytest.mark.parametrize("roi", [(32, 32, 16), (32, 32)], ids=["3d", "2d"])
def test_real_geometry_round_trip(shared_data: Path, relative: str, roi: tuple[int, ...]) -> None:
    _check_identity(shared_data / relative, roi)


def test_tta_keeps_flip_invariant_prediction(demo_dataset: Path) -> None:
    path = demo_dataset / "imagesTr" / "hippocampus_149.nii.gz"
    _check_identity(path, (16, 16, 16), tta=(0, 1, 2))


def test_tta_mirrors_only_the_training_mirror_axes(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(overrides=["train.augment.flip_axes=[0, 2]"])
    assert tta_axes(cfg, tta=True) == (0, 2)
    assert tta_axes(cfg, tta=False) == ()
    flat = load_config(
        overrides=[
            "model.spatial_dims=2",
            "model.patch_size=[64, 64]",
            "train.augment.flip_axes=[1, 2]",
        ]
    )
    assert tta_axes(flat, tta=True) == (1,)  # 2D: in-plane axes only
    with caplog.at_level(logging.WARNING, logger="medseg.inference"):
        assert tta_axes(load_config(), tta=True) == ()  # trained without mirroring
    assert "TTA skipped" in caplog.text


def test_resampled_prediction_lands_on_input_grid(shared_data: Path) -> None:
    volume = load_volume(shared_data / "sct_example/imagesTr/t2s_0000.nii.gz")
    window = Window((32, 32, 16))
    labels = predict_volume(threshold_predictor, volume, _plan((1.0, 1.0, 1.0)), window)
    expected = volume.array[0] > volume.array[0].mean()
    assert labels.shape == volume.shape
    assert (labels == expected).mean() > 0.85  # resampling to 1 mm and back blurs edges only


def test_probabilities_sum_to_one() -> None:
    image = torch.randn(1, 20, 24, 12)
    probs = sliding_window_probabilities(threshold_predictor, image, Window((16, 16, 8), 0.5))
    assert probs.shape == (2, 20, 24, 12)
    torch.testing.assert_close(probs.sum(0), torch.ones(20, 24, 12))


def test_cuda_request_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")


# --- streaming vs the reference path (MONAI sliding window on the whole image, Invertd) ---


def reference_labels(
    predictor: Callable[[torch.Tensor], torch.Tensor], volume: Volume, plan: Plan, window: Window
) -> np.ndarray:
    """The pre-streaming implementation: all-class probabilities on the input grid, argmax."""
    from monai import transforms as mt
    from monai.data import MetaTensor
    from monai.inferers import SliceInferer, sliding_window_inference

    from medseg.transforms import IMAGE, preprocessing

    pre = mt.Compose(preprocessing(plan, keys=[IMAGE]))
    data = pre({IMAGE: volume})
    image = data[IMAGE]
    x, roi = image.as_tensor()[None], window.roi_size
    with torch.inference_mode():
        if len(roi) == 2:
            inferer = SliceInferer(
                roi_size=roi, sw_batch_size=window.batch_size, overlap=window.overlap,
                mode="gaussian", spatial_dim=2,
            )  # fmt: skip
            logits = inferer(x, predictor)
        else:
            logits = sliding_window_inference(
                x, roi, window.batch_size, predictor, overlap=window.overlap, mode="gaussian"
            )
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    data["pred"] = MetaTensor(torch.softmax(logits.float(), 1)[0], affine=image.affine, meta=meta)
    data["pred"].applied_operations = list(image.applied_operations)
    inverse = mt.Invertd(keys="pred", transform=pre, orig_keys=IMAGE, nearest_interp=False)
    return torch.argmax(inverse(data)["pred"], dim=0).numpy()


def random_network(classes: int, spatial_dims: int) -> torch.nn.Module:
    """A fixed random convolutional net: position-dependent, noisy, many label boundaries."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    net = torch.nn.Sequential(
        conv(1, 8, 5, padding=2), torch.nn.Tanh(), conv(8, classes, 3, padding=1)
    )
    for p in net.parameters():
        p.data *= 3
    return net.eval()


def per_label_dice(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    values = np.union1d(np.unique(a), np.unique(b))
    return {
        int(v): 2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in values
    }


AGREEMENT_CASES = [
    ("demo", None, (16, 16, 16), 3),
    ("demo", None, (32, 32), 12),
    ("sct_example/imagesTr/t2_0000.nii.gz", None, (32, 32, 16), 12),  # PSR orientation
    ("sct_example/imagesTr/t2s_0000.nii.gz", (1.0, 1.0, 1.0), (32, 32, 16), 12),  # 7.5 mm -> 1
    ("sct_example/imagesTr/t2s_0000.nii.gz", (1.0, 1.0, 1.0), (32, 32), 3),
]


@pytest.mark.parametrize(("relative", "spacing", "roi", "classes"), AGREEMENT_CASES)
def test_streaming_agrees_with_reference(
    request: pytest.FixtureRequest,
    relative: str,
    spacing: tuple[float, float, float] | None,
    roi: tuple[int, ...],
    classes: int,
) -> None:
    if relative == "demo":
        path = request.getfixturevalue("demo_dataset") / "imagesTr" / "hippocampus_165.nii.gz"
    else:
        path = request.getfixturevalue("shared_data") / relative
    volume = load_volume(path)
    labels = {v: f"class{v}" for v in range(classes)}
    plan = Plan(spacing or ras_spacing(volume.affine), ("MRI",), labels, (ChannelNorm("zscore"),))
    net = random_network(classes, len(roi))
    window = Window(roi, overlap=0.5, batch_size=3)
    got = predict_volume(net, volume, plan, window)
    want = reference_labels(net, volume, plan, window)
    assert got.shape == want.shape == volume.shape
    assert min(per_label_dice(got, want).values()) >= 0.99
    assert (got == want).mean() > 0.999  # in practice identical


@pytest.mark.parametrize("dense", [False, True], ids=["boundary-path", "dense-path"])
def test_both_mapping_paths_agree_with_reference(
    shared_data: Path, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slabs, "_dense_is_cheaper", lambda share, unsure, k: dense)
    volume = load_volume(shared_data / "sct_example/imagesTr/t2s_0000.nii.gz")  # 7.5 mm slices
    plan = Plan(
        (1.0, 1.0, 1.0), ("MRI",), {v: f"c{v}" for v in range(12)}, (ChannelNorm("zscore"),)
    )
    net = random_network(12, 3)
    window = Window((32, 32, 16), overlap=0.5, batch_size=3)
    got = predict_volume(net, volume, plan, window)
    want = reference_labels(net, volume, plan, window)
    assert (got == want).mean() > 0.999


def test_mapping_cost_model() -> None:
    # bench_mapping.py's cases: a trained 118-class model's organ boundaries, an unsure one,
    # two random classes
    assert not slabs._dense_is_cheaper(share=0.27, unsure=0.0, n_classes=118)
    assert slabs._dense_is_cheaper(share=1.0, unsure=1.0, n_classes=118)
    assert slabs._dense_is_cheaper(share=0.99, unsure=0.0, n_classes=2)
    assert not slabs._dense_is_cheaper(share=0.0, unsure=1.0, n_classes=2)


# --- skipping empty windows ---


class CountingPredictor:
    """threshold_predictor that counts the windows it sees."""

    def __init__(self) -> None:
        self.windows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return threshold_predictor(x)


def _ct_plan(volume: Volume) -> Plan:
    norm = ChannelNorm("ct", lower=-900.0, upper=1500.0, mean=50.0, std=300.0)
    return Plan(ras_spacing(volume.affine), ("CT",), {0: "background", 1: "body"}, (norm,))


def test_empty_windows_are_skipped_with_the_same_mask(shared_data: Path) -> None:
    scan = load_volume(shared_data / "totalseg_examples/CT/imagesTr/example_ct_sm_0000.nii.gz")
    # A scanner's field of view holds air around the body; this crop holds almost none.
    array = np.pad(scan.array, ((0, 0), (24, 24), (24, 24), (0, 0)), constant_values=-1024.0)
    volume = Volume(array, scan.affine, scan.source)
    plan = _ct_plan(volume)
    full, skipping = CountingPredictor(), CountingPredictor()
    roi = (32, 32, 16)
    want = predict_volume(full, volume, plan, Window(roi, skip_empty=False))
    got = predict_volume(skipping, volume, plan, Window(roi, skip_empty=True))
    np.testing.assert_array_equal(got, want)
    assert 0 < skipping.windows < full.windows  # air around the body was not run


def test_empty_slices_are_skipped_in_2d() -> None:
    array = np.full((1, 40, 40, 24), -1000.0, np.float32)
    array[0, 10:30, 12:28, 5:15] = 400.0  # a body in 10 of 24 slices; air elsewhere
    volume = Volume(array, np.diag([0.8, 0.8, 2.0, 1.0]), Path("synthetic.nii.gz"))
    plan, counter = _ct_plan(volume), CountingPredictor()
    labels = predict_volume(counter, volume, plan, Window((32, 32)))
    np.testing.assert_array_equal(labels, array[0] > -900)
    assert counter.windows == 10 * 4  # 2x2 windows in each of the 10 body slices


def test_background_when_everything_is_empty() -> None:
    volume = Volume(np.full((1, 20, 20, 20), -1024.0, np.float32), np.eye(4), Path("air.nii"))
    counter = CountingPredictor()
    labels = predict_volume(counter, volume, _ct_plan(volume), Window((16, 16, 16)))
    assert counter.windows == 0 and not labels.any()


# --- bounded memory: slabs, never the whole image ---


@pytest.mark.parametrize("roi", [(16, 16, 8), (16, 16)], ids=["3d", "2d"])
def test_slabs_are_bounded(roi: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.inference
    from medseg.slabs import SlabMapper

    seen: list[tuple[int, ...]] = []

    class Recording(SlabMapper):
        def add(self, slab):  # noqa: ANN001, ANN202
            seen.append(tuple(slab.probs.shape))
            super().add(slab)

    monkeypatch.setattr(medseg.inference, "SlabMapper", Recording)
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(size=(1, 24, 20, 120)).astype(np.float32), np.eye(4), Path("x"))
    plan = Plan((1.0, 1.0, 1.0), ("MRI",), {0: "a", 1: "b"}, (ChannelNorm("zscore"),))
    labels = predict_volume(threshold_predictor, volume, plan, Window(roi))
    np.testing.assert_array_equal(labels, volume.array[0] > volume.array[0].mean())
    depth = roi[2] + 1 if len(roi) == 3 else medseg.inference.SLICE_CHUNK + 1
    assert len(seen) > 3 and all(s[-1] <= depth for s in seen)
    assert sum(s[-1] for s in seen) - (len(seen) - 1) == 120  # one shared plane per seam


MEMORY_PROBE = """
import resource, sys
import numpy as np, torch
from pathlib import Path
from medseg.inference import Window, predict_volume
from medseg.io import Volume
from medseg.preprocessing_plan import ChannelNorm, Plan

classes, shape = 40, (192, 192, 96)
grid = np.meshgrid(*(np.linspace(0, 3, n, dtype=np.float32) for n in shape), indexing="ij")
array = np.sin(grid[0] + grid[1] * grid[2])[None]  # smooth: labels change in bands
volume = Volume(array, np.diag([0.5, 0.5, 0.5, 1.0]), Path("x"))
names = {v: str(v) for v in range(classes)}
plan = Plan((2.0, 2.0, 2.0), ("MRI",), names, (ChannelNorm("zscore"),))
scale = torch.arange(classes, dtype=torch.float32).view(1, -1, 1, 1, 1) - classes / 2
predictor = lambda x: x * scale  # noqa: E731
predict_volume(predictor, Volume(array[:, :32, :32, :32], volume.affine, Path("y")), plan,
               Window((16, 16, 8)))  # warm-up: allocator pools, lazy imports
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = predict_volume(predictor, volume, plan, Window((16, 16, 8)))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, labels.shape == shape)
"""


def test_input_resolution_map_is_never_held_for_all_classes() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True
    )
    growth, right_shape = result.stdout.split()
    all_classes = 40 * 192 * 192 * 96 * 4  # float32 probabilities on the input grid: 566 MB
    assert right_shape == "True"
    assert int(growth) < all_classes / 4


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize(("size", "roi"), [((64, 40, 17), (32, 40, 16)), ((5, 9, 100), (5, 3, 1))])
def test_scan_interval_places_windows_as_monai(size, roi, overlap: float) -> None:
    from monai.inferers.utils import _get_scan_interval  # the rule medseg must reproduce

    assert scan_interval(size, roi, overlap) == _get_scan_interval(size, roi, 3, (overlap,) * 3)


def test_empty_windows_are_skipped_for_nonzero_region_normalisation() -> None:
    """Zero padding around a skull-stripped scan is 0 after z-scoring over the nonzero region,
    below the mean but equal to no tissue: those windows are skipped, the mask is the same."""
    rng = np.random.default_rng(0)
    brain = rng.uniform(100.0, 900.0, (24, 24, 12)).astype(np.float32)
    array = np.pad(brain, ((20, 20), (20, 20), (0, 0)))[None]
    volume = Volume(array, np.diag([1.0, 1.0, 2.0, 1.0]), Path("stripped.nii.gz"))
    plan = Plan(
        (1.0, 1.0, 2.0),
        ("T1",),
        {0: "background", 1: "bright"},
        (ChannelNorm("zscore", nonzero_mask=True),),
    )
    full, skipping = CountingPredictor(), CountingPredictor()
    roi = (16, 16, 12)
    want = predict_volume(full, volume, plan, Window(roi, skip_empty=False))
    got = predict_volume(skipping, volume, plan, Window(roi, skip_empty=True))
    np.testing.assert_array_equal(got, want)
    assert want.any() and 0 < skipping.windows < full.windows


def _oblique_lps_volume(shape: tuple[int, int, int] = (37, 29, 11)) -> Volume:
    """A smooth random volume on an oblique grid stored in LPS order, 0.7 x 0.9 x 3 mm."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(7)
    array = ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32)
    affine = np.eye(4)
    rotation = Rotation.from_euler("zyx", [20.0, -8.0, 12.0], degrees=True).as_matrix()
    lps = np.diag([-1.0, -1.0, 1.0])  # voxel axes run right-to-left and anterior-to-posterior
    affine[:3, :3] = rotation @ lps @ np.diag([0.7, 0.9, 3.0])
    affine[:3, 3] = (40.0, -25.0, 10.0)
    return Volume(array[None], affine, Path("oblique.nii.gz"))


@pytest.mark.parametrize("classes", [3, 12])
@pytest.mark.parametrize("dense", [False, True], ids=["boundary-path", "dense-path"])
def test_streaming_equals_monai_invertd_on_an_oblique_lps_anisotropic_grid(
    classes: int, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Voxel for voxel the labels of MONAI's sliding window on the whole image, Invertd of the
    probabilities (trilinear) and their argmax; both mapping paths of `medseg.slabs`."""
    monkeypatch.setattr(slabs, "_dense_is_cheaper", lambda share, unsure, k: dense)
    volume = _oblique_lps_volume()
    labels = {v: f"class{v}" for v in range(classes)}
    plan = Plan((1.0, 1.1, 1.6), ("MRI",), labels, (ChannelNorm("zscore"),))
    net = random_network(classes, 3)
    window = Window((16, 16, 8), overlap=0.5, batch_size=3, skip_empty=False)
    got = predict_volume(net, volume, plan, window)
    want = reference_labels(net, volume, plan, window)
    assert len(np.unique(want)) == classes  # many boundaries to map
    np.testing.assert_array_equal(got, want)
