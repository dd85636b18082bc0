"""Surfaces: closed, where the voxels are (oblique, anisotropic), and exported in every format."""

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import vtk
from vtk.util import numpy_support

from AIReconstructLib import surfaces as surfaces_module
from AIReconstructLib.errors import OutputError
from AIReconstructLib.manifold import manifold
from AIReconstructLib.meshfiles import write_mesh, write_scene
from AIReconstructLib.modelcard import Label
from AIReconstructLib.phantom import make_phantom, phantom_label_entries
from AIReconstructLib.surfaces import _polydata, extract_surfaces, mesh_checks, mesh_measurements
from AIReconstructLib.volume import Volume
from conftest import SHARED_DATA, oblique_direction

LABELS = [Label(1, "ball", (1, 0, 0), {}, {}), Label(2, "shell", (0, 1, 0), {}, {})]
WRITE_EACH_FORMAT = """
import sys
from pathlib import Path
import vtk
from AIReconstructLib.errors import OutputError
from AIReconstructLib.manifold import manifold
from AIReconstructLib.meshfiles import write_mesh, write_scene
from AIReconstructLib.modelcard import Label
from AIReconstructLib.surfaces import Surface
reader = vtk.vtkXMLPolyDataReader()
reader.SetFileName(sys.argv[1])
reader.Update()
Path(sys.argv[2]).mkdir()
vtk.vtkObject.GlobalWarningDisplayOff()
for suffix in (".stl", ".ply", ".vtp", ".glb", ".obj", ".3mf"):
    try:
        if suffix in (".glb", ".obj", ".3mf"):
            write_scene([Surface(Label(1, "ball", (1, 0, 0), {}, {}), reader.GetOutput(), "LPS")],
                        Path(sys.argv[2]) / ("ball" + suffix))
        else:
            write_mesh(reader.GetOutput(), Path(sys.argv[2]) / ("ball" + suffix))
    except OutputError as error:
        print(error)
"""


def _phantom_labels() -> list[Label]:
    return [Label(e["value"], e["name"], tuple(e["color"]), {}, {}) for e in phantom_label_entries()]


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


@pytest.fixture(params=["meshoptimizer", "vtk"])
def simplifier(request, monkeypatch):
    """Decimation by meshoptimizer (installed with the engine) and by VTK (where it is not)."""
    if request.param == "vtk":
        monkeypatch.setattr(surfaces_module, "meshoptimizer", None)
    else:
        assert surfaces_module.meshoptimizer is not None, "meshoptimizer is an engine dependency"
    return request.param


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


@pytest.mark.parametrize("mirror", [1.0, -1.0])
def test_every_surface_faces_outwards_on_a_grid_mirrored_or_not(mirror):
    volume, _ = _two_spheres()
    volume = Volume(volume.array, volume.spacing, volume.origin, volume.direction @ np.diag([1.0, 1.0, mirror]))
    for surface in extract_surfaces(volume, LABELS):
        points = _points(surface.polydata).astype(float)
        triangles = numpy_support.vtk_to_numpy(surface.polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        a, b, c = (points[triangles[:, n]] - points.mean(axis=0) for n in range(3))
        enclosed_mm3 = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
        expected_mm3 = np.count_nonzero(volume.array == surface.label.value) * volume.voxel_volume_ml * 1000.0
        assert enclosed_mm3 == pytest.approx(expected_mm3, rel=0.01), surface.label.name


def test_ras_coordinates_flip_x_and_y():
    volume, _ = _two_spheres()
    lps = extract_surfaces(volume, LABELS[:1], coordinates="LPS")[0].polydata
    ras = extract_surfaces(volume, LABELS[:1], coordinates="RAS")[0].polydata
    np.testing.assert_allclose(_points(ras), _points(lps) * [-1, -1, 1], atol=1e-9)
    assert mesh_measurements(ras)["volume_ml"] == pytest.approx(mesh_measurements(lps)["volume_ml"])


def test_decimation_reduces_triangles_and_keeps_the_mesh_closed_and_its_volume(simplifier):
    volume, _ = _two_spheres()
    full = extract_surfaces(volume, LABELS[:1])[0].polydata
    reduced = extract_surfaces(volume, LABELS[:1], decimate_fraction=0.7)[0].polydata
    assert reduced.GetNumberOfPolys() < 0.4 * full.GetNumberOfPolys()
    measured = mesh_measurements(reduced)
    assert measured["closed"] and measured["consistent_orientation"] and measured["degenerate_triangles"] == 0
    assert measured["volume_ml"] == pytest.approx(mesh_measurements(full)["volume_ml"], rel=0.01)
    assert {tuple(p) for p in _points(reduced)} <= {tuple(p) for p in _points(full)}  # vertices never move


@pytest.mark.parametrize("suffix,reader", [(".stl", vtk.vtkSTLReader), (".ply", vtk.vtkPLYReader),
                                           (".vtp", vtk.vtkXMLPolyDataReader)])
def test_every_format_is_written_and_reads_back(tmp_path, suffix, reader):
    volume, _ = _two_spheres()
    poly = extract_surfaces(volume, LABELS[:1])[0].polydata
    path = write_mesh(poly, tmp_path / f"ball{suffix}")
    r = reader()
    r.SetFileName(str(path))
    r.Update()
    assert r.GetOutput().GetNumberOfPolys() == poly.GetNumberOfPolys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ply_files_hold_what_vtks_writer_writes_and_a_full_disk_leaves_no_file(tmp_path):
    """The engine writes PLY itself (in one block): the same points, point normals and triangles as
    VTK's writer; a mesh file that cannot be written completely (a full disk) is reported with its
    reason and left out, in every format and scene (VTK's PLY writer wrote a cut-off file without a
    word; an OBJ scene leaves neither its OBJ nor its materials)."""
    volume, _ = _two_spheres()
    poly = extract_surfaces(volume, LABELS[:1], decimate_fraction=0.5)[0].polydata
    ours = write_mesh(poly, tmp_path / "ours.ply").read_bytes()
    writer = vtk.vtkPLYWriter()
    writer.SetFileName(str(tmp_path / "vtk.ply"))
    writer.SetInputData(poly)
    writer.Write()
    header, data = ours.split(b"end_header\n", 1)
    assert b"property float nx" in header and data == (tmp_path / "vtk.ply").read_bytes().split(b"end_header\n", 1)[1]

    def limit_file_size():  # what a full disk does to the writes of a child process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    write_mesh(poly, tmp_path / "ours.vtp")
    full = subprocess.run([sys.executable, "-c", WRITE_EACH_FORMAT, str(tmp_path / "ours.vtp"), str(tmp_path / "full")],
                          capture_output=True, text=True, preexec_fn=limit_file_size)
    assert full.returncode == 0, full.stderr
    errors = full.stdout.splitlines()
    assert [error.split(": ")[0] for error in errors] == [f"Cannot write {tmp_path / 'full' / 'ball'}{suffix}"
                                                         for suffix in (".stl", ".ply", ".vtp", ".glb", ".obj", ".3mf")]
    assert all(error.split(": ", 1)[1] for error in errors), errors  # each with its reason
    assert not list((tmp_path / "full").iterdir())


def test_a_mesh_of_other_cells_than_triangles_is_refused(tmp_path):
    square = vtk.vtkPolyData()
    square.SetPoints(vtk.vtkPoints())
    for corner in ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)):
        square.GetPoints().InsertNextPoint(corner)
    square.SetPolys(vtk.vtkCellArray())
    square.GetPolys().InsertNextCell(4, [0, 1, 2, 3])
    with pytest.raises(OutputError, match="square.stl: a surface mesh holds triangles only"):
        write_mesh(square, tmp_path / "square.stl")


def test_absent_labels_give_no_surface():
    assert extract_surfaces(Volume(np.zeros((4, 4, 4), np.uint8)), LABELS) == []


def test_meshes_pass_the_checks_and_decimation_keeps_neighbours_sealed(simplifier):
    volume, _ = _two_spheres()
    surfaces = {s.label.name: s.polydata for s in extract_surfaces(volume, LABELS, max_triangles=1500)}
    for poly in surfaces.values():
        checks = mesh_checks(poly)
        assert checks == {"closed": True, "consistent_orientation": True, "non_manifold_edges": 0,
                          "degenerate_triangles": 0}
    assert surfaces["ball"].GetNumberOfPolys() <= 1700
    ball_points = {tuple(p) for p in _points(surfaces["ball"])}
    shell_points = {tuple(p) for p in _points(surfaces["shell"])}
    assert ball_points <= shell_points  # the decimated ball is still exactly the shell's cavity


def _sheets(poly) -> int:
    """How many pieces a mesh falls into when pieces joined only by a shared vertex count as one."""
    connectivity = vtk.vtkPolyDataConnectivityFilter()
    connectivity.SetInputData(poly)
    connectivity.SetExtractionModeToAllRegions()
    connectivity.Update()
    return connectivity.GetNumberOfExtractedRegions()


@pytest.mark.parametrize("touching", ["edge", "corner"])
def test_voxels_touching_only_along_an_edge_or_at_a_corner_give_sheets_that_share_no_vertex(touching, tmp_path):
    """Two blocks of one label that touch only along a voxel edge (or at a corner): a surface that is
    closed, consistently oriented and manifold (what 3D printing software expects), in two pieces
    that share no vertex, enclosing the voxels' volume; also as STL, which keeps no shared vertices
    (trimesh, as slicers do, joins corners at the same place: the pieces are moved apart there)."""
    import trimesh

    array = np.zeros((20, 20, 20), np.uint8)
    array[4:10, 4:10, 4:10] = 1
    array[(slice(4, 10) if touching == "edge" else slice(10, 16)), 10:16, 10:16] = 1
    volume = Volume(array, (0.8, 1.0, 1.5), (5.0, -3.0, 2.0), oblique_direction(15))
    for smoothing in (0.0, 0.5):
        (surface,) = extract_surfaces(volume, LABELS[:1], smoothing=smoothing)
        measured = mesh_measurements(surface.polydata)
        assert measured["closed"] and measured["consistent_orientation"] and measured["non_manifold_edges"] == 0
        assert _sheets(surface.polydata) == 2
        assert measured["volume_ml"] == pytest.approx(np.count_nonzero(array) * volume.voxel_volume_ml, rel=0.03)
        printed = trimesh.load(write_mesh(surface.polydata, tmp_path / f"blocks-{smoothing}.stl"))
        assert printed.is_watertight and printed.is_winding_consistent and len(printed.split(only_watertight=False)) == 2


def test_a_sheet_of_no_thickness_is_dropped_from_a_surface():
    """Two triangles of the same corners wound opposite ways (what decimation leaves where a
    structure is thinner than its triangles), on an edge of a closed surface: dropped, and the
    surface stays closed, consistently oriented and manifold."""
    volume, _ = _two_spheres()
    poly = extract_surfaces(volume, LABELS[:1])[0].polydata
    points = _points(poly).astype(float)
    triangles = numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    a, b = triangles[0, :2]
    far = int(np.argmax(np.linalg.norm(points - points[a], axis=1)))  # a corner not near the edge
    with_sheet = np.vstack([triangles, [[a, b, far], [b, a, far]]])
    assert mesh_checks(_polydata(points, with_sheet))["non_manifold_edges"] == 1
    kept_points, kept = manifold(points, points, with_sheet)
    assert len(kept) == len(triangles)
    assert mesh_checks(_polydata(kept_points, kept)) == mesh_checks(poly)


@pytest.mark.skipif(not (SHARED_DATA / "CT_TotalSegExample").is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("decimate", [0.0, 0.5])
def test_the_surfaces_of_the_structures_of_a_real_ct_are_manifold(decimate, tmp_path):
    """TotalSegmentator's labels of the real CT at 3 mm (ribs, vertebrae, vessels: many voxels
    touching only along an edge): every surface closed, consistently oriented and manifold, also
    at half the triangles (where a structure is thinner than its triangles, decimation leaves
    sheets of no thickness: 22 of the 61 surfaces had edges of more than two triangles), and as
    STL files read by software that joins corners at the same place (47 of 61 were not watertight
    so before the copies of split vertices were moved apart)."""
    import trimesh

    from AIReconstructLib.io import read_labelmap

    labelmap = read_labelmap(SHARED_DATA / "CT_TotalSegExample" / "reference_totalseg_fast.nii.gz")
    labels = [Label(int(value), f"label {value}", (1, 1, 1), {}, {}) for value in np.unique(labelmap.array)[1:]]
    surfaces = extract_surfaces(labelmap, labels, decimate_fraction=decimate)
    assert len(surfaces) == len(labels) == 61  # the structures in this scan's field of view
    for surface in surfaces:
        checks = mesh_checks(surface.polydata)
        assert checks["closed"] and checks["consistent_orientation"], surface.label.name
        assert checks["non_manifold_edges"] == 0, surface.label.name
        printed = trimesh.load(write_mesh(surface.polydata, tmp_path / f"{surface.label.value}.stl"))
        assert printed.is_watertight and printed.is_winding_consistent, surface.label.name


def test_checks_find_open_flipped_and_degenerate_meshes():
    volume, _ = _two_spheres()
    poly = extract_surfaces(volume, LABELS[:1])[0].polydata
    points = _points(poly).astype(float)
    triangles = numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    flipped = triangles.copy()
    flipped[0] = flipped[0, ::-1]
    degenerate = np.vstack([triangles, [[0, 0, 1]]])
    assert not mesh_checks(_polydata(points, triangles[1:]))["closed"]
    assert not mesh_checks(_polydata(points, flipped))["consistent_orientation"]
    assert mesh_checks(_polydata(points, degenerate))["degenerate_triangles"] == 1


def test_mesh_volumes_match_voxel_volumes_on_a_phantom_at_1mm():
    phantom = make_phantom(3, spacing=(1.0, 1.0, 1.0), direction=np.eye(3), field_of_view_mm=(200.0, 160.0, 160.0))
    labels = _phantom_labels()
    counts = np.bincount(phantom.labels.array.ravel(), minlength=len(labels) + 1)
    surfaces = extract_surfaces(phantom.labels, labels, smoothing=0.5)
    assert len(surfaces) >= 5
    for surface in surfaces:
        measured = mesh_measurements(surface.polydata)
        assert measured["closed"] and measured["consistent_orientation"], surface.label.name
        assert measured["degenerate_triangles"] == 0 and measured["non_manifold_edges"] == 0
        voxel_ml = counts[surface.label.value] * phantom.labels.voxel_volume_ml
        assert measured["volume_ml"] == pytest.approx(voxel_ml, rel=0.03), surface.label.name


def test_scene_files_hold_every_segment_named_and_coloured(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    volume, _ = _two_spheres()
    surfaces = extract_surfaces(volume, LABELS)
    assert write_scene(surfaces, tmp_path / "scene.glb") == [tmp_path / "scene.glb"]
    scene = trimesh.load(tmp_path / "scene.glb", force="scene")
    meshes = {name: scene.geometry[name] for name in scene.geometry}
    assert set(meshes) == {"ball", "shell"}
    ball = meshes["ball"]
    assert ball.is_watertight and ball.is_winding_consistent and ball.volume > 0  # outward in glTF axes too
    assert ball.volume * 1e6 == pytest.approx(mesh_measurements(surfaces[0].polydata)["volume_ml"], rel=1e-4)  # m³ to mL
    colour = ball.visual.material.baseColorFactor[:3] / 255.0
    np.testing.assert_allclose(colour, LABELS[0].color, atol=0.01)

    written = write_scene(surfaces, tmp_path / "scene.obj")
    assert [p.name for p in written] == ["scene.obj", "scene.mtl"]
    obj = trimesh.load(tmp_path / "scene.obj", force="scene", group_material=False, split_object=True)
    assert len(obj.geometry) == 2
    materials = (tmp_path / "scene.mtl").read_text()
    assert "newmtl ball\n" in materials and "Kd 1.0000 0.0000 0.0000" in materials
    with pytest.raises(OutputError, match="scene format"):
        write_scene(surfaces, tmp_path / "scene.fbx")


GLTF_VALIDATOR = Path(sys.prefix) / "node_modules" / "gltf-validator"  # `make test` installs it with npm
VALIDATE_GLB = """
const validator = require(process.argv[1]);
const bytes = new Uint8Array(require('fs').readFileSync(process.argv[2]));
validator.validateBytes(bytes).then((report) => console.log(JSON.stringify(report.issues)));
"""


@pytest.mark.skipif(not (GLTF_VALIDATOR.is_dir() and shutil.which("node")),
                    reason="the Khronos glTF validator (npm package gltf-validator) or Node.js is not installed")
@pytest.mark.parametrize("coordinates", ["LPS", "RAS"])
def test_the_glb_scene_passes_the_khronos_gltf_validator(tmp_path, coordinates):
    phantom = make_phantom(3, (3.0, 3.0, 3.0))
    surfaces = extract_surfaces(phantom.labels, _phantom_labels(), decimate_fraction=0.5, coordinates=coordinates)
    write_scene(surfaces, tmp_path / "scene.glb")
    checked = subprocess.run(["node", "-e", VALIDATE_GLB, str(GLTF_VALIDATOR), str(tmp_path / "scene.glb")],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    issues = json.loads(checked.stdout)
    assert (issues["numErrors"], issues["numWarnings"]) == (0, 0), issues["messages"]


def test_the_3mf_scene_reads_back_in_lib3mf_as_one_coloured_manifold_object_per_segment(tmp_path):
    """The 3MF Consortium's library, in strict mode: no warning, millimetres, one object per segment
    with its name, colour, points and triangles, each manifold, facing outwards and a build item."""
    lib3mf = pytest.importorskip("lib3mf")
    phantom = make_phantom(3, (3.0, 3.0, 3.0))
    surfaces = extract_surfaces(phantom.labels, _phantom_labels(), decimate_fraction=0.5)
    assert write_scene(surfaces, tmp_path / "scene.3mf") == [tmp_path / "scene.3mf"]
    model = lib3mf.get_wrapper().CreateModel()
    reader = model.QueryReader("3mf")
    reader.SetStrictModeActive(True)
    reader.ReadFromFile(str(tmp_path / "scene.3mf"))
    assert reader.GetWarningCount() == 0 and model.GetUnit() == lib3mf.ModelUnit.MilliMeter
    objects, items = model.GetMeshObjects(), model.GetBuildItems()
    colours = {}
    materials = model.GetBaseMaterialGroups()
    while materials.MoveNext():
        group = materials.GetCurrentBaseMaterialGroup()
        for property_id in group.GetAllPropertyIDs():
            colour = group.GetDisplayColor(property_id)
            colours[group.GetName(property_id)] = (colour.Red, colour.Green, colour.Blue)
    read = []
    while objects.MoveNext():
        mesh = objects.GetCurrentMeshObject()
        assert mesh.IsManifoldAndOriented(), mesh.GetName()
        points = np.array([list(vertex.Coordinates) for vertex in mesh.GetVertices()])
        a, b, c = (points[[triangle.Indices[k] for triangle in mesh.GetTriangleIndices()]] for k in range(3))
        assert np.einsum("ij,ij->", a, np.cross(b, c)) > 0, mesh.GetName()  # facing outwards, as 3MF requires
        read.append((mesh.GetName(), mesh.GetVertexCount(), mesh.GetTriangleCount()))
    assert read == [(s.label.name, s.polydata.GetNumberOfPoints(), s.polydata.GetNumberOfPolys()) for s in surfaces]
    assert colours == {s.label.name: tuple(round(255 * c) for c in s.label.color) for s in surfaces}
    assert items.Count() == len(surfaces)
