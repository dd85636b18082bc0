"""Fine-tuning the demo model on corrected cases of a kind it never saw, measured on held-out cases.

    python benchmarks/finetune_benchmark.py [--cases 8] [--held-out 4] [--tumour-hu 170] [--epochs 6]

Phantoms whose liver tumours enhance (170 HU; the demo model learnt dark ones, 45 HU) are saved as
corrected cases (``dataset.save_case``, what the Slicer module's "Save for training" does), the demo
model is fine-tuned on them with ``aireconstruct finetune`` (whole network, and decoder only; each
also with ``--rehearse``: as many earlier scans of the original kind, images only, labelled by the
demo model itself), and the Dice of every label on held-out phantoms of the same kind is printed
before and after, with the Dice on phantoms of the original kind (what fine-tuning costs there,
and what rehearsal saves). Not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AIReconstruct"))
from AIReconstructLib.cli import main as aireconstruct  # noqa: E402
from AIReconstructLib.dataset import save_case  # noqa: E402
from AIReconstructLib.io import write_volume  # noqa: E402
from AIReconstructLib.metrics import overlap_scores  # noqa: E402
from AIReconstructLib.modelcard import find_model, load_card  # noqa: E402
from AIReconstructLib.phantom import make_phantom  # noqa: E402
from AIReconstructLib.pipeline import SegmentOptions, segment  # noqa: E402

SPACING = (3.0, 3.0, 3.0)


def dice_per_label(card, phantoms) -> dict[str, float]:
    scores: dict[str, list[float]] = {label.name: [] for label in card.labels}
    for phantom in phantoms:
        labels = segment([phantom.image], card, SegmentOptions(device="cpu")).labelmap.array
        for label in card.labels:
            reference = phantom.labels.array == label.value
            if reference.any():
                scores[label.name].append(overlap_scores(labels == label.value, reference)["dice"])
    return {name: float(np.mean(values)) for name, values in scores.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8, help="corrected cases to fine-tune on")
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--tumour-hu", type=float, default=170.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()

    base = find_model("demo-abdomen-ct")
    work = Path(tempfile.mkdtemp(prefix="finetune-benchmark-"))
    for seed in range(6000, 6000 + args.cases):
        phantom = make_phantom(seed, SPACING, tumour_hu=args.tumour_hu)
        save_case(work / "corrected", f"case_{seed}", [phantom.image], phantom.labels, base)
    (work / "earlier").mkdir()
    for seed in range(7000, 7000 + args.cases):  # scans of the kind the model knows, no labels
        write_volume(make_phantom(seed, SPACING).image, work / "earlier" / f"scan_{seed}.nii.gz")
    new_kind = [make_phantom(s, SPACING, tumour_hu=args.tumour_hu) for s in range(6500, 6500 + args.held_out)]
    old_kind = [make_phantom(s, SPACING) for s in range(6500, 6500 + args.held_out)]

    rows = [("base model", base, None)]
    rehearse = ["--rehearse", str(work / "earlier")]
    for number, (variant, extra) in enumerate((
            ("fine-tuned, whole network", []), ("fine-tuned, decoder only", ["--freeze-encoder"]),
            ("fine-tuned, whole network, rehearsal", rehearse),
            ("fine-tuned, decoder only, rehearsal", ["--freeze-encoder", *rehearse]))):
        started = time.perf_counter()
        output = work / f"variant{number}"
        aireconstruct(["finetune", "demo-abdomen-ct", str(work / "corrected"), "-o", str(output), "--device", "cpu",
                       "--epochs", str(args.epochs), "--iterations", str(args.iterations), *extra])
        rows.append((variant, load_card(output / "card.json"), time.perf_counter() - started))

    print(f"\n{args.cases} corrected phantoms with {args.tumour_hu:.0f} HU liver tumours, "
          f"{args.epochs} x {args.iterations} iterations; held-out: {args.held_out} phantoms of each kind\n")
    names = [label.name for label in base.labels]
    print("| model | minutes | " + " | ".join(names) + " | mean | mean, original kind |")
    print("|---" * (len(names) + 4) + "|")
    for variant, card, seconds in rows:
        new, old = dice_per_label(card, new_kind), dice_per_label(card, old_kind)
        cells = " | ".join(f"{new.get(name, float('nan')):.3f}" for name in names)
        minutes = f"{seconds / 60:.1f}" if seconds else "-"
        print(f"| {variant} | {minutes} | {cells} | {np.mean(list(new.values())):.3f} | "
              f"{np.mean(list(old.values())):.3f} |")


if __name__ == "__main__":
    main()
