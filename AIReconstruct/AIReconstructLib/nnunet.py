"""nnU-Net v2 models imported as cards (see ``nnunet_import.py``): load their checkpoints safely and
predict as nnU-Net's own predictor does (same labels), with less time and memory around the network.

    channels ─► [reorient, only if the card says the model was trained that way] ─► transpose (plans)
             ─► crop to the non-zero box ─► normalise per channel ─► resample to the plans' spacing (cubic)
                [a cascade's second stage: + the first stage's labels, resized, as one-hot channels]
             ─► Predictor per fold (nnU-Net's windows, Gaussian, mirroring; 2d: one slice deep)
             ─► mean logits over folds ─► resample back (linear) + argmax, slab by slab
                [region-based: each region's logits, sigmoid > 0.5, painted in order]
             ─► paste into the box ─► transpose back

The card keeps everything prediction needs (network class and arguments, transpose, spacing,
patch size, resampling), so plans.json is read once, at import; the checkpoints are listed with
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
import torch.nn.functional as F
from scipy import ndimage

from .errors import InputError, ModelCardError, WeightsError
from .modelcard import ModelCard, verified_weight_paths
from .networks import load_pickled_weights
from .predict import CancelCheck, Predictor, ProgressCallback
from .preprocess import (from_canonical, nearest_taps, normalise, reorientation_of, resample, resample_argmax,
                         to_canonical)
from .uncertainty import member_maps

ARCHITECTURE_NAME = "nnUNet"
ANISOTROPY_THRESHOLD = 3  # nnU-Net resamples the coarse axis separately beyond this spacing ratio
# classes a plans file may name for the network and its layers (imported by name, nothing else)
IMPORTABLE_PREFIXES = ("dynamic_network_architectures.architectures.", "torch.nn.")


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


class SliceBySlice(torch.nn.Module):
    """A 2D network run on windows one slice deep (``[B, C, 1, y, x]``), as nnU-Net's 2d
    configuration predicts a volume: every slice along the first array axis on its own."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.network(windows[:, :, 0])[:, :, None]


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


def _resize_labels(labels: np.ndarray, shape) -> np.ndarray:
    """A label map resized as nnU-Net resizes segmentations (batchgenerators' ``resize_segmentation``,
    order 1): each label's indicator linearly, the label of the highest score wins, and where several
    share it the nearest-neighbour label if it is one of them, else the lowest."""
    zoom = [new / old for new, old in zip(shape, labels.shape)]
    values = np.unique(labels)
    nearest = ndimage.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True)
    best = winner = nearest_score = None
    for index, value in enumerate(values):
        score = ndimage.zoom((labels == value).astype(np.float64), zoom, order=1, mode="nearest", grid_mode=True)
        if best is None:
            best, winner, nearest_score = score, np.zeros(score.shape, np.int32), np.zeros(score.shape)
        else:
            winner[score > best] = index
            np.maximum(best, score, out=best)
        is_nearest = nearest == value
        nearest_score[is_nearest] = score[is_nearest]
    return np.where((nearest_score == best) & (nearest_score > 0), nearest, values[winner])


def _resample_data(channel: np.ndarray, shape, axis: int | None, resize=_resize_cubic) -> np.ndarray:
    """One normalised channel (or, with ``_resize_labels``, a label map) to the network's grid
    (cubic; nearest along a separate coarse axis)."""
    if tuple(channel.shape) == tuple(shape):
        return channel
    if axis is None:
        return resize(channel, shape).astype(np.float32)
    moved = np.moveaxis(channel, axis, 0)
    in_plane = [s for a, s in enumerate(shape) if a != axis]
    resized = np.stack([resize(plane, in_plane) for plane in moved])
    return np.moveaxis(resized[nearest_taps(shape[axis], moved.shape[0]).numpy()], 0, axis).astype(np.float32)


def _painted_regions(logits: torch.Tensor, shape, nearest_first_axis: bool, order: list[int]) -> torch.Tensor:
    """nnU-Net's export of a region-based model: each region's logits resampled to ``shape``
    (linear; nearest along the first axis when it is resampled apart), sigmoid above 0.5, and the
    regions painted in ``order`` (later ones over earlier ones)."""
    labels = torch.zeros(tuple(shape), dtype=torch.uint8 if max(order) < 256 else torch.int16)
    for channel, value in zip(logits, order):
        if nearest_first_axis:
            planes = F.interpolate(channel[:, None], size=tuple(shape[1:]), mode="bilinear", align_corners=False)[:, 0]
            resampled = planes[nearest_taps(shape[0], channel.shape[0])]
        else:
            resampled = resample(channel[None], shape)[0]
        labels[torch.sigmoid(resampled) > 0.5] = value
    return labels


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


def predict_labels(channels, card: ModelCard, options, progress: ProgressCallback | None = None,
                   cancel: CancelCheck | None = None):
    """The label map ``[k, j, i]`` of an imported nnU-Net model (or of several, see
    :func:`combine_parts`) on the input's grid, stage times, and with ``options.uncertainty`` the
    uncertainty maps over the folds' ensemble (as the pipeline's, else an empty dict). ``options``:
    the pipeline's SegmentOptions (device, tta, uncertainty, cpu_bfloat16)."""
    args = card.data["architecture"]["args"]
    report = progress or (lambda fraction, message: None)
    paths = verified_weight_paths(card)
    parts = args.get("parts") or [{**args, "weights": list(range(len(paths))), "label_offset": 0,
                                    "classes": card.num_classes}]
    cascade = "previous_stage_labels" in parts[-1]
    if options.uncertainty and len(parts) > 1 and not cascade:
        raise InputError(f"Uncertainty maps are not available for models combined from several nnU-Net models "
                         f"such as '{card.name}'")
    if options.uncertainty and any(part.get("region_order") for part in parts):
        raise InputError(f"Uncertainty maps are not available for region-based nnU-Net models such as '{card.name}'")
    seconds, merged = {}, None
    for number, part in enumerate(parts):
        def part_report(fraction, message, n=number):
            prefix = f"{'stage' if cascade else 'part'} {n + 1}/{len(parts)}: " if len(parts) > 1 else ""
            report((n + fraction) / len(parts), prefix + message)

        previous = merged if "previous_stage_labels" in part else None
        labels, maps = _predict_part(channels, card, part, [paths[i] for i in part["weights"]], options,
                                     part_report, cancel, seconds, previous, options.uncertainty and part is parts[-1])
        if len(parts) == 1:
            return labels, seconds, maps
        if merged is None or previous is not None:  # a cascade's later stage replaces the labels
            merged = np.zeros(labels.shape, np.uint8 if card.num_classes <= 256 else np.uint16)
        found = labels > 0
        merged[found] = labels[found].astype(merged.dtype) + part["label_offset"]
    return merged, seconds, maps


def _predict_part(channels, card: ModelCard, args: dict, paths: list[Path], options, report: ProgressCallback,
                  cancel: CancelCheck | None, seconds: dict, previous: np.ndarray | None,
                  uncertainty: bool) -> tuple[np.ndarray, dict]:
    """One nnU-Net model (its folds ensembled) on the input's grid, and with ``uncertainty`` the
    uncertainty maps whose members are every fold's mirrored copies; adds stage times to ``seconds``.
    ``previous``: for a cascade's second stage, the first stage's labels on the input's grid."""
    def timed(stage, started):
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started

    started = time.perf_counter()
    report(0.0, "loading model")
    prior_labels = args.get("previous_stage_labels", [])  # one extra input channel per foreground label
    region_order = args.get("region_order")  # region-based: one sigmoid output per region
    network = build_network(args, len(card.channels) + len(prior_labels),
                            len(region_order) if region_order else args["classes"])
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
    planar = len(args["patch_size"]) == 2  # a 2d configuration keeps the slice spacing
    target = [spacing[0], *args["spacing"]] if planar else args["spacing"]
    shape = [int(round(s / t * n)) for s, t, n in zip(spacing, target, cropped_shape)]
    extra, mask = [], body
    if previous is not None:  # nnU-Net marks the outside of the body unlabelled unless a label is there
        prior = np.transpose(to_canonical(previous, how) if how else previous, transpose)[box].astype(np.int16)
        mask = body | (prior > 0)
        prior[~mask] = -1  # a label of its own when resized
        axis = _separate_axis(spacing, target, args["resampling"]["labels"].get("force_separate_z"))
        prior = _resample_data(prior, shape, axis, resize=_resize_labels)
        extra = [(prior == value).astype(np.float32) for value in prior_labels]
    data_rules = args["resampling"]["data"]
    axis = _separate_axis(spacing, target, data_rules.get("force_separate_z"))
    network_input = np.stack([
        _resample_data(normalise(array[box], spec["normalisation"], mask=mask), shape, axis)
        for array, spec in zip(arrays, card.channels)] + extra)
    del arrays, extra
    timed("preprocess", started)

    started = time.perf_counter()
    predictor = Predictor(SliceBySlice(network) if planar else network, [1] * planar + args["patch_size"],
                          card.inference["overlap"], options.device,
                          cpu_bfloat16=options.cpu_bfloat16, backend=options.backend)
    mirror_axes = card.inference["mirror_axes"] if options.tta or uncertainty else ()
    image = torch.from_numpy(network_input)
    logits, fold_members = None, []
    for number, state in enumerate(states):
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"Checkpoint {paths[number].name} does not fit the plans' network: "
                               f"{str(error).splitlines()[0]}") from None
        fold_logits = predictor(image, mirror_axes, cancel=cancel, members=uncertainty, progress=lambda f, message,
                                n=number: report(0.05 + 0.85 * (n + f) / len(states), f"fold {n + 1}/{len(states)}: {message}"))
        if uncertainty:
            fold_members.append(fold_logits)
            continue
        with torch.inference_mode():  # the Predictor's outputs are inference tensors
            logits = fold_logits if logits is None else logits.add_(fold_logits)
    maps = {}
    with torch.inference_mode():
        if uncertainty:  # [folds x mirrors, classes, z, y, x]
            ensemble = torch.cat(fold_members)
            del fold_members
            maps = member_maps(ensemble)
            logits = ensemble.mean(dim=0)
            del ensemble
        else:
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
    logits, moved_shape = logits.permute(0, *(1 + a for a in moved)), [cropped_shape[a] for a in moved]
    if region_order:
        labels = _painted_regions(logits, moved_shape, axis is not None, region_order)
    else:
        labels = resample_argmax(logits, moved_shape, nearest_first_axis=axis is not None)
    labels = labels.permute(*np.argsort(moved))

    def to_input_grid(values: torch.Tensor, outside) -> np.ndarray:
        """Paste a map of the cropped box into the whole image and undo the transpose and reorientation."""
        full = torch.full(full_shape, outside, dtype=values.dtype)
        full[box] = values
        full = full.permute(*np.argsort(transpose))
        return np.ascontiguousarray((from_canonical(full, how) if how else full).numpy())

    result = to_input_grid(labels, 0)
    for name, outside in (("uncertainty", 0.0), ("probability", 1.0)):  # outside the crop: background, sure
        if name in maps:
            maps[name] = to_input_grid(resample(maps[name][None].float(), cropped_shape)[0], outside)
    timed("resample back", started)
    return result, maps
