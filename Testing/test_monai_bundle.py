"""MONAI bundles: the importer reads the bundle's configs as data, and the engine's labels match the
bundle's own ``ConfigWorkflow`` inference on the same image."""

from __future__ import annotations

import http.server
import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AIReconstructLib.cli import main
from AIReconstructLib.errors import AIReconstructError, Cancelled, ModelCardError, WeightsError
from AIReconstructLib.io import read_volume, write_volume
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.monai_bundle import download_bundle, import_bundle
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.pipeline import SegmentOptions, segment
from conftest import PickleExploit

NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [8, 16, 32],
           "strides": [2, 2], "num_res_units": 1}


# the whole-body CT bundle's way (MONAI model zoo, wholeBody_ct_segmentation): spacing and overlap
# chosen by flags, z-scored over the non-zero voxels then scaled to [-1, 1], small images padded
# with their border voxels, the argmax taken before the spacing is inverted
WHOLE_BODY_STYLE = {
    "options": {"displayable_configs": {"highres": True, "sw_overlap": 0.25},
                "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'"},
    "pixdim": "$[2.0, 2.0, 2.5] if @displayable_configs#highres else [4.0, 4.0, 5.0]",
    "intensity": [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
                  {"_target_": "ScaleIntensityd", "keys": "image", "minv": -1.0, "maxv": 1.0}],
    "inferer": {"overlap": "@displayable_configs#sw_overlap", "padding_mode": "replicate",
                "device": "$torch.device('cpu')"},
    "inverted": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True},  # labels, then nearest back
                 {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                  "nearest_interp": True, "to_tensor": True}],
}


def make_bundle(root: Path, network=NETWORK, extra_transform=None, blend="gaussian", style=None) -> Path:
    """A small segmentation bundle laid out as MONAI's model zoo bundles are (random, seeded weights);
    ``style``: :data:`WHOLE_BODY_STYLE` for that bundle's way of configuring."""
    style = style or {}
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    transforms = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
        *style.get("intensity", [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200, "a_max": 300,
                                  "b_min": 0.0, "b_max": 1.0, "clip": True}]),
        {"_target_": "EnsureTyped", "keys": "image"},
    ] + ([extra_transform] if extra_transform else [])
    inference = {
        "imports": ["$import glob"], "bundle_root": str(root), "output_dir": str(root / "eval"),
        "device": "$torch.device('cpu')", "pixdim": style.get("pixdim", [2.0, 2.0, 2.5]), **style.get("options", {}),
        "network_def": network, "network": "$@network_def.to(@device)", "datalist": [],
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 48], "sw_batch_size": 1, "overlap": 0.5,
                    "mode": blend, **style.get("inferer", {})},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            *style.get("inverted", [
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]),
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "resample": False, "separate_folder": False}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": ["$monai.utils.set_determinism(seed=123)"], "run": ["$@evaluator.run()"],
    }
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    metadata = {
        "version": "0.1.0", "name": "Test organs CT", "description": "a test bundle", "license": "Apache-2.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "channel_def": {"0": "background", "1": "liver", "2": "spleen"}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    from monai.networks import nets

    torch.manual_seed(0)
    network_class = getattr(nets, NETWORK["_target_"])
    torch.save(network_class(**{k: v for k, v in NETWORK.items() if k != "_target_"}).state_dict(),
               root / "models" / "model.pt")
    return root


def test_import_reads_network_preprocessing_and_labels(tmp_path):
    card_folder = tmp_path / "card"
    assert main(["import-model", "monai-bundle", str(make_bundle(tmp_path / "bundle")), "-o", str(card_folder)]) == 0
    card = load_card(card_folder)
    assert [(label.value, label.name) for label in card.labels] == [(1, "liver"), (2, "spleen")]
    assert card.labels[0].terminology["type"] == ["SCT", "10200004", "Liver"]  # TotalSegmentator's codes by name
    assert card.orientation == "RAS" and card.spacing() == (2.0, 2.0, 2.5) and card.patch_size == (64, 64, 48)
    assert card.data["architecture"] == {"name": "UNet", "args": {"channels": [8, 16, 32], "strides": [2, 2],
                                                                  "num_res_units": 1}}
    assert card.channels[0]["normalisation"] == {"scheme": "ct", "clip": [-200.0, 300.0], "mean": -200.0, "std": 500.0}
    assert card.data["weights"][0]["file"] == "model.safetensors" and card.data["modality"] == "CT"
    assert "skull_stripped" not in card.channels[0]
    assert main(["import-model", "monai-bundle", str(tmp_path / "bundle"), "-o", str(tmp_path / "stripped"),
                 "--skull-stripped"]) == 0
    assert load_card(tmp_path / "stripped").channels[0]["skull_stripped"] is True


CASES = {  # spacing, field of view (mm), blending, bundle style
    "bundle spacing": ((2.0, 2.0, 2.5), (124.0, 100.0, 110.0), "gaussian", None),
    "resampled": ((1.6, 1.7, 3.1), (124.0, 100.0, 110.0), "gaussian", None),
    "27 windows, gaussian": ((1.6, 1.7, 3.1), (230.0, 200.0, 190.0), "gaussian", None),
    "27 windows, constant": ((1.6, 1.7, 3.1), (230.0, 200.0, 190.0), "constant", None),
    "whole-body bundle's style, padded": ((1.6, 1.7, 3.1), (124.0, 100.0, 110.0), "gaussian", WHOLE_BODY_STYLE),
    "whole-body bundle's style, windows": ((1.6, 1.7, 3.1), (230.0, 200.0, 190.0), "gaussian", WHOLE_BODY_STYLE),
}


@pytest.mark.skipif(importlib.util.find_spec("ignite") is None, reason="pytorch-ignite is not installed (test extra)")
@pytest.mark.parametrize("case", CASES)
def test_same_labels_as_the_bundles_own_inference(tmp_path, record_property, case):
    """The CT is stored LPS (the bundle reorients it to RAS), at the bundle's spacing or resampled to
    it on MONAI's grid (Spacingd: from the first voxel's centre; Invertd of the probabilities back),
    in one window or in several placed and blended as MONAI's SlidingWindowInferer does."""
    from monai.bundle import ConfigWorkflow

    spacing, field_of_view, blend, style = CASES[case]
    bundle = make_bundle(tmp_path / "bundle", blend=blend, style=style)
    image = tmp_path / "case.nii.gz"
    write_volume(make_phantom(3, spacing=spacing, field_of_view_mm=field_of_view).image, image)
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="infer",
                              meta_file=str(bundle / "configs" / "metadata.json"), datalist=[{"image": str(image)}])
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(bundle / "eval" / "case_seg.nii.gz")))

    assert main(["import-model", "monai-bundle", str(bundle), "-o", str(tmp_path / "card")]) == 0
    card = load_card(tmp_path / "card")
    assert card.inference["sliding_window"] == {"style": "monai", "blend": blend, "sigma_scale": 0.125,
                                                **({"padding": "replicate"} if style else {})}
    ours = segment([read_volume(image)], card, SegmentOptions(device="cpu", postprocess=False)).labelmap.array
    agreement = float(np.mean(ours == theirs))
    record_property("voxel agreement with the bundle's ConfigWorkflow", agreement)
    print(f"voxel agreement with the bundle's ConfigWorkflow: {agreement:.5f}")
    assert ours.shape == theirs.shape and len(np.unique(theirs)) == 3
    assert agreement >= 0.999


@pytest.mark.parametrize("size, patch, overlap", [(100, 64, 0.5), (64, 64, 0.5), (65, 64, 0.25), (300, 96, 0.25),
                                                  (97, 32, 0.6), (40, 64, 0.5), (200, 7, 0.9), (50, 3, 0.99)])
def test_windows_are_placed_as_monais_sliding_window_inferer_places_them(size, patch, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from AIReconstructLib.predict import monai_window_starts

    padded = max(size, patch)  # the inferer pads smaller images to the window first, as the engine does
    interval = _get_scan_interval((padded,), (patch,), 1, (overlap,))
    theirs = [window[0].start for window in dense_patch_slices((padded,), (patch,), interval)]
    assert monai_window_starts(padded, patch, overlap) == theirs


@pytest.mark.parametrize("blend, sigma_scale", [("gaussian", 0.125), ("gaussian", 0.3), ("constant", 0.125)])
def test_blending_weights_are_monais(blend, sigma_scale):
    from monai.data.utils import compute_importance_map

    from AIReconstructLib.predict import monai_importance

    patch = (20, 33, 8)
    theirs = compute_importance_map(patch, mode=blend, sigma_scale=sigma_scale, device="cpu")
    torch.testing.assert_close(monai_importance(patch, blend, sigma_scale), theirs, atol=1e-7, rtol=1e-6)


def test_unsupported_blending_is_refused(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", blend="linear")
    with pytest.raises(ModelCardError, match="blends with mode 'linear'"):
        import_bundle(bundle, tmp_path / "out")


def test_first_voxel_grid_is_monais_spacing_and_its_inverse():
    """The engine's first_voxel grid resamples as MONAI's Spacing does (size, first voxel, bilinear,
    border), and going back lands on the input's grid."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    from AIReconstructLib.preprocess import resample, resampled_shape

    image = torch.rand(1, 23, 31, 17, generator=torch.Generator().manual_seed(0))
    spacing, target = (1.6, 1.7, 3.1), (2.0, 2.0, 2.5)
    theirs = Spacing(pixdim=target, mode="bilinear")(MetaTensor(image, affine=torch.diag(torch.tensor([*spacing, 1.0]))))
    shape = resampled_shape(image.shape[1:], spacing, target, "first_voxel")
    ours = resample(image, shape, [t / s for s, t in zip(spacing, target)])
    assert tuple(theirs.shape[1:]) == shape
    torch.testing.assert_close(ours, theirs.as_tensor(), atol=1e-5, rtol=0)
    back = resample(ours, image.shape[1:], [s / t for s, t in zip(spacing, target)])
    assert back.shape == image.shape


def test_a_choice_by_a_flag_is_read_without_running_code(tmp_path):
    """The whole-body bundle's settings: the spacing its resolution flag picks (read as data, never
    evaluated), the overlap it refers to, and its intensities z-scored then scaled to [-1, 1]."""
    low_resolution = {**WHOLE_BODY_STYLE, "options": {**WHOLE_BODY_STYLE["options"],
                                                      "displayable_configs": {"highres": False, "sw_overlap": 0.4}}}
    bundle = make_bundle(tmp_path / "bundle", style=low_resolution)
    with pytest.raises(ModelCardError, match="neither models/model_lowres.pt nor models/model.ts"):
        import_bundle(bundle, tmp_path / "card")  # its weights for that resolution are not there
    (bundle / "models" / "model.pt").rename(bundle / "models" / "model_lowres.pt")
    card = import_bundle(bundle, tmp_path / "card")
    assert card["spacing"] == [4.0, 4.0, 5.0] and card["inference"]["overlap"] == 0.4
    assert card["channels"][0]["normalisation"] == {"scheme": "zscore_nonzero", "rescale": [-1.0, 1.0]}
    assert card["inference"]["normalise"] == "after_resampling" and card["inference"]["resample_back"] == "labels"
    for pixdim in ("$[2.0, 2.0, 2.5] if @no_such_flag else [4.0, 4.0, 5.0]",  # no such flag
                   "$[2.0, 2.0, 2.5] if @device else [4.0, 4.0, 5.0]",  # not a flag but an expression
                   "$__import__('os').system('touch PWNED') or [2.0, 2.0, 2.5]"):  # code
        bundle = make_bundle(tmp_path / str(len(pixdim)), style={**WHOLE_BODY_STYLE, "pixdim": pixdim})
        with pytest.raises(ModelCardError, match="is an expression"):
            import_bundle(bundle, tmp_path / "out")
    assert not Path("PWNED").exists()


def _zipped(bundle: Path) -> Path:
    """The bundle as the model zoo serves it: a zip holding its folder."""
    return Path(shutil.make_archive(str(bundle.parent / bundle.name), "zip", bundle.parent, bundle.name))


def test_a_model_zoo_bundle_is_downloaded_then_imported(tmp_path, capsys):
    """``--download`` fetches the bundle named as the folder (through MONAI's own download, here from
    a file:// URL), once; a failed or cancelled download leaves nothing behind."""
    archive = _zipped(make_bundle(tmp_path / "zoo" / "wholeBody_ct_segmentation", style=WHOLE_BODY_STYLE))
    folder = tmp_path / "bundles" / "wholeBody_ct_segmentation"
    assert main(["import-model", "monai-bundle", str(folder), "--download", "--url", archive.as_uri(),
                 "-o", str(tmp_path / "card")]) == 0
    assert (folder / "configs" / "inference.json").is_file() and sorted(p.name for p in folder.parent.iterdir()) == [
        "wholeBody_ct_segmentation"]  # no staging left
    card = load_card(tmp_path / "card")
    assert card.name == "wholebody_ct_segmentation" and card.data["channels"][0]["normalisation"]["rescale"] == [-1, 1]
    assert download_bundle(folder, "file:///nowhere.zip") == folder  # there already: not downloaded again

    with pytest.raises(AIReconstructError, match="Cannot download the MONAI bundle other: "):
        download_bundle(tmp_path / "failed" / "other", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(Cancelled, match="nothing was kept"):
        download_bundle(tmp_path / "cancelled" / "wholeBody_ct_segmentation", archive.as_uri(), cancel=lambda: True)
    assert not list((tmp_path / "failed").iterdir()) and not list((tmp_path / "cancelled").iterdir())
    capsys.readouterr()
    assert main(["import-model", "monai-bundle", str(tmp_path / "x" / "spleen"), "--download", "--url",
                 archive.as_uri()]) != 0  # the zip holds another bundle
    assert "The download of spleen holds no bundle folder spleen/configs" in capsys.readouterr().err


def test_a_bundle_download_reports_what_has_arrived_and_stops_midway_when_cancelled(tmp_path):
    """Served slowly (half the zip, then a pause): progress counts the MB that have arrived, and a
    cancel stops the download during the pause, before the rest is sent, with nothing kept."""
    bundle = make_bundle(tmp_path / "zoo" / "wholeBody_ct_segmentation")
    (bundle / "models" / "padding.bin").write_bytes(np.random.default_rng(0).bytes(2_000_000))  # incompressible
    payload = _zipped(bundle).read_bytes()
    rest_sent, release = threading.Event(), threading.Event()

    class SlowZip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            half = len(payload) // 2
            self.wfile.write(payload[:half])
            self.wfile.flush()
            if release.wait(timeout=60):
                try:
                    self.wfile.write(payload[half:])
                    rest_sent.set()
                except OSError:  # the client has gone
                    pass

        def log_message(self, *arguments):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowZip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    messages = []
    folder = tmp_path / "bundles" / "wholeBody_ct_segmentation"
    try:
        with pytest.raises(Cancelled, match="nothing was kept"):
            download_bundle(folder, f"http://127.0.0.1:{server.server_port}/bundle.zip",
                            progress=lambda fraction, message: messages.append(message),
                            cancel=lambda: any("MB so far" in message for message in messages))
        assert not rest_sent.is_set()  # stopped midway, not after the download had ended
    finally:
        release.set()
        server.shutdown()
    arrived = float(next(m for m in messages if "MB so far" in m).split(": ")[1].split(" MB")[0])
    assert 0.1 <= arrived <= round(len(payload) / 2e6, 1)  # at most the half sent (as the message rounds it)
    assert list(folder.parent.iterdir()) == []


def test_the_slicer_panel_downloads_the_whole_body_bundle(tmp_path):
    """*Download* in the panel offers MONAI's whole-body model; the engine's worker downloads and
    imports it in the background and installs it among the user's models, nothing else left there."""
    pytest.importorskip("slicer", reason="the slicer-core package (Slicer's MRML libraries) is not installed")
    from AIReconstructAdapter.engine_run import WARM_ENGINE
    from AIReconstructAdapter.logic import AdapterLogic

    logic = AdapterLogic()
    assert "heart chambers" in logic.downloadableModels()["monai-bundle:wholeBody_ct_segmentation"]
    archive = _zipped(make_bundle(tmp_path / "zoo" / "wholeBody_ct_segmentation", style=WHOLE_BODY_STYLE))
    models, downloads = tmp_path / "models", tmp_path / "downloads"
    try:
        job = logic.startModelDownload("monai-bundle:wholeBody_ct_segmentation", models_folder=models,
                                       downloads_folder=downloads, url=archive.as_uri())
        state = job.wait(timeout=300)
    finally:
        WARM_ENGINE.shutdown()
    assert state.status == "done", state.error
    assert job.model_name == "wholebody_ct_segmentation" and [p.name for p in models.iterdir()] == [job.model_name]
    assert (downloads / "monai-bundles" / "wholeBody_ct_segmentation" / "configs").is_dir()
    assert any("downloading the MONAI bundle wholeBody_ct_segmentation" in line for line in state.log)
    assert load_card(models / job.model_name).labels[1].name == "spleen"


def test_expressions_and_unknown_transforms_are_refused(tmp_path):
    bundle = make_bundle(tmp_path / "expression", network={**NETWORK, "channels": "$[8, 16, 32]"})
    with pytest.raises(ModelCardError, match="is an expression"):
        import_bundle(bundle, tmp_path / "out1")
    bundle = make_bundle(tmp_path / "crop", extra_transform={"_target_": "CropForegroundd", "keys": "image"})
    with pytest.raises(ModelCardError, match="CropForegroundd' is not supported"):
        import_bundle(bundle, tmp_path / "out2")


def test_weights_that_are_not_a_plain_state_dict_are_refused(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    torch.save({"model": {"weight": torch.zeros(1)}, "extra": PickleExploit(str(tmp_path / "PWNED"))},
               bundle / "models" / "model.pt")
    with pytest.raises(WeightsError, match="objects other than weights"):
        import_bundle(bundle, tmp_path / "out")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
