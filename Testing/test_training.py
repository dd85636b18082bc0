"""A short training run on phantoms: the loss falls and the written card loads and segments."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from AIReconstructLib.cli import build_parser, main
from AIReconstructLib.cli_training import config_from_arguments
from AIReconstructLib.errors import Cancelled, InputError
from AIReconstructLib.dataset import read_dataset, write_phantom_dataset
from AIReconstructLib.io import read_labelmap, write_volume
from AIReconstructLib.modelcard import load_card
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.pipeline import SegmentOptions, segment
from AIReconstructLib.training import train
from AIReconstructLib.volume import Volume
from conftest import tensorboard_scalars


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
    assert len(splits["folds"][0]["validation"]) == 1 and len(splits["folds"][0]["train"]) == 2

    card = load_card(tmp_path / "model")
    assert card.data["modality"] == "CT" and card.data["channels"][0]["normalisation"]["scheme"] == "ct"
    assert [label.name for label in card.labels][:2] == ["liver", "liver tumour"]
    assert card.labels[0].terminology["type"] == ["SCT", "10200004", "Liver"]
    phantom = make_phantom(9, spacing=(5.0, 5.0, 6.0))
    result = segment([phantom.image], card, SegmentOptions(device="cpu"))
    assert result.labelmap.same_grid(phantom.image, tolerance=0)
    assert np.any(result.labelmap.array > 0)


TINY = ["--spacing", "8", "8", "8", "--patch-size", "32", "32", "32", "--iterations", "3", "--batch-size", "1",
        "--device", "cpu", "--architecture-args", '{"channels": [4, 8], "strides": [2], "num_res_units": 0}']


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_phantom_dataset(folder, count=3, first_seed=600, spacing=(6.0, 6.0, 8.0))
    return folder


def _log(folder):
    with open(folder / "training_log.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_resume_continues_where_an_interrupted_run_stopped(tmp_path, tiny_dataset):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(tiny_dataset), "-o", str(straight), "--name", "s", "--epochs", "4",
                 "--validate-every", "2", *TINY]) == 0
    arguments = build_parser().parse_args(["train", str(tiny_dataset), "-o", str(resumed), "--name", "r",
                                           "--epochs", "4", "--validate-every", "2", *TINY])
    checks = []
    with pytest.raises(Cancelled):  # interrupted in the third epoch (3 iterations per epoch)
        train(config_from_arguments(arguments), cancel=lambda: checks.append(1) or len(checks) > 7)
    assert [row["epoch"] for row in _log(resumed)] == ["1", "2"]
    assert main(["train", str(tiny_dataset), "-o", str(resumed), "--name", "r", "--epochs", "4",
                 "--validate-every", "2", "--resume", *TINY]) == 0
    rows = _log(resumed)
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    for a, b in zip(_log(straight), rows):  # the same patches and steps: the same losses
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
    assert json.loads((resumed / "card.json").read_text(encoding="utf-8"))["training"]["epochs_run"] == 4

    # TensorBoard has each epoch once, across both runs, with the log's figures
    assert [(event.step, pytest.approx(event.value)) for event in tensorboard_scalars(resumed / "tensorboard", "loss")] \
        == [(int(row["epoch"]), float(row["loss"])) for row in rows]
    assert [event.step for event in tensorboard_scalars(resumed / "tensorboard", "val_mean_dice")] == [2, 4]

    card = (resumed / "card.json").read_text(encoding="utf-8")
    wider = [*TINY[:-1], '{"channels": [8, 16], "strides": [2], "num_res_units": 0}']
    assert main(["train", str(tiny_dataset), "-o", str(resumed), "--name", "r", "--epochs", "5", "--resume",
                 *wider]) == 2  # another network than the checkpoint's: one line, the folder as it was
    assert (resumed / "card.json").read_text(encoding="utf-8") == card
    again = ["train", str(tiny_dataset), "-o", str(resumed), "--name", "r", "--epochs", "1", *TINY]
    assert main(again) == 2  # a model is there: kept, unless asked to replace it
    assert (resumed / "card.json").read_text(encoding="utf-8") == card
    assert main([*again, "--overwrite"]) == 0
    assert json.loads((resumed / "card.json").read_text(encoding="utf-8"))["training"]["epochs_run"] == 1
    (resumed / "checkpoint.pt").unlink()  # a model with nothing to resume: --resume does not replace it
    card = (resumed / "card.json").read_text(encoding="utf-8")
    assert main([*again, "--resume"]) == 2
    assert (resumed / "card.json").read_text(encoding="utf-8") == card


def test_cached_cases_are_read_back_until_a_file_or_the_grid_changes(tmp_path, tiny_dataset, monkeypatch):
    from AIReconstructLib import training_data

    case = read_dataset(tiny_dataset).cases[0]
    specs = [{"name": "CT", "normalisation": {"scheme": "ct", "clip": [-900.0, 900.0], "mean": 0.0, "std": 300.0}}]
    made = []
    on_grid = training_data._case_on_grid
    monkeypatch.setattr(training_data, "_case_on_grid", lambda *arguments: made.append(1) or on_grid(*arguments))
    cache = tmp_path / "cache"
    first = training_data.load_case(case, specs, [8, 8, 8], cache)
    again = training_data.load_case(case, specs, [8, 8, 8], cache)
    assert len(made) == 1 and [p.suffix for p in cache.iterdir()] == [".safetensors"]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and again[1].shape[0] == 1

    training_data.load_case(case, specs, [6, 6, 6], cache)  # another grid
    later = os.stat(case.images[0]).st_mtime_ns + 10**9
    os.utime(case.images[0], ns=(later, later))  # the image written again
    training_data.load_case(case, specs, [8, 8, 8], cache)
    assert len(made) == 3 and len(list(cache.iterdir())) == 3
    newest = max(cache.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"not safetensors")  # a damaged cache file is made again
    assert torch.equal(training_data.load_case(case, specs, [8, 8, 8], cache)[0], first[0]) and len(made) == 4

    (tmp_path / "a file").write_text("not a folder")
    with pytest.raises(InputError, match="Cannot keep the cases in the cache folder"):
        training_data.load_case(case, specs, [8, 8, 8], tmp_path / "a file")


def test_a_data_set_with_a_corrupt_image_stops_training_before_anything_is_written(tmp_path, tiny_dataset, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    image = sorted((data / "imagesTr").iterdir())[-1]
    image.write_bytes(image.read_bytes()[:200])  # cut short
    assert main(["train", str(data), "-o", str(tmp_path / "model"), "--name", "m", "--epochs", "1", "--spacing", "8", "8",
                 "8", "--device", "cpu"]) != 0
    assert image.name.split(".")[0] in capsys.readouterr().err and not (tmp_path / "model").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda labels: labels[:-1], "does not match its image's grid"),
    (lambda labels: np.where(labels == labels.max(), 99, labels), "holds the value 99, which the data set's labels do not"),
])
def test_a_label_map_that_does_not_fit_stops_training_before_anything_is_written(tmp_path, tiny_dataset, capsys,
                                                                                 damage, message):
    """A label map on another grid than its image, or with a value dataset.json does not declare:
    one line naming it (they gave an IndexError and a RuntimeError traceback)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    path = sorted((data / "labelsTr").iterdir())[0]
    labels = read_labelmap(path)
    write_volume(Volume(damage(labels.array).astype(np.uint8), labels.spacing, labels.origin, labels.direction), path)
    assert main(["train", str(data), "-o", str(tmp_path / "model"), "--name", "m", "--epochs", "1", "--iterations", "1",
                 "--spacing", "8", "8", "8", "--device", "cpu"]) != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error and not (tmp_path / "model").exists()


def test_adversarial_loss_is_on_only_when_asked(tmp_path, tiny_dataset):
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "plain"), "--name", "p", "--epochs", "2", *TINY]) == 0
    assert "adversarial_loss" not in _log(tmp_path / "plain")[0]
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "gan"), "--name", "g", "--epochs", "3",
                 "--adversarial", "--adversarial-warmup", "1", "--adversarial-weight", "0.1", *TINY]) == 0
    rows = _log(tmp_path / "gan")
    assert rows[0]["adversarial_loss"] == "" and rows[0]["discriminator_loss"] == ""  # warm-up epoch
    assert float(rows[1]["adversarial_loss"]) > 0 and float(rows[2]["discriminator_loss"]) > 0
    card = json.loads((tmp_path / "gan" / "card.json").read_text(encoding="utf-8"))
    assert card["training"]["config"]["adversarial"] is True


def test_k_fold_splits_cover_every_case_once(tmp_path, tiny_dataset):
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "f"), "--name", "f", "--epochs", "1",
                 "--folds", "3", "--fold", "2", "--mirror-axes", "0", "1", *TINY]) == 0
    card = json.loads((tmp_path / "f" / "card.json").read_text(encoding="utf-8"))
    assert card["inference"]["mirror_axes"] == [0, 1]  # test-time mirroring only where training mirrored
    splits = json.loads((tmp_path / "f" / "splits.json").read_text(encoding="utf-8"))
    held_out = [case for fold in splits["folds"] for case in fold["validation"]]
    assert sorted(held_out) == ["phantom_0600", "phantom_0601", "phantom_0602"] and splits["fold"] == 2


def test_a_validation_fraction_of_zero_trains_on_every_case_and_keeps_the_last_weights(tmp_path, tiny_dataset):
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "all"), "--name", "all", "--epochs", "2",
                 "--validation-fraction", "0", *TINY]) == 0
    splits = json.loads((tmp_path / "all" / "splits.json").read_text(encoding="utf-8"))
    assert splits["folds"] == [{"train": ["phantom_0600", "phantom_0601", "phantom_0602"], "validation": []}]
    training = load_card(tmp_path / "all").data["training"]
    assert training["held_out_cases"] == [] and training["validation_mean_dice"] is None
    assert training["best_epoch"] == training["epochs_run"] == 2
    assert all(row["val_mean_dice"] == "" for row in _log(tmp_path / "all"))


def test_two_gloo_processes_under_torchrun_keep_identical_weights(tmp_path, tiny_dataset):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                "-m", "AIReconstructLib"]
    result = subprocess.run(torchrun + ["train", str(tiny_dataset), "-o", str(tmp_path / "ddp"), "--name", "d",
                                        "--epochs", "2", *TINY], capture_output=True, text=True, encoding="utf-8",
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((tmp_path / "ddp" / "card.json").read_text(encoding="utf-8"))
    assert card["training"]["processes"] == 2  # and check_in_sync found the ranks' weights identical


def test_deep_supervision_weighs_every_head_and_the_card_predicts_with_the_main_one(tmp_path, tiny_dataset):
    import torch

    from AIReconstructLib.networks import DEFAULT_ARGUMENTS, build_network
    from AIReconstructLib.training import main_output, segmentation_loss

    args = {"kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2],
            "filters": [4, 8, 16, 32], "deep_supervision": True, "deep_supr_num": 2}
    network = build_network({"name": "DynUNet", "args": args}, 1, 3).train()
    torch.manual_seed(0)
    images, targets = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    heads = network(images)
    assert heads.shape == (2, 3, 3, 32, 32, 32)  # the full-resolution head and two deeper ones
    plain = segmentation_loss(None)
    expected = sum(w * plain(heads[:, n], targets) for n, w in enumerate((1.0, 0.5, 0.25))) / 1.75
    assert torch.isclose(segmentation_loss(args)(heads, targets), expected)
    assert torch.equal(main_output(heads), heads[:, 0]) and network.eval()(images).shape == (2, 3, 32, 32, 32)
    assert DEFAULT_ARGUMENTS["DynUNet"]["deep_supervision"]

    tiny = [a if a != '{"channels": [4, 8], "strides": [2], "num_res_units": 0}' else json.dumps(args) for a in TINY]
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "model"), "--name", "deep", "--epochs", "2",
                 "--architecture", "DynUNet", *tiny]) == 0
    rows = _log(tmp_path / "model")
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    result = segment([make_phantom(9, spacing=(6.0, 6.0, 8.0)).image], load_card(tmp_path / "model"),
                     SegmentOptions(device="cpu"))
    assert result.labelmap.array.shape == (38, 40, 53)


def test_a_labels_file_that_cannot_serve_is_a_one_line_error(tmp_path):
    from AIReconstructLib.training_data import label_entries

    dataset = write_phantom_dataset(tmp_path / "data", count=1, first_seed=500, spacing=(5.0, 5.0, 6.0))
    entries = dataset.label_entries
    (tmp_path / "same.json").write_text(json.dumps(entries), encoding="utf-8")
    assert label_entries(dataset, str(tmp_path / "same.json")) == entries
    (tmp_path / "other.json").write_text(json.dumps(entries[:-1]), encoding="utf-8")
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    (tmp_path / "names.json").write_text(json.dumps([e["name"] for e in entries]), encoding="utf-8")
    for name, message in [("missing.json", "Cannot read the labels file"), ("broken.json", "Cannot read"),
                          ("names.json", "is not a JSON list of label entries"),
                          ("other.json", "does not give the same label values")]:
        with pytest.raises(InputError, match=message):
            label_entries(dataset, str(tmp_path / name))


@pytest.mark.parametrize("meta, message", [
    ("{not json", "Cannot read"),
    (json.dumps(["CT"]), "needs \"channel_names\""),
    (json.dumps({"channel_names": {"0": "FLAIR"}}), "needs \"channel_names\""),
    (json.dumps({"channel_names": {"zero": "FLAIR"}, "labels": {"background": 0, "tumour": 1}}), "numbered 0, 1"),
    (json.dumps({"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "whole tumour": [1, 2, 3]}}),
     "region-based labels are not supported"),
])
def test_a_dataset_json_that_cannot_serve_is_a_one_line_error(tmp_path, meta, message):
    write_phantom_dataset(tmp_path / "data", count=1, first_seed=500, spacing=(5.0, 5.0, 6.0))
    (tmp_path / "data" / "dataset.json").write_text(meta, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_dataset(tmp_path / "data")


def test_mri_cases_stored_with_any_value_outside_the_brain_look_alike_to_the_network(tmp_path):
    """One brain stored twice: raw with 0 outside it, and z-scored inside it with its minimum outside
    it (BraTS 2013's way). Z-scored inside the body, the network sees the same patches of both;
    inside the non-zero voxels (nnU-Net's rule) it does not."""
    from AIReconstructLib.training_data import channel_normalisation, load_case

    z, y, x = np.mgrid[:20, :24, :24]
    brain = ((z - 10) / 8) ** 2 + ((y - 12) / 10) ** 2 + ((x - 12) / 10) ** 2 < 1
    raw = np.where(brain, np.random.default_rng(0).normal(300, 40, brain.shape), 0).astype(np.float32)
    scored = np.where(brain, (raw - raw[brain].mean()) / raw[brain].std(), 0)
    scored[~brain] = scored[brain].min() - 0.5
    tumour = ((z - 10) ** 2 + (y - 12) ** 2 + (x - 14) ** 2 < 9).astype(np.uint8)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case, image in (("raw", raw), ("scored", scored)):
        write_volume(Volume(image.astype(np.float32), (2.0, 2.0, 2.0)), tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        write_volume(Volume(tumour, (2.0, 2.0, 2.0)), tmp_path / "labelsTr" / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR"}, "file_ending": ".nii.gz",
                                                       "labels": {"background": 0, "tumour": 1}}), encoding="utf-8")
    dataset = read_dataset(tmp_path)
    for rule, alike in (("foreground", True), ("nonzero", False)):
        channels = channel_normalisation(dataset, rule)
        assert channels == [{"name": "FLAIR", "normalisation": {"scheme": f"zscore_{rule}"}}]
        first, second = (load_case(case, channels, [2.0, 2.0, 2.0])[0] for case in dataset.cases)
        assert torch.allclose(first, second, atol=1e-4) == alike
    with pytest.raises(InputError, match="Unknown normalisation 'mean' \\(known: foreground, nonzero\\)"):
        channel_normalisation(dataset, "mean")


def test_a_patch_the_network_cannot_take_is_refused_before_anything_is_written(tmp_path, tiny_dataset, capsys):
    code = main(["train", str(tiny_dataset), "-o", str(tmp_path / "model"), "--name", "swin", "--architecture",
                 "SwinUNETR", "--patch-size", "40", "40", "40", "--epochs", "1", "--iterations", "1", "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and len(error.splitlines()) == 1
    assert "SwinUNETR cannot take patches of 40 x 40 x 40 voxels" in error and "multiples of 32" in error
    assert not (tmp_path / "model").exists()


def test_the_default_patch_is_the_cases_extent_rounded_to_what_the_network_divides():
    from AIReconstructLib.networks import default_patch_size

    assert default_patch_size([120, 120, 78], "UNet") == [128, 128, 80]
    assert default_patch_size([120, 120, 78], "SwinUNETR") == [128, 128, 64]
    assert default_patch_size([5, 300, 44], "UNet") == [16, 128, 48]


def test_augmentation_deforms_image_and_labels_alike_and_smoothly():
    from monai.transforms import RandSmoothDeformd

    from AIReconstructLib.training_data import augmentation

    patch = (16, 24, 24)
    elastic = next(t for t in augmentation(patch, 3).transforms if isinstance(t, RandSmoothDeformd))
    elastic.prob = 1.0
    elastic.set_random_state(3)
    x = torch.arange(24.0).expand(*patch)[None]  # the image is the x coordinate: it shows the displacement
    labels = (x // 8).float()  # values 0, 1, 2 in bands along x
    out = elastic({"image": x.clone(), "label": labels.clone()})
    displacement = (out["image"] - x)[0, 2:-2, 2:-2, 2:-2]
    assert 0.1 < float(displacement.abs().mean()) and float(displacement.abs().max()) < 4  # voxels
    assert float((displacement[..., 1:] - displacement[..., :-1]).abs().max()) < 0.5  # smooth
    assert set(out["label"].unique().tolist()) == {0.0, 1.0, 2.0}  # labels moved, never blended
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    agree = (out["label"] == (out["image"] // 8).round())[inner].float().mean()
    assert agree > 0.9  # the labels follow the image


def test_unet_plus_plus_trains_and_segments_like_the_other_networks(tmp_path, tiny_dataset):
    """MONAI's BasicUNetPlusPlus returns a list of outputs; built from a card it answers with a tensor
    (its final output; in training with deep supervision all four, final first), weights named as MONAI's."""
    from monai.networks.nets import BasicUNetPlusPlus

    from AIReconstructLib.networks import build_network, freeze_encoder

    images = torch.randn(2, 1, 32, 32, 32)
    for deep_supervision in (False, True):
        args = {"features": [4, 4, 8, 8, 16, 4], "deep_supervision": deep_supervision}
        network = build_network({"name": "BasicUNetPlusPlus", "args": args}, 1, 3)
        assert list(network.state_dict()) == list(BasicUNetPlusPlus(3, 1, 3, **args).state_dict())
        heads = (4,) if deep_supervision else ()
        assert network.train()(images).shape == (2, *heads, 3, 32, 32, 32)
        network.eval()
        with torch.no_grad():
            assert torch.equal(network(images), BasicUNetPlusPlus.forward(network, images)[-1])
        assert freeze_encoder(network, "BasicUNetPlusPlus") > 0

    tiny = [a if not a.startswith('{"channels"') else json.dumps(args) for a in TINY]
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "model"), "--name", "nested", "--epochs", "2",
                 "--architecture", "BasicUNetPlusPlus", *tiny]) == 0
    result = segment([make_phantom(9, spacing=(6.0, 6.0, 8.0)).image], load_card(tmp_path / "model"),
                     SegmentOptions(device="cpu"))
    assert result.labelmap.array.shape == (38, 40, 53)
