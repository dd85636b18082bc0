"""The bundled brain-tumour model: its card, and its accuracy on real BraTS cases it never saw."""

import pytest

from AIReconstructLib.io import read_image_for_model, read_labelmap
from AIReconstructLib.metrics import evaluate
from AIReconstructLib.modelcard import find_model, sha256_of
from AIReconstructLib.pipeline import SegmentOptions, segment
from conftest import SHARED_DATA

BRATS = SHARED_DATA / "Dataset001_BrainTumourFLAIR"
MODEL = "brain-tumour-flair"


def test_card_describes_a_flair_whole_tumour_model_for_research_only():
    card = find_model(MODEL)
    assert [channel["name"] for channel in card.channels] == ["FLAIR"] and card.data["modality"] == "MR"
    assert card.channels[0]["normalisation"]["scheme"] == "zscore_nonzero"
    (label,) = card.labels
    assert label.name == "whole tumour" and label.terminology["type"] == ["SCT", "108369006", "Neoplasm"]
    assert "not for clinical use" in card.data["intended_use"] and "BraTS" in card.data["licence"]
    assert sha256_of(card.weight_paths[0]) == card.data["weights"][0]["sha256"]
    assert card.weight_paths[0].stat().st_size < 50 * 1024 * 1024
    assert card.channels[0]["skull_stripped"] and card.summary().startswith("brain-tumour-flair (MR, skull-stripped; ")


@pytest.mark.skipif(not BRATS.is_dir(), reason="../shared/data/Dataset001_BrainTumourFLAIR (real BraTS cases) is absent")
@pytest.mark.parametrize("case", ["BRATS_004", "BRATS_005"])  # held out from the bundled model's training
def test_held_out_brats_case(case):
    card = find_model(MODEL)
    assert case in card.data["training"]["held_out_cases"]
    image = read_image_for_model(BRATS / "imagesTr" / f"{case}_0000.nii.gz")
    result = segment([image], card, SegmentOptions(device="cpu"))
    reference = read_labelmap(BRATS / "labelsTr" / f"{case}.nii.gz", like=image)
    scores = evaluate(result.labelmap, reference, result.label_names)
    assert scores["labels"]["whole tumour"]["dice"] >= 0.60, scores["labels"]
    assert scores["labels"]["whole tumour"]["hd95_mm"] < 40
