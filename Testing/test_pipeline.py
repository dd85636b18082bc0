"""The segmentation pipeline on the input's own grid, with a tiny model the test makes."""

import numpy as np
import pytest

from AIReconstructLib.errors import InputError
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.pipeline import SegmentOptions, segment
from AIReconstructLib.volume import Volume
from conftest import oblique_direction


def test_labels_land_on_the_oblique_input_grid(tiny_model, ct_volume):
    volume = Volume(ct_volume.array, ct_volume.spacing, ct_volume.origin, oblique_direction(15))
    result = segment([volume], load_card(tiny_model), SegmentOptions(device="cpu"))
    assert result.labelmap.same_grid(volume, tolerance=0)
    assert result.labelmap.array.dtype == np.uint8
    assert set(np.unique(result.labelmap.array)) <= {0, 1, 2}
    assert {"load model", "preprocess", "predict", "resample back", "postprocess"} <= set(result.seconds)


def test_fast_mode_and_tta_keep_the_grid(tiny_model, ct_volume):
    card = load_card(tiny_model)
    fast = segment([ct_volume], card, SegmentOptions(device="cpu", fast=True, tta=True))
    assert fast.labelmap.same_grid(ct_volume, tolerance=0)


def test_flipped_input_gives_the_flipped_result(tiny_model, ct_volume):
    """A volume stored with reversed i axis is the same patient: labels must match voxel for voxel."""
    card = load_card(tiny_model)
    flipped_direction = np.diag([-1.0, 1.0, 1.0])
    origin = np.array(ct_volume.origin) + np.array([(ct_volume.shape_ijk[0] - 1) * ct_volume.spacing[0], 0, 0])
    flipped = Volume(ct_volume.array[:, :, ::-1].copy(), ct_volume.spacing, tuple(origin), flipped_direction)
    plain = segment([ct_volume], card, SegmentOptions(device="cpu")).labelmap.array
    other = segment([flipped], card, SegmentOptions(device="cpu")).labelmap.array
    np.testing.assert_array_equal(other[:, :, ::-1], plain)


def test_wrong_number_of_channels(tiny_model, ct_volume):
    with pytest.raises(InputError, match="needs 1 input volume"):
        segment([ct_volume, ct_volume], load_card(tiny_model))
