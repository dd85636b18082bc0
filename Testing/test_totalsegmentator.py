"""TotalSegmentator's models: download and unpack, label names and SNOMED CT codes, and geometry end
to end on the real CT in ../shared/data/CT_TotalSegExample (its 30-slice crop ``ct_small``, so
that nnU-Net plans a small network for it).

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
from AIReconstructLib.errors import AIReconstructError
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.totalsegmentator import TASKS, download_weights
from conftest import SHARED_DATA
from test_nnunet import _predict_with_nnunet, _reference

EXAMPLE = SHARED_DATA / "CT_TotalSegExample"
CT = EXAMPLE / "ct_small.nii.gz"
DATASET = TASKS["total-fast"]["datasets"][0]
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


def test_labels_keep_totalsegmentator_ids_names_and_snomed_codes(imported):
    card = load_card(imported)
    names = json.loads((EXAMPLE / "labels.json").read_text())
    assert {label.value: label.name for label in card.labels} == {int(v): n for v, n in names.items()}
    assert card.data["architecture"]["args"]["orientation"] == "SAR" and card.inference["mirror_axes"] == []
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
