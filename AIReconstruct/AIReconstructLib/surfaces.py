"""Surface meshes of every label in one pass, in patient coordinates, and mesh export.

``vtkSurfaceNets3D`` builds one mesh of all label boundaries at once; it is moved to patient
coordinates (LPS or RAS mm) and smoothed as a whole with a windowed-sinc filter, which does not
shrink (volumes stay within a fraction of a percent) and keeps the faces that touching organs
share in common: no gaps, no overlaps. Each label's closed surface is then cut out of that
shared mesh, oriented outwards and optionally decimated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from .errors import OutputError
from .io import atomic_path
from .modelcard import Label
from .volume import Volume

MESH_WRITERS = {".stl": vtk.vtkSTLWriter, ".obj": vtk.vtkOBJWriter, ".ply": vtk.vtkPLYWriter,
                ".vtp": vtk.vtkXMLPolyDataWriter}


@dataclass
class Surface:
    """One label's closed surface (``vtkPolyData``) in patient coordinates."""

    label: Label
    polydata: vtk.vtkPolyData
    coordinates: str  # "LPS" or "RAS"


def _image_data(labelmap: Volume) -> vtk.vtkImageData:
    """The label map, padded by one background voxel so that surfaces close at the border,
    as vtkImageData in index space with its origin at index (-1, -1, -1)."""
    image = vtk.vtkImageData()
    image.SetDimensions(*(n + 2 for n in labelmap.shape_ijk))
    image.SetOrigin(-1.0, -1.0, -1.0)
    array = np.pad(labelmap.array.astype(np.uint16, copy=False), 1)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_SHORT)
    image.GetPointData().SetScalars(scalars)
    return image


def _polydata(points: np.ndarray, triangles: np.ndarray) -> vtk.vtkPolyData:
    used, inverse = np.unique(triangles, return_inverse=True)
    poly = vtk.vtkPolyData()
    vtk_points = vtk.vtkPoints()
    vtk_points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points[used]), deep=True))
    poly.SetPoints(vtk_points)
    cells = vtk.vtkCellArray()
    cells.SetData(3, numpy_support.numpy_to_vtkIdTypeArray(inverse.reshape(-1).astype(np.int64), deep=True))
    poly.SetPolys(cells)
    return poly


def _outward(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Flip every triangle if the mesh's signed volume is negative (normals point inwards)."""
    a, b, c = (points[triangles[:, n]] for n in range(3))
    signed_volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    return triangles if signed_volume >= 0 else triangles[:, ::-1]


def _finish(poly: vtk.vtkPolyData, decimate: float) -> vtk.vtkPolyData:
    if decimate > 0:
        decimator = vtk.vtkQuadricDecimation()
        decimator.SetInputData(poly)
        decimator.SetTargetReduction(decimate)
        decimator.VolumePreservationOn()
        decimator.Update()
        poly = decimator.GetOutput()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(poly)
    normals.ConsistencyOff()
    normals.SplittingOff()
    normals.Update()
    return normals.GetOutput()


def _smooth(mesh: vtk.vtkPolyData, smoothing: float) -> vtk.vtkPolyData:
    """Windowed-sinc smoothing; ``smoothing`` 0-1 maps to a pass band of 10^(-4 * smoothing)."""
    if smoothing <= 0:
        return mesh
    sinc = vtk.vtkWindowedSincPolyDataFilter()
    sinc.SetInputData(mesh)
    sinc.SetNumberOfIterations(20)
    sinc.SetPassBand(10.0 ** (-4.0 * min(smoothing, 1.0)))
    sinc.NormalizeCoordinatesOn()
    sinc.NonManifoldSmoothingOn()
    sinc.BoundarySmoothingOff()
    sinc.FeatureEdgeSmoothingOff()
    sinc.Update()
    return sinc.GetOutput()


def extract_surfaces(labelmap: Volume, labels: list[Label], smoothing: float = 0.5,
                     decimate: float = 0.0, coordinates: str = "LPS") -> list[Surface]:
    """Closed surfaces of every label present, built in one pass over the label map.

    ``smoothing`` is 0 (none) to 1 (strong); ``decimate`` is the fraction of triangles to
    remove (0 to <1). Points are in ``coordinates`` ("LPS" or "RAS") millimetres.
    """
    present = [label for label in labels if np.any(labelmap.array == label.value)]
    if not present:
        return []
    nets = vtk.vtkSurfaceNets3D()
    nets.SetInputData(_image_data(labelmap))
    for index, label in enumerate(present):
        nets.SetValue(index, label.value)
    nets.SetBackgroundLabel(0)
    nets.SetOutputMeshTypeToTriangles()
    nets.SetSmoothing(False)
    nets.Update()
    mesh = nets.GetOutput()
    ijk = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    matrix = labelmap.ijk_to_lps() if coordinates == "LPS" else labelmap.ijk_to_ras()
    mesh.GetPoints().SetData(numpy_support.numpy_to_vtk(ijk @ matrix[:3, :3].T + matrix[:3, 3], deep=True))
    mesh = _smooth(mesh, smoothing)

    points = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    triangles = numpy_support.vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    boundary = numpy_support.vtk_to_numpy(mesh.GetCellData().GetArray("BoundaryLabels")).reshape(-1, 2)

    surfaces = []
    for label in present:
        # a face between labels (a, b) is wound one way for a and the other way for b
        first, second = boundary[:, 0] == label.value, boundary[:, 1] == label.value
        if first.any() or second.any():
            faces = _outward(points, np.concatenate([triangles[first], triangles[second][:, ::-1]]))
            surfaces.append(Surface(label, _finish(_polydata(points, faces), decimate), coordinates))
    return surfaces


def mesh_measurements(poly: vtk.vtkPolyData) -> dict:
    """Enclosed volume (mL), surface area (cm²), triangle count and whether the mesh is closed."""
    edges = vtk.vtkFeatureEdges()
    edges.SetInputData(poly)
    edges.BoundaryEdgesOn()
    edges.NonManifoldEdgesOn()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.Update()
    mass = vtk.vtkMassProperties()
    mass.SetInputData(poly)
    mass.Update()
    return {"volume_ml": mass.GetVolume() / 1000.0, "area_cm2": mass.GetSurfaceArea() / 100.0,
            "triangles": poly.GetNumberOfPolys(), "closed": edges.GetOutput().GetNumberOfCells() == 0}


def write_mesh(poly: vtk.vtkPolyData, path: str | os.PathLike) -> Path:
    """Write a mesh as STL, OBJ, PLY or VTP (chosen by the suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_WRITERS:
        raise OutputError(f"Unknown mesh format '{suffix}' (use {', '.join(MESH_WRITERS)})")
    writer = MESH_WRITERS[suffix]()
    if suffix == ".stl":
        writer.SetFileTypeToBinary()
    with atomic_path(path) as tmp:
        writer.SetFileName(str(tmp))
        writer.SetInputData(poly)
        if not writer.Write() or writer.GetErrorCode():
            reason = vtk.vtkErrorCode.GetStringFromErrorCode(writer.GetErrorCode())
            raise OutputError(f"Cannot write {path}: {reason}")
    return path


def mesh_file_name(segment_name: str, suffix: str) -> str:
    """A file name for a segment's mesh: the name with only letters, digits, - and _, plus the suffix."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in segment_name)
    return f"{safe}{suffix}"

