"""Import an nnU-Net v2 trained model folder as a model card: labels and channels from
``dataset.json``; network, spacing, patch size, normalisation, transpose and resampling rules of a
configuration from ``plans.json``; mirroring axes from a checkpoint; every fold's checkpoint with
its SHA-256. A cascade's two stages become one card; several imported models can be combined into
one card that runs them in turn (TotalSegmentator's five-part "total" task). Prediction is in
``nnunet.py``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelCardError
from .modelcard import label_colour, model_name, read_json, sha256_of, validate_card
from .nnunet import ARCHITECTURE_NAME, load_checkpoint

NORMALISATION_SCHEMES = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none"}


def _configuration(plans: dict, name: str) -> dict:
    """A configuration of the plans with its ``inherits_from`` chain resolved."""
    configurations = plans.get("configurations", {})
    chain, seen = {}, []
    while name is not None:
        if name in seen or name not in configurations:
            known = ", ".join(configurations)
            raise ModelCardError(f"Configuration '{name}' is not in the plans (or inherits in a circle); known: {known}")
        seen.append(name)
        chain = {**configurations[name], **chain}
        name = configurations[name].get("inherits_from")
    return chain


def _architecture(configuration: dict) -> dict:
    """Network class and arguments; plans written before nnU-Net 2.4 describe them in older keys."""
    if "architecture" in configuration:
        architecture = configuration["architecture"]
        return {"network_class": architecture["network_class_name"], "network_args": architecture["arch_kwargs"],
                "network_args_to_import": list(architecture.get("_kw_requires_import", []))}
    classes = {"PlainConvUNet": ("dynamic_network_architectures.architectures.unet.PlainConvUNet", "n_conv_per_stage"),
               "ResidualEncoderUNet": ("dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet",
                                       "n_blocks_per_stage")}
    if configuration.get("UNet_class_name") not in classes:
        raise ModelCardError(f"Unknown network '{configuration.get('UNet_class_name')}' in old-style plans")
    network_class, blocks_key = classes[configuration["UNet_class_name"]]
    dims = len(configuration["patch_size"])
    stages = len(configuration["n_conv_per_stage_encoder"])
    base, most = configuration["UNet_base_num_features"], configuration["unet_max_num_features"]
    return {
        "network_class": network_class,
        "network_args": {
            "n_stages": stages, "features_per_stage": [min(base * 2 ** s, most) for s in range(stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": configuration["conv_kernel_sizes"],
            "strides": configuration["pool_op_kernel_sizes"], blocks_key: configuration["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"], "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "network_args_to_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _channel(index: int, name: str, plans: dict, configuration: dict) -> dict:
    scheme = configuration["normalization_schemes"][index]
    if scheme not in NORMALISATION_SCHEMES:
        raise ModelCardError(f"nnU-Net normalisation '{scheme}' of channel '{name}' is not supported "
                             f"(supported: {', '.join(NORMALISATION_SCHEMES)})")
    normalisation = {"scheme": NORMALISATION_SCHEMES[scheme]}
    if scheme == "CTNormalization":
        stats = plans["foreground_intensity_properties_per_channel"][str(index)]
        normalisation.update(clip=[stats["percentile_00_5"], stats["percentile_99_5"]], mean=stats["mean"],
                             std=max(stats["std"], 1e-8))
    elif scheme == "ZScoreNormalization" and configuration["use_mask_for_norm"][index]:
        normalisation["scheme"] = "zscore_nonzero"
    return {"name": name, "normalisation": normalisation}


def _regions(dataset: dict) -> list[tuple[str, int]] | None:
    """A region-based model's regions (name, label painted where the region is found), in the order
    nnU-Net paints them (``regions_class_order``), or None for a model of plain labels."""
    if not any(isinstance(value, list) and len(value) > 1 for value in dataset["labels"].values()):
        return None
    names = [name for name, value in dataset["labels"].items()
             if name != "ignore" and set(value if isinstance(value, list) else [value]) != {0}]
    order = dataset.get("regions_class_order")
    if not isinstance(order, list) or len(order) != len(names):
        raise ModelCardError("A region-based nnU-Net model needs regions_class_order in dataset.json, one label per region")
    return list(zip(names, [int(value) for value in order]))


def _labels(dataset: dict, label_info: dict) -> list[dict]:
    """Card labels: the model's labels, or for a region-based model the label each region paints,
    named after the region (a voxel shows the last region painted over it)."""
    regions = _regions(dataset)
    entries = []
    named = sorted((value, name) for name, value in (regions or dataset["labels"].items())
                   if value > 0 and name != "ignore")
    for index, (value, name) in enumerate(named):
        info = label_info.get(name, {})
        entry = {"value": value, "name": info.get("name", name), "color": info.get("color", label_colour(index))}
        if "terminology" in info:
            entry["terminology"] = info["terminology"]
        entries.append(entry)
    return entries


def _find_checkpoints(folder: Path, folds, checkpoint: str) -> list[Path]:
    if folds is None:
        found = sorted(folder.glob(f"fold_*/{checkpoint}"))
    else:
        found = [folder / f"fold_{fold}" / checkpoint for fold in folds]
        missing = [str(path.relative_to(folder)) for path in found if not path.is_file()]
        if missing:
            raise ModelCardError(f"Missing checkpoint(s) in {folder}: {', '.join(missing)}")
    if not found:
        raise ModelCardError(f"No fold_*/{checkpoint} in {folder}: not a trained nnU-Net model folder")
    return found


def import_nnunet(folder: str | Path, name: str | None = None,
                  configuration: str | None = None, folds=None, checkpoint: str = "checkpoint_final.pth",
                  modality: str | None = None, orientation: str | None = None, label_info: dict | None = None,
                  licence: str = "See the model's source", intended_use: str | None = None,
                  previous_stage: str | Path | None = None) -> dict:
    """A model card for an nnU-Net v2 trained model folder (``dataset.json``, ``plans.json``,
    ``fold_N/checkpoint_*.pth``), with absolute checkpoint paths (:func:`save_card` makes those inside
    the card's folder relative). ``orientation`` (e.g. ``"SAR"``) reorients inputs first, for models
    trained on reoriented images (TotalSegmentator: RAS, i.e. array axes S, A, R). Any configuration:
    2d (slice by slice), 3d_fullres, 3d_lowres, and the second stage of a cascade
    (3d_cascade_fullres), whose first stage is found beside it or in ``previous_stage``."""
    folder = Path(folder).resolve()
    dataset = read_json(folder / "dataset.json", "Not an nnU-Net model folder")
    plans = read_json(folder / "plans.json", "Not an nnU-Net model folder")
    checkpoints = _find_checkpoints(folder, folds, checkpoint)
    first = load_checkpoint(checkpoints[0])
    configuration = configuration or first.get("init_args", {}).get("configuration") \
        or folder.name.rsplit("__", 1)[-1]
    config = _configuration(plans, configuration)
    regions = _regions(dataset)
    planar = len(config["patch_size"]) == 2  # the 2d configuration: slice by slice along the first array axis
    channel_names = [dataset["channel_names"][key] for key in sorted(dataset["channel_names"], key=int)]
    channels = [_channel(i, channel, plans, config) for i, channel in enumerate(channel_names)]
    mirror_axes = first.get("inference_allowed_mirroring_axes") or []
    dataset_name = plans.get("dataset_name", folder.parent.name)
    name = name or model_name(f"{dataset_name}-{configuration}")
    files = [{"file": str(path), "sha256": sha256_of(path)} for path in checkpoints]
    # plans are in array order; a 2d model keeps the image's slice spacing (the median shown on the card)
    spacing = ([plans["original_median_spacing_after_transp"][0]] if planar else []) + config["spacing"]
    patch_size = ([1] if planar else []) + config["patch_size"]
    card = {
        "schema_version": 1, "name": name, "title": f"{dataset_name} ({configuration}, nnU-Net v2)",
        "version": "1.0.0",
        "description": f"Imported from the nnU-Net v2 model folder {folder} ({len(files)} fold(s))",
        "intended_use": intended_use or "Research use; imported nnU-Net model: check the model's own terms",
        "licence": licence,
        "modality": modality or ("CT" if channels[0]["normalisation"]["scheme"] == "ct" else "OTHER"),
        "channels": channels, "spacing": list(reversed([float(s) for s in spacing])),
        "patch_size": list(reversed([int(p) for p in patch_size])),
        "inference": {"overlap": 0.5, "mirror_axes": sorted(int(a) + planar for a in mirror_axes)},
        "architecture": {"name": ARCHITECTURE_NAME, "args": {
            "configuration": configuration, **_architecture(config),
            "transpose_forward": list(plans.get("transpose_forward", [0, 1, 2])),
            "spacing": [float(s) for s in config["spacing"]], "patch_size": [int(p) for p in config["patch_size"]],
            "orientation": orientation,
            **({"region_order": [value for _, value in regions]} if regions else {}),
            "resampling": {"data": config.get("resampling_fn_data_kwargs", {}),
                           "probabilities": config.get("resampling_fn_probabilities_kwargs", {}),
                           "labels": config.get("resampling_fn_seg_kwargs", {})},
        }},
        "labels": _labels(dataset, label_info or {}),
        "weights": files,
    }
    if config.get("previous_stage"):
        first_stage = import_nnunet(previous_stage or _previous_stage_folder(folder, config["previous_stage"]),
                                    name, config["previous_stage"], folds, checkpoint, modality, orientation,
                                    label_info, licence, intended_use)
        card = _cascade(first_stage, card)
    validate_card(card, f"Card imported from {folder}")
    return card


def _previous_stage_folder(folder: Path, previous: str) -> Path:
    """Where nnU-Net keeps the first stage of a cascade: beside the second, named
    ``TRAINER__PLANS__CONFIGURATION`` with the first stage's configuration."""
    trainer_and_plans, separator, _ = folder.name.rpartition("__")
    candidate = folder.parent / f"{trainer_and_plans}{separator}{previous}"
    if not separator or not candidate.is_dir():
        raise ModelCardError(f"'{folder.name}' is the second stage of a cascade; its first stage ('{previous}') "
                             f"was expected in {candidate}: give that folder with --previous-stage")
    return candidate


def _cascade(first: dict, second: dict) -> dict:
    """One card running a cascade: the first stage predicts the labels, which the second stage takes
    as extra input channels (one per foreground label) and replaces with its own prediction."""
    if first["inference"]["mirror_axes"] != second["inference"]["mirror_axes"]:
        raise ModelCardError("The two stages of the cascade were trained with different mirroring; not supported")
    foreground = [label["value"] for label in second["labels"]]
    parts = [{**first["architecture"]["args"], "weights": list(range(len(first["weights"]))), "label_offset": 0,
              "classes": max(foreground) + 1},
             {**second["architecture"]["args"], "weights": list(range(len(first["weights"]), len(first["weights"]) + len(second["weights"]))),
              "label_offset": 0, "classes": max(foreground) + 1, "previous_stage_labels": foreground}]
    return {**second, "weights": first["weights"] + second["weights"],
            "title": second["title"].replace(")", f", after {first['architecture']['args']['configuration']})", 1),
            "description": f"nnU-Net cascade: {first['description']}, then {second['description']}",
            "architecture": {"name": ARCHITECTURE_NAME, "args": {"parts": parts}}}


def combine_parts(cards: list[dict], name: str, title: str) -> dict:
    """One card that runs several imported nnU-Net models in turn on the same image and merges their
    label maps, numbering each part's labels on from the previous part's (TotalSegmentator's "total"
    task: five part models, 117 labels); where parts overlap, the later part wins."""
    labels, weights, parts, offset = [], [], [], 0
    for card in cards:
        highest = max(label["value"] for label in card["labels"])
        labels += [{**label, "value": label["value"] + offset} for label in card["labels"]]
        parts.append({**card["architecture"]["args"], "weights": list(range(len(weights), len(weights) + len(card["weights"]))),
                      "label_offset": offset, "classes": highest + 1})
        weights += card["weights"]
        offset += highest
    combined = {**cards[0], "name": name, "title": title, "labels": labels, "weights": weights,
                "description": f"{len(cards)} nnU-Net models run in turn: " + "; ".join(c["description"] for c in cards),
                "architecture": {"name": ARCHITECTURE_NAME, "args": {"parts": parts}}}
    validate_card(combined, f"Combined card {name}")
    return combined
