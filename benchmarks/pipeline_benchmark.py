"""End-to-end segmentation against the bare network, and peak memory against the input's size.

    python benchmarks/pipeline_benchmark.py --case ct512 [--model demo-abdomen-ct] [--fast] [--device cpu]
    python benchmarks/pipeline_benchmark.py --case mri240 --model brain-tumour-flair   # a real BraTS FLAIR
    python benchmarks/pipeline_benchmark.py --case ct512 --device cuda --engine-only     # on a GPU machine

Prints, for one realistic case measured in one run:
- the bare network's sliding-window time on the prepared input in eager PyTorch float32 (the
  baseline) and through OpenVINO (the engine's CPU backend), with their label agreement;
- the engine's end-to-end time (``aireconstruct segment --surfaces`` in a fresh process: read,
  preprocess, predict, resample back, post-process, write, surfaces) per stage, and its ratio to
  the baseline (the second of two runs: the first converts the network for OpenVINO);
- a run as the Slicer module makes it: the adapter on a real MRML scene (the slicer-core package)
  from the volume node to the segmentation node in the scene: the input written for the engine,
  the engine worker the module keeps (``aireconstruct serve``, started when the panel opens; no
  meshes: Slicer makes its own), the result read into the scene; five runs on one scene: the first,
  and the median of the four later ones (a surgeon's second and later runs) with its ratio to the
  baseline;
- where the model's card crops to the body, the bare network on the body's box too (the part of the
  image the engine runs it on), and the later Slicer run's ratio to that;
- the peak RSS of that process, of a process that only imports the engine and loads the model, and
  the difference as a multiple of the input's float32 size.
- how long a fresh process takes to write 300 MiB of new memory, before and after (on a virtual
  machine whose host reclaims memory, a fresh run's stages pay for it: compare runs with care).
``--engine-only`` leaves out the Slicer run and the surfaces, for a machine that has only the
engine's core libraries (a lent GPU machine: benchmarks/gpu_checks.sh). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name -> (spacing i j k mm, field of view mm): the phantom is sampled on that grid
    "ct512": ((0.8, 0.8, 1.5), (409.6, 409.6, 450.0)),  # 512 x 512 x 300
    "ct256": ((1.5, 1.5, 2.0), (384.0, 288.0, 300.0)),  # 256 x 192 x 150
}
# name -> a real image in ../shared/data (use with --model brain-tumour-flair)
REAL_CASES = {"mri240": Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset001_BrainTumourFLAIR"
              / "imagesTr" / "BRATS_004_0000.nii.gz"}  # 240 x 240 x 155 FLAIR


def child_peak_rss_mib(command: list[str]) -> tuple[float, str, float]:
    """Run a command in a fresh process; returns (seconds, stdout, that process's peak RSS in MiB)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(command[:4])} ... failed")
        output.seek(0)
        return seconds, output.read(), usage.ru_maxrss / 1024


def first_touch_seconds(mib: int = 300) -> float:
    """Seconds a fresh process takes to write ``mib`` MiB of new memory: on this virtual machine,
    whose host reclaims guest memory, from 0.05 s to over 3 s for 300 MiB from one minute to the
    next; a fresh run pays it in whichever stage first touches memory, so it is printed beside the
    figures (once before and once after them)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({mib * 2**20 // 8})"], check=True)
    return time.perf_counter() - started


def slicer_run_seconds(image_path: Path, model: str, device: str, fast: bool, runs: int = 5) -> tuple[list, float]:
    """Segment the image as the Slicer module does, ``runs`` times on one scene, the engine worker
    prepared as when the panel opens (given 10 s to import the engine): (seconds from the volume
    node to the segmentation node for each run, the engine worker's peak RSS in MiB)."""
    import slicer

    from AIReconstructAdapter.engine_run import WARM_ENGINE
    from AIReconstructAdapter.jobs import SegmentationJob
    from AIReconstructAdapter.nodes import add_volume_node, ensure_converter_rules
    from AIReconstructLib.io import read_volume

    scene = slicer.vtkMRMLScene()
    ensure_converter_rules()
    volume_node = add_volume_node(scene, read_volume(image_path), "benchmark")
    WARM_ENGINE.prepare()
    time.sleep(10)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        job = SegmentationJob(scene, [volume_node], model, device, fast)
        job.start()
        state = job.wait(interval=0.01)
        if state.status != "done":
            raise RuntimeError(f"the Slicer run failed: {state.error}")
        seconds.append(time.perf_counter() - started)
    status = Path(f"/proc/{job.engine.worker.process.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    WARM_ENGINE.shutdown()
    return seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES) + sorted(REAL_CASES), default="ct512")
    parser.add_argument("--model", default="demo-abdomen-ct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--engine-only", action="store_true",
                        help="no Slicer run and no surfaces (where slicer-core and VTK are not installed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aireconstruct-bench-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    if args.case in REAL_CASES:
        image_path = REAL_CASES[args.case]
        if not image_path.exists():
            raise SystemExit(f"{image_path} is absent (the shared data folder is not beside the checkout)")
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image_path))
        reader.ReadImageInformation()
        shape, spacing, seconds = list(reader.GetSize()), reader.GetSpacing(), 0.0
    else:
        spacing, field_of_view = CASES[args.case]
        image_path = Path(tempfile.gettempdir()) / f"aireconstruct-bench-{args.case}-{args.seed}.nii.gz"  # reused
        # made in a process of its own: a child forked from a big parent would report the parent's memory
        seconds, _, _ = (0.0, "", 0.0) if image_path.exists() else child_peak_rss_mib([sys.executable, "-c", (
            "from AIReconstructLib.phantom import make_phantom; from AIReconstructLib.io import write_volume; "
            f"p = make_phantom({args.seed}, spacing={spacing}, field_of_view_mm={field_of_view}); "
            f"write_volume(p.image, {str(image_path)!r})")])
        shape = [int(round(f / s)) for f, s in zip(field_of_view, spacing)]
    input_mib = shape[0] * shape[1] * shape[2] * 4 / 2**20
    print(f"case {args.case}: {' x '.join(map(str, shape))} voxels at {tuple(spacing)} mm, "
          f"float32 size {input_mib:.0f} MiB (image made in {seconds:.0f} s)")

    engine = [sys.executable, "-m", "AIReconstructLib"]
    options = ["--device", args.device] + (["--fast"] if args.fast else [])
    surfaces = [] if args.engine_only else ["--surfaces"]
    segment_command = engine + ["segment", str(image_path), "-m", args.model, "-o", str(work / "out"), *surfaces,
                                "--json-progress", *options]
    touch = [first_touch_seconds()]
    first_seconds, _, _ = child_peak_rss_mib(segment_command)  # the first run converts the network for OpenVINO
    e2e_seconds, stdout, e2e_rss = child_peak_rss_mib(segment_command)
    summary = json.loads(stdout.strip().splitlines()[-1])["summary"]
    run_modules = ["cli", "export", "pipeline"] + ([] if args.engine_only else ["surfaces"])
    _, _, model_rss = child_peak_rss_mib([sys.executable, "-c", (  # the libraries a run imports, and the model
        f"import {', '.join('AIReconstructLib.' + name for name in run_modules)}; "
        "from AIReconstructLib.modelcard import find_model; from AIReconstructLib.networks import load_network; "
        f"load_network(find_model({args.model!r}))")])  # before this process grows: a child would count its size
    in_slicer, worker_rss = ([], 0.0) if args.engine_only else slicer_run_seconds(image_path, args.model, args.device,
                                                                                  args.fast)

    import torch

    from AIReconstructLib.backends import openvino_available
    from AIReconstructLib.io import read_image_for_model
    from AIReconstructLib.modelcard import find_model
    from AIReconstructLib.networks import load_network
    from AIReconstructLib.predict import Predictor
    from AIReconstructLib.preprocess import body_box, in_array_order, prepare_for_card

    card = find_model(args.model)
    prepared = prepare_for_card([read_image_for_model(image_path)], card, args.fast)
    network, patch = load_network(card), in_array_order(card.patch_size, card.orientation)
    on_gpu = args.device == "cuda"
    bare, labels, bare_gpu_mib = {}, {}, 0.0
    backends = ("torch", "openvino") if not on_gpu and openvino_available() else ("torch",)
    for backend in backends * 2:  # twice each, interleaved: the second counts
        predictor = Predictor(network, patch, card.inference["overlap"], args.device, backend=backend)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        labels[backend] = predictor(prepared.tensor).argmax(0)  # the logits come back to the CPU: synchronised
        bare[backend] = time.perf_counter() - started
        if on_gpu:
            bare_gpu_mib = torch.cuda.max_memory_allocated() / 2**20
    box = body_box(prepared, card, args.fast) if card.inference.get("crop_to_body") else None
    if box is not None:  # the network on the part of the image the engine gives it
        predictor = Predictor(network, patch, card.inference["overlap"], args.device, backend="torch")
        for _ in range(2):  # the second counts
            started = time.perf_counter()
            predictor(prepared.tensor[(slice(None), *box)])
            bare["torch, body"] = time.perf_counter() - started

    stages = summary["seconds"]
    print("\n| stage | seconds |\n|---|---:|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.2f} |")
    print(f"| end to end (process wall time, incl. Python start-up and reading) | {e2e_seconds:.2f} |")
    print(f"| (the first run, which converts the network for OpenVINO) | {first_seconds:.2f} |")
    if in_slicer:
        later = statistics.median(in_slicer[1:])
        print(f"| a later run in Slicer: volume node to segmentation node, through the kept engine worker, no meshes; "
              f"median of runs 2-{len(in_slicer)} (each: {' / '.join(f'{s:.2f}' for s in in_slicer[1:])}; "
              f"the first run after the panel opened: {in_slicer[0]:.2f}) | {later:.2f} |")
    baseline = "PyTorch, float16 autocast (AMP)" if on_gpu else "eager PyTorch float32"
    print(f"| bare network sliding window, {baseline} (baseline) | {bare['torch']:.2f} |")
    if "openvino" in bare:
        print(f"| bare network sliding window, OpenVINO float32 | {bare['openvino']:.2f} |")
    if box is not None:
        share = math.prod(s.stop - s.start for s in box) / prepared.tensor[0].numel()
        print(f"| bare network on the body's box ({share:.0%} of the grid; the engine runs it there), "
              f"{baseline} | {bare['torch, body']:.2f} |")
    print(f"\nend-to-end / bare network (PyTorch): {e2e_seconds / bare['torch']:.2f}x "
          f"(in-engine stages / bare: {sum(stages.values()) / bare['torch']:.2f}x)")
    if in_slicer:
        print(f"later run in Slicer / bare network (PyTorch): {later / bare['torch']:.2f}x; "
              f"the engine worker's peak RSS {worker_rss:.0f} MiB")
        if box is not None:
            print(f"later run in Slicer / bare network on the body's box (PyTorch): {later / bare['torch, body']:.2f}x")
    if on_gpu:
        print(f"peak GPU memory ({torch.cuda.get_device_name()}): segment run "
              f"{summary.get('peak_gpu_memory_mib', float('nan')):.0f} MiB, bare network {bare_gpu_mib:.0f} MiB")
    if "openvino" in bare:
        agreement = float((labels["torch"] == labels["openvino"]).float().mean())
        print(f"OpenVINO / PyTorch network time: {bare['openvino'] / bare['torch']:.2f} "
              f"({bare['torch'] / bare['openvino']:.2f}x faster), equal labels on the model grid: {agreement:.6%}")
    print(f"peak RSS: segment run {e2e_rss:.0f} MiB, libraries + model alone {model_rss:.0f} MiB; "
          f"(run - model) / input float32 = {(e2e_rss - model_rss) / input_mib:.2f}x")
    touch.append(first_touch_seconds())
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}; "
          f"a fresh process writing 300 MiB of new memory, before and after: {touch[0]:.2f} / {touch[1]:.2f} s")


if __name__ == "__main__":
    main()
