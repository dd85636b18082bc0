"""Overlap and distance metrics between a predicted and a reference label map.

Dice = 2|P∩R| / (|P|+|R|), IoU (Jaccard) = |P∩R| / |P∪R|, voxel accuracy = (TP+TN) / N,
sensitivity = TP / (TP+FN), specificity = TN / (TN+FP),
HD95 = 95th percentile of the symmetric surface distances and ASD = their mean, in mm
(MONAI's implementations, given the voxel spacing). A label absent from both maps scores
Dice = IoU = 1 and distances 0; a label present in only one scores 0 and infinite distance.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .errors import InputError
from .volume import Volume


def _bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    where = np.nonzero(mask)
    return tuple(slice(max(int(w.min()) - margin, 0), int(w.max()) + margin + 1) for w in where)


def overlap_scores(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Dice, IoU, voxel accuracy, sensitivity and specificity of two boolean masks."""
    tp = int(np.count_nonzero(pred & ref))
    p, r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    negatives = pred.size - r
    specificity = (negatives - (p - tp)) / negatives if negatives else 1.0
    if p + r == 0:
        return {"dice": 1.0, "iou": 1.0, "accuracy": 1.0, "sensitivity": 1.0, "specificity": specificity}
    return {"dice": 2 * tp / (p + r), "iou": tp / (p + r - tp), "accuracy": 1.0 - (p + r - 2 * tp) / pred.size,
            "sensitivity": tp / r if r else 0.0, "specificity": specificity}


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> dict:
    """HD95 and average symmetric surface distance (mm) of two boolean masks."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance  # heavy, only here

    if not pred.any() and not ref.any():
        return {"hd95_mm": 0.0, "asd_mm": 0.0}
    if not pred.any() or not ref.any():
        return {"hd95_mm": math.inf, "asd_mm": math.inf}
    box = _bounding_box(pred | ref)
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None]
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():  # MONAI 1.6 warns about an argument it passes to itself
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(p, r, symmetric=True, spacing=spacing)
    return {"hd95_mm": float(hd95.item()), "asd_mm": float(asd.item())}


def evaluate(pred: Volume, ref: Volume, label_names: dict[int, str], distances: bool = True) -> dict:
    """Per-label and mean metrics of ``pred`` against ``ref`` (both on one grid).

    Returns ``{"labels": {name: {...}}, "mean": {...}, "accuracy": overall voxel accuracy}``;
    the mean is over labels present in either map.
    """
    if pred.array.shape != ref.array.shape:
        raise InputError(f"Prediction size {pred.shape_ijk} does not match the reference's {ref.shape_ijk}")
    spacing_zyx = ref.spacing[::-1]
    per_label = {}
    for value, name in sorted(label_names.items()):
        p, r = pred.array == value, ref.array == value
        scores = overlap_scores(p, r)
        if distances:
            scores.update(surface_distances(p, r, spacing_zyx))
        scores["volume_ml"] = np.count_nonzero(p) * pred.voxel_volume_ml
        scores["reference_volume_ml"] = np.count_nonzero(r) * ref.voxel_volume_ml
        scores["present"] = bool(p.any() or r.any())
        per_label[name] = scores
    present = [s for s in per_label.values() if s["present"]]
    keys = ["dice", "iou", "accuracy", "sensitivity", "specificity"] + (["hd95_mm", "asd_mm"] if distances else [])
    mean = {key: float(np.mean([s[key] for s in present])) if present else math.nan for key in keys}
    return {"labels": per_label, "mean": mean, "accuracy": float(np.mean(pred.array == ref.array))}


def label_voxel_counts(array: np.ndarray, minimum_length: int = 0) -> np.ndarray:
    """How many voxels hold each value 0, 1, ... of a label array, counted a slab of 2^20 voxels at a
    time: ``np.bincount`` of the whole array would first copy it as 64-bit integers (8 bytes per
    voxel: 600 MiB and over a second for a 512 x 512 x 300 CT)."""
    flat = array.reshape(-1)
    length = max(minimum_length, int(flat.max(initial=0)) + 1)
    counts = np.zeros(length, np.int64)
    for start in range(0, flat.size, 1 << 20):
        counts += np.bincount(flat[start:start + (1 << 20)], minlength=length)
    return counts


def label_volumes_ml(labelmap: Volume, label_names: dict[int, str]) -> dict[str, float]:
    """Volume (mL) of each named label."""
    counts = label_voxel_counts(labelmap.array, max(label_names, default=0) + 1)
    return {name: float(counts[value]) * labelmap.voxel_volume_ml for value, name in label_names.items()}
