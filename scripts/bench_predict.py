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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "totalseg_examples" / "CT"
VARIANTS = ("monai", "torch", "onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="run folder to benchmark")
    parser.add_argument("--make-model", type=Path, help="train a small CT model into this folder")
    parser.add_argument("--quick", action="store_true", help="small crops: a smoke test")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medseg-bench"))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.input, args.save)))
    elif args.make_model:
        make_model(args.make_model)
    elif args.model:
        parent(args.model, args.workdir / ("quick" if args.quick else "full"), args.quick)
    else:
        parser.error("give --model RUN (or --make-model DIR)")


def make_model(run_dir: Path) -> None:
    """A 3D U-Net for the 117 TotalSegmentator classes at 3 mm, trained for two steps only.

    Speed does not depend on the weights; what a briefly trained net predicts (mostly
    background and a few large blobs) is closer to a real model than random weights.
    """
    overrides = [
        f"data.root={CT}",
        "data.spacing=[3.0,3.0,3.0]",
        "model.filters=[32,64,128,256,320]",
        "model.patch_size=[96,96,96]",
        "train.epochs=1",
        "train.iterations_per_epoch=2",
        "train.batch_size=1",
        "train.folds=2",
        "train.val_every=1",
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
    paths = {"full-size CT": workdir / "ct_full.nii", "512x512x600 CT": workdir / "ct_large.nii"}
    if all(p.is_file() for p in paths.values()):
        return paths
    source = nib.load(str(CT / "imagesTr" / "example_ct_0000.nii.gz"))
    array = np.asarray(source.dataobj, dtype=np.float32)
    spacing = np.array(source.header.get_zooms()[:3], dtype=float)
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
        volume = _field_of_view(resampled, shape, quick)
        affine = np.diag([*target, 1.0])
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(paths[name]))
    return paths


def _resample(array: np.ndarray, spacing: np.ndarray, target: np.ndarray) -> np.ndarray:
    import torch

    size = [int(round(n * s / t)) for n, s, t in zip(array.shape, spacing, target, strict=True)]
    x = torch.from_numpy(array)[None, None]
    return torch.nn.functional.interpolate(x, size=size, mode="trilinear")[0, 0].numpy()


def _field_of_view(body: np.ndarray, shape: tuple[int, ...], quick: bool) -> np.ndarray:
    """Centre `body` in air of `shape` (cropping it where larger; mirrored along z to fill)."""
    if quick:  # a crop through the middle of the body, with air on one side
        cx, cy, cz = (s // 2 for s in body.shape)
        body = body[cx - shape[0] // 2 :, cy - shape[1] // 2 :, cz - shape[2] // 2 :]
    while body.shape[2] < shape[2]:
        body = np.concatenate([body, body[:, :, ::-1]], axis=2)
    out = np.full(shape, -1024.0, np.float32)
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


def run_child(variant: str, model: Path, path: Path, save: Path | None) -> dict:
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
    windows = [0]
    start = time.perf_counter()
    if variant == "monai":
        labels, windows[0] = _monai(run, volume)
    else:
        forward = build_predictor(run, variant, torch.device("cpu"))

        def counted(x: torch.Tensor) -> torch.Tensor:
            windows[0] += x.shape[0]
            return forward(x)

        window = Window(roi, infer.overlap, infer.sw_batch_size)
        labels = predict_volume(counted, volume, run.plan, window)
    wall = time.perf_counter() - start
    if save is not None:
        np.save(save, labels)
    return {
        "variant": variant,
        "wall_s": wall,
        "voxels": int(np.prod(volume.shape)),
        "windows": windows[0],
        "window_gflop": counter.get_total_flops() / 1e9,
        "threads": torch.get_num_threads(),
        "peak_rss_gb": _peak_rss_gb(),
    }


def _peak_rss_gb() -> float:
    """This process's peak resident memory since it started (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _monai(run, volume) -> tuple[np.ndarray, int]:  # noqa: ANN001 - Run, Volume
    """The baseline: see the module docstring."""
    import torch
    from monai import transforms as mt
    from monai.data import MetaTensor
    from monai.data.utils import dense_patch_slices
    from monai.inferers import sliding_window_inference
    from monai.inferers.utils import _get_scan_interval

    from medseg.transforms import IMAGE, preprocessing

    roi, overlap = tuple(run.config.model.patch_size), run.config.infer.overlap
    pre = mt.Compose(preprocessing(run.plan, keys=[IMAGE]))
    data = pre({IMAGE: volume})
    image = data[IMAGE]
    with torch.inference_mode():
        logits = sliding_window_inference(
            image.as_tensor()[None], roi, 1, run.network, overlap=overlap, mode="gaussian"
        )
        labels = torch.argmax(logits[0], dim=0, keepdim=True).float()
    del logits
    size = [max(s, r) for s, r in zip(image.shape[1:], roi, strict=True)]
    windows = len(dense_patch_slices(size, roi, _get_scan_interval(size, roi, 3, (overlap,) * 3)))
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    data["pred"] = MetaTensor(labels, affine=image.affine, meta=meta)
    data["pred"].applied_operations = list(image.applied_operations)
    inverse = mt.Invertd(keys="pred", transform=pre, orig_keys=IMAGE, nearest_interp=True)
    return inverse(data)["pred"][0].numpy().astype(np.uint8), windows


def dice_agreement(a: Path, b: Path) -> float:
    """Mean Dice over the labels present in either map."""
    x, y = np.load(a), np.load(b)
    values = [v for v in np.union1d(np.unique(x), np.unique(y)) if v != 0]
    scores = [2 * ((x == v) & (y == v)).sum() / ((x == v).sum() + (y == v).sum()) for v in values]
    return float(np.mean(scores)) if scores else 1.0


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
    columns = ("variant", "wall s", "Mvox/s", "windows", "GFLOP/s", "of peak", "RSS GB", "speedup")
    print(" ".join(f"{c:>8}" for c in columns))
    for variant, r in results.items():
        r["gflops"] = r["window_gflop"] * r["windows"] / r["wall_s"]
        row = (
            f"{r['wall_s']:8.1f}",
            f"{r['voxels'] / r['wall_s'] / 1e6:8.2f}",
            f"{r['windows']:8d}",
            f"{r['gflops']:8.1f}",
            f"{r['gflops'] / peak:8.2f}",
            f"{r['peak_rss_gb']:8.2f}",
            f"{baseline / r['wall_s']:8.2f}",
        )
        print(f"{variant:>8} " + " ".join(row))
    for a, b in (("torch", "monai"), ("onnx", "monai"), ("onnx", "torch")):
        agree = dice_agreement(workdir / f"{a}.npy", workdir / f"{b}.npy")
        print(f"mean foreground Dice, {a} vs {b} labels: {agree:.4f}")
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
