"""nnU-Net v2 model folders: import one as a model card, load its checkpoints safely, predict as
nnU-Net's own predictor does (same labels), with less time and memory around the network.

    channels ─► [reorient, only if the card says the model was trained that way] ─► transpose (plans)
             ─► crop to the non-zero box ─► normalise per channel ─► resample to the plans' spacing (cubic)
             ─► Predictor per fold (nnU-Net's windows, Gaussian, mirroring) ─► mean logits over folds
             ─► resample back (linear) + argmax, slab by slab ─► paste into the box ─► transpose back

The card keeps everything prediction needs (network class and arguments, transpose, spacing,
patch size, resampling) so plans.json is read once, at import; the checkpoints are listed with
their SHA-256 and verified at every load.
"""

from __future__ import annotations

import importlib
import pickle
import re
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError, ModelCardError, WeightsError
from .modelcard import (ModelCard, label_colour, model_name, read_json, sha256_of, validate_card,
                        verified_weight_paths)
from .networks import load_pickled_weights
from .predict import CancelCheck, Predictor, ProgressCallback
from .preprocess import from_canonical, normalise, reorientation_of, resample_argmax, to_canonical

ARCHITECTURE_NAME = "nnUNet"
ANISOTROPY_THRESHOLD = 3  # nnU-Net resamples the coarse axis separately beyond this spacing ratio
# classes a plans file may name for the network and its layers (imported by name, nothing else)
IMPORTABLE_PREFIXES = ("dynamic_network_architectures.architectures.", "torch.nn.")
NORMALISATION_SCHEMES = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none"}


# ---- loading checkpoints without unpickling arbitrary objects ---------------------------------------

def _numeric_scalar(dtype, data=None):
    """Stand-in for numpy's scalar constructor in checkpoints: numbers only (an object scalar built
    from raw bytes would be a pointer)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"a numpy scalar of type {dtype!r} is not plain data")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _safe_globals() -> list:
    """The harmless types nnU-Net checkpoints contain beyond tensors and Python containers: numpy
    number scalars in the training log (and their dtypes)."""
    numeric = [np.dtypes.Float16DType, np.dtypes.Float32DType, np.dtypes.Float64DType, np.dtypes.Int32DType,
               np.dtypes.Int64DType, np.dtypes.BoolDType]
    scalars = [(_numeric_scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")]
    return [np.dtype, *numeric, *scalars]


def load_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint, unpickled with ``weights_only=True`` and an explicit allow-list; any
    other object in it is refused before it is built."""
    checkpoint = load_pickled_weights(path, _safe_globals())
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise WeightsError(f"Checkpoint {path.name} is not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


# ---- the network ----------------------------------------------------------------------------------

def _locate(dotted: str):
    """Import a class named in plans, from the allow-listed packages only."""
    if not dotted.startswith(IMPORTABLE_PREFIXES) or not re.fullmatch(r"[A-Za-z0-9_.]+", dotted):
        raise ModelCardError(f"The plans name a class outside the known network packages: '{dotted}'")
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("dynamic_network_architectures"):
            raise ModelCardError("nnU-Net models need the Python package dynamic-network-architectures "
                                 "(pip install 'dynamic-network-architectures>=0.4.4,<0.5'; in Slicer: "
                                 "slicer.util.pip_install)") from None
        raise ModelCardError(f"Class '{dotted}' named in the plans cannot be imported ({error})") from None
    except AttributeError:
        raise ModelCardError(f"Class '{dotted}' named in the plans does not exist") from None


def build_network(args: dict, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The network the plans describe (deep supervision off, as for inference)."""
    kwargs = dict(args["network_args"])
    for key in args.get("network_args_to_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key])
    network_class = _locate(args["network_class"])
    try:
        return network_class(input_channels=in_channels, num_classes=out_channels, deep_supervision=False, **kwargs)
    except (TypeError, ValueError) as error:
        raise ModelCardError(f"The nnU-Net network cannot be built from the card: {error}") from None


# ---- import ---------------------------------------------------------------------------------------

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


def _labels(dataset: dict, label_info: dict) -> list[dict]:
    if "regions_class_order" in dataset or any(not isinstance(v, int) for v in dataset["labels"].values()):
        raise ModelCardError("Region-based nnU-Net models (overlapping labels) are not supported")
    entries = []
    named = sorted((value, name) for name, value in dataset["labels"].items() if value > 0 and name != "ignore")
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
                  licence: str = "See the model's source", intended_use: str | None = None) -> dict:
    """A model card for an nnU-Net v2 trained model folder (``dataset.json``, ``plans.json``,
    ``fold_N/checkpoint_*.pth``), with absolute checkpoint paths (:func:`save_card` makes those inside
    the card's folder relative). ``orientation`` (e.g. ``"SAR"``) reorients inputs first, for models
    trained on reoriented images (TotalSegmentator: RAS, i.e. array axes S, A, R)."""
    folder = Path(folder).resolve()
    dataset = read_json(folder / "dataset.json", "Not an nnU-Net model folder")
    plans = read_json(folder / "plans.json", "Not an nnU-Net model folder")
    checkpoints = _find_checkpoints(folder, folds, checkpoint)
    first = load_checkpoint(checkpoints[0])
    configuration = configuration or first.get("init_args", {}).get("configuration") \
        or folder.name.rsplit("__", 1)[-1]
    config = _configuration(plans, configuration)
    if len(config["patch_size"]) != 3:
        raise ModelCardError(f"Configuration '{configuration}' is {len(config['patch_size'])}D; only 3D "
                             "configurations (3d_fullres, 3d_lowres) are supported")
    channel_names = [dataset["channel_names"][key] for key in sorted(dataset["channel_names"], key=int)]
    channels = [_channel(i, channel, plans, config) for i, channel in enumerate(channel_names)]
    mirror_axes = first.get("inference_allowed_mirroring_axes") or []
    dataset_name = plans.get("dataset_name", folder.parent.name)
    name = name or model_name(f"{dataset_name}-{configuration}")
    files = [{"file": str(path), "sha256": sha256_of(path)} for path in checkpoints]
    spacing_xyz = list(reversed([float(s) for s in config["spacing"]]))  # plans are in array order
    card = {
        "schema_version": 1, "name": name, "title": f"{dataset_name} ({configuration}, nnU-Net v2)",
        "version": "1.0.0",
        "description": f"Imported from the nnU-Net v2 model folder {folder} ({len(files)} fold(s))",
        "intended_use": intended_use or "Research use; imported nnU-Net model: check the model's own terms",
        "licence": licence,
        "modality": modality or ("CT" if channels[0]["normalisation"]["scheme"] == "ct" else "OTHER"),
        "channels": channels, "spacing": spacing_xyz,
        "patch_size": list(reversed([int(p) for p in config["patch_size"]])),
        "inference": {"overlap": 0.5, "mirror_axes": sorted(int(a) for a in mirror_axes)},
        "architecture": {"name": ARCHITECTURE_NAME, "args": {
            "configuration": configuration, **_architecture(config),
            "transpose_forward": list(plans.get("transpose_forward", [0, 1, 2])),
            "spacing": [float(s) for s in config["spacing"]], "patch_size": [int(p) for p in config["patch_size"]],
            "orientation": orientation,
            "resampling": {"data": config.get("resampling_fn_data_kwargs", {}),
                           "probabilities": config.get("resampling_fn_probabilities_kwargs", {})},
        }},
        "labels": _labels(dataset, label_info or {}),
        "weights": files,
    }
    validate_card(card, f"Card imported from {folder}")
    return card


# ---- prediction -----------------------------------------------------------------------------------

def _separate_axis(current, target, force) -> int | None:
    """The coarse axis nnU-Net resamples on its own (nearest along it), or None for plain 3D resampling."""
    if force is False:
        return None

    def coarse(spacing):
        ratio = max(spacing) / np.asarray(spacing)
        return [int(a) for a in np.where(ratio == 1)[0]]

    if force:
        axes = coarse(current)
    elif max(current) / min(current) > ANISOTROPY_THRESHOLD:
        axes = coarse(current)
    elif max(target) / min(target) > ANISOTROPY_THRESHOLD:
        axes = coarse(target)
    else:
        return None
    return axes[0] if len(axes) == 1 else None


def _resize_cubic(image: np.ndarray, shape) -> np.ndarray:
    """Cubic-spline resize over the same field of view, clipped to the input's range (nnU-Net's data
    resampling: scikit-image ``resize(order=3, mode='edge')``, computed with scipy)."""
    zoom = [new / old for new, old in zip(shape, image.shape)]
    out = ndimage.zoom(image.astype(np.float64), zoom, order=3, mode="nearest", grid_mode=True)
    return np.clip(out, image.min(), image.max(), out=out)


def _resample_data(channel: np.ndarray, shape, axis: int | None) -> np.ndarray:
    """One normalised channel to the network's grid (cubic; nearest along a separate coarse axis)."""
    if tuple(channel.shape) == tuple(shape):
        return channel
    if axis is None:
        return _resize_cubic(channel, shape).astype(np.float32)
    moved = np.moveaxis(channel, axis, 0)
    in_plane = [s for a, s in enumerate(shape) if a != axis]
    resized = np.stack([_resize_cubic(plane, in_plane) for plane in moved])
    source = (np.arange(shape[axis]) + 0.5) * (moved.shape[0] / shape[axis]) - 0.5
    index = np.clip(np.floor(source + 0.5).astype(int), 0, moved.shape[0] - 1)
    return np.moveaxis(resized[index], 0, axis).astype(np.float32)


def _nonzero_box(arrays: list[np.ndarray]) -> tuple[tuple[slice, ...], np.ndarray]:
    """The bounding box of the filled non-zero region of all channels, and that region inside it."""
    nonzero = np.zeros(arrays[0].shape, bool)
    for array in arrays:
        nonzero |= array != 0
    body = ndimage.binary_fill_holes(nonzero)
    if not body.any():
        raise InputError("The image is zero everywhere; there is nothing to segment")
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(body))
    return box, body[box]


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


def predict_labels(channels, card: ModelCard, options, progress: ProgressCallback | None = None,
                   cancel: CancelCheck | None = None):
    """The label map ``[k, j, i]`` of an imported nnU-Net model (or of several, see
    :func:`combine_parts`) on the input's grid, and stage times (``options``: the pipeline's
    SegmentOptions: device, tta, cpu_bfloat16)."""
    args = card.data["architecture"]["args"]
    report = progress or (lambda fraction, message: None)
    paths = verified_weight_paths(card)
    parts = args.get("parts") or [{**args, "weights": list(range(len(paths))), "label_offset": 0,
                                    "classes": card.num_classes}]
    seconds, merged = {}, None
    for number, part in enumerate(parts):
        def part_report(fraction, message, n=number):
            prefix = f"part {n + 1}/{len(parts)}: " if len(parts) > 1 else ""
            report((n + fraction) / len(parts), prefix + message)

        labels = _predict_part(channels, card, part, [paths[i] for i in part["weights"]], options, part_report,
                               cancel, seconds)
        if len(parts) == 1:
            return labels, seconds
        if merged is None:
            merged = np.zeros(labels.shape, np.uint8 if card.num_classes <= 256 else np.uint16)
        found = labels > 0
        merged[found] = labels[found].astype(merged.dtype) + part["label_offset"]
    return merged, seconds


def _predict_part(channels, card: ModelCard, args: dict, paths: list[Path], options, report: ProgressCallback,
                  cancel: CancelCheck | None, seconds: dict) -> np.ndarray:
    """One nnU-Net model (its folds ensembled) on the input's grid; adds its stage times to ``seconds``."""
    def timed(stage, started):
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started

    started = time.perf_counter()
    report(0.0, "loading model")
    network = build_network(args, len(card.channels), args["classes"])
    states = [load_checkpoint(path)["network_weights"] for path in paths]
    timed("load model", started)

    started = time.perf_counter()
    report(0.02, "preprocessing")
    how = reorientation_of(channels[0], args["orientation"]) if args.get("orientation") else None
    arrays = [to_canonical(ch.array, how) if how else ch.array for ch in channels]
    spacing = how.spacing_zyx if how else channels[0].spacing[::-1]
    transpose = args["transpose_forward"]
    arrays = [np.transpose(array, transpose) for array in arrays]
    spacing = [spacing[axis] for axis in transpose]
    full_shape = arrays[0].shape
    box, body = _nonzero_box(arrays)
    cropped_shape = body.shape
    target = args["spacing"]
    shape = [int(round(s / t * n)) for s, t, n in zip(spacing, target, cropped_shape)]
    data_rules = args["resampling"]["data"]
    axis = _separate_axis(spacing, target, data_rules.get("force_separate_z"))
    network_input = np.stack([
        _resample_data(normalise(array[box], spec["normalisation"], mask=body), shape, axis)
        for array, spec in zip(arrays, card.channels)])
    del arrays
    timed("preprocess", started)

    started = time.perf_counter()
    predictor = Predictor(network, args["patch_size"], card.inference["overlap"], options.device,
                          cpu_bfloat16=options.cpu_bfloat16)
    mirror_axes = card.inference["mirror_axes"] if options.tta else ()
    image = torch.from_numpy(network_input)
    logits = None
    for number, state in enumerate(states):
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"Checkpoint {paths[number].name} does not fit the plans' network: "
                               f"{str(error).splitlines()[0]}") from None
        fold_logits = predictor(image, mirror_axes, cancel=cancel, progress=lambda f, message, n=number: report(
            0.05 + 0.85 * (n + f) / len(states), f"fold {n + 1}/{len(states)}: {message}"))
        with torch.inference_mode():  # the Predictor's outputs are inference tensors
            logits = fold_logits if logits is None else logits.add_(fold_logits)
    with torch.inference_mode():
        logits /= len(states)
    timed("predict", started)

    started = time.perf_counter()
    report(0.9, "resampling to the input grid")
    probability_rules = args["resampling"]["probabilities"]
    axis = _separate_axis(target, spacing, probability_rules.get("force_separate_z"))
    if probability_rules.get("order", 1) != 1 or (axis is not None and probability_rules.get("order_z", 0) != 0):
        raise ModelCardError("Only nnU-Net's default resampling of probabilities (linear, nearest along "
                             "a coarse axis) is supported")
    moved = [axis] + [a for a in range(3) if a != axis] if axis is not None else [0, 1, 2]
    labels = resample_argmax(logits.permute(0, *(1 + a for a in moved)), [cropped_shape[a] for a in moved],
                             nearest_first_axis=axis is not None)
    labels = labels.permute(*np.argsort(moved))
    full = torch.zeros(full_shape, dtype=labels.dtype)
    full[box] = labels
    full = full.permute(*np.argsort(transpose))
    result = from_canonical(full, how) if how else full
    timed("resample back", started)
    return np.ascontiguousarray(result.numpy())
