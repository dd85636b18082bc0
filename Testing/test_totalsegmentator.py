"""TotalSegmentator's models: download and unpack, label names and SNOMED CT codes, and geometry end
to end on the real CT in ../shared/data/CT_TotalSegExample (its 30-slice crop ``ct_small``, so
that nnU-Net plans a small network for it); its liver-lesion model imported with the model that
finds the liver it runs inside; its MRI model imported for MRI.

The weights here are a model folder laid out as TotalSegmentator's fast "total" model (Dataset297,
nnU-Net's NoMirroring trainer, one fold, its 117 label names), made by nnU-Net itself from that CT
and TotalSegmentator's labels for it (nnU-Net's initial weights: the real weights cannot be
downloaded here). The archive is served from a file:// URL to the real download code.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AIReconstructLib.cli import main
from AIReconstructLib.errors import AIReconstructError, Cancelled
from AIReconstructLib.measurements import is_lesion
from AIReconstructLib.modelcard import crop_model_of, load_card
from AIReconstructLib.totalsegmentator import TASKS, download_weights
from conftest import SHARED_DATA
from test_nnunet import _predict_with_nnunet, _reference

EXAMPLE = SHARED_DATA / "CT_TotalSegExample"
CT = EXAMPLE / "ct_small.nii.gz"
DATASET = TASKS["total-fast"]["datasets"][0]
LESION_DATASET = TASKS["liver-lesions"]["datasets"][0]
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None, reason="nnunetv2 is not installed (test extra)"),
    pytest.mark.skipif(not EXAMPLE.is_dir(), reason=f"{EXAMPLE} is absent (the shared data folder is not beside the checkout)"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """nnU-Net's work folder holding the trained model in nnUNet_results/Dataset297_.../."""
    work = tmp_path_factory.mktemp("totalseg-train")
    _reference("make-totalsegmentator-model", work, CT, EXAMPLE / "reference_totalseg_small.nii.gz", EXAMPLE / "labels.json")
    return work


@pytest.fixture(scope="module")
def release(trained, tmp_path_factory) -> Path:
    """A folder laid out as TotalSegmentator's GitHub releases, holding the Dataset297 archive."""
    work = trained
    releases = tmp_path_factory.mktemp("releases")
    (releases / TASKS["total-fast"]["release"]).mkdir()
    shutil.make_archive(str(releases / TASKS["total-fast"]["release"] / DATASET), "zip",
                        work / "nnUNet_results", DATASET)
    return releases


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory) -> Path:
    weights, card = tmp_path_factory.mktemp("weights"), tmp_path_factory.mktemp("card")
    assert main(["import-model", "totalsegmentator", str(weights), "--download", "--url", release.as_uri(),
                 "-o", str(card)]) == 0
    assert (weights / DATASET).is_dir() and [p.name for p in weights.iterdir()] == [DATASET]  # no staging left
    return card


def test_download_skips_what_is_there_and_refuses_escaping_archives(release, tmp_path):
    weights = tmp_path / "weights"
    assert download_weights("total-fast", weights, release.as_uri()) == [weights / DATASET]
    assert download_weights("total-fast", weights, "file:///nowhere") == [weights / DATASET]  # not downloaded again

    evil = tmp_path / "evil" / TASKS["total-fast"]["release"]
    evil.mkdir(parents=True)
    with zipfile.ZipFile(evil / f"{DATASET}.zip", "w") as bundle:
        bundle.writestr(f"{DATASET}/../../escaped.txt", "outside")
    with pytest.raises(AIReconstructError, match="points outside its folder"):
        download_weights("total-fast", tmp_path / "other", (tmp_path / "evil").as_uri())
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "other" / DATASET).exists()
    with pytest.raises(AIReconstructError, match="Cannot download"):
        download_weights("total-fast", tmp_path / "third", (tmp_path / "missing").as_uri())

    seen = []
    with pytest.raises(Cancelled, match="nothing was kept"):  # cancelled after the first megabyte
        download_weights("total-fast", tmp_path / "fourth", release.as_uri(),
                         progress=lambda fraction, message: seen.append((fraction, message)), cancel=lambda: bool(seen))
    assert not list((tmp_path / "fourth").iterdir())
    [(fraction, message)] = seen
    assert 0 < fraction < 1 and message.startswith(f"downloading {DATASET}: 1 of ")


def test_the_task_table_agrees_with_totalsegmentators_own():
    """Each task downloads the data sets TotalSegmentator 2.18 runs for it, from the release it names,
    names their outputs as it does, crops to the organs it crops to, and none needs its licence."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map

    assert {"liver-segments", "liver-vessels", "lung-vessels", "pleural-pericard-effusion"} <= TASKS.keys()
    for task, spec in TASKS.items():
        name, fast = task.removesuffix("-fast").replace("-", "_"), task.endswith("-fast")
        config = TASK_CONFIGS[name]
        if "sub_modes" in config:
            config = config["sub_modes"]["fast" if fast else "default"]
        ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
        assert spec["datasets"] == [TASK_ID_WEIGHTS_CONFIGS[i]["foldername"] for i in ids], task
        assert {TASK_ID_WEIGHTS_CONFIGS[i]["version"] for i in ids} == {spec["release"]}, task
        assert not config.get("commercial") and not config.get("crop_model"), task
        if "labels" in spec:
            assert spec["labels"] == class_map[name], task
        assert spec.get("crop", {}).get("segments") == config.get("crop"), task
        assert spec["modality"] == ("MR" if name.endswith("_mr") else "CT"), task


def test_the_weights_of_another_model_are_refused(trained, tmp_path, capsys):
    """A data-set folder holding another model's weights (here the 117-label fast model under the
    liver-segment model's name) is refused in one line, and no card is written."""
    [segments_dataset] = TASKS["liver-segments"]["datasets"]
    for dataset in (DATASET, segments_dataset):
        shutil.copytree(trained / "nnUNet_results" / DATASET, tmp_path / "weights" / dataset)
    assert main(["import-model", "totalsegmentator", str(tmp_path / "weights"), "--task", "liver-segments",
                 "-o", str(tmp_path / "cards")]) != 0
    assert (f"The weights of {segments_dataset} in {tmp_path / 'weights'} segment 117 structures, TotalSegmentator's "
            "'liver-segments' model 8: not that task's weights") in capsys.readouterr().err
    assert not (tmp_path / "cards").exists()


def test_labels_keep_totalsegmentator_ids_names_and_snomed_codes(imported):
    card = load_card(imported)
    names = json.loads((EXAMPLE / "labels.json").read_text())
    assert {label.value: label.name for label in card.labels} == {int(v): n for v, n in names.items()}
    assert card.data["architecture"]["args"]["orientation"] == "SAR" and card.inference["mirror_axes"] == []
    assert "; spleen, kidney_right, " in card.summary()
    assert " and 105 more; licence Apache-2.0" in card.summary()  # a line the Slicer panel can show
    by_name = {label.name: label for label in card.labels}
    if importlib.util.find_spec("totalsegmentator") is not None:
        assert by_name["liver"].terminology["type"] == ["SCT", "10200004", "Liver"]
        assert by_name["kidney_left"].terminology["type_modifier"][2] == "Left"
        assert sum(bool(label.terminology) for label in card.labels) >= 110


def test_geometry_end_to_end_on_a_reoriented_ct(imported, trained, tmp_path, record_property):
    """The CT stored with another axis order and other directions gets exactly the labels of the
    RAS-stored CT, in the same physical places, and the labels of TotalSegmentator's way (the RAS image
    into nnU-Net's predictor). The network has nnU-Net's initial weights, so its 118 logits are close
    to each other and nnU-Net's float16 sums flip some near-ties: agreement with it is about 99.7 %."""
    for name, image in (("original", sitk.ReadImage(str(CT))),
                        ("stored", sitk.DICOMOrient(sitk.ReadImage(str(CT)), "PSL"))):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        assert main(["segment", "-m", str(imported), "-o", str(tmp_path / name), "--device", "cpu",
                     "--no-postprocess", str(tmp_path / f"{name}.nii.gz")]) == 0
    stored = sitk.ReadImage(str(tmp_path / "stored.nii.gz"))
    ours = sitk.ReadImage(str(tmp_path / "stored" / "stored_labels.nii.gz"))
    assert ours.GetSize() == stored.GetSize() and np.allclose(ours.GetSpacing(), stored.GetSpacing())
    assert np.allclose(ours.GetOrigin(), stored.GetOrigin()) and np.allclose(ours.GetDirection(), stored.GetDirection())
    original = sitk.ReadImage(str(tmp_path / "original" / "original_labels.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(sitk.DICOMOrient(original, "PSL")))

    model = next(trained.glob(f"nnUNet_results/{DATASET}/*__3d_fullres"))
    _predict_with_nnunet([{"model": model, "image": CT, "output": tmp_path / "nnunet.nii.gz"}], tmp_path)
    expected = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / "nnunet.nii.gz")), "PSL"))
    agreement = float(np.mean(sitk.GetArrayFromImage(ours) == expected))
    record_property("voxel agreement with nnUNetPredictor on the RAS image", agreement)
    print(f"voxel agreement with nnUNetPredictor (initial weights, 118 classes): {agreement:.5f}")
    assert agreement >= 0.99 and len(np.unique(expected)) > 50


@pytest.fixture(scope="module")
def lesion_release(release, tmp_path_factory) -> Path:
    """The release folder with an archive laid out as TotalSegmentator's liver-lesion model too
    (Dataset591, made by nnU-Net on the same CT with its liver as the one label, initial weights)."""
    work = tmp_path_factory.mktemp("lesion-train")
    liver_value = next(int(v) for v, name in json.loads((EXAMPLE / "labels.json").read_text()).items() if name == "liver")
    reference = sitk.ReadImage(str(EXAMPLE / "reference_totalseg_small.nii.gz")) == liver_value
    sitk.WriteImage(sitk.Cast(reference, sitk.sitkUInt8), str(work / "lesion.nii.gz"))
    (work / "labels.json").write_text(json.dumps({"1": "lesion"}))  # the card names it as TotalSegmentator does
    _reference("make-totalsegmentator-model", work, CT, work / "lesion.nii.gz", work / "labels.json",
               "--dataset", LESION_DATASET)
    (release / TASKS["liver-lesions"]["release"]).mkdir(exist_ok=True)
    shutil.make_archive(str(release / TASKS["liver-lesions"]["release"] / LESION_DATASET), "zip",
                        work / "nnUNet_results", LESION_DATASET)
    return release


def test_a_lesion_model_comes_with_the_model_that_finds_its_organ(lesion_release, tmp_path, capsys):
    """``--task liver-lesions`` downloads and imports TotalSegmentator's fast "total" model beside
    it, which the lesion model's card names as the model whose liver it is run inside."""
    weights, cards = tmp_path / "weights", tmp_path / "cards"
    assert main(["import-model", "totalsegmentator", str(tmp_path), "--task", "liver-lesions"]) != 0
    assert f"No {DATASET}, {LESION_DATASET} in {tmp_path}: download the weights first (aireconstruct import-model " \
           "totalsegmentator --task liver-lesions --download)" in capsys.readouterr().err
    assert main(["import-model", "totalsegmentator", str(weights), "--task", "liver-lesions", "--download",
                 "--url", lesion_release.as_uri(), "-o", str(cards / "lesions")]) == 0
    assert sorted(p.name for p in weights.iterdir()) == sorted([DATASET, LESION_DATASET])
    card = load_card(cards / "lesions")
    assert card.name == "totalsegmentator-liver-lesions" and card.data["modality"] == "CT"
    assert card.inference["crop_to_segments"] == {"model": "totalsegmentator-total-fast", "segments": ["liver"],
                                                  "margin_mm": 20.0}
    crop_card = crop_model_of(card)
    assert crop_card.folder == cards / "totalsegmentator-total-fast" and len(crop_card.labels) == 117
    [lesion] = card.labels
    assert lesion.name == "liver_lesions" and is_lesion(lesion)
    assert lesion.terminology["region"] == ["SCT", "10200004", "Liver"]
    assert "liver lesions" in card.data["intended_use"] and "not for clinical use" in card.data["intended_use"]
    assert "liver_lesions inside the liver found by totalsegmentator-total-fast" in card.summary()


def test_the_mri_model_is_imported_for_mri(trained, tmp_path, capsys):
    """TotalSegmentator's MRI model (here the stand-in model folder under its data-set name) gets an
    MR card, which refuses a CT in one line."""
    [mr_dataset] = TASKS["total-mr-fast"]["datasets"]
    shutil.copytree(trained / "nnUNet_results" / DATASET, tmp_path / "weights" / mr_dataset)
    assert main(["import-model", "totalsegmentator", str(tmp_path / "weights"), "--task", "total-mr-fast",
                 "-o", str(tmp_path / "card")]) == 0
    card = load_card(tmp_path / "card")
    assert card.name == "totalsegmentator-total-mr-fast" and card.data["modality"] == "MR"
    assert "on MRI" in card.data["intended_use"] and "crop_to_segments" not in card.inference
    capsys.readouterr()
    assert main(["segment", "-m", str(tmp_path / "card"), "-o", str(tmp_path / "out"), str(CT)]) != 0
    assert "looks like CT" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_slicer_panel_downloads_a_model_in_the_background(lesion_release, tmp_path):
    """*Download model* in the panel: the engine's worker downloads TotalSegmentator's liver-lesion
    model and the model it runs inside, with the download's progress in the log, and both are
    installed among the user's models, nothing else left there."""
    pytest.importorskip("slicer", reason="the slicer-core package (Slicer's MRML libraries) is not installed")
    from AIReconstructAdapter.engine_run import WARM_ENGINE
    from AIReconstructAdapter.logic import AdapterLogic

    logic = AdapterLogic()
    assert "totalsegmentator:liver-lesions" in logic.downloadableModels()
    models = tmp_path / "models"
    try:
        job = logic.startModelDownload("totalsegmentator:liver-lesions", models_folder=models,
                                       downloads_folder=tmp_path / "downloads", url=lesion_release.as_uri())
        state = job.wait(timeout=300)
    finally:
        WARM_ENGINE.shutdown()
    assert state.status == "done", state.error
    assert job.model_name == "totalsegmentator-liver-lesions"
    assert sorted(p.name for p in models.iterdir()) == ["totalsegmentator-liver-lesions", "totalsegmentator-total-fast"]
    assert any(f"downloading {LESION_DATASET}" in line for line in state.log)
    assert load_card(models / "totalsegmentator-liver-lesions").inference["crop_to_segments"]["segments"] == ["liver"]
