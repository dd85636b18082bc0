"""Exported networks (TorchScript, ONNX) with a hand-written card: import, run, refuse what does not fit."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from AIReconstructLib.cli import main
from AIReconstructLib.errors import ModelCardError, WeightsError
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.networks import import_exported, load_network
from AIReconstructLib.pipeline import SegmentOptions, segment
from conftest import tiny_card


def _export(tiny_model, kind: str, path):
    network = load_network(load_card(tiny_model))
    example = torch.zeros(1, 1, 32, 32, 32)
    if kind == "torchscript":
        torch.jit.trace(network, example).save(str(path))
    else:
        torch.onnx.export(network, (example,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "windows"}, "logits": {0: "windows"}})
    return path


def _hand_written_card(tmp_path):
    card = tiny_card("exported-test-model")
    del card["architecture"], card["weights"]
    (tmp_path / "hand.json").write_text(json.dumps(card), encoding="utf-8")
    return tmp_path / "hand.json"


@pytest.mark.parametrize("kind", [
    "torchscript",
    pytest.param("onnx", marks=pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                                                  or importlib.util.find_spec("onnx") is None,
                                                  reason="onnx and onnxruntime are not installed (test extra)")),
])
def test_exported_network_gives_the_labels_of_the_original(tiny_model, ct_volume, tmp_path, kind):
    network_file = _export(tiny_model, kind, tmp_path / f"model.{'ts' if kind == 'torchscript' else 'onnx'}")
    assert main(["import-model", kind, str(network_file), "--card", str(_hand_written_card(tmp_path)),
                 "-o", str(tmp_path / "card")]) == 0
    card = load_card(tmp_path / "card")
    assert card.data["architecture"]["name"] in ("TorchScript", "ONNX") and card.data["weights"][0]["file"] == str(network_file)
    options = SegmentOptions(device="cpu", tta=True, backend="torch")  # the original as exported: in PyTorch
    expected = segment([ct_volume], load_card(tiny_model), options).labelmap.array
    np.testing.assert_array_equal(segment([ct_volume], card, options).labelmap.array, expected)


def test_network_whose_outputs_do_not_fit_the_labels_is_refused(tiny_model, tmp_path):
    network_file = _export(tiny_model, "torchscript", tmp_path / "model.ts")
    card = tiny_card()
    card["labels"] = card["labels"][:1]  # the network gives 3 channels; the card now says 2
    with pytest.raises(ModelCardError, match="gives outputs of shape"):
        import_exported(network_file, card, "TorchScript")


def test_file_that_is_not_torchscript_is_refused(tmp_path):
    (tmp_path / "model.ts").write_bytes(b"not a network")
    with pytest.raises(WeightsError, match="cannot be read as TorchScript"):
        import_exported(tmp_path / "model.ts", tiny_card(), "TorchScript")
