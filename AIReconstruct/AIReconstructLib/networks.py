"""Networks named in model cards, built from MONAI's implementations, and their weights."""

from __future__ import annotations

import torch
from monai.networks import nets
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelCardError, WeightsError
from .modelcard import ModelCard, verified_weight_paths

# name in the card -> MONAI class; the card's "args" are passed through, plus the
# channel counts and spatial_dims=3 that the card implies.
ARCHITECTURES = {
    "UNet": nets.UNet,
    "DynUNet": nets.DynUNet,
    "BasicUNetPlusPlus": nets.BasicUNetPlusPlus,
    "VNet": nets.VNet,
    "SegResNet": nets.SegResNet,
    "SwinUNETR": nets.SwinUNETR,
}


# arguments used when a training run names an architecture but not its arguments
DEFAULT_ARGUMENTS = {
    "UNet": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 1},
    "DynUNet": {"kernel_size": [3] * 5, "strides": [1, 2, 2, 2, 2], "upsample_kernel_size": [2] * 4,
                "filters": [16, 32, 64, 128, 256]},
    "BasicUNetPlusPlus": {"features": [16, 16, 32, 64, 128, 16]},
    "VNet": {},
    "SegResNet": {"init_filters": 16},
    "SwinUNETR": {"feature_size": 24},
}


def build_network(architecture: dict, in_channels: int, out_channels: int) -> torch.nn.Module:
    """Build the network an architecture entry ``{"name": ..., "args": {...}}`` describes."""
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise ModelCardError(f"Unknown architecture '{name}' (known: {', '.join(ARCHITECTURES)})")
    try:
        return ARCHITECTURES[name](
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **architecture.get("args", {})
        )
    except (TypeError, ValueError, AssertionError) as error:
        raise ModelCardError(f"Architecture '{name}' cannot be built from the card's args: {error}") from None


def load_network(card: ModelCard) -> torch.nn.Module:
    """Build the card's network and load its verified weights (safetensors, no pickle)."""
    network = build_network(card.data["architecture"], len(card.channels), card.num_classes)
    path = verified_weight_paths(card)[0]
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"Weights file {path.name} cannot be read as safetensors: {error}") from None
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise WeightsError(f"Weights file {path.name} does not fit the card's network: {first}") from None
    return network.eval()


def save_weights(network: torch.nn.Module, path) -> None:
    """Write a network's weights as safetensors (contiguous CPU tensors)."""
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    save_file(state, str(path))
