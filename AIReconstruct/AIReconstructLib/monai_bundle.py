"""MONAI bundles: read a bundle's network, preprocessing, sliding-window settings and label names
from its configs and write a model card, so the engine runs it like its own models.

The configs are read as data and never executed: ``@name`` references to plain values are
followed, ``$`` expressions are refused where the card needs a value. Weights come from
``models/model.pt`` (loaded with ``weights_only=True`` and rewritten as safetensors) or, without
it, ``models/model.ts`` (TorchScript). Supported preprocessing: loading, channel-first,
``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged`` (with clipping), ``NormalizeIntensityd``
and type conversions; outputs must be softmax/argmax label maps. The inferer's window placement and
blending (``mode``, ``sigma_scale``) go into the card, so windows are placed and blended as MONAI's
``SlidingWindowInferer`` does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelCardError, WeightsError
from .modelcard import label_colour, model_name, read_json, sha256_of, validate_card
from .networks import import_exported, load_pickled_weights, save_weights

NETWORK_ARGUMENTS_FROM_CARD = ("spatial_dims", "in_channels", "out_channels")
PASS_THROUGH = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "CastToType", "ToTensor",
                "ToDevice", "SaveImage", "Identity"}


def _value(config: dict, value, where: str):
    """A config value with ``@name`` references to other entries followed; expressions are refused."""
    for _ in range(10):
        if isinstance(value, str) and value.startswith("@") and value[1:] in config:
            value = config[value[1:]]
        else:
            break
    if isinstance(value, str) and value.startswith(("$", "%")):
        raise ModelCardError(f"Bundle config '{where}' is an expression ({value[:60]}); the importer reads "
                             "values only")
    if isinstance(value, dict):
        return {key: _value(config, item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_value(config, item, where) for item in value]
    return value


def _target(component: dict) -> str:
    """The class name a component instantiates, without module path or the dictionary ``d`` suffix."""
    name = str(component.get("_target_", "")).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in {*PASS_THROUGH, "Orientation", "Spacing",
                                                               "ScaleIntensityRange", "NormalizeIntensity"} else name


def _preprocessing(config: dict) -> dict:
    """Orientation, spacing and normalisation from the bundle's preprocessing transforms."""
    preprocessing = _value(config, config.get("preprocessing"), "preprocessing")
    transforms = preprocessing.get("transforms", []) if isinstance(preprocessing, dict) else []
    found = {"orientation": None, "spacing": None, "normalisation": None, "normalise": "before_resampling"}
    for transform in transforms:
        name = _target(transform)
        if name == "Orientation":
            found["orientation"] = transform["axcodes"]
        elif name == "Spacing":
            pixdim = transform["pixdim"]
            found["spacing"] = [float(p) for p in (pixdim if isinstance(pixdim, list) else [pixdim] * 3)]
            if found["normalisation"] is None:  # intensities are transformed on the resampled grid
                found["normalise"] = "after_resampling"
        elif name == "ScaleIntensityRange":
            if not transform.get("clip", False):
                raise ModelCardError("ScaleIntensityRanged without clip=True is not supported")
            a_min, a_max = float(transform["a_min"]), float(transform["a_max"])
            b_min, b_max = float(transform.get("b_min", 0.0)), float(transform.get("b_max", 1.0))
            scale = (a_max - a_min) / (b_max - b_min)  # (x - a_min) / scale + b_min == (x - mean) / scale
            found["normalisation"] = {"scheme": "ct", "clip": [a_min, a_max], "mean": a_min - b_min * scale, "std": scale}
        elif name == "NormalizeIntensity":
            found["normalisation"] = {"scheme": "zscore_nonzero" if transform.get("nonzero") else "zscore"}
        elif name not in PASS_THROUGH:
            raise ModelCardError(f"Bundle preprocessing transform '{transform.get('_target_')}' is not supported")
    missing = [key for key in ("orientation", "spacing") if found[key] is None]
    if missing:
        raise ModelCardError(f"The bundle's preprocessing gives no {' and no '.join(missing)} (Orientationd, Spacingd)")
    return found


def _resampled_back(config: dict) -> str:
    """What the bundle's postprocessing inverts the preprocessing on: probabilities when a softmax
    comes before ``Invertd``, else the network's logits (only the transforms' names and plain
    ``softmax`` flags are read: postprocessing often holds expressions, such as output folders)."""
    postprocessing = config.get("postprocessing")
    if isinstance(postprocessing, str) and postprocessing.startswith("@"):
        postprocessing = config.get(postprocessing[1:])
    transforms = postprocessing.get("transforms", []) if isinstance(postprocessing, dict) else []
    for transform in transforms:
        name = _target(transform) if isinstance(transform, dict) else ""
        if name in ("Activations", "Activationsd") and transform.get("softmax") is True:
            return "probabilities"
        if name in ("Invert", "Invertd"):
            break
    return "logits"


def _sliding_window(inferer: dict) -> dict:
    """The inferer's window placement and blending (MONAI's defaults: equal weights, sigma 0.125)."""
    blend, sigma_scale = inferer.get("mode", "constant"), inferer.get("sigma_scale", 0.125)
    if blend not in ("constant", "gaussian"):
        raise ModelCardError(f"The bundle's inferer blends with mode '{blend}' (supported: constant, gaussian)")
    if not isinstance(sigma_scale, (int, float)) or sigma_scale <= 0:
        raise ModelCardError(f"The bundle's inferer has sigma_scale {sigma_scale!r} (supported: one positive number)")
    return {"style": "monai", "blend": blend, "sigma_scale": float(sigma_scale)}


def _network(config: dict, in_channels: int, out_channels: int) -> dict:
    definition = _value(config, config.get("network_def"), "network_def")
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise ModelCardError("The bundle has no 'network_def' with a '_target_'")
    args = {key: value for key, value in definition.items() if not key.startswith("_")}
    expected = {"spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels}
    for key in NETWORK_ARGUMENTS_FROM_CARD:
        if key in args and args.pop(key) != expected[key]:
            raise ModelCardError(f"The bundle's network has {key}={definition[key]}, but its metadata implies {expected[key]}")
    return {"name": str(definition["_target_"]).rsplit(".", 1)[-1], "args": args}


def _labels(metadata: dict) -> tuple[list[dict], str]:
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if not outputs:
        raise ModelCardError("The bundle's metadata describes no network outputs")
    output = next(iter(outputs.values()))
    channels = {int(key): name for key, name in output.get("channel_def", {}).items()}
    if not channels or 0 not in channels:
        raise ModelCardError("The bundle's metadata gives no channel_def with a background channel 0")
    labels = [{"value": value, "name": name, "color": label_colour(index)}
              for index, (value, name) in enumerate(sorted(channels.items())) if value > 0]
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    modality = str(next(iter(inputs.values()), {}).get("modality", "OTHER")).upper()
    return labels, modality if modality in ("CT", "MR", "PT", "US") else "OTHER"


def _state_dict(path: Path) -> dict:
    state = load_pickled_weights(path)
    for key in ("model", "state_dict", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path.name} is not a state dict of tensors")
    return state


def default_name(bundle: str | Path) -> str:
    """A model name from the bundle's folder name."""
    return model_name(Path(bundle).resolve().name)


def import_bundle(bundle: str | Path, output: str | Path, name: str | None = None) -> dict:
    """A model card for a MONAI bundle folder; a ``model.pt`` is written to ``output`` as safetensors
    (an absolute path in the returned card, made relative by :func:`modelcard.save_card`)."""
    from .networks import build_network

    bundle, output = Path(bundle).resolve(), Path(output).resolve()
    what = "Not a MONAI bundle with JSON configs"
    metadata = read_json(bundle / "configs" / "metadata.json", what)
    config = read_json(bundle / "configs" / "inference.json", what)
    labels, modality = _labels(metadata)
    inputs = next(iter(metadata["network_data_format"]["inputs"].values()), {})
    channels = int(inputs.get("num_channels", 1))
    preprocessing = _preprocessing(config)
    if preprocessing["normalisation"] is None:
        preprocessing["normalisation"] = {"scheme": "none"}
    inferer = _value(config, config.get("inferer", {}), "inferer")
    if "roi_size" not in inferer:
        raise ModelCardError("The bundle's inferer gives no roi_size (a SlidingWindowInferer is needed)")
    card = {
        "schema_version": 1,
        "name": name or default_name(bundle),
        "title": str(metadata.get("name", bundle.name)), "version": str(metadata.get("version", "1.0.0")),
        "description": f"Imported from the MONAI bundle {bundle}: {metadata.get('description', '')}".strip(),
        "intended_use": str(metadata.get("intended_use", "Research use; imported MONAI bundle: check its terms")),
        "licence": str(metadata.get("license", "See the bundle's LICENSE")),
        "modality": modality,
        "channels": [{"name": f"channel {c}" if channels > 1 else modality, "normalisation": preprocessing["normalisation"]}
                     for c in range(channels)],
        "orientation": preprocessing["orientation"], "spacing": preprocessing["spacing"],
        "patch_size": [int(p) for p in inferer["roi_size"]],
        "inference": {"overlap": float(inferer.get("overlap", 0.25)), "mirror_axes": [], "grid": "first_voxel",
                      "sliding_window": _sliding_window(inferer), "normalise": preprocessing["normalise"],
                      "resample_back": _resampled_back(config)},
        "labels": labels,
    }
    checkpoint, torchscript = bundle / "models" / "model.pt", bundle / "models" / "model.ts"
    if not checkpoint.is_file():
        if torchscript.is_file():
            return import_exported(torchscript, card, "TorchScript")
        raise ModelCardError(f"The bundle has neither models/model.pt nor models/model.ts in {bundle}")
    card["architecture"] = _network(config, channels, len(labels) + 1)
    card["weights"] = [{"file": str(output / "model.safetensors"), "sha256": "0" * 64}]
    validate_card(card, f"Card for the bundle {bundle.name}")
    network = build_network(card["architecture"], channels, len(labels) + 1)
    try:
        network.load_state_dict(_state_dict(checkpoint), strict=True)
    except RuntimeError as error:
        raise WeightsError(f"{checkpoint.name} does not fit the bundle's network_def: {str(error).splitlines()[0]}") from None
    output.mkdir(parents=True, exist_ok=True)
    save_weights(network, output / "model.safetensors")
    card["weights"][0]["sha256"] = sha256_of(output / "model.safetensors")
    return card
