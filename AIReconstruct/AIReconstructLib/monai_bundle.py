"""MONAI bundles: read a bundle's network, preprocessing, sliding-window settings and label names
from its configs and write a model card, so the engine runs it like its own models.

The configs are read as data and never executed: ``@name`` references to plain values are
followed (``@name#key`` into nested ones); of ``$`` expressions, only a choice between two literal
values by a flag of the config (``$[1.5, 1.5, 1.5] if @options#highres else [3.0, 3.0, 3.0]``) is
read, without evaluating code; any other is refused where the card needs a value. Weights come from
``models/model.pt`` (or the file the config's ``modelname`` names; loaded with ``weights_only=True``
and rewritten as safetensors) or, without it, ``models/model.ts`` (TorchScript). Supported preprocessing: loading, channel-first,
``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged`` (with clipping), ``NormalizeIntensityd``,
``ScaleIntensityd`` after them, and type conversions; outputs must be softmax/argmax label maps. The
inferer's window placement, blending (``mode``, ``sigma_scale``) and padding go into the card, so
windows are placed, padded and blended as MONAI's ``SlidingWindowInferer`` does.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import AIReconstructError, Cancelled, ModelCardError, WeightsError
from .modelcard import label_colour, model_name, read_json, sha256_of, validate_card
from .networks import import_exported, load_pickled_weights, save_weights
from .totalsegmentator import label_info

NETWORK_ARGUMENTS_FROM_CARD = ("spatial_dims", "in_channels", "out_channels")
PASS_THROUGH = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "CastToType", "ToTensor",
                "ToDevice", "SaveImage", "Identity"}


REFERENCE = re.compile(r"@([A-Za-z_][\w#:]*)")
MISSING = object()


def _lookup(config: dict, reference: str):
    """The config entry ``name`` or ``name#key#...`` names (MONAI separates nested entries' keys
    with ``#``, or ``::``); :data:`MISSING` where the config holds none."""
    value = config
    for key in reference.replace("::", "#").split("#"):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return MISSING
    return value


def _choice(config: dict, expression: str):
    """The value ``$A if @flag else B`` picks (A and B literals, the flag a boolean of the config),
    read with :mod:`ast` and never run; None for any other expression."""
    references: list[str] = []
    source = REFERENCE.sub(lambda match: references.append(match.group(1)) or f"_reference{len(references) - 1}",
                           expression[1:])
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(tree, ast.IfExp) and isinstance(tree.test, ast.Name) and tree.test.id.startswith("_reference")):
        return None
    flag = _value(config, f"@{references[int(tree.test.id.removeprefix('_reference'))]}", expression)
    if not isinstance(flag, bool):
        return None
    try:
        return ast.literal_eval(tree.body if flag else tree.orelse)
    except ValueError:
        return None


def _value(config: dict, value, where: str):
    """A config value with ``@name`` references to other entries followed and a choice between
    literals read (:func:`_choice`); other expressions are refused."""
    for _ in range(10):
        if isinstance(value, str) and REFERENCE.fullmatch(value) and (found := _lookup(config, value[1:])) is not MISSING:
            value = found
        elif isinstance(value, str) and value.startswith("$") and (chosen := _choice(config, value)) is not None:
            value = chosen
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


def _component(config: dict, key: str):
    """The config entry ``key``, followed where it is a reference to another entry; its own fields
    are left as they are (they often hold expressions the card does not need)."""
    component = config.get(key)
    if isinstance(component, str) and REFERENCE.fullmatch(component):
        component = _lookup(config, component[1:])
    return component


def _target(component: dict) -> str:
    """The class name a component instantiates, without module path or the dictionary ``d`` suffix."""
    name = str(component.get("_target_", "")).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in {*PASS_THROUGH, "Orientation", "Spacing",
                                                               "ScaleIntensityRange", "NormalizeIntensity",
                                                               "ScaleIntensity"} else name


def _preprocessing(config: dict) -> dict:
    """Orientation, spacing and normalisation from the bundle's preprocessing transforms."""
    preprocessing = _value(config, config.get("preprocessing"), "preprocessing")
    transforms = preprocessing.get("transforms", []) if isinstance(preprocessing, dict) else []
    found = {"orientation": None, "spacing": None, "normalisation": None, "normalise": "before_resampling"}
    for transform in transforms:
        name = _target(transform)
        if name in ("ScaleIntensityRange", "NormalizeIntensity") and "rescale" in (found["normalisation"] or {}):
            raise ModelCardError(f"Bundle preprocessing: {transform.get('_target_')} after ScaleIntensityd is not supported")
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
        elif name == "ScaleIntensity":
            if (transform.get("factor") is not None or transform.get("channel_wise")
                    or transform.get("minv", 0.0) is None or transform.get("maxv", 1.0) is None):
                raise ModelCardError("ScaleIntensityd is supported with minv and maxv only (no factor, not channel-wise)")
            found["normalisation"] = {**(found["normalisation"] or {"scheme": "none"}),
                                      "rescale": [float(transform.get("minv", 0.0)), float(transform.get("maxv", 1.0))]}
        elif name not in PASS_THROUGH:
            raise ModelCardError(f"Bundle preprocessing transform '{transform.get('_target_')}' is not supported")
    missing = [key for key in ("orientation", "spacing") if found[key] is None]
    if missing:
        raise ModelCardError(f"The bundle's preprocessing gives no {' and no '.join(missing)} (Orientationd, Spacingd)")
    return found


def _resampled_back(config: dict) -> str:
    """What the bundle's postprocessing inverts the preprocessing on: labels when an argmax comes
    before ``Invertd``, probabilities when a softmax does, else the network's logits (only the
    transforms' names and plain flags are read: postprocessing often holds expressions, such as
    output folders)."""
    postprocessing = _component(config, "postprocessing")
    transforms = postprocessing.get("transforms", []) if isinstance(postprocessing, dict) else []
    found = "logits"
    for transform in transforms:
        name = _target(transform) if isinstance(transform, dict) else ""
        if name in ("Activations", "Activationsd") and transform.get("softmax") is True and found == "logits":
            found = "probabilities"
        elif name in ("AsDiscrete", "AsDiscreted") and transform.get("argmax") is True:
            found = "labels"
        elif name in ("Invert", "Invertd"):
            return found
    return "logits" if found == "labels" else found  # the argmax after inverting: on the input's grid


def _inferer(config: dict) -> dict:
    """The inferer's settings the card needs (its device and other expressions are not read)."""
    inferer = _component(config, "inferer")
    if not isinstance(inferer, dict) or "roi_size" not in inferer:
        raise ModelCardError("The bundle's inferer gives no roi_size (a SlidingWindowInferer is needed)")
    return {key: _value(config, inferer[key], f"inferer.{key}")
            for key in ("roi_size", "overlap", "mode", "sigma_scale", "padding_mode") if key in inferer}


def _sliding_window(inferer: dict) -> dict:
    """The inferer's window placement, blending (MONAI's defaults: equal weights, sigma 0.125) and
    padding of images smaller than a window (MONAI's default: zeros)."""
    blend, sigma_scale = inferer.get("mode", "constant"), inferer.get("sigma_scale", 0.125)
    padding = inferer.get("padding_mode", "constant")
    if blend not in ("constant", "gaussian"):
        raise ModelCardError(f"The bundle's inferer blends with mode '{blend}' (supported: constant, gaussian)")
    if not isinstance(sigma_scale, (int, float)) or sigma_scale <= 0:
        raise ModelCardError(f"The bundle's inferer has sigma_scale {sigma_scale!r} (supported: one positive number)")
    if padding not in ("constant", "replicate"):
        raise ModelCardError(f"The bundle's inferer pads with '{padding}' (supported: constant, replicate)")
    window = {"style": "monai", "blend": blend, "sigma_scale": float(sigma_scale)}
    return {**window, "padding": padding} if padding != "constant" else window


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
    """The labels of the output's ``channel_def`` (SNOMED CT codes and colours for the names in
    TotalSegmentator's mapping) and the input's modality."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if not outputs:
        raise ModelCardError("The bundle's metadata describes no network outputs")
    output = next(iter(outputs.values()))
    channels = {int(key): name for key, name in output.get("channel_def", {}).items()}
    if not channels or 0 not in channels:
        raise ModelCardError("The bundle's metadata gives no channel_def with a background channel 0")
    info = label_info()  # codes and colours for the structure names TotalSegmentator uses (its data's bundles)
    labels = [{"value": value, "name": name, "color": label_colour(index), **info.get(name, {})}
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


def _weights_file(config: dict) -> str:
    """The weights file in ``models/``: the one the config's ``modelname`` names where it has one
    (the whole-body bundle's choice by resolution), else ``model.pt``."""
    name = _value(config, config.get("modelname", "model.pt"), "modelname")
    if not isinstance(name, str) or Path(name).name != name:
        raise ModelCardError(f"The bundle's modelname {name!r} is not a file name in its models folder")
    return name


# MONAI's own download (Hugging Face, NGC, the bundle's release info, or a URL), run in a child
# process so that a cancel stops it midway; its temporary files go into the staging folder, which
# shows how far it got and is removed with whatever a stopped download left.
_DOWNLOAD_IN_CHILD = """
import logging, sys, warnings
for name in ("monai.bundle.scripts", "monai.apps"):  # not MONAI's summary of its own arguments
    logging.getLogger(name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message="No hash value provided")  # the card records hashes
from monai.bundle import download
try:
    download(name=sys.argv[1], bundle_dir=sys.argv[2], url=sys.argv[3] or None, progress=False)
except Exception as error:  # HTTP, network, archive and version-lookup errors alike
    sys.exit((str(error) or type(error).__name__).splitlines()[0])
"""


def _megabytes(folder: Path) -> float:
    """What the files under ``folder`` hold, in MB."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def download_bundle(folder: str | Path, url: str | None = None, progress: Callable[[float, str], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> Path:
    """Download the bundle of MONAI's model zoo that ``folder`` is named after into ``folder``, unless it
    is there, with MONAI's own download (its latest version from MONAI's hosting; ``url``: a zip of
    the bundle elsewhere). It is unpacked into a hidden staging folder beside ``folder`` and moved
    into place only when complete; ``progress(fraction, message)`` says how many MB have arrived
    (the total is not known beforehand), and ``cancel()`` returning True stops the download at once
    (raising :class:`Cancelled`) with nothing kept."""
    folder = Path(folder)
    if (folder / "configs").is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda fraction, message: None)
    report(0.0, f"downloading the MONAI bundle {folder.name} from {url or 'MONAI model zoo'}")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder.parent) as staging, \
            tempfile.TemporaryFile("w+") as errors:
        staging = Path(staging)
        (staging / "tmp").mkdir()
        environment = {**os.environ, "TMPDIR": str(staging / "tmp"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        child = subprocess.Popen([sys.executable, "-c", _DOWNLOAD_IN_CHILD, folder.name, str(staging / "bundle"),
                                  url or ""], env=environment, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=errors)
        try:
            arrived = 0.0
            while child.poll() is None:
                if cancel is not None and cancel():
                    raise Cancelled("Download cancelled by the user; nothing was kept")
                if (megabytes := _megabytes(staging)) >= arrived + 0.1:
                    arrived = megabytes
                    report(0.0, f"downloading the MONAI bundle {folder.name}: {arrived:.1f} MB so far")
                time.sleep(0.2)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode:
            errors.seek(0)
            reason = (errors.read().strip().splitlines() or [f"exit status {child.returncode}"])[-1]
            raise AIReconstructError(f"Cannot download the MONAI bundle {folder.name}: {reason}")
        unpacked = staging / "bundle" / folder.name
        if not (unpacked / "configs").is_dir():
            raise AIReconstructError(f"The download of {folder.name} holds no bundle folder {folder.name}/configs")
        unpacked.rename(folder)
    report(1.0, f"downloaded the MONAI bundle {folder.name}")
    return folder


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
    inferer = _inferer(config)
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
    checkpoint, torchscript = bundle / "models" / _weights_file(config), bundle / "models" / "model.ts"
    if not checkpoint.is_file():
        if torchscript.is_file():
            return import_exported(torchscript, card, "TorchScript")
        raise ModelCardError(f"The bundle has neither models/{checkpoint.name} nor models/model.ts in {bundle}")
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
