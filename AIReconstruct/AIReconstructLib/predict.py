"""Sliding-window prediction with Gaussian blending, mirroring TTA, AMP, progress and cancel."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from monai.inferers import sliding_window_inference

from .errors import Cancelled, InputError

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
    """Runs a network over a whole image ``[C, z, y, x]`` and returns blended logits."""

    def __init__(self, network: torch.nn.Module, patch_zyx, overlap: float = 0.5, device: str = "auto",
                 sw_batch_size: int = 1):
        self.device = choose_device(device)
        self.network = network.to(self.device).eval()
        self.patch_zyx = tuple(int(p) for p in patch_zyx)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size

    def __call__(self, image: torch.Tensor, mirror_axes=(), progress: ProgressCallback | None = None,
                 cancel: CancelCheck | None = None) -> torch.Tensor:
        """Logits ``[classes, z, y, x]`` (float32, on the CPU), averaged over mirrored copies."""
        mirrors = mirror_sets(mirror_axes)
        windows = window_count(image.shape[1:], self.patch_zyx, self.overlap)
        total = windows * len(mirrors)
        done = 0

        def run_windows(batch: torch.Tensor) -> torch.Tensor:
            nonlocal done
            if cancel is not None and cancel():
                raise Cancelled("Cancelled by the user; nothing was written")
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                out = self.network(batch)
            done += batch.shape[0]
            if progress is not None:
                progress(min(done / total, 1.0), f"window {done}/{total}")
            return out.float()

        summed = None
        with torch.inference_mode():
            batch = image[None].to(self.device, torch.float32)
            for axes in mirrors:
                dims = [2 + a for a in axes]
                flipped = torch.flip(batch, dims) if dims else batch
                logits = sliding_window_inference(
                    flipped, self.patch_zyx, self.sw_batch_size, run_windows,
                    overlap=self.overlap, mode="gaussian", sw_device=self.device, device=self.device,
                )
                logits = torch.flip(logits, dims) if dims else logits
                summed = logits if summed is None else summed + logits
        return (summed / len(mirrors))[0].float().cpu()
