"""nnU-Net v2's own tools, run in a child process: make small nnU-Net model folders from
phantoms (nnU-Net's fingerprint, planner, network classes and checkpoint writer; a few training
iterations) and predict with ``nnUNetPredictor``. Used by the import tests and the benchmark.

    python nnunet_reference.py make-model WORK_FOLDER [--configurations 3d_fullres 2d cascade regions]
                                          [--phantom-spacing X Y Z]
    python nnunet_reference.py make-totalsegmentator-model WORK_FOLDER CT REFERENCE_LABELS LABELS_JSON [--dataset NAME]
    python nnunet_reference.py predict JOBS.json

``make-model`` prints one line per trained model folder, "CONFIGURATION FOLDER" ("cascade" trains
3d_lowres and then 3d_cascade_fullres); ``make-totalsegmentator-model`` prints the model folder
(by default laid out as TotalSegmentator's fast "total" model; ``--dataset`` names another of its
data-set folders, ``DatasetNNN_...``).
``predict`` runs a JSON list of predictions in one process (see ``predict_jobs``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

DATASET = "Dataset042_Phantoms"
REGION_DATASET = "Dataset044_PhantomRegions"
TOTALSEG_DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"


def nnunet_environment(work: Path) -> dict:
    """The environment variables nnU-Net reads at import, pointing into ``work``."""
    return {name: str(work / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


def _plan(work: Path, dataset_id: int, dataset: str, cases: dict, labels: dict, **dataset_fields) -> None:
    """nnU-Net's fingerprint and planner on ``cases`` (name -> (image path, label path));
    ``dataset_fields`` go into dataset.json too (``regions_class_order``)."""
    os.environ.update(nnunet_environment(work))
    os.environ.pop("nnUNet_n_proc_DA", None)  # set by _train; the planner would take 0 as its thread count
    import shutil

    raw = work / "nnUNet_raw" / dataset
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for name, (image, label) in cases.items():
        shutil.copy(image, raw / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copy(label, raw / "labelsTr" / f"{name}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz",
        **dataset_fields}))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([dataset_id])
    names = sorted(cases)
    splits = [{"train": [c for c in names if c != held_out] or names, "val": [held_out]} for held_out in names]
    (work / "nnUNet_preprocessed" / dataset / "splits_final.json").write_text(json.dumps(splits))


def _preprocess(dataset_id: int, configurations) -> None:
    """nnU-Net's preprocessing of ``configurations`` (one worker each)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    preprocess([dataset_id], configurations=tuple(configurations), num_processes=(1,) * len(configurations),
               verbose=False)


def _train(work: Path, dataset: str, configuration: str, folds, trainer_class, iterations: int) -> Path:
    """``iterations`` training iterations per fold of a preprocessed ``configuration`` (0: nnU-Net's
    initial weights); returns the trained model folder."""
    import random

    import numpy as np
    import torch

    preprocessed = work / "nnUNet_preprocessed" / dataset
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    model = work / "nnUNet_results" / dataset / f"{trainer_class.__name__}__nnUNetPlans__{configuration}"
    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process
    for fold in folds:  # the checkpoints are what nnU-Net's trainer writes
        torch.manual_seed(fold)
        np.random.seed(fold)  # nnU-Net's sampling and augmentation (in this process)
        random.seed(fold)
        trainer = trainer_class({**plans, "continue_training": False}, configuration, fold, dataset_json,
                                device=torch.device("cpu"))
        if iterations:
            trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, iterations, 1
            trainer.run_training()
            if trainer.configuration_manager.next_stage_names:  # writes the next stage's input for the held-out case
                trainer.perform_actual_validation(False)
        else:
            trainer.initialize()
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirroring
            (model / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(model / f"fold_{fold}" / "checkpoint_final.pth"))
    (model / "plans.json").write_text(json.dumps(plans, indent=2))
    (model / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return model


def _phantom_cases(folder: Path, spacing, keep_labels: int = 9) -> dict:
    """Three phantom CTs at ``spacing`` (mm, x y z), written to ``folder`` with their 9 labels or only
    the first ``keep_labels``."""
    import numpy as np
    import SimpleITK as sitk
    from AIReconstructLib.io import volume_to_sitk
    from AIReconstructLib.phantom import make_phantom

    cases = {}
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(3):
        phantom = make_phantom(seed, spacing=tuple(spacing), field_of_view_mm=(320.0, 240.0, 300.0))
        image, label = folder / f"image{seed}.nii.gz", folder / f"label{seed}.nii.gz"
        sitk.WriteImage(volume_to_sitk(phantom.image), str(image))
        labels = phantom.labels.with_array(np.where(phantom.labels.array <= keep_labels, phantom.labels.array, 0))
        sitk.WriteImage(volume_to_sitk(labels), str(label))
        cases[f"case{seed:03d}"] = (image, label)
    return cases


PHANTOM_LABELS = {"background": 0, "liver": 1, "liver tumour": 2, "spleen": 3, "right kidney": 4, "left kidney": 5,
                  "aorta": 6, "vertebrae": 7, "pelvis": 8, "lungs": 9}


def _add_cascade_plans(dataset_id: int) -> None:
    """A 3d_lowres -> 3d_cascade_fullres cascade added to the plans. The phantoms are too small for
    nnU-Net's planner to add a low-resolution stage by itself, so it is planned as the planner does
    (its own ``get_plans_for_configuration`` at twice the full-resolution spacing, with the
    ``next_stage``/``previous_stage`` links)."""
    import numpy as np
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    planner = ExperimentPlanner(dataset_id)
    plans = planner.plan_experiment()
    fullres = plans["configurations"]["3d_fullres"]
    shape = np.array(plans["original_median_shape_after_transp"]) / 2
    lowres = planner.get_plans_for_configuration(np.array(fullres["spacing"]) * 2, tuple(int(round(n)) for n in shape),
                                                 planner.generate_data_identifier("3d_lowres"),
                                                 float(np.prod(shape)) * 3, {})
    plans["configurations"]["3d_lowres"] = {**lowres, "batch_dice": False, "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    planner.save_plans(plans)


def make_model(work: Path, configurations=("3d_fullres",), spacing=(5.0, 5.0, 6.0)) -> dict[str, Path]:
    """Models of ``configurations`` planned once on three phantom CTs, mirroring on (nnU-Net's
    defaults), 2 training iterations per fold: 3d_fullres and 2d on two folds; "cascade" trains
    3d_lowres on three folds, so that its validation writes every case's prediction for the second
    stage, then fold 0 of 3d_cascade_fullres; "regions" is ``_make_region_model``'s. Returns
    configuration -> model folder."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    models = {}
    stages = {c for c in configurations if c not in ("cascade", "regions")}
    if "cascade" in configurations:
        stages |= {"3d_lowres", "3d_fullres"}  # the second stage reads 3d_fullres's preprocessed data
    if stages:
        _plan(work, 42, DATASET, _phantom_cases(work / "phantoms", spacing), PHANTOM_LABELS)
        if "cascade" in configurations:
            _add_cascade_plans(42)
        _preprocess(42, sorted(stages))
    for configuration in configurations:
        if configuration == "regions":
            models["regions"] = _make_region_model(work, spacing)
        elif configuration == "cascade":
            models["3d_lowres"] = _train(work, DATASET, "3d_lowres", (0, 1, 2), nnUNetTrainer, iterations=2)
            models["3d_cascade_fullres"] = _train(work, DATASET, "3d_cascade_fullres", (0,), nnUNetTrainer, iterations=2)
        else:
            models[configuration] = _train(work, DATASET, configuration, (0, 1), nnUNetTrainer, iterations=2)
    return models


def _make_region_model(work: Path, spacing) -> Path:
    """A region-based model (sigmoid outputs for overlapping regions, as nnU-Net's BraTS models):
    "liver" (liver and tumour) and "liver tumour", painted in that order; one fold with nnU-Net's
    initial weights (a few iterations leave it predicting one region everywhere or nothing)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    _plan(work, 44, REGION_DATASET, _phantom_cases(work / "region-phantoms", spacing, keep_labels=2),
          {"background": 0, "liver": [1, 2], "liver tumour": [2]}, regions_class_order=[1, 2])
    _preprocess(44, ["3d_fullres"])
    return _train(work, REGION_DATASET, "3d_fullres", (0,), nnUNetTrainer, iterations=0)


def make_totalsegmentator_model(work: Path, ct: Path, reference: Path, label_names: Path,
                                dataset: str = TOTALSEG_DATASET) -> Path:
    """A model folder laid out as one of TotalSegmentator's (by default its fast "total" model:
    Dataset297, one fold, no mirroring, its 117 label names, 3 mm) planned by nnU-Net on a
    RAS-canonical CT and labels for it (``label_names``: value -> name), with nnU-Net's initial
    weights (training 118 classes on two CPU cores would take minutes per iteration)."""
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring)

    names = json.loads(label_names.read_text())
    labels = {"background": 0, **{name: int(value) for value, name in names.items()}}
    dataset_id = int(dataset.split("_")[0].removeprefix("Dataset"))
    _plan(work, dataset_id, dataset, {"ct001": (ct, reference)}, labels)
    _preprocess(dataset_id, ["3d_fullres"])
    return _train(work, dataset, "3d_fullres", (0,), nnUNetTrainerNoMirroring, iterations=0)


@contextlib.contextmanager
def sums_in_float32():
    """nnU-Net's predictor, inside the block, sums its blended window logits, weights and Gaussian in
    float32 instead of float16 (its only change): shows which differences from the engine float16 causes."""
    import torch
    from nnunetv2.inference import predict_from_raw_data as module

    half_gaussian = module.compute_gaussian

    class Float32Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*arguments, dtype=None, **keywords):
            return torch.zeros(*arguments, dtype=torch.float32 if dtype == torch.half else dtype, **keywords)

    def float32_gaussian(*arguments, **keywords):
        return half_gaussian(*arguments, **keywords, dtype=torch.float32)

    float32_gaussian.cache_clear = half_gaussian.cache_clear
    module.torch, module.compute_gaussian = Float32Torch(), float32_gaussian
    try:
        yield
    finally:
        module.torch, module.compute_gaussian = torch, half_gaussian


def predict(model: Path, image: Path, output: Path, folds, mirroring: bool = True,
            previous_stage: Path | None = None, float32_sums: bool = False) -> None:
    """nnU-Net's predictor on a trained model folder, as ``initialize_from_trained_model_folder`` sets it
    up, except that the network comes from nnU-Net's plans builder instead of a search through every
    trainer module (some of which import torchvision, whose PyPI build does not load with the CPU torch
    pinned here). A cascade's second stage reads the first stage's labels for the image from
    ``previous_stage`` (a folder holding a file named as ``output``). ``float32_sums``: see
    ``sums_in_float32``."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((model / "dataset.json").read_text())
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    checkpoints = [torch.load(model / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
                   for fold in folds]
    configuration = plans.get_configuration(checkpoints[0]["init_args"]["configuration"])
    network = get_network_from_plans(
        configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import, determine_num_input_channels(plans, configuration, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads, allow_init=False, deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans, configuration, [c["network_weights"] for c in checkpoints],
                                    dataset_json, checkpoints[0]["trainer_name"],
                                    checkpoints[0]["inference_allowed_mirroring_axes"])
    output.parent.mkdir(parents=True, exist_ok=True)
    with sums_in_float32() if float32_sums else contextlib.nullcontext():
        predictor.predict_from_files_sequential([[str(image)]], [str(output).removesuffix(".nii.gz")],
                                                save_probabilities=False, overwrite=True,
                                                folder_with_segs_from_prev_stage=str(previous_stage) if previous_stage else None)


def predict_jobs(jobs: list[dict]) -> None:
    """``predict`` for each job in turn, in this one process: a job names its "model", "image" and
    "output", and may set "folds" ([0]), "mirroring" (true), "previous_stage" and "float32_sums" (false)."""
    for job in jobs:
        previous_stage = job.get("previous_stage")
        predict(Path(job["model"]), Path(job["image"]), Path(job["output"]), job.get("folds", [0]),
                job.get("mirroring", True), Path(previous_stage) if previous_stage else None,
                job.get("float32_sums", False))


def _arguments():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("make-model")
    model.add_argument("work", type=Path)
    model.add_argument("--configurations", nargs="+", default=["3d_fullres"],
                       choices=["3d_fullres", "2d", "cascade", "regions"])
    model.add_argument("--phantom-spacing", nargs=3, type=float, default=(5.0, 5.0, 6.0))
    totalsegmentator = commands.add_parser("make-totalsegmentator-model")
    for name in ("work", "ct", "reference", "label_names"):
        totalsegmentator.add_argument(name, type=Path)
    totalsegmentator.add_argument("--dataset", default=TOTALSEG_DATASET)
    commands.add_parser("predict").add_argument("jobs", type=Path, help="a JSON list of jobs (see predict_jobs)")
    return parser.parse_args()


def _save_time_on_small_data_sets() -> None:
    """Time savers for data sets of a few small phantoms: nnU-Net's worker pools (fingerprint,
    preprocessing, validation export, listing the files) have one worker each, forked from this
    process instead of spawned as a fresh interpreter that imports torch and nnU-Net again; its
    fingerprint draws its intensity statistics from 10^6 samples of the foreground (with
    replacement) instead of 10^8, more than the phantoms' foreground voxels either way; its trainer
    draws no progress plot."""
    import multiprocessing

    os.environ["nnUNet_def_n_proc"] = "1"  # read when nnU-Net is first imported, below
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.utilities import utils

    extractor_init = DatasetFingerprintExtractor.__init__

    def fewer_samples(self, *arguments, **keywords):
        extractor_init(self, *arguments, **keywords)
        self.num_foreground_voxels_for_intensitystats = 1e6

    DatasetFingerprintExtractor.__init__ = fewer_samples

    get_context = multiprocessing.get_context
    multiprocessing.get_context = lambda method=None: get_context("fork" if method == "spawn" else method)
    utils.Pool = lambda processes=None, **keywords: get_context("fork").Pool(1, **keywords)
    MetaLogger.plot_progress_png = lambda self, output_folder: None


if __name__ == "__main__":
    arguments = _arguments()
    if arguments.command == "predict":
        predict_jobs(json.loads(arguments.jobs.read_text()))
    else:
        _save_time_on_small_data_sets()
        if arguments.command == "make-model":
            for configuration, folder in make_model(arguments.work, arguments.configurations,
                                                    arguments.phantom_spacing).items():
                print(configuration, folder)
        else:
            print(make_totalsegmentator_model(arguments.work, arguments.ct, arguments.reference, arguments.label_names,
                                              arguments.dataset))
