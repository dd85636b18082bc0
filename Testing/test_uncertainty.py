"""Uncertainty: the map's formula, confidence per segment, flagged regions, and on a real BraTS case
that the uncertainty finds the model's errors."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from AIReconstructLib.calibration import Reliability
from AIReconstructLib.cli import main
from AIReconstructLib.dataset import write_phantom_dataset
from AIReconstructLib.io import read_volume, write_volume
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.pipeline import SegmentOptions, segment
from AIReconstructLib.uncertainty import (error_detection_auc, flagged_regions, member_agreement,
                                          normalised_entropy)
from AIReconstructLib.volume import Volume
from conftest import SHARED_DATA, oblique_direction

BRATS = SHARED_DATA / "Dataset001_BrainTumourFLAIR"


def test_entropy_runs_from_certain_to_undecided():
    certain = torch.zeros((2, 3, 4, 4, 4))
    certain[:, 1] = 30.0
    assert normalised_entropy(certain).max() < 1e-6
    undecided = torch.zeros((1, 3, 4, 4, 4))
    assert torch.allclose(normalised_entropy(undecided), torch.ones(4, 4, 4))
    disagreeing = torch.zeros((2, 2, 1, 1, 1))
    disagreeing[0, 0], disagreeing[1, 1] = 30.0, 30.0  # each member is sure, of a different class
    assert normalised_entropy(disagreeing).item() == pytest.approx(1.0, abs=1e-6)


def test_member_agreement_is_the_dice_of_each_member_with_the_result():
    logits = torch.zeros((2, 2, 1, 1, 4))
    logits[:, 1, ..., :2] = 5.0  # both members: label 1 on voxels 0 and 1
    logits[1, 1, ..., 2] = 5.0  # the second also on voxel 2, which the mean leaves at 0 (a tie goes to 0)
    logits[0, 0, ..., 2] = 6.0
    assert member_agreement(logits) == {1: pytest.approx((1.0 + 2 * 2 / 5) / 2)}


def test_flagged_regions_are_the_largest_uncertain_regions_with_their_centres():
    array = np.zeros((20, 30, 40), np.float32)
    array[2:6, 2:6, 2:6] = 0.9  # 64 voxels
    array[10:18, 10:20, 20:30] = 0.7  # 800 voxels
    array[0, 29, 39] = 0.95  # one voxel: below the size limit
    direction = oblique_direction(30)
    volume = Volume(array, (1.0, 1.0, 1.0), (5.0, -3.0, 2.0), direction)
    regions = flagged_regions(volume, threshold=0.5, min_ml=0.01)
    assert [r["size_ml"] for r in regions] == [0.8, 0.064]
    centre = np.array([5.0, -3.0, 2.0]) + direction @ np.array([24.5, 14.5, 13.5])
    np.testing.assert_allclose(regions[0]["centre_mm"], centre, atol=0.06)
    assert regions[0]["mean_uncertainty"] == pytest.approx(0.7)


def test_error_detection_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(1)
    prediction, reference = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    uncertainty = np.round(rng.random(500) + 0.3 * (prediction != reference), 1)  # with ties
    wrong, right = uncertainty[prediction != reference], uncertainty[prediction == reference]
    pairwise = ((wrong[:, None] > right[None]).sum() + 0.5 * (wrong[:, None] == right[None]).sum()) / (wrong.size * right.size)
    assert error_detection_auc(uncertainty, prediction, reference) == pytest.approx(pairwise)
    assert error_detection_auc(uncertainty, reference, reference) is None


def test_uncertainty_leaves_the_tta_labels_unchanged(tiny_model, ct_volume):
    card = load_card(tiny_model)
    with_tta = segment([ct_volume], card, SegmentOptions(device="cpu", tta=True, postprocess=False))
    result = segment([ct_volume], card, SegmentOptions(device="cpu", uncertainty=True, postprocess=False))
    np.testing.assert_array_equal(result.labelmap.array, with_tta.labelmap.array)
    assert result.uncertainty.same_grid(ct_volume) and result.uncertainty.array.dtype == np.float32
    assert 0.0 <= result.uncertainty.array.min() and result.uncertainty.array.max() <= 1.0
    present = {label.name for label in card.labels if np.any(result.labelmap.array == label.value)}
    assert set(result.confidence) == present
    assert segment([ct_volume], card, SegmentOptions(device="cpu")).uncertainty is None


def test_the_written_maps_hold_the_results_maps_to_a_thousandth(tmp_path, tiny_model, ct_volume):
    """Stored in steps of 1/1024 (their full float32 precision is noise gzip cannot compress)."""
    write_volume(ct_volume, tmp_path / "ct.nii.gz")
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-m", str(tiny_model), "-o", str(tmp_path / "out"),
                 "--uncertainty", "--device", "cpu"]) == 0
    result = segment([ct_volume], load_card(tiny_model), SegmentOptions(device="cpu", uncertainty=True))
    for name, in_memory in (("uncertainty", result.uncertainty), ("confidence", result.probability)):
        written = read_volume(tmp_path / "out" / f"ct_{name}.nii.gz")
        assert written.same_grid(ct_volume) and written.array.dtype == np.float32
        np.testing.assert_allclose(written.array, in_memory.array, atol=0.5 / 1024 + 1e-6)
        np.testing.assert_array_equal(written.array * 1024, np.round(written.array * 1024))


def test_networks_with_dropout_add_monte_carlo_dropout_samples_to_the_members(tmp_path, ct_volume):
    from conftest import tiny_card, write_model

    card_data = tiny_card()
    card_data["inference"] = {"overlap": 0.25, "mirror_axes": [], "dropout_samples": 6}  # no mirroring
    without = load_card(write_model(tmp_path / "plain", json.loads(json.dumps(card_data))))
    card_data["architecture"]["args"]["dropout"] = 0.3
    with_dropout = load_card(write_model(tmp_path / "dropout", card_data))
    options = SegmentOptions(device="cpu", uncertainty=True, postprocess=False)
    single = segment([ct_volume], without, options)  # one member: it agrees with itself
    assert single.confidence and all(c["member_dice"] == 1.0 for c in single.confidence.values())
    sampled = segment([ct_volume], with_dropout, options)
    assert any(c["member_dice"] < 1.0 for c in sampled.confidence.values())  # the samples differ
    again = segment([ct_volume], with_dropout, options)
    np.testing.assert_array_equal(again.uncertainty.array, sampled.uncertainty.array)  # reproducible
    plain = segment([ct_volume], with_dropout, SegmentOptions(device="cpu", postprocess=False))
    assert plain.uncertainty is None  # without --uncertainty, dropout stays off: the labels are deterministic
    np.testing.assert_array_equal(plain.labelmap.array,
                                  segment([ct_volume], with_dropout, SegmentOptions(device="cpu", postprocess=False)).labelmap.array)


@pytest.mark.skipif(not BRATS.is_dir(), reason="../shared/data/Dataset001_BrainTumourFLAIR (real BraTS cases) is absent")
def test_uncertainty_finds_the_brain_models_errors_on_a_held_out_case(tmp_path, capsys):
    image, reference = BRATS / "imagesTr" / "BRATS_004_0000.nii.gz", BRATS / "labelsTr" / "BRATS_004.nii.gz"
    out = tmp_path / "out"
    assert main(["segment", str(image), "-m", "brain-tumour-flair", "-o", str(out), "--uncertainty", "--device", "cpu",
                 "--report"]) == 0
    assert "check:" in capsys.readouterr().out
    page = (out / "BRATS_004_0000_report.html").read_text(encoding="utf-8")
    assert "Regions to check" in page and "Agreement of the TTA members" in page
    summary = json.loads((out / "BRATS_004_0000_summary.json").read_text(encoding="utf-8"))
    assert summary["confidence"]["whole tumour"]["member_dice"] > 0.9
    assert summary["flagged_regions"] and summary["flagged_regions"][0]["size_ml"] > 1.0
    assert main(["evaluate", str(out / "BRATS_004_0000_labels.nii.gz"), str(reference), "--uncertainty",
                 str(out / "BRATS_004_0000_uncertainty.nii.gz"), "--confidence",
                 str(out / "BRATS_004_0000_confidence.nii.gz"), "--reliability", str(tmp_path / "reliability.png"),
                 "--json", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["uncertainty_error_auc"] > 0.9  # measured 0.951
    assert metrics["ece"]["whole image"] < 0.01 < metrics["ece"]["region of interest"] < 0.3  # overconfident near the tumour
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_ece_is_zero_when_calibrated_and_the_gap_when_overconfident():
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.5, 1.0, 200_000)
    honest = Reliability()
    honest.add(confidence, rng.random(confidence.size) < confidence)  # right as often as it claims
    assert honest.ece() < 0.01
    overconfident = Reliability()
    overconfident.add(confidence, rng.random(confidence.size) < confidence - 0.2)
    assert overconfident.ece() == pytest.approx(0.2, abs=0.01)
    assert sum(row["voxels"] for row in overconfident.table()) == confidence.size


def test_calibrate_command_writes_its_table_and_diagram(tmp_path, tiny_model, capsys):
    write_phantom_dataset(tmp_path / "data", count=2, first_seed=500, spacing=(4.0, 4.0, 4.0))
    out = tmp_path / "calibration"
    assert main(["calibrate", str(tmp_path / "data"), "-m", str(tiny_model), "-o", str(out), "--device", "cpu"]) == 0
    assert "ECE (region of interest)" in capsys.readouterr().out
    data = json.loads((out / "calibration.json").read_text(encoding="utf-8"))
    assert set(data["cases"]) == {"phantom_0500", "phantom_0501"} and 0 <= data["ece"]["whole image"] <= 1
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["calibrate", str(tmp_path / "data"), "-m", str(tiny_model), "-o", str(out), "--cases", "nope"]) != 0


def test_saliency_of_the_liver_tumour_lies_around_it(tmp_path, capsys):
    phantom = make_phantom(21, spacing=(3.0, 3.0, 3.0), direction=np.eye(3))
    image = write_volume(phantom.image, tmp_path / "ct.nii.gz")
    out = tmp_path / "saliency.nii.gz"
    assert main(["saliency", str(image), "-m", "demo-abdomen-ct", "--segment", "liver tumour", "-o", str(out)]) == 0
    result = read_volume(out)
    assert result.same_grid(phantom.image) and 0 <= result.array.min() and result.array.max() <= 1
    tumour = phantom.labels.array == 2
    distance = ndimage.distance_transform_edt(~tumour, sampling=phantom.labels.spacing[::-1])
    near = distance < 20.0  # mm
    share_of_saliency = result.array[near].sum() / result.array.sum()
    assert share_of_saliency > 5 * near.mean(), (share_of_saliency, near.mean())  # measured: 32 % in 1.5 % of the volume
    assert main(["saliency", str(image), "-m", "demo-abdomen-ct", "--segment", "heart", "-o", str(out)]) != 0
    assert "no segment named 'heart'" in capsys.readouterr().err
