"""TotalSegmentator's CT models: download their nnU-Net v2 folders, import them with TotalSegmentator's
label names mapped to SNOMED CT codes and colours, and run them like any other model.

TotalSegmentator reorients every image to RAS before its nnU-Net models see it and reads it with
SimpleITK, so the network's array axes run toward S, A, R: imported cards say orientation "SAR"
and the engine reorients (exactly, by axis flips and permutation) before and after prediction.
The label codes come from the mapping that the ``TotalSegmentator`` package ships; without that
package the labels keep their names with generated colours and no codes.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path

from .errors import AIReconstructError, ModelCardError
from .nnunet_import import combine_parts, import_nnunet

log = logging.getLogger(__name__)

RELEASES = "https://github.com/wasserth/TotalSegmentator/releases/download"
# task -> the release and data-set folders of its weights (TotalSegmentator v2 "total" task: five
# part models at 1.5 mm whose labels, numbered on part after part, are the 117 "total" labels; or one
# model at 3 mm for all of them)
TASKS = {
    "total": {"release": "v2.0.0-weights", "datasets": [
        "Dataset291_TotalSegmentator_part1_organs_1559subj", "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
        "Dataset293_TotalSegmentator_part3_cardiac_1559subj", "Dataset294_TotalSegmentator_part4_muscles_1559subj",
        "Dataset295_TotalSegmentator_part5_ribs_1559subj"]},
    "total-fast": {"release": "v2.0.0-weights", "datasets": ["Dataset297_TotalSegmentator_total_3mm_1559subj"]},
}
ORIENTATION = "SAR"
LICENCE = "Apache-2.0 (TotalSegmentator code and weights, github.com/wasserth/TotalSegmentator); cite Wasserthal et al. 2023"
INTENDED_USE = "Research use only, not for clinical use: 117 anatomical structures on CT (TotalSegmentator 'total' task)"


def _unpack(archive: Path, destination: Path) -> None:
    """Extract a zip into ``destination``, refusing members that would land outside it."""
    root = destination.resolve()
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.namelist():
            if not (root / member).resolve().is_relative_to(root):
                raise AIReconstructError(f"Refusing the weights archive {archive.name}: member '{member}' "
                                         "points outside its folder")
        bundle.extractall(root)


def download_weights(task: str, destination: str | Path, base_url: str | None = None) -> list[Path]:
    """Download and unpack the weights of a TotalSegmentator task into ``destination`` (skipping data
    sets already there) from its GitHub releases or a mirror laid out the same way (``base_url``);
    returns the data-set folders. Each archive is unpacked into a hidden staging folder and moved
    into place only when complete."""
    if task not in TASKS:
        raise AIReconstructError(f"Unknown TotalSegmentator task '{task}' (known: {', '.join(TASKS)})")
    base_url = base_url or RELEASES
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    folders = []
    for dataset in TASKS[task]["datasets"]:
        target = destination / dataset
        if not target.is_dir():
            url = f"{base_url}/{TASKS[task]['release']}/{dataset}.zip"
            with tempfile.TemporaryDirectory(prefix=".download-", dir=destination) as staging:
                archive = Path(staging) / "weights.zip"
                log.info("downloading %s", url)
                try:
                    with urllib.request.urlopen(url) as response, open(archive, "wb") as handle:
                        shutil.copyfileobj(response, handle, 1 << 20)
                except OSError as error:
                    raise AIReconstructError(f"Cannot download {url}: {error}") from None
                try:
                    _unpack(archive, Path(staging) / "unpacked")
                except zipfile.BadZipFile:
                    raise AIReconstructError(f"The download of {dataset} is not a zip archive") from None
                unpacked = Path(staging) / "unpacked" / dataset
                if not unpacked.is_dir():
                    raise AIReconstructError(f"The archive of {dataset} does not hold a folder {dataset}")
                unpacked.rename(target)
        folders.append(target)
    return folders


def label_info() -> dict[str, dict]:
    """TotalSegmentator structure name -> card label fields (colour and SNOMED CT codes), from the
    mapping the TotalSegmentator package ships; empty (with a warning) if it is not installed."""
    try:
        table = resources.files("totalsegmentator").joinpath("resources/totalsegmentator_snomed_mapping.csv")
        text = table.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        log.warning("The TotalSegmentator package is not installed: labels get names but no SNOMED CT codes")
        return {}
    fields = {"category": "SegmentedPropertyCategoryCodeSequence", "type": "SegmentedPropertyTypeCodeSequence",
              "type_modifier": "SegmentedPropertyTypeModifierCodeSequence", "region": "AnatomicRegionSequence",
              "region_modifier": "AnatomicRegionModifierSequence"}
    info = {}
    for row in csv.DictReader(text.splitlines()):
        terminology = {}
        for key, prefix in fields.items():
            code = [row.get(f"{prefix}.{part}", "") for part in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")]
            if all(code):
                terminology[key] = code
        entry = {"terminology": terminology} if {"category", "type"} <= terminology.keys() else {}
        if row.get("DicomRGBColor"):
            entry["color"] = [round(int(c) / 255, 4) for c in row["DicomRGBColor"].split(",")]
        info[row["Structure"]] = entry
    return info


def trained_model_folder(dataset_folder: Path) -> Path:
    """The nnU-Net trained-model folder (``Trainer__Plans__configuration``) inside a data-set folder."""
    found = sorted(path.parent for path in Path(dataset_folder).glob("*/plans.json"))
    if len(found) != 1:
        raise ModelCardError(f"Expected one trained nnU-Net model folder in {dataset_folder}, found {len(found)}")
    return found[0]


def import_totalsegmentator(task: str, weights_folder: str | Path) -> dict:
    """A model card for a downloaded TotalSegmentator task (``weights_folder`` holds its data-set
    folders, as :func:`download_weights` leaves them); a task of several part models gets one card
    that runs them in turn and merges their labels as TotalSegmentator does."""
    if task not in TASKS:
        raise ModelCardError(f"Unknown TotalSegmentator task '{task}' (known: {', '.join(TASKS)})")
    info, cards = label_info(), []
    for dataset in TASKS[task]["datasets"]:
        folder = Path(weights_folder) / dataset
        if not folder.is_dir():
            raise ModelCardError(f"No {dataset} in {weights_folder}: download the weights first "
                                 "(aireconstruct import-model totalsegmentator --download)")
        cards.append(import_nnunet(trained_model_folder(folder), name=f"totalsegmentator-{task}", modality="CT",
                                   orientation=ORIENTATION, label_info=info, licence=LICENCE,
                                   intended_use=INTENDED_USE))
    title = f"TotalSegmentator {task} (117 CT structures)"
    if len(cards) > 1:
        return combine_parts(cards, f"totalsegmentator-{task}", title)
    return {**cards[0], "title": title}
