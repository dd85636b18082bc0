"""Training data on the model grid: the data set's fingerprint, cases (optionally cached on disk
for later runs), rehearsal scans, folds and patch sampling.

Spacing is the data set's median spacing and CT normalisation clips to the 0.5-99.5 percentiles of
foreground intensities and z-scores with their mean and deviation, as nnU-Net does; MR channels
are z-scored inside non-zero voxels per image.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandCropByLabelClassesd, RandFlipd,
                              RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd,
                              RandShiftIntensityd, RandSmoothDeformd, SpatialPadd)
from monai.transforms.utils import map_classes_to_indices
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .dataset import Dataset
from .errors import InputError
from .io import atomic_path, find_cases, read_labelmap, read_volume
from .modelcard import read_json
from .predict import Predictor
from .preprocess import check_stripped_channels, prepare, to_canonical


def median_spacing(dataset: Dataset) -> list[float]:
    """The data set's median voxel spacing (i, j, k mm)."""
    spacings = [read_volume(case.images[0]).spacing for case in dataset.cases]
    return [float(v) for v in np.median(np.array(spacings), axis=0)]


MRI_NORMALISATIONS = ("foreground", "nonzero")  # z-scored inside the body, or inside the non-zero voxels


def channel_normalisation(dataset: Dataset, mri: str = "foreground", skull_stripped: bool = False) -> list[dict]:
    """Model-card channel entries with each channel's normalisation: nnU-Net's CT scheme for CT, else
    a z-score inside the body (``zscore_foreground``, see ``preprocess.normalise``) or, with
    ``mri="nonzero"``, inside the non-zero voxels (nnU-Net's and MONAI's rule); with
    ``skull_stripped`` those channels are marked as skull-stripped brains."""
    if mri not in MRI_NORMALISATIONS:
        raise InputError(f"Unknown normalisation '{mri}' (known: {', '.join(MRI_NORMALISATIONS)})")
    if skull_stripped and all(channel.upper() == "CT" for channel in dataset.channel_names):
        raise InputError("Skull-stripped is said of MR brains; this data set's channels are all CT")
    specs = []
    for index, channel in enumerate(dataset.channel_names):
        if channel.upper() != "CT":
            specs.append({"name": channel, **({"skull_stripped": True} if skull_stripped else {}),
                          "normalisation": {"scheme": f"zscore_{mri}"}})
            continue
        samples = []
        rng = np.random.default_rng(0)
        for case in dataset.cases:
            image = read_volume(case.images[index])
            foreground = image.array[read_labelmap(case.label, like=image).array > 0]
            samples.append(rng.choice(foreground, size=min(20000, foreground.size), replace=False))
        values = np.concatenate(samples).astype(np.float64)
        low, high = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, low, high)
        specs.append({"name": channel, "normalisation": {
            "scheme": "ct", "clip": [float(low), float(high)], "mean": float(clipped.mean()), "std": float(clipped.std())}})
    return specs


def label_entries(dataset: Dataset, labels_file: str | None) -> list[dict]:
    """The data set's labels, or those of ``labels_file`` (which must give the same values)."""
    if labels_file is None:
        return dataset.label_entries
    entries = read_json(labels_file, "Cannot read the labels file", InputError)
    if not (isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("value"), int) for e in entries)):
        raise InputError(f"{labels_file} is not a JSON list of label entries, each with an integer \"value\"")
    if sorted(e["value"] for e in entries) != sorted(e["value"] for e in dataset.label_entries):
        raise InputError(f"{labels_file} does not give the same label values as {dataset.folder.name}/dataset.json")
    return entries


CACHE_FORMAT = 1  # part of every cache key: raise it when a case's tensors change for the same inputs


def load_case(case, channel_specs, spacing, cache: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A case on the model grid: image ``[C, z, y, x]`` float32 and labels ``[1, z, y, x]``. With a
    ``cache`` folder the tensors are kept there (safetensors) and read back by later runs (other
    folds, other networks) while the case's files (path, size, modification time), the
    normalisation and the spacing are the same."""
    if cache is None:
        return _case_on_grid(case, channel_specs, spacing)
    path = Path(cache) / f"{case.case_id}-{_cache_key(case, channel_specs, spacing)}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            return tensors["image"], tensors["labels"]
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable: made again and replaced below
    image, labels = _case_on_grid(case, channel_specs, spacing)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"image": image.contiguous(), "labels": labels.contiguous()}, str(tmp))
    except OSError as error:
        raise InputError(f"Cannot keep the cases in the cache folder {cache}: {error.strerror or error}") from None
    return image, labels


def check_label_values(case_ids: list[str], cases: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> None:
    """Refuse a case (loaded by :func:`load_case`) whose labels hold a value the data set's labels
    do not declare (0 to ``num_classes`` - 1)."""
    for case_id, (_, labels) in zip(case_ids, cases):
        largest = int(labels.max())
        if largest >= num_classes:
            raise InputError(f"The label map of case {case_id} holds the value {largest}, which the data set's "
                             f"labels do not declare (they go from 0 to {num_classes - 1})")


def _cache_key(case, channel_specs, spacing) -> str:
    files = []
    for name in [*case.images, case.label]:
        status = Path(name).stat()
        files.append([str(Path(name).resolve()), status.st_size, status.st_mtime_ns])
    text = json.dumps([CACHE_FORMAT, files, channel_specs, [float(value) for value in spacing]], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _case_on_grid(case, channel_specs, spacing) -> tuple[torch.Tensor, torch.Tensor]:
    channels = _read_channels(case.images, channel_specs, f"case {case.case_id}")
    prepared = prepare(channels, channel_specs, spacing)
    labels = read_labelmap(case.label, like=channels[0])
    canonical = torch.from_numpy(np.ascontiguousarray(to_canonical(labels.array, prepared.reorientation)))
    shape = tuple(prepared.tensor.shape[1:])
    return prepared.tensor, F.interpolate(canonical[None, None].float(), size=shape, mode="nearest-exact")[0]


def _read_channels(paths, channel_specs, case_name: str) -> list:
    """The volumes of one case's channels, each checked to be skull-stripped where its spec says so."""
    channels = [read_volume(path) for path in paths]
    check_stripped_channels(channels, channel_specs, f"of {case_name}")
    return channels


def rehearsal_cases(folder: str | Path, network: torch.nn.Module, channel_specs, spacing, patch_zyx,
                    device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Earlier scans (the cases of ``folder``, see :func:`find_cases`) on the model grid, each
    labelled with the network's own segmentation: rehearsing them while fine-tuning keeps what the
    model already does well, without expert labels (pseudo-rehearsal)."""
    predictor = Predictor(network, patch_zyx, 0.5, device, backend="torch")
    cases = []
    for case_id, paths in find_cases(folder, len(channel_specs)):
        image = prepare(_read_channels(paths, channel_specs, f"earlier scan {case_id}"), channel_specs, spacing).tensor
        cases.append((image, predictor(image).argmax(0, keepdim=True).float()))
    network.train()
    return cases


def make_folds(case_ids: list[str], folds: int, validation_fraction: float, seed: int) -> list[dict]:
    """Cross-validation splits (``folds`` >= 2), or one train/validation split (``folds`` = 0 or 1) holding
    out ``validation_fraction`` of the cases (at least one; 0: none, every case trains)."""
    order = [case_ids[i] for i in np.random.default_rng(seed).permutation(len(case_ids))]
    if folds >= 2:
        if folds > len(case_ids):
            raise InputError(f"{folds} folds need at least {folds} cases; the data set has {len(case_ids)}")
        groups = [order[n::folds] for n in range(folds)]
    else:
        n_val = max(1, int(round(validation_fraction * len(order)))) if len(order) > 1 and validation_fraction else 0
        groups = [order[:n_val]]
    return [{"train": sorted(c for c in case_ids if c not in group), "validation": sorted(group)} for group in groups]


def augmentation(patch_zyx, num_classes: int, mirror_axes=()) -> Compose:
    """Class-balanced patch crops, then rotation/scaling, elastic deformation, noise, blur, intensity
    and gamma changes, and mirroring along ``mirror_axes`` (only for anatomy without left/right labels)."""
    keys = ["image", "label"]
    mirrors = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in mirror_axes]
    return Compose([
        SpatialPadd(keys, spatial_size=patch_zyx, mode="constant"),
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=patch_zyx, num_classes=num_classes,
                                num_samples=1, indices_key="indices", allow_smaller=True),
        RandAffined(keys, prob=0.4, rotate_range=(0.26, 0.15, 0.15), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        # elastic: a random displacement field on a coarse 6 x 6 x 6 grid, interpolated smoothly to the
        # patch (mean 0.6, at most ~2.5 voxels); far cheaper than smoothing a full-resolution field
        RandSmoothDeformd(keys, spatial_size=patch_zyx, rand_size=(6, 6, 6), def_range=0.05, prob=0.2,
                          field_mode="trilinear", align_corners=True, grid_mode=("bilinear", "nearest")),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        RandGaussianSmoothd("image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandShiftIntensityd("image", offsets=0.1, prob=0.15),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.15),
        *mirrors,
    ])


class PatchSampler:
    """Augmented, class-balanced training patches drawn from cases on the model grid."""

    def __init__(self, cases: list[tuple[torch.Tensor, torch.Tensor]], patch_zyx, num_classes: int, mirror_axes=()):
        self.items = [{"image": image, "label": labels,
                       "indices": map_classes_to_indices(labels, num_classes=num_classes, max_samples_per_class=20000)}
                      for image, labels in cases]
        self.num_classes = num_classes
        self.transform = augmentation(patch_zyx, num_classes, mirror_axes)
        self.allowed = list(range(len(self.items)))

    def reseed(self, seed: int, allowed: list[int] | None = None) -> None:
        """Make the next draws reproducible; ``allowed`` limits them to some cases (one rank's share)."""
        random.seed(seed)
        self.transform.set_random_state(seed=seed % 2**32)
        self.allowed = list(allowed) if allowed is not None else list(range(len(self.items)))

    def batch(self, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` augmented patches of cases drawn at random (with replacement)."""
        return self.patches([random.choice(self.allowed) for _ in range(size)], device)

    def patches(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented patch of each case in ``indices``: images and labels batched on ``device``."""
        samples = [self.transform(self.items[index])[0] for index in indices]
        images = torch.stack([torch.as_tensor(s["image"]) for s in samples]).to(device)
        labels = torch.stack([torch.as_tensor(s["label"]) for s in samples]).to(device)
        return images.as_subclass(torch.Tensor), labels.as_subclass(torch.Tensor)
