"""How long Slicer's main thread is held by a correction with points or a box, now that the engine's
worker makes it in the background, against making it on the main thread (``refine`` in Slicer's
own process, as the panel did before), measured in the same run.

    python benchmarks/correction_benchmark.py [--clicks 5]

On Slicer's real MRML libraries (slicer-core, no Qt): a segment corrected through the adapter's
``SegmentCorrection`` as the panel's timer polls it (every 20 ms here). Two scenes: BRATS_004's
FLAIR (240 × 240 × 155) corrected from nothing by a simulated user's points toward the expert mask
(each in the largest error left), and the shared CT resampled to 512 × 512 × 300, its other
structures (TotalSegmentator's labels) as segments, its liver corrected from nothing by such points,
then a box drawn around it, then two more points. For each prompt: the main thread's longest hold (placing the prompt,
or one poll), its total hold, and the time until the segment shows the correction; and the same
correction on the main thread, as the panel made it before (the segment read, ``refine``, the
result shown, in a second segmentation node holding the same segments). Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AIReconstruct"))
import slicer  # noqa: E402
import vtk  # noqa: E402

from AIReconstructAdapter.correction import SegmentCorrection  # noqa: E402
from AIReconstructAdapter.engine_run import WARM_ENGINE  # noqa: E402
from AIReconstructAdapter.nodes import (add_volume_node, ensure_converter_rules, import_segmentation,  # noqa: E402
                                        segment_mask, set_segment_mask)
from AIReconstructLib import interaction  # noqa: E402
from AIReconstructLib.io import read_labelmap, read_volume  # noqa: E402
from AIReconstructLib.modelcard import Label  # noqa: E402
from AIReconstructLib.segnrrd import write_seg_nrrd  # noqa: E402
from AIReconstructLib.volume import Volume  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIVER = 5  # in TotalSegmentator's labels of the shared CT


def new_scene(volume: Volume, others: Path | None = None):
    """A scene with the volume and two segmentations with one empty segment each (and the segments
    of the .seg.nrrd ``others``), one for the correction in the background, one for the same on the
    main thread: (scene, volume node, (segmentation, segment ID) twice)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    ensure_converter_rules()
    volume_node = add_volume_node(scene, volume, "image")
    segments = []
    for _ in range(2):
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if others is not None:
            import_segmentation(scene, others, volume_node, segmentation)
        segments.append((segmentation, segmentation.GetSegmentation().AddEmptySegment("", "segment")))
    return scene, volume_node, segments


def on_main_thread(volume, volume_node, segment, clicks, box=None) -> float:
    """Seconds to correct ``segment`` (segmentation node, ID) on the main thread, as the panel did
    before: the segment read, ``refine``, the result shown."""
    started = time.perf_counter()
    corrected = interaction.refine(volume, segment_mask(*segment, volume_node), clicks, box=box)
    set_segment_mask(*segment, volume_node, corrected)
    return time.perf_counter() - started


def held(place, correction) -> tuple[float, float, float]:
    """Place a prompt (``place()``) and poll until the segment shows it: the main thread's longest
    hold, its total hold and the time until done, in seconds."""
    started = time.perf_counter()
    place()
    holds = [time.perf_counter() - started]
    while True:
        before = time.perf_counter()
        busy = correction.poll()
        holds.append(time.perf_counter() - before)
        if not busy:
            return max(holds), sum(holds), time.perf_counter() - started
        time.sleep(0.02)


def simulated_points(name: str, volume: Volume, truth, volume_node, segments, correction, clicks: int,
                     given=(), box=None) -> list[dict]:
    """Points placed one after the other by the simulated user (each in the largest error left,
    toward ``truth``), after the points ``given`` and ``box`` if one was drawn: a row of figures
    per point."""
    (segmentation, segment_id), baseline = segments
    rows, given = [], list(given)
    for number in range(1, clicks + 1):
        current = segment_mask(segmentation, segment_id, volume_node)
        click = interaction.next_click(current, truth, volume.spacing[::-1])
        if click is None:
            break
        given.append(click)
        set_segment_mask(*baseline, volume_node, current)
        main_thread = on_main_thread(volume, volume_node, baseline, given, box)
        ras = (volume.ijk_to_ras() @ [*click.kji[::-1], 1])[:3]
        points = correction.points[click.positive]
        longest, total, until_done = held(lambda: points.AddControlPoint(vtk.vtkVector3d(*ras)), correction)
        rows.append({"prompt": f"{name} point {number}", "main": main_thread, "longest": longest,
                     "total": total, "done": until_done})
    return rows


def brain_case(clicks: int) -> list[dict]:
    folder = DATA / "Dataset001_BrainTumourFLAIR"
    volume = read_volume(folder / "imagesTr" / "BRATS_004_0000.nii.gz")
    truth = read_labelmap(folder / "labelsTr" / "BRATS_004.nii.gz", like=volume).array > 0
    scene, volume_node, segments = new_scene(volume)
    correction = SegmentCorrection(scene, *segments[0], volume_node)
    correction.observe()
    rows = simulated_points("BRATS_004", volume, truth, volume_node, segments, correction, clicks)
    correction.end(scene)
    return rows


def liver_case(clicks: int, folder: Path) -> list[dict]:
    ct = read_volume(DATA / "CT_TotalSegExample" / "ct.nii.gz")
    labels = read_labelmap(DATA / "CT_TotalSegExample" / "reference_totalseg_fast.nii.gz", like=ct)
    factors = np.array([300, 512, 512]) / np.array(ct.array.shape)
    spacing = tuple(np.array(ct.spacing) / factors[::-1])
    volume = Volume(ndimage.zoom(ct.array.astype(np.int16), factors, order=1), spacing, ct.origin, ct.direction)
    structures = ndimage.zoom(labels.array, factors, order=0)
    liver = structures == LIVER
    corners = np.argwhere(liver)
    box = (tuple(corners.min(axis=0)), tuple(corners.max(axis=0)))
    names = json.loads((DATA / "CT_TotalSegExample" / "labels.json").read_text())
    present = sorted(set(np.unique(structures).tolist()) - {0, LIVER})
    others = write_seg_nrrd(volume.with_array(np.where(liver, 0, structures).astype(np.uint8)),
                            [Label(value, names[str(value)], (0.5, 0.5, 0.5), {}, {}) for value in present],
                            folder / "others.seg.nrrd")
    scene, volume_node, segments = new_scene(volume, others)
    correction = SegmentCorrection(scene, *segments[0], volume_node)
    correction.observe()
    rows = simulated_points("CT liver", volume, liver, volume_node, segments, correction, clicks)
    clicks = [interaction.Click(interaction.to_voxel(volume, prompt[2], "RAS"), prompt[0]) for prompt in correction.prompts]
    set_segment_mask(*segments[1], volume_node, segment_mask(*segments[0], volume_node))
    main_thread = on_main_thread(volume, volume_node, segments[1], clicks, box)
    box_node = correction.new_box()

    def draw():
        for corner in box:
            box_node.AddControlPoint(vtk.vtkVector3d(*(volume.ijk_to_ras() @ [*corner[::-1], 1])[:3]))

    longest, total, until_done = held(draw, correction)
    size = " × ".join(str(b - a + 1) for a, b in zip(*box))
    rows.append({"prompt": f"CT liver box ({size} voxels), after the points", "main": main_thread, "longest": longest,
                 "total": total, "done": until_done})
    rows += simulated_points("CT liver, after the box,", volume, liver, volume_node, segments, correction, 2,
                             clicks, box)
    correction.end(scene)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clicks", type=int, default=5)
    args = parser.parse_args()
    WARM_ENGINE.prepare()  # as the panel does when it is opened
    with tempfile.TemporaryDirectory() as folder:
        rows = brain_case(args.clicks) + liver_case(args.clicks, Path(folder))
    WARM_ENGINE.shutdown()
    print("| prompt | on the main thread, s | background: longest hold, s | total hold, s | "
          "until shown, s | longest hold / main thread |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['prompt']} | {row['main']:.2f} | {row['longest']:.2f} | {row['total']:.2f} | "
              f"{row['done']:.2f} | {row['longest'] / row['main']:.2f} |")


if __name__ == "__main__":
    main()
