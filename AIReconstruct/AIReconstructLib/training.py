"""``aireconstruct train``: fit a segmentation network on a data set and write its model card.

First version: one device, Dice + cross-entropy, class-balanced patch sampling, MONAI
augmentation, poly learning rate, sliding-window validation and the best checkpoint kept.
Spacing and intensity normalisation come from the data set's fingerprint, as nnU-Net does.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandCropByLabelClassesd,
                              RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd,
                              RandShiftIntensityd, SpatialPadd)
from monai.transforms.utils import map_classes_to_indices

from .dataset import Dataset, read_dataset
from .errors import Cancelled, InputError
from .io import atomic_path, read_labelmap, read_volume
from .metrics import overlap_scores
from .modelcard import CARD_FILE, sha256_of, validate_card
from .networks import build_network, save_weights
from .predict import Predictor, choose_device
from .preprocess import prepare, resampled_shape, to_canonical

WEIGHTS_FILE = "model.safetensors"


@dataclass
class TrainConfig:
    """Everything a training run needs; recorded in the model card."""

    dataset: str
    output: str
    name: str
    title: str = ""
    architecture: str = "UNet"
    architecture_args: dict = field(default_factory=lambda: {
        "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 1})
    patch_size: list | None = None  # i, j, k; default from the data set's median shape
    spacing: list | None = None  # i, j, k mm; default: the data set's median spacing
    fast_spacing: list | None = None
    epochs: int = 40
    iterations_per_epoch: int = 50
    batch_size: int = 2
    learning_rate: float = 2e-3
    validate_every: int = 5
    validation_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    time_limit_minutes: float | None = None
    labels_file: str | None = None  # model-card label entries (names, colours, codes) for the data set's values
    intended_use: str = "Research use only; not for clinical use"
    licence: str = "Apache-2.0"


def _normalisation(dataset: Dataset) -> list[dict]:
    """Per-channel normalisation from the data set's intensities (nnU-Net's CT scheme for CT)."""
    specs = []
    for index, channel in enumerate(dataset.channel_names):
        if channel.upper() != "CT":
            specs.append({"name": channel, "normalisation": {"scheme": "zscore_nonzero"}})
            continue
        samples = []
        rng = np.random.default_rng(0)
        for case in dataset.cases:
            image = read_volume(case.images[index]).array
            labels = read_labelmap(case.label).array
            foreground = image[labels > 0]
            samples.append(rng.choice(foreground, size=min(20000, foreground.size), replace=False))
        values = np.concatenate(samples).astype(np.float64)
        low, high = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, low, high)
        specs.append({"name": channel, "normalisation": {
            "scheme": "ct", "clip": [float(low), float(high)], "mean": float(clipped.mean()), "std": float(clipped.std())}})
    return specs


def _label_entries(dataset: Dataset, labels_file: str | None) -> list[dict]:
    """The data set's labels, or those of ``labels_file`` (which must give the same values)."""
    if labels_file is None:
        return dataset.label_entries
    entries = json.loads(Path(labels_file).read_text(encoding="utf-8"))
    if sorted(e["value"] for e in entries) != sorted(e["value"] for e in dataset.label_entries):
        raise InputError(f"{labels_file} does not give the same label values as {dataset.folder.name}/dataset.json")
    return entries


def _median_spacing(dataset: Dataset) -> list[float]:
    spacings = [read_volume(case.images[0]).spacing for case in dataset.cases]
    return [float(v) for v in np.median(np.array(spacings), axis=0)]


def _load_case(case, channel_specs, spacing):
    """A case on the model grid: image ``[C, z, y, x]`` float32 and labels ``[1, z, y, x]``."""
    channels = [read_volume(path) for path in case.images]
    prepared = prepare(channels, channel_specs, spacing)
    labels = read_labelmap(case.label, like=channels[0])
    canonical = torch.from_numpy(np.ascontiguousarray(to_canonical(labels.array, prepared.reorientation)))
    shape = tuple(prepared.tensor.shape[1:])
    labels_resampled = F.interpolate(canonical[None, None].float(), size=shape, mode="nearest-exact")[0]
    return prepared.tensor, labels_resampled


def _augmentation(patch_zyx, num_classes: int) -> Compose:
    keys = ["image", "label"]
    return Compose([
        SpatialPadd(keys, spatial_size=patch_zyx, mode="constant"),
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=patch_zyx, num_classes=num_classes,
                                num_samples=1, indices_key="indices", allow_smaller=True),
        RandAffined(keys, prob=0.4, rotate_range=(0.26, 0.15, 0.15), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        RandGaussianSmoothd("image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandShiftIntensityd("image", offsets=0.1, prob=0.15),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.15),
    ])


def _validate(network, cases, patch_zyx, device, num_classes) -> dict[int, float]:
    predictor = Predictor(network, patch_zyx, overlap=0.25, device=device)
    per_label: dict[int, list[float]] = {value: [] for value in range(1, num_classes)}
    for image, labels in cases:
        prediction = predictor(image).argmax(0).numpy()
        reference = labels[0].numpy()
        for value in per_label:
            if (reference == value).any():
                per_label[value].append(overlap_scores(prediction == value, reference == value)["dice"])
    network.train()
    return {value: float(np.mean(scores)) for value, scores in per_label.items() if scores}


def _poly_lr(base: float, step: int, total: int) -> float:
    return base * (1 - step / total) ** 0.9


def train(config: TrainConfig, progress=None, cancel=None) -> Path:
    """Train as ``config`` says; writes ``card.json``, weights and a CSV log; returns the card path."""
    start = time.time()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    dataset = read_dataset(config.dataset)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    spacing = config.spacing or _median_spacing(dataset)
    channel_specs = _normalisation(dataset)
    label_entries = _label_entries(dataset, config.labels_file)
    num_classes = max(entry["value"] for entry in label_entries) + 1

    loaded = [_load_case(case, channel_specs, spacing) for case in dataset.cases]
    if config.patch_size is None:
        median_zyx = np.median([image.shape[1:] for image, _ in loaded], axis=0)
        config.patch_size = [int(min(128, max(16, 16 * round(n / 16)))) for n in median_zyx[::-1]]
    patch_zyx = tuple(config.patch_size[::-1])

    order = np.random.default_rng(config.seed).permutation(len(loaded))
    n_val = max(1, int(round(config.validation_fraction * len(loaded)))) if len(loaded) > 1 else 0
    val_ids, train_ids = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist()) or sorted(order.tolist())
    splits = {"train": [dataset.cases[i].case_id for i in train_ids],
              "validation": [dataset.cases[i].case_id for i in val_ids]}
    (output / "splits.json").write_text(json.dumps(splits, indent=2), encoding="utf-8")

    train_items = []
    for i in train_ids:
        image, labels = loaded[i]
        indices = map_classes_to_indices(labels, num_classes=num_classes, max_samples_per_class=20000)
        train_items.append({"image": image, "label": labels, "indices": indices})
    val_cases = [loaded[i] for i in val_ids]

    device = choose_device(config.device)
    network = build_network({"name": config.architecture, "args": config.architecture_args},
                            len(channel_specs), num_classes).to(device).train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    augment = _augmentation(patch_zyx, num_classes)
    augment.set_random_state(seed=config.seed)

    total_steps = config.epochs * config.iterations_per_epoch
    best_dice, best_epoch, step, history = -1.0, 0, 0, []
    log_path = output / "training_log.csv"
    for epoch in range(1, config.epochs + 1):
        losses = []
        for _ in range(config.iterations_per_epoch):
            if cancel is not None and cancel():
                raise Cancelled("Training cancelled by the user")
            samples = [augment(random.choice(train_items))[0] for _ in range(config.batch_size)]
            images = torch.stack([s["image"].as_tensor() if hasattr(s["image"], "as_tensor") else s["image"] for s in samples]).to(device)
            labels = torch.stack([s["label"].as_tensor() if hasattr(s["label"], "as_tensor") else s["label"] for s in samples]).to(device)
            for group in optimiser.param_groups:
                group["lr"] = _poly_lr(config.learning_rate, step, total_steps)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(network(images), labels)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            step += 1
        out_of_time = config.time_limit_minutes is not None and time.time() - start > 60 * config.time_limit_minutes
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"],
               "seconds": round(time.time() - start, 1), "val_mean_dice": ""}
        if val_cases and (epoch % config.validate_every == 0 or epoch == config.epochs or out_of_time):
            dice = _validate(network, val_cases, patch_zyx, device, num_classes)
            row["val_mean_dice"] = float(np.mean(list(dice.values())))
            row.update({f"dice_{value}": round(d, 4) for value, d in dice.items()})
            if row["val_mean_dice"] > best_dice:
                best_dice, best_epoch = row["val_mean_dice"], epoch
                with atomic_path(output / WEIGHTS_FILE) as tmp:
                    save_weights(network, tmp)
        elif not val_cases:
            with atomic_path(output / WEIGHTS_FILE) as tmp:
                save_weights(network, tmp)
        history.append(row)
        _write_log(log_path, history)
        if progress is not None:
            progress(epoch / config.epochs, f"epoch {epoch}/{config.epochs} loss {row['loss']:.4f} "
                                            f"val Dice {row['val_mean_dice'] or '-'}")
        if out_of_time:
            break

    card = {
        "schema_version": 1,
        "name": config.name,
        "title": config.title or config.name,
        "version": "1.0.0",
        "description": f"{config.architecture} trained by aireconstruct train on {dataset.folder.name}",
        "intended_use": config.intended_use,
        "licence": config.licence,
        "modality": "CT" if channel_specs[0]["normalisation"]["scheme"] == "ct" else "MR",
        "channels": channel_specs,
        "spacing": [float(s) for s in spacing],
        "patch_size": [int(p) for p in config.patch_size],
        "inference": {"overlap": 0.5, "mirror_axes": [0, 1, 2]},
        "architecture": {"name": config.architecture, "args": config.architecture_args},
        "labels": [{**entry, "postprocess": entry.get("postprocess", {"keep_largest": False, "min_island_ml": 0.5,
                                                                          "fill_holes": True})} for entry in label_entries],
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_of(output / WEIGHTS_FILE)},
        "training": {
            "dataset": dataset.folder.name, "cases": len(dataset.cases), "best_epoch": best_epoch,
            "validation_mean_dice": round(best_dice, 4) if best_dice >= 0 else None,
            "minutes": round((time.time() - start) / 60, 1), "config": asdict(config),
        },
    }
    if config.fast_spacing:
        card["fast_spacing"] = [float(s) for s in config.fast_spacing]
    validate_card(card, "trained model card")
    with atomic_path(output / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(card, indent=2), encoding="utf-8")
    return output / CARD_FILE


def _write_log(path: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(history)
