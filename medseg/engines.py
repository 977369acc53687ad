"""Inference engines: what turns a batch of windows into logits for a loaded run.

``torch`` runs the network itself (channels-last 3D convolutions); ``onnx`` runs the
``model.onnx`` that `export_onnx` writes beside the weights with onnxruntime. An ensemble
averages its folds' softmax per window and returns log probabilities, which blend like logits
(softmax(log p) = p).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medseg.config import ConfigError
from medseg.models import run_network
from medseg.preprocessing_plan import Plan
from medseg.runs import ONNX, Run, RunError
from medseg.transforms import normalize_channel

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]

ENGINES = ("auto", "torch", "onnx")
CPU_DEFAULT = "onnx"
"""Engine ``auto`` picks on the CPU when every fold has a model.onnx (about 25% faster per
window there, see docs/performance.md); on CUDA it picks torch."""
OPSET = 18


def resolve_engine(name: str, run: Run, device: torch.device) -> str:
    """The engine to use: ``auto`` -> onnx on CPU when exported, else torch."""
    if name not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name != "auto":
        return name
    exported = all((fold.path / ONNX).is_file() for fold in run.folds)
    return CPU_DEFAULT if device.type == "cpu" and exported else "torch"


def build_predictor(run: Run, engine: str, device: torch.device) -> Predictor:
    """A predictor (B, C, *roi) -> (B, K, *roi) logits for `run` on `engine` ("torch"/"onnx")."""
    members = []
    for fold in run.folds:
        forward = _onnx_forward(fold, device) if engine == "onnx" else _torch_forward(fold)
        members.append(_renormalized(forward, run.plan, fold.plan))
    if len(members) == 1:
        return members[0]

    def ensemble(x: torch.Tensor) -> torch.Tensor:
        total = None
        for member in members:
            probs = torch.softmax(member(x).float(), dim=1)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return torch.log(total.div_(len(members)).clamp_min_(torch.finfo(total.dtype).tiny))

    return ensemble


def _torch_forward(run: Run) -> Predictor:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return run_network(run.network, x)

    return forward


def _onnx_forward(run: Run, device: torch.device) -> Predictor:
    import onnxruntime as ort

    path = run.path / ONNX
    if not path.is_file():
        raise RunError(
            f"{run.path}: no {ONNX}; run 'medseg export {run.path} --format onnx' first "
            "or use --engine torch"
        )
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena would keep the largest 3D-convolution workspace for good: 3.4 GB instead of
    # 2.3 GB peak for two 96^3 windows of a 32-filter U-Net, at the same speed.
    options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own types for corrupt files
        raise RunError(
            f"{path}: cannot load the ONNX model ({type(err).__name__}: {err})"
        ) from None
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(session.run(None, {name: array})[0]).to(x.device)

    return forward


def _renormalized(forward: Predictor, reference: Plan, own: Plan) -> Predictor:
    """Feed a fold windows normalised with its own CT statistics instead of `reference`'s.

    CT normalisation is pointwise, so undoing the reference's and applying the fold's is exact
    wherever the fold's clip range lies inside the reference's (the folds' percentiles differ
    by a few HU at most).
    """
    pairs = [
        (c, ref, norm)
        for c, (ref, norm) in enumerate(
            zip(reference.normalization, own.normalization, strict=True)
        )
        if norm.scheme == "ct" and norm != ref
    ]
    if not pairs:
        return forward

    def renormalize(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for c, ref, norm in pairs:
            x[:, c] = normalize_channel(x[:, c] * ref.std + ref.mean, norm)
        return forward(x)

    return renormalize


def export_onnx(run: Run, output: Path | None = None) -> list[Path]:
    """Write each fold's network as ONNX (dynamic batch axis), checked against torch.

    Args:
        run: a loaded run (on the CPU).
        output: file for a single run; default (and always for ensembles) ``FOLD/model.onnx``.

    Returns:
        The files written.
    """
    if output is not None and run.members:
        raise ConfigError("--output names one file; an ensemble is exported into each fold_K/")
    written = []
    for fold in run.folds:
        path = Path(output) if output is not None else fold.path / ONNX
        written.append(_export_one(fold, path))
    return written


def _export_one(run: Run, path: Path) -> Path:
    import contextlib
    import io
    import warnings

    from medseg.io import atomic_path

    model = run.config.model
    example = torch.randn(1, len(run.plan.channels), *model.patch_size)
    network = run.network.cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    chatter = io.StringIO()  # the exporter and its optimiser print progress to stdout
    with atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    _check_export(network, path, example)
    return path


def _check_export(network: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """The exported graph must reproduce torch's logits on a batch of two (a bug otherwise)."""
    import onnxruntime as ort

    x = torch.cat([example, -example])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        want = network(x).numpy()
    if not np.allclose(got, want, atol=1e-3, rtol=1e-3):
        path.unlink(missing_ok=True)
        raise RuntimeError(f"{path}: ONNX output differs from torch by {np.abs(got - want).max()}")
