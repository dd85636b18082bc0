"""Surgical measurements on a phantom whose answers are known: an organ (ball of radius 40 mm) with
a lesion (radius 10 mm) inside, and a vessel (a tube) at a known gap, on an oblique, anisotropic grid."""

import numpy as np
import pytest

from AIReconstructLib.measurements import is_lesion, largest_diameter, lesion_parts, measure
from AIReconstructLib.modelcard import Label
from AIReconstructLib.volume import Volume
from conftest import oblique_direction

LESION_TERMS = {"category": ["SCT", "49755003", "Morphologically Altered Structure"]}
ORGAN_TERMS = {"category": ["SCT", "123037004", "Anatomical Structure"]}
LABELS = [Label(1, "organ", (0.8, 0.4, 0.3), ORGAN_TERMS, {}), Label(2, "lesion", (1.0, 1.0, 0.2), LESION_TERMS, {}),
          Label(3, "vessel", (0.8, 0.1, 0.1), ORGAN_TERMS, {}), Label(4, "absent", (0, 0, 1), ORGAN_TERMS, {})]
SPACING = (0.8, 0.9, 1.2)
ORGAN_RADIUS, LESION_RADIUS, LESION_OFFSET, VESSEL_RADIUS, VESSEL_X = 40.0, 10.0, 15.0, 4.0, 60.0


def _organ_grid():
    """Each voxel's position (mm, relative to the grid's centre along its own axes: x, y, z), that
    centre (along the axes from the first voxel) and the organ ball painted as label 1."""
    shape_ijk = (150, 120, 80)
    k, j, i = np.mgrid[0:shape_ijk[2], 0:shape_ijk[1], 0:shape_ijk[0]]
    centre = (np.array(shape_ijk) - 1) / 2 * SPACING
    x, y, z = (i * SPACING[0] - centre[0], j * SPACING[1] - centre[1], k * SPACING[2] - centre[2])
    array = np.zeros(x.shape, np.uint8)
    array[x ** 2 + y ** 2 + z ** 2 < ORGAN_RADIUS ** 2] = 1
    return (x, y, z), centre, array


@pytest.fixture(scope="module")
def phantom():
    """Physical positions (mm, relative to the grid's centre along its own axes) decide each voxel."""
    (x, y, z), centre, array = _organ_grid()
    array[(x - LESION_OFFSET) ** 2 + y ** 2 + z ** 2 < LESION_RADIUS ** 2] = 2
    array[(x - VESSEL_X) ** 2 + y ** 2 < VESSEL_RADIUS ** 2] = 3
    direction = oblique_direction(20)
    origin = np.array([10.0, -20.0, 5.0])
    lesion_centre = origin + direction @ (centre + [LESION_OFFSET, 0, 0])
    return Volume(array, SPACING, origin, direction), lesion_centre


def test_segments_have_volume_area_diameter_and_centroid(phantom):
    volume, lesion_centre = phantom
    result = measure(volume, LABELS)
    segments = {s["name"]: s for s in result["segments"]}
    assert set(segments) == {"organ", "lesion", "vessel"}  # absent labels are left out
    lesion = segments["lesion"]
    assert lesion["lesion"] and not segments["organ"]["lesion"]
    assert lesion["volume_ml"] == pytest.approx(np.count_nonzero(volume.array == 2) * volume.voxel_volume_ml)
    assert lesion["volume_ml"] == pytest.approx(4 / 3 * np.pi * LESION_RADIUS ** 3 / 1000, rel=0.03)
    assert lesion["surface_area_cm2"] == pytest.approx(4 * np.pi * LESION_RADIUS ** 2 / 100, rel=0.05)
    assert lesion["largest_diameter_mm"] == pytest.approx(2 * LESION_RADIUS, abs=1.0)
    assert segments["organ"]["largest_diameter_mm"] == pytest.approx(2 * ORGAN_RADIUS, abs=1.0)
    np.testing.assert_allclose(lesion["centroid_mm"], lesion_centre, atol=0.3)
    ras = measure(volume, LABELS, coordinates="RAS")["segments"][1]["centroid_mm"]
    np.testing.assert_allclose(ras, lesion_centre * [-1, -1, 1], atol=0.3)


def test_lesion_distances_organ_and_remnant(phantom):
    volume, _ = phantom
    (lesion,) = measure(volume, LABELS, margin_mm=10.0)["lesions"]
    assert lesion["name"] == "lesion" and lesion["organ"] == "organ" and lesion["bordering"] == {"organ": 100.0}
    assert lesion["part_count"] == 1 and "parts" not in lesion  # one part: the label's own figures
    gap_to_vessel = VESSEL_X - VESSEL_RADIUS - (LESION_OFFSET + LESION_RADIUS)
    assert lesion["distances_mm"]["vessel"] == pytest.approx(gap_to_vessel, abs=1.0)
    assert "organ" not in lesion["distances_mm"]
    assert lesion["capsule_distance_mm"] == pytest.approx(ORGAN_RADIUS - LESION_OFFSET - LESION_RADIUS, abs=1.0)
    count = {v: np.count_nonzero(volume.array == v) * volume.voxel_volume_ml for v in (1, 2)}
    assert lesion["organ_volume_ml"] == pytest.approx(count[1])
    assert lesion["organ_with_lesion_ml"] == pytest.approx(count[1] + count[2])
    resection = 4 / 3 * np.pi * (LESION_RADIUS + 10.0) ** 3 / 1000  # the margin stays inside the organ here
    assert resection <= lesion["resection_ml"] <= 1.06 * resection  # errs toward removing more
    assert lesion["remnant_ml"] == pytest.approx(count[1] + count[2] - lesion["resection_ml"])
    assert lesion["remnant_percent"] == pytest.approx(100 * lesion["remnant_ml"] / lesion["organ_with_lesion_ml"])


def test_each_part_of_a_lesion_label_is_measured_largest_first():
    """Three separate lesions of one label (metastases, nodules) inside the organ, on an oblique,
    anisotropic grid: each part's volume, diameter, centroid and distance to the capsule, largest
    first; the label as a whole spans them."""
    (x, y, z), centre, array = _organ_grid()
    balls = [(4.0, (-20.0, 0.0, 0.0)), (8.0, (15.0, 0.0, 0.0)), (5.0, (0.0, 20.0, 5.0))]  # radius, offset (mm)
    for radius, (dx, dy, dz) in balls:
        array[(x - dx) ** 2 + (y - dy) ** 2 + (z - dz) ** 2 < radius ** 2] = 2
    direction, origin = oblique_direction(20), np.array([10.0, -20.0, 5.0])
    volume = Volume(array, SPACING, origin, direction)
    (lesion,) = measure(volume, LABELS)["lesions"]
    assert lesion["part_count"] == 3 and [p["number"] for p in lesion["parts"]] == [1, 2, 3]
    whole = next(s for s in measure(volume, LABELS)["segments"] if s["name"] == "lesion")
    assert whole["largest_diameter_mm"] == pytest.approx(35 + 4 + 8, abs=1.0)  # from the first part to the second
    for part, (radius, offset) in zip(lesion["parts"], sorted(balls, reverse=True)):
        assert part["volume_ml"] == pytest.approx(4 / 3 * np.pi * radius ** 3 / 1000, rel=0.08)
        assert part["largest_diameter_mm"] == pytest.approx(2 * radius, abs=1.0)
        np.testing.assert_allclose(part["centroid_mm"], origin + direction @ (centre + offset), atol=0.3)
        assert part["capsule_distance_mm"] == pytest.approx(ORGAN_RADIUS - np.linalg.norm(offset) - radius, abs=1.0)
        axes = part["axial_axes"]  # a ball's: its diameter both ways, on the slice nearest its centre
        assert axes["long_axis_mm"] == pytest.approx(2 * radius, abs=1.0)
        assert axes["short_axis_mm"] == pytest.approx(2 * radius, abs=1.0)
    assert "axial_axes" not in lesion  # several lesions in one label: each part has its own
    assert sum(p["volume_ml"] for p in lesion["parts"]) == pytest.approx(whole["volume_ml"])
    summary = lesion_parts(volume, LABELS)  # what segment records: counts, volumes, centres (no surface)
    assert list(summary) == ["lesion"] and summary["lesion"]["count"] == 3  # the organ is no lesion
    for listed, part in zip(summary["lesion"]["largest"], lesion["parts"]):
        assert listed["volume_ml"] == pytest.approx(part["volume_ml"], abs=1e-3)
        np.testing.assert_allclose(listed["centre_mm"], part["centroid_mm"], atol=0.06)


@pytest.mark.parametrize("direction", [np.eye(3), oblique_direction(20)], ids=["axial", "oblique"])
def test_a_lesions_long_and_short_axes_on_the_axial_slices(direction):
    """An ellipsoid lesion (semi-axes 12, 7 and 5 mm, its long axis turned 30 degrees in the slice
    plane) in the organ: the long axis is its largest diameter on a slice (24 mm on the slice through
    its centre, 0.6 mm off it here: 23.8 mm), the short axis the longest line across it at right
    angles on that slice (14 mm), both with their ends on that slice, as RECIST measures them."""
    (x, y, z), _, array = _organ_grid()
    angle = np.radians(30.0)
    along, across = np.cos(angle) * x + np.sin(angle) * y, -np.sin(angle) * x + np.cos(angle) * y
    array[(along / 12.0) ** 2 + (across / 7.0) ** 2 + (z / 5.0) ** 2 < 1] = 2
    volume = Volume(array, SPACING, (10.0, -20.0, 5.0), direction)
    (lesion,) = measure(volume, LABELS)["lesions"]
    axes = lesion["axial_axes"]
    assert axes["long_axis_mm"] == pytest.approx(2 * 12.0 * np.sqrt(1 - (0.6 / 5.0) ** 2), abs=0.6)
    assert axes["short_axis_mm"] == pytest.approx(2 * 7.0 * np.sqrt(1 - (0.6 / 5.0) ** 2), abs=0.6)
    long_ends, short_ends = np.array(axes["long_axis_ends_mm"]), np.array(axes["short_axis_ends_mm"])
    slice_normal = direction[:, 2]  # the grid's k axis: its slices are the axial ones
    heights = np.concatenate([long_ends, short_ends]) @ slice_normal
    assert np.ptp(heights) < 0.05  # all four ends on one slice
    long_direction, short_direction = (long_ends[1] - long_ends[0]), (short_ends[1] - short_ends[0])
    assert abs(long_direction @ short_direction) / axes["long_axis_mm"] / axes["short_axis_mm"] < 0.02
    in_grid = (long_direction @ direction) / axes["long_axis_mm"]  # the long axis along the ellipsoid's, 30 degrees
    assert abs(in_grid[0]) == pytest.approx(np.cos(angle), abs=0.03) and abs(in_grid[1]) == pytest.approx(np.sin(angle), abs=0.03)


def test_each_lesion_part_names_the_segments_around_it():
    """An organ in two segments (as the liver in its Couinaud segments): a lesion across their border
    lies half in each, a second part of the lesion label in one only; the label's own figures count
    both parts, and the organ is the segment holding at least half of the voxels around them."""
    (x, y, z), centre, array = _organ_grid()
    array[(array == 1) & (x >= 0)] = 5
    array[x ** 2 + y ** 2 + z ** 2 < 10.0 ** 2] = 2  # across the border of the two segments
    array[(x - 25.0) ** 2 + y ** 2 + z ** 2 < 5.0 ** 2] = 2  # inside the second segment
    labels = LABELS + [Label(5, "segment 2", (0.3, 0.7, 0.3), ORGAN_TERMS, {})]
    (lesion,) = measure(Volume(array, SPACING, (0.0, 0.0, 0.0), oblique_direction(20)), labels)["lesions"]
    first, second = lesion["parts"]
    assert set(first["bordering"]) == {"organ", "segment 2"} and second["bordering"] == {"segment 2": 100.0}
    assert first["bordering"]["organ"] == pytest.approx(50.0, abs=5.0)
    assert sum(first["bordering"].values()) == pytest.approx(100.0, abs=0.2)  # nothing else around it
    assert list(lesion["bordering"]) == ["segment 2", "organ"] and lesion["organ"] == "segment 2"
    assert sum(lesion["bordering"].values()) == pytest.approx(100.0, abs=0.2)


def test_liver_resections_by_couinaud_segments():
    """Eight segments as slabs (as TotalSegmentator's liver-segment model names them), a metastasis
    inside segment VII and one across the border of IV and V: each standard resection's remnant is
    the kept segments' volume, its share of the liver, and the lesion parts that border it."""
    z, y, x = np.indices((40, 40, 80))
    array = (x // 10 + 1).astype(np.uint8)  # segment n at x = 10 (n - 1) ... 10 n - 1
    array[(x - 65) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 < 16] = 9  # inside VII
    array[(x - 39.5) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 < 16] = 9  # across IV and V
    labels = [Label(n, f"liver_segment_{n}", (0.5, 0.3, 0.2), ORGAN_TERMS, {}) for n in range(1, 9)]
    labels.append(Label(9, "liver metastases", (1.0, 1.0, 0.2), LESION_TERMS, {}))
    result = measure(Volume(array, (1.0, 1.0, 1.0)), labels)
    volumes = {n: np.count_nonzero(array == n) / 1000 for n in range(1, 9)}
    resections = {r["name"]: r for r in result["liver_resections"]}
    right = resections["right hepatectomy"]
    assert right["removed_segments"] == [5, 6, 7, 8]
    assert right["remnant_ml"] == pytest.approx(sum(volumes[n] for n in (1, 2, 3, 4)))
    assert right["remnant_percent"] == pytest.approx(100 * right["remnant_ml"] / sum(volumes.values()))
    assert right["lesion_parts_bordering_remnant"] == 1  # the one across IV and V
    assert resections["extended right hepatectomy (right trisectionectomy)"]["lesion_parts_bordering_remnant"] == 0
    assert resections["left lateral sectionectomy"]["lesion_parts_bordering_remnant"] == 2
    assert measure(Volume(np.where(array == 8, 0, array), (1.0, 1.0, 1.0)), labels)["liver_resections"] == []

    # the lesions lie in the liver, all eight segments together: the one across IV and V too (half in
    # each), and the capsule is the liver's outer surface, not the border of the segment around a lesion
    (lesion,) = result["lesions"]
    assert lesion["organ"] == "liver" and lesion["organ_volume_ml"] == pytest.approx(sum(volumes.values()))
    in_seven = next(part for part in lesion["parts"] if part["bordering"] == {"liver_segment_7": 100.0})
    assert in_seven["capsule_distance_mm"] == pytest.approx(79.5 - 65 - 4, abs=1.0)  # to the liver's end, x = 79.5
    assert lesion["capsule_distance_mm"] == pytest.approx(79.5 - 65 - 4, abs=1.0)
    assert not any(name.startswith("liver_segment") for name in lesion["distances_mm"])
    assert lesion["remnant_ml"] == pytest.approx(sum(volumes.values()) + np.count_nonzero(array == 9) / 1000
                                                 - lesion["resection_ml"])


def test_a_lesion_outside_any_organ_has_distances_but_no_remnant():
    array = np.zeros((30, 40, 40), np.uint8)
    array[10:20, 10:20, 5:15] = 2
    array[10:20, 10:20, 25:35] = 3
    (lesion,) = measure(Volume(array, (1.0, 1.0, 1.0)), LABELS)["lesions"]
    assert lesion["organ"] is None and "remnant_ml" not in lesion and lesion["bordering"] == {}
    assert lesion["distances_mm"]["vessel"] == pytest.approx(10.0, abs=1.0)


def test_lesions_are_told_by_their_terminology_and_diameters_are_exact_on_points():
    assert is_lesion(LABELS[1]) and not is_lesion(LABELS[0]) and not is_lesion(Label(1, "x", (1, 1, 1), {}, {}))
    points = np.random.default_rng(0).normal(size=(5000, 3))
    brute = max(np.linalg.norm(points[:, None] - points[None, :2500], axis=-1).max(),
                np.linalg.norm(points[:, None] - points[None, 2500:], axis=-1).max())
    assert largest_diameter(points) == pytest.approx(brute)
    assert measure(Volume(np.zeros((4, 4, 4), np.uint8)), LABELS)["segments"] == []
