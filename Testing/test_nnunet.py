"""Models trained with nnU-Net v2: import to a card, safe checkpoint loading, and the same labels as
nnU-Net's own ``nnUNetPredictor`` on the same model folder and image.

The model folders are made by nnU-Net itself (``nnunet_reference.py``: its fingerprint, planner,
preprocessing, trainer and checkpoint writer, a few training iterations per fold on phantoms at
8 x 8 x 9 mm, coarse enough that its networks are small).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AIReconstructLib import nnunet, nnunet_import
from AIReconstructLib.cli import main
from AIReconstructLib.errors import InputError, ModelCardError, WeightsError
from AIReconstructLib.io import read_volume, volume_to_sitk
from AIReconstructLib.modelcard import load_card, save_card, verified_weight_paths
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.pipeline import SegmentOptions, segment
from conftest import PickleExploit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                                reason="nnunetv2 is not installed (pip install -e '.[test]' installs it)")

REFERENCE = Path(__file__).with_name("nnunet_reference.py")
PHANTOM_SPACING = ("--phantom-spacing", "8", "8", "9")
LABELS = ["liver", "liver tumour", "spleen", "right kidney", "left kidney", "aorta", "vertebrae", "pelvis", "lungs"]


def _reference(*arguments) -> list[str]:
    """``nnunet_reference.py`` run with ``arguments``: the lines it printed."""
    done = subprocess.run([sys.executable, str(REFERENCE), *map(str, arguments)], capture_output=True, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def _predict_with_nnunet(jobs: list[dict], folder: Path) -> None:
    """nnUNetPredictor's predictions (``nnunet_reference.predict_jobs``), all in one child process
    (the list of jobs is written to ``folder``)."""
    jobs_file = folder / "nnunet-jobs.json"
    jobs_file.write_text(json.dumps(jobs, default=str))
    _reference("predict", jobs_file)


@pytest.fixture(scope="module")
def nnunet_models(tmp_path_factory) -> dict[str, Path]:
    """Configuration -> model folder: 3d_fullres and 2d (two folds each), 3d_lowres and 3d_cascade_fullres
    planned once on the same phantoms, and a region-based model, made in one child process."""
    lines = _reference("make-model", tmp_path_factory.mktemp("nnunet"), "--configurations", "3d_fullres", "2d",
                       "cascade", "regions", *PHANTOM_SPACING)
    configurations = {"3d_fullres", "2d", "3d_lowres", "3d_cascade_fullres", "regions"}
    return {words[0]: Path(words[1]) for words in (line.split(" ", 1) for line in lines) if words[0] in configurations}


@pytest.fixture(scope="module")
def case_image(tmp_path_factory) -> Path:
    """The phantom CT the agreement tests segment: a spacing unlike the plans' (resampling both
    ways) and two windows per fold along x."""
    phantom = make_phantom(11, spacing=(4.0, 4.5, 5.0), field_of_view_mm=(400.0, 240.0, 300.0))
    image_path = tmp_path_factory.mktemp("case") / "case_0000.nii.gz"
    sitk.WriteImage(volume_to_sitk(phantom.image), str(image_path))
    return image_path


@pytest.fixture(scope="module")
def nnunet_labels(nnunet_models, case_image, tmp_path_factory) -> dict[str, np.ndarray]:
    """nnUNetPredictor's labels for ``case_image``: each model with nnU-Net's defaults (both folds
    of 3d_fullres and 2d; the cascade's second stage given its first stage's labels), and
    3d_fullres again summing in float32 ("3d_fullres float32")."""
    folder = tmp_path_factory.mktemp("nnunet-labels")
    runs = {"3d_fullres": {"folds": [0, 1]}, "3d_fullres float32": {"folds": [0, 1], "float32_sums": True},
            "2d": {"folds": [0, 1]}, "3d_lowres": {},
            "3d_cascade_fullres": {"previous_stage": folder / "3d_lowres"}, "regions": {}}
    jobs = [{"model": nnunet_models[name.split()[0]], "image": case_image, "output": folder / name / "case.nii.gz", **run}
            for name, run in runs.items()]
    _predict_with_nnunet(jobs, folder)
    return {name: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name / "case.nii.gz"))) for name in runs}


@pytest.fixture(scope="module")
def nnunet_model(nnunet_models) -> Path:
    return nnunet_models["3d_fullres"]


@pytest.fixture(scope="module")
def imported(nnunet_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imported")
    assert main(["import-model", "nnunet", str(nnunet_model), "-o", str(folder)]) == 0
    return folder


def test_import_writes_a_card_from_the_plans(nnunet_model, imported):
    card = load_card(imported)
    plans = json.loads((nnunet_model / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert [label.name for label in card.labels] == LABELS and [label.value for label in card.labels] == list(range(1, 10))
    assert card.spacing() == tuple(reversed(plans["spacing"])) and card.patch_size == tuple(reversed(plans["patch_size"]))
    assert card.inference["mirror_axes"] == [0, 1, 2] and card.data["modality"] == "CT"
    assert card.channels[0]["normalisation"]["scheme"] == "ct"
    assert [path.parent.name for path in verified_weight_paths(card)] == ["fold_0", "fold_1"]
    assert all(Path(entry["file"]).is_absolute() for entry in card.data["weights"])  # outside the card's folder


def test_card_inside_the_model_folder_records_relative_paths(nnunet_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(nnunet_model, copy)
    assert main(["import-model", "nnunet", str(copy), "-o", str(copy), "--folds", "0"]) == 0
    moved = tmp_path / "moved"
    copy.rename(moved)
    card = load_card(moved)
    assert card.data["weights"][0]["file"] == "fold_0/checkpoint_final.pth" and verified_weight_paths(card)


def test_same_labels_as_nnunet_predictor(nnunet_labels, case_image, imported, record_property):
    """Same folds, mirroring, step and Gaussian as nnU-Net. nnU-Net sums the blended logits in float16:
    where every window covering a voxel gives it a Gaussian weight below float16's normal range (the
    outer few voxels of the image) its sum is off by up to 0.5 (tested against a direct forward pass
    in the engine's own tests), so against nnU-Net as it is the interior is where the two must agree
    to 99.9 %; against nnU-Net summing in float32 (its only change), the whole image."""
    theirs, theirs_in_float32 = nnunet_labels["3d_fullres"], nnunet_labels["3d_fullres float32"]
    ours = segment([read_volume(case_image)], load_card(imported),
                   SegmentOptions(device="cpu", tta=True, postprocess=False)).labelmap.array
    assert ours.shape == theirs.shape
    equal = ours == theirs
    interior = equal[4:-4, 4:-4, 4:-4]
    equal_in_float32 = float(np.mean(ours == theirs_in_float32))
    record_property("voxel agreement with nnUNetPredictor", float(equal.mean()))
    record_property("voxel agreement 4+ voxels inside the border", float(interior.mean()))
    record_property("voxel agreement with nnUNetPredictor summing in float32", equal_in_float32)
    print(f"voxel agreement with nnUNetPredictor: {equal.mean():.5f} overall, {interior.mean():.5f} inside; "
          f"{equal_in_float32:.5f} with its sums in float32")
    assert interior.mean() >= 0.999 and equal.mean() >= 0.99
    assert equal_in_float32 >= 0.999
    assert len(np.unique(ours)) > 3  # a real prediction, not one label everywhere


def test_2d_configuration_same_labels_as_nnunet_predictor(nnunet_models, nnunet_labels, case_image, tmp_path,
                                                         record_property):
    """nnU-Net's 2d configuration (slice by slice along the first transposed axis, in-plane
    resampling only, 2D windows and mirroring) gives nnUNetPredictor's labels."""
    nnunet_2d_model = nnunet_models["2d"]
    assert main(["import-model", "nnunet", str(nnunet_2d_model), "-o", str(tmp_path / "card")]) == 0
    card = load_card(tmp_path / "card")
    plans = json.loads((nnunet_2d_model / "plans.json").read_text())["configurations"]["2d"]
    assert card.patch_size == (*reversed(plans["patch_size"]), 1) and card.inference["mirror_axes"] == [1, 2]
    theirs = nnunet_labels["2d"]
    ours = segment([read_volume(case_image)], card, SegmentOptions(device="cpu", tta=True, postprocess=False)).labelmap.array
    equal = ours == theirs
    record_property("2d voxel agreement with nnUNetPredictor", float(equal.mean()))
    print(f"2d voxel agreement with nnUNetPredictor: {equal.mean():.5f} overall, {equal[4:-4, 4:-4, 4:-4].mean():.5f} inside")
    assert equal[4:-4, 4:-4, 4:-4].mean() >= 0.999 and equal.mean() >= 0.99
    assert len(np.unique(ours)) > 3


def test_cascade_same_labels_as_nnunet_predictor(nnunet_models, nnunet_labels, case_image, tmp_path, monkeypatch,
                                                 record_property):
    """A 3d_lowres -> 3d_cascade_fullres cascade imported from its second stage (the first found
    beside it) runs both stages as nnU-Net does. Each stage on its own gives nnUNetPredictor's labels
    to 99.9 % inside the border; end to end the first stage's few border differences (nnU-Net's
    float16 sums, see above) change the barely trained second stage's input, so the whole cascade
    agrees less (measured 96.1 %)."""
    second = nnunet_models["3d_cascade_fullres"]
    assert main(["import-model", "nnunet", str(second), "-o", str(tmp_path / "card"), "--folds", "0"]) == 0
    card = load_card(tmp_path / "card")
    parts = card.data["architecture"]["args"]["parts"]
    assert [part["configuration"] for part in parts] == ["3d_lowres", "3d_cascade_fullres"]
    assert parts[1]["previous_stage_labels"] == list(range(1, 10))
    theirs_first, theirs = nnunet_labels["3d_lowres"], nnunet_labels["3d_cascade_fullres"]
    options = SegmentOptions(device="cpu", tta=True, postprocess=False)

    stage_labels = []
    predict_stage = nnunet._predict_part

    def keep_stage_labels(*arguments):
        labels, maps = predict_stage(*arguments)
        stage_labels.append(labels)
        return labels, maps

    monkeypatch.setattr(nnunet, "_predict_part", keep_stage_labels)
    ours = segment([read_volume(case_image)], card, options).labelmap.array
    monkeypatch.setattr(nnunet, "_predict_part", lambda channels, card, part, *rest: (
        (theirs_first.astype(np.uint8), {}) if "previous_stage_labels" not in part else predict_stage(channels, card, part, *rest)))
    second_alone = segment([read_volume(case_image)], card, options).labelmap.array

    inside = (slice(4, -4),) * 3
    first_equal, alone_equal, equal = stage_labels[0] == theirs_first, second_alone == theirs, ours == theirs
    record_property("cascade voxel agreement with nnUNetPredictor", float(equal.mean()))
    print(f"cascade: first stage {first_equal[inside].mean():.5f} inside, second stage given nnU-Net's first "
          f"{alone_equal[inside].mean():.5f} inside, end to end {equal.mean():.5f}")
    assert first_equal[inside].mean() >= 0.999 and alone_equal[inside].mean() >= 0.999
    assert equal.mean() >= 0.95 and len(np.unique(ours)) > 3


def test_region_based_model_runs_as_nnunet_predictor_runs_it(nnunet_models, nnunet_labels, case_image, tmp_path):
    """A region-based model (sigmoid outputs for overlapping regions, as nnU-Net's BraTS models: here
    "liver" = liver and tumour, "liver tumour") planned by nnU-Net, with its initial weights (a few
    training iterations leave such a model predicting one region everywhere or nothing): imported
    and run end to end, the labels are nnUNetPredictor's. The export itself is checked against
    nnU-Net's own functions on varied logits in the next test."""
    assert main(["import-model", "nnunet", str(nnunet_models["regions"]), "-o", str(tmp_path / "card")]) == 0
    card = load_card(tmp_path / "card")
    assert [(label.value, label.name) for label in card.labels] == [(1, "liver"), (2, "liver tumour")]
    assert card.data["architecture"]["args"]["region_order"] == [1, 2]
    ours = segment([read_volume(case_image)], card, SegmentOptions(device="cpu", tta=True, postprocess=False)).labelmap.array
    assert np.mean(ours == nnunet_labels["regions"]) >= 0.999
    with pytest.raises(InputError, match="region-based"):
        segment([read_volume(case_image)], card, SegmentOptions(device="cpu", uncertainty=True))


@pytest.mark.parametrize("spacings", [((6.0, 5.0, 5.0), (4.0, 4.5, 5.0)), ((1.0, 1.0, 1.0), (5.0, 1.2, 1.0))],
                         ids=["plain", "coarse axis apart"])
def test_regions_are_painted_as_nnunet_exports_them(spacings):
    """Region logits back to the input grid: nnU-Net's resampling of probabilities, sigmoid and
    regions_class_order (its LabelManager) against the engine's, on smooth random logits."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from scipy import ndimage

    network_spacing, input_spacing = spacings
    rng = np.random.default_rng(0)
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=(12, 20, 24)), 2) * 8 for _ in range(2)]).astype(np.float32)
    shape = [int(round(n * s / t)) for n, s, t in zip(logits.shape[1:], network_spacing, input_spacing)]
    manager = LabelManager({"background": 0, "liver": [1, 2], "liver tumour": [2]}, regions_class_order=[1, 2])
    resampled = resample_data_or_seg_to_shape(logits, shape, network_spacing, input_spacing, is_seg=False,
                                              order=1, order_z=0, force_separate_z=None)
    theirs = manager.convert_probabilities_to_segmentation(manager.apply_inference_nonlin(torch.from_numpy(resampled)))
    separate = nnunet._separate_axis(network_spacing, input_spacing, None)
    assert separate in (None, 0)
    ours = nnunet._painted_regions(torch.from_numpy(logits), shape, separate == 0, [1, 2])
    assert set(np.unique(theirs.numpy())) == {0, 1, 2}
    assert np.mean(ours.numpy() == theirs.numpy()) >= 0.9999


def test_labels_are_resized_as_nnunet_resizes_segmentations():
    """The second stage's input: nnU-Net's (batchgenerators') resize_segmentation, order 1, ties included."""
    from batchgenerators.augmentations.utils import resize_segmentation

    rng = np.random.default_rng(0)
    for shape, new_shape in [((17, 14, 13), (11, 12, 5)), ((6, 11, 6), (12, 22, 12)), ((9, 13, 17), (25, 17, 29))]:
        blocks = rng.integers(-1, 5, [n // 2 + 1 for n in shape])
        labels = np.kron(blocks, np.ones((2, 2, 2), int))[:shape[0], :shape[1], :shape[2]].astype(np.int16)
        np.testing.assert_array_equal(nnunet._resize_labels(labels, new_shape),
                                      resize_segmentation(labels, new_shape, order=1))


def _fake_model_folder(nnunet_model: Path, folder: Path, checkpoint: dict) -> Path:
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(nnunet_model / name, folder / name)
    with open(folder / "fold_0" / "checkpoint_final.pth", "wb") as handle:
        pickle.dump(checkpoint, handle)
    return folder


def test_malicious_checkpoint_is_refused_and_never_run(nnunet_model, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    folder = _fake_model_folder(nnunet_model, tmp_path / "model", {"network_weights": PickleExploit(str(marker))})
    assert main(["import-model", "nnunet", str(folder), "-o", str(tmp_path / "card")]) != 0
    error = capsys.readouterr().err
    assert "refusing to load it" in error and len(error.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "card").exists()


@pytest.mark.parametrize("payload", [np.array([1, 2], dtype=object), {"counter": __import__("collections").Counter()}])
def test_checkpoint_with_other_objects_is_refused(nnunet_model, tmp_path, payload):
    folder = _fake_model_folder(nnunet_model, tmp_path / "model", {"network_weights": {}, "logging": payload})
    with pytest.raises(WeightsError, match="objects other than weights"):
        nnunet.load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")


def test_numpy_numbers_in_the_log_load_but_object_scalars_do_not():
    assert nnunet._numeric_scalar(np.dtype("float64"), np.float64(2.5).tobytes()) == 2.5
    with pytest.raises(pickle.UnpicklingError):
        nnunet._numeric_scalar(np.dtype("O"), b"\0" * 8)


def test_tampered_checkpoint_after_import_is_refused(nnunet_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(nnunet_model, copy)
    assert main(["import-model", "nnunet", str(copy), "-o", str(copy)]) == 0
    checkpoint = torch.load(copy / "fold_1" / "checkpoint_final.pth", weights_only=False)
    torch.save(checkpoint, copy / "fold_1" / "checkpoint_final.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="does not match the SHA-256"):
        verified_weight_paths(load_card(copy))


def test_plans_may_only_name_network_classes(imported):
    args = json.loads((imported / "card.json").read_text())["architecture"]["args"]
    with pytest.raises(ModelCardError, match="outside the known network packages"):
        nnunet.build_network({**args, "network_class": "os.system"}, 1, 10)
    with pytest.raises(ModelCardError, match="outside the known network packages"):
        nnunet.build_network({**args, "network_args": {**args["network_args"], "nonlin": "subprocess.Popen"}}, 1, 10)


def test_old_style_plans_give_the_same_network_as_nnunet_reads_them(nnunet_model):
    os.environ.setdefault("nnUNet_raw", "unused")
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    config = json.loads((nnunet_model / "plans.json").read_text())["configurations"]["3d_fullres"]
    kwargs = config["architecture"]["arch_kwargs"]
    old = {key: value for key, value in config.items() if key != "architecture"}
    old.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=kwargs["features_per_stage"][0],
               unet_max_num_features=kwargs["features_per_stage"][-1], n_conv_per_stage_encoder=kwargs["n_conv_per_stage"],
               n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"], conv_kernel_sizes=kwargs["kernel_sizes"],
               pool_op_kernel_sizes=kwargs["strides"], num_pool_per_axis=[3, 3, 3])
    theirs = ConfigurationManager(json.loads(json.dumps(old))).configuration["architecture"]
    ours = nnunet_import._architecture(json.loads(json.dumps(old)))
    assert ours["network_class"] == theirs["network_class_name"]
    assert json.loads(json.dumps(ours["network_args"])) == json.loads(json.dumps(theirs["arch_kwargs"]))


def test_parts_run_in_turn_with_labels_numbered_on(nnunet_model, imported, tmp_path):
    """Two models combined as TotalSegmentator combines its five "total" parts: the second part's
    labels come after the first's, and where both find something the second wins."""
    first = nnunet_import.import_nnunet(nnunet_model, folds=["0"])
    second = nnunet_import.import_nnunet(nnunet_model, folds=["1"], label_info={name: {"name": f"{name} (part 2)"}
                                                                         for name in LABELS})
    save_card(nnunet_import.combine_parts([first, second], "two-parts", "Two parts"), tmp_path / "combined")
    combined = load_card(tmp_path / "combined")
    assert [label.value for label in combined.labels] == list(range(1, 19))
    assert combined.labels[9].name == "liver (part 2)" and len(combined.weight_paths) == 2

    image = make_phantom(12, spacing=(5.0, 5.0, 6.0), field_of_view_mm=(300.0, 230.0, 280.0)).image
    options = SegmentOptions(device="cpu", postprocess=False)
    merged = segment([image], combined, options).labelmap.array
    separately = []
    for card, folder in ((first, "first"), (second, "second")):
        save_card(card, tmp_path / folder)
        separately.append(segment([image], load_card(tmp_path / folder), options).labelmap.array)
    expected = np.where(separately[1] > 0, separately[1] + 9, separately[0])
    np.testing.assert_array_equal(merged, expected)
    assert (merged > 9).any() and ((merged > 0) & (merged <= 9)).any()


def test_uncertainty_over_the_folds_ensemble(nnunet_model, imported, tmp_path):
    """Every fold's mirrored copies are the members, so the labels are the ensemble's and, the
    entropy being concave, the map is nowhere below the mean of the folds' own maps (and above it
    where the folds differ)."""
    image = make_phantom(12, spacing=(5.0, 5.0, 6.0), field_of_view_mm=(300.0, 230.0, 280.0)).image
    one_mirror = {"overlap": 0.5, "mirror_axes": [2]}  # 2 copies per fold, to keep the test short
    card = load_card(imported)
    card = type(card)(dict(card.data, inference=one_mirror), card.folder)
    plain = segment([image], card, SegmentOptions(device="cpu", tta=True, postprocess=False))
    result = segment([image], card, SegmentOptions(device="cpu", uncertainty=True, postprocess=False))
    assert np.mean(result.labelmap.array == plain.labelmap.array) > 0.9999
    uncertainty = result.uncertainty.array
    assert result.uncertainty.same_grid(image) and 0 <= uncertainty.min() and uncertainty.max() <= 1
    assert 0 <= result.probability.array.min() and result.probability.array.max() <= 1
    assert result.confidence and all(0 <= c["member_dice"] <= 1 for c in result.confidence.values())

    folds = []
    for fold in ("0", "1"):
        save_card(dict(nnunet_import.import_nnunet(nnunet_model, folds=[fold]), inference=one_mirror), tmp_path / fold)
        folds.append(segment([image], load_card(tmp_path / fold),
                             SegmentOptions(device="cpu", uncertainty=True, postprocess=False)).uncertainty.array)
    mean_of_folds = (folds[0] + folds[1]) / 2
    assert (uncertainty >= mean_of_folds - 1e-4).all() and (uncertainty > mean_of_folds + 1e-3).mean() > 0.1

    first = nnunet_import.import_nnunet(nnunet_model, folds=["0"])
    second = nnunet_import.import_nnunet(nnunet_model, folds=["1"], label_info={name: {"name": f"{name} (part 2)"}
                                                                         for name in LABELS})
    save_card(nnunet_import.combine_parts([first, second], "two-parts", "Two parts"), tmp_path / "combined")
    with pytest.raises(InputError, match="not available for models combined from several nnU-Net models"):
        segment([image], load_card(tmp_path / "combined"), SegmentOptions(device="cpu", uncertainty=True))
