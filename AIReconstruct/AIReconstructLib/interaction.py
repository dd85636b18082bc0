"""Interactive correction of one segment with include / exclude points and an optional box, and the
click protocol used to measure it (docs/interaction.md).

``refine`` changes only voxels within ``reach_mm`` of a point, working in a box around the segment
and the points, so each interaction stays fast on large images and leaves the rest of the segment
as it was. Its method is marker-controlled watershed (scipy's image foresting transform) on the
smoothed gradient magnitude: away from the points the current segment and background are the
seeds, include points seed the segment and exclude points the background, and the voxels near
the points go to whichever seed the image's edges let reach them first. This is the non-learned
method; a model trained with clicks (nnInteractive, DeepEdit style) is not shipped yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError
from .volume import Volume

CLICK_RADIUS_MM = 3.0
REACH_MM = 20.0  # how far from a point (or the box) a correction may change the segment


@dataclass(frozen=True)
class Click:
    """A point on the array grid ``(k, j, i)``: include (positive) or exclude."""

    kji: tuple[int, int, int]
    positive: bool


def _distance_to(points: list[tuple[int, int, int]], shape, spacing_kji) -> np.ndarray:
    """Distance (mm) from every voxel of ``shape`` to the nearest of ``points`` (inf without points)."""
    if not points:
        return np.full(shape, np.inf)
    seeds = np.ones(shape, bool)
    for point in points:
        seeds[point] = False
    return ndimage.distance_transform_edt(seeds, sampling=spacing_kji)


def ball_in_window(shape, centre_kji, spacing_kji, radius_mm: float) -> tuple[tuple, np.ndarray]:
    """The window (slices of a grid of ``shape``) around a ball of ``radius_mm`` at ``centre_kji``,
    and the ball in it (boolean, cut where the window meets the grid's edge)."""
    spacing = np.asarray(spacing_kji, float)
    reach = np.ceil(radius_mm / spacing).astype(int)
    low = np.maximum(np.array(centre_kji) - reach, 0)
    high = np.minimum(np.array(centre_kji) + reach + 1, shape)
    window = tuple(slice(a, b) for a, b in zip(low, high))
    distance = sum(((g - c) * s) ** 2 for g, c, s in zip(np.ogrid[window], centre_kji, spacing))
    return window, distance <= radius_mm ** 2


def box_centre(box) -> tuple[int, int, int]:
    """The voxel at the centre of a box ((k0, j0, i0), (k1, j1, i1), inclusive)."""
    return tuple(int(round((a + b) / 2)) for a, b in zip(*box))


def box_slices(box, low) -> tuple[slice, slice, slice]:
    """A voxel box ((k0, j0, i0), (k1, j1, i1), inclusive) as slices of a block of the grid that
    starts at voxel ``low`` (empty where the box lies before the block)."""
    return tuple(slice(max(a - o, 0), max(b - o + 1, 0)) for a, b, o in zip(box[0], box[1], low))


def refine_region(shape, spacing_kji, clicks: list[Click], box: tuple | None = None,
                  reach_mm: float = REACH_MM) -> tuple[slice, slice, slice] | None:
    """The block of a grid of ``shape`` that ``refine`` reads and may change: around the clicks and
    the box, grown by ``reach_mm``, cut to the grid; None without a click or a box. ``refine`` of
    the image and the segment cut to this block gives the same block as on the whole."""
    margin = np.ceil(reach_mm / np.asarray(spacing_kji, float)).astype(int)
    corners = [np.array(c.kji) for c in clicks] + ([np.array(b) for b in box] if box else [])
    if not corners:
        return None
    low = np.maximum(np.min(corners, axis=0) - margin, 0)
    high = np.minimum(np.max(corners, axis=0) + margin + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def refine(volume: Volume, mask: np.ndarray, clicks: list[Click], box: tuple | None = None,
           reach_mm: float = REACH_MM) -> np.ndarray:
    """The segment ``mask`` (boolean, on ``volume``'s grid) corrected by ``clicks``; only voxels
    within ``reach_mm`` of a click change. ``box`` ((k0, j0, i0), (k1, j1, i1), inclusive), if
    given, is re-segmented from the segment's interior in it and the points (from its centre when
    it holds neither) against its faces, and bounds the segment: outside it, within ``reach_mm`` of
    the box and the points, nothing belongs to the segment afterwards."""
    if mask.shape != volume.array.shape:
        raise InputError(f"The mask's shape {mask.shape} does not match the image's {volume.array.shape}")
    for click in clicks:
        if not all(0 <= c < n for c, n in zip(click.kji, mask.shape)):
            raise InputError(f"Point {click.kji} lies outside the image (size {mask.shape})")
    spacing = np.array(volume.spacing[::-1])
    region = refine_region(mask.shape, spacing, clicks, box, reach_mm)
    if region is None:
        return mask.copy()
    low = np.array([part.start for part in region])
    local = [Click(tuple(np.array(c.kji) - low), c.positive) for c in clicks]

    image = volume.array[region].astype(np.float32)
    low_value, high_value = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - low_value) / max(high_value - low_value, 1e-6), 0, 1)
    sigma = 1.0 / (spacing / spacing.min())  # one voxel of the finest axis, in each axis' voxels
    gradient = ndimage.gaussian_gradient_magnitude(image, sigma)
    landscape = np.round(65535 * gradient / max(gradient.max(), 1e-6)).astype(np.uint16)

    inside = mask[region]
    near_include = _distance_to([c.kji for c in local if c.positive], inside.shape, spacing)
    near_exclude = _distance_to([c.kji for c in local if not c.positive], inside.shape, spacing)
    markers = np.where(inside, 1, 2).astype(np.int16)  # away from the points, the segment stays as it is
    markers[np.minimum(near_include, near_exclude) < reach_mm] = 0  # near them, the image's edges decide
    flood = (slice(None),) * 3  # where the watershed runs: the region, or the box its faces seal
    if box is not None:  # inside the box the edges decide, from the segment's interior or the points
        flood = box_slices(box, low)
        in_box = np.zeros(inside.shape, bool)
        in_box[flood] = True
        markers[in_box] = 0
        markers[in_box & ndimage.binary_erosion(inside, iterations=2)] = 1
        markers[in_box & ~ndimage.binary_erosion(in_box)] = 2  # its faces: what it is drawn around lies inside
    markers[near_include <= CLICK_RADIUS_MM] = 1
    markers[near_exclude <= CLICK_RADIUS_MM] = 2
    if box is not None:
        markers[~in_box] = 2  # the box bounds the segment, whatever the points outside it say
        if not (markers == 1).any():  # nothing inside the box to grow from: its centre
            centre = np.array(box_centre(box)) - low
            window, seed = ball_in_window(inside.shape, centre, spacing, CLICK_RADIUS_MM)
            markers[window][seed & (markers[window] == 0)] = 1
    corrected_region = np.zeros(inside.shape, bool)
    if (markers == 1).any():
        corrected_region[flood] = _settle_edges(ndimage.watershed_ift(landscape[flood], markers[flood]) == 1,
                                                image[flood], markers[flood] == 0)
    corrected = mask.copy()
    corrected[region] = corrected_region
    return corrected


def _settle_edges(segment: np.ndarray, image: np.ndarray, free: np.ndarray) -> np.ndarray:
    """The watershed line falls on the voxels of highest gradient, which lie on both sides of an
    edge; each free voxel on the segment's border goes to the side whose median intensity it is
    closer to (the medians of the free voxels just inside and just outside)."""
    outer = ndimage.binary_dilation(segment) & ~segment & free
    inner = segment & ~ndimage.binary_erosion(segment) & free
    core, around = segment & free & ~inner, ~segment & free & ~outer
    if not core.any() or not around.any():
        return segment
    inside_level, outside_level = np.median(image[core]), np.median(image[around])
    closer_inside = np.abs(image - inside_level) < np.abs(image - outside_level)
    return (segment & ~(inner & ~closer_inside)) | (outer & closer_inside)


def next_click(prediction: np.ndarray, truth: np.ndarray, spacing_kji) -> Click | None:
    """The standard simulated user: click inside the largest error region (missed or wrong voxels),
    at its point farthest from the region's border; include if it was missed. None if no error."""
    best = None
    for errors, positive in ((truth & ~prediction, True), (prediction & ~truth, False)):
        components, count = ndimage.label(errors)
        if count:
            sizes = np.bincount(components.ravel())[1:]
            largest = int(np.argmax(sizes))
            if best is None or sizes[largest] > best[0]:
                best = (sizes[largest], components == largest + 1, positive)
    if best is None:
        return None
    _, region, positive = best
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    return Click(tuple(int(v) for v in np.unravel_index(np.argmax(depth), region.shape)), positive)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def simulate(volume: Volume, start: np.ndarray, truth: np.ndarray, clicks: int = 10, reach_mm: float = REACH_MM,
             method=None) -> list[float]:
    """Correct ``start`` toward ``truth`` with simulated clicks, each in the largest error left, by
    ``method`` (``refine`` or a guided model's refiner); returns the Dice after each click."""
    method = method or refine
    mask, given, scores = start.copy(), [], []
    for _ in range(clicks):
        click = next_click(mask, truth, volume.spacing[::-1])
        if click is not None:
            given.append(click)
            mask = method(volume, mask, given, reach_mm=reach_mm)
        scores.append(dice(mask, truth))
    return scores


def clicks_to_reach(start_score: float, scores: list[float], target: float) -> int | None:
    """The number of clicks after which Dice first reached ``target`` (0 if the start did; None if
    no click did): NoC@90 for ``target`` 0.90."""
    if start_score >= target:
        return 0
    return next((number for number, score in enumerate(scores, 1) if score >= target), None)


def to_voxel(volume: Volume, point_mm, coordinates: str = "LPS") -> tuple[int, int, int]:
    """The voxel ``(k, j, i)`` nearest to a point in patient millimetres (LPS or RAS)."""
    matrix = volume.ijk_to_lps() if coordinates == "LPS" else volume.ijk_to_ras()
    ijk = np.linalg.solve(matrix[:3, :3], np.asarray(point_mm, float) - matrix[:3, 3])
    kji = tuple(int(round(v)) for v in ijk[::-1])
    if not all(0 <= c < n for c, n in zip(kji, volume.array.shape)):
        raise InputError(f"Point {tuple(point_mm)} mm ({coordinates}) lies outside the image")
    return kji


def to_voxel_box(volume: Volume, corners_mm, coordinates: str = "LPS") -> tuple[tuple, tuple]:
    """The voxel box ((k0, j0, i0), (k1, j1, i1), inclusive) that holds the box with the two opposite
    corners ``corners_mm`` (patient mm, LPS or RAS, its faces along the patient axes; on an oblique
    grid the voxel box around it), cut to the image; refused if it lies outside the image."""
    matrix = volume.ijk_to_lps() if coordinates == "LPS" else volume.ijk_to_ras()
    corners = np.asarray(corners_mm, float)
    every_corner = np.array(np.meshgrid(*zip(corners.min(axis=0), corners.max(axis=0)))).reshape(3, -1).T
    kji = np.linalg.solve(matrix[:3, :3], (every_corner - matrix[:3, 3]).T).T[:, ::-1]
    low, high = np.round(kji.min(axis=0)).astype(int), np.round(kji.max(axis=0)).astype(int)
    if (high < 0).any() or (low >= volume.array.shape).any():
        ends = " to ".join("(" + ", ".join(f"{v:g}" for v in corner) + ")" for corner in corners)
        raise InputError(f"The box from {ends} mm ({coordinates}) lies outside the image")
    last = np.array(volume.array.shape) - 1
    return tuple(int(v) for v in np.clip(low, 0, last)), tuple(int(v) for v in np.clip(high, 0, last))


def refine_labelmap(image: Volume, labelmap: Volume, value: int, include_mm=(), exclude_mm=(), box_mm=None,
                    coordinates: str = "LPS", reach_mm: float = REACH_MM, method=None) -> Volume:
    """The label map with segment ``value`` corrected by points (and a box: two opposite corners) in
    patient millimetres, by ``method`` (``refine``, or a guided model's refiner). Added voxels take
    the label only where there was background, so other segments are never overwritten; removed
    voxels become background."""
    if not labelmap.same_grid(image):
        raise InputError("The label map does not match its image (size, spacing, origin or direction differ)")
    clicks = [Click(to_voxel(image, p, coordinates), True) for p in include_mm]
    clicks += [Click(to_voxel(image, p, coordinates), False) for p in exclude_mm]
    box = None if box_mm is None else to_voxel_box(image, box_mm, coordinates)
    if not clicks and box is None:
        raise InputError("Give at least one include or exclude point, or a box")
    before = labelmap.array == value
    after = (method or refine)(image, before, clicks, box, reach_mm=reach_mm)
    array = labelmap.array.copy()
    array[before & ~after] = 0
    array[after & (array == 0)] = value
    return labelmap.with_array(array)
