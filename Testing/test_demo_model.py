"""The bundled demo model: a valid, checksummed card that segments unseen phantoms well."""

import json

import numpy as np
import pytest

from AIReconstructLib.cli import main
from AIReconstructLib.demo import DEMO_MODEL
from AIReconstructLib.metrics import evaluate
from AIReconstructLib.modelcard import find_model, sha256_of
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.pipeline import SegmentOptions, segment
from AIReconstructLib.meshfiles import mesh_file_name


def test_card_is_bundled_valid_and_honest():
    card = find_model(DEMO_MODEL)
    assert sha256_of(card.weight_paths[0]) == card.data["weights"][0]["sha256"]
    assert card.weight_paths[0].stat().st_size < 20 * 1024 * 1024
    assert "not for clinical use" in card.data["intended_use"]
    assert all(label.terminology.get("type", [""])[0] == "SCT" for label in card.labels)
    assert card.inference["mirror_axes"] == []  # mirroring would swap the right and left kidneys


@pytest.mark.parametrize("seed", [3])
def test_unseen_phantom_mean_dice_at_least_0_90(seed):
    card = find_model(DEMO_MODEL)
    phantom = make_phantom(seed)
    result = segment([phantom.image], card, SegmentOptions(device="cpu"))
    scores = evaluate(result.labelmap, phantom.labels, result.label_names, distances=False)
    assert scores["mean"]["dice"] >= 0.90, scores["mean"]
    assert scores["labels"]["liver"]["dice"] >= 0.90


def test_demo_command_writes_the_promised_files(tmp_path, capsys):
    out = tmp_path / "demo-output"
    assert main(["demo", "--output", str(out), "--extra-cases", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Mean Dice" in printed and str(out.resolve()) in printed
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    stem = "phantom_0007"
    assert {f"{stem}.seg.nrrd", f"{stem}_labels.nii.gz", f"{stem}_ct.nii.gz", "summary.md",
            f"{stem}_summary.json", f"{stem}_report.html", f"surfaces/{stem}.glb", f"surfaces/{stem}.3mf"} <= names
    summary = json.loads((out / f"{stem}_summary.json").read_text(encoding="utf-8"))
    assert len(summary["surfaces"]) == 9
    for name in summary["surfaces"]:
        assert f"surfaces/{mesh_file_name(name, '.stl')}" in names and f"surfaces/{mesh_file_name(name, '.vtp')}" in names
    assert summary["mean_dice"] >= 0.90
    assert np.isfinite(summary["seconds"]["predict"])
    (lesion,) = summary["measurements"]["lesions"]
    assert lesion["name"] == "liver tumour" and lesion["organ"] == "liver" and 0 < lesion["remnant_percent"] < 100
    assert lesion["part_count"] == 2 == summary["lesion_parts"]["liver tumour"]["count"]  # the phantom's two tumours
    assert [part["number"] for part in lesion["parts"]] == [1, 2]


def test_segment_says_how_many_separate_lesions_it_found(tmp_path, capsys):
    """The two liver tumours of phantom 7 (32 and 4 mL): the volume printed with the number of
    separate parts, and the summary's count and parts (which the Slicer panel shows too)."""
    from AIReconstructLib.io import write_volume

    image = write_volume(make_phantom(7).image, tmp_path / "ct.nii.gz")
    assert main(["segment", str(image), "-m", DEMO_MODEL, "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert " mL in 2 separate parts" in next(line for line in printed.splitlines() if line.startswith("liver tumour:"))
    assert not any("separate" in line for line in printed.splitlines() if line.startswith("liver:"))
    summary = json.loads((tmp_path / "out" / "ct_summary.json").read_text(encoding="utf-8"))
    (parts,) = summary["lesion_parts"].values()
    assert parts["count"] == 2 and parts["largest"][0]["volume_ml"] > parts["largest"][1]["volume_ml"]
