"""The engine against nnU-Net's own predictor on the same nnU-Net model folder and image.

    python benchmarks/nnunet_benchmark.py [--work /tmp/aireconstruct-nnunet-bench] [--case ct256] [--no-mirroring]
                                          [--cpu-bfloat16]

Makes (once, in --work) a small nnU-Net v2 model folder with nnU-Net's own planner and trainer
(Testing/nnunet_reference.py: two folds, a few training iterations on phantoms), imports it with
``aireconstruct import-model nnunet``, writes a phantom CT, then runs in one go, each in a fresh
process from this light parent, file in -> label file out:
- nnU-Net: ``nnUNetPredictor.predict_from_files_sequential`` (step 0.5, Gaussian, both folds,
  mirroring unless --no-mirroring), on the CPU;
- the engine: ``aireconstruct segment --tta --no-postprocess`` (same folds, mirroring, step), on the CPU,
  with PyTorch and with OpenVINO (its first run converts the networks, a second runs warm);
and prints the wall times, their ratios, the peak RSS, and the voxel agreement of the label maps.
``--cpu-bfloat16`` runs the engine's network in bfloat16 (``segment --cpu-bfloat16``).
Needs the test extra (nnunetv2). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent / "Testing" / "nnunet_reference.py"
CASES = {  # name -> (spacing i j k mm, field of view mm) of the phantom CT
    "ct256": ((1.5, 1.5, 2.0), (384.0, 288.0, 300.0)),  # 256 x 192 x 150
    "ct512": ((0.8, 0.8, 1.5), (409.6, 409.6, 450.0)),  # 512 x 512 x 300
}


def timed_child(command: list[str]) -> tuple[float, float]:
    """Run a command in a fresh process; (wall seconds, that process's peak RSS in MiB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "aireconstruct-nnunet-bench"))
    parser.add_argument("--case", choices=sorted(CASES), default="ct256")
    parser.add_argument("--no-mirroring", action="store_true")
    parser.add_argument("--cpu-bfloat16", action="store_true", help="the engine's network in bfloat16")
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable

    model = work / "nnUNet_results" / "Dataset042_Phantoms" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if not model.is_dir():
        print("making the nnU-Net model folder with nnU-Net's planner and trainer ...", flush=True)
        subprocess.run([python, str(REFERENCE), "make-model", str(work)], check=True, capture_output=True)
    card = work / "card"
    subprocess.run([python, "-m", "AIReconstructLib", "import-model", "nnunet", str(model), "-o", str(card)],
                   check=True, capture_output=True)
    spacing, field_of_view = CASES[args.case]
    image = work / f"{args.case}-{args.seed}_0000.nii.gz"
    if not image.exists():
        subprocess.run([python, "-c", (
            "from AIReconstructLib.phantom import make_phantom; from AIReconstructLib.io import write_volume; "
            f"write_volume(make_phantom({args.seed}, spacing={spacing}, field_of_view_mm={field_of_view}).image, "
            f"'{image}')")], check=True)

    theirs, ours = work / "nnunet.nii.gz", work / "engine"
    job = work / "nnunet-job.json"
    job.write_text(json.dumps([{"model": str(model), "image": str(image), "output": str(theirs), "folds": [0, 1],
                                "mirroring": not args.no_mirroring}]))
    nnunet_seconds, nnunet_rss = timed_child([python, str(REFERENCE), "predict", str(job)])
    import numpy as np
    import SimpleITK as sitk

    def engine(backend: str):
        """One engine run in a fresh process: seconds, peak RSS, label map."""
        command = [python, "-m", "AIReconstructLib", "segment", "-m", str(card), "-o", str(ours), "--device", "cpu",
                   "--no-postprocess", "--json-progress", "--backend", backend, str(image)] \
            + ([] if args.no_mirroring else ["--tta"]) + (["--cpu-bfloat16"] if args.cpu_bfloat16 else [])
        seconds, rss = timed_child(command)
        labels = ours / image.name.replace("_0000.nii.gz", "_0000_labels.nii.gz")
        return seconds, rss, sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(theirs)))
    runs = {"engine, PyTorch": engine("torch"), "engine, OpenVINO (first run: converts)": engine("openvino"),
            "engine, OpenVINO": engine("openvino")}
    size = sitk.ReadImage(str(image)).GetSize()
    print(f"case {args.case} {size[0]}x{size[1]}x{size[2]}, 2 folds, mirroring {'off' if args.no_mirroring else 'on'}, "
          f"CPU threads {os.cpu_count()}, engine network in {'bfloat16' if args.cpu_bfloat16 else 'float32'}")
    print("| | end to end (s) | nnU-Net / this | peak RSS (MiB) | equal voxels with nnU-Net |")
    print("|---|---:|---:|---:|---:|")
    print(f"| nnU-Net predictor | {nnunet_seconds:.1f} | 1.00x | {nnunet_rss:.0f} | - |")
    for name, (seconds, rss, labels) in runs.items():
        print(f"| {name} | {seconds:.1f} | {nnunet_seconds / seconds:.2f}x | {rss:.0f} | {float(np.mean(a == labels)):.5f} |")


if __name__ == "__main__":
    main()
