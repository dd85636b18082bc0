"""Sliding-window prediction with Gaussian blending, mirroring TTA, AMP, progress and cancel.

By default the windows are placed as nnU-Net places them (evenly spaced, at most ``patch × (1 -
overlap)`` apart, the first at 0 and the last at the far edge) and blended with the same Gaussian
importance map, so a model imported from nnU-Net predicts what nnU-Net's own predictor does. Models
imported from MONAI bundles carry MONAI's style in their card (``inference.sliding_window``): fixed
steps of ``int(patch × (1 - overlap))`` from 0 with the last window moved back inside, blended with
equal weights or MONAI's Gaussian, an image smaller than a window padded with zeros or its border
voxels, as ``SlidingWindowInferer`` does.
"""

from __future__ import annotations

import itertools
import logging
import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .backends import OpenVinoNetwork, compiled_for_cpu
from .errors import AIReconstructError, Cancelled, InputError

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]  # fraction 0-1, message
CancelCheck = Callable[[], bool]


def choose_device(requested: "str | torch.device" = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("Device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if requested not in ("cpu", "cuda"):
        raise InputError(f"Unknown device '{requested}' (use auto, cpu or cuda)")
    return torch.device(requested)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis: evenly spaced, no further apart than
    ``patch × (1 - overlap)``, the first at 0 and the last ending at ``size``; each start once
    (windows one voxel deep, as in 2D models, start at every voxel)."""
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    step = (size - patch) / (count - 1)
    return sorted({int(round(step * n)) for n in range(count)})


def monai_window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices as MONAI's ``SlidingWindowInferer`` places them: every ``int(patch × (1 -
    overlap))`` voxels (at least 1) from 0 until a window reaches ``size``, that last one moved back
    to end at ``size``."""
    if size <= patch:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    count = math.ceil((size - patch) / step) + 1
    return [min(step * n, size - patch) for n in range(count)]


PLACEMENTS = {"nnunet": window_starts, "monai": monai_window_starts}


def window_positions(shape, patch, overlap: float, style: str = "nnunet") -> list[tuple[slice, ...]]:
    """Every window of ``patch`` over an image of ``shape`` (at least the patch size), as slices,
    placed in nnU-Net's or MONAI's style."""
    starts = [PLACEMENTS[style](size, roi, overlap) for size, roi in zip(shape, patch)]
    return [tuple(slice(s, s + roi) for s, roi in zip(corner, patch)) for corner in itertools.product(*starts)]


@lru_cache(maxsize=4)
def gaussian_importance(patch: tuple[int, ...]) -> torch.Tensor:
    """Blending weights of one window as nnU-Net makes them: a Gaussian with sigma patch/8 around
    the centre voxel, peak 1, no zeros."""
    delta = np.zeros(patch)
    delta[tuple(size // 2 for size in patch)] = 1
    weights = gaussian_filter(delta, [size / 8 for size in patch], 0, mode="constant", cval=0)
    weights /= weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return torch.from_numpy(weights.astype(np.float32))


def monai_importance(patch: tuple[int, ...], blend: str, sigma_scale: float) -> torch.Tensor:
    """Blending weights of one window as MONAI makes them: equal (``constant``) or a Gaussian of
    sigma ``sigma_scale × patch`` around the window's geometric centre, no weight below 0.001."""
    if blend == "constant":
        return torch.ones(patch)
    weights = torch.ones(())
    for size in patch:
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        weights = weights[..., None] * torch.exp(-offsets ** 2 / (2 * (sigma_scale * size) ** 2))
    return weights.clamp(min=max(float(weights.min()), 1e-3))


def importance(patch: tuple[int, ...], sliding_window: dict) -> torch.Tensor:
    """The blending weights a card's ``inference.sliding_window`` style asks for."""
    if sliding_window.get("style", "nnunet") == "nnunet":
        return gaussian_importance(patch)
    return monai_importance(patch, sliding_window.get("blend", "constant"), sliding_window.get("sigma_scale", 0.125))


def mirror_sets(axes) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (the identity first), as nnU-Net's mirroring uses."""
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(sorted(axes), r)]


def pad_to_patch(image: torch.Tensor, patch, mode: str = "constant") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad ``[C, z, y, x]`` evenly to at least the patch size, with zeros (``constant``) or its border
    voxels (``replicate``); the slices that undo it."""
    below = [max(roi - size, 0) // 2 for size, roi in zip(image.shape[1:], patch)]
    above = [max(roi - size, 0) - b for size, roi, b in zip(image.shape[1:], patch, below)]
    if not any(below) and not any(above):
        return image, (slice(None),) * 3
    padding = [amount for b, a in zip(reversed(below), reversed(above)) for amount in (b, a)]
    unpad = tuple(slice(b, b + size) for b, size in zip(below, image.shape[1:]))
    return F.pad(image, padding, mode=mode), unpad


BACKENDS = ("auto", "torch", "openvino")


def runs_through_openvino(device: torch.device, backend: str, cpu_bfloat16: bool) -> bool:
    """Whether windows on ``device`` go to OpenVINO (where it is installed and takes the network):
    on the CPU, unless PyTorch or PyTorch's bfloat16 is asked for."""
    return device.type == "cpu" and backend != "torch" and not cpu_bfloat16


class Predictor:
    """Runs a network over a whole image ``[C, z, y, x]`` and returns blended logits.

    Windows on the CPU run through OpenVINO (``backend`` auto or openvino; float32, the same labels
    as PyTorch, about twice as fast here: ``backends.py``) unless OpenVINO is missing or ``torch``
    is asked for; float32 PyTorch otherwise.

    On out-of-memory it retries with one window at a time, then with the blended output kept in
    host memory (windows still on the GPU), then entirely on the CPU, logging each step. On CUDA the
    network runs under float16 autocast; on the CPU in float32, or bfloat16 autocast when
    ``cpu_bfloat16`` (about twice as fast on CPUs with AVX-512 BF16 or AMX, labels may differ at
    near-ties). Blending is always float32. ``sliding_window`` is a card's window style (nnU-Net's
    by default; ``{"style": "monai", "blend": ..., "sigma_scale": ..., "padding": ...}`` for MONAI bundles).
    ``network`` may also be a network OpenVINO compiled already (CPU windows only), and
    ``fingerprint`` the name under which the network is kept compiled (``backends.card_fingerprint``).
    """

    def __init__(self, network: torch.nn.Module | OpenVinoNetwork, patch_zyx, overlap: float = 0.5, device: str = "auto",
                 sw_batch_size: int | None = None, cpu_bfloat16: bool = False, backend: str = "auto",
                 sliding_window: dict | None = None, fingerprint: str | None = None):
        if backend not in BACKENDS:
            raise InputError(f"Unknown backend '{backend}' (use {', '.join(BACKENDS)})")
        self.device = choose_device(device)
        self.cpu_bfloat16 = cpu_bfloat16
        self.backend = backend
        self.network = network if isinstance(network, OpenVinoNetwork) else network.to(self.device).eval()
        self.fingerprint = fingerprint
        self.patch_zyx = tuple(int(p) for p in patch_zyx)
        self.overlap = overlap
        self.sliding_window = sliding_window or {"style": "nnunet"}
        self.sw_batch_size = sw_batch_size or (2 if self.device.type == "cuda" else 1)

    def attempts(self) -> list[tuple[int, torch.device, torch.device]]:
        """(windows per batch, device for the windows, device for the blended output), best first."""
        cpu = torch.device("cpu")
        plan = [(self.sw_batch_size, self.device, self.device), (1, self.device, self.device),
                (1, self.device, cpu), (1, cpu, cpu)]
        return list(dict.fromkeys(plan))

    def __call__(self, image: torch.Tensor, mirror_axes=(), progress: ProgressCallback | None = None,
                 cancel: CancelCheck | None = None, members: bool = False) -> torch.Tensor:
        """Logits ``[classes, z, y, x]`` (float32, on the CPU), each window averaged over its mirrored
        copies; with ``members``, each mirrored copy's blended logits ``[mirrors, classes, z, y, x]``."""
        plan = self.attempts()
        for number, (batch, window_device, output_device) in enumerate(plan):
            try:
                return self._run(image, mirror_axes, progress, cancel, batch, window_device, output_device, members)
            except torch.OutOfMemoryError:
                if number == len(plan) - 1:
                    raise AIReconstructError("Out of memory even on the CPU; try --fast or a smaller image") from None
                if window_device.type == "cuda":
                    torch.cuda.empty_cache()
                following = plan[number + 1]
                log.warning("Out of memory (%d window(s) per batch on %s, output on %s); retrying with "
                            "%d on %s, output on %s", batch, window_device, output_device, *following)

    def _autocast(self, device: torch.device):
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bfloat16)

    def _window_network(self, window_device: torch.device, channels: int):
        """What runs the windows: the OpenVINO-compiled network on the CPU when chosen, else the network."""
        if isinstance(self.network, OpenVinoNetwork):
            return self.network
        if runs_through_openvino(window_device, self.backend, self.cpu_bfloat16):
            compiled = compiled_for_cpu(self.network.cpu(), (1, channels, *self.patch_zyx), self.fingerprint)
            if compiled is not None:
                return compiled
            if self.backend == "openvino":
                raise InputError("The OpenVINO backend was asked for, but OpenVINO is not installed or cannot "
                                 "convert this network (pip install openvino)")
        return self.network.to(window_device)

    def pad(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """``image`` padded to at least one window as the card's sliding window pads; the slices that undo it."""
        return pad_to_patch(image, self.patch_zyx, self.sliding_window.get("padding", "constant"))

    def _run(self, image, mirror_axes, progress, cancel, batch_size, window_device, output_device, members):
        network = self._window_network(window_device, image.shape[0])
        mirrors = mirror_sets(mirror_axes)
        padded, unpad = self.pad(image.to(output_device, torch.float32))
        windows = window_positions(padded.shape[1:], self.patch_zyx, self.overlap, self.sliding_window.get("style", "nnunet"))
        weights = importance(self.patch_zyx, self.sliding_window).to(output_device)
        total, done = len(windows) * len(mirrors), 0
        logits = weight_sum = None
        with torch.inference_mode():
            for first in range(0, len(windows), batch_size):
                group = windows[first:first + batch_size]
                batch = torch.stack([padded[(slice(None), *window)] for window in group]).to(window_device)
                predicted = []
                for axes in mirrors:
                    if cancel is not None and cancel():
                        raise Cancelled("Cancelled by the user; nothing was written")
                    dims = [2 + a for a in axes]
                    flipped = torch.flip(batch, dims) if dims else batch
                    with self._autocast(window_device):
                        out = network(flipped).float()
                    predicted.append(torch.flip(out, dims) if dims else out)
                    done += len(group)
                    if progress is not None:
                        progress(done / total, f"window {done}/{total}")
                # [members, batch, classes, z, y, x]: each mirrored copy, or their mean
                predicted = torch.stack(predicted) if members else (sum(predicted) / len(predicted))[None]
                predicted = predicted.to(output_device)
                if logits is None:
                    logits = torch.zeros((len(predicted), predicted.shape[2], *padded.shape[1:]), device=output_device)
                    weight_sum = torch.zeros(padded.shape[1:], device=output_device)
                for index, window in enumerate(group):
                    logits[(slice(None), slice(None), *window)] += predicted[:, index] * weights
                    weight_sum[window] += weights
            logits /= weight_sum
        logits = logits[(slice(None), slice(None), *unpad)].cpu()
        return logits if members else logits[0]
