"""Clicks to correct the brain-tumour model on held-out BraTS cases, and the time of each interaction.

    python benchmarks/interaction_benchmark.py [--cases BRATS_004 BRATS_005] [--clicks 10] [--start model|empty|box]

For each case, the start is the bundled brain-tumour model's segmentation, an empty mask, or (``box``)
what each method segments in a box drawn around the tumour (the expert mask's bounding box) from an
empty mask; a simulated user then clicks in the largest error region each time (include where the tumour was
missed, exclude where it was wrongly added), and ``refine`` corrects the segment. Prints the Dice
after 1, 3, 5 and 10 clicks, the number of clicks to reach Dice 0.85 and 0.90 (NoC@85, NoC@90;
the click budget plus one when never reached) and the time per interaction, for each method
measured in this run: the non-learned marker-controlled watershed of ``AIReconstructLib.interaction`` and, with
``--guided CARD``, a guided model. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AIReconstruct"))
from AIReconstructLib import interaction  # noqa: E402
from AIReconstructLib.io import read_image_for_model, read_labelmap  # noqa: E402
from AIReconstructLib.modelcard import find_model  # noqa: E402
from AIReconstructLib.guided import GuidedRefiner  # noqa: E402
from AIReconstructLib.modelcard import load_card  # noqa: E402
from AIReconstructLib.pipeline import SegmentOptions, segment  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset001_BrainTumourFLAIR"


def timed(method, seconds: list[float]):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = method(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        return result
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["BRATS_004", "BRATS_005"])
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--start", choices=["model", "empty", "box"], default="model")
    parser.add_argument("--reach", type=float, default=20.0, help="mm around each point that may change")
    parser.add_argument("--guided", help="also a guided model (its card), measured in the same run")
    args = parser.parse_args()

    methods = {"watershed (non-learned)": interaction.refine}
    if args.guided:
        methods[f"guided model ({load_card(args.guided).name})"] = GuidedRefiner(load_card(args.guided))
    seconds = {name: [] for name in methods}
    card = find_model("brain-tumour-flair")
    rows = []
    for case in args.cases:
        image = read_image_for_model(DATA / "imagesTr" / f"{case}_0000.nii.gz")
        truth = read_labelmap(DATA / "labelsTr" / f"{case}.nii.gz", like=image).array > 0
        start = (segment([image], card, SegmentOptions(device="cpu")).labelmap.array > 0
                 if args.start == "model" else np.zeros_like(truth))
        corners = np.argwhere(truth)
        box = (tuple(corners.min(axis=0)), tuple(corners.max(axis=0)))
        for name, method in methods.items():
            method = timed(method, seconds[name])
            if args.start == "box":
                start = method(image, np.zeros_like(truth), [], box=box, reach_mm=args.reach)
            scores = interaction.simulate(image, start, truth, args.clicks, reach_mm=args.reach, method=method)
            first = interaction.dice(start, truth)
            reached = [interaction.clicks_to_reach(first, scores, target) for target in (0.85, 0.90)]
            rows.append((name, case, first, scores, [args.clicks + 1 if n is None else n for n in reached]))
            print(f"{case}, {name}: start Dice {rows[-1][2]:.3f}, after each click "
                  f"{' '.join(f'{s:.3f}' for s in scores)}", flush=True)
    print(f"\nstart: {args.start}; reach {args.reach:g} mm; {os.cpu_count()} CPU cores")
    print("| method | case | start | 1 click | 3 clicks | 5 clicks | 10 clicks | NoC@85 | NoC@90 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, case, first, scores, reached in rows:
        at = [scores[n - 1] if n <= len(scores) else float("nan") for n in (1, 3, 5, 10)]
        print(f"| {name} | {case} | {first:.3f} | " + " | ".join(f"{s:.3f}" for s in at) + f" | {reached[0]} | {reached[1]} |")
    for name in methods:
        noc = np.mean([r[4] for r in rows if r[0] == name], axis=0)
        print(f"{name}: mean NoC@85 {noc[0]:.1f}, NoC@90 {noc[1]:.1f}; time per interaction: mean {np.mean(seconds[name]):.2f} s, "
              f"max {np.max(seconds[name]):.2f} s over {len(seconds[name])} interactions")


if __name__ == "__main__":
    main()
