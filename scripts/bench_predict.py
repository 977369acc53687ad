"""Benchmark medseg prediction against plain MONAI sliding-window inference on CPU or GPU.

Every variant runs in a fresh child process on the same input file, so wall time and peak
memory (the child's own ru_maxrss) do not mix:

- ``monai``: preprocessing, MONAI ``sliding_window_inference`` on the whole preprocessed image
  with the same network, window and overlap (Gaussian blending as medseg; otherwise MONAI's
  defaults: ``sw_batch_size=1``, fp32, contiguous memory), argmax on the preprocessed grid,
  and the label map put back on the input grid with MONAI's ``Invertd`` (nearest neighbour:
  cheaper than inverting the K-class probabilities, which medseg does).
- ``torch`` and ``onnx``: ``medseg.inference.predict_volume`` with that engine.

Inputs, made from ``totalseg_examples/CT/imagesTr/example_ct_0000.nii.gz`` (122x101x112,
3 mm) by trilinear resampling and placing the body in a field of view padded with air
(-1024 HU):

- full-size CT: 0.8 x 0.8 mm in-plane, 1.5 mm slices, 512 x 512 x 224 voxels;
- large CT: 0.8 mm isotropic, 512 x 512 x 600 voxels (the scan resampled to 420 slices, then
  continued mirrored along z): the memory number; only the fastest engine runs it.

``--quick`` uses small crops of both so the whole script runs in well under a minute.

Usage (the model is a run folder; --make-model trains a small CT one, see docs/performance.md):

    python scripts/bench_predict.py --make-model runs/bench_ct
    python scripts/bench_predict.py --model runs/bench_ct [--quick]

The last line is machine-readable:
``speedup_vs_monai=X.XX peak_fraction=0.XX peak_rss_gb=X.X`` (best engine on the full-size
CT; RSS from the 512 x 512 x 600 run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "totalseg_examples" / "CT"
VARIANTS = ("monai", "torch", "onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="run folder to benchmark")
    parser.add_argument("--make-model", type=Path, help="train a CT model into this folder")
    parser.add_argument(
        "--train-minutes", type=float, default=10.0, help="--make-model's training budget"
    )
    parser.add_argument("--quick", action="store_true", help="small crops: a smoke test")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medseg-bench"))
    parser.add_argument("--child", choices=(*VARIANTS, "mapping"), help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "mapping":
        print(json.dumps(mapping_child(args.model, args.input, args.reference)))
    elif args.child:
        print(json.dumps(child(args.child, args.model, args.input, args.save)))
    elif args.make_model:
        make_model(args.make_model, args.train_minutes)
    elif args.model:
        parent(args.model, args.workdir / ("quick" if args.quick else "full"), args.quick)
    else:
        parser.error("give --model RUN (or --make-model DIR)")


def make_model(run_dir: Path, minutes: float) -> None:
    """A 3D U-Net for the 117 TotalSegmentator classes at 3 mm, trained for `minutes`.

    Speed depends on the weights only through the mapping back to the input grid (cells whose
    corners agree are labelled without interpolation), so the model is trained, briefly, rather
    than left random; see `mapping_child` for the cost with a fully trained model's structure.
    """
    overrides = [
        f"data.root={CT}",
        "data.spacing=[3.0,3.0,3.0]",
        "model.filters=[32,64,128,256,320]",
        "model.patch_size=[96,96,96]",
        "model.deep_supervision=2",
        f"train.max_minutes={minutes}",
        "train.epochs=1000",
        "train.iterations_per_epoch=4",
        "train.batch_size=1",
        "train.folds=2",
        "train.val_every=1000",
        "train.device=cpu",
        "infer.device=cpu",
    ]
    config = ROOT / "configs" / "hippocampus_3d.yaml"
    command = [sys.executable, "-m", "medseg", "train", str(config), *overrides]
    subprocess.run([*command, "--run-dir", str(run_dir)], check=True)


def make_inputs(workdir: Path, quick: bool) -> dict[str, Path]:
    """Write the two benchmark CTs (see the module docstring) as NIfTI; reuse them if present."""
    import nibabel as nib

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "full-size CT": workdir / "ct_full.nii",
        "512x512x600 CT": workdir / "ct_large.nii",
        "full-size labels": workdir / "ct_full_labels.nii",
    }
    if all(p.is_file() for p in paths.values()):
        return paths
    source = nib.load(str(CT / "imagesTr" / "example_ct_0000.nii.gz"))
    array = np.asarray(source.dataobj, dtype=np.float32)
    spacing = np.array(source.header.get_zooms()[:3], dtype=float)
    reference = np.asarray(nib.load(str(CT / "labelsTr" / "example_ct.nii.gz")).dataobj)
    shapes = {
        "full-size CT": ((0.8, 0.8, 1.5), (512, 512, 224)),
        "512x512x600 CT": ((0.8,) * 3, (512, 512, 600)),
    }
    if quick:
        shapes = {
            "full-size CT": ((0.8, 0.8, 1.5), (192, 192, 48)),
            "512x512x600 CT": ((0.8,) * 3, (224, 224, 96)),
        }
    for name, (target, shape) in shapes.items():
        resampled = _resample(array, spacing, np.array(target))
        volume = _field_of_view(resampled, shape, quick, -1024.0)
        affine = np.diag([*target, 1.0])
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(paths[name]))
        if name == "full-size CT":
            labels = _resample(reference.astype(np.float32), spacing, np.array(target), "nearest")
            labels = _field_of_view(labels, shape, quick, 0.0)
            image = nib.Nifti1Image(labels.astype(np.uint8), affine)
            nib.save(image, str(paths["full-size labels"]))
    return paths


def _resample(
    array: np.ndarray, spacing: np.ndarray, target: np.ndarray, mode: str = "trilinear"
) -> np.ndarray:
    import torch

    size = [int(round(n * s / t)) for n, s, t in zip(array.shape, spacing, target, strict=True)]
    x = torch.from_numpy(array)[None, None]
    return torch.nn.functional.interpolate(x, size=size, mode=mode)[0, 0].numpy()


def _field_of_view(
    body: np.ndarray, shape: tuple[int, ...], quick: bool, fill: float
) -> np.ndarray:
    """Centre `body` in `fill` of `shape` (cropping it where larger; mirrored along z to fill)."""
    if quick:  # a crop through the middle of the body, with air on one side
        cx, cy, cz = (s // 2 for s in body.shape)
        body = body[cx - shape[0] // 2 :, cy - shape[1] // 2 :, cz - shape[2] // 2 :]
    while body.shape[2] < shape[2]:
        body = np.concatenate([body, body[:, :, ::-1]], axis=2)
    out = np.full(shape, fill, np.float32)
    crop = [min(b, s) for b, s in zip(body.shape, shape, strict=True)]
    at = [(s - c) // 2 for s, c in zip(shape, crop, strict=True)]
    out[at[0] : at[0] + crop[0], at[1] : at[1] + crop[1], : crop[2]] = body[
        : crop[0], : crop[1], : crop[2]
    ]
    return out


def matmul_peak() -> float:
    """Best fp32 GFLOP/s of 4096 x 4096 matrix products on this machine (torch threads)."""
    import torch

    from medseg.inference import use_physical_cores

    use_physical_cores()
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 4096**3 / best / 1e9


def run_child(variant: str, model: Path, path: Path, save: Path | None, *extra: str) -> dict:
    """One variant in a fresh process, which reports its own peak RSS (VmHWM).

    Not ru_maxrss: Linux carries the parent's peak over fork and exec into the child's.
    """
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--model",
        str(model),
        "--input",
        str(path),
    ]
    if save is not None:
        command += ["--save", str(save)]
    command += extra
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read() if process.stdout else ""
    process.wait()
    if process.returncode != 0:
        raise SystemExit(f"{variant} on {path.name} failed with exit code {process.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def child(variant: str, model: Path, path: Path, save: Path | None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.engines import build_predictor
    from medseg.inference import Window, predict_volume, use_physical_cores
    from medseg.io import load_volume
    from medseg.runs import load_run

    use_physical_cores()
    run = load_run(model, "cpu")
    roi, infer = tuple(run.config.model.patch_size), run.config.infer
    example = torch.randn(1, len(run.plan.channels), *roi)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run.network(example)
    volume = load_volume(path)
    windows, network_s = [0], [0.0]

    def timed(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def call(x: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            out = forward(x)
            windows[0] += x.shape[0]
            network_s[0] += time.perf_counter() - t
            return out

        return call

    start = time.perf_counter()
    if variant == "monai":
        labels = _monai(run, volume, timed(run.network))
    else:
        forward = timed(build_predictor(run, variant, torch.device("cpu")))
        window = Window(roi, infer.overlap, infer.sw_batch_size)
        labels = predict_volume(forward, volume, run.plan, window)
    wall = time.perf_counter() - start
    if save is not None:
        np.save(save, labels)
    return {
        "variant": variant,
        "wall_s": wall,
        "voxels": int(np.prod(volume.shape)),
        "windows": windows[0],
        "network_s": network_s[0],
        "window_gflop": counter.get_total_flops() / 1e9,
        "threads": torch.get_num_threads(),
        "peak_rss_gb": _peak_rss_gb(),
    }


def mapping_child(model: Path, path: Path, reference: Path) -> dict:
    """medseg's mapping back to the input grid alone, fed a fully trained model's structure.

    A briefly trained benchmark model is unsure or uniform almost everywhere, which makes the
    mapping either as slow or as fast as it gets. Here the probabilities are the reference
    labels of the scan (TotalSegmentator's own output: 117 organs with real boundaries),
    preprocessed like the image, one-hot and box-smoothed over 3 voxels, fed slab by slab.
    Returns the mapping time, the share of cells whose corners disagree (interpolated) and
    the Dice of the mapped labels with the reference on the input grid.
    """
    from monai import transforms as mt

    from medseg.inference import use_physical_cores
    from medseg.io import load_volume
    from medseg.runs import load_run
    from medseg.slabs import Slab, SlabMapper, _cell_labels
    from medseg.transforms import IMAGE, LABEL, preprocessing

    use_physical_cores()
    plan = load_run(model, "cpu").plan
    volume = load_volume(path)
    data = mt.Compose(preprocessing(plan))({IMAGE: volume, LABEL: reference})
    labels = data[LABEL].as_tensor()[0].long()
    probs = smoothed_probabilities(labels, len(plan.labels))
    interpolated = float((_cell_labels(probs.argmax(0)) < 0).float().mean())
    start = time.perf_counter()
    mapper = SlabMapper(volume.affine, volume.shape, np.asarray(data[IMAGE].affine), labels.shape)
    for z in range(0, labels.shape[2], 8):  # one shared plane: cells span two planes
        mapper.add(Slab(z, probs[..., z : z + 9]))
    mapped = mapper.labels()
    wall = time.perf_counter() - start
    truth = np.asarray(load_volume(reference).array[0]).astype(np.int64)
    return {
        "wall_s": wall,
        "interpolated_cells": interpolated,
        "dice": _mean_dice(mapped, truth),
        "classes": len(plan.labels),
    }


def smoothed_probabilities(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """A trained model's output structure from a label map: one-hot, box-smoothed over 3 voxels.

    Args:
        labels: (X, Y, Z) int64 labels.
        n_classes: K.

    Returns:
        (K, X, Y, Z) float32 probabilities.
    """
    import torch

    onehot = torch.zeros((n_classes, *labels.shape)).scatter_(0, labels[None], 1.0)
    return torch.nn.functional.avg_pool3d(onehot[None], 3, 1, 1, count_include_pad=False)[0]


def _peak_rss_gb() -> float:
    """This process's peak resident memory since it started (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _monai(run, volume, network) -> np.ndarray:  # noqa: ANN001 - Run, Volume, Callable
    """The baseline: see the module docstring."""
    import torch
    from monai import transforms as mt
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    from medseg.transforms import IMAGE, preprocessing

    roi, overlap = tuple(run.config.model.patch_size), run.config.infer.overlap
    pre = mt.Compose(preprocessing(run.plan, keys=[IMAGE]))
    data = pre({IMAGE: volume})
    image = data[IMAGE]
    with torch.inference_mode():
        logits = sliding_window_inference(
            image.as_tensor()[None], roi, 1, network, overlap=overlap, mode="gaussian"
        )
        labels = torch.argmax(logits[0], dim=0, keepdim=True).float()
    del logits
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    data["pred"] = MetaTensor(labels, affine=image.affine, meta=meta)
    data["pred"].applied_operations = list(image.applied_operations)
    inverse = mt.Invertd(keys="pred", transform=pre, orig_keys=IMAGE, nearest_interp=True)
    return inverse(data)["pred"][0].numpy().astype(np.uint8)


def dice_agreement(a: Path, b: Path) -> float:
    """Mean Dice over the labels present in either map."""
    return _mean_dice(np.load(a), np.load(b))


def _mean_dice(x: np.ndarray, y: np.ndarray) -> float:
    """Mean Dice over the foreground labels present in either map (one confusion matrix)."""
    n = int(max(x.max(), y.max())) + 1
    pairs = x.astype(np.int64).ravel() * n + y.astype(np.int64).ravel()
    confusion = np.bincount(pairs, minlength=n * n).reshape(n, n)
    both, in_x, in_y = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    present = (in_x + in_y > 0) & (np.arange(n) > 0)
    return float(np.mean(2 * both[present] / (in_x + in_y)[present])) if present.any() else 1.0


def parent(model: Path, workdir: Path, quick: bool) -> None:
    from medseg.engines import export_onnx
    from medseg.runs import ONNX, load_run

    inputs = make_inputs(workdir, quick)
    if not (model / ONNX).is_file():
        export_onnx(load_run(model, "cpu"))  # not timed: `medseg export` does this once
    peak = matmul_peak()
    print(
        f"machine: {os.cpu_count()} CPUs, fp32 matmul peak {peak:.1f} GFLOP/s (4096^2, best of 5)"
    )
    full = inputs["full-size CT"]
    results = {}
    for variant in VARIANTS:
        results[variant] = run_child(variant, model, full, workdir / f"{variant}.npy")
    baseline = results["monai"]["wall_s"]
    print(f"\n{full.name}: {results['monai']['voxels']:,} voxels")
    columns = (
        "variant", "wall s", "Mvox/s", "windows", "GFLOP/s", "of peak", "net s", "net peak",
        "RSS GB", "speedup",
    )  # fmt: skip
    print(" ".join(f"{c:>8}" for c in columns))
    for variant, r in results.items():
        flops = r["window_gflop"] * r["windows"]
        r["gflops"] = flops / r["wall_s"]
        row = (
            f"{r['wall_s']:8.1f}",
            f"{r['voxels'] / r['wall_s'] / 1e6:8.2f}",
            f"{r['windows']:8d}",
            f"{r['gflops']:8.1f}",
            f"{r['gflops'] / peak:8.2f}",
            f"{r['network_s']:8.1f}",
            f"{flops / r['network_s'] / peak:8.2f}",
            f"{r['peak_rss_gb']:8.2f}",
            f"{baseline / r['wall_s']:8.2f}",
        )
        print(f"{variant:>8} " + " ".join(row))
    print("(GFLOP/s and 'of peak': network FLOPs over the whole wall time; 'net s': time inside")
    print(" the network calls; 'net peak': FLOPs over that time, as a fraction of the peak)")
    for a, b in (("torch", "monai"), ("onnx", "monai"), ("onnx", "torch")):
        agree = dice_agreement(workdir / f"{a}.npy", workdir / f"{b}.npy")
        print(f"mean foreground Dice, {a} vs {b} labels: {agree:.4f}")
    mapping = run_child(
        "mapping", model, full, None, "--reference", str(inputs["full-size labels"])
    )
    print(
        f"\nmapping a fully trained model's output back to {full.name} (reference labels, "
        f"{mapping['classes']} classes, smoothed): {mapping['wall_s']:.1f} s, "
        f"{100 * mapping['interpolated_cells']:.1f}% of cells interpolated, "
        f"Dice with the reference {mapping['dice']:.4f}"
    )
    best = min(("torch", "onnx"), key=lambda v: results[v]["wall_s"])
    large = run_child(best, model, inputs["512x512x600 CT"], None)
    print(
        f"\n{inputs['512x512x600 CT'].name} ({best}): {large['voxels']:,} voxels, "
        f"{large['wall_s']:.1f} s, {large['windows']} windows, "
        f"peak RSS {large['peak_rss_gb']:.2f} GB"
    )
    speedup = baseline / results[best]["wall_s"]
    print(
        f"speedup_vs_monai={speedup:.2f} peak_fraction={results[best]['gflops'] / peak:.2f} "
        f"peak_rss_gb={large['peak_rss_gb']:.1f}"
    )


if __name__ == "__main__":
    main()
