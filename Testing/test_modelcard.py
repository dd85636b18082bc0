"""Model cards: schema validation with errors naming the field, and weights checks."""

import json
import os

import pytest

from AIReconstructLib.errors import ModelCardError, WeightsError
from AIReconstructLib.modelcard import find_model, installed_models, load_card
from AIReconstructLib.networks import ARCHITECTURES, build_network, load_network
from conftest import tiny_card, write_model


def _card_error(tmp_path, mutate) -> str:
    card = tiny_card()
    mutate(card)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelCardError) as info:
        load_card(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_valid_card_loads(tiny_model):
    card = load_card(tiny_model)
    assert card.name == "tiny-test-model"
    assert [label.name for label in card.labels] == ["organ", "lesion"]
    assert card.num_classes == 3
    assert card.spacing() == (4.0, 4.0, 4.0) and card.spacing(fast=True) == (6.0, 6.0, 6.0)


def test_missing_field_is_named(tmp_path):
    assert "'spacing'" in _card_error(tmp_path, lambda c: c.pop("spacing"))
    assert "'labels[0].name'" in _card_error(tmp_path, lambda c: c["labels"][0].pop("name"))


def test_wrong_field_is_named(tmp_path):
    assert "labels[1].color" in _card_error(tmp_path, lambda c: c["labels"][1].update(color=[1, 2]))
    assert "channels[0].normalisation" in _card_error(
        tmp_path, lambda c: c["channels"][0]["normalisation"].pop("clip"))
    assert "weights[0].sha256" in _card_error(tmp_path, lambda c: c["weights"][0].update(sha256="abc"))


def test_repeated_label_value(tmp_path):
    assert "repeats a label value" in _card_error(tmp_path, lambda c: c["labels"][1].update(value=1))


def test_not_json(tmp_path):
    path = tmp_path / "card.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_card(path)


def test_no_fast_mode(tmp_path):
    card = tiny_card()
    del card["fast_spacing"]
    loaded = load_card(write_model(tmp_path / "m", card))
    with pytest.raises(ModelCardError, match="no fast mode"):
        loaded.spacing(fast=True)


def test_tampered_weights_are_refused(tiny_model):
    weights = tiny_model.parent / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the SHA-256"):
        load_network(load_card(tiny_model))


def test_missing_weights_are_refused(tiny_model):
    (tiny_model.parent / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_network(load_card(tiny_model))


def test_weights_of_another_network_are_refused(tmp_path):
    card = tiny_card()
    path = write_model(tmp_path / "m", card)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["architecture"]["args"]["channels"] = [8, 16]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(WeightsError, match="does not fit"):
        load_network(load_card(path))


def test_find_model_by_name_on_the_model_path(tmp_path, monkeypatch):
    write_model(tmp_path / "models" / "tiny")
    monkeypatch.setenv("AIRECONSTRUCT_MODEL_PATH", str(tmp_path / "models"))
    assert find_model("tiny-test-model").folder == tmp_path / "models" / "tiny"
    assert "tiny-test-model" in [card.name for card in installed_models()]
    with pytest.raises(ModelCardError, match="No installed model named 'nope'"):
        find_model("nope")


def test_the_highest_version_of_a_name_wins_and_equal_versions_go_by_folder_order(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for root, version in ((first, "1.0.0"), (second, "1.10.0")):
        folder = write_model(root / "tiny").parent
        card = json.loads((folder / "card.json").read_text())
        (folder / "card.json").write_text(json.dumps({**card, "version": version}))
    write_model(second / "tiny-copy")  # 1.0.0 again, in the later folder
    monkeypatch.setenv("AIRECONSTRUCT_MODEL_PATH", f"{first}{os.pathsep}{second}")
    assert find_model("tiny-test-model").folder == second / "tiny"
    (second / "tiny" / "card.json").unlink()
    assert find_model("tiny-test-model").folder == first / "tiny"
    hidden = write_model(second / ".fine-tuning-x").parent  # a run still writing: not installed
    card = json.loads((hidden / "card.json").read_text())
    (hidden / "card.json").write_text(json.dumps({**card, "version": "9.0.0"}))
    assert find_model("tiny-test-model").folder == first / "tiny"


@pytest.mark.parametrize("name,args", [
    ("UNet", {"channels": [4, 8], "strides": [2]}),
    ("DynUNet", {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]}),
    ("BasicUNetPlusPlus", {"features": [4, 4, 8, 16, 32, 4]}),
    ("VNet", {}),
    ("SegResNet", {"init_filters": 8}),
    ("SwinUNETR", {"feature_size": 12}),
])
def test_every_architecture_builds_from_its_card_entry(name, args):
    import torch
    network = build_network({"name": name, "args": args}, 1, 3).eval()
    size = 64 if name == "SwinUNETR" else 32  # its deepest stage needs more than one voxel
    with torch.no_grad():
        out = network(torch.zeros(1, 1, size, size, size))
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.shape == (1, 3, size, size, size)
    assert set(ARCHITECTURES) >= {name}


def test_unknown_architecture():
    with pytest.raises(ModelCardError, match="Unknown architecture"):
        build_network({"name": "Nope"}, 1, 2)
