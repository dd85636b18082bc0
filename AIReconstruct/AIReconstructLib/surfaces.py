"""Surface meshes of every label in one pass, in patient coordinates, and mesh export.

``vtkSurfaceNets3D`` builds one mesh of all label boundaries at once; it is moved to patient
coordinates (LPS or RAS mm) and smoothed as a whole with a windowed-sinc filter, which does not
shrink (volumes stay within a fraction of a percent) and keeps the faces that touching organs
share in common: no gaps, no overlaps. Decimation works on that shared mesh too, one patch per
pair of touching labels with the patch borders fixed, so neighbours stay sealed (meshoptimizer's
simplifier, VTK's vtkDecimatePro where meshoptimizer is not installed). Each label's
closed surface is then cut out of the shared mesh, oriented outwards and made manifold: where
voxels of a label touch only along an edge or at a corner, the surface is split there into sheets
that share no vertex, as 3D printing software expects (the copies of a split vertex move a
twentieth of the way into their own sheet: there alone a surface leaves its neighbour's face).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR, VTK_UNSIGNED_SHORT, vtkPoints, vtkSMPTools
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkImageData, vtkPolyData
from vtkmodules.vtkFiltersCore import (vtkDecimatePro, vtkMassProperties, vtkPolyDataNormals, vtkSurfaceNets3D,
                                       vtkWindowedSincPolyDataFilter)

from .manifold import manifold, used_points
from .modelcard import Label
from .volume import Volume

try:  # the fast simplifier; VTK's decimation where it is not installed
    import meshoptimizer
except ImportError:
    meshoptimizer = None

INDEX = np.int32  # point and triangle indices of shared meshes (a label map gives far fewer than 2^31)


@dataclass
class Surface:
    """One label's closed surface (``vtkPolyData``) in patient coordinates."""

    label: Label
    polydata: vtkPolyData
    coordinates: str  # "LPS" or "RAS"


@dataclass
class SharedMesh:
    """Every label boundary as one triangle mesh: ``pairs[n]`` are the labels on either side of
    triangle ``n``, which is wound outward from ``pairs[n, 0]`` (inward for ``pairs[n, 1]``).
    After decimation some points are no longer used by any triangle."""

    points: np.ndarray  # (P, 3) patient mm
    triangles: np.ndarray  # (T, 3) point indices (INDEX: half the memory of VTK's 64-bit ids)
    pairs: np.ndarray  # (T, 2) label values
    unsmoothed: np.ndarray  # (P, 3) the points before smoothing (on the voxel grid), patient mm


def _threads() -> int:
    """Let VTK's multi-threaded filters use every core (unless the host, e.g. Slicer, chose a backend)."""
    if vtkSMPTools.GetBackend() == "Sequential":
        vtkSMPTools.SetBackend("STDThread")
    return os.cpu_count() or 1


def _image_data(array: np.ndarray) -> vtkImageData:
    """The label map cropped to its labelled box and padded by one background voxel (so that
    surfaces close at the border), as vtkImageData in index space."""
    box = [np.flatnonzero(np.any(array, axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    low = [int(b[0]) for b in box]
    cropped = array[tuple(slice(b[0], b[-1] + 1) for b in box)]
    dtype, vtk_type = (np.uint8, VTK_UNSIGNED_CHAR) if array.max() < 256 else (np.uint16, VTK_UNSIGNED_SHORT)
    padded = np.pad(cropped.astype(dtype, copy=False), 1)
    image = vtkImageData()
    image.SetDimensions(*padded.shape[::-1])
    image.SetOrigin(low[2] - 1.0, low[1] - 1.0, low[0] - 1.0)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(padded.ravel(), deep=True, array_type=vtk_type))
    return image


def _polydata(points: np.ndarray, triangles: np.ndarray) -> vtkPolyData:
    """A triangle mesh of ``points`` (all of them, used or not) and ``triangles`` indexing them, held
    as float32 points and 32-bit indices (as Slicer's models are; half the memory of doubles and
    64-bit ids)."""
    poly = vtkPolyData()
    vtk_points = vtkPoints()
    vtk_points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float32), deep=True))
    poly.SetPoints(vtk_points)
    cells = vtkCellArray()
    offsets = np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int32)
    cells.SetData(numpy_support.numpy_to_vtk(offsets, deep=True),
                  numpy_support.numpy_to_vtk(np.ascontiguousarray(triangles, dtype=np.int32).ravel(), deep=True))
    poly.SetPolys(cells)
    return poly


def _arrays(poly: vtkPolyData) -> tuple[np.ndarray, np.ndarray]:
    points = numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)
    return points, numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)


def _with_normals(poly: vtkPolyData) -> vtkPolyData:
    normals = vtkPolyDataNormals()
    normals.SetInputData(poly)
    normals.ConsistencyOff()
    normals.SplittingOff()
    normals.Update()
    return normals.GetOutput()


def _smooth(mesh: vtkPolyData, smoothing: float) -> vtkPolyData:
    """Windowed-sinc smoothing; ``smoothing`` 0-1 maps to a pass band of 10^(-4 * smoothing)."""
    if smoothing <= 0:
        return mesh
    sinc = vtkWindowedSincPolyDataFilter()
    sinc.SetInputData(mesh)
    sinc.SetNumberOfIterations(20)
    sinc.SetPassBand(10.0 ** (-4.0 * min(smoothing, 1.0)))
    sinc.NormalizeCoordinatesOn()
    sinc.NonManifoldSmoothingOn()
    sinc.BoundarySmoothingOff()
    sinc.FeatureEdgeSmoothingOff()
    sinc.Update()
    return sinc.GetOutput()


def shared_mesh(labelmap: Volume, values: list[int], smoothing: float = 0.5, coordinates: str = "LPS") -> SharedMesh:
    """The boundaries of the given labels (all others count as background) as one mesh, in one pass:
    surface nets on the label map, moved to patient millimetres and smoothed as a whole."""
    _threads()
    nets = vtkSurfaceNets3D()
    nets.SetInputData(_image_data(labelmap.array))
    for index, value in enumerate(values):
        nets.SetValue(index, value)
    nets.SetBackgroundLabel(0)
    nets.SetOutputMeshTypeToTriangles()
    nets.SetSmoothing(False)
    nets.Update()
    mesh = nets.GetOutput()
    ijk = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    matrix = labelmap.ijk_to_lps() if coordinates == "LPS" else labelmap.ijk_to_ras()
    unsmoothed = ijk @ matrix[:3, :3].T + matrix[:3, 3]
    mesh.GetPoints().SetData(numpy_support.numpy_to_vtk(unsmoothed, deep=True))
    mesh = _smooth(mesh, smoothing)  # moves the points, keeps their order
    points, triangles = _arrays(mesh)
    pairs = numpy_support.vtk_to_numpy(mesh.GetCellData().GetArray("BoundaryLabels")).reshape(-1, 2).astype(np.int64)
    return SharedMesh(points, triangles.astype(INDEX), pairs, unsmoothed)


def _patches(mesh: SharedMesh):
    """Split the mesh into patches, one per pair of touching labels (low, high), wound outward from low."""
    low, high = np.minimum(mesh.pairs[:, 0], mesh.pairs[:, 1]), np.maximum(mesh.pairs[:, 0], mesh.pairs[:, 1])
    triangles = np.where((mesh.pairs[:, 0] == low)[:, None], mesh.triangles, mesh.triangles[:, ::-1])
    key = low * (int(high.max()) + 1) + high
    order = np.argsort(key.astype(np.min_scalar_type(key.max())), kind="stable")  # a radix sort when small
    starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
    for begin, end in zip(starts, np.r_[starts[1:], len(order)]):
        chosen = order[begin:end]
        yield (int(low[chosen[0]]), int(high[chosen[0]])), triangles[chosen]


def _simplified_meshoptimizer(points32: np.ndarray, triangles: np.ndarray, keep: int) -> np.ndarray:
    """meshoptimizer's edge collapse onto existing vertices, border vertices locked (thread-safe,
    releases the GIL); work in proportion to the patch, not to the whole mesh."""
    indices = np.ascontiguousarray(triangles, dtype=np.uint32).ravel()
    kept = np.empty_like(indices)
    count = meshoptimizer.simplify(kept, indices, points32, target_index_count=3 * keep, target_error=1.0,
                                   options=meshoptimizer.SIMPLIFY_LOCK_BORDER | meshoptimizer.SIMPLIFY_SPARSE)
    return kept[:count].reshape(-1, 3).astype(INDEX)


def _simplified_vtk(points: np.ndarray, triangles: np.ndarray, keep: int) -> np.ndarray:
    """vtkDecimatePro with border vertices kept, for hosts without meshoptimizer (it needs a C++
    compiler to install); the kept points carry their index in ``points`` through the filter."""
    used, own = used_points(triangles, len(points))
    poly = _polydata(points[used], own)
    poly.GetPointData().AddArray(numpy_support.numpy_to_vtkIdTypeArray(used.astype(np.int64), deep=True))
    poly.GetPointData().GetArray(0).SetName("index")
    pro = vtkDecimatePro()
    pro.SetInputData(poly)
    pro.SetTargetReduction(1.0 - keep / len(triangles))
    pro.PreserveTopologyOn()
    pro.BoundaryVertexDeletionOff()
    pro.SplittingOff()
    pro.Update()
    index = numpy_support.vtk_to_numpy(pro.GetOutput().GetPointData().GetArray("index"))
    return index[_arrays(pro.GetOutput())[1]].astype(INDEX)


def decimate(mesh: SharedMesh, reduction: dict[int, float]) -> SharedMesh:
    """Remove about ``reduction[label]`` of each label's triangles while keeping touching labels
    sealed: each patch between two labels is simplified once, with its border vertices fixed, so
    both sides keep sharing exactly the same faces. Vertices are removed, never moved."""
    points32 = mesh.points.astype(np.float32) if meshoptimizer else None

    def one_patch(item):
        (low, high), triangles = item
        fraction = min(max(reduction.get(low, 0.0), reduction.get(high, 0.0)), 0.99)
        keep = max(int(round(len(triangles) * (1.0 - fraction))), 1)
        if keep < len(triangles):
            triangles = (_simplified_meshoptimizer(points32, triangles, keep) if meshoptimizer
                         else _simplified_vtk(mesh.points, triangles, keep))
        return triangles, np.tile(np.array([low, high]), (len(triangles), 1))

    with ThreadPoolExecutor(_threads()) as pool:  # both simplifiers release the GIL
        results = list(pool.map(one_patch, _patches(mesh)))
    return SharedMesh(mesh.points, np.concatenate([triangles for triangles, _ in results]),
                      np.concatenate([pairs for _, pairs in results]), mesh.unsmoothed)


def triangle_counts(mesh: SharedMesh) -> dict[int, int]:
    """Triangles of each label's closed surface (a shared face counts for both sides)."""
    counts = np.bincount(mesh.pairs.ravel())
    values = np.flatnonzero(counts)
    return dict(zip(values.tolist(), counts[values].tolist()))


def extract_surfaces(labelmap: Volume, labels: list[Label], smoothing: float = 0.5, decimate_fraction: float = 0.0,
                     coordinates: str = "LPS", max_triangles: int | None = None) -> list[Surface]:
    """Closed surfaces of every label present, built in one pass over the label map.

    ``smoothing`` is 0 (none) to 1 (strong); ``decimate_fraction`` is the fraction of triangles to
    remove (0 to <1) and ``max_triangles`` a cap per surface (whichever removes more). Points are in
    ``coordinates`` ("LPS" or "RAS") millimetres; neighbours share their faces exactly.
    """
    if not labelmap.array.any():
        return []
    mesh = shared_mesh(labelmap, [label.value for label in labels], smoothing, coordinates)
    return surfaces_from_mesh(mesh, labels, coordinates, decimate_fraction, max_triangles)


def surfaces_from_mesh(mesh: SharedMesh, labels: list[Label], coordinates: str, decimate_fraction: float = 0.0,
                       max_triangles: int | None = None) -> list[Surface]:
    """The surfaces of :func:`extract_surfaces` from a shared mesh already built (the report's
    measurements and its 3D view use one)."""
    by_value = {label.value: label for label in labels}
    counts = triangle_counts(mesh)
    reduction = {value: max(decimate_fraction, 1.0 - max_triangles / n if max_triangles else 0.0)
                 for value, n in counts.items() if value in by_value}
    if any(fraction > 0 for fraction in reduction.values()):
        mesh = decimate(mesh, reduction)
    return surfaces_of(mesh, [by_value[v] for v in sorted(by_value) if v in counts], coordinates)


def _signed_volumes(mesh: SharedMesh, chunk: int = 1 << 18) -> np.ndarray:
    """The volume each label's surface encloses as the shared mesh winds it (indexed by label value):
    negative where its triangles face inwards (the patient coordinates mirror the voxel grid).
    Summed over chunks of triangles, so that no copy of the whole mesh's corners is held."""
    centre = mesh.points.mean(axis=0)  # small numbers: no cancellation far from the origin
    size = int(mesh.pairs.max()) + 1
    volumes = np.zeros(size)
    for start in range(0, len(mesh.triangles), chunk):
        a, b, c = (mesh.points[mesh.triangles[start:start + chunk, n]] - centre for n in range(3))
        volume = np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0  # of the tetrahedron (centre, a, b, c)
        pairs = mesh.pairs[start:start + chunk]
        volumes += np.bincount(pairs[:, 0], volume, size) - np.bincount(pairs[:, 1], volume, size)
    return volumes


def surfaces_of(mesh: SharedMesh, labels: list[Label], coordinates: str) -> list[Surface]:
    """Cut each label's closed, outward-facing, manifold surface (with normals) out of a shared mesh."""
    count = len(mesh.triangles)
    owner = np.concatenate([mesh.pairs[:, 0], mesh.pairs[:, 1]])  # each triangle once for each side's label
    order = np.argsort(owner.astype(np.min_scalar_type(owner.max())), kind="stable")  # a radix sort when small
    bounds = np.searchsorted(owner[order], [[label.value, label.value + 1] for label in labels])
    del owner
    inwards = _signed_volumes(mesh) < 0

    def one_label(item):
        label, (begin, end) = item
        chosen = order[begin:end]
        triangles = mesh.triangles[chosen % count]
        flip = (chosen >= count) != inwards[label.value]  # wound outward from the first label of its pair
        triangles[flip] = triangles[flip, ::-1]
        return Surface(label, _with_normals(_polydata(*manifold(mesh.points, mesh.unsmoothed, triangles))), coordinates)

    with ThreadPoolExecutor(_threads()) as pool:
        return list(pool.map(one_label, zip(labels, bounds)))


def mesh_checks(poly: vtkPolyData) -> dict:
    """Whether a triangle mesh is closed (watertight: no edge on a border, i.e. used an odd number of
    times) and consistently oriented (each edge run as often one way as the other by its triangles);
    how many edges are non-manifold (used by more than two triangles: voxels of a label touching
    only along an edge) and how many triangles are degenerate (a repeated vertex or no area)."""
    points, triangles = _arrays(poly)
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]).astype(np.int64)
    low, high = edges.min(axis=1), edges.max(axis=1)
    _, edge, uses = np.unique(low * max(len(points), 1) + high, return_inverse=True, return_counts=True)
    balance = np.bincount(edge.ravel(), weights=np.where(edges[:, 0] < edges[:, 1], 1.0, -1.0), minlength=len(uses))
    a, b, c = (points[triangles[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    repeated = (triangles[:, 0] == triangles[:, 1]) | (triangles[:, 1] == triangles[:, 2]) | (triangles[:, 0] == triangles[:, 2])
    return {"closed": bool(len(triangles)) and bool(np.all(uses % 2 == 0)),
            "consistent_orientation": bool(np.all(balance == 0)),
            "non_manifold_edges": int(np.count_nonzero(uses > 2)),
            "degenerate_triangles": int(np.count_nonzero(repeated | (area <= 1e-12 * max(area.max(initial=0), 1.0))))}


def mesh_measurements(poly: vtkPolyData) -> dict:
    """Enclosed volume (mL), surface area (cm²), triangle count and the checks of :func:`mesh_checks`."""
    mass = vtkMassProperties()
    mass.SetInputData(poly)
    mass.Update()
    return {"volume_ml": mass.GetVolume() / 1000.0, "area_cm2": mass.GetSurfaceArea() / 100.0,
            "triangles": poly.GetNumberOfPolys(), **mesh_checks(poly)}
