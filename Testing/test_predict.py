"""Preprocessing round trips and the sliding-window predictor."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from AIReconstructLib.errors import Cancelled
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.networks import load_network
from AIReconstructLib.predict import Predictor, mirror_sets, window_positions
from AIReconstructLib.preprocess import (class_argmax, from_canonical, normalise, prepare, reorientation_of,
                                         resample, resample_argmax, restore_labels, to_canonical)
from AIReconstructLib.volume import Volume
from conftest import oblique_direction


def _axis_permutation_directions():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            direction = np.zeros((3, 3))
            for column, row in enumerate(perm):
                direction[row, column] = signs[column]
            yield direction


@pytest.mark.parametrize("direction", list(_axis_permutation_directions()))
def test_reorientation_reaches_lps_and_inverts_exactly(direction):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    volume = Volume(array, (1.0, 2.0, 3.0), (0, 0, 0), direction)
    how = reorientation_of(volume)
    canonical = to_canonical(array, how)
    # canonical axis 2 (x) must now run along +L, axis 1 along +P, axis 0 along +S
    index_of_x = {tuple(np.argwhere(array == v)[0][::-1]) for v in (canonical[0, 0, 1],)}
    step = volume.direction @ (np.array(next(iter(index_of_x))) - np.array(np.argwhere(array == canonical[0, 0, 0])[0][::-1]))
    assert step[0] > 0 and abs(step[1]) < 1e-9 and abs(step[2]) < 1e-9
    back = from_canonical(torch.from_numpy(canonical.copy())[None], how)[0].numpy()
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("axes", ["SAR", "RAS", "ILP"])
@pytest.mark.parametrize("direction", list(_axis_permutation_directions())[::5])
def test_reorientation_to_any_axis_codes(direction, axes):
    volume = Volume(np.zeros((2, 3, 4)), (1.0, 2.0, 3.0), (0, 0, 0), direction)
    how = reorientation_of(volume, axes)
    index = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    canonical = to_canonical(index, how)
    ijk_of = lambda flat: np.array(np.unravel_index(flat, index.shape)[::-1], float)
    towards = {"L": [1, 0, 0], "R": [-1, 0, 0], "P": [0, 1, 0], "A": [0, -1, 0], "S": [0, 0, 1], "I": [0, 0, -1]}
    for axis, code in enumerate(axes):
        step = [0, 0, 0]
        step[axis] = 1
        move = volume.direction @ (ijk_of(canonical[tuple(step)]) - ijk_of(canonical[0, 0, 0]))
        assert np.dot(move / np.linalg.norm(move), towards[code]) > 0.999
    np.testing.assert_array_equal(from_canonical(torch.from_numpy(canonical.copy()), how).numpy(), index)


def test_oblique_volume_uses_its_closest_axes():
    volume = Volume(np.zeros((5, 6, 7)), (1.0, 2.0, 3.0), (0, 0, 0), oblique_direction(20))
    how = reorientation_of(volume)
    assert how.permutation == (0, 1, 2) and how.flips == (False, False, False)
    assert how.spacing_zyx == (3.0, 2.0, 1.0)


def test_prepare_and_restore_keep_the_input_grid(ct_volume):
    spec = [{"name": "CT", "normalisation": {"scheme": "ct", "clip": [-100, 200], "mean": 50, "std": 50}}]
    prepared = prepare([ct_volume], spec, (3.0, 3.0, 3.0))
    assert prepared.tensor.shape[1:] == (32, 33, 32)  # 24*4/3, 40*2.5/3, 48*2/3
    restored = restore_labels(prepared.tensor, prepared)
    assert restored.shape == ct_volume.array.shape


@pytest.mark.parametrize("slabs_above", [0.0, 1.0])  # every voxel interpolated by slabs / cell by cell
@pytest.mark.parametrize("grid", ["field_of_view", "first_voxel"])
@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0]), np.array([[0, 0, 1.0], [1, 0, 0], [0, 1, 0]])])
def test_label_restore_equals_full_resampling(direction, grid, slabs_above):
    """Random scores (boundaries everywhere); the output grid is finer than the model's along two
    axes and coarser along the third."""
    volume = Volume(np.zeros((23, 31, 37)), (1.3, 0.9, 2.6), (0, 0, 0), direction)
    prepared = prepare([volume], [{"name": "x", "normalisation": {"scheme": "none"}}], (2.0, 2.0, 2.0), grid=grid)
    scores = torch.randn(5, *prepared.tensor.shape[1:], generator=torch.Generator().manual_seed(0))
    full = from_canonical(resample(scores, prepared.canonical_shape, prepared.steps_back), prepared.reorientation)
    labels = resample_argmax(scores, prepared.canonical_shape, steps=prepared.steps_back, slabs_above=slabs_above,
                             voxels_per_chunk=500)
    labels = from_canonical(labels, prepared.reorientation).numpy()
    assert labels.shape == volume.array.shape
    top2 = full.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 1e-4).numpy()  # ignore exact ties, where float rounding may pick either
    np.testing.assert_array_equal(labels[decided], full.argmax(0).numpy()[decided])
    assert decided.mean() > 0.999


def test_normalisation_schemes():
    data = np.array([0, 0, 10, 20, 30], np.float32)
    nonzero = normalise(data, {"scheme": "zscore_nonzero"})
    assert nonzero[0] == 0 and abs(nonzero[2:].mean()) < 1e-6 and abs(nonzero[2:].std() - 1) < 1e-5
    # a brain stored with 0 outside it, or z-scored with its minimum outside it (BraTS 2013's FLAIR)
    brain = np.array([10, 20, 30, 15], np.float32)
    for image in (np.r_[0, 0, 0, brain], np.r_[-5, -5, -5, (brain - 19) / 7.4]):
        np.testing.assert_allclose(normalise(image, {"scheme": "zscore_foreground"}),
                                   np.r_[0, 0, 0, (brain - brain.mean()) / brain.std()], atol=1e-5)
    ct = normalise(np.array([-2000, 0, 3000]), {"scheme": "ct", "clip": [-1000, 1000], "mean": 0, "std": 500})
    np.testing.assert_allclose(ct, [-2, 0, 2])


def test_sliding_window_equals_direct_forward_pass(tiny_model):
    network = load_network(load_card(tiny_model))
    image = torch.randn(1, 32, 32, 32)
    predictor = Predictor(network, (32, 32, 32), overlap=0.5, device="cpu")
    with torch.no_grad():
        direct = network(image[None])[0]
    torch.testing.assert_close(predictor(image), direct, rtol=1e-4, atol=1e-5)


def test_progress_counts_windows_and_cancel_stops_within_one(tiny_model):
    network = load_network(load_card(tiny_model))
    image = torch.randn(1, 40, 48, 56)
    predictor = Predictor(network, (32, 32, 32), overlap=0.5, device="cpu")
    expected = len(window_positions(image.shape[1:], (32, 32, 32), 0.5))
    seen = []
    predictor(image, progress=lambda f, m: seen.append(f))
    assert len(seen) == expected and seen[-1] == 1.0
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        predictor(image, progress=lambda f, m: seen.append(f), cancel=cancel_after_two)
    assert len(calls) == 3  # checked before each window; the third check stopped it


def test_mirroring_tta_uses_every_flip(tiny_model):
    assert len(mirror_sets([0, 1, 2])) == 8 and mirror_sets([]) == [()]
    network = load_network(load_card(tiny_model))
    image = torch.randn(1, 32, 32, 32)
    counted = []
    Predictor(network, (32, 32, 32), device="cpu")(image, (0, 1, 2), progress=lambda f, m: counted.append(f))
    assert len(counted) == 8


@pytest.mark.parametrize("slabs_above", [0.0, 1 / 3])
@pytest.mark.parametrize("nearest_first_axis", [False, True])
def test_label_restore_shortcut_equals_full_resampling(nearest_first_axis, slabs_above):
    """Smooth scores (few label boundaries): most voxels take the shortcut, the rest are interpolated."""
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 32),
                             indexing="ij")
    scores = torch.stack([0.5 - (z**2 + y**2 + x**2), x + 0.3 * y, -x + 0.2 * z])
    shape = (53, 61, 70)
    if nearest_first_axis:
        source = ((torch.arange(shape[0]) + 0.5) * (24 / shape[0]) - 0.5 + 0.5).floor().long().clamp(0, 23)
        full = F.interpolate(scores[:, source].transpose(0, 1), size=shape[1:], mode="bilinear",
                             align_corners=False).transpose(0, 1)
    else:
        full = F.interpolate(scores[None], size=shape, mode="trilinear", align_corners=False)[0]
    labels = resample_argmax(scores, shape, nearest_first_axis=nearest_first_axis, slabs_above=slabs_above,
                             voxels_per_chunk=500)
    top2 = full.topk(2, dim=0).values
    decided = top2[0] - top2[1] > 1e-5
    assert torch.equal(labels[decided], full.argmax(0).to(labels.dtype)[decided]) and decided.float().mean() > 0.999
    assert len(torch.unique(labels)) == 3


def test_class_argmax_equals_torchs_argmax_ties_included():
    generator = torch.Generator().manual_seed(5)
    for classes, dtype in ((2, torch.uint8), (10, torch.uint8), (300, torch.int16)):
        scores = torch.randint(0, 4, (classes, 7, 9, 11), generator=generator).float()  # many exact ties
        assert torch.equal(class_argmax(scores, dtype), scores.argmax(0).to(dtype))
    single = torch.randn(1, 3, 3, 3)
    assert not class_argmax(single, torch.uint8).any()
