"""The guided model: its input channels, the simulated users it is trained with, a short training
run, and refine --guided on the command line."""

import json

import numpy as np
import pytest
import torch

from AIReconstructLib.cli import main
from AIReconstructLib.dataset import write_phantom_dataset
from AIReconstructLib.errors import InputError, OutputError
from AIReconstructLib.guided import (GuidedRefiner, edit_as_the_points_ask, edit_in_the_box, guidance_maps,
                                     implied_centre_point, simulated_guidance, train_guided, warm_started_network,
                                     weakened_evidence)
from AIReconstructLib.interaction import Click
from AIReconstructLib.io import read_labelmap, write_volume
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.networks import load_network
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.preprocess import normalise
from AIReconstructLib.volume import Volume
from AIReconstructLib.pipeline import SegmentOptions, segment


def test_guidance_maps_are_balls_around_the_points_and_the_segment():
    mask = np.zeros((10, 12, 14), bool)
    mask[2:4, 2:4, 2:4] = True
    include, exclude, segment_map = guidance_maps(mask.shape, [Click((5, 6, 7), True), Click((1, 1, 12), False)],
                                                  mask, (2.0, 1.0, 1.0), radius_mm=2.0)
    assert include[5, 6, 7] == 1 and include[5, 6, 9] == 1 and include[5, 6, 10] == 0
    assert include[6, 6, 7] == 1 and include[7, 6, 7] == 0  # 2 mm: one slice of 2 mm
    assert exclude[1, 1, 12] == 1 and exclude.sum() < include.sum()  # clipped at the border
    np.testing.assert_array_equal(segment_map, mask)


def test_simulated_users_click_where_the_damaged_segment_is_wrong():
    truth = np.zeros((24, 24, 24), bool)
    truth[6:18, 6:18, 6:18] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        damaged, clicks, corrected = simulated_guidance(truth, rng, (1.0, 1.0, 1.0))
        assert 1 <= len(clicks) <= 5 or (damaged == truth).all()
        for click in clicks:
            assert damaged[click.kji] != truth[click.kji] and click.positive == truth[click.kji]
            assert corrected[click.kji]
        assert not (corrected & (damaged == truth)).any()


def test_simulated_users_correct_a_given_segment():
    """With a segment to correct (a model's own result), the points go into its errors."""
    truth = np.zeros((24, 24, 24), bool)
    truth[6:18, 6:18, 6:18] = True
    start = truth.copy()
    start[6:18, 6:18, 12:18] = False  # the model missed a part
    start[1:4, 1:4, 1:4] = True  # and added a false one
    for seed in range(5):
        given, clicks, corrected = simulated_guidance(truth, np.random.default_rng(seed), (1.0, 1.0, 1.0), start)
        np.testing.assert_array_equal(given, start)
        assert clicks[0].positive and clicks[0].kji[2] >= 12  # the largest error first
        assert all(start[c.kji] != truth[c.kji] for c in clicks) and not (corrected & (start == truth)).any()


def test_the_image_is_made_ambiguous_where_the_points_correct():
    """Missed tumour the points add fades toward the brain around it, a wrong part they remove
    brightens toward the tumour; the rest of the image is unchanged."""
    truth = np.zeros((24, 24, 40), bool)
    truth[6:18, 6:18, 6:18] = True
    image = np.where(truth, 3.0, 0.0).astype(np.float32)[None]
    mask = truth.copy()
    mask[6:18, 6:18, 12:18] = False  # missed, then added by a point
    mask[8:16, 8:16, 28:34] = True  # wrongly added, then removed by a point
    weakened = weakened_evidence(image, truth, mask != truth, np.random.default_rng(0))[0]
    assert weakened[8:16, 8:16, 14:16].mean() < 2.0 and weakened[8:16, 8:16, 30:32].mean() > 1.0
    np.testing.assert_array_equal(weakened[:, :, :8], image[0][:, :, :8])


def test_the_model_changes_only_what_the_points_ask_for():
    """An include point adds the part of the proposal it lies in (not a far part, and nothing the
    proposal leaves out is removed near it); an exclude point removes the wrong part it lies in."""
    mask = np.zeros((30, 30, 60), bool)
    mask[10:20, 10:20, 10:20] = True  # the current segment
    mask[10:20, 10:20, 40:50] = True  # a second part, partly wrong
    proposal = mask.copy()
    proposal[10:20, 10:20, 20:26] = True  # the missed part the include point lies in
    proposal[2:5, 2:5, 2:5] = True  # a far, unasked-for addition
    proposal[10:20, 10:12, 10:20] = False  # would shrink the segment beside the include point
    proposal[10:20, 10:20, 45:50] = False  # the wrong part the exclude point lies in
    clicks = [Click((15, 15, 23), True), Click((15, 15, 48), False)]
    edited = edit_as_the_points_ask(mask, proposal, clicks, (1.0, 1.0, 1.0), reach_mm=20.0, radius_mm=1.0)
    expected = mask.copy()
    expected[10:20, 10:20, 20:26] = True
    expected[10:20, 10:20, 45:50] = False
    np.testing.assert_array_equal(edited, expected)
    # a point the proposal disagrees with still gets its ball
    edited = edit_as_the_points_ask(mask, mask, [Click((15, 15, 30), True)], (1.0, 1.0, 1.0), 20.0, 1.0)
    assert edited[15, 15, 30] and edited.sum() == mask.sum() + 7


def test_a_box_is_segmented_by_the_model_and_bounds_the_segment():
    """Inside the box the proposal is the segment (with the points' balls); around it, within reach
    of the box and the points, nothing else belongs to it; farther away the segment is kept."""
    mask = np.zeros((30, 30, 80), bool)
    mask[10:20, 10:20, 8:14] = True  # beside the box: removed
    mask[10:20, 10:20, 70:78] = True  # far from it: kept
    proposal = np.zeros_like(mask)
    proposal[8:22, 8:22, 20:34] = True  # reaches out of the box
    box = ((10, 10, 16), (19, 19, 30))
    clicks = [Click((15, 15, 31), False), Click((15, 15, 40), True)]  # inside; outside the box: ignored
    edited = edit_in_the_box(mask, proposal, clicks, box, (1.0, 1.0, 1.0), reach_mm=10.0, radius_mm=1.0)
    expected = np.zeros_like(mask)
    expected[10:20, 10:20, 20:31] = True  # the proposal within the box
    expected[15, 15, 30] = False  # the exclude point's ball
    expected[10:20, 10:20, 70:78] = True
    np.testing.assert_array_equal(edited, expected)
    # a box holding neither an include point nor any of the segment is assumed drawn around its centre
    assert implied_centre_point(mask, [], box) == [Click((14, 14, 23), True)]
    assert implied_centre_point(mask, [Click((12, 12, 20), True)], box) == []
    assert implied_centre_point(mask, [], ((10, 10, 8), (12, 12, 10))) == []


def test_the_guided_network_starts_as_the_base_model(tmp_path):
    """Before training, the guided network gives the base model's scores for background and the first
    label whatever the guidance channels hold; training then changes the weights that read them."""
    from conftest import write_model

    base = load_card(write_model(tmp_path / "base", seed=3))
    guided = warm_started_network(base).eval()
    image = torch.randn(1, 1, 32, 32, 32)
    guidance = (torch.rand(1, 3, 32, 32, 32) > 0.9).float()
    with torch.no_grad():
        expected = load_network(base).eval()(image)[:, [0, base.labels[0].value]]
        torch.testing.assert_close(guided(torch.cat([image, guidance], dim=1)), expected)
        torch.testing.assert_close(guided(torch.cat([image, torch.zeros_like(guidance)], dim=1)), expected)


@pytest.fixture(scope="module")
def guided_model(tmp_path_factory):
    from conftest import write_model

    work = tmp_path_factory.mktemp("guided")
    base = load_card(write_model(work / "base"))
    write_phantom_dataset(work / "data", count=2, first_seed=600, spacing=(4.0, 4.0, 4.0))
    card_path = train_guided(work / "data", base, work / "guided", minutes=0.05, seed=1)
    with pytest.raises(OutputError, match="already holds a model"):  # a second run keeps it
        train_guided(work / "data", base, work / "guided", minutes=0.05, seed=2)
    return work, base, card_path


def test_a_short_training_run_writes_a_guided_card(guided_model):
    _, base, card_path = guided_model
    card = load_card(card_path)  # validated, checksum checked
    assert card.name == "tiny-test-model-guided" and card.data["guidance"]["radius_mm"] == 3.0
    assert [c["name"] for c in card.channels] == ["CT", "include points", "exclude points", "current segment"]
    assert card.data["training"]["steps"] >= 1 and (card_path.parent / "training_log.csv").is_file()
    with pytest.raises(InputError, match="corrects segments with points"):
        segment([make_phantom(3, spacing=(4.0, 4.0, 4.0)).image], card, SegmentOptions(device="cpu"))
    with pytest.raises(InputError, match="not a guided model"):
        GuidedRefiner(base)


def test_training_corrects_given_segments_and_needs_one_for_each_case(guided_model):
    """``start_segments``: each case's segment to correct (here the truth with its lower half missed
    and dilated, as a model might give it); a case without one is refused in one line."""
    from scipy import ndimage

    work, base, _ = guided_model
    segments = work / "segments"
    segments.mkdir()
    for label in sorted((work / "data" / "labelsTr").glob("*.nii.gz")):
        truth = read_labelmap(label)
        liver = truth.array == base.labels[0].value
        liver[: liver.shape[0] // 2] = False
        write_volume(truth.with_array(ndimage.binary_dilation(liver).astype(np.uint8)), segments / label.name)
    card_path = train_guided(work / "data", base, work / "guided-given", minutes=0.05, seed=1, start_segments=segments)
    assert load_card(card_path).data["training"]["start_segments"] == "segments"
    next(segments.iterdir()).unlink()
    with pytest.raises(InputError, match=r"No segment to correct for case phantom_\d+: .* is missing"):
        train_guided(work / "data", base, work / "guided-missing", minutes=0.05, start_segments=segments)


def test_a_guided_model_on_a_grid_of_its_own_from_the_command_line(guided_model, capsys):
    """``train-guided --spacing --patch-size --radius``: a guided model that looks closer than its
    base (a finer grid, a smaller patch) refines at that grid; a patch its network cannot take is
    refused in one line before training."""
    work, base, _ = guided_model
    output = work / "guided-fine"
    common = ["train-guided", str(work / "data"), "--base", str(base.folder), "--minutes", "0.05",
              "--spacing", "3", "3", "3", "--radius", "4"]
    assert main([*common, "--patch-size", "17", "16", "16", "-o", str(work / "guided-odd")]) == 2
    assert "cannot take patches of 17 x 16 x 16 voxels" in capsys.readouterr().err
    assert not (work / "guided-odd").exists()
    assert main([*common, "--patch-size", "16", "16", "16", "-o", str(output)]) == 0
    card = load_card(output / "card.json")
    assert (card.spacing(), card.patch_size, card.data["guidance"]["radius_mm"]) == ((3.0, 3.0, 3.0), (16, 16, 16), 4.0)
    phantom = make_phantom(7, spacing=(4.0, 4.0, 4.0))
    mask = phantom.labels.array == 1
    centre = tuple(np.argwhere(mask).mean(axis=0).astype(int))
    refined = GuidedRefiner(card)(phantom.image, mask, [Click(centre, True)])
    assert refined.shape == mask.shape and refined[centre]  # the point's own ball at least


def test_the_guided_model_sees_the_image_as_in_training(guided_model, tmp_path):
    """The image z-scored over the whole volume, not over the box around the points (mostly lesion
    there), and enough of it around them to fill the model's patch instead of padding: both gave a
    MRI model another image than it was trained on, and nonsense back."""
    work, _, card_path = guided_model
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["channels"][0]["normalisation"] = {"scheme": "zscore_nonzero"}
    folder = tmp_path / "mri-guided"
    folder.mkdir()
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    (folder / "model.safetensors").write_bytes((card_path.parent / "model.safetensors").read_bytes())
    refiner = GuidedRefiner(load_card(folder / "card.json"))
    seen = []
    refiner.predictor = lambda tensor: seen.append(tensor) or torch.zeros(2, *tensor.shape[1:])
    array = np.full((40, 40, 40), 100.0, np.float32)
    array[18:22, 18:22, 18:22] = 200.0  # a small bright lesion in a large organ
    volume = Volume(array, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), np.eye(3))
    refiner(volume, np.zeros(array.shape, bool), [Click((20, 20, 20), True)], reach_mm=4.0)
    image = seen[0][0].numpy()
    whole = normalise(array, {"scheme": "zscore_nonzero"})
    assert image.max() == pytest.approx(whole.max()) and image.min() == pytest.approx(whole.min())
    assert all(32 <= n <= 33 for n in image.shape)  # a patch (and its last voxel), cut from the image around the point


def test_the_guided_model_segments_inside_a_box(guided_model):
    """A box alone (no point, an empty segment): the network is told to look at the box's centre (an
    include ball there in its input), and its answer is the segment inside the box, none outside."""
    _, _, card_path = guided_model
    refiner = GuidedRefiner(load_card(card_path))
    network_input = []
    predict = refiner.predictor
    refiner.predictor = lambda tensor: network_input.append(tensor) or predict(tensor)
    phantom = make_phantom(7, spacing=(4.0, 4.0, 4.0))
    liver = phantom.labels.array == 1
    corners = np.argwhere(liver)
    box = (tuple(corners.min(axis=0)), tuple(corners.max(axis=0)))
    refined = refiner(phantom.image, np.zeros_like(liver), [], box=box)
    centre = tuple(int(round((a + b) / 2)) for a, b in zip(*box))
    in_box = np.zeros_like(liver)
    in_box[tuple(slice(a, b + 1) for a, b in zip(*box))] = True
    assert refined[centre] and not (refined & ~in_box).any()
    assert network_input[0][1].sum() > 0 and network_input[0][2].sum() == 0  # an include ball, no exclude


def test_refine_with_the_guided_model_on_the_command_line(guided_model, tmp_path, capsys):
    _, _, card_path = guided_model
    phantom = make_phantom(7, spacing=(4.0, 4.0, 4.0))
    image = write_volume(phantom.image, tmp_path / "ct.nii.gz")
    labels = write_volume(phantom.labels, tmp_path / "labels.nii.gz")
    liver = np.argwhere(phantom.labels.array == 1).mean(axis=0)
    point = phantom.image.ijk_to_lps()[:3, :3] @ liver[::-1] + phantom.image.ijk_to_lps()[:3, 3]
    out = tmp_path / "refined.nii.gz"
    assert main(["refine", str(image), str(labels), "--label", "1", "--include", *map(str, point),
                 "--guided", str(card_path), "-o", str(out), "--json-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    refined = read_labelmap(out, like=phantom.image)
    assert result["outputs"] == [str(out)] and refined.array.shape == phantom.labels.array.shape
    others = (phantom.labels.array > 1)
    np.testing.assert_array_equal(refined.array[others], phantom.labels.array[others])  # other segments kept
