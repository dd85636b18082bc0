"""What a training run writes into its output folder: the figures of every epoch (or federated
round) as CSV and, where the ``tensorboard`` package is installed, for TensorBoard; the weights;
the resumable checkpoint; and the model card. Used by ``train``/``finetune`` and ``federated``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .errors import InputError, OutputError
from .io import atomic_path, write_csv
from .modelcard import CARD_FILE, ModelCard, save_card, sha256_of, version_key
from .networks import save_weights

WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"


def tensorboard_writer(output: Path, first_step: int = 0):
    """A TensorBoard writer into ``output/tensorboard``, or None without the ``tensorboard`` package;
    events an interrupted run wrote for ``first_step`` and later are dropped (a resumed run writes
    them again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"), purge_step=first_step)


def log_figures(history: list[dict], csv_path: Path, board, step: str) -> None:
    """The run's figures so far to ``csv_path`` and its last row to TensorBoard (``board``, if any);
    ``step`` names the column that numbers the rows (epoch, round)."""
    write_csv(csv_path, history)
    if board is not None:
        row = history[-1]
        for name, value in row.items():
            if name != step and value != "":
                board.add_scalar(name, value, row[step])
        board.flush()


def write_weights(network, path: Path) -> None:
    """A network's weights as safetensors, written atomically."""
    with atomic_path(path) as tmp:
        save_weights(network, tmp)


def check_output_free(output: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to train into a folder that holds a model or an interrupted run's checkpoint, unless
    ``overwrite``, or ``resume`` and there is a checkpoint to continue: a repeated command must not
    replace a model trained for hours."""
    resumable = (Path(output) / CHECKPOINT_FILE).is_file()
    if not (overwrite or (resume and resumable)) and (resumable or (Path(output) / CARD_FILE).is_file()):
        raise OutputError(f"{output} already holds a model or an interrupted run: "
                          + ("--resume continues it, " if resumable else "")
                          + "--overwrite replaces it, another output folder keeps it")


def save_checkpoint(path: Path, network, optimiser, adversarial, state: dict) -> None:
    """A run's weights, optimiser and progress (and the discriminator's, with adversarial refinement)."""
    checkpoint = {"network": network.state_dict(), "optimiser": optimiser.state_dict(), **state}
    if adversarial is not None:
        checkpoint["adversarial"] = adversarial.state_dict()
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path, network, optimiser, adversarial, device) -> dict:
    """Restore a run's weights, optimiser and progress (no pickle: tensors and plain values only)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    try:
        network.load_state_dict(checkpoint.pop("network"))
        optimiser.load_state_dict(checkpoint.pop("optimiser"))
    except (RuntimeError, ValueError):
        raise InputError(f"{path} holds another network than this run's (architecture, its arguments, channels or "
                         "labels): it cannot be resumed; train into another folder, or without --resume") from None
    adversarial_state = checkpoint.pop("adversarial", None)
    if adversarial is not None:
        if adversarial_state is None:
            raise InputError(f"{path} was not trained with --adversarial; it cannot be resumed with it")
        adversarial.load_state_dict(adversarial_state)
    return checkpoint


def write_card(config, output, dataset, channel_specs, labels, spacing, state, world_size, seconds,
               held_out: list[str], base: ModelCard | None = None, rehearsal_count: int = 0) -> Path:
    """The card of a finished ``train`` run (or, from ``base``, the base model's next version)."""
    training = {
        "dataset": dataset.folder.name, "cases": len(dataset.cases), "held_out_cases": held_out,
        "best_epoch": state["best_epoch"],
        "validation_mean_dice": round(state["best_dice"], 4) if state["best_dice"] >= 0 else None,
        "epochs_run": state["epoch"], "processes": world_size, "minutes": round(seconds / 60, 1),
        "config": asdict(config),
    }
    card = trained_card(config, output, channel_specs, labels, spacing,
                        f"{config.architecture} trained by aireconstruct train on {dataset.folder.name}", training)
    if base is not None:  # the next version of the base model: its description, use and labels kept
        major, minor = (version_key(base) + (0, 0))[:2]
        card = {**base.data, "name": config.name, "version": f"{major}.{minor + 1}.0",
                "weights": card["weights"], "training": training}
        training["fine_tuned_from"] = {
            "name": base.name, "version": base.data.get("version"), "sha256": base.data["weights"][0]["sha256"],
            "validation_mean_dice": round(state["base_dice"], 4) if state.get("base_dice", -1) >= 0 else None,
            "encoder_frozen": config.freeze_encoder, "rehearsal_scans": rehearsal_count}
    save_card(card, output)
    return output / CARD_FILE


def trained_card(config, output: Path, channel_specs, labels, spacing, description: str, training: dict) -> dict:
    """The model card of weights this project trained (``WEIGHTS_FILE`` in ``output``); ``config`` gives
    the name, title, use, licence, architecture, patch size, mirroring and the optional fast spacing."""
    card = {
        "schema_version": 1,
        "name": config.name,
        "title": config.title or config.name,
        "version": "1.0.0",
        "description": description,
        "intended_use": config.intended_use,
        "licence": config.licence,
        "modality": "CT" if channel_specs[0]["normalisation"]["scheme"] == "ct" else "MR",
        "channels": channel_specs,
        "spacing": [float(s) for s in spacing],
        "patch_size": [int(p) for p in config.patch_size],
        "inference": {"overlap": 0.5, "mirror_axes": sorted(config.mirror_axes)},
        "architecture": {"name": config.architecture, "args": config.architecture_args},
        "labels": [{**entry, "postprocess": entry.get("postprocess", {"keep_largest": False, "min_island_ml": 0.5,
                                                                       "fill_holes": True})} for entry in labels],
        "weights": [{"file": WEIGHTS_FILE, "sha256": sha256_of(output / WEIGHTS_FILE)}],
        "training": training,
    }
    if config.fast_spacing:
        card["fast_spacing"] = [float(s) for s in config.fast_spacing]
    return card
