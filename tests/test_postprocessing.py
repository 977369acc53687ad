"""medseg.postprocessing: keep the largest connected component of listed labels."""

from __future__ import annotations

import numpy as np

from medseg.postprocessing import keep_largest_component


def test_only_the_largest_component_of_listed_labels_stays() -> None:
    labels = np.zeros((6, 6, 3), np.uint8)
    labels[0:3, 0:3, :] = 1  # 27 voxels: kept
    labels[5, 5, 0] = 1  # 1 voxel: removed
    labels[4, 0, :] = 2  # label 2: two components, but not listed
    labels[0, 5, :] = 2
    out = keep_largest_component(labels, [1])
    assert (out == 1).sum() == 27 and out[5, 5, 0] == 0
    np.testing.assert_array_equal(out == 2, labels == 2)
    assert out.dtype == labels.dtype and (labels[5, 5, 0] == 1)  # input untouched


def test_diagonal_neighbours_are_separate_components() -> None:
    labels = np.zeros((5, 5, 1), np.int32)
    for i in range(4):
        labels[i, i, 0] = 3  # a diagonal chain: four components of one voxel each
    labels[4, 0:3, 0] = 3  # three face-adjacent voxels: the largest component
    out = keep_largest_component(labels, [3])
    assert sorted(zip(*np.nonzero(out[..., 0] == 3), strict=True)) == [(4, 0), (4, 1), (4, 2)]


def test_absent_or_single_component_labels_are_unchanged() -> None:
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    np.testing.assert_array_equal(keep_largest_component(labels, [1, 2, 7]), labels)
