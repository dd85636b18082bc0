"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from AIReconstructLib.metrics import evaluate, label_voxel_counts, overlap_scores, surface_distances
from AIReconstructLib.volume import Volume


def test_overlap_by_hand():
    pred = np.zeros((4, 4, 4), bool)
    ref = np.zeros((4, 4, 4), bool)
    pred[0, 0, :3] = True  # 3 voxels
    ref[0, 0, 1:] = True  # 3 voxels, 2 shared
    scores = overlap_scores(pred, ref)
    assert scores["dice"] == pytest.approx(2 * 2 / 6)
    assert scores["iou"] == pytest.approx(2 / 4)
    assert scores["accuracy"] == pytest.approx(1 - 2 / 64)
    assert scores["sensitivity"] == pytest.approx(2 / 3)
    assert scores["specificity"] == pytest.approx((61 - 1) / 61)


def test_empty_masks():
    empty = np.zeros((3, 3, 3), bool)
    full = np.ones((3, 3, 3), bool)
    assert overlap_scores(empty, empty)["dice"] == 1.0
    assert overlap_scores(full, empty)["dice"] == 0.0
    assert surface_distances(full, empty, (1, 1, 1))["hd95_mm"] == math.inf


def test_shifted_cube_distances_in_mm():
    pred = np.zeros((20, 20, 20), bool)
    ref = np.zeros((20, 20, 20), bool)
    ref[5:15, 5:15, 5:15] = True
    pred[5:15, 5:15, 7:17] = True  # shifted by 2 voxels along x (axis 2), spacing 1.5 mm there
    distances = surface_distances(pred, ref, (1.0, 1.0, 1.5))
    assert distances["hd95_mm"] == pytest.approx(3.0)
    assert 0 < distances["asd_mm"] < 3.0


def test_evaluate_reports_per_label_and_mean():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[:3] = 1
    ref[3:] = 2
    pred = ref.copy()
    pred[2] = 2  # one slab of label 1 predicted as 2
    result = evaluate(Volume(pred, (1, 1, 2)), Volume(ref, (1, 1, 2)), {1: "a", 2: "b", 3: "absent"})
    a, b = result["labels"]["a"], result["labels"]["b"]
    assert a["dice"] == pytest.approx(2 * 72 / (72 + 108))
    assert b["dice"] == pytest.approx(2 * 108 / (144 + 108))
    assert a["volume_ml"] == pytest.approx(72 * 2 / 1000)
    assert not result["labels"]["absent"]["present"]
    assert result["mean"]["dice"] == pytest.approx((a["dice"] + b["dice"]) / 2)
    assert result["accuracy"] == pytest.approx(1 - 36 / 216)


def test_label_voxel_counts_slab_by_slab_equal_bincount():
    rng = np.random.default_rng(3)
    for dtype, top in ((np.uint8, 12), (np.uint16, 300)):
        array = rng.integers(0, top, (130, 130, 70)).astype(dtype)  # more than one slab of 2^20 voxels
        np.testing.assert_array_equal(label_voxel_counts(array), np.bincount(array.ravel()))
        assert len(label_voxel_counts(array, top + 5)) == top + 5
    assert label_voxel_counts(np.zeros((0, 4, 4), np.uint8), 3).tolist() == [0, 0, 0]
