"""OpenVINO on the CPU: the same logits and labels as PyTorch, a converted network kept in the
cache, PyTorch where OpenVINO cannot run the network, and the brain-tumour model on real MRI."""

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="OpenVINO is not installed")

from AIReconstructLib.backends import cache_folder  # noqa: E402
from AIReconstructLib.errors import InputError  # noqa: E402
from AIReconstructLib.io import read_image_for_model  # noqa: E402
from AIReconstructLib.modelcard import find_model, load_card  # noqa: E402
from AIReconstructLib.networks import load_network  # noqa: E402
from AIReconstructLib.pipeline import SegmentOptions, segment  # noqa: E402
from AIReconstructLib.predict import Predictor  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402


def test_openvino_gives_pytorchs_logits_and_keeps_the_converted_network(tiny_model, ct_volume, monkeypatch, tmp_path):
    from AIReconstructLib import backends

    monkeypatch.setenv("AIRECONSTRUCT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "_COMPILED", {})  # as in a fresh process
    network = load_network(load_card(tiny_model))
    image = torch.randn(1, 40, 45, 50)
    reference = Predictor(network, (32, 32, 32), 0.5, "cpu", backend="torch")(image, mirror_axes=(0, 2))
    compiled = Predictor(network, (32, 32, 32), 0.5, "cpu", backend="openvino")(image, mirror_axes=(0, 2))
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=1e-4)
    cached = sorted(cache_folder().glob("*.xml"))
    assert len(cached) == 1 and cached[0].with_suffix(".bin").is_file()
    again = Predictor(network, (32, 32, 32), 0.5, "cpu")(image)  # auto: OpenVINO, from the cache
    torch.testing.assert_close(again, Predictor(network, (32, 32, 32), 0.5, "cpu", backend="torch")(image),
                               atol=1e-4, rtol=1e-4)
    assert sorted(cache_folder().glob("*.xml")) == cached

    weights = cached[0].with_suffix(".bin")  # changed in the cache: found, and converted again
    weights.write_bytes(bytes(len(weights.read_bytes())))
    monkeypatch.setattr(backends, "_COMPILED", {})
    again = Predictor(network, (32, 32, 32), 0.5, "cpu")(image)
    torch.testing.assert_close(again, Predictor(network, (32, 32, 32), 0.5, "cpu", backend="torch")(image),
                               atol=1e-4, rtol=1e-4)
    assert backends.cached_for_cpu(next(iter(backends._COMPILED)), (1, 1, 32, 32, 32)) is not None

    card = load_card(tiny_model)
    labels = {backend: segment([ct_volume], card, SegmentOptions(device="cpu", backend=backend)).labelmap.array
              for backend in ("torch", "openvino")}
    np.testing.assert_array_equal(labels["openvino"], labels["torch"])


def test_a_network_openvino_cannot_take_stays_with_pytorch_unless_openvino_is_demanded():
    class Indexing(torch.nn.Module):  # no parameters: nothing for OpenVINO to compile
        def forward(self, batch):
            return torch.cat([batch, -batch], dim=1)

    image = torch.randn(1, 20, 20, 20)
    np.testing.assert_allclose(Predictor(Indexing(), (16, 16, 16), 0.5, "cpu")(image)[0], image[0], atol=1e-5)
    with pytest.raises(InputError, match="OpenVINO backend was asked for"):
        Predictor(Indexing(), (16, 16, 16), 0.5, "cpu", backend="openvino")(image)
    with pytest.raises(InputError, match="Unknown backend 'tpu'"):
        Predictor(Indexing(), (16, 16, 16), 0.5, "cpu", backend="tpu")


def test_swin_unetr_runs_through_openvino_as_through_pytorch(tmp_path, monkeypatch):
    """SwinUNETR converted with dynamic input shapes failed at its first window (a reshape fixed at
    conversion); converted for the window's own shape, and tried on one before it is kept, it runs."""
    from AIReconstructLib import backends
    from AIReconstructLib.networks import build_network

    monkeypatch.setenv("AIRECONSTRUCT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "_COMPILED", {})
    torch.manual_seed(0)
    network = build_network({"name": "SwinUNETR", "args": {"feature_size": 12, "depths": [1, 1, 1, 1]}}, 1, 2).eval()
    image = torch.randn(1, 32, 32, 64)  # one window: the conversion is what is tested
    reference = Predictor(network, (32, 32, 64), 0.25, "cpu", backend="torch")(image)
    compiled = Predictor(network, (32, 32, 64), 0.25, "cpu", backend="openvino")(image)
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=1e-4)


BRATS = SHARED_DATA / "Dataset001_BrainTumourFLAIR"


@pytest.mark.skipif(not BRATS.is_dir(), reason="../shared/data/Dataset001_BrainTumourFLAIR (real BraTS cases) is absent")
def test_the_brain_model_gives_the_same_tumour_through_openvino(record_property):
    image = read_image_for_model(BRATS / "imagesTr" / "BRATS_005_0000.nii.gz")
    card = find_model("brain-tumour-flair")
    labels = {backend: segment([image], card, SegmentOptions(device="cpu", backend=backend)).labelmap.array
              for backend in ("torch", "openvino")}
    agreement = float(np.mean(labels["openvino"] == labels["torch"]))
    record_property("voxel agreement OpenVINO / PyTorch", agreement)
    print(f"voxel agreement OpenVINO / PyTorch on BRATS_005: {agreement:.7f}")
    assert agreement > 0.99999


def test_a_compiled_network_keeps_its_weights_when_the_module_gets_others(tmp_path, monkeypatch):
    """nnU-Net's folds are loaded one after another into one module: each compiled model must keep
    the weights it was compiled with."""
    from AIReconstructLib import backends
    from AIReconstructLib.backends import compiled_for_cpu
    from AIReconstructLib.networks import build_network

    monkeypatch.setenv("AIRECONSTRUCT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "_COMPILED", {})
    architecture = {"name": "UNet", "args": {"channels": [4, 8], "strides": [2], "num_res_units": 0}}
    torch.manual_seed(1)
    network, other = build_network(architecture, 1, 3).eval(), build_network(architecture, 1, 3).state_dict()
    window = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        first_logits = network(window)
    first = compiled_for_cpu(network, (1, 1, 16, 16, 16))
    network.load_state_dict(other)  # in place, as the next fold
    second = compiled_for_cpu(network, (1, 1, 16, 16, 16))
    assert second is not first
    torch.testing.assert_close(first(window), first_logits, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(second(window), network(window), atol=1e-4, rtol=1e-4)


SEGMENT_IN_A_FRESH_PROCESS = """
import json, os, sys, numpy as np
forks = []
os.register_at_fork(before=lambda: forks.append(1))
from AIReconstructLib.io import read_volume
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.pipeline import SegmentOptions, segment
labels = segment([read_volume(sys.argv[1])], load_card(sys.argv[2]), SegmentOptions(device="cpu")).labelmap.array
np.save(sys.argv[3], labels)
print(json.dumps({"network": "built with MONAI" if "monai.networks.nets" in sys.modules else "from the cache",
                  "forks": len(forks), "telemetry": sys.modules.get("openvino_telemetry") is not None}))
"""


def test_a_later_run_takes_the_cards_network_from_the_cache_without_building_it(tiny_model, ct_volume, tmp_path):
    """The first run converts the card's network and keeps it under the card's name; the next process
    compiles it from there without importing MONAI's networks, with the same labels; weights that no
    longer match the card are still refused. Neither run loads OpenVINO's telemetry or forks."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from AIReconstructLib.io import write_volume

    image = tmp_path / "ct.nii.gz"
    write_volume(ct_volume, image)
    model = tmp_path / "model"
    shutil.copytree(Path(tiny_model).parent, model)
    environment = {**os.environ, "AIRECONSTRUCT_CACHE": str(tmp_path / "cache"),
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "AIReconstruct"),
                                                  os.environ.get("PYTHONPATH", "")])}

    def run(number: int) -> tuple[dict, np.ndarray]:
        done = subprocess.run([sys.executable, "-c", SEGMENT_IN_A_FRESH_PROCESS, str(image), str(model),
                               str(tmp_path / f"labels{number}.npy")], env=environment, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), np.load(tmp_path / f"labels{number}.npy")

    first, first_labels = run(1)
    second, second_labels = run(2)
    assert (first["network"], second["network"]) == ("built with MONAI", "from the cache")
    assert first["forks"] == second["forks"] == 0 and not first["telemetry"] and not second["telemetry"]
    assert len(list((tmp_path / "cache" / "openvino").glob("card-*.xml"))) == 1
    np.testing.assert_array_equal(second_labels, first_labels)
    reference = segment([ct_volume], load_card(model), SegmentOptions(device="cpu", backend="torch")).labelmap.array
    np.testing.assert_array_equal(second_labels, reference)

    weights = model / load_card(model).data["weights"][0]["file"]
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # tampered
    done = subprocess.run([sys.executable, "-c", SEGMENT_IN_A_FRESH_PROCESS, str(image), str(model),
                           str(tmp_path / "labels3.npy")], env=environment, capture_output=True, text=True)
    assert done.returncode != 0 and "does not match the SHA-256" in done.stderr
