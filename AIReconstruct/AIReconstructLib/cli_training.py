"""The ``aireconstruct`` commands that make models: phantoms, train, finetune, federated, the
architecture benchmark and train-guided (added to the parser of :mod:`cli`)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .cli import number
from .errors import AIReconstructError

if TYPE_CHECKING:
    from .cli import Reporter


def cmd_train_guided(args, reporter: Reporter) -> None:
    from .guided import train_guided
    from .modelcard import find_model

    card = train_guided(args.dataset, find_model(args.base), args.output, args.minutes, args.cases, args.seed,
                        radius_mm=args.radius, start_segments=args.start_segments, spacing=args.spacing,
                        patch_size=args.patch_size, progress=reporter.progress, overwrite=args.overwrite)
    reporter.result(f"wrote {card}", {"outputs": [str(card)]})


def cmd_phantoms(args, reporter: Reporter) -> None:
    from .dataset import write_phantom_dataset

    dataset = write_phantom_dataset(args.output, args.count, args.first_seed, args.spacing, args.tumour_hu)
    reporter.result(f"wrote {len(dataset.cases)} phantoms to {dataset.folder}", {"cases": len(dataset.cases)})


def config_from_arguments(args):
    """The training configuration the ``train`` command's arguments describe."""
    from .training import TrainConfig

    config = TrainConfig(
        dataset=args.dataset, output=args.output, name=args.name, title=args.title or "",
        spacing=args.spacing, fast_spacing=args.fast_spacing, patch_size=args.patch_size, epochs=args.epochs,
        iterations_per_epoch=args.iterations, batch_size=args.batch_size, learning_rate=args.learning_rate,
        validate_every=args.validate_every, seed=args.seed, device=args.device,
        time_limit_minutes=args.time_limit, intended_use=args.intended_use, labels_file=args.labels,
        licence=args.licence, architecture=args.architecture, folds=args.folds, fold=args.fold,
        validation_fraction=args.validation_fraction, resume=args.resume, overwrite=args.overwrite,
        adversarial=args.adversarial, adversarial_weight=args.adversarial_weight,
        adversarial_warmup_epochs=args.adversarial_warmup, mirror_axes=args.mirror_axes, cache=args.cache,
        normalisation=args.normalisation, skull_stripped=args.skull_stripped,
    )
    config.architecture_args = architecture_arguments(args)
    return config


def architecture_arguments(args) -> dict | None:
    """The ``--architecture-args`` JSON of a training command, if given."""
    if not args.architecture_args:
        return None
    try:
        return json.loads(args.architecture_args)
    except json.JSONDecodeError as error:
        raise AIReconstructError(f"--architecture-args is not valid JSON ({error})") from None


def cmd_train(args, reporter: Reporter) -> None:
    from .training import train

    card_path = train(config_from_arguments(args), reporter.progress, reporter.cancel_requested)
    reporter.result(f"wrote {card_path}", {"card": str(card_path)})


def cmd_finetune(args, reporter: Reporter) -> None:
    from .modelcard import find_model
    from .training import TrainConfig, train

    base = find_model(args.model)
    config = TrainConfig(
        dataset=args.dataset, output=args.output, name=args.name or base.name, base_model=args.model,
        freeze_encoder=args.freeze_encoder, rehearse=args.rehearse, rehearsal_share=args.rehearsal_share,
        epochs=args.epochs, iterations_per_epoch=args.iterations,
        batch_size=args.batch_size, learning_rate=args.learning_rate, validate_every=args.validate_every,
        seed=args.seed, device=args.device, time_limit_minutes=args.time_limit, resume=args.resume,
        overwrite=args.overwrite)
    card_path = train(config, reporter.progress, reporter.cancel_requested)
    lineage = json.loads(card_path.read_text(encoding="utf-8"))["training"]["fine_tuned_from"]
    reporter.result(f"wrote {card_path} (validation Dice {lineage['validation_mean_dice']} before fine-tuning)",
                    {"card": str(card_path), "fine_tuned_from": lineage})


def cmd_federated(args, reporter: Reporter) -> None:
    from .federated import FederatedConfig, simulate

    config = FederatedConfig(
        sites=args.sites, output=args.output, name=args.name, title=args.title or "", strategy=args.strategy,
        proximal_mu=args.proximal_mu, rounds=args.rounds, local_iterations=args.local_iterations,
        batch_size=args.batch_size, learning_rate=args.learning_rate, architecture=args.architecture,
        architecture_args=architecture_arguments(args), spacing=args.spacing, patch_size=args.patch_size,
        mirror_axes=args.mirror_axes, validation=args.validation, validate_every=args.validate_every,
        dp_noise_multiplier=args.dp_noise_multiplier, dp_max_grad_norm=args.dp_max_grad_norm, dp_delta=args.dp_delta,
        seed=args.seed, device=args.device, intended_use=args.intended_use, licence=args.licence)
    card_path = simulate(config, reporter.progress, overwrite=args.overwrite)
    training = json.loads(card_path.read_text(encoding="utf-8"))["training"]
    reporter.result(f"wrote {card_path} (validation Dice {training['validation_mean_dice']})",
                    {"card": str(card_path), "validation_mean_dice": training["validation_mean_dice"]})


def cmd_benchmark(args, reporter: Reporter) -> None:
    from .benchmark import BenchmarkConfig, run_benchmark

    config = BenchmarkConfig(
        dataset=args.dataset, output=args.output, architectures=args.architectures,
        adversarial_variants=[False] if args.no_adversarial else [False, True], folds=args.folds, epochs=args.epochs,
        iterations=args.iterations, batch_size=args.batch_size, seed=args.seed, device=args.device,
        extra_train_arguments=args.train_arguments,
    )
    table = run_benchmark(config, reporter.progress, reporter.cancel_requested)
    reporter.result(table.read_text(encoding="utf-8"), {"table": str(table)})


def _add_schedule_options(p, epochs: int, iterations: int, learning_rate: float, validate_every: int) -> None:
    """The training loop's options that train and finetune share, with each command's defaults."""
    p.add_argument("--epochs", type=number(int, above=0), default=epochs)
    p.add_argument("--iterations", type=number(int, above=0), default=iterations, help="iterations per epoch")
    p.add_argument("--batch-size", type=number(int, above=0), default=2)
    p.add_argument("--learning-rate", type=number(above=0), default=learning_rate)
    p.add_argument("--validate-every", type=number(int, above=0), default=validate_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--time-limit", type=number(above=0), help="stop after this many minutes")


def add_training_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aireconstruct`` subparsers."""
    p = sub.add_parser("train-guided", parents=[common],
                       help="train a guided model (image + include/exclude points + current segment) for refine --guided")
    p.add_argument("dataset", help="a labelled data set folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--base", required=True, help="the model to start from: its channels, spacing, patch size, architecture and weights")
    p.add_argument("-o", "--output", required=True, help="the guided model's folder")
    p.add_argument("--minutes", type=number(above=0), default=20.0, help="training time")
    p.add_argument("--cases", nargs="+", help="train on these case ids only (leave test cases out)")
    p.add_argument("--start-segments", metavar="FOLDER",
                   help="each training case's segment to correct (CASE.nii.gz: a model's result on it from a model "
                        "that never saw it, e.g. cross-validation folds); half the patches correct these")
    p.add_argument("--spacing", type=number(above=0), nargs=3, help="the guided model's spacing i j k (mm); default the base's")
    p.add_argument("--patch-size", type=number(int, above=0), nargs=3, help="its patch size i j k (voxels); default the base's")
    p.add_argument("--radius", type=number(above=0), default=3.0, help="radius of the balls that draw the points, mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    p.set_defaults(func=cmd_train_guided)

    p = sub.add_parser("phantoms", parents=[common], help="write synthetic CT phantoms as a data set")
    p.add_argument("output")
    p.add_argument("--count", type=number(int, above=0), default=24)
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--spacing", type=number(above=0), nargs=3, help="voxel size i j k in mm (default: each seed its own)")
    p.add_argument("--tumour-hu", type=number(), default=45.0,
                   help="liver tumour attenuation (45: hypodense as the demo model learnt; 170: enhancing, a new kind)")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("train", parents=[common], help="train a model on a data set (nnU-Net layout)")
    p.add_argument("dataset")
    p.add_argument("-o", "--output", required=True, help="model folder to write (card + weights)")
    p.add_argument("--name", required=True)
    p.add_argument("--title")
    p.add_argument("--spacing", type=number(above=0), nargs=3, help="target spacing i j k (mm)")
    p.add_argument("--fast-spacing", type=number(above=0), nargs=3, help="coarser spacing for --fast")
    p.add_argument("--patch-size", type=number(int, above=0), nargs=3, help="patch size i j k (voxels)")
    _add_schedule_options(p, epochs=40, iterations=50, learning_rate=2e-3, validate_every=5)
    p.add_argument("--intended-use", default="Research use only; not for clinical use")
    p.add_argument("--licence", default="Apache-2.0", help="licence of the trained model (and its data's terms)")
    p.add_argument("--labels", help="JSON list of card label entries (names, colours, SNOMED CT codes)")
    p.add_argument("--architecture", default="UNet", help="UNet, DynUNet, BasicUNetPlusPlus, VNet, SegResNet, SwinUNETR")
    p.add_argument("--architecture-args", help="the architecture's arguments as JSON (default: networks.DEFAULT_ARGUMENTS)")
    p.add_argument("--cache", metavar="FOLDER", help="keep every case resampled and normalised in this folder and reuse "
                                                     "it in later runs (other folds, other networks)")
    p.add_argument("--folds", type=number(int, at_least=0), default=0, help="k-fold cross-validation splits (0: one split)")
    p.add_argument("--fold", type=number(int, at_least=0), default=0, help="which fold to train")
    p.add_argument("--validation-fraction", type=number(at_least=0, below=1), default=0.2,
                   help="with --folds 0: the share of cases held out for validation (0: train on every case and "
                        "keep the last weights, nnU-Net's fold 'all')")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    p.add_argument("--adversarial", action="store_true", help="add adversarial refinement (a discriminator)")
    p.add_argument("--adversarial-weight", type=number(at_least=0), default=0.01)
    p.add_argument("--adversarial-warmup", type=number(int, at_least=0), default=5, help="epochs before the adversarial loss starts")
    p.add_argument("--mirror-axes", type=int, nargs="*", default=[], choices=[0, 1, 2],
                   help="array axes (0 slices, 1 rows, 2 columns) to mirror in augmentation and --tta; "
                        "none for anatomy with left/right labels")
    p.add_argument("--normalisation", default="foreground",
                   help="channels other than CT are z-scored inside the body, whatever value the image holds outside "
                        "it (foreground), or inside their non-zero voxels (nonzero: nnU-Net's and MONAI's rule)")
    p.add_argument("--skull-stripped", action="store_true",
                   help="the data set's MR images are skull-stripped brains: each case is checked, and the model "
                        "refuses images that are not")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", parents=[common],
                       help="fine-tune a model on corrected cases (a data set saved for training)")
    p.add_argument("model", help="installed model name or path of a model card")
    p.add_argument("dataset", help="data set folder in the nnU-Net layout, made for the model's labels")
    p.add_argument("-o", "--output", required=True, help="folder for the new model version (card + weights)")
    p.add_argument("--name", help="name of the new model (default: the base model's; its version goes up)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder")
    p.add_argument("--rehearse", metavar="FOLDER", help="earlier scans (image files, no labels needed) the model "
                   "already segments well: rehearsed with its own segmentations so that it does not forget them")
    p.add_argument("--rehearsal-share", type=number(above=0, below=1), default=0.5, help="share of training patches from those scans")
    _add_schedule_options(p, epochs=6, iterations=10, learning_rate=1e-3, validate_every=1)
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("federated", parents=[common],
                       help="federated training simulated on this machine: one site per data set folder (Flower)")
    p.add_argument("sites", nargs="+", help="one data set folder (nnU-Net layout) per site")
    p.add_argument("-o", "--output", required=True, help="model folder to write (card + weights)")
    p.add_argument("--name", required=True)
    p.add_argument("--title")
    p.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg")
    p.add_argument("--proximal-mu", type=number(at_least=0), default=0.01, help="FedProx's proximal term weight")
    p.add_argument("--rounds", type=number(int, above=0), default=10)
    p.add_argument("--local-iterations", type=number(int, above=0), default=20, help="training steps per site and round")
    p.add_argument("--batch-size", type=number(int, above=0), default=2)
    p.add_argument("--learning-rate", type=number(above=0), default=2e-3)
    p.add_argument("--architecture", default="UNet")
    p.add_argument("--architecture-args", help="the architecture's arguments as JSON (default: networks.DEFAULT_ARGUMENTS)")
    p.add_argument("--spacing", type=number(above=0), nargs=3, help="target spacing i j k (mm); default from the sites")
    p.add_argument("--patch-size", type=number(int, above=0), nargs=3, help="patch size i j k (voxels); default from the sites")
    p.add_argument("--mirror-axes", type=int, nargs="*", default=[], choices=[0, 1, 2])
    p.add_argument("--dp-noise-multiplier", type=number(above=0),
                   help="differential privacy: DP-SGD at every site with this noise multiplier (Opacus)")
    p.add_argument("--dp-max-grad-norm", type=number(above=0), default=1.0, help="DP-SGD's per-patient gradient clipping")
    p.add_argument("--dp-delta", type=number(above=0, below=1), default=1e-5, help="the delta of the reported (epsilon, delta)")
    p.add_argument("--validation", help="data set the server scores the global model on (simulation only)")
    p.add_argument("--validate-every", type=number(int, above=0), default=1, help="rounds between scorings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--intended-use", default="Research use only; not for clinical use")
    p.add_argument("--licence", default="Apache-2.0")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    p.set_defaults(func=cmd_federated)

    p = sub.add_parser("benchmark", parents=[common],
                       help="compare architectures with and without adversarial refinement by cross-validation")
    p.add_argument("dataset")
    p.add_argument("-o", "--output", required=True, help="folder for the models, cases.csv, table.md, dice.png")
    p.add_argument("--architectures", nargs="+", default=["UNet", "SegResNet"])
    p.add_argument("--no-adversarial", action="store_true", help="compare architectures only")
    p.add_argument("--folds", type=number(int, at_least=2), default=3)
    p.add_argument("--epochs", type=number(int, above=0), default=20)
    p.add_argument("--iterations", type=number(int, above=0), default=50)
    p.add_argument("--batch-size", type=number(int, above=0), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train-arguments", nargs=argparse.REMAINDER, default=[],
                   help="passed to every 'train' run (put last), e.g. --spacing 2 2 2 --patch-size 96 96 64")
    p.set_defaults(func=cmd_benchmark)
