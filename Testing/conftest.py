"""Shared fixtures: small phantoms and a tiny model folder that the tests make themselves."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AIReconstructLib.io import volume_to_sitk
from AIReconstructLib.modelcard import CARD_FILE, sha256_of
from AIReconstructLib.networks import build_network, save_weights
from AIReconstructLib.volume import Volume

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# networks compiled by OpenVINO are cached here for the session, not in the user's home, and removed
# when the session ends
if "AIRECONSTRUCT_CACHE" not in os.environ:
    SESSION_CACHE = tempfile.TemporaryDirectory(prefix="aireconstruct-test-cache-")
    os.environ["AIRECONSTRUCT_CACHE"] = SESSION_CACHE.name

# pytest-xdist runs the test files in several worker processes (pyproject's addopts): the cores are
# shared out between them, for the worker's own torch and for the processes its tests start (a
# worker whose torch used every core beside another's made the suite a third slower, not faster)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    WORKER_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["AIRECONSTRUCT_SITE_THREADS"] = str(WORKER_THREADS)
    torch.set_num_threads(WORKER_THREADS)


class PickleExploit:
    """Unpickling this writes a file: the proof that a loader ran a pickle."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def oblique_direction(angle_deg: float = 20.0) -> np.ndarray:
    """A rotation about an oblique axis: every voxel axis is tilted against L, P and S."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    a = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def write_dicom_series(folder: Path, volume: Volume, series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
                       skip_slices=(), z_offsets=None, description: str | None = None) -> Path:
    """Write ``volume`` as one CT DICOM file per slice; ``skip_slices`` and ``z_offsets`` make bad series."""
    folder.mkdir(parents=True, exist_ok=True)
    image = volume_to_sitk(volume)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k in skip_slices:
            continue
        slice_image = image[:, :, k]
        position = list(image.TransformIndexToPhysicalPoint((0, 0, k)))
        if z_offsets is not None:
            position[2] += z_offsets[k]
        tags = {"0010|0010": "Phantom^Test", "0010|0020": "PHANTOM-1", "0020|0010": "1", "0020|0011": "1",
                "0008|0020": "20261203", "0008|0030": "120000", "0008|0021": "20261203", "0008|0031": "120000",
                "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125", "0020|000e": series_uid,
                "0020|0052": "1.2.826.0.1.3680043.2.1125.2",  # frame of reference
                "0020|0013": str(k + 1), "0020|0032": "\\".join(map(str, position)),
                "0020|0037": "\\".join(map(str, [*volume.direction[:, 0], *volume.direction[:, 1]])),
                "0018|0050": str(volume.spacing[2]),
                "0028|0030": f"{volume.spacing[1]}\\{volume.spacing[0]}"}
        if description:
            tags["0008|103e"] = description
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{k:03d}.dcm"))
        writer.Execute(slice_image)
    return folder


def tensorboard_scalars(folder: Path, tag: str) -> list:
    """The scalar events of ``tag`` in the TensorBoard logs of ``folder``; the test is skipped without
    the tensorboard package (the test extra installs it)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="the tensorboard package is not installed (the test extra installs it)")
    return accumulator.EventAccumulator(str(folder)).Reload().Scalars(tag)


def noise_ct(shape, spacing=(4, 4, 4), seed: int = 0) -> Volume:
    """A CT-like noise volume (soft tissue with an air slab) for runs that only need many windows."""
    array = np.random.default_rng(seed).normal(0, 100, shape).astype(np.int16)
    array[:2] = -1000
    return Volume(array, spacing)


def tiny_card(name: str = "tiny-test-model") -> dict:
    return {
        "schema_version": 1, "name": name, "title": "Tiny test model", "version": "0.0.1",
        "intended_use": "Tests only", "licence": "Apache-2.0", "modality": "CT",
        "channels": [{"name": "CT", "normalisation": {"scheme": "ct", "clip": [-1000, 1000], "mean": 0, "std": 300}}],
        "spacing": [4.0, 4.0, 4.0], "fast_spacing": [6.0, 6.0, 6.0], "patch_size": [32, 32, 32],
        "inference": {"overlap": 0.25, "mirror_axes": [0, 1, 2]},
        "architecture": {"name": "UNet", "args": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "labels": [
            {"value": 1, "name": "organ", "color": [0.8, 0.2, 0.2],
             "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]},
             "postprocess": {"keep_largest": True}},
            {"value": 2, "name": "lesion", "color": [0.2, 0.8, 0.2]},
        ],
        "weights": [{"file": "model.safetensors", "sha256": "0" * 64}],
    }


def write_model(folder: Path, card: dict | None = None, seed: int = 0) -> Path:
    """Write a model folder with random (seeded) weights; returns the card path."""
    card = card or tiny_card()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    network = build_network(card["architecture"], len(card["channels"]), max(l["value"] for l in card["labels"]) + 1)
    weights = card["weights"][0]
    save_weights(network, folder / weights["file"])
    weights["sha256"] = sha256_of(folder / weights["file"])
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2), encoding="utf-8")
    return folder / CARD_FILE


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return write_model(tmp_path / "tiny-model")


@pytest.fixture
def ct_volume() -> Volume:
    """A small CT-like volume: a bright ellipsoid in a soft-tissue body surrounded by air, anisotropic spacing."""
    k, j, i = np.mgrid[0:24, 0:40, 0:48]
    inside = ((i - 24) / 14.0) ** 2 + ((j - 20) / 11.0) ** 2 + ((k - 12) / 7.0) ** 2 < 1
    body = ((i - 24) / 22.0) ** 2 + ((j - 20) / 18.0) ** 2 < 1
    rng = np.random.default_rng(0)
    array = np.where(inside, 120, np.where(body, 30, -1000)).astype(np.int16)
    array += rng.normal(0, 5, inside.shape).astype(np.int16)
    return Volume(array, (2.0, 2.5, 4.0), (-40.0, 10.0, 5.0), np.eye(3))
