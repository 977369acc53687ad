"""medseg.preprocessing_plan and medseg.planner: spacing rule, strides, memory-fitted patch
and batch, CLI."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import ConfigError, ModelConfig, downsampling_factors, load_config
from medseg.datasets import load_dataset
from medseg.fingerprint import CaseGeometry, Fingerprint, IntensityStats, LabelStats
from medseg.memory_model import (
    GPU_REFERENCE_GIB,
    MemoryBudget,
    cache_gib,
    estimate_memory_gib,
    memory_budget,
)
from medseg.models import build_model
from medseg.planner import (
    CPU_MAX_PATCH_VOXELS,
    GPU_MAX_PATCH_VOXELS,
    choose_slice_axis,
    cross_validation_folds,
    flip_axes,
    network_for,
    plan_config,
    plan_dataset,
    planned_keys,
    pool_strides,
    resampled_shapes,
    shrink_to_image_fraction,
    summary,
    target_spacing,
)
from medseg.preprocessing_plan import median_spacing

runner = CliRunner()
CPU_8 = MemoryBudget("cpu", 8.0, "test")


def _fingerprint(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    n_cases: int = 100,
    labels: tuple[str, ...] = ("organ",),
    channels: tuple[str, ...] = ("CT",),
    nonzero: float = 1.0,
) -> Fingerprint:
    """A synthetic fingerprint of `n_cases` identical cases (planning is pure)."""
    names = {0: "background", **{i + 1: name for i, name in enumerate(labels)}}
    return Fingerprint(
        dataset="/data/synthetic",
        layout="nnunet",
        channels=channels,
        labels=names,
        cases=tuple(CaseGeometry(f"c{i}", shape, spacing, nonzero) for i in range(n_cases)),
        intensities=tuple(IntensityStats(c, 0, 1, 0, -1, 1, -2, 2) for c in channels),
        label_stats=tuple(LabelStats(v, n, 1.0, 5e4, 50.0) for v, n in names.items() if v),
    )


def _forward(model: ModelConfig, in_channels: int, n_classes: int) -> torch.Size:
    net = build_model(model, in_channels, n_classes).eval()
    with torch.no_grad():
        return net(torch.zeros(1, in_channels, *model.patch_size)).shape


# ---- pure rules ----


@pytest.mark.parametrize(
    ("spacings", "expected"),
    [
        ([[1, 1, 1], [1, 1, 1.2], [0.9, 0.9, 1]], (1, 1, 1)),
        # anisotropic: the z target is the 10th percentile of z spacings, not the median (5)
        ([[0.8, 0.8, 5]] * 8 + [[0.8, 0.8, 2]] * 2, (0.8, 0.8, 2)),
        # ... but never finer than the next-coarsest axis
        ([[0.8, 0.8, 5]] * 8 + [[0.8, 0.8, 0.5]] * 2, (0.8, 0.8, 0.8)),
        # the low-resolution axis can be any axis
        ([[6, 1, 1]] * 9 + [[3, 1, 1]], (pytest.approx(5.7), 1, 1)),
    ],
    ids=["isotropic", "anisotropic", "anisotropic_clipped", "anisotropic_x"],
)
def test_target_spacing(spacings: list[list[float]], expected: tuple[float, ...]) -> None:
    spacing = target_spacing(np.array(spacings, dtype=float))
    assert spacing == pytest.approx(expected)


def test_median_spacing_reads_headers(demo_dataset: Path) -> None:
    assert median_spacing(load_dataset(demo_dataset)) == pytest.approx((1, 1, 1), abs=1e-4)


@pytest.mark.parametrize(
    ("patch", "spacing", "expected"),
    [
        ((40, 56, 40), (1, 1, 1), [[1, 1, 1]] + [[2, 2, 2]] * 3),
        # 0.8 x 0.8 x 5 mm: z waits until in-plane pooling makes the spacings comparable
        (
            (192, 192, 28),
            (0.8, 0.8, 5.0),
            [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
        ),
        # thin stack: z stops at a 4-voxel feature map, x and y go on
        ((160, 160, 16), (1, 1, 1), [[1, 1, 1]] + [[2, 2, 2]] * 2 + [[2, 2, 1]] * 3),
        ((256, 256), (1, 1), [[1, 1]] + [[2, 2]] * 6),
    ],
    ids=["isotropic", "anisotropic", "thin", "2d"],
)
def test_pool_strides(
    patch: tuple[int, ...], spacing: tuple[float, ...], expected: list[list[int]]
) -> None:
    assert pool_strides(patch, spacing) == expected


@pytest.mark.parametrize("round_down", [False, True], ids=["up", "down"])
@pytest.mark.parametrize(
    ("patch", "spacing"),
    [((35, 51, 35), (1, 1, 1)), ((70, 66, 10), (0.8, 0.8, 5)), ((30, 17, 20), (1, 2, 3))],
)
def test_network_patch_divisible_by_strides(
    patch: tuple[int, ...], spacing: tuple[float, ...], round_down: bool
) -> None:
    model = network_for(patch, spacing, round_down)
    factors = downsampling_factors(model)
    for p, f, q in zip(model.patch_size, factors, patch, strict=True):
        assert p % f == 0
        assert q - f < p <= q if round_down else q <= p < q + f
        assert p // f >= 4  # the deepest feature map keeps >= 4 voxels
    assert model.filters[0] == ModelConfig().filters[0] and max(model.filters) <= 256
    assert len(model.filters) == len(model.strides)
    assert _forward(model, 1, 2) == (1, 2, *model.patch_size)


@pytest.mark.parametrize(
    ("median", "axis"),
    [
        ((35, 51, 35), None),
        ((160, 160, 16), None),
        ((256, 256, 12), 2),
        ((256, 1, 200), 1),  # one coronal slice
        ((1, 256, 200), 0),  # one sagittal slice
        ((12, 256, 12), 2),  # a tie: axial
    ],
    ids=["3d", "thin_3d", "axial", "coronal", "sagittal", "tie"],
)
def test_choose_slice_axis(median: tuple[int, ...], axis: int | None) -> None:
    assert choose_slice_axis(np.array(median, dtype=float)) == axis


@pytest.mark.parametrize(
    ("names", "axes"),
    [
        (["liver", "spleen"], (0, 1, 2)),
        (["kidney_left", "kidney_right"], (1, 2)),
        (["Anterior", "Posterior"], (0, 2)),
        (["lung_upper_lobe_left", "heart"], (1,)),
    ],
)
def test_flip_axes_spare_direction_specific_labels(names: list[str], axes: tuple[int]) -> None:
    assert flip_axes(names, (0, 1, 2)) == axes


def test_flip_axes_of_coronal_slices_follow_their_ras_axes() -> None:
    # coronal slices: network axes (x, z); "Anterior/Posterior" (y) is across slices, not in them
    assert flip_axes(["Anterior", "Posterior"], (0, 2)) == (0, 1)
    assert flip_axes(["kidney_left", "liver_upper"], (0, 2)) == ()
    assert flip_axes(["kidney_left"], (1, 2)) == (0, 1)  # sagittal slices have no x


# ---- memory budget ----


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_smaller_budget_gives_smaller_patch_and_batch(device: str) -> None:
    fp = _fingerprint((256, 256, 200), (1, 1, 1), n_cases=200)
    plans = [plan_config(fp, MemoryBudget(device, gb, "test")) for gb in (1.5, 3, 6, 12, 48)]
    voxels = [math.prod(c.model.patch_size) for c in plans]
    batches = [c.train.batch_size for c in plans]
    assert voxels == sorted(voxels) and voxels[0] < voxels[-1]
    samples = [v * b for v, b in zip(voxels, batches, strict=True)]
    assert samples == sorted(samples)
    for cfg, gb in zip(plans, (1.5, 3, 6, 12, 48), strict=True):
        used = estimate_memory_gib(cfg.model, 1, 2, cfg.train.batch_size, device)
        assert used <= gb and cfg.train.batch_size >= 2


def test_cpu_batch_cap() -> None:
    fp = _fingerprint((64, 64, 64), (1, 1, 1), n_cases=10_000)
    assert plan_config(fp, MemoryBudget("cpu", 16, "test")).train.batch_size == 2
    assert plan_config(fp, MemoryBudget("cuda", 16, "test")).train.batch_size > 4


def test_cpu_and_gpu_plans() -> None:
    fp = _fingerprint((35, 51, 35), (1, 1, 1), labels=("Anterior", "Posterior"))
    cpu = plan_config(fp, MemoryBudget("cpu", 8, "test"))
    gpu = plan_config(fp, MemoryBudget("cuda", 16, "test"))
    # compute-bound CPU budgets: the network planned for the median image rounded down
    # (32x48x32: 4 levels), its patch shrunk to <= 40% of the image; no mirroring (docs/recipe.md)
    assert cpu.model.patch_size == (24, 40, 24) and cpu.train.augment.flip_axes == ()
    assert cpu.model.filters == (16, 32, 64, 128) and cpu.model.strides == gpu.model.strides
    # GPU: nnU-Net's rounding up and mirroring, sparing the Anterior/Posterior axis
    assert gpu.model.patch_size == (40, 56, 40) and gpu.train.augment.flip_axes == (0, 2)


def test_shrink_to_image_fraction_keeps_the_network_and_a_3_voxel_bottleneck() -> None:
    model = network_for((32, 48, 32), (1.0, 1.0, 1.0), round_down=True)
    shrunk = shrink_to_image_fraction(model, np.array([35.0, 50.0, 36.0]))
    assert shrunk.patch_size == (24, 40, 24)  # 37% of the median image
    assert dataclasses.replace(shrunk, patch_size=model.patch_size) == model  # same network
    # a tiny image: the patch stops at 3 voxels per axis at the lowest level (8x down)
    tiny = shrink_to_image_fraction(model, np.array([20.0, 20.0, 20.0]))
    assert tiny.patch_size == (24, 24, 24)


def test_cpu_patch_is_capped_in_voxels() -> None:
    fp = _fingerprint((240, 240, 155), (1, 1, 1), channels=("FLAIR", "T1"))
    cpu = plan_config(fp, MemoryBudget("cpu", 64, "test")).model.patch_size
    gpu = plan_config(fp, MemoryBudget("cuda", 64, "test")).model.patch_size
    assert math.prod(cpu) <= CPU_MAX_PATCH_VOXELS < math.prod(gpu)


def test_batch_covers_at_most_5_percent_of_the_dataset() -> None:
    small = _fingerprint((40, 56, 40), (1, 1, 1), n_cases=100)
    large = _fingerprint((40, 56, 40), (1, 1, 1), n_cases=10_000)
    budget = MemoryBudget("cuda", 80.0, "test")
    capped = plan_config(small, budget).train.batch_size
    assert capped == 0.05 * 100 * 40 * 56 * 40 // (40 * 56 * 40)  # 5 cases' worth
    assert plan_config(large, budget).train.batch_size > capped


def test_budget_too_small_is_a_config_error() -> None:
    fp = _fingerprint((256, 256, 200), (1, 1, 1))
    with pytest.raises(ConfigError, match=r"--memory-gb 0.3 is too small"):
        plan_config(fp, MemoryBudget("cpu", 0.3, "test"))


def test_default_budget() -> None:
    budget = memory_budget(None, "cpu")
    assert budget.device == "cpu" and 0 < budget.gigabytes and "RAM" in budget.source
    explicit = memory_budget(3, "cpu")
    assert (explicit.device, explicit.gigabytes, explicit.source) == ("cpu", 3.0, "--memory-gb")
    # the cache may fill 75% of RAM less the CPU training budget
    assert explicit.cache_gigabytes == pytest.approx(budget.gigabytes * 3 - 3)
    with pytest.raises(ConfigError, match="--memory-gb must be > 0"):
        memory_budget(0, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        memory_budget(None, "cuda")


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, gib: float) -> None:
    """Make torch report one CUDA GPU of `gib` GiB (the budget only reads its total memory)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    props = SimpleNamespace(total_memory=int(gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)


@pytest.mark.parametrize(
    ("gpu_gib", "budget_gib"), [(141, GPU_REFERENCE_GIB), (24, GPU_REFERENCE_GIB), (6, 4.8)]
)
def test_gpu_budget_is_a_reference_not_the_whole_gpu(
    monkeypatch: pytest.MonkeyPatch, gpu_gib: float, budget_gib: float
) -> None:
    _fake_gpu(monkeypatch, gpu_gib)
    budget = memory_budget(None, "cuda")
    assert budget.device == "cuda" and budget.gigabytes == pytest.approx(budget_gib)
    assert memory_budget(100, "cuda").gigabytes == 100  # --memory-gb still decides


def test_h200_plan_does_not_fill_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # the review's case: a 141 GiB H200 used to get patch 288x288x224 at batch 12
    _fake_gpu(monkeypatch, 141)
    fp = _fingerprint((512, 512, 600), (0.8, 0.8, 1.5), n_cases=100)
    cfg = plan_config(fp, memory_budget(None, "cuda"))
    m = cfg.model
    assert math.prod(m.patch_size) <= GPU_MAX_PATCH_VOXELS
    assert estimate_memory_gib(m, 1, 2, cfg.train.batch_size, "cuda") <= GPU_REFERENCE_GIB
    # asking for most of the GPU buys batch size, not a patch beyond nnU-Net's range
    big = plan_config(fp, MemoryBudget("cuda", 0.9 * 141, "--memory-gb"))
    assert math.prod(big.model.patch_size) <= GPU_MAX_PATCH_VOXELS
    assert big.train.batch_size > cfg.train.batch_size


# ---- cache of the preprocessed cases ----


def test_cache_size_counts_float_images_and_small_integer_labels() -> None:
    shapes = np.array([[100, 100, 100], [100, 100, 50]], dtype=float)
    voxels = 1.5e6
    assert cache_gib(shapes, 2, 3) == pytest.approx(voxels * (2 * 4 + 1) / 2**30)
    assert cache_gib(shapes, 1, 300) == pytest.approx(voxels * (4 + 2) / 2**30)  # int16


def test_a_dataset_larger_than_the_ram_for_it_is_cached_on_disk() -> None:
    # 100 CTs of 512x512x600: 73 GiB cached (float32 image, uint8 labels), 117 GiB before
    fp = _fingerprint((512, 512, 600), (0.8, 0.8, 1.5), n_cases=100)
    budget = MemoryBudget("cpu", 6, "test", cache_gigabytes=12)
    cfg = plan_config(fp, budget)
    assert cfg.data.cache == "disk"
    assert (
        "cache          disk in the run folder's cache/ (estimated 73.2 > 12 GiB of RAM for it)"
        in summary(cfg, fp, budget)
    )
    small = _fingerprint((64, 64, 64), (1, 1, 1), n_cases=100)
    assert plan_config(small, budget).data.cache == "memory"
    assert "cache          memory (estimated 0.122 of 12 GiB" in summary(
        plan_config(small, budget), small, budget
    )


# ---- normalisation over the nonzero region ----


@pytest.mark.parametrize(
    ("channels", "nonzero", "masked"),
    [
        (("FLAIR", "T1"), 0.35, True),  # skull-stripped MR in a larger zero field of view
        (("MRI",), 1.0, False),  # MR crops without padding
        (("CT",), 0.35, False),  # CT is clipped to dataset percentiles: no mask (nnU-Net)
        (("MRI",), 0.8, False),
    ],
    ids=["skull_stripped", "crop", "ct", "mostly_nonzero"],
)
def test_nonzero_mask_when_the_dataset_is_mostly_zero(
    channels: tuple[str, ...], nonzero: float, masked: bool
) -> None:
    fp = _fingerprint((240, 240, 155), (1, 1, 1), channels=channels, nonzero=nonzero)
    cfg = plan_config(fp, CPU_8)
    assert cfg.data.nonzero_mask is masked
    assert ("over the nonzero region" in summary(cfg, fp, CPU_8)) is masked


# ---- 2D plans ----


def test_single_coronal_slices_plan_2d_along_y() -> None:
    fp = _fingerprint((320, 1, 260), (0.5, 4.0, 0.5), n_cases=50)
    cfg = plan_config(fp, CPU_8)
    m = cfg.model
    assert m.spatial_dims == 2 and m.slice_axis == 1
    assert len(m.patch_size) == 2
    assert all(p <= s for p, s in zip(m.patch_size, (320, 260), strict=True))
    assert "2D U-Net on coronal slices" in summary(cfg, fp, CPU_8)
    assert "0.5 x own x 0.5 mm" in summary(cfg, fp, CPU_8)


def test_2d_plans_keep_each_case_slice_spacing() -> None:
    fp = dataclasses.replace(
        _fingerprint((256, 256, 3), (1, 1, 5), n_cases=2),
        cases=(
            CaseGeometry("thin", (256, 256, 6), (1, 1, 2.5)),
            CaseGeometry("thick", (256, 256, 3), (1, 1, 5)),
        ),
    )
    assert resampled_shapes(fp, (1.0, 1.0, 3.0), keep_axis=2)[:, 2].tolist() == [6, 3]
    assert resampled_shapes(fp, (1.0, 1.0, 3.0))[:, 2].tolist() == [5, 5]  # 3D: resampled
    cfg = plan_config(fp, CPU_8)
    assert cfg.model.spatial_dims == 2 and cfg.model.slice_axis == 2
    assert "model.slice_axis" in planned_keys(cfg)


# ---- whole plans ----


def test_plan_demo(demo_dataset: Path) -> None:
    cfg, fp = plan_dataset(demo_dataset, memory_gb=4, device="cpu")
    assert cfg.data.root == demo_dataset and cfg.data.spacing == pytest.approx((1, 1, 1))
    assert cfg.data.normalization == "auto"
    assert cfg.model.spatial_dims == 3 and cfg.model.filters == (16, 32, 64, 128)
    # median 33 x 48.5 x 33: network for 32x48x32 (multiples of 8, rounded down on CPU), patch
    # shrunk to <= 40% of the median image (docs/recipe.md)
    assert cfg.model.patch_size == (24, 32, 24)
    assert cfg.train.batch_size == 2  # 10 small cases: 5% of the voxels is under one patch
    assert cfg.train.device == "cpu" and cfg.infer.device == "cpu"
    assert cfg.train.augment.flip_axes == ()  # CPU plans do not mirror (docs/recipe.md)
    assert len(fp.cases) == 10


def test_plan_spleen_is_anisotropic(shared_data: Path) -> None:
    cfg, _ = plan_dataset(shared_data / "spleen_crop", memory_gb=4, device="cpu")
    assert cfg.data.spacing == pytest.approx((0.795, 0.795, 5.0), abs=1e-3)
    strides = cfg.model.strides
    assert strides[1] == (2, 2, 1) and strides[2] == (2, 2, 1)  # z waits for x and y
    assert downsampling_factors(cfg.model)[2] < downsampling_factors(cfg.model)[0]
    assert cfg.train.augment.rotate_degrees == 0  # no out-of-plane rotation of 5 mm slices
    assert estimate_memory_gib(cfg.model, 1, 2, cfg.train.batch_size, "cpu") <= 4


@pytest.mark.parametrize(
    ("dataset", "masked"),
    [("brats_subset", True), ("ms_lesions_ljubljana", True), ("hippocampus", False)],
)
def test_skull_stripped_mr_is_normalised_over_the_brain(
    shared_data: Path, dataset: str, masked: bool
) -> None:
    cfg, fp = plan_dataset(shared_data / dataset, memory_gb=4, device="cpu")
    assert cfg.data.nonzero_mask is masked
    median = float(np.median([c.nonzero_fraction for c in fp.cases]))
    assert (median < 0.5) if masked else median == 1.0  # BraTS and MS: about 0.35


# ---- command line ----


def test_cli_writes_a_loadable_config(demo_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "configs" / "demo.yaml"
    result = runner.invoke(
        app, ["plan", str(demo_dataset), "--output", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    for word in ("spacing", "3D U-Net", "patch", "24 x 32 x 24", "batch", "MRI: zscore"):
        assert word in result.output
    text = out.read_text()
    assert text.startswith(
        f"# Planned by `medseg plan` from {demo_dataset} (10 cases).\n# Planned for: cpu"
    )
    assert "demo.fingerprint.json" in text
    assert "lr:" not in text  # left to the TrainConfig defaults
    assert (tmp_path / "configs" / "demo.fingerprint.json").is_file()

    cfg = load_config(out)
    assert cfg == plan_dataset(demo_dataset, device="cpu")[0]
    assert _forward(cfg.model, 1, 3) == (1, 3, *cfg.model.patch_size)


def _broken_image(root: Path) -> None:
    next((root / "imagesTr").iterdir()).write_bytes(b"not an image")


@pytest.mark.parametrize(
    ("edit", "extra", "message"),
    [
        (lambda root: (root / "dataset.json").unlink(), [], "dataset.json not found"),
        (_broken_image, [], "cannot read image"),
        (lambda root: None, ["--memory-gb", "0.1"], "--memory-gb 0.1 is too small"),
        (lambda root: None, ["--device", "gpu"], "--device must be one of"),
    ],
    ids=["no_dataset_json", "unreadable_image", "tiny_budget", "bad_device"],
)
def test_cli_bad_input_exits_2(
    edit, extra: list[str], message: str, demo_dataset: Path, tmp_path: Path
) -> None:
    root = tmp_path / "ds"
    shutil.copytree(demo_dataset, root)
    edit(root)
    out = tmp_path / "plan.yaml"
    result = runner.invoke(app, ["plan", str(root), "--output", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_cli_output_must_be_yaml(demo_dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(demo_dataset), "--output", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "give a .yaml file" in result.output


@pytest.mark.parametrize(("cases", "folds"), [(1, 1), (2, 2), (5, 5), (200, 5)])
def test_folds_follow_the_number_of_cases(cases: int, folds: int) -> None:
    assert cross_validation_folds(cases) == folds
