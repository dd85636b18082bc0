"""All-labels surface path against the per-label path, on a 512 x 512 x 300 map of 100+ labels.

    python benchmarks/surface_benchmark.py [--labels 120] [--decimate 0.5] [--smoothing 0.5]

The benchmark paints ``--labels`` random touching ellipsoids into a 512 x 512 x 300 label map at
0.8 x 0.8 x 1.5 mm, then times, in one run, the whole map to smoothed, decimated STL files on disk:
- the engine (``extract_surfaces``: one surface-nets pass, one smoothing of the shared mesh,
  decimation per patch between touching labels, every segment written);
- the per-label path that tools commonly use: crop each label to its bounding box, discrete flying
  edges, windowed-sinc smoothing (same pass band), decimation to the same fraction, normals, write.
It prints both times, their ratio, how many meshes each path left open and how many non-manifold
edges (more than two triangles) they hold, then the time to write the engine's surfaces as one
OBJ and one GLB scene. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AIReconstruct"))
from AIReconstructLib.modelcard import Label, label_colour  # noqa: E402
from AIReconstructLib.meshfiles import SCENE_FORMATS, mesh_file_name, write_mesh, write_scene  # noqa: E402
from AIReconstructLib.surfaces import extract_surfaces, mesh_checks  # noqa: E402
from AIReconstructLib.volume import Volume  # noqa: E402

SHAPE_KJI, SPACING = (300, 512, 512), (0.8, 0.8, 1.5)


def make_labelmap(count: int, seed: int = 0) -> Volume:
    """``count`` random ellipsoids (later ones paint over earlier ones, so many touch)."""
    rng = np.random.default_rng(seed)
    array = np.zeros(SHAPE_KJI, np.uint8 if count < 256 else np.uint16)
    for value in range(1, count + 1):
        centre = rng.uniform([30, 60, 60], [270, 452, 452])
        radii = rng.uniform([8, 10, 10], [25, 35, 35])
        low = np.maximum((centre - radii).astype(int), 0)
        high = np.minimum((centre + radii).astype(int) + 1, SHAPE_KJI)
        k, j, i = np.ogrid[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
        inside = ((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2 + ((i - centre[2]) / radii[2]) ** 2 < 1
        array[low[0]:high[0], low[1]:high[1], low[2]:high[2]][inside] = value
    return Volume(array, SPACING, (0.0, 0.0, 0.0), np.eye(3))


def per_label_path(labelmap: Volume, labels: list[Label], smoothing: float, decimate: float, folder: Path) -> list:
    """Crop, discrete flying edges, windowed sinc, decimate, normals and write, one label at a time."""
    meshes = []
    for label, box in zip(labels, ndimage.find_objects(labelmap.array)):
        if box is None:
            continue
        crop = np.pad(labelmap.array[box] == label.value, 1).astype(np.uint8)
        image = vtk.vtkImageData()
        image.SetDimensions(*crop.shape[::-1])
        image.SetSpacing(*labelmap.spacing)
        image.SetOrigin(*[(s.start - 1) * sp for s, sp in zip(box[::-1], labelmap.spacing)])
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(crop.ravel(), deep=True))
        edges = vtk.vtkDiscreteFlyingEdges3D()
        edges.SetInputData(image)
        edges.SetValue(0, 1)
        sinc = vtk.vtkWindowedSincPolyDataFilter()
        sinc.SetInputConnection(edges.GetOutputPort())
        sinc.SetNumberOfIterations(20)
        sinc.SetPassBand(10.0 ** (-4.0 * smoothing))
        sinc.NormalizeCoordinatesOn()
        sinc.NonManifoldSmoothingOn()
        decimator = vtk.vtkDecimatePro()
        decimator.SetInputConnection(sinc.GetOutputPort())
        decimator.SetTargetReduction(decimate)
        decimator.PreserveTopologyOn()
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputConnection(decimator.GetOutputPort())
        normals.SplittingOff()
        normals.Update()
        mesh = normals.GetOutput()
        write_mesh(mesh, folder / mesh_file_name(label.name, ".stl"))
        meshes.append(mesh)
    return meshes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=int, default=120)
    parser.add_argument("--decimate", type=float, default=0.5)
    parser.add_argument("--smoothing", type=float, default=0.5)
    args = parser.parse_args()

    labelmap = make_labelmap(args.labels)
    labels = [Label(value, f"structure {value}", label_colour(value), {}, {}) for value in range(1, args.labels + 1)]
    present = len(np.unique(labelmap.array)) - 1
    print(f"label map {labelmap.shape_ijk} at {SPACING} mm, {present} labels; {os.cpu_count()} CPU cores; "
          f"smoothing {args.smoothing}, decimate {args.decimate}")
    with tempfile.TemporaryDirectory() as work:
        engine_folder, baseline_folder = Path(work, "engine"), Path(work, "per-label")
        engine_folder.mkdir()
        baseline_folder.mkdir()

        started = time.perf_counter()
        surfaces = extract_surfaces(labelmap, labels, args.smoothing, args.decimate)
        for surface in surfaces:
            write_mesh(surface.polydata, engine_folder / mesh_file_name(surface.label.name, ".stl"))
        engine_seconds = time.perf_counter() - started

        started = time.perf_counter()
        baseline = per_label_path(labelmap, labels, args.smoothing, args.decimate, baseline_folder)
        baseline_seconds = time.perf_counter() - started

        scene_seconds = {}
        for suffix in SCENE_FORMATS:  # every surface in one file (not part of either path above)
            started = time.perf_counter()
            write_scene(surfaces, engine_folder / f"scene{suffix}")
            scene_seconds[suffix] = time.perf_counter() - started

        engine_triangles = sum(s.polydata.GetNumberOfPolys() for s in surfaces)
        baseline_triangles = sum(m.GetNumberOfPolys() for m in baseline)
        engine_checks = [mesh_checks(s.polydata) for s in surfaces]
        baseline_checks = [mesh_checks(m) for m in baseline]
    print(f"{'path':<34} {'seconds':>8} {'meshes':>7} {'triangles':>10} {'open':>5} {'non-manifold edges':>19}")
    for name, seconds, meshes, triangles, checks in (
            ("engine, all labels in one pass", engine_seconds, len(surfaces), engine_triangles, engine_checks),
            ("per label (crop, flying edges)", baseline_seconds, len(baseline), baseline_triangles, baseline_checks)):
        print(f"{name:<34} {seconds:8.2f} {meshes:7d} {triangles:10d} {sum(not c['closed'] for c in checks):5d} "
              f"{sum(c['non_manifold_edges'] for c in checks):19d}")
    print(f"per-label / engine: {baseline_seconds / engine_seconds:.2f}x")
    print("the engine's surfaces as one scene: " + ", ".join(f"{suffix} {seconds:.2f} s" for suffix, seconds in scene_seconds.items()))


if __name__ == "__main__":
    main()
