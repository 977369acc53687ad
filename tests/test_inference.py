"""medseg.inference: labels come back on the input grid, voxel for voxel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import ConfigError
from medseg.inference import Window, predict_volume, resolve_device, sliding_window_probabilities
from medseg.io import load_volume, ras_spacing
from medseg.planning import ChannelNorm, Plan


def threshold_predictor(x: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is 1 where the (z-scored) first channel is above its mean."""
    return torch.cat([-x[:, :1], x[:, :1]], dim=1)


def _plan(spacing: tuple[float, float, float]) -> Plan:
    return Plan(spacing, ("MRI",), {0: "background", 1: "bright"}, (ChannelNorm("zscore"),))


def _check_identity(path: Path, roi: tuple[int, ...], tta: bool = False) -> None:
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
    _check_identity(demo_dataset / "imagesTr" / "hippocampus_149.nii.gz", (16, 16, 16), tta=True)


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
