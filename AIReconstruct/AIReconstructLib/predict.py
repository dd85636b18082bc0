"""Sliding-window prediction with Gaussian blending, mirroring TTA, AMP, progress and cancel."""

from __future__ import annotations

import itertools
import logging
import math
from typing import Callable

import torch
from monai.inferers import sliding_window_inference

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


def window_count(shape, patch, overlap: float) -> int:
    """How many windows MONAI's sliding window visits for an image of ``shape``."""
    total = 1
    for size, roi in zip(shape, patch):
        if size <= roi:
            continue
        interval = max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((size - roi) / interval) + 1
    return total


def mirror_sets(axes) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (the identity first), as nnU-Net's mirroring uses."""
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(sorted(axes), r)]


class Predictor:
    """Runs a network over a whole image ``[C, z, y, x]`` and returns blended logits.

    On out-of-memory it retries with one window at a time, then with the blended output kept in
    host memory (windows still on the GPU), then entirely on the CPU, logging each step.
    """

    def __init__(self, network: torch.nn.Module, patch_zyx, overlap: float = 0.5, device: str = "auto",
                 sw_batch_size: int | None = None):
        self.device = choose_device(device)
        self.network = network.to(self.device).eval()
        self.patch_zyx = tuple(int(p) for p in patch_zyx)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size or (2 if self.device.type == "cuda" else 1)

    def attempts(self) -> list[tuple[int, torch.device, torch.device]]:
        """(windows per batch, device for the windows, device for the blended output), best first."""
        cpu = torch.device("cpu")
        plan = [(self.sw_batch_size, self.device, self.device), (1, self.device, self.device),
                (1, self.device, cpu), (1, cpu, cpu)]
        return list(dict.fromkeys(plan))

    def __call__(self, image: torch.Tensor, mirror_axes=(), progress: ProgressCallback | None = None,
                 cancel: CancelCheck | None = None) -> torch.Tensor:
        """Logits ``[classes, z, y, x]`` (float32, on the CPU), averaged over mirrored copies."""
        plan = self.attempts()
        for number, (batch, window_device, output_device) in enumerate(plan):
            try:
                return self._run(image, mirror_axes, progress, cancel, batch, window_device, output_device)
            except torch.OutOfMemoryError:
                if number == len(plan) - 1:
                    raise AIReconstructError("Out of memory even on the CPU; try --fast or a smaller image") from None
                if window_device.type == "cuda":
                    torch.cuda.empty_cache()
                following = plan[number + 1]
                log.warning("Out of memory (%d window(s) per batch on %s, output on %s); retrying with "
                            "%d on %s, output on %s", batch, window_device, output_device, *following)

    def _run(self, image, mirror_axes, progress, cancel, batch_size, window_device, output_device):
        network = self.network.to(window_device)
        mirrors = mirror_sets(mirror_axes)
        total = window_count(image.shape[1:], self.patch_zyx, self.overlap) * len(mirrors)
        done = 0

        def run_windows(batch: torch.Tensor) -> torch.Tensor:
            nonlocal done
            if cancel is not None and cancel():
                raise Cancelled("Cancelled by the user; nothing was written")
            with torch.autocast("cuda", dtype=torch.float16, enabled=window_device.type == "cuda"):
                out = network(batch)
            done += batch.shape[0]
            if progress is not None:
                progress(min(done / total, 1.0), f"window {done}/{total}")
            return out.float()

        summed = None
        with torch.inference_mode():
            batch = image[None].to(output_device, torch.float32)
            for axes in mirrors:
                dims = [2 + a for a in axes]
                flipped = torch.flip(batch, dims) if dims else batch
                logits = sliding_window_inference(
                    flipped, self.patch_zyx, batch_size, run_windows,
                    overlap=self.overlap, mode="gaussian", sw_device=window_device, device=output_device,
                )
                logits = torch.flip(logits, dims) if dims else logits
                summed = logits if summed is None else summed + logits
        return (summed / len(mirrors))[0].float().cpu()
