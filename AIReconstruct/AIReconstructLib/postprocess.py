"""Per-label clean-up of a label map, as each label's ``postprocess`` entry in the card says.

- ``keep_largest``: keep only the largest connected component (26-connectivity);
- ``min_island_ml``: remove components smaller than this volume;
- ``fill_holes``: fill enclosed background cavities (never overwrites another label).
Removed voxels become background.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .modelcard import Label
from .volume import Volume


MAX_LABELS_AT_ONCE = 4  # labels post-processed at the same time, which bounds the memory they hold


def largest_parts(mask: np.ndarray, limit: int, fully_connected: bool = False) -> tuple[np.ndarray, int, list]:
    """A boolean mask's connected parts (numbered from 1; 26-connected when ``fully_connected``, else
    6-connected), how many there are, and the largest ``limit`` of them, largest first, each as
    (number, voxels, mean index ``(k, j, i)``): several metastases of a lesion label, the regions of
    an uncertainty map to check."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)) if fully_connected else None)
    sizes = np.bincount(components.ravel())[1:]
    boxes = ndimage.find_objects(components)
    parts = []
    for number in np.argsort(-sizes, kind="stable")[:limit] + 1:
        box = boxes[number - 1]
        centre = np.argwhere(components[box] == number).mean(axis=0) + [s.start for s in box]
        parts.append((int(number), int(sizes[number - 1]), centre))
    return components, count, parts


def _component_image(mask: np.ndarray, fully_connected: bool, threads: int):
    """ITK's connected components of ``mask`` on ``threads`` threads: 26-connected when
    ``fully_connected``, else 6-connected; with the filter, for its object count."""
    components = sitk.ConnectedComponentImageFilter()
    components.SetFullyConnected(fully_connected)
    components.SetNumberOfThreads(threads)
    return components.Execute(sitk.GetImageFromArray(mask.view(np.uint8))), components


def _islands(mask: np.ndarray, rules: dict, voxel_ml: float, threads: int) -> np.ndarray:
    """The voxels of ``mask`` that the rules remove: all but the largest 26-connected component
    (``keep_largest``), and components under ``min_island_ml``."""
    image, _ = _component_image(mask, True, threads)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetMinimumObjectSize(int(np.ceil(rules.get("min_island_ml", 0) / voxel_ml)))
    relabel.SetNumberOfThreads(threads)
    relabelled = relabel.Execute(image)  # 1 = the largest; held while viewed
    by_size = sitk.GetArrayViewFromImage(relabelled)
    kept = by_size == 1 if rules.get("keep_largest") else by_size > 0
    return np.logical_and(mask, ~kept, out=kept)


def _cavities(mask: np.ndarray, threads: int) -> np.ndarray:
    """The enclosed cavities of ``mask``: background components (6-connected) that do not touch the
    array's faces. ``mask | _cavities(mask)`` equals ``ndimage.binary_fill_holes(mask)``, found in
    one labelling pass instead of a dilation repeated until nothing changes."""
    image, components = _component_image(~mask, False, threads)
    background = sitk.GetArrayViewFromImage(image)
    outside = np.zeros(components.GetObjectCount() + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            outside[np.take(background, end, axis=axis)] = True
    outside[0] = True  # the mask itself
    if outside.all():  # no cavity: spare the pass over the whole array
        return np.zeros_like(mask)
    enclosed = outside[background]
    return np.logical_not(enclosed, out=enclosed)


def _changes(array: np.ndarray, label: Label, box: tuple[slice, ...], voxel_ml: float,
             threads: int) -> tuple[np.ndarray, np.ndarray]:
    """One label's changes inside its box, as flat indices of the box: the voxels its islands lose,
    and the cavities its mask encloses once they are gone. Reads ``array`` only."""
    rules = label.postprocess
    mask = array[box] == label.value
    removed = np.zeros(0, np.intp)
    if rules.get("keep_largest") or rules.get("min_island_ml", 0) > 0:
        islands = _islands(mask, rules, voxel_ml, threads)
        removed = np.flatnonzero(islands)
        mask &= ~islands
        del islands
    filled = np.flatnonzero(_cavities(mask, threads)) if rules.get("fill_holes") and mask.any() else np.zeros(0, np.intp)
    return removed, filled


def postprocess(labelmap: Volume, labels: list[Label]) -> Volume:
    """Apply every label's post-processing rules; returns a new label map.

    Each label is processed inside its own bounding box (found for all labels in one pass), so the
    cost follows the organs' size rather than the image's; its changes are kept as voxel indices.
    Labels are processed side by side in threads (ITK and numpy release the GIL), the cores shared
    among them.
    Every label's islands are removed first; then the cavities are filled in label order, each
    voxel only where it is background by then (an island of one label inside another's cavity is
    therefore filled, whatever the labels' order).
    """
    array = labelmap.array.copy()
    boxes = ndimage.find_objects(array)
    jobs = [(label, boxes[label.value - 1]) for label in labels
            if label.postprocess and label.value - 1 < len(boxes) and boxes[label.value - 1] is not None]
    cores = os.cpu_count() or 1
    at_once = max(1, min(len(jobs), cores, MAX_LABELS_AT_ONCE))
    threads = max(1, cores // at_once)  # ITK's threads for each label
    with ThreadPoolExecutor(at_once) as pool:
        changes = list(pool.map(lambda job: _changes(labelmap.array, *job, labelmap.voxel_volume_ml, threads), jobs))
    for (label, box), (removed, _) in zip(jobs, changes):
        region = array[box]  # a view: changes land in ``array``
        region[np.unravel_index(removed, region.shape)] = 0
    for (label, box), (_, filled) in zip(jobs, changes):
        region = array[box]
        where = np.unravel_index(filled, region.shape)
        background = region[where] == 0
        region[tuple(axis[background] for axis in where)] = label.value
    return labelmap.with_array(array)
