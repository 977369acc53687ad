"""Post-processing of final label maps, shared by training (which decides it) and prediction.

A model folder may hold ``postprocessing.json``: ``{"largest_component": [1, 3]}`` lists the
label values of which only the largest connected component is kept.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage


def keep_largest_component(labels: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Keep only the largest connected component of each listed label value.

    Voxels of a listed label outside its largest component become background (0); other
    labels are untouched. Connectivity is face-adjacency (6 neighbours in 3D), as MONAI's
    ``KeepLargestConnectedComponent`` with ``connectivity=1``.

    Args:
        labels: integer label map of any shape, e.g. (X, Y, Z).
        values: label values to clean; values absent from `labels` are ignored.

    Returns:
        A new label map of the same shape and dtype.
    """
    out = labels.copy()
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        # scipy directly on the one mask: MONAI's transform would one-hot all labels first.
        components, count = ndimage.label(mask)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[mask & (components != int(sizes.argmax()))] = 0
    return out
