"""``aireconstruct train``: fit a segmentation network on a data set and write its model card.

Dice + cross-entropy on class-balanced, augmented patches, AdamW with a poly learning rate,
sliding-window validation every N epochs keeping the best weights, a checkpoint every epoch
(``--resume`` continues an interrupted run), optional adversarial refinement, and data-parallel
training under ``torchrun``. Each epoch is seeded from the run's seed, so a resumed run draws the
same patches as an uninterrupted one. Each epoch's figures go to ``training_log.csv`` and, where
the ``tensorboard`` package is installed, to TensorBoard (``tensorboard/`` in the output folder).

``aireconstruct finetune`` is the same loop started from a trained model (``base_model``): its
channels, spacing, patch size, labels and weights are kept, the encoder can be frozen, and the new
card is the next version of the base model; the base model's own validation Dice is the score to
beat, so a fine-tuned model never ships weights that validate worse than those it started from.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from .adversarial import AdversarialRefinement
from .dataset import read_dataset
from .distributed import Distributed
from .errors import Cancelled, InputError
from .metrics import overlap_scores
from .modelcard import CARD_FILE, ModelCard, find_model
from .networks import (DEFAULT_ARGUMENTS, ENCODER_PARAMETERS, build_network, check_patch_size, default_patch_size,
                       freeze_encoder, load_network)
from .predict import Predictor
from .training_data import (PatchSampler, channel_normalisation, check_label_values, label_entries, load_case,
                            make_folds, median_spacing, rehearsal_cases)
from .training_outputs import (CHECKPOINT_FILE, WEIGHTS_FILE, check_output_free, load_checkpoint, log_figures,
                               save_checkpoint, tensorboard_writer, write_card, write_weights)


@dataclass
class TrainConfig:
    """Everything a training run needs; recorded in the model card."""

    dataset: str
    output: str
    name: str
    title: str = ""
    architecture: str = "UNet"
    architecture_args: dict | None = None  # default: networks.DEFAULT_ARGUMENTS of the architecture
    patch_size: list | None = None  # i, j, k; default from the data set's median shape
    spacing: list | None = None  # i, j, k mm; default: the data set's median spacing
    fast_spacing: list | None = None
    epochs: int = 40
    iterations_per_epoch: int = 50
    batch_size: int = 2
    learning_rate: float = 2e-3
    validate_every: int = 5
    validation_fraction: float = 0.2  # with folds < 2: the share of cases held out (0: none; the last weights are kept)
    folds: int = 0  # >= 2: k-fold cross-validation splits, training on fold ``fold``
    fold: int = 0
    seed: int = 0
    device: str = "auto"
    time_limit_minutes: float | None = None
    resume: bool = False
    overwrite: bool = False  # replace a model (or an interrupted run) already in the output folder
    adversarial: bool = False
    adversarial_weight: float = 0.01
    adversarial_warmup_epochs: int = 5
    mirror_axes: list = ()  # array axes (0 z, 1 y, 2 x) to mirror in augmentation and test-time augmentation
    normalisation: str = "foreground"  # channels other than CT: training_data.MRI_NORMALISATIONS
    skull_stripped: bool = False  # channels other than CT are skull-stripped brains (checked here, then at inference)
    cache: str | None = None  # folder keeping the cases on the model grid for later runs (training_data.load_case)
    labels_file: str | None = None  # model-card label entries (names, colours, codes) for the data set's values
    intended_use: str = "Research use only; not for clinical use"
    licence: str = "Apache-2.0"
    base_model: str | None = None  # fine-tune this model (name or card path) instead of training from scratch
    freeze_encoder: bool = False  # with base_model: train only the decoder
    rehearse: str | None = None  # with base_model: folder of earlier scans, labelled by the base model itself
    rehearsal_share: float = 0.5  # the share of training patches drawn from those scans


def train(config: TrainConfig, progress=None, cancel=None) -> Path:
    """Train as ``config`` says; writes ``card.json``, weights and a CSV log; returns the card path."""
    distributed = Distributed(config.device)
    try:
        return _train(config, distributed, progress or (lambda fraction, message: None), cancel)
    finally:
        distributed.close()


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(config: TrainConfig, distributed: Distributed, progress, cancel) -> Path:
    start = time.time()
    _seed(config.seed)
    output = Path(config.output)
    check_output_free(output, config.overwrite, config.resume)
    dataset = read_dataset(config.dataset)
    base = _fine_tuning_base(config, dataset) if config.base_model else None
    if base is not None:
        spacing, channel_specs, labels = list(base.spacing()), base.channels, base.data["labels"]
    else:
        spacing = config.spacing or median_spacing(dataset)
        channel_specs = channel_normalisation(dataset, config.normalisation, config.skull_stripped)
        labels = label_entries(dataset, config.labels_file)
    num_classes = max(entry["value"] for entry in labels) + 1

    splits = make_folds([c.case_id for c in dataset.cases], config.folds, config.validation_fraction, config.seed)
    if not 0 <= config.fold < len(splits):
        raise InputError(f"Fold {config.fold} does not exist; there are {len(splits)} fold(s)")
    split = splits[config.fold]
    by_id = {case.case_id: case for case in dataset.cases}
    train_ids = split["train"] or split["validation"]
    train_cases = [load_case(by_id[c], channel_specs, spacing, config.cache) for c in train_ids]
    val_cases = [load_case(by_id[c], channel_specs, spacing, config.cache) for c in split["validation"]]
    check_label_values(train_ids + split["validation"], train_cases + val_cases, num_classes)
    if config.patch_size is None:
        median_zyx = np.median([image.shape[1:] for image, _ in train_cases], axis=0)
        config.patch_size = default_patch_size(median_zyx[::-1], config.architecture)
    patch_zyx = tuple(config.patch_size[::-1])
    sampler = PatchSampler(train_cases, patch_zyx, num_classes, config.mirror_axes)

    if config.architecture_args is None:
        config.architecture_args = DEFAULT_ARGUMENTS.get(config.architecture, {})
    device = distributed.device
    network = build_network({"name": config.architecture, "args": config.architecture_args},
                            len(channel_specs), num_classes)
    check_patch_size(network, config.architecture, len(channel_specs), patch_zyx)
    output.mkdir(parents=True, exist_ok=True)  # once cases and network are known good: nothing left behind
    if distributed.is_main:
        (output / "splits.json").write_text(json.dumps({"fold": config.fold, "folds": splits}, indent=2),
                                            encoding="utf-8")
    rehearsal = None
    if base is not None:
        network.load_state_dict(load_network(base).state_dict())
        if config.rehearse:
            if not 0 < config.rehearsal_share < 1:
                raise InputError(f"The rehearsal share must be between 0 and 1, not {config.rehearsal_share}")
            rehearsal = PatchSampler(rehearsal_cases(config.rehearse, network, channel_specs, spacing, patch_zyx, device),
                                     patch_zyx, num_classes, config.mirror_axes)
        if config.freeze_encoder:
            freeze_encoder(network, config.architecture)
    elif config.rehearse:
        raise InputError("Rehearsal scans are for fine-tuning (they are labelled by the model being fine-tuned)")
    network = network.to(device).train()
    model = distributed.wrap(network)
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=1e-5)
    loss_fn = segmentation_loss(config.architecture_args)
    amp = device.type == "cuda"  # mixed precision on GPUs
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    adversarial = AdversarialRefinement(len(channel_specs), num_classes, device, config.adversarial_weight,
                                        config.adversarial_warmup_epochs,
                                        average_gradients=distributed.average_gradients) \
        if config.adversarial else None

    state = {"epoch": 0, "step": 0, "best_dice": -1.0, "best_epoch": 0, "history": []}
    if config.resume and (output / CHECKPOINT_FILE).is_file():
        state = load_checkpoint(output / CHECKPOINT_FILE, network, optimiser, adversarial, device)
    elif base is not None and distributed.is_main:  # the base model's score is the one to beat
        base_dice = validation_dice(network, val_cases, patch_zyx, device, num_classes) if val_cases else None
        state["base_dice"] = state["best_dice"] = mean_dice(base_dice) if base_dice is not None else -1.0
        write_weights(network, output / WEIGHTS_FILE)
    total_steps = config.epochs * config.iterations_per_epoch
    board = tensorboard_writer(output, state["epoch"] + 1) if distributed.is_main else None
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        epoch_seed = config.seed * 100_003 + epoch * 101 + distributed.rank
        _seed(epoch_seed)
        if rehearsal is not None:
            rehearsal.reseed(epoch_seed + 1)
        sampler.reseed(epoch_seed, distributed.share_of(len(train_cases), epoch, config.seed))
        losses, adversarial_losses, discriminator_losses = [], [], []
        refining = adversarial is not None and adversarial.active(epoch)
        for _ in range(config.iterations_per_epoch):
            if cancel is not None and cancel():
                raise Cancelled("Training cancelled by the user; the last checkpoint can be resumed")
            images, targets = _training_batch(sampler, rehearsal, config, device)
            for group in optimiser.param_groups:
                group["lr"] = config.learning_rate * (1 - state["step"] / total_steps) ** 0.9
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast("cuda", enabled=amp):
                logits = model(images)
                loss = loss_fn(logits, targets)
                logits = main_output(logits)
                if refining:
                    adversarial_loss = adversarial.segmenter_loss(images, logits)
                    adversarial_losses.append(adversarial_loss.item())
                    loss = loss + adversarial_loss
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            logits = logits.float()
            if refining:
                discriminator_losses.append(adversarial.discriminator_step(images, targets, logits))
            losses.append(loss.item())
            state["step"] += 1

        out_of_time = distributed.agree(
            config.time_limit_minutes is not None and time.time() - start > 60 * config.time_limit_minutes)
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"],
               "seconds": round(time.time() - start, 1), "val_mean_dice": ""}
        if adversarial is not None:
            row["adversarial_loss"] = float(np.mean(adversarial_losses)) if adversarial_losses else ""
            row["discriminator_loss"] = float(np.mean(discriminator_losses)) if discriminator_losses else ""
        if distributed.is_main:
            last = epoch == config.epochs or out_of_time
            if val_cases and (epoch % config.validate_every == 0 or last):
                dice = validation_dice(network, val_cases, patch_zyx, device, num_classes)
                row["val_mean_dice"] = mean_dice(dice)
                row.update({f"dice_{value}": round(d, 4) for value, d in dice.items()})
                if row["val_mean_dice"] > state["best_dice"]:
                    state["best_dice"], state["best_epoch"] = row["val_mean_dice"], epoch
                    write_weights(network, output / WEIGHTS_FILE)
            elif not val_cases:
                state["best_epoch"] = epoch
                write_weights(network, output / WEIGHTS_FILE)
            state["history"].append(row)
            state["epoch"] = epoch
            log_figures(state["history"], output / "training_log.csv", board, "epoch")
            save_checkpoint(output / CHECKPOINT_FILE, network, optimiser, adversarial, state)
        distributed.barrier()
        progress(epoch / config.epochs, f"epoch {epoch}/{config.epochs} loss {row['loss']:.4f} "
                                        f"val Dice {row['val_mean_dice'] or '-'}")
        if out_of_time:
            break

    if board is not None:
        board.close()
    distributed.check_in_sync(network)
    if not distributed.is_main:
        return output / CARD_FILE
    return write_card(config, output, dataset, channel_specs, labels, spacing, state, distributed.world_size,
                       time.time() - start, split["validation"], base, len(rehearsal.items) if rehearsal else 0)


def _training_batch(sampler: PatchSampler, rehearsal: PatchSampler | None, config: TrainConfig, device):
    """Patches of the training cases, and with rehearsal scans on average ``rehearsal_share`` of
    the batch from those."""
    if rehearsal is None:
        return sampler.batch(config.batch_size, device)
    rehearsed = sum(random.random() < config.rehearsal_share for _ in range(config.batch_size))
    parts = [source.batch(count, device) for source, count in ((sampler, config.batch_size - rehearsed),
                                                                (rehearsal, rehearsed)) if count]
    return torch.cat([images for images, _ in parts]), torch.cat([targets for _, targets in parts])


def segmentation_loss(architecture_args: dict | None, batch: bool = True):
    """Dice + cross-entropy (``batch``: Dice over the whole batch, else a mean of per-case terms);
    for networks with deep supervision (DynUNet's ``deep_supervision``), summed over the output
    heads with weights halving from the full-resolution head down (nnU-Net's scheme)."""
    loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch)
    if not (architecture_args or {}).get("deep_supervision"):
        return loss
    deep = DeepSupervisionLoss(loss, weight_mode="exp")

    def weighted(heads: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # normalised to one head's scale
        return deep(list(torch.unbind(heads, dim=1)), targets) / sum(deep.get_weights(heads.shape[1]))

    return weighted


def main_output(logits: torch.Tensor) -> torch.Tensor:
    """The full-resolution head of a deeply supervised network's training output ``[B, heads, C, ...]``
    (its evaluation output is that head alone), or the logits themselves."""
    return logits[:, 0] if logits.ndim == 6 else logits


def _fine_tuning_base(config: TrainConfig, dataset) -> ModelCard:
    """The model to fine-tune, after checking that the data set is made for its channels and labels;
    the configuration takes the base model's architecture, patch size and mirroring."""
    base = find_model(config.base_model)
    architecture = base.data["architecture"]
    if len(base.weight_paths) != 1 or base.weight_paths[0].suffix != ".safetensors" \
            or base.data.get("orientation", "LPS") != "LPS":
        raise InputError(f"Model '{base.name}' was not trained by aireconstruct (one safetensors weights file); "
                         "only such models can be fine-tuned")
    if len(dataset.channel_names) != len(base.channels):
        raise InputError(f"{dataset.folder.name} has {len(dataset.channel_names)} image channel(s); model "
                         f"'{base.name}' takes {len(base.channels)}")
    names = {entry["value"]: entry["name"].lower() for entry in base.data["labels"]}
    for entry in dataset.label_entries:
        if names.get(entry["value"]) != entry["name"].lower():
            raise InputError(f"Label {entry['value']} '{entry['name']}' of {dataset.folder.name} is not label "
                             f"{entry['value']} of model '{base.name}' ({names.get(entry['value'], 'absent')})")
    if config.freeze_encoder and architecture["name"] not in ENCODER_PARAMETERS:
        raise InputError(f"The encoder of '{architecture['name']}' cannot be frozen; fine-tune without --freeze-encoder")
    config.architecture, config.architecture_args = architecture["name"], architecture.get("args", {})
    config.patch_size = list(base.data["patch_size"])
    config.mirror_axes = list(base.inference.get("mirror_axes", []))
    return base


def mean_dice(dice: dict[int, float]) -> float:
    """The mean over labels of :func:`validation_dice` (0 when no label was present)."""
    return float(np.mean(list(dice.values()))) if dice else 0.0


def validation_dice(network, cases, patch_zyx, device, num_classes) -> dict[int, float]:
    """Mean Dice per label over validation cases (image, labels on the model grid), by sliding window."""
    predictor = Predictor(network, patch_zyx, overlap=0.25, device=device, backend="torch")  # weights change
    per_label: dict[int, list[float]] = {value: [] for value in range(1, num_classes)}
    for image, labels in cases:
        prediction = predictor(image).argmax(0).numpy()
        reference = labels[0].numpy()
        for value in per_label:
            if (reference == value).any():
                per_label[value].append(overlap_scores(prediction == value, reference == value)["dice"])
    network.train()
    return {value: float(np.mean(scores)) for value, scores in per_label.items() if scores}
