"""Shared fixtures: small phantoms and a tiny model folder that the tests make themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from AIReconstructLib.modelcard import CARD_FILE, sha256_of
from AIReconstructLib.networks import build_network, save_weights
from AIReconstructLib.volume import Volume

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def oblique_direction(angle_deg: float = 20.0) -> np.ndarray:
    """A rotation about an oblique axis: every voxel axis is tilted against L, P and S."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    a = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


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
        "weights": {"file": "model.safetensors", "sha256": "0" * 64},
    }


def write_model(folder: Path, card: dict | None = None, seed: int = 0) -> Path:
    """Write a model folder with random (seeded) weights; returns the card path."""
    card = card or tiny_card()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    network = build_network(card["architecture"], len(card["channels"]), max(l["value"] for l in card["labels"]) + 1)
    save_weights(network, folder / card["weights"]["file"])
    card["weights"]["sha256"] = sha256_of(folder / card["weights"]["file"])
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2), encoding="utf-8")
    return folder / CARD_FILE


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return write_model(tmp_path / "tiny-model")


@pytest.fixture
def ct_volume() -> Volume:
    """A small CT-like volume: a bright ellipsoid in soft tissue, anisotropic spacing."""
    k, j, i = np.mgrid[0:24, 0:40, 0:48]
    inside = ((i - 24) / 14.0) ** 2 + ((j - 20) / 11.0) ** 2 + ((k - 12) / 7.0) ** 2 < 1
    rng = np.random.default_rng(0)
    array = np.where(inside, 120, 30).astype(np.int16) + rng.normal(0, 5, inside.shape).astype(np.int16)
    return Volume(array, (2.0, 2.5, 4.0), (-40.0, 10.0, 5.0), np.eye(3))
