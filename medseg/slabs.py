"""Labels on the input grid from probability slabs on the preprocessed grid, slab by slab.

Preprocessing is reorientation to RAS plus resampling (MONAI Orientation + Spacing), so the
voxel-to-voxel map from the input grid to the preprocessed grid, ``inv(pre_affine) @
input_affine``, sends each input axis to one preprocessed axis with a scale and an offset.
Trilinear interpolation (border clamp, as MONAI's inverse of Spacing) then factorises per axis:
every input voxel lies in one preprocessed cell (2x2x2 voxels) with weights from three 1D
fractions.

The argmax of interpolated probabilities is found without interpolating all K classes at
every input voxel (what MONAI's Invertd followed by argmax does):

- when the 8 corners of a cell share their argmax label, every point of the cell has it too
  (a convex combination keeps each corner's inequalities), so its voxels get that label;
- in the other cells only each corner's top `CANDIDATES` classes are interpolated; a class
  that is in none of those lists is below the interpolated (CANDIDATES+1)-th value, so when the
  best candidate beats that bound the answer is exact, and otherwise all K classes are used;
- when many of a chunk's voxels lie in disagreeing cells, all classes are interpolated axis by
  axis in groups instead, if a cost model (`_dense_is_cheaper`) says that is cheaper: it is for
  unsure models and for few classes, not for a confident many-class model's organ boundaries.

The result equals argmax(trilinear(probabilities)) up to floating-point ties.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medseg.io import label_dtype

CANDIDATES = 2
"""Classes per cell corner interpolated for voxels in cells whose corners disagree."""
CHUNK_VOXELS = 1 << 22
"""Input voxels labelled per step (bounds the index and label temporaries)."""
SPREAD = 0.9
"""A preprocessed voxel is unsure when its top CANDIDATES+1 classes hold less probability: the
candidates' bound then often fails and the boundary path falls back to all classes."""
BOUNDARY_COST, FALLBACK_COST = 1.2, 15.0
"""Cost of the boundary path if every voxel lay in a disagreeing cell, with confident (1.2) or
unsure (+15) probabilities; and of the all-classes path, per class and fixed. Seconds per
1.77 M input voxels on the project's 2-core CPU, rounded from `scripts/bench_mapping.py`
(docs/performance.md); only their ratios matter."""
DENSE_COST_PER_CLASS, DENSE_COST_FIXED = 0.01, 0.03
CLASS_GROUP = 8
"""Classes interpolated at once on that path (bounds its (classes, voxels) temporary)."""
BOUNDARY_BATCH = 1 << 16
"""Voxels of disagreeing cells interpolated per step (bounds the (voxels, classes) arrays)."""


@dataclass(frozen=True)
class Slab:
    """Probabilities of consecutive planes along the last preprocessed axis.

    Attributes:
        start: index of the first plane.
        probs: (K, X, Y, n) probabilities of planes ``start`` to ``start + n - 1``.
    """

    start: int
    probs: torch.Tensor

    @property
    def stop(self) -> int:
        """One past the last plane."""
        return self.start + self.probs.shape[-1]


@dataclass(frozen=True)
class _Axis:
    """How one input axis samples its preprocessed axis: cell corners and fraction per voxel."""

    pre: int
    lo: torch.Tensor
    hi: torch.Tensor
    frac: torch.Tensor


class SlabMapper:
    """Collects labels on the input grid from `Slab` s of preprocessed probabilities.

    Args:
        affine: 4x4 voxel-to-world matrix of the input grid.
        shape: input spatial shape (X, Y, Z).
        pre_affine: 4x4 voxel-to-world matrix of the preprocessed grid.
        pre_shape: preprocessed spatial shape.
        device: where the slabs' probabilities live; labels are collected on the CPU.
    """

    def __init__(
        self,
        affine: np.ndarray,
        shape: Sequence[int],
        pre_affine: np.ndarray,
        pre_shape: Sequence[int],
        device: torch.device | None = None,
    ) -> None:
        device = device or torch.device("cpu")
        self.shape = tuple(int(s) for s in shape)
        self.axes = _axes(np.asarray(affine), self.shape, np.asarray(pre_affine), pre_shape, device)
        self.sweep = next(i for i, a in enumerate(self.axes) if a.pre == 2)
        self.done = np.zeros(self.shape[self.sweep], dtype=bool)
        self.out: torch.Tensor | None = None

    def add(self, slab: Slab) -> None:
        """Label the input voxels whose cells lie inside `slab`."""
        sweep = self.axes[self.sweep]
        ready = (~self.done) & (sweep.hi < slab.stop).cpu().numpy()
        ready &= (sweep.lo >= slab.start).cpu().numpy()
        picked = np.flatnonzero(ready)
        if picked.size == 0:
            return
        self.done[picked] = True
        probs = slab.probs
        if self.out is None:
            self.out = torch.zeros(self.shape, dtype=_torch_dtype(probs.shape[0]))
        cells = _cell_labels(probs.argmax(0))
        top = probs.topk(min(CANDIDATES + 1, probs.shape[0]), dim=0)
        unsure = float((top.values.float().sum(0) < SPREAD).float().mean())
        plane = int(np.prod(self.shape)) // self.shape[self.sweep]
        step = max(1, CHUNK_VOXELS // plane)
        for i0 in range(int(picked[0]), int(picked[-1]) + 1, step):
            rows = slice(i0, min(i0 + step, int(picked[-1]) + 1))
            chunk = _Chunk(self.axes, self.sweep, rows, slab.start)
            labels = cells[chunk.index(lambda a: a.lo)]  # -1 where the corners disagree
            share = float((labels < 0).float().mean())
            if _dense_is_cheaper(share, unsure, probs.shape[0]):
                labels = _interpolate_separable(chunk, probs)
            else:
                _label_boundaries(labels, chunk, probs, top, cells)
            index = [slice(None)] * 3
            index[self.sweep] = rows
            self.out[tuple(index)] = labels.to(self.out.dtype).cpu()

    def labels(self) -> np.ndarray:
        """The label map of the input shape, once every slab was added."""
        if self.out is None or not self.done.all():
            raise RuntimeError("slabs did not cover the whole preprocessed image")  # a bug
        return self.out.numpy()


def _dense_is_cheaper(share: float, unsure: float, n_classes: int) -> bool:
    """Whether interpolating all classes beats the boundary path for a chunk.

    Args:
        share: fraction of the chunk's voxels in cells whose corners disagree.
        unsure: fraction of the slab's voxels whose top classes hold < `SPREAD`.
        n_classes: K.
    """
    boundary = share * (BOUNDARY_COST + FALLBACK_COST * unsure)
    return boundary > DENSE_COST_FIXED + DENSE_COST_PER_CLASS * n_classes


def _torch_dtype(n_classes: int) -> torch.dtype:
    return {np.uint8: torch.uint8, np.uint16: torch.int32}.get(
        label_dtype(n_classes - 1), torch.int64
    )


def _axes(
    affine: np.ndarray,
    shape: Sequence[int],
    pre_affine: np.ndarray,
    pre_shape: Sequence[int],
    device: torch.device,
) -> list[_Axis]:
    """Per input axis: the preprocessed axis it maps to, cell corners and fractions."""
    voxel_map = np.linalg.inv(pre_affine) @ affine
    linear = voxel_map[:3, :3]
    axes = []
    for i, n in enumerate(shape):
        j = int(np.argmax(np.abs(linear[:, i])))
        others = np.delete(linear[:, i], j)
        if np.abs(others).max(initial=0.0) > 1e-3 * abs(linear[j, i]):  # preprocessing is a bug
            raise RuntimeError(f"input axis {i} does not map onto one preprocessed axis")
        size = int(pre_shape[j])
        p = linear[j, i] * np.arange(n, dtype=np.float64) + voxel_map[j, 3]
        p = np.clip(p, 0, size - 1)  # border padding, as Spacing's inverse
        lo = np.clip(np.floor(p), 0, max(size - 2, 0)).astype(np.int64)
        hi = np.minimum(lo + 1, size - 1)
        frac = np.clip(p - lo, 0.0, 1.0)
        axes.append(
            _Axis(
                j,
                torch.from_numpy(lo).to(device),
                torch.from_numpy(hi).to(device),
                torch.from_numpy(frac).to(device, torch.float32),
            )
        )
    if sorted(a.pre for a in axes) != [0, 1, 2]:
        raise RuntimeError("input axes do not map one-to-one onto preprocessed axes")  # a bug
    return axes


def _cell_labels(labels: torch.Tensor) -> torch.Tensor:
    """(X, Y, n) argmax labels -> per cell the label its 8 corners share, else -1.

    Cells are indexed by their low corner (X-1, Y-1, n-1); an axis of size 1 has one cell.
    """
    corners = [labels]
    for dim in range(3):
        n = labels.shape[dim]
        pairs = [(c.narrow(dim, 0, n - 1), c.narrow(dim, 1, n - 1)) for c in corners]
        corners = [half for pair in pairs for half in pair] if n > 1 else corners
    same = torch.ones_like(corners[0], dtype=torch.bool)
    for corner in corners[1:]:
        same &= corner == corners[0]
    return torch.where(same, corners[0], -1)


class _Chunk:
    """Input voxels of rows `rows` along the sweep axis, addressed on a slab's planes."""

    def __init__(self, axes: list[_Axis], sweep: int, rows: slice, start: int) -> None:
        self.axes = []
        for i, a in enumerate(axes):
            if i == sweep:
                a = _Axis(a.pre, a.lo[rows] - start, a.hi[rows] - start, a.frac[rows])
            self.axes.append(a)
        self.shape = tuple(len(a.lo) for a in self.axes)

    def index(self, pick) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
        """Broadcast indices (preprocessed axis order) that `pick` takes from each axis."""
        index: list[torch.Tensor] = [torch.empty(0)] * 3
        for i, a in enumerate(self.axes):
            view = [1, 1, 1]
            view[i] = -1
            index[a.pre] = pick(a).view(view)
        return tuple(index)


def _interpolate_separable(chunk: _Chunk, probs: torch.Tensor) -> torch.Tensor:
    """Argmax of trilinear interpolation of all classes, one axis at a time, by class groups."""
    order = [chunk.axes[i].pre for i in range(3)]  # preprocessed axis of each input axis
    best_value: torch.Tensor | None = None
    best = torch.zeros(chunk.shape, dtype=torch.int64, device=probs.device)
    for k0 in range(0, probs.shape[0], CLASS_GROUP):
        values = probs[k0 : k0 + CLASS_GROUP].float().contiguous()  # (G, X, Y, n)
        # The sweep axis first, while the tensor is smallest: selecting along the innermost
        # dimension is the slow one.
        for a in sorted(chunk.axes, key=lambda a: -a.pre):
            dim, shape = a.pre + 1, [1, 1, 1, 1]
            shape[dim] = -1
            frac = a.frac.view(shape)
            low, high = values.index_select(dim, a.lo), values.index_select(dim, a.hi)
            values = low.mul_(1.0 - frac).add_(high.mul_(frac))
        values = values.permute(0, *(p + 1 for p in order))  # (G, input axis order)
        value, index = values.max(0)
        index += k0
        if best_value is None:
            best_value, best = value, index
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best = torch.where(better, index, best)
    return best


def _label_boundaries(
    labels: torch.Tensor,
    chunk: _Chunk,
    probs: torch.Tensor,
    top: torch.return_types.topk,
    cells: torch.Tensor,
) -> None:
    """Fill the -1 voxels of `labels` with the argmax of interpolated probabilities."""
    where = (labels < 0).nonzero()
    if where.shape[0] == 0:
        return
    k = probs.shape[0]
    table = None if k <= CANDIDATES else _CandidateTable(probs, top, cells, chunk, where)
    for b in range(0, where.shape[0], BOUNDARY_BATCH):
        coords = where[b : b + BOUNDARY_BATCH]
        corners, weights = _corners(chunk, coords)
        if table is None:
            best = _interpolate_all(probs, corners, weights)
        else:
            best, unsure = table.best(corners[:, 0], weights)
            if bool(unsure.any()):
                best[unsure] = _interpolate_all(probs, corners[unsure], weights[unsure])
        labels[tuple(coords.T)] = best.to(labels.dtype)


def _corners(chunk: _Chunk, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 cell corners of voxels `coords` (N, 3) of the chunk, and trilinear weights.

    Returns:
        (N, 8, 3) slab indices (X, Y, Z) of the corners, (x, y, z) offsets in binary order
        (000, 001, ..., 111), and (N, 8) weights in that order.
    """
    lo, hi, frac = [torch.empty(0)] * 3, [torch.empty(0)] * 3, [torch.empty(0)] * 3
    for i, a in enumerate(chunk.axes):
        at = coords[:, i]
        lo[a.pre], hi[a.pre], frac[a.pre] = a.lo[at], a.hi[at], a.frac[at]
    corners = torch.stack(
        [torch.stack([(lo, hi)[d][axis] for axis, d in enumerate(bits)], dim=1) for bits in _BITS],
        dim=1,
    )
    w = [torch.stack([1.0 - f, f], dim=1) for f in frac]  # (N, 2) per axis
    weights = (w[0][:, :, None, None] * w[1][:, None, :, None] * w[2][:, None, None, :]).flatten(1)
    return corners, weights


_BITS = list(itertools.product((0, 1), repeat=3))


def _flat(at: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Row-major index of element (0, x, y, z) of a (K, X, Y, n) tensor; class c adds c*X*Y*n."""
    return (at[..., 0] * shape[2] + at[..., 1]) * shape[3] + at[..., 2]


def _interpolate_all(
    probs: torch.Tensor, corners: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Argmax over all K classes of the interpolated probabilities (corners (N, 8, 3))."""
    plane = probs[0].numel()
    classes = torch.arange(probs.shape[0], device=probs.device) * plane
    total = None
    for q in range(8):
        values = probs.take(_flat(corners[:, q], probs.shape)[:, None] + classes).float()
        values *= weights[:, q, None]
        total = values if total is None else total.add_(values)
    assert total is not None
    return total.argmax(1)


class _CandidateTable:
    """Per cell whose corners disagree: its corners' top classes and their 8 corner values.

    Built once per chunk on the (coarse) preprocessed grid, then every input voxel in such a
    cell interpolates only those classes with one small matrix product.
    """

    def __init__(
        self,
        probs: torch.Tensor,
        top: torch.return_types.topk,
        cells: torch.Tensor,
        chunk: _Chunk,
        where: torch.Tensor,
    ) -> None:
        lows = [torch.empty(0)] * 3
        for i, axis in enumerate(chunk.axes):
            lows[axis.pre] = axis.lo[where[:, i]]
        used = torch.zeros(cells.shape, dtype=torch.bool, device=cells.device)
        used[tuple(lows)] = True
        at = used.nonzero()  # (C, 3): the disagreeing cells that hold voxels of this chunk
        self.ids = torch.full(cells.shape, -1, dtype=torch.int32, device=cells.device)
        self.ids[tuple(at.T)] = torch.arange(at.shape[0], dtype=torch.int32, device=cells.device)
        size = torch.tensor(probs.shape[1:], device=cells.device)
        corners = [
            torch.minimum(at + torch.tensor(bits, device=at.device), size - 1) for bits in _BITS
        ]
        plane = probs[0].numel()
        head = torch.arange(CANDIDATES, device=probs.device) * plane
        self.classes = torch.cat(
            [top.indices.take(_flat(c, top.indices.shape)[:, None] + head) for c in corners], dim=1
        )  # (C, 8 * CANDIDATES)
        offsets = self.classes * plane
        self.values = torch.stack(
            [probs.take(_flat(c, probs.shape)[:, None] + offsets).float() for c in corners], dim=2
        )  # (C, 8 * CANDIDATES, 8)
        self.bound = torch.stack(
            [
                top.values.take(_flat(c, top.values.shape) + CANDIDATES * plane).float()
                for c in corners
            ],
            dim=1,
        )  # (C, 8): the largest probability outside each corner's top classes

    def best(self, low: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels of voxels in cells with low corners `low` (N, 3), and where they are unsure."""
        rows = self.ids[tuple(low.T)].long()
        value, pos = torch.bmm(self.values[rows], weights[:, :, None])[:, :, 0].max(1)
        bound = (self.bound[rows] * weights).sum(1)
        return self.classes[rows].gather(1, pos[:, None])[:, 0], ~(value > bound)
