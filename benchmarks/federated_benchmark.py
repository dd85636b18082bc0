"""Federated against centralised and single-site training on the BraTS cases, by cross-validation.

    python benchmarks/federated_benchmark.py [--folds 3] [--rounds 10] [--local-iterations 40]
                                             [--patch-size 64 64 48] [--output federated-benchmark]

For each fold (the same splits as ``aireconstruct train --folds 3``), the training cases are dealt
to three sites (hospitals) and every arm trains with ``aireconstruct federated``'s code in Flower's
simulation runtime, then is scored on the fold's held-out cases:

- centralised: one site holding every training case;
- each site alone: one site with its own cases only;
- FedAvg and FedProx across the three sites.

Every arm gives each participating site the same number of optimisation steps (rounds x local
iterations), from the same initial weights, plan (spacing, patch size) and seeds. Prints a Markdown
table of the held-out Dice per fold and the mean +- standard deviation. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AIReconstruct"))
from AIReconstructLib.dataset import read_dataset  # noqa: E402
from AIReconstructLib.federated import FederatedConfig, simulate  # noqa: E402
from AIReconstructLib.training_data import make_folds  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset001_BrainTumourFLAIR"
SITES = 3


def subset(source, case_ids: list[str], folder: Path) -> str:
    """A data set folder holding some of ``source``'s cases, as links to its files (nothing copied)."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in source.cases:
        if case.case_id in case_ids:
            for image in case.images:
                (folder / "imagesTr" / image.name).symlink_to(image.resolve())
            (folder / "labelsTr" / case.label.name).symlink_to(case.label.resolve())
    meta = json.loads((source.folder / "dataset.json").read_text(encoding="utf-8"))
    (folder / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(case_ids)}), encoding="utf-8")
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-iterations", type=int, default=40)
    parser.add_argument("--patch-size", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0])
    parser.add_argument("--output", default="federated-benchmark")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is not here: this benchmark needs ../shared/data")
    source = read_dataset(DATA)
    output = Path(args.output).resolve()
    results: dict[str, list[float]] = {}
    for fold, split in enumerate(make_folds([c.case_id for c in source.cases], args.folds, 0.2, seed=0)):
        work = output / f"fold_{fold}"
        held_out = subset(source, split["validation"], work / "held_out")
        shares = [split["train"][n::SITES] for n in range(SITES)]
        sites = [subset(source, share, work / f"site_{n}") for n, share in enumerate(shares)]
        arms = {"centralised": ([subset(source, split["train"], work / "all")], "fedavg"),
                **{f"site {n} alone": ([site], "fedavg") for n, site in enumerate(sites)},
                "FedAvg, 3 sites": (sites, "fedavg"), "FedProx, 3 sites": (sites, "fedprox")}
        for arm, (arm_sites, strategy) in arms.items():
            started = time.time()
            card = simulate(FederatedConfig(
                sites=arm_sites, output=str(work / arm.replace(" ", "_").replace(",", "")), name="federated-benchmark",
                strategy=strategy, rounds=args.rounds, local_iterations=args.local_iterations,
                spacing=args.spacing, patch_size=args.patch_size, mirror_axes=[0, 1, 2], validation=held_out,
                validate_every=args.rounds, seed=fold))
            dice = json.loads(card.read_text(encoding="utf-8"))["training"]["validation_mean_dice"]
            results.setdefault(arm, []).append(dice)
            print(f"fold {fold} {arm}: held-out Dice {dice:.3f} ({(time.time() - started) / 60:.1f} min; "
                  f"train {split['train']}, held out {split['validation']})", flush=True)
    steps = args.rounds * args.local_iterations
    print(f"\n{args.folds}-fold cross-validation on {len(source.cases)} BraTS FLAIR cases, {SITES} sites; "
          f"{steps} steps per site ({args.rounds} rounds x {args.local_iterations}), batch 2, patch "
          f"{args.patch_size} at {args.spacing} mm\n")
    print("| arm | " + " | ".join(f"fold {n}" for n in range(args.folds)) + " | mean +- sd |")
    print("|---" * (args.folds + 2) + "|")
    for arm, scores in results.items():
        print(f"| {arm} | " + " | ".join(f"{s:.3f}" for s in scores) +
              f" | {np.mean(scores):.3f} +- {np.std(scores, ddof=1) if len(scores) > 1 else 0:.3f} |")


if __name__ == "__main__":
    main()
