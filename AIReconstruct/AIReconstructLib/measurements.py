"""Surgical measurements from a label map (formulas in docs/measurements.md).

Per segment: volume (voxel count x voxel volume), surface area and largest diameter (of the smoothed
closed surface), centroid (mean voxel centre) in patient coordinates. Per lesion (a label whose
terminology category is SNOMED CT 49755003, "Morphologically Altered Structure"): the smallest
distance from its surface to every other segment's surface; the segments around it, with the share
of the voxels around it that each holds (the Couinaud segments a liver lesion lies in); the organ
it lies in (the segment holding at least half of them, or the liver where its Couinaud segments
together do); the distance to that organ's capsule (the
outer surface of organ and lesion together); and a remnant estimate: the organ's volume with the
lesion, the volume removed with a safety margin around the lesion, and what remains. A lesion label
of several separate parts (metastases, lung nodules) also gets each part's volume, largest
diameter, centroid, the segments around it and distance to the capsule, largest first. Where the
liver's eight Couinaud segments are segmented: the remnant of each standard anatomical resection.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, cKDTree

from .manifold import used_points
from .modelcard import Label
from .postprocess import largest_parts
from .surfaces import SharedMesh, mesh_measurements, shared_mesh, surfaces_of
from .volume import Volume, kji_to_patient

LESION_CATEGORY = "49755003"  # SNOMED CT "Morphologically Altered Structure"
MAX_LESION_PARTS = 20  # separate parts of a lesion label measured one by one, largest first
# the liver's Couinaud segments I-VIII, as TotalSegmentator's liver-segment model names them, and the
# standard anatomical resections by the segments they remove
LIVER_SEGMENTS = {number: f"liver_segment_{number}" for number in range(1, 9)}
LIVER_RESECTIONS = {
    "right hepatectomy": (5, 6, 7, 8),
    "extended right hepatectomy (right trisectionectomy)": (4, 5, 6, 7, 8),
    "right posterior sectionectomy": (6, 7),
    "left hepatectomy": (2, 3, 4),
    "extended left hepatectomy (left trisectionectomy)": (2, 3, 4, 5, 8),
    "left lateral sectionectomy": (2, 3),
}


def is_lesion(label: Label) -> bool:
    """Whether a label is a lesion by its terminology category (the Slicer / DICOM convention)."""
    category = label.terminology.get("category") or ()
    return len(category) > 1 and str(category[1]) == LESION_CATEGORY


def farthest_pair(points: np.ndarray) -> tuple[int, int]:
    """The indices of the two points farthest apart: of the convex hull's vertices, every pair
    compared in blocks, each block's squared distances as |a|² + |b|² - 2 a·b (one matrix product)."""
    candidates = np.arange(len(points))
    try:
        candidates = ConvexHull(points).vertices
    except Exception:  # flat or tiny point sets: compare all points
        pass
    chosen = np.asarray(points[candidates], np.float64)
    chosen -= chosen.mean(axis=0)  # small norms, small rounding
    squared_norms = (chosen ** 2).sum(axis=1)
    best, pair = -1.0, (0, 0)
    for start in range(0, len(chosen), 2048):
        squared = squared_norms[start:start + 2048, None] + squared_norms[None, :] - 2.0 * (chosen[start:start + 2048] @ chosen.T)
        row, column = np.unravel_index(int(np.argmax(squared)), squared.shape)
        if squared[row, column] > best:
            best, pair = float(squared[row, column]), (start + row, column)
    return int(candidates[pair[0]]), int(candidates[pair[1]])


def largest_diameter(points: np.ndarray) -> float:
    """The largest distance between two points."""
    if len(points) < 2:
        return 0.0
    first, second = farthest_pair(points)
    return float(np.linalg.norm(np.asarray(points[first], np.float64) - points[second]))


def _axial_planes(labelmap: Volume, matrix: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The slices a radiologist measures on: the planes through the voxel centres across the grid's
    axis closest to the patient's head-foot axis (an axial scan's own slices), as (unit normal
    pointing to the head, position of one plane along it, spacing between planes)."""
    axes = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)
    axis = int(np.argmax(np.abs(axes[2])))  # S is the third coordinate in LPS and in RAS alike
    normal = axes[:, axis] * np.sign(axes[2, axis])
    return normal, float(normal @ matrix[:3, 3]), labelmap.spacing[axis]


def _cut(points: np.ndarray, triangles: np.ndarray, heights: np.ndarray, height: float) -> np.ndarray:
    """Where a plane (``heights``: each triangle corner's position along its normal) cuts a triangle
    mesh: one segment (two points) for each triangle it crosses."""
    above = heights > height
    crossing = above.any(axis=1) & ~above.all(axis=1)
    corners, levels, sides = triangles[crossing], heights[crossing], above[crossing]
    ends, crossed = [], []
    for a, b in ((0, 1), (1, 2), (2, 0)):
        crossed.append(sides[:, a] != sides[:, b])
        with np.errstate(divide="ignore", invalid="ignore"):  # edges not crossed are dropped below
            fraction = (height - levels[:, a]) / (levels[:, b] - levels[:, a])
            ends.append(points[corners[:, a]] + fraction[:, None] * (points[corners[:, b]] - points[corners[:, a]]))
    return np.stack(ends, axis=1)[np.stack(crossed, axis=1)].reshape(-1, 2, 3)  # two crossed edges each


def _longest_chord_across(segments: np.ndarray, along: np.ndarray, across: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ends of the longest line along ``across`` from the contour (``segments``, in a plane) to
    the contour, ``along`` and ``across`` being perpendicular unit vectors of that plane: its length
    as a function of the position along ``along`` is linear between the contour's points, so the
    longest lies at one of them."""
    position, offset = segments @ along, segments @ across  # (S, 2) each
    best, ends = -1.0, (segments[0, 0], segments[0, 0])
    for start in range(0, position.size, 256):
        at = position.ravel()[start:start + 256, None]  # the positions tried, against every segment
        spans = (position[:, 0] - at) * (position[:, 1] - at) <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = np.nan_to_num((at - position[:, 0]) / (position[:, 1] - position[:, 0]))
        reach = np.where(spans, offset[:, 0] + fraction * (offset[:, 1] - offset[:, 0]), np.nan)
        low, high = np.nanargmin(reach, axis=1), np.nanargmax(reach, axis=1)
        rows = np.arange(len(at))
        lengths = reach[rows, high] - reach[rows, low]
        row = int(np.argmax(lengths))
        if lengths[row] > best:
            best = float(lengths[row])
            ends = tuple(segments[n, 0] + fraction[row, n] * (segments[n, 1] - segments[n, 0]) for n in (low[row], high[row]))
    return ends


def axial_axes(points: np.ndarray, triangles: np.ndarray, planes: tuple[np.ndarray, float, float]) -> dict | None:
    """A lesion's long and short axes as RECIST measures them on axial slices: the longest diameter
    of its cut by any of ``planes`` (see :func:`_axial_planes`; cuts of its smoothed closed surface),
    and on that slice the longest line across the lesion perpendicular to it; lengths (mm), their
    mean, and ends (patient mm). None where no slice plane cuts the surface."""
    normal, first, spacing = planes
    in_plane = np.linalg.svd(normal[None])[2][1:].T  # two unit vectors across the normal
    heights = (points @ normal)[triangles]
    best = None
    for number in range(int(np.ceil((heights.min() - first) / spacing)), int(np.floor((heights.max() - first) / spacing)) + 1):
        segments = _cut(points, triangles, heights, first + number * spacing)
        if len(segments):
            cut = segments.reshape(-1, 3)
            ends = cut[list(farthest_pair(cut @ in_plane))]  # in the plane's own two axes: a 2D hull
            length = float(np.linalg.norm(ends[1] - ends[0]))
            if best is None or length > best[0]:
                best = (length, ends, segments)
    if best is None:
        return None
    length, long_ends, segments = best
    along = (long_ends[1] - long_ends[0]) / max(length, 1e-12)
    short_ends = _longest_chord_across(segments, along, np.cross(normal, along))
    short = float(np.linalg.norm(short_ends[1] - short_ends[0]))
    return {"long_axis_mm": length, "short_axis_mm": short,
            "mean_diameter_mm": (length + short) / 2,  # how Lung-RADS and the Fleischner Society size a nodule
            "long_axis_ends_mm": [[round(float(c), 2) for c in end] for end in long_ends],
            "short_axis_ends_mm": [[round(float(c), 2) for c in end] for end in short_ends]}


def lesion_axes(lesions: list[dict]) -> list[tuple[dict, dict | None, dict]]:
    """The axial axes measured in ``lesions`` (the ``lesions`` of :func:`measure`): of each lesion,
    or of each part of a lesion label of several, as (the lesion's entry, the part's entry or None,
    the axes); those no slice plane cut are left out."""
    return [(lesion, part if "parts" in lesion else None, part["axial_axes"])
            for lesion in lesions for part in lesion.get("parts") or [lesion] if part.get("axial_axes")]


def mask_centre(mask: np.ndarray) -> np.ndarray:
    """The mean index of a boolean mask's voxels along each axis, from its per-axis counts (no list
    of voxels is made)."""
    axes = range(mask.ndim)
    counts = [np.count_nonzero(mask, axis=tuple(other for other in axes if other != axis)) for axis in axes]
    return np.array([(count * np.arange(len(count))).sum() / count.sum() for count in counts])


def _vertices(mesh: SharedMesh, faces: np.ndarray) -> np.ndarray:
    return mesh.points[used_points(mesh.triangles[faces], len(mesh.points))[0]]


def _gap(points: np.ndarray, tree: cKDTree) -> float:
    """The smallest distance from ``points`` to those of ``tree``: bounded from every 16th point first,
    then every point searched only that far (the k-d tree gives up beyond it: the same answer, sooner)."""
    bound = float(tree.query(points[::16])[0].min())
    return float(min(tree.query(points, distance_upper_bound=bound * (1 + 1e-9) + 1e-9, workers=-1)[0].min(), bound))


def _shares(bordering: np.ndarray, names: dict[int, str]) -> dict[str, float]:
    """Each segment of ``names`` (the segments that are no lesion) holding at least 1 % of the voxels
    around a lesion (``bordering``: their labels), with that percentage, largest first."""
    if bordering.size == 0:
        return {}
    values, counts = np.unique(bordering[np.isin(bordering, list(names))], return_counts=True)
    return {names[int(values[n])]: round(100.0 * int(counts[n]) / bordering.size, 1)
            for n in np.argsort(-counts, kind="stable") if 100 * int(counts[n]) >= bordering.size}


def _organ(bordering: np.ndarray, organs: dict[int, str]) -> tuple[str | None, list[int]]:
    """The organ a lesion lies in and its labels: the segment holding at least half of the voxels
    around the lesion (``bordering``: their labels), or the liver, all of its Couinaud segments
    together, where they do (no capsule divides them: a lesion in segment VII lies in the liver, and
    its capsule is the liver's); none otherwise."""
    liver = [value for value, name in organs.items() if name in LIVER_SEGMENTS.values()]
    liver = liver if len(liver) > 1 else []
    groups = ([("liver", liver)] if liver else []) + [(name, [value]) for value, name in organs.items()
                                                     if value not in liver]
    for name, values in groups:
        if bordering.size and 2 * np.count_nonzero(np.isin(bordering, values)) >= bordering.size:
            return name, values
    return None, []


def _resection_ml(labelmap: Volume, box, value: int, organ: list[int], margin_mm: float) -> float:
    """Volume of the organ and lesion voxels within ``margin_mm`` of the lesion's surface: voxel
    centres within margin + half the mean voxel size of a lesion voxel centre (the surface lies about
    half a voxel beyond the lesion's outer voxel centres; this errs toward removing more)."""
    spacing_kji = np.array(labelmap.spacing[::-1])
    reach_mm = margin_mm + 0.5 * float(spacing_kji.mean())
    reach = np.ceil(reach_mm / spacing_kji).astype(int) + 1
    grown = tuple(slice(max(s.start - r, 0), s.stop + r) for s, r in zip(box, reach))
    crop = labelmap.array[grown]
    distance = ndimage.distance_transform_edt(crop != value, sampling=spacing_kji)
    removed = (distance <= reach_mm) & ((crop == value) | np.isin(crop, organ))
    return float(np.count_nonzero(removed)) * labelmap.voxel_volume_ml


def lesion_parts(labelmap: Volume, labels: list[Label], coordinates: str = "LPS") -> dict[str, dict]:
    """Each lesion label present: how many separate parts it has (several metastases, nodules), and
    the largest :data:`MAX_LESION_PARTS` of them, largest first: volume (mL) and centre (patient mm)."""
    boxes = ndimage.find_objects(labelmap.array)
    matrix = labelmap.ijk_to_lps() if coordinates == "LPS" else labelmap.ijk_to_ras()
    found = {}
    for label in labels:
        if not (is_lesion(label) and label.value <= len(boxes) and boxes[label.value - 1] is not None):
            continue
        box = boxes[label.value - 1]
        _, count, ranked = largest_parts(labelmap.array[box] == label.value, MAX_LESION_PARTS, fully_connected=True)
        starts = [s.start for s in box]
        found[label.name] = {"count": count, "largest": [
            {"volume_ml": round(voxels * labelmap.voxel_volume_ml, 3),
             "centre_mm": [round(float(c), 1) for c in kji_to_patient(centre + starts, matrix)]}
            for _, voxels, centre in ranked]}
    return found


class _Lesion(NamedTuple):
    """A lesion label in its box grown by one voxel: its voxels, separate parts and what borders them."""
    inside: np.ndarray  # the lesion's voxels in the grown box
    starts: np.ndarray  # the grown box's first index (k, j, i)
    components: np.ndarray  # its 26-connected parts, numbered from 1
    count: int
    ranked: list  # the largest parts, largest first, their centres in the whole array (see largest_parts)
    bordering: np.ndarray  # the labels of the voxels around it (6-connected)
    bordering_part: np.ndarray  # the part each of them touches


def _lesion(labelmap: Volume, box, value: int) -> _Lesion:
    """The lesion label ``value`` whose bounding box is ``box``, ready to measure."""
    grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    crop = labelmap.array[grown]
    inside = crop == value
    starts = np.array([s.start for s in grown])
    components, count, ranked = largest_parts(inside, MAX_LESION_PARTS, fully_connected=True)
    ranked = [(number, voxels, centre + starts) for number, voxels, centre in ranked]
    owner = ndimage.grey_dilation(components, footprint=ndimage.generate_binary_structure(3, 1))
    around = (owner > 0) & ~inside
    return _Lesion(inside, starts, components, count, ranked, crop[around], owner[around])


def _parts(labelmap: Volume, lesion: _Lesion, organs: dict[int, str], mesh: SharedMesh, triangles: np.ndarray,
           capsule: cKDTree | None, matrix: np.ndarray, planes) -> list[dict]:
    """The measurements of a lesion label's largest :data:`MAX_LESION_PARTS` parts where it has more
    than one (``triangles``: its surface in the shared mesh), each with what borders it: each surface
    vertex belongs to the part of its nearest boundary voxel, each triangle to the part of its first
    vertex, each voxel around the lesion to a part it touches."""
    if lesion.count < 2:
        return []
    vertices, own = used_points(triangles, len(mesh.points))
    boundary = lesion.inside & ~ndimage.binary_erosion(lesion.inside)
    boundary_points = kji_to_patient(np.argwhere(boundary) + lesion.starts, matrix)
    nearest = lesion.components[boundary][cKDTree(boundary_points).query(mesh.points[vertices])[1]]
    triangle_part = nearest[own[:, 0]]
    parts = []
    for number, (part_number, voxels, centre) in enumerate(lesion.ranked, start=1):
        points = mesh.points[vertices[nearest == part_number]]  # the vertices of this part's surface
        around = lesion.bordering[lesion.bordering_part == part_number]
        part = {"number": number, "volume_ml": voxels * labelmap.voxel_volume_ml,
                "largest_diameter_mm": largest_diameter(points),
                "axial_axes": axial_axes(mesh.points, triangles[triangle_part == part_number], planes),
                "centroid_mm": [round(float(c), 2) for c in kji_to_patient(centre, matrix)],
                "organ": _organ(around, organs)[0], "bordering": _shares(around, organs)}
        if capsule is not None and len(points):
            part["capsule_distance_mm"] = _gap(points, capsule)
        parts.append(part)
    return parts


def liver_resections(segments: list[dict], lesions: list[dict]) -> list[dict]:
    """Where all eight Couinaud segments are segmented: for each of :data:`LIVER_RESECTIONS`, the
    segments it removes, the remnant's volume (the segments kept) and its share of the liver without
    its lesions (all eight segments), and how many lesion parts (of those listed) border a kept
    segment; else nothing."""
    volumes = {segment["name"]: segment["volume_ml"] for segment in segments}
    if not all(name in volumes for name in LIVER_SEGMENTS.values()):
        return []
    liver = sum(volumes[name] for name in LIVER_SEGMENTS.values())
    parts = [part for lesion in lesions for part in lesion.get("parts") or [lesion]]
    resections = []
    for name, removed in LIVER_RESECTIONS.items():
        kept = {LIVER_SEGMENTS[number] for number in LIVER_SEGMENTS if number not in removed}
        remnant = sum(volumes[segment] for segment in kept)
        resections.append({"name": name, "removed_segments": list(removed), "remnant_ml": remnant,
                           "remnant_percent": 100.0 * remnant / liver,
                           "lesion_parts_bordering_remnant": sum(1 for part in parts if kept & part["bordering"].keys())})
    return resections


def measure(labelmap: Volume, labels: list[Label], margin_mm: float = 10.0, smoothing: float = 0.5,
            coordinates: str = "LPS", mesh: SharedMesh | None = None) -> dict:
    """Measurements of every present segment and every lesion (see the module's docstring), on the
    labels' shared mesh (``mesh``, or built here with ``smoothing``)."""
    boxes = ndimage.find_objects(labelmap.array)
    present = [label for label in labels if 0 < label.value <= len(boxes) and boxes[label.value - 1] is not None]
    if not present:
        return {"coordinates": coordinates, "margin_mm": margin_mm, "segments": [], "lesions": [], "liver_resections": []}
    if mesh is None:
        mesh = shared_mesh(labelmap, [label.value for label in present], smoothing, coordinates)
    surfaces = {s.label.value: s for s in surfaces_of(mesh, present, coordinates)}
    matrix = labelmap.ijk_to_lps() if coordinates == "LPS" else labelmap.ijk_to_ras()
    segments, volumes, faces = [], {}, {}
    for label in present:
        box = boxes[label.value - 1]
        inside = labelmap.array[box] == label.value
        volumes[label.value] = np.count_nonzero(inside) * labelmap.voxel_volume_ml
        kji = mask_centre(inside) + [s.start for s in box]
        centroid = kji_to_patient(kji, matrix)
        on_surface = faces[label.value] = np.flatnonzero((mesh.pairs == label.value).any(axis=1))
        surface = mesh_measurements(surfaces[label.value].polydata)
        segments.append({"name": label.name, "value": label.value, "lesion": is_lesion(label),
                         "volume_ml": volumes[label.value], "surface_area_cm2": surface["area_cm2"],
                         "largest_diameter_mm": largest_diameter(_vertices(mesh, on_surface)),
                         "centroid_mm": [round(float(c), 2) for c in centroid]})

    lesion_values = {label.value for label in present if is_lesion(label)}
    names = {label.value: label.name for label in present}
    organs = {value: name for value, name in names.items() if value not in lesion_values}
    trees = {value: cKDTree(_vertices(mesh, faces[value])) for value in faces} if lesion_values else {}
    planes = _axial_planes(labelmap, matrix)
    lesions = []
    for value in sorted(lesion_values):
        box = boxes[value - 1]
        lesion_points = trees[value].data
        lesion = _lesion(labelmap, box, value)
        organ_name, organ = _organ(lesion.bordering, organs)
        distances = {names[other]: _gap(lesion_points, trees[other])
                     for other in trees if other != value and other not in organ}
        entry = {"name": names[value], "organ": organ_name, "distances_mm": distances}
        capsule = None
        if organ:
            outer = np.isin(mesh.pairs, [*organ, value]).sum(axis=1) == 1  # one side in, the other out
            capsule = cKDTree(_vertices(mesh, np.flatnonzero(outer)))
            entry["capsule_distance_mm"] = _gap(lesion_points, capsule)
            organ_ml = sum(volumes[member] for member in organ)
            with_lesion = organ_ml + volumes[value]
            resection = _resection_ml(labelmap, box, value, organ, margin_mm)
            entry.update(organ_volume_ml=organ_ml, organ_with_lesion_ml=with_lesion, resection_ml=resection,
                         remnant_ml=with_lesion - resection, remnant_percent=100.0 * (with_lesion - resection) / with_lesion)
        entry["bordering"] = _shares(lesion.bordering, organs)
        triangles = mesh.triangles[faces[value]]
        entry["part_count"] = lesion.count
        if lesion.count == 1:  # a label of several lesions has no axes of its own: each part has its own
            entry["axial_axes"] = axial_axes(mesh.points, triangles, planes)
        parts = _parts(labelmap, lesion, organs, mesh, triangles, capsule, matrix, planes)
        if parts:
            entry["parts"] = parts
        lesions.append(entry)
    return {"coordinates": coordinates, "margin_mm": margin_mm, "segments": segments, "lesions": lesions,
            "liver_resections": liver_resections(segments, lesions)}
