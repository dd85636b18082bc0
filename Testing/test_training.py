"""A short training run on phantoms: the loss falls and the written card loads and segments."""

import csv
import json

import numpy as np

from AIReconstructLib.cli import main
from AIReconstructLib.dataset import read_dataset, write_phantom_dataset
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.pipeline import SegmentOptions, segment


def test_short_training_lowers_the_loss_and_writes_a_loadable_card(tmp_path):
    dataset = write_phantom_dataset(tmp_path / "data", count=3, first_seed=500, spacing=(5.0, 5.0, 6.0))
    assert [c.case_id for c in dataset.cases] == ["phantom_0500", "phantom_0501", "phantom_0502"]
    assert read_dataset(tmp_path / "data").label_entries[0]["name"] == "liver"
    code = main(["train", str(tmp_path / "data"), "-o", str(tmp_path / "model"), "--name", "tiny-phantom",
                 "--spacing", "6", "6", "6", "--patch-size", "32", "32", "32", "--epochs", "6", "--iterations", "6",
                 "--validate-every", "3", "--learning-rate", "0.005", "--device", "cpu"])
    assert code == 0
    with open(tmp_path / "model" / "training_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"])
    assert rows[2]["val_mean_dice"] and rows[5]["val_mean_dice"]
    splits = json.loads((tmp_path / "model" / "splits.json").read_text(encoding="utf-8"))
    assert len(splits["validation"]) == 1 and len(splits["train"]) == 2

    card = load_card(tmp_path / "model")
    assert card.data["modality"] == "CT" and card.data["channels"][0]["normalisation"]["scheme"] == "ct"
    assert [label.name for label in card.labels][:2] == ["liver", "liver tumour"]
    assert card.labels[0].terminology["type"] == ["SCT", "10200004", "Liver"]
    phantom = make_phantom(9, spacing=(5.0, 5.0, 6.0))
    result = segment([phantom.image], card, SegmentOptions(device="cpu"))
    assert result.labelmap.same_grid(phantom.image, tolerance=0)
    assert np.any(result.labelmap.array > 0)
