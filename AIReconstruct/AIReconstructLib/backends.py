"""CPU inference through OpenVINO: the same network, compiled for the CPU it runs on.

On the CPUs measured here OpenVINO runs the project's 3D U-Nets in float32 about twice as fast as
eager PyTorch with the same labels (docs/benchmarks.md). A network is converted once per weights
and window shape and the converted model is kept in a cache folder, so later runs only compile it;
a model card's network is kept under a name made from the card (its architecture and the weights'
checksums), so a later run finds it without building the PyTorch module or importing MONAI.
Where OpenVINO is not installed, or cannot convert a network, the caller keeps PyTorch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_ENV = "AIRECONSTRUCT_CACHE"  # where converted networks are kept (default ~/.cache/aireconstruct)
# part of every converted network's name: raise it when conversion changes (2: a static window shape;
# SwinUNETR converted with dynamic shapes failed at its first window)
CONVERSION = 2


def cache_folder() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "aireconstruct") / "openvino"


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _openvino():
    """The ``openvino`` module, without its usage telemetry: by default its converter reports every
    import to Google Analytics from a process forked off the running engine, which a clinical tool
    must not do. With the telemetry package unimportable, OpenVINO uses its own no-op stand-in."""
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino


def _fingerprint(network: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    """A name for a network with its layers (their printed settings: activation, dropout...), its
    weights, the input shape and the OpenVINO version."""
    openvino = _openvino()
    digest = hashlib.sha256(f"{network!r}|{input_shape}|{openvino.__version__}|{CONVERSION}".encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def card_fingerprint(card, input_shape: tuple[int, ...]) -> str:
    """A name for a model card's network compiled for windows of ``input_shape``: its architecture,
    channel and class counts and the SHA-256 of its weights (which loading verifies), with the
    PyTorch and OpenVINO versions that convert it."""
    openvino = _openvino()
    described = {"architecture": card.data["architecture"], "channels": len(card.channels), "classes": card.num_classes,
                 "weights": [entry["sha256"] for entry in card.data["weights"]], "window": list(input_shape),
                 "torch": torch.__version__, "openvino": openvino.__version__, "conversion": CONVERSION}
    return "card-" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _digests(xml: Path) -> dict:
    """SHA-256 of a converted network's two files."""
    from .modelcard import sha256_of

    return {"xml": sha256_of(xml), "bin": sha256_of(xml.with_suffix(".bin"))}


def _write_digests(xml: Path, sidecar: Path) -> None:
    """Record the digests of a converted network's files (checked before it is compiled again)."""
    from .io import atomic_path

    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(_digests(xml)), encoding="utf-8")


def _intact(xml: Path) -> bool:
    """Whether a converted network is in the cache as it was written: the weights the card's checksum
    verified are not to be replaced by a changed copy behind it."""
    sidecar = xml.with_suffix(".sha256")
    if not (xml.is_file() and xml.with_suffix(".bin").is_file() and sidecar.is_file()):
        return False
    try:
        return json.loads(sidecar.read_text(encoding="utf-8")) == _digests(xml)
    except ValueError:
        return False


class OpenVinoNetwork:
    """A network compiled by OpenVINO for windows ``[1, channels, z, y, x]``; called on CPU tensors
    of such windows it returns their logits as a CPU tensor."""

    def __init__(self, network: torch.nn.Module | None, input_shape: tuple[int, ...], fingerprint: str):
        """Compiled from the cache under ``fingerprint``, converted from ``network`` first if not there."""
        ov = _openvino()

        self.input_shape = tuple(input_shape)
        path = cache_folder() / f"{fingerprint}.xml"
        if not _intact(path):
            if network is None:
                raise ValueError(f"{path.name} is missing, damaged or changed in the cache")
            from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

            with torch.inference_mode():
                # traced as convert_model would, but without PyTorch's check of the trace (tracing
                # again and comparing the two), which was most of the conversion's time: 11 of 14 s
                # for a 118-class nnU-Net network (the same route as Hugging Face's optimum-intel)
                decoder = TorchScriptPythonDecoder(network.eval(), example_input=torch.zeros(self.input_shape),
                                                   trace_kwargs={"check_trace": False})
                model = ov.convert_model(decoder, input=[self.input_shape])
                del decoder
            # a converted network that cannot run a window is not kept (the caller keeps PyTorch)
            ov.Core().compile_model(model, "CPU")(np.zeros(self.input_shape, np.float32))
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.stem}.{os.getpid()}.xml")
            ov.save_model(model, str(temporary), compress_to_fp16=False)  # the .bin beside it
            _write_digests(temporary, path.with_suffix(".sha256"))
            temporary.with_suffix(".bin").replace(path.with_suffix(".bin"))
            temporary.replace(path)
            del model
        # always the saved copy: a converted model can share memory with the module's weights, which
        # change when another fold is loaded into the same module
        model = ov.Core().read_model(str(path))
        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                               "PERFORMANCE_HINT": "LATENCY"})

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of ``[n, channels, z, y, x]`` (compiled for one window: run one at a time)."""
        if tuple(batch.shape[1:]) != self.input_shape[1:]:
            raise ValueError(f"compiled for windows of {self.input_shape[1:]}, given {tuple(batch.shape[1:])}")
        windows = [np.ascontiguousarray(batch[n:n + 1].numpy(), dtype=np.float32) for n in range(len(batch))]
        return torch.cat([torch.from_numpy(np.asarray(self.compiled(window)[0])) for window in windows])


# this process's compiled networks (None: conversion failed), by fingerprint; one kept at a time
# (each holds its weights and activation buffers: an nnU-Net model's folds, run one after the
# other, would otherwise all stay in memory), failures remembered
_COMPILED: dict[str, OpenVinoNetwork | None] = {}


def _keep_one(fingerprint: str, compiled: OpenVinoNetwork | None) -> OpenVinoNetwork | None:
    for known in [key for key, value in _COMPILED.items() if value is not None]:
        del _COMPILED[known]
    _COMPILED[fingerprint] = compiled
    return compiled


def cached_for_cpu(fingerprint: str, input_shape: tuple[int, ...]) -> OpenVinoNetwork | None:
    """The network converted earlier under ``fingerprint`` (see :func:`card_fingerprint`), compiled
    for windows of ``input_shape`` without PyTorch's module; ``None`` when it is not in the cache."""
    window = (1, *tuple(input_shape)[1:])
    if _COMPILED.get(fingerprint) is not None:
        return _COMPILED[fingerprint]
    if not openvino_available() or not (cache_folder() / f"{fingerprint}.xml").is_file():
        return None
    try:
        compiled = OpenVinoNetwork(None, window, fingerprint)
    except Exception as error:  # a damaged cache file: converted again from the network
        log.warning("The cached OpenVINO network could not be read (%s); converting it again", str(error).splitlines()[0][:200])
        (cache_folder() / f"{fingerprint}.xml").unlink(missing_ok=True)
        return None
    return _keep_one(fingerprint, compiled)


def compiled_for_cpu(network: torch.nn.Module, input_shape: tuple[int, ...], fingerprint: str | None = None):
    """``network`` with its current weights compiled by OpenVINO for windows of ``input_shape``
    (``[n, channels, z, y, x]``), or ``None`` (OpenVINO missing, the network not a plain PyTorch
    module, or a conversion that fails: logged, PyTorch is kept). Networks whose weights change
    between calls (the folds of an nnU-Net model) get one compiled model per set of weights; a
    ``fingerprint`` given (a card's) names the network instead of its weights."""
    if not openvino_available() or isinstance(network, torch.jit.ScriptModule) \
            or not any(True for _ in network.parameters()):
        return None
    window = (1, *tuple(input_shape)[1:])
    fingerprint = fingerprint or _fingerprint(network, window)
    if fingerprint not in _COMPILED:
        _keep_one(fingerprint, None)  # the one kept before is freed before the next one is compiled
        try:
            _keep_one(fingerprint, OpenVinoNetwork(network, window, fingerprint))
        except Exception as error:  # OpenVINO's converters raise many kinds; PyTorch still works
            log.warning("OpenVINO could not convert the network (%s); using PyTorch", str(error).splitlines()[0][:200])
            # None stays remembered: not tried again in this process
    return _COMPILED[fingerprint]
