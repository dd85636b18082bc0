"""Surfaces: closed, where the voxels are (oblique, anisotropic), and exported in every format."""

import numpy as np
import pytest
import vtk
from vtk.util import numpy_support

from AIReconstructLib.modelcard import Label
from AIReconstructLib.surfaces import extract_surfaces, mesh_measurements, write_mesh
from AIReconstructLib.volume import Volume
from conftest import oblique_direction

LABELS = [Label(1, "ball", (1, 0, 0), {}, {}), Label(2, "shell", (0, 1, 0), {}, {})]


def _two_spheres():
    """Label 1: a ball of radius 14 mm; label 2: a shell around it (touching), on an oblique grid."""
    spacing = (1.0, 1.25, 2.0)
    shape_ijk = (48, 40, 26)
    direction = oblique_direction(25)
    origin = np.array([-30.0, 12.0, 40.0])
    k, j, i = np.mgrid[0 : shape_ijk[2], 0 : shape_ijk[1], 0 : shape_ijk[0]]
    ijk = np.stack([i * spacing[0], j * spacing[1], k * spacing[2]], -1)
    centre_ijk = (np.array(shape_ijk) - 1) / 2 * spacing
    radius = np.linalg.norm(ijk - centre_ijk, axis=-1)
    array = np.zeros(radius.shape, np.uint8)
    array[radius < 20] = 2
    array[radius < 14] = 1
    volume = Volume(array, spacing, origin, direction)
    centre_lps = origin + direction @ centre_ijk
    return volume, centre_lps


def _points(poly):
    return numpy_support.vtk_to_numpy(poly.GetPoints().GetData())


def test_meshes_are_closed_and_lie_where_the_voxels_are():
    volume, centre = _two_spheres()
    surfaces = {s.label.name: s for s in extract_surfaces(volume, LABELS)}
    ball = surfaces["ball"].polydata
    measured = mesh_measurements(ball)
    assert measured["closed"] and mesh_measurements(surfaces["shell"].polydata)["closed"]
    distance = np.linalg.norm(_points(ball) - centre, axis=1)
    assert abs(distance.mean() - 14.0) < 1.0 and distance.max() < 16.5 and distance.min() > 11.5
    voxel_ml = np.count_nonzero(volume.array == 1) * volume.voxel_volume_ml
    assert measured["volume_ml"] == pytest.approx(voxel_ml, rel=0.01)
    shell = mesh_measurements(surfaces["shell"].polydata)["volume_ml"]  # the cavity is subtracted
    assert shell == pytest.approx(np.count_nonzero(volume.array == 2) * volume.voxel_volume_ml, rel=0.01)


def test_neighbours_share_their_boundary():
    volume, _ = _two_spheres()
    surfaces = {s.label.name: s for s in extract_surfaces(volume, LABELS)}
    ball_points = {tuple(np.round(p, 6)) for p in _points(surfaces["ball"].polydata)}
    shell_points = {tuple(np.round(p, 6)) for p in _points(surfaces["shell"].polydata)}
    assert ball_points <= shell_points  # the ball's surface is exactly the shell's inner surface


def test_ras_coordinates_flip_x_and_y():
    volume, _ = _two_spheres()
    lps = extract_surfaces(volume, LABELS[:1], coordinates="LPS")[0].polydata
    ras = extract_surfaces(volume, LABELS[:1], coordinates="RAS")[0].polydata
    np.testing.assert_allclose(_points(ras), _points(lps) * [-1, -1, 1], atol=1e-9)
    assert mesh_measurements(ras)["volume_ml"] == pytest.approx(mesh_measurements(lps)["volume_ml"])


def test_decimation_reduces_triangles_and_keeps_the_mesh_closed():
    volume, _ = _two_spheres()
    full = extract_surfaces(volume, LABELS[:1])[0].polydata
    reduced = extract_surfaces(volume, LABELS[:1], decimate=0.7)[0].polydata
    assert reduced.GetNumberOfPolys() < 0.4 * full.GetNumberOfPolys()
    assert mesh_measurements(reduced)["closed"]


@pytest.mark.parametrize("suffix,reader", [(".stl", vtk.vtkSTLReader), (".obj", vtk.vtkOBJReader),
                                           (".ply", vtk.vtkPLYReader), (".vtp", vtk.vtkXMLPolyDataReader)])
def test_every_format_is_written_and_reads_back(tmp_path, suffix, reader):
    volume, _ = _two_spheres()
    poly = extract_surfaces(volume, LABELS[:1])[0].polydata
    path = write_mesh(poly, tmp_path / f"ball{suffix}")
    r = reader()
    r.SetFileName(str(path))
    r.Update()
    assert r.GetOutput().GetNumberOfPolys() == poly.GetNumberOfPolys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_absent_labels_give_no_surface():
    assert extract_surfaces(Volume(np.zeros((4, 4, 4), np.uint8)), LABELS) == []
