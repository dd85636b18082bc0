"""Which voxels of the image drove a segment: a gradient saliency map, computed on demand.

The model first segments the image (sliding window, no gradients). One window of the model's patch
size is then centred on the chosen segment and run again with gradients: the score is the sum of
the segment's logits over the voxels the model gave that segment in the window, and the saliency
is the magnitude of the score's gradient with respect to the input (summed over channels),
smoothed by a Gaussian of one voxel, divided by its 99.9th percentile and clipped to 0-1, then
resampled to the input grid. Voxels outside that window get 0.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError
from .modelcard import ModelCard
from .networks import EXPORTED, load_network
from .pipeline import check_inputs
from .predict import Predictor
from .preprocess import in_array_order, prepare_for_card, restore_scalar
from .volume import Volume


def saliency(channels: list[Volume], card: ModelCard, segment_name: str, device: str = "cpu") -> Volume:
    """The 0-1 saliency of segment ``segment_name`` on the input's grid (see the module docstring)."""
    values = {label.name: label.value for label in card.labels}
    if segment_name not in values:
        raise InputError(f"Model '{card.name}' has no segment named '{segment_name}' (it has: {', '.join(values)})")
    if card.data["architecture"]["name"] in EXPORTED or card.data["architecture"]["name"] == "nnUNet":
        raise InputError(f"Saliency needs a network the engine builds itself; '{card.name}' is an imported model")
    if "crop_to_segments" in card.inference:
        raise InputError(f"Saliency of '{card.name}' is not computed: the model runs only inside what model "
                         f"'{card.inference['crop_to_segments']['model']}' finds first")
    check_inputs(channels, card)
    network = load_network(card).to(device)
    prepared = prepare_for_card(channels, card)
    patch = in_array_order(card.patch_size, card.orientation)
    with torch.inference_mode():
        predictor = Predictor(network, patch, card.inference["overlap"], device,
                              sliding_window=card.inference.get("sliding_window"))
        logits = predictor(prepared.tensor)
    chosen = logits.argmax(dim=0) == values[segment_name]
    if not chosen.any():
        raise InputError(f"The model finds no '{segment_name}' in this image, so there is nothing to explain")
    padded, unpad = predictor.pad(prepared.tensor)
    centre = torch.nonzero(chosen).float().mean(dim=0).round().long().tolist()
    offsets = [u.start or 0 for u in unpad]  # the image's position inside the padded array
    starts = [min(max(c + o - p // 2, 0), n - p) for c, o, p, n in zip(centre, offsets, patch, padded.shape[1:])]
    window = tuple(slice(s, s + p) for s, p in zip(starts, patch))
    image = padded[(slice(None), *window)][None].clone().to(device).requires_grad_(True)
    network.eval().requires_grad_(False)  # gradients for the input only
    out = network(image)[0]
    mask = out.argmax(dim=0) == values[segment_name]
    score = out[values[segment_name]][mask].sum() if mask.any() else out[values[segment_name]].max()
    score.backward()
    gradient = image.grad[0].abs().sum(dim=0).cpu().numpy()
    gradient = ndimage.gaussian_filter(gradient, 1.0)
    scale = np.percentile(gradient, 99.9)
    full = np.zeros(padded.shape[1:], np.float32)
    full[window] = np.clip(gradient / scale, 0, 1) if scale > 0 else 0.0
    restored = restore_scalar(torch.from_numpy(full[unpad]), prepared)
    return channels[0].with_array(np.clip(restored, 0, 1).astype(np.float32))
