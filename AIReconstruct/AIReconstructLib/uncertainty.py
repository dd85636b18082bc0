"""How sure the model is: a per-voxel uncertainty map, a confidence score per segment, the regions
to check first, and how well the uncertainty finds the model's errors (docs/uncertainty.md).

- Uncertainty: the entropy of the mean softmax over the members (each mirrored copy the card
  allows; for networks with dropout, each of several Monte-Carlo dropout samples of them; for
  imported nnU-Net models, every fold's), divided by log(classes) so that it runs from 0 (certain)
  to 1 (all classes equally likely).
- Per segment: the mean uncertainty in the segment's boundary band (the voxels within one voxel of
  its surface, inside or out) and the agreement of the members with the result as mean Dice.
- Flagged regions: connected regions where the uncertainty exceeds a threshold, largest first.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .modelcard import Label
from .postprocess import largest_parts
from .volume import Volume, kji_to_patient


DROPOUT_SAMPLES = 8  # Monte-Carlo dropout samples unless the card's inference.dropout_samples says otherwise


def dropout_layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's dropout layers that drop something: switched on at inference for Monte-Carlo dropout."""
    return [m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]


def member_maps(member_logits: torch.Tensor) -> dict:
    """Everything the pipeline takes from the members ``[members, classes, z, y, x]``: the uncertainty
    and chosen-label probability maps (on their grid) and the agreement per label value."""
    return {"uncertainty": normalised_entropy(member_logits), "probability": chosen_probability(member_logits),
            "agreement": member_agreement(member_logits)}


def normalised_entropy(member_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the members' mean softmax / log(classes), for logits ``[members, classes, z, y, x]``."""
    classes = member_logits.shape[1]
    probabilities = torch.softmax(member_logits, dim=1).mean(dim=0)
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=0)
    return (entropy / np.log(classes)).clamp(0.0, 1.0)


def chosen_probability(member_logits: torch.Tensor) -> torch.Tensor:
    """The members' mean softmax probability of the label chosen from their mean logits: the model's
    confidence in its own answer, per voxel."""
    chosen = member_logits.mean(dim=0).argmax(dim=0)
    return torch.softmax(member_logits, dim=1).mean(dim=0).gather(0, chosen[None])[0]


def member_agreement(member_logits: torch.Tensor) -> dict[int, float]:
    """Mean Dice, per label value, between each member's argmax and the argmax of the mean logits."""
    final = member_logits.mean(dim=0).argmax(dim=0)
    members = member_logits.argmax(dim=1)
    agreement = {}
    for value in torch.unique(final).tolist():
        if value == 0:
            continue
        inside = final == value
        dice = [2.0 * (inside & (m == value)).sum().item() / (inside.sum().item() + (m == value).sum().item())
                for m in members]
        agreement[value] = float(np.mean(dice))
    return agreement


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (26-neighbourhood) of the mask's surface, on both sides."""
    structure = np.ones((3, 3, 3), bool)
    return ndimage.binary_dilation(mask, structure) & ~ndimage.binary_erosion(mask, structure, border_value=1)


def segment_confidence(labelmap: Volume, uncertainty: np.ndarray, labels: list[Label],
                       agreement: dict[int, float]) -> dict[str, dict]:
    """Per present segment: mean boundary-band uncertainty and the members' agreement (Dice)."""
    confidence = {}
    for label, box in zip(labels, _boxes(labelmap.array, labels)):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        band = boundary_band(labelmap.array[grown] == label.value)
        confidence[label.name] = {"boundary_uncertainty": round(float(uncertainty[grown][band].mean()), 4),
                                  "member_dice": round(agreement.get(label.value, 0.0), 4)}
    return confidence


def _boxes(array: np.ndarray, labels: list[Label]) -> list:
    boxes = ndimage.find_objects(array)
    return [boxes[label.value - 1] if 0 < label.value <= len(boxes) else None for label in labels]


def flagged_regions(uncertainty: Volume, threshold: float = 0.5, min_ml: float = 0.05, limit: int = 10,
                    coordinates: str = "LPS") -> list[dict]:
    """Connected regions with uncertainty above ``threshold`` and at least ``min_ml``, largest first:
    centre (patient mm), size (mL) and mean uncertainty."""
    components, _, largest = largest_parts(uncertainty.array > threshold, limit)
    kept = [(number, voxels, centre) for number, voxels, centre in largest
            if voxels * uncertainty.voxel_volume_ml >= min_ml]
    if not kept:
        return []
    means = ndimage.mean(uncertainty.array, components, [number for number, _, _ in kept])
    matrix = uncertainty.ijk_to_lps() if coordinates == "LPS" else uncertainty.ijk_to_ras()
    return [{"centre_mm": [round(float(c), 1) for c in kji_to_patient(centre, matrix)],
             "size_ml": round(voxels * uncertainty.voxel_volume_ml, 3), "mean_uncertainty": round(float(mean), 3)}
            for (_, voxels, centre), mean in zip(kept, means)]


def error_detection_auc(uncertainty: np.ndarray, prediction: np.ndarray, reference: np.ndarray) -> float | None:
    """Area under the ROC curve of the uncertainty as a detector of wrong voxels (0.5: no better than
    chance, 1: every wrong voxel more uncertain than every right one); None if none or all are wrong."""
    from scipy.stats import rankdata  # scipy.stats takes half a second to import: only where needed

    wrong = (prediction != reference).ravel()
    positives, total = int(wrong.sum()), wrong.size
    if positives in (0, total):
        return None
    order = rankdata(uncertainty.ravel())  # ties share their mean rank
    return float((order[wrong].sum() - positives * (positives + 1) / 2) / (positives * (total - positives)))
