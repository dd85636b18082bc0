"""``make demo`` / ``aireconstruct demo``: the main job end to end on the bundled demo model.

Makes a synthetic abdominal CT phantom (a seed the demo model never saw in training), segments
it, writes the Slicer-ready ``.seg.nrrd``, a NIfTI label map, one STL and one VTP mesh per
segment, one GLB scene of all of them, an HTML report (measurements, lesion distances and remnant,
slices, 3D view, Dice against the phantom's exact truth) and a summary, then measures Dice on a
few more unseen phantoms.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import AIReconstructError
from .export import export_segmentation
from .io import StagedOutput, write_volume
from .metrics import evaluate
from .modelcard import find_model
from .phantom import make_phantom
from .pipeline import SegmentOptions, segment
from .report import build_report, write_report

DEMO_MODEL = "demo-abdomen-ct"


def _summary_markdown(card, scores: dict, per_case: list[dict], seconds: float, volumes: dict) -> str:
    lines = [f"# AIReconstruct demo — {card.data['title']}", "", f"Model: `{card.name}` — {card.data['intended_use']}", "",
             "| segment | volume (mL) | Dice | HD95 (mm) |", "|---|---:|---:|---:|"]
    for name, s in scores["labels"].items():
        lines.append(f"| {name} | {volumes[name]:.1f} | {s['dice']:.3f} | {s['hd95_mm']:.1f} |")
    each = ", ".join(f"seed {c['seed']}: {c['mean_dice']:.3f}" for c in per_case)
    overall = np.mean([c["mean_dice"] for c in per_case])
    lines += ["", f"Mean Dice on the demo phantom: {scores['mean']['dice']:.3f}; segmentation took {seconds:.1f} s.", "",
              f"Mean Dice on each unseen phantom: {each}; overall {overall:.3f}."]
    return "\n".join(lines) + "\n"


def run_demo(output: Path, seed: int = 7, extra_cases: int = 2, device: str = "auto", progress=None, cancel=None):
    """Run the demo into ``output``; returns (text to print, data)."""
    if seed >= 1000:
        raise AIReconstructError("Demo seeds from 1000 on were used to train the demo model; pick a seed below 1000")
    report = progress or (lambda fraction, message: None)
    card = find_model(DEMO_MODEL)
    options = SegmentOptions(device=device)
    seeds = [seed] + [seed + 1 + n for n in range(extra_cases)]
    per_case = []
    with StagedOutput(output) as out:
        for index, case_seed in enumerate(seeds):
            phantom = make_phantom(case_seed)
            share = 1.0 / len(seeds)
            started = time.perf_counter()
            result = segment([phantom.image], card, options,
                             lambda f, m: report((index + f) * share, f"case {index + 1}/{len(seeds)}: {m}"), cancel)
            seconds = time.perf_counter() - started
            scores = evaluate(result.labelmap, phantom.labels, result.label_names)
            per_case.append({"seed": case_seed, "mean_dice": scores["mean"]["dice"], "seconds": round(seconds, 2)})
            if index == 0:
                stem = f"phantom_{case_seed:04d}"
                write_volume(phantom.image, out.path(f"{stem}_ct.nii.gz"))
                summary = export_segmentation(result, out, stem, (".stl", ".vtp", ".glb", ".3mf"))
                page, summary["measurements"] = build_report(phantom.image, result.labelmap, card.labels, card.data,
                                                             reference=phantom.labels, image_name=f"{stem}_ct.nii.gz")
                write_report(page, out.path(f"{stem}_report.html"))
                summary["dice"] = {name: s["dice"] for name, s in scores["labels"].items()}
                summary["mean_dice"] = scores["mean"]["dice"]
                first_scores, first_seconds = scores, seconds
        mean_unseen = float(np.mean([c["mean_dice"] for c in per_case]))
        summary.update(unseen_cases=per_case, mean_dice_unseen=mean_unseen)
        markdown = _summary_markdown(card, first_scores, per_case, first_seconds, summary["volumes_ml"])
        out.write_text("summary.md", markdown)
        out.write_text(f"phantom_{seed:04d}_summary.json", json.dumps(summary, indent=2))
        written = out.commit()
    text = markdown + "\nFiles written to " + str(output.resolve()) + ":\n" + "\n".join(
        f"  {path.relative_to(output)}" for path in written)
    return text, {"outputs": [str(p) for p in written], "mean_dice_unseen": mean_unseen}
