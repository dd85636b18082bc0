"""Networks named in model cards, built from MONAI's implementations, and their weights."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError, ModelCardError, WeightsError
from .modelcard import ModelCard, sha256_of, validate_card, verified_weight_paths
from .preprocess import in_array_order

# MONAI network classes a card may name; the card's "args" are passed through, plus the channel
# counts and spatial_dims=3 that the card implies.
ARCHITECTURES = ("UNet", "DynUNet", "BasicUNetPlusPlus", "VNet", "SegResNet", "SwinUNETR")


# arguments used when a training run names an architecture but not its arguments
DEFAULT_ARGUMENTS = {
    "UNet": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 1},
    "DynUNet": {"kernel_size": [3] * 5, "strides": [1, 2, 2, 2, 2], "upsample_kernel_size": [2] * 4,
                "filters": [16, 32, 64, 128, 256], "deep_supervision": True, "deep_supr_num": 2},
    "BasicUNetPlusPlus": {"features": [16, 16, 32, 64, 128, 16]},
    "VNet": {},
    "SegResNet": {"init_filters": 16},
    "SwinUNETR": {"feature_size": 24},
}


# the parameters of each architecture's encoder (the contracting path and the bottleneck), which
# fine-tuning can freeze: a pattern on the parameter names of MONAI's implementation
ENCODER_PARAMETERS = {
    "UNet": r"^model(\.1\.submodule)*\.0\.|^model(\.1\.submodule)+\.(conv|residual)",
    "DynUNet": r"^(input_block|downsamples|bottleneck)\.",
    "BasicUNetPlusPlus": r"^conv_\d_0\.",
    "VNet": r"^(in_tr|down_tr)",
    "SegResNet": r"^(convInit|down_layers)\.",
    "SwinUNETR": r"^(swinViT|encoder\d+)\.",
}


# every side of a default patch is a multiple of the network's total downsampling: 16 for the
# defaults above, 32 for SwinUNETR (five halvings)
PATCH_MULTIPLE = {"SwinUNETR": 32}


def default_patch_size(extent_voxels, architecture_name: str) -> list[int]:
    """A training patch for cases ``extent_voxels`` across (per axis): each side that extent rounded
    to the architecture's multiple, between one multiple and 128 voxels."""
    multiple = PATCH_MULTIPLE.get(architecture_name, 16)
    return [int(min(128, max(multiple, multiple * round(n / multiple)))) for n in extent_voxels]


def check_patch_size(network: torch.nn.Module, architecture_name: str, in_channels: int, patch_zyx) -> None:
    """Refuse a patch the network cannot take (a side its downsampling does not divide, too few voxels
    left at its bottleneck) before training starts, by one forward pass of zeros on the CPU."""
    was_training = network.training
    try:
        with torch.no_grad():
            output = network.eval()(torch.zeros(1, in_channels, *patch_zyx))
        if tuple(output.shape[2:]) != tuple(patch_zyx):
            raise ValueError(f"its output has {' x '.join(str(n) for n in reversed(output.shape[2:]))} voxels")
    except (RuntimeError, ValueError) as error:
        sides = " x ".join(str(n) for n in reversed(patch_zyx))
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{architecture_name} cannot take patches of {sides} voxels ({reason[:200]}); their sides "
                         f"must be multiples of {PATCH_MULTIPLE.get(architecture_name, 16)}, large enough to leave more "
                         "than one voxel at the network's deepest level") from None
    finally:
        network.train(was_training)


def freeze_encoder(network: torch.nn.Module, architecture: str) -> int:
    """Stop training the encoder of a network built by :func:`build_network`; returns how many
    parameter tensors were frozen."""
    if architecture not in ENCODER_PARAMETERS:
        raise ModelCardError(f"The encoder of architecture '{architecture}' is not known; fine-tune it "
                             f"without freezing (known: {', '.join(ENCODER_PARAMETERS)})")
    pattern = re.compile(ENCODER_PARAMETERS[architecture])
    frozen = [parameter for name, parameter in network.named_parameters() if pattern.search(name)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return len(frozen)


# MONAI networks whose forward returns a list of outputs, the final one last (BasicUNetPlusPlus: one
# per depth of its nested decoder, all at full resolution; a list of one without deep supervision)
LIST_OUTPUTS = {"BasicUNetPlusPlus"}


def _with_tensor_output(network_class: type) -> type:
    """``network_class`` answering as the other networks do: its final output alone in evaluation, and
    in training with deep supervision every output stacked ``[B, outputs, C, ...]`` final first (as
    DynUNet's). A subclass, so its weights keep MONAI's names."""
    def forward(self, x):
        outputs = network_class.forward(self, x)
        if self.training and len(outputs) > 1:
            return torch.stack(outputs[::-1], dim=1)
        return outputs[-1]

    return type(network_class.__name__, (network_class,), {"forward": forward, "__module__": __name__})


def build_network(architecture: dict, in_channels: int, out_channels: int) -> torch.nn.Module:
    """Build the MONAI network an architecture entry ``{"name": ..., "args": {...}}`` describes (any
    class of ``monai.networks.nets``: those in ``ARCHITECTURES`` are the ones training offers)."""
    from monai.networks import nets  # here, not at the top: ~250 MB that imported models never need

    name = architecture.get("name")
    network_class = getattr(nets, str(name), None) if str(name).isidentifier() else None
    if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
        raise ModelCardError(f"Unknown architecture '{name}' (known: {', '.join(ARCHITECTURES)} or another "
                             "class of monai.networks.nets)")
    if name in LIST_OUTPUTS:
        network_class = _with_tensor_output(network_class)
    try:
        return network_class(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                             **architecture.get("args", {}))
    except (TypeError, ValueError, AssertionError) as error:
        raise ModelCardError(f"Architecture '{name}' cannot be built from the card's args: {error}") from None


class OnnxNetwork(torch.nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU, callable like a network on ``[B, C, z, y, x]``."""

    def __init__(self, path):
        super().__init__()
        try:
            import onnxruntime
        except ModuleNotFoundError:
            raise ModelCardError("ONNX models need ONNX Runtime: pip install onnxruntime") from None
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises its own exception types
            raise WeightsError(f"{Path(path).name} cannot be read as an ONNX model: {str(error).splitlines()[0]}") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.session.run(None, {self.input_name: batch.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(output).to(batch.device)


def _load_torchscript(path) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{Path(path).name} cannot be read as TorchScript: {str(error).splitlines()[0]}") from None


# exported networks: the weights file is the whole network, no architecture arguments
EXPORTED = {"TorchScript": _load_torchscript, "ONNX": OnnxNetwork}


def import_exported(path, card: dict, kind: str) -> dict:
    """A model card for an exported network (``kind`` TorchScript or ONNX) from a hand-written card that
    gives everything but the architecture and weights; the network is loaded and run once on one
    patch, so a file that is not such a network, or whose outputs do not fit the labels, is refused."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelCardError(f"No network file at {path}")
    card = {**card, "architecture": {"name": kind}, "weights": [{"file": str(path), "sha256": sha256_of(path)}]}
    validate_card(card, f"Card for {path.name}")
    imported = ModelCard(card, path.parent)
    patch = in_array_order(imported.patch_size, imported.orientation)
    with torch.inference_mode():
        output = EXPORTED[kind](path).eval()(torch.zeros(1, len(imported.channels), *patch))
    if output.ndim != 5 or output.shape[1] != imported.num_classes:
        raise ModelCardError(f"{path.name} gives outputs of shape {tuple(output.shape)} for one patch; the card "
                             f"needs [1, {imported.num_classes}, {', '.join(map(str, patch))}] (background + labels)")
    return card


def load_network(card: ModelCard) -> torch.nn.Module:
    """The card's network with its verified weights: built from MONAI and loaded from safetensors (no
    pickle), or an exported TorchScript / ONNX network."""
    path = verified_weight_paths(card)[0]
    name = card.data["architecture"]["name"]
    if name in EXPORTED:
        return EXPORTED[name](path).eval()
    network = build_network(card.data["architecture"], len(card.channels), card.num_classes)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"Weights file {path.name} cannot be read as safetensors: {error}") from None
    expected = set(unique_state(network))
    if set(state) != expected:
        stray = sorted(set(state) ^ expected)
        raise WeightsError(f"Weights file {path.name} does not fit the card's network: {len(stray)} tensor "
                           f"name(s) differ, e.g. '{stray[0]}'")
    try:
        network.load_state_dict(state, strict=False)  # the names left out share their tensors with loaded ones
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise WeightsError(f"Weights file {path.name} does not fit the card's network: {first}") from None
    return network.eval()


def load_pickled_weights(path: Path, allowed_globals=()):
    """A torch pickle (checkpoint or state dict) unpickled with ``weights_only=True`` and only the
    extra types in ``allowed_globals``; anything else in it is refused before it is built."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)), warnings.catch_warnings():
            # PyTorch warns of any pickle protocol its own writer does not use: noise beside the one-line refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0][:200]
        raise WeightsError(f"{path.name} holds objects other than weights and plain data; "
                           f"refusing to load it ({reason})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsError(f"{path.name} cannot be read: {str(error).splitlines()[0]}") from None


def unique_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict without the names that alias a tensor already listed (MONAI's
    DynUNet reaches its layers by two paths)."""
    state, seen = {}, set()
    for key, value in network.state_dict().items():
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() == 0 or where not in seen:
            seen.add(where)
            state[key] = value
    return state


def save_weights(network: torch.nn.Module, path) -> None:
    """Write a network's weights as safetensors (contiguous CPU tensors, each shared tensor once)."""
    save_file({key: value.detach().cpu().contiguous() for key, value in unique_state(network).items()}, str(path))
