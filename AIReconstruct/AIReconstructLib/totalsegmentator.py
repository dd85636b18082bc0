"""TotalSegmentator's CT and MR models: download their nnU-Net v2 folders, import them with
TotalSegmentator's label names mapped to SNOMED CT codes and colours, and run them like any other model.
Its lung and liver models (nodules, airways and vessels, effusions; lesions, Couinaud segments,
vessels) see only the box around the lungs or the liver that its "total" model finds first: their
cards name that model (``inference.crop_to_segments``), which is imported with them.

TotalSegmentator reorients every image to RAS before its nnU-Net models see it and reads it with
SimpleITK, so the network's array axes run toward S, A, R: imported cards say orientation "SAR"
and the engine reorients (exactly, by axis flips and permutation) before and after prediction.
The label codes come from the mapping that the ``TotalSegmentator`` package ships; without that
package the labels keep their names with generated colours and no codes.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path
from typing import Callable

from .errors import AIReconstructError, Cancelled, ModelCardError

log = logging.getLogger(__name__)

RELEASES = "https://github.com/wasserth/TotalSegmentator/releases/download"
LUNG_LOBES = ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
              "lung_lower_lobe_right"]
# task -> where its weights are (release and data-set folders, which TotalSegmentator names after its
# task ids: "total" is five part models at 1.5 mm whose labels, numbered on part after part, are its
# 117 labels; "total-fast" one model at 3 mm for all of them), its modality and what it segments, and
# for the tasks TotalSegmentator runs only around organs its "total" model finds first, those organs
# (its lung and liver models, trained on such crops). Only tasks whose weights TotalSegmentator
# publishes openly; those behind its licence server (heart chambers, coronary arteries...) are not here.
TASKS = {
    "total": {"release": "v2.0.0-weights", "modality": "CT", "structures": "117 anatomical structures on CT",
              "datasets": ["Dataset291_TotalSegmentator_part1_organs_1559subj",
                           "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
                           "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
                           "Dataset294_TotalSegmentator_part4_muscles_1559subj",
                           "Dataset295_TotalSegmentator_part5_ribs_1559subj"]},
    "total-fast": {"release": "v2.0.0-weights", "modality": "CT", "structures": "117 anatomical structures on CT",
                   "datasets": ["Dataset297_TotalSegmentator_total_3mm_1559subj"]},
    "total-mr": {"release": "v2.5.0-weights", "modality": "MR", "structures": "50 anatomical structures on MRI",
                 "datasets": ["Dataset850_TotalSegMRI_part1_organs_1088subj",
                              "Dataset851_TotalSegMRI_part2_muscles_1088subj"]},
    "total-mr-fast": {"release": "v2.5.0-weights", "modality": "MR", "structures": "50 anatomical structures on MRI",
                      "datasets": ["Dataset852_TotalSegMRI_total_3mm_1088subj"]},
    "lung-nodules": {"release": "v2.5.0-weights", "modality": "CT", "structures": "the lungs and lung nodules on CT",
                     "datasets": ["Dataset913_lung_nodules"], "labels": {1: "lung", 2: "lung_nodules"},
                     "crop": {"task": "total-fast", "segments": LUNG_LOBES}},
    "liver-lesions": {"release": "v2.5.0-weights", "modality": "CT", "structures": "liver lesions on CT",
                      "datasets": ["Dataset591_ct_liver_lesions_842subj"], "labels": {1: "liver_lesions"},
                      "crop": {"task": "total-fast", "segments": ["liver"]}},
    "liver-segments": {"release": "v2.5.0-weights", "modality": "CT",
                       "structures": "the eight Couinaud segments of the liver on CT",
                       "datasets": ["Dataset570_ct_liver_segments"],
                       "labels": {n: f"liver_segment_{n}" for n in range(1, 9)},
                       "crop": {"task": "total-fast", "segments": ["liver"]}},
    "liver-vessels": {"release": "v2.4.0-weights", "modality": "CT", "structures": "the liver's vessels and tumours on CT",
                      "datasets": ["Dataset008_HepaticVessel"], "labels": {1: "liver_vessels", 2: "liver_tumor"},
                      "crop": {"task": "total-fast", "segments": ["liver"]}},
    "lung-vessels": {"release": "v2.5.0-weights", "modality": "CT",
                     "structures": "the airways and the arteries and veins of the lungs on CT",
                     "datasets": ["Dataset117_lung_airways_arteries_veins_282subj"],
                     "labels": {1: "lung_airways", 2: "lung_airways_wall", 3: "lung_arteries", 4: "lung_veins"},
                     "crop": {"task": "total-fast", "segments": LUNG_LOBES}},
    "pleural-pericard-effusion": {"release": "v2.0.0-weights", "modality": "CT",
                                  "structures": "pleural and pericardial effusions on CT",
                                  "datasets": ["Dataset315_thoraxCT"],
                                  "labels": {1: "lung_pleural", 2: "pleural_effusion", 3: "pericardial_effusion"},
                                  "crop": {"task": "total-fast", "segments": LUNG_LOBES}},
}  # "labels": the names TotalSegmentator gives its output values (else those of the folder's dataset.json)
# TotalSegmentator adds 20 voxels of the image around the organs it crops to: 20 mm at 1 mm
CROP_MARGIN_MM = 20.0
# labels of the tasks above that TotalSegmentator's own SNOMED CT mapping lacks
EXTRA_LABEL_INFO = {
    "lung": {"color": [0.4, 0.8, 0.85], "terminology": {
        "category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "39607008", "Lung"]}},
    "lung_nodules": {"color": [1.0, 0.55, 0.0], "terminology": {
        "category": ["SCT", "49755003", "Morphologically Altered Structure"], "type": ["SCT", "27925004", "Nodule"],
        "region": ["SCT", "39607008", "Lung"]}},
    "liver_lesions": {"color": [1.0, 0.0, 0.78], "terminology": {
        "category": ["SCT", "49755003", "Morphologically Altered Structure"], "type": ["SCT", "52988006", "Lesion"],
        "region": ["SCT", "10200004", "Liver"]}},
}
ORIENTATION = "SAR"
LICENCE = "Apache-2.0 (TotalSegmentator code and weights, github.com/wasserth/TotalSegmentator); cite Wasserthal et al. 2023"


def task_names(task: str) -> list[str]:
    """The tasks whose weights ``task`` needs: itself, after the task that finds the organs it is cropped to."""
    known(task)
    crop = TASKS[task].get("crop")
    return [crop["task"], task] if crop else [task]


def known(task: str) -> None:
    """Refuse a task this importer does not know."""
    if task not in TASKS:
        raise AIReconstructError(f"Unknown TotalSegmentator task '{task}' (known: {', '.join(TASKS)})")


def _unpack(archive: Path, destination: Path) -> None:
    """Extract a zip into ``destination``, refusing members that would land outside it."""
    root = destination.resolve()
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.namelist():
            if not (root / member).resolve().is_relative_to(root):
                raise AIReconstructError(f"Refusing the weights archive {archive.name}: member '{member}' "
                                         "points outside its folder")
        bundle.extractall(root)


def download_weights(task: str, destination: str | Path, base_url: str | None = None,
                     progress: Callable[[float, str], None] | None = None,
                     cancel: Callable[[], bool] | None = None) -> list[Path]:
    """Download and unpack the weights of a TotalSegmentator task into ``destination`` (skipping data
    sets already there) from its GitHub releases or a mirror laid out the same way (``base_url``);
    returns the data-set folders. Each archive is unpacked into a hidden staging folder and moved
    into place only when complete; ``progress(fraction, message)`` follows the download, and
    ``cancel()`` returning True stops it (raising :class:`Cancelled`) with nothing kept."""
    known(task)
    base_url = base_url or RELEASES
    report = progress or (lambda fraction, message: None)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    datasets = TASKS[task]["datasets"]
    folders = []
    for number, dataset in enumerate(datasets):
        target = destination / dataset
        if not target.is_dir():
            url = f"{base_url}/{TASKS[task]['release']}/{dataset}.zip"
            with tempfile.TemporaryDirectory(prefix=".download-", dir=destination) as staging:
                archive = Path(staging) / "weights.zip"
                log.info("downloading %s", url)
                try:
                    with urllib.request.urlopen(url) as response, open(archive, "wb") as handle:
                        size, done = int(response.headers.get("Content-Length") or 0), 0
                        while chunk := response.read(1 << 20):
                            handle.write(chunk)
                            done += len(chunk)
                            if cancel is not None and cancel():
                                raise Cancelled("Download cancelled by the user; nothing was kept")
                            report((number + (done / size if size else 0)) / len(datasets),
                                   f"downloading {dataset}: {done >> 20} of {size >> 20} MB")
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


def check_weights(task: str, weights_folder: str | Path) -> None:
    """Refuse, in one line, a weights folder that lacks a data set ``task`` needs (its own, and those
    of the model it runs inside)."""
    missing = [dataset for needed in task_names(task) for dataset in TASKS[needed]["datasets"]
               if not (Path(weights_folder) / dataset).is_dir()]
    if missing:
        raise ModelCardError(f"No {', '.join(missing)} in {weights_folder}: download the weights first "
                             f"(aireconstruct import-model totalsegmentator --task {task} --download)")


def card_name(task: str) -> str:
    """The name of the card imported for ``task``."""
    return f"totalsegmentator-{task}"


def import_totalsegmentator(task: str, weights_folder: str | Path) -> dict:
    """A model card for a downloaded TotalSegmentator task (``weights_folder`` holds its data-set
    folders, as :func:`download_weights` leaves them); a task of several part models gets one card
    that runs them in turn and merges their labels as TotalSegmentator does; a task TotalSegmentator
    runs around organs only is cropped to the organs that its card's crop model finds."""
    from .nnunet_import import combine_parts, import_nnunet  # torch: not needed to list the tasks

    known(task)
    spec = TASKS[task]
    info, cards = {**EXTRA_LABEL_INFO, **label_info()}, []
    intended_use = f"Research use only, not for clinical use: {spec['structures']} (TotalSegmentator '{task}' task)"
    check_weights(task, weights_folder)
    for dataset in spec["datasets"]:
        folder = Path(weights_folder) / dataset
        cards.append(import_nnunet(trained_model_folder(folder), name=card_name(task), modality=spec["modality"],
                                   orientation=ORIENTATION, label_info=info, licence=LICENCE,
                                   intended_use=intended_use))
    title = f"TotalSegmentator {task} ({spec['structures']})"
    card = combine_parts(cards, card_name(task), title) if len(cards) > 1 else {**cards[0], "title": title}
    if "labels" in spec:
        if sorted(label["value"] for label in card["labels"]) != sorted(spec["labels"]):
            raise ModelCardError(f"The weights of {', '.join(spec['datasets'])} in {weights_folder} segment "
                                 f"{len(card['labels'])} structures, TotalSegmentator's '{task}' model "
                                 f"{len(spec['labels'])}: not that task's weights")
        for label in card["labels"]:  # codes only for the names TotalSegmentator gives
            label["name"] = spec["labels"][label["value"]]
            label.pop("terminology", None)
            label.update(info.get(label["name"], {}))
    if "crop" in spec:
        card["inference"]["crop_to_segments"] = {"model": card_name(spec["crop"]["task"]),
                                                 "segments": spec["crop"]["segments"], "margin_mm": CROP_MARGIN_MM}
    return card
