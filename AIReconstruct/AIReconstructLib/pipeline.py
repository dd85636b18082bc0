"""The segmentation job: input volumes + model card -> label map on the input's grid.

    channels ─► prepare (reorient, normalise, resample) ─► Predictor (sliding window)
             ─► restore_labels (resample logits back slab by slab, argmax, undo reorientation) ─► postprocess

Models imported from nnU-Net take their own preprocessing and export path (``nnunet.py``) around
the same Predictor and slab-wise restore. A model whose card crops it to another model's segments
(``inference.crop_to_segments``: TotalSegmentator's lung-nodule model inside the lungs) runs after
that model, on the box around those segments only, its labels pasted back on the input's grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from . import nnunet
from .backends import cached_for_cpu, card_fingerprint, openvino_available
from .errors import InputError, ModelCardError
from .modelcard import ModelCard, crop_model_of, verified_weight_paths
from .networks import load_network
from .postprocess import postprocess
from .predict import CancelCheck, Predictor, ProgressCallback, choose_device, runs_through_openvino
from .preprocess import (body_box, check_stripped_channels, in_array_order, prepare_for_card, restore_labels,
                         restore_scalar)
from .uncertainty import DROPOUT_SAMPLES, dropout_layers, member_maps, segment_confidence
from .volume import Volume


@dataclass(frozen=True)
class SegmentOptions:
    """How to run a model: device (auto|cpu|cuda), fast mode, mirroring TTA, post-processing, and
    bfloat16 on the CPU (faster where the CPU has BF16 instructions; labels may differ at near-ties)."""

    device: str = "auto"
    fast: bool = False
    tta: bool = False
    postprocess: bool = True
    cpu_bfloat16: bool = False
    backend: str = "auto"  # CPU windows: auto (OpenVINO where installed), torch or openvino (predict.BACKENDS)
    uncertainty: bool = False  # also an uncertainty map and per-segment confidence (implies TTA)


@dataclass
class Segmentation:
    """A label map on the input's grid, with the card it came from and per-stage timings."""

    labelmap: Volume
    card: ModelCard
    seconds: dict = field(default_factory=dict)
    uncertainty: Volume | None = None  # 0 (certain) to 1, on the input's grid (uncertainty.py)
    probability: Volume | None = None  # mean softmax probability of the chosen label (calibration.py)
    confidence: dict = field(default_factory=dict)  # per segment: boundary uncertainty, member Dice
    peak_gpu_memory_mib: float | None = None  # on CUDA: the most GPU memory PyTorch held during the run

    @property
    def label_names(self) -> dict[int, str]:
        return {label.value: label.name for label in self.card.labels}


def check_channels(channels: list[Volume], card: ModelCard) -> None:
    """Refuse inputs whose count or grids do not fit the model's channels."""
    expected = [channel["name"] for channel in card.channels]
    if len(channels) != len(expected):
        raise InputError(
            f"Model '{card.name}' needs {len(expected)} input volume(s) ({', '.join(expected)}), got {len(channels)}"
        )
    for name, channel in zip(expected[1:], channels[1:]):
        if not channel.same_grid(channels[0]):
            raise InputError(f"Input channel '{name}' is not on the same grid as '{expected[0]}'; resample it first")


def check_modality(volume: Volume, card: ModelCard) -> None:
    """Refuse an image that plainly is not of the model's modality (a heuristic on intensities:
    CT always holds air near -1000 HU; MR intensities never go that low)."""
    modality = card.data["modality"]
    lowest = float(volume.array.min())
    if modality == "CT" and lowest > -500:
        raise InputError(f"The image does not look like CT (no voxel below -500 HU) but model '{card.name}' is for CT")
    if modality == "MR" and np.count_nonzero(volume.array < -500) > 0.05 * volume.array.size:
        raise InputError(f"The image looks like CT (many voxels near air's -1000 HU) but model '{card.name}' is for MR")


def check_inputs(channels: list[Volume], card: ModelCard) -> None:
    """Refuse inputs the model cannot segment: another count or grid of channels, another
    modality, an image that is not skull-stripped for a channel the card marks so."""
    check_channels(channels, card)
    check_modality(channels[0], card)
    check_stripped_channels(channels, card.channels, f"for model '{card.name}'")


def _network(card: ModelCard, options: SegmentOptions, window: tuple[int, ...]):
    """The card's network and the name it is kept compiled under: on the CPU with OpenVINO, the
    network compiled in an earlier run when the cache has it (no PyTorch module built, no MONAI
    import: about 2 s less per run), else the PyTorch network (compiled and cached when first run)."""
    if options.uncertainty or not openvino_available() \
            or not runs_through_openvino(choose_device(options.device), options.backend, options.cpu_bfloat16):
        return load_network(card), None
    fingerprint = card_fingerprint(card, window)
    compiled = cached_for_cpu(fingerprint, window)
    if compiled is None:
        return load_network(card), fingerprint
    verified_weight_paths(card)  # weights that load_network would refuse are refused, though not read
    return compiled, fingerprint


def _outside_is_background(logits: torch.Tensor, box, grid) -> torch.Tensor:
    """Logits ``[..., classes, *box]`` on the whole grid: outside the box, certain background."""
    full = logits.new_full((*logits.shape[:-3], *grid), -20.0)
    full[..., 0, :, :, :] = 0.0
    full[(Ellipsis, *box)] = logits
    return full


def _predict_native(channels: list[Volume], card: ModelCard, options: SegmentOptions, report: ProgressCallback,
                    cancel: CancelCheck | None) -> tuple[np.ndarray, dict, dict]:
    """Label array on the input's grid from a model trained by this engine (or imported as MONAI
    weights), timings, and with ``options.uncertainty`` the uncertainty and chosen-label probability
    maps on the input's grid and the members' agreement per label value (else an empty dict)."""
    seconds = {}
    started = time.perf_counter()
    report(0.0, "loading model")
    patch_zyx = in_array_order(card.patch_size, card.orientation)
    network, fingerprint = _network(card, options, (1, len(card.channels), *patch_zyx))
    seconds["load model"] = time.perf_counter() - started

    started = time.perf_counter()
    report(0.02, "preprocessing")
    prepared = prepare_for_card(channels, card, options.fast)
    box = body_box(prepared, card, options.fast) if card.inference.get("crop_to_body") else None
    image = prepared.tensor if box is None else prepared.tensor[(slice(None), *box)]
    seconds["preprocess"] = time.perf_counter() - started

    started = time.perf_counter()
    dropout = dropout_layers(network) if options.uncertainty else []  # Monte-Carlo dropout
    predictor = Predictor(network, patch_zyx, card.inference["overlap"], options.device,
                          cpu_bfloat16=options.cpu_bfloat16,
                          backend="torch" if dropout else options.backend,  # a compiled network drops nothing
                          sliding_window=card.inference.get("sliding_window"), fingerprint=fingerprint)
    mirror_axes = card.inference["mirror_axes"] if options.tta or options.uncertainty else ()
    samples = 1
    if dropout:
        for layer in dropout:
            layer.train()
        samples = card.inference.get("dropout_samples", DROPOUT_SAMPLES)
        torch.manual_seed(0)  # the same map for the same input
    runs = [predictor(image, mirror_axes, cancel=cancel, members=options.uncertainty,
                      progress=lambda f, message, n=n: report(0.05 + 0.85 * (n + f) / samples, message))
            for n in range(samples)]
    logits = runs[0] if samples == 1 else torch.cat(runs)  # with several samples: [samples x mirrors, ...]
    del runs
    if box is not None:
        logits = _outside_is_background(logits, box, prepared.tensor.shape[1:])
    maps = {}
    if options.uncertainty:
        maps = member_maps(logits)
        logits = logits.mean(dim=0)
    seconds["predict"] = time.perf_counter() - started

    started = time.perf_counter()
    report(0.9, "resampling to the input grid")
    if card.inference.get("resample_back") == "probabilities":
        logits = torch.softmax(logits, dim=0)
    labels = restore_labels(logits, prepared, nearest=card.inference.get("resample_back") == "labels")
    for name in ("uncertainty", "probability"):
        if name in maps:
            maps[name] = restore_scalar(maps[name], prepared)
    seconds["resample back"] = time.perf_counter() - started
    return labels, seconds, maps


def segment(channels: list[Volume], card: ModelCard, options: SegmentOptions = SegmentOptions(),
            progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> Segmentation:
    """Segment ``channels`` (one volume per model input channel) with the model ``card``."""
    if "guidance" in card.data:
        raise InputError(f"Model '{card.name}' corrects segments with points (refine --guided); it does not segment")
    check_inputs(channels, card)
    card.spacing(options.fast)  # a fast mode the model lacks is an error before any work
    report = progress or (lambda fraction, message: None)
    if "crop_to_segments" in card.inference:
        return _segment_in_box_of_segments(channels, card, options, report, cancel)
    return _segment_checked(channels, card, options, report, cancel)


def _segment_checked(channels: list[Volume], card: ModelCard, options: SegmentOptions, report: ProgressCallback,
                     cancel: CancelCheck | None) -> Segmentation:
    """The segmentation of inputs already checked against the card."""
    on_gpu = choose_device(options.device).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if card.data["architecture"]["name"] == nnunet.ARCHITECTURE_NAME:
        labels, seconds, maps = nnunet.predict_labels(channels, card, options, report, cancel)
    else:
        labels, seconds, maps = _predict_native(channels, card, options, report, cancel)
    labelmap = channels[0].with_array(labels if card.num_classes <= 256 else labels.astype(np.uint16))

    if options.postprocess:
        started = time.perf_counter()
        report(0.95, "post-processing")
        labelmap = postprocess(labelmap, card.labels)
        seconds["postprocess"] = time.perf_counter() - started
    result = Segmentation(labelmap, card, seconds)
    if on_gpu:
        result.peak_gpu_memory_mib = torch.cuda.max_memory_allocated() / 2**20
    if maps:
        result.uncertainty = channels[0].with_array(maps["uncertainty"].astype(np.float32, copy=False))
        result.probability = channels[0].with_array(maps["probability"].astype(np.float32, copy=False))
        result.confidence = segment_confidence(labelmap, maps["uncertainty"], card.labels, maps["agreement"])
    report(1.0, "segmentation done")
    return result


CROP_MARGIN_MM = 20.0  # around the segments a model is cropped to, unless its card says otherwise
CROP_MODEL_SHARE = 0.3  # of the progress bar: the model that finds the segments


def _segment_in_box_of_segments(channels: list[Volume], card: ModelCard, options: SegmentOptions,
                                report: ProgressCallback, cancel: CancelCheck | None) -> Segmentation:
    """Segment with ``card`` only inside the box around the segments that its crop model finds first
    (grown by the card's margin); outside it, background."""
    crop = card.inference["crop_to_segments"]
    crop_card = crop_model_of(card)
    values = {label.name: label.value for label in crop_card.labels}
    unknown = [name for name in crop["segments"] if name not in values]
    if unknown:
        raise ModelCardError(f"Model '{card.name}' is cropped to segments that model '{crop_card.name}' does not have: "
                             f"{', '.join(unknown)}")
    check_inputs(channels, crop_card)
    started = time.perf_counter()
    found = _segment_checked(channels, crop_card, SegmentOptions(options.device, backend=options.backend,
                                                                  cpu_bfloat16=options.cpu_bfloat16),
                             lambda f, message: report(CROP_MODEL_SHARE * f, f"{crop_card.name}: {message}"), cancel)
    crop_seconds = time.perf_counter() - started
    grid = channels[0]
    box = _box_around(np.isin(found.labelmap.array, [values[name] for name in crop["segments"]]),
                      grid.spacing, crop.get("margin_mm", CROP_MARGIN_MM))
    if box is None:
        raise InputError(f"Model '{card.name}' segments inside the {', '.join(crop['segments'])} that model "
                         f"'{crop_card.name}' finds, and it finds none in this image")
    inside = _segment_checked([channel.cropped(box) for channel in channels], card, options,
                              lambda f, message: report(CROP_MODEL_SHARE + (1 - CROP_MODEL_SHARE) * f, message),
                              cancel)
    result = Segmentation(grid.with_block(inside.labelmap.array, box), card,
                          {f"crop model ({crop_card.name})": crop_seconds, **inside.seconds},
                          confidence=inside.confidence, peak_gpu_memory_mib=inside.peak_gpu_memory_mib)
    if inside.uncertainty is not None:  # outside the box: certain background
        result.uncertainty = grid.with_block(inside.uncertainty.array, box, 0.0)
        result.probability = grid.with_block(inside.probability.array, box, 1.0)
    return result


def _box_around(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float):
    """The box (slices of the array ``[k, j, i]``) around ``mask`` grown by ``margin_mm``, or None
    where the mask is empty."""
    box = ndimage.find_objects(mask.view(np.uint8))
    if not box:
        return None
    margins = [int(np.ceil(margin_mm / s)) for s in spacing[::-1]]
    return tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box[0], margins, mask.shape))
