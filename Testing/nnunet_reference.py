"""nnU-Net v2's own tools, run in a child process: make a small nnU-Net model folder from
phantoms (nnU-Net's fingerprint, planner, network classes and checkpoint writer; random
weights) and predict with ``nnUNetPredictor``. Used by the import test and the benchmark.

    python nnunet_reference.py make-model WORK_FOLDER
    python nnunet_reference.py make-totalsegmentator-model WORK_FOLDER CT REFERENCE_LABELS LABELS_JSON
    python nnunet_reference.py predict MODEL_FOLDER IMAGE OUTPUT [FOLD ...] [--no-mirroring]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DATASET = "Dataset042_Phantoms"
TOTALSEG_DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"


def nnunet_environment(work: Path) -> dict:
    """The environment variables nnU-Net reads at import, pointing into ``work``."""
    return {name: str(work / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


def _train(work: Path, dataset_id: int, dataset: str, cases: dict, labels: dict, folds, trainer_class,
           iterations: int) -> Path:
    """nnU-Net's fingerprint, planner, preprocessing and ``iterations`` training iterations per fold
    (0: nnU-Net's initial weights) on ``cases`` (name -> (image path, label path)); returns the
    trained model folder."""
    os.environ.update(nnunet_environment(work))
    import shutil

    import torch

    raw = work / "nnUNet_raw" / dataset
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for name, (image, label) in cases.items():
        shutil.copy(image, raw / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copy(label, raw / "labelsTr" / f"{name}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    preprocessed = work / "nnUNet_preprocessed" / dataset
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    names = sorted(cases)
    splits = [{"train": [c for c in names if c != held_out] or names, "val": [held_out]} for held_out in names]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits))
    model = work / "nnUNet_results" / dataset / f"{trainer_class.__name__}__nnUNetPlans__3d_fullres"
    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process
    for fold in folds:  # the checkpoints are what nnU-Net's trainer writes
        torch.manual_seed(fold)
        trainer = trainer_class({**plans, "continue_training": False}, "3d_fullres", fold, dataset_json,
                                device=torch.device("cpu"))
        if iterations:
            trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, iterations, 1
            trainer.run_training()
        else:
            trainer.initialize()
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirroring
            (model / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(model / f"fold_{fold}" / "checkpoint_final.pth"))
    (model / "plans.json").write_text(json.dumps(plans, indent=2))
    (model / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return model


def make_model(work: Path) -> Path:
    """Two folds on three phantom CTs (9 labels), mirroring on: nnU-Net's defaults."""
    import SimpleITK as sitk
    from AIReconstructLib.io import volume_to_sitk
    from AIReconstructLib.phantom import make_phantom
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cases = {}
    (work / "phantoms").mkdir(parents=True, exist_ok=True)
    for seed in range(3):
        phantom = make_phantom(seed, spacing=(5.0, 5.0, 6.0), field_of_view_mm=(320.0, 240.0, 300.0))
        image, label = work / "phantoms" / f"image{seed}.nii.gz", work / "phantoms" / f"label{seed}.nii.gz"
        sitk.WriteImage(volume_to_sitk(phantom.image), str(image))
        sitk.WriteImage(volume_to_sitk(phantom.labels), str(label))
        cases[f"case{seed:03d}"] = (image, label)
    labels = {"background": 0, "liver": 1, "liver tumour": 2, "spleen": 3, "right kidney": 4, "left kidney": 5,
              "aorta": 6, "vertebrae": 7, "pelvis": 8, "lungs": 9}
    return _train(work, 42, DATASET, cases, labels, (0, 1), nnUNetTrainer, iterations=2)


def make_totalsegmentator_model(work: Path, ct: Path, reference: Path, label_names: Path) -> Path:
    """A model folder laid out as TotalSegmentator's fast "total" model (Dataset297, one fold, no
    mirroring, its 117 label names, 3 mm) planned by nnU-Net on a RAS-canonical CT and
    TotalSegmentator's own labels for it, with nnU-Net's initial weights (training 118 classes on
    two CPU cores would take minutes per iteration)."""
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring)

    names = json.loads(label_names.read_text())
    labels = {"background": 0, **{name: int(value) for value, name in names.items()}}
    return _train(work, 297, TOTALSEG_DATASET, {"ct001": (ct, reference)}, labels, (0,), nnUNetTrainerNoMirroring,
                  iterations=0)


def predict(model: Path, image: Path, output: Path, folds, mirroring: bool = True) -> None:
    """nnU-Net's predictor on a trained model folder, as ``initialize_from_trained_model_folder`` sets it
    up, except that the network comes from nnU-Net's plans builder instead of a search through every
    trainer module (some of which import torchvision, whose PyPI build does not load with the CPU torch
    pinned here)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((model / "dataset.json").read_text())
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    checkpoints = [torch.load(model / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
                   for fold in folds]
    configuration = plans.get_configuration(checkpoints[0]["init_args"]["configuration"])
    network = get_network_from_plans(
        configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import, len(dataset_json["channel_names"]),
        plans.get_label_manager(dataset_json).num_segmentation_heads, allow_init=False, deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans, configuration, [c["network_weights"] for c in checkpoints],
                                    dataset_json, checkpoints[0]["trainer_name"],
                                    checkpoints[0]["inference_allowed_mirroring_axes"])
    predictor.predict_from_files_sequential([[str(image)]], [str(output).removesuffix(".nii.gz")],
                                            save_probabilities=False, overwrite=True)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "make-model":
        print(make_model(Path(arguments[0])))
    elif command == "make-totalsegmentator-model":
        print(make_totalsegmentator_model(*map(Path, arguments)))
    else:
        folds = [int(f) for f in arguments[3:] if f != "--no-mirroring"] or [0]
        predict(Path(arguments[0]), Path(arguments[1]), Path(arguments[2]), folds, "--no-mirroring" not in arguments)
