"""Is the model's confidence honest? Reliability table, expected calibration error (ECE), reliability
diagram, and how well the uncertainty finds wrong voxels, over the cases of a labelled dataset.

The confidence of a voxel is the mean softmax probability (over the TTA members) of the label the
model chose. Voxels are pooled over all cases into equal-width confidence bins; ECE is the
voxel-weighted mean of |accuracy - mean confidence| over the bins. Background far from any
structure is trivially right and confident, so the figures are given for the region of interest
(voxels within ``margin`` voxels of the prediction or the reference) and for the whole image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .uncertainty import error_detection_auc


class Reliability:
    """Voxel counts, summed confidence and correct voxels per confidence bin."""

    def __init__(self, bins: int = 15):
        self.edges = np.linspace(0.0, 1.0, bins + 1)
        self.count = np.zeros(bins)
        self.confidence = np.zeros(bins)
        self.correct = np.zeros(bins)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Pool more voxels (confidence in [0, 1], correct as booleans)."""
        index = np.clip(np.digitize(confidence.ravel(), self.edges[1:-1]), 0, len(self.count) - 1)
        self.count += np.bincount(index, minlength=len(self.count))
        self.confidence += np.bincount(index, weights=confidence.ravel().astype(np.float64), minlength=len(self.count))
        self.correct += np.bincount(index, weights=correct.ravel().astype(np.float64), minlength=len(self.count))

    def table(self) -> list[dict]:
        """Per non-empty bin: its range, voxels, mean confidence and accuracy."""
        return [{"from": float(self.edges[b]), "to": float(self.edges[b + 1]), "voxels": int(self.count[b]),
                 "confidence": float(self.confidence[b] / self.count[b]), "accuracy": float(self.correct[b] / self.count[b])}
                for b in range(len(self.count)) if self.count[b]]

    def ece(self) -> float:
        """Expected calibration error: sum over bins of (voxels / all voxels) * |accuracy - confidence|."""
        total = self.count.sum()
        return float(sum(row["voxels"] / total * abs(row["accuracy"] - row["confidence"]) for row in self.table()))


def region_of_interest(prediction: np.ndarray, reference: np.ndarray, margin: int = 3) -> np.ndarray:
    """Voxels within ``margin`` voxels of the prediction's or the reference's foreground."""
    foreground = (prediction > 0) | (reference > 0)
    return ndimage.binary_dilation(foreground, iterations=margin) if foreground.any() else foreground


def plot_reliability(reliability: dict[str, Reliability], path: str | Path) -> bool:
    """Reliability diagram (accuracy against confidence per bin, with the diagonal) as a PNG; False
    if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, table in reliability.items():
        rows = table.table()
        axes.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                  label=f"{name} (ECE {table.ece():.3f})")
    axes.set(xlabel="confidence (mean softmax of the chosen label)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def reliability_tables() -> dict[str, Reliability]:
    """Empty tables for the two regions the figures are given for."""
    return {"region of interest": Reliability(), "whole image": Reliability()}


def pool_case(confidence: np.ndarray, prediction: np.ndarray, reference: np.ndarray,
              reliability: dict[str, Reliability]) -> np.ndarray:
    """Add one case's voxels to the tables of :func:`reliability_tables`; returns its region of interest."""
    correct = prediction == reference
    roi = region_of_interest(prediction, reference)
    reliability["region of interest"].add(confidence[roi], correct[roi])
    reliability["whole image"].add(confidence, correct)
    return roi


def case_figures(confidence: np.ndarray, uncertainty: np.ndarray, prediction: np.ndarray, reference: np.ndarray,
                 reliability: dict[str, Reliability]) -> dict:
    """Pool one case into the reliability tables ("region of interest", "whole image") and return its
    own figures: error-detection AUC of the uncertainty (whole image and region) and the error rate."""
    roi = pool_case(confidence, prediction, reference, reliability)
    correct = prediction == reference
    return {"uncertainty_error_auc": error_detection_auc(uncertainty, prediction, reference),
            "uncertainty_error_auc_roi": error_detection_auc(uncertainty[roi], prediction[roi], reference[roi]),
            "wrong_voxels": int((~correct).sum())}


def run_calibration(dataset_folder, model: str, output, cases=None, device: str = "auto", progress=None, cancel=None):
    """Segment each case of a data set with uncertainty, pool the reliability tables and write
    ``calibration.json``, ``calibration.md`` and ``reliability.png`` to ``output``; returns (text, data)."""
    import json

    from .dataset import read_dataset
    from .errors import InputError
    from .io import StagedOutput, read_image_for_model, read_labelmap
    from .modelcard import find_model
    from .pipeline import SegmentOptions, segment

    dataset, card = read_dataset(dataset_folder), find_model(model)
    chosen = [case for case in dataset.cases if not cases or case.case_id in cases]
    if not chosen:
        raise InputError(f"None of the cases {', '.join(cases)} is in {dataset.folder.name}")
    report = progress or (lambda fraction, message: None)
    reliability = reliability_tables()
    per_case = {}
    for index, case in enumerate(chosen):
        channels = [read_image_for_model(path) for path in case.images]
        result = segment(channels, card, SegmentOptions(device=device, uncertainty=True),
                         lambda f, m: report((index + f) / len(chosen), f"{case.case_id}: {m}"), cancel)
        reference = read_labelmap(case.label, like=channels[0]).array
        per_case[case.case_id] = case_figures(result.probability.array, result.uncertainty.array,
                                              result.labelmap.array, reference, reliability)
    data = {"model": card.name, "dataset": dataset.folder.name, "cases": per_case,
            "ece": {name: table.ece() for name, table in reliability.items()},
            "reliability": {name: table.table() for name, table in reliability.items()}}
    aucs = [figures["uncertainty_error_auc_roi"] for figures in per_case.values() if figures["uncertainty_error_auc_roi"]]
    data["mean_uncertainty_error_auc_roi"] = float(np.mean(aucs)) if aucs else None
    lines = [f"# Calibration of {card.name} on {dataset.folder.name}", "",
             "| case | wrong voxels | AUC (whole image) | AUC (region of interest) |", "|---|---:|---:|---:|"]
    for case_id, figures in per_case.items():
        auc, auc_roi = figures["uncertainty_error_auc"], figures["uncertainty_error_auc_roi"]
        lines.append(f"| {case_id} | {figures['wrong_voxels']} | {auc if auc is None else f'{auc:.3f}'} | "
                     f"{auc_roi if auc_roi is None else f'{auc_roi:.3f}'} |")
    lines += ["", *(f"ECE ({name}): {ece:.4f}" for name, ece in data["ece"].items())]
    with StagedOutput(output) as out:
        out.write_text("calibration.json", json.dumps(data, indent=2))
        if plot_reliability(reliability, out.path("reliability.png")):
            lines += ["", "![Reliability diagram](reliability.png)"]
        out.write_text("calibration.md", "\n".join(lines) + "\n")
        written = out.commit()
    return "\n".join(lines) + "\n" + "\n".join(f"wrote {p}" for p in written), {"outputs": [str(p) for p in written], **data}
