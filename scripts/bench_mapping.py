"""Cost of mapping probabilities back to the input grid: boundary path vs all-classes path.

`medseg.slabs` labels input voxels in cells whose corners agree directly and chooses, per
chunk, between interpolating only the candidates of the other cells (the boundary path) and
interpolating every class axis by axis (the dense path), with a cost model whose constants
this script measures. Three probability maps on a 3 mm grid of 51 x 51 x 24 voxels, mapped to
a 0.8 x 0.8 x 1.5 mm input grid (192 x 192 x 48 = 1.77 M voxels, as ``bench_predict --quick``):

- ``organs``: a trained model's structure: TotalSegmentator's 118-class reference labels of
  ``totalseg_examples/CT`` (a central block), one-hot and box-smoothed over 3 voxels;
- ``unsure``: an untrained 118-class model (softmax of small random logits);
- ``2-class``: random 2-class probabilities (every cell disagrees; no fallback possible).

For each it prints the share of disagreeing cells, the share of unsure voxels, both paths'
seconds, and the path the cost model picks. Usage::

    python scripts/bench_mapping.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from bench_predict import smoothed_probabilities

from medseg import slabs
from medseg.inference import use_physical_cores

CT_LABELS = Path(__file__).resolve().parents[2] / "shared/data/totalseg_examples/CT/labelsTr"
PRE_SHAPE, INPUT_SHAPE = (51, 51, 24), (192, 192, 48)
PRE_AFFINE, INPUT_AFFINE = np.diag([3.0, 3.0, 3.0, 1.0]), np.diag([0.8, 0.8, 1.5, 1.0])


def organs() -> torch.Tensor:
    """Smoothed one-hot of a central block of the TotalSegmentator reference labels (3 mm)."""
    import nibabel as nib

    labels = np.asarray(nib.load(str(CT_LABELS / "example_ct.nii.gz")).dataobj).astype(np.int64)
    at = [(s - p) // 2 for s, p in zip(labels.shape, PRE_SHAPE, strict=True)]
    box = tuple(slice(a, a + p) for a, p in zip(at, PRE_SHAPE, strict=True))
    block = torch.from_numpy(labels[box])
    return smoothed_probabilities(block, 118)


def mapped_seconds(probs: torch.Tensor, dense: bool) -> float:
    """Wall time of mapping `probs` with the path forced, slabs of 8 planes as in inference."""
    chosen = slabs._dense_is_cheaper
    slabs._dense_is_cheaper = lambda share, unsure, k: dense and share > 0
    try:
        start = time.perf_counter()
        mapper = slabs.SlabMapper(INPUT_AFFINE, INPUT_SHAPE, PRE_AFFINE, PRE_SHAPE)
        for z in range(0, PRE_SHAPE[2], 8):
            mapper.add(slabs.Slab(z, probs[..., z : z + 9]))
        mapper.labels()
        return time.perf_counter() - start
    finally:
        slabs._dense_is_cheaper = chosen


def main() -> None:
    use_physical_cores()
    torch.manual_seed(0)
    maps = {
        "organs": organs(),
        "unsure": torch.softmax(0.3 * torch.randn(118, *PRE_SHAPE), 0),
        "2-class": torch.softmax(3.0 * torch.randn(2, *PRE_SHAPE), 0),
    }
    print("map       classes  disagreeing  unsure  boundary s  dense s  cost model picks")
    for name, probs in maps.items():
        share = float((slabs._cell_labels(probs.argmax(0)) < 0).float().mean())
        top = probs.topk(min(slabs.CANDIDATES + 1, probs.shape[0]), dim=0).values.sum(0)
        unsure = float((top < slabs.SPREAD).float().mean())
        boundary, dense = mapped_seconds(probs, False), mapped_seconds(probs, True)
        pick = "dense" if slabs._dense_is_cheaper(share, unsure, probs.shape[0]) else "boundary"
        print(
            f"{name:8s} {probs.shape[0]:8d} {share:12.2f} {unsure:7.2f} {boundary:11.2f} "
            f"{dense:8.2f}  {pick}"
        )


if __name__ == "__main__":
    main()
