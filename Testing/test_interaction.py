"""Interactive correction: the simulated user's clicks, refine near the points only, the box, and the
refine command on patient coordinates."""

import numpy as np
import pytest

from AIReconstructLib.cli import main
from AIReconstructLib.errors import InputError
from AIReconstructLib.interaction import (Click, clicks_to_reach, dice, next_click, refine, refine_labelmap,
                                          refine_region, simulate, to_voxel, to_voxel_box)
from AIReconstructLib.io import read_labelmap, write_volume
from AIReconstructLib.volume import Volume
from conftest import oblique_direction

SPACING = (1.0, 1.2, 2.0)


def _scene():
    """A bright ball (radius 12 mm) and a dimmer, separate blob in noise, on an oblique grid."""
    k, j, i = np.mgrid[0:32, 0:60, 0:70]
    x, y, z = i * SPACING[0], j * SPACING[1], k * SPACING[2]
    ball = (x - 30) ** 2 + (y - 36) ** 2 + (z - 30) ** 2 < 12 ** 2
    blob = (x - 58) ** 2 + (y - 20) ** 2 + (z - 30) ** 2 < 6 ** 2
    rng = np.random.default_rng(0)
    image = np.where(ball, 300.0, np.where(blob, 150.0, 0.0)) + rng.normal(0, 10, ball.shape)
    volume = Volume(image.astype(np.float32), SPACING, (4.0, -7.0, 11.0), oblique_direction(15))
    return volume, ball, blob


def test_the_simulated_user_clicks_in_the_middle_of_the_largest_error():
    _, ball, blob = _scene()
    click = next_click(blob, ball, SPACING[::-1])  # the ball is missed (larger) and the blob wrongly added
    assert click.positive and ball[click.kji]
    centre = np.argwhere(ball).mean(axis=0)
    assert np.linalg.norm((np.array(click.kji) - centre) * SPACING[::-1]) < 2.5
    assert not next_click(ball, ball, SPACING[::-1])
    only_wrong = next_click(ball | blob, ball, SPACING[::-1])
    assert not only_wrong.positive and blob[only_wrong.kji]


def test_one_include_click_finds_the_ball_and_one_exclude_click_removes_the_blob():
    volume, ball, blob = _scene()
    centre = tuple(int(v) for v in np.round(np.argwhere(ball).mean(axis=0)))
    found = refine(volume, np.zeros_like(ball), [Click(centre, True)])
    assert dice(found, ball) > 0.9
    blob_centre = tuple(int(v) for v in np.round(np.argwhere(blob).mean(axis=0)))
    cleaned = refine(volume, ball | blob, [Click(blob_centre, False)])
    assert not (cleaned & blob).any() and dice(cleaned, ball) > 0.99


def test_refine_changes_nothing_beyond_the_reach_of_the_points():
    volume, ball, blob = _scene()
    wrong = np.zeros_like(ball)
    wrong[2:6, 2:8, 2:8] = True  # a far-away wrong piece that nobody clicked on
    centre = tuple(int(v) for v in np.round(np.argwhere(ball).mean(axis=0)))
    result = refine(volume, wrong, [Click(centre, True)], reach_mm=15.0)
    assert (result[2:6, 2:8, 2:8]).all()


def test_refine_on_its_region_alone_gives_what_it_gives_on_the_whole_image():
    """What the Slicer module sends the engine: the image and the segment cut to refine_region."""
    volume, ball, blob = _scene()
    clicks = [Click((15, 30, 25), True), Click((15, 20, 48), False)]
    box = ((8, 18, 12), (22, 46, 40))
    start = blob | (np.indices(ball.shape)[2] > 66)  # something to keep outside the reach
    region = refine_region(ball.shape, SPACING[::-1], clicks, box, reach_mm=10.0)
    low = np.array([part.start for part in region])
    assert region[2].start > 0 and region[2].stop < ball.shape[2]  # a true block, cut on both sides
    whole = refine(volume, start, clicks, box, reach_mm=10.0)
    shifted = [Click(tuple(np.array(click.kji) - low), click.positive) for click in clicks]
    block = refine(volume.cropped(region), start[region], shifted, tuple(tuple(np.array(b) - low) for b in box),
                   reach_mm=10.0)
    np.testing.assert_array_equal(block, whole[region])
    outside = np.ones(ball.shape, bool)
    outside[region] = False
    np.testing.assert_array_equal(whole[outside], start[outside])
    assert refine_region(ball.shape, SPACING[::-1], []) is None


def test_a_box_alone_segments_what_is_inside_it():
    volume, ball, _ = _scene()
    corners = np.argwhere(ball)
    box = (tuple(corners.min(axis=0) - 1), tuple(corners.max(axis=0) + 1))
    assert dice(refine(volume, np.zeros_like(ball), [], box=box), ball) > 0.9


def test_a_box_larger_than_the_image_finds_the_object_against_its_faces():
    """Drawn around more than the whole image (corners in patient mm, cut to the image): its faces,
    not the rest of the image, are background, so the bright ball is found, not everything."""
    volume, ball, _ = _scene()
    matrix = volume.ijk_to_lps()
    far = [matrix[:3, :3] @ np.array(corner) + matrix[:3, 3] for corner in ((-20, -20, -20), (90, 80, 50))]
    box = to_voxel_box(volume, far)
    assert box == ((0, 0, 0), tuple(n - 1 for n in ball.shape))
    centre = tuple(int(v) for v in np.round(np.argwhere(ball).mean(axis=0)))
    assert dice(refine(volume, np.zeros_like(ball), [Click(centre, True)], box=box), ball) > 0.9
    with pytest.raises(InputError, match=r"The box from \(.*\) to \(.*\) mm \(LPS\) lies outside the image"):
        to_voxel_box(volume, [far[1] + 500, far[1] + 600])


def test_nothing_outside_the_box_belongs_to_the_segment_afterwards():
    """Not the seed at a small box's centre (a 3 mm ball), not an include point placed outside it."""
    volume, ball, _ = _scene()
    centre = np.round(np.argwhere(ball).mean(axis=0)).astype(int)
    box = (tuple(centre - 1), tuple(centre + 1))  # 3 x 3 x 3 voxels, smaller than a point's seed
    in_box = np.zeros_like(ball)
    in_box[tuple(slice(a, b + 1) for a, b in zip(*box))] = True
    outside_point = Click(tuple(centre + (0, 0, 6)), True)
    for clicks in ([], [outside_point]):
        result = refine(volume, np.zeros_like(ball), clicks, box=box)
        assert result.any() and not (result & ~in_box).any()


def test_simulation_reaches_the_target_with_few_clicks():
    volume, ball, _ = _scene()
    scores = simulate(volume, np.zeros_like(ball), ball, clicks=5)
    reached = clicks_to_reach(0.0, scores, 0.9)
    assert reached is not None and reached <= 2 and scores[reached - 1] >= 0.9
    assert clicks_to_reach(0.95, scores, 0.9) == 0 and clicks_to_reach(0.0, [0.5, 0.8], 0.9) is None


def test_refine_command_takes_points_in_patient_millimetres(tmp_path, capsys):
    volume, ball, blob = _scene()
    image = write_volume(volume, tmp_path / "image.nii.gz")
    labels = volume.with_array(np.where(blob, 1, 0).astype(np.uint8))
    other = labels.array.copy()
    other[0:2, 0:3, 0:3] = 2  # another segment, which refine must leave alone
    labels = labels.with_array(other)
    labels_path = write_volume(labels, tmp_path / "labels.nii.gz")
    centre_kji = np.argwhere(ball).mean(axis=0)
    centre_mm = volume.ijk_to_lps()[:3, :3] @ centre_kji[::-1] + volume.ijk_to_lps()[:3, 3]
    assert to_voxel(volume, centre_mm) == tuple(int(v) for v in np.round(centre_kji))
    out = tmp_path / "refined.nii.gz"
    assert main(["refine", str(image), str(labels_path), "--label", "1", "--include", *map(str, centre_mm),
                 "-o", str(out)]) == 0
    assert "voxels changed" in capsys.readouterr().out
    refined = read_labelmap(out)
    assert dice(refined.array == 1, ball | blob) > 0.9 and (refined.array[0:2, 0:3, 0:3] == 2).all()
    ras = centre_mm * [-1, -1, 1]
    again = refine_labelmap(volume, labels, 1, include_mm=[ras], coordinates="RAS")
    np.testing.assert_array_equal(again.array, refined.array)
    with pytest.raises(InputError, match="outside the image"):
        refine_labelmap(volume, labels, 1, include_mm=[(1e4, 0, 0)])
    with pytest.raises(InputError, match="at least one include or exclude point"):
        refine_labelmap(volume, labels, 1)
    assert main(["refine", str(image), str(labels_path), "--label", "liver", "--include", "0", "0", "0",
                 "-o", str(out)]) != 0
    assert main(["refine", str(image), str(labels_path), "--label", "7", "--include", *map(str, centre_mm),
                 "-o", str(out)]) != 0  # a value the label map does not have
    assert "No segment '7'" in capsys.readouterr().err and read_labelmap(out).array.max() == 2
