"""Training data sets in the nnU-Net v2 / Medical Segmentation Decathlon layout.

``imagesTr/CASE_0000.nii.gz`` (one file per channel, ``_000N``), ``labelsTr/CASE.nii.gz`` and
``dataset.json`` with ``channel_names`` and ``labels`` (name -> value). An optional
``aireconstruct_labels`` list in ``dataset.json`` carries colours and SNOMED CT codes in the
model-card label format; it is copied into the trained model's card.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .io import atomic_path, write_volume
from .modelcard import ModelCard, read_json
from .phantom import make_phantom, phantom_label_entries
from .volume import Volume

GENERIC_TISSUE = {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"]}


@dataclass(frozen=True)
class Case:
    """One training case: an image file per channel and its label map."""

    case_id: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class Dataset:
    folder: Path
    channel_names: list[str]
    label_entries: list[dict]  # model-card label entries, background excluded
    cases: list[Case]
    file_ending: str


def _default_label_entries(labels: dict) -> list[dict]:
    entries = []
    for index, (name, value) in enumerate(sorted(labels.items(), key=lambda item: int(item[1]))):
        if int(value) == 0:
            continue
        rgb = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.6, 0.9)
        entries.append({"value": int(value), "name": name.replace("_", " "), "color": [round(c, 3) for c in rgb],
                        "terminology": GENERIC_TISSUE})
    return entries


def _read_meta(meta_path: Path) -> dict:
    """A data set's ``dataset.json``, checked for what this module reads of it."""
    meta = read_json(meta_path, "Cannot read the data set's description", InputError)
    channels, labels = (meta.get("channel_names"), meta.get("labels")) if isinstance(meta, dict) else (None, None)
    if not (isinstance(channels, dict) and channels and all(str(key).isdigit() for key in channels)
            and isinstance(labels, dict) and all(isinstance(value, int) for value in labels.values())):
        raise InputError(f"{meta_path} needs \"channel_names\" numbered 0, 1, ... and \"labels\" with one integer "
                         "value each (the nnU-Net v2 layout; region-based labels are not supported)")
    return meta


def _channel_names(meta: dict) -> list[str]:
    return [meta["channel_names"][key] for key in sorted(meta["channel_names"], key=int)]


def read_dataset(folder: str | Path) -> Dataset:
    """List the cases of a data set folder and read its ``dataset.json``."""
    folder = Path(folder)
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise InputError(f"{folder} is not a data set: it has no dataset.json")
    meta = _read_meta(meta_path)
    channel_names = _channel_names(meta)
    ending = meta.get("file_ending", ".nii.gz")
    cases = []
    for label in sorted((folder / "labelsTr").glob(f"*{ending}")):
        case_id = label.name[: -len(ending)]
        images = tuple(folder / "imagesTr" / f"{case_id}_{c:04d}{ending}" for c in range(len(channel_names)))
        missing = [p.name for p in images if not p.is_file()]
        if missing:
            raise InputError(f"Case {case_id} of {folder.name} lacks its image file {missing[0]}")
        cases.append(Case(case_id, images, label))
    if not cases:
        raise InputError(f"{folder} has no cases in labelsTr/")
    entries = meta.get("aireconstruct_labels") or _default_label_entries(meta["labels"])
    return Dataset(folder, channel_names, entries, cases, ending)


def write_phantom_dataset(folder: str | Path, count: int, first_seed: int = 0, spacing=None,
                          tumour_hu: float = 45.0) -> Dataset:
    """Write ``count`` CT phantoms (seeds ``first_seed``...) as a data set folder.

    ``spacing`` (i, j, k mm) fixes the voxel size; by default each seed picks its own. ``tumour_hu``:
    see :func:`phantom.make_phantom`.
    """
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for seed in range(first_seed, first_seed + count):
        phantom = make_phantom(seed, spacing, tumour_hu=tumour_hu)
        write_volume(phantom.image, folder / "imagesTr" / f"phantom_{seed:04d}_0000.nii.gz")
        write_volume(phantom.labels, folder / "labelsTr" / f"phantom_{seed:04d}.nii.gz")
    entries = phantom_label_entries()
    meta = {
        "name": "AbdomenCTPhantom",
        "description": "Synthetic abdominal CT phantoms made by AIReconstructLib.phantom",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{entry["name"]: entry["value"] for entry in entries}},
        "numTraining": count,
        "file_ending": ".nii.gz",
        "aireconstruct_labels": entries,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return read_dataset(folder)


def save_case(folder: str | Path, case_id: str, channels: list[Volume], labelmap: Volume, card: ModelCard) -> Dataset:
    """Add (or replace) one corrected case in a data set folder in the nnU-Net layout, made for
    ``card``'s channels and labels (created on first use; refused if it was made for others)."""
    folder = Path(folder)
    if not all(c.isalnum() or c in "-_" for c in case_id) or not case_id:
        raise InputError(f"Case id '{case_id}' may hold only letters, digits, - and _")
    if len(channels) != len(card.channels) or any(not ch.same_grid(labelmap) for ch in channels):
        raise InputError(f"Saving for training needs {len(card.channels)} image(s) on the segmentation's grid")
    entries = card.data["labels"]
    meta_path = folder / "dataset.json"
    if meta_path.is_file():
        meta = _read_meta(meta_path)
        same = _channel_names(meta) == \
            [c["name"] for c in card.channels] and meta["labels"] == {"background": 0, **{e["name"]: e["value"] for e in entries}}
        if not same:
            raise InputError(f"{folder.name} holds cases for other channels or labels than model '{card.name}'")
    else:
        meta = {"name": folder.name, "description": f"Corrected segmentations of model {card.name}",
                "channel_names": {str(n): c["name"] for n, c in enumerate(card.channels)},
                "labels": {"background": 0, **{e["name"]: e["value"] for e in entries}},
                "file_ending": ".nii.gz", "aireconstruct_labels": entries}
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for number, channel in enumerate(channels):
        write_volume(channel, folder / "imagesTr" / f"{case_id}_{number:04d}.nii.gz")
    write_volume(labelmap, folder / "labelsTr" / f"{case_id}.nii.gz")
    meta["numTraining"] = len(list((folder / "labelsTr").glob("*.nii.gz")))
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return read_dataset(folder)
