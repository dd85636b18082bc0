"""Per-label post-processing as the card says."""

import numpy as np

from AIReconstructLib.modelcard import Label
from AIReconstructLib.postprocess import postprocess
from AIReconstructLib.volume import Volume


def _label(value, **rules):
    return Label(value, f"label {value}", (1, 1, 1), {}, rules)


def test_keep_largest_component():
    array = np.zeros((10, 10, 10), np.uint8)
    array[1:5, 1:5, 1:5] = 1  # 64 voxels
    array[7:9, 7:9, 7:9] = 1  # 8 voxels
    out = postprocess(Volume(array), [_label(1, keep_largest=True)]).array
    assert np.count_nonzero(out == 1) == 64 and out[8, 8, 8] == 0


def test_remove_islands_below_a_volume():
    array = np.zeros((10, 10, 10), np.uint8)
    array[1:5, 1:5, 1:5] = 1  # 64 voxels of 8 mm³ = 0.512 mL
    array[7:9, 7:9, 7:9] = 1  # 8 voxels = 0.064 mL
    out = postprocess(Volume(array, (2, 2, 2)), [_label(1, min_island_ml=0.1)]).array
    assert np.count_nonzero(out == 1) == 64


def test_fill_holes_never_overwrites_another_label():
    array = np.zeros((9, 9, 9), np.uint8)
    array[1:8, 1:8, 1:8] = 1
    array[3, 3, 3] = 0  # a hole
    array[5, 5, 5] = 2  # a lesion inside the organ
    out = postprocess(Volume(array), [_label(1, fill_holes=True), _label(2)]).array
    assert out[3, 3, 3] == 1 and out[5, 5, 5] == 2


def test_islands_go_first_then_cavities_are_filled_in_label_order():
    """An island of a later label inside an organ's cavity is removed before the organ fills the
    cavity, whatever the order of the labels; a cavity two organs enclose goes to the first."""
    array = np.zeros((12, 12, 12), np.uint8)
    array[1:11, 1:11, 1:11] = 1
    array[4:7, 4:7, 4:7] = 0  # a cavity
    array[5, 5, 5] = 2  # a one-voxel island of label 2 inside it
    array[8:11, 8:11, 8:11] = 2  # label 2's real part, at the organ's corner
    for order in ([1, 2], [2, 1]):
        out = postprocess(Volume(array), [_label(v, fill_holes=True, min_island_ml=0.002) for v in order]).array
        assert (out[4:7, 4:7, 4:7] == 1).all() and np.count_nonzero(out == 2) == 27
    nested = np.zeros((9, 9, 9), np.uint8)
    nested[0:9, 0:9, 0:9] = 1
    nested[2:7, 2:7, 2:7] = 2
    nested[4, 4, 4] = 0  # enclosed by label 2, and so by label 1 too
    assert postprocess(Volume(nested), [_label(2, fill_holes=True), _label(1, fill_holes=True)]).array[4, 4, 4] == 2


def test_labels_without_rules_are_untouched():
    array = np.zeros((6, 6, 6), np.uint8)
    array[0, 0, 0] = 1
    array[5, 5, 5] = 1
    np.testing.assert_array_equal(postprocess(Volume(array), [_label(1)]).array, array)


def test_a_label_whose_islands_are_all_removed_is_left_empty():
    array = np.zeros((6, 6, 6), np.uint8)
    array[1, 1, 1] = 1  # 1 mm³, far below the 0.5 mL minimum
    out = postprocess(Volume(array), [_label(1, min_island_ml=0.5, fill_holes=True)]).array
    assert not out.any()


def test_holes_are_filled_as_scipy_fills_them():
    """One labelling of the background gives binary_fill_holes' result (6-connected cavities)."""
    from scipy import ndimage

    from AIReconstructLib.postprocess import _cavities

    rng = np.random.default_rng(0)
    for trial in range(20):
        mask = rng.random(rng.integers(3, 30, 3)) < rng.uniform(0.3, 0.9)
        if trial % 2:
            mask = ndimage.binary_opening(mask)
        np.testing.assert_array_equal(mask | _cavities(mask, threads=2), ndimage.binary_fill_holes(mask))


def test_islands_are_the_26_connected_components_scipy_finds():
    """Removed islands equal a reference made with scipy's 26-connected labelling."""
    from scipy import ndimage

    from AIReconstructLib.postprocess import _islands

    rng = np.random.default_rng(1)
    for trial in range(20):
        mask = rng.random(rng.integers(3, 30, 3)) < rng.uniform(0.05, 0.5)
        components, count = ndimage.label(mask, np.ones((3, 3, 3), bool))
        sizes = np.bincount(components.ravel())[1:]
        rules = {"min_island_ml": float(rng.integers(1, 6)) / 1000}  # 1 mm³ voxels: 1-5 voxels
        expected = np.isin(components, 1 + np.flatnonzero(sizes < rules["min_island_ml"] * 1000))
        np.testing.assert_array_equal(_islands(mask, rules, 0.001, threads=2), expected)
        if count and (sizes == sizes.max()).sum() == 1:  # a single largest component
            largest = components == 1 + np.argmax(sizes)
            np.testing.assert_array_equal(_islands(mask, {"keep_largest": True}, 0.001, threads=2), mask & ~largest)


def test_label_maps_with_far_islands_and_cavities_are_cleaned_as_scipy_cleans_them():
    """Whole label maps (organs with cavities, specks far from them, touching labels) against a
    reference made with scipy on the whole array: islands removed, then cavities filled in label order."""
    from scipy import ndimage

    rng = np.random.default_rng(2)
    labels = [_label(1, min_island_ml=0.004, fill_holes=True), _label(2, keep_largest=True, fill_holes=True),
              _label(3, fill_holes=True)]
    for _ in range(10):
        array = np.zeros(tuple(rng.integers(20, 40, 3)), np.uint8)
        for value in (1, 2, 3):
            centre, radius = rng.integers(6, 14, 3), rng.integers(3, 6)
            ball = np.linalg.norm(np.indices(array.shape).T - centre, axis=-1).T < radius
            ball &= rng.random(array.shape) < 0.93  # cavities of one voxel and more
            array[ball] = value
            specks = rng.random(array.shape) < 0.002  # islands anywhere, so the label's box spans the image
            array[specks & (array == 0)] = value

        expected = array.copy()
        for label in labels[:2]:  # the labels with island rules
            components, _ = ndimage.label(array == label.value, np.ones((3, 3, 3), bool))
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            kept = sizes == sizes.max() if label.postprocess.get("keep_largest") else sizes >= 4
            kept[0] = False
            expected[(components > 0) & ~kept[components]] = 0
        for label in labels:
            mask = expected == label.value
            expected[ndimage.binary_fill_holes(mask) & ~mask & (expected == 0)] = label.value
        np.testing.assert_array_equal(postprocess(Volume(array), labels).array, expected)
