"""The Slicer adapter's logic on Slicer's real MRML libraries (the slicer-core package)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy import ndimage

slicer = pytest.importorskip("slicer", reason="the slicer-core package (Slicer's MRML libraries) is not installed")
vtk = pytest.importorskip("vtk")

from AIReconstructAdapter.engine_run import EXCHANGE_PREFIX, exchange_folder  # noqa: E402
from AIReconstructAdapter.jobs import SegmentationJob  # noqa: E402
from AIReconstructAdapter.nodes import (add_volume_node, ensure_converter_rules, export_to_files,  # noqa: E402
                                        export_to_models, import_segmentation, segment_mask, set_segment_mask, show_3d,
                                        volume_from_node)
from AIReconstructLib.io import write_volume  # noqa: E402
from AIReconstructLib.modelcard import Label, load_card  # noqa: E402
from AIReconstructLib.segnrrd import write_seg_nrrd  # noqa: E402
from AIReconstructLib.volume import Volume  # noqa: E402
from conftest import noise_ct, oblique_direction, tiny_card, write_model  # noqa: E402


def _matrix(array4x4):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array4x4[r][c]))
    return m


def _segment_names(node):
    seg = node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


# the environment the runs here start the engine's worker in, the same for every run as Slicer's start-up
# environment is for the panel (the runner's own changes with each test, which would start a new worker)
STARTUP_ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}


@pytest.fixture(scope="module", autouse=True)
def end_the_engine_worker():
    """The runs here share one engine worker, as a Slicer session does; it ends with the module."""
    from AIReconstructAdapter.engine_run import WARM_ENGINE

    yield
    WARM_ENGINE.shutdown()


@pytest.fixture
def scene(monkeypatch):
    """A real MRML scene, installed as ``slicer.mrmlScene`` the way the application does."""
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    ensure_converter_rules()  # what the Segmentations module does when Slicer starts
    selection = slicer.vtkMRMLSelectionNode()  # the application's: measurements (a line's length) take units from it
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    return scene


@pytest.fixture
def oblique_ct(ct_volume):
    return Volume(ct_volume.array, ct_volume.spacing, ct_volume.origin, oblique_direction(20))


def test_volume_node_to_engine_volume_keeps_oblique_anisotropic_geometry(scene, oblique_ct):
    node = add_volume_node(scene, oblique_ct)
    volume = volume_from_node(node)
    np.testing.assert_array_equal(volume.array, oblique_ct.array)
    np.testing.assert_allclose(volume.ijk_to_lps(), oblique_ct.ijk_to_lps(), atol=1e-9)


def test_linear_parent_transform_is_applied(scene, ct_volume):
    node = add_volume_node(scene, ct_volume)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [10, 20, 30]  # RAS
    transform.SetMatrixTransformToParent(_matrix(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = volume_from_node(node)
    np.testing.assert_allclose(np.array(moved.origin) - ct_volume.origin, [-10, -20, 30])


def test_engine_seg_nrrd_is_read_by_slicers_storage_node(tmp_path, scene, tiny_model, oblique_ct):
    labels = np.zeros(oblique_ct.array.shape, np.uint8)
    labels[5:15, 10:30, 10:40] = 1
    labels[8:12, 15:20, 20:25] = 2
    labelmap = oblique_ct.with_array(labels)
    card = load_card(tiny_model)
    path = write_seg_nrrd(labelmap, card.labels, tmp_path / "result.seg.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert _segment_names(node) == ["organ", "lesion"]
    organ = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("organ"))
    np.testing.assert_allclose(organ.GetColor(), (0.8, 0.2, 0.2), atol=1e-6)
    assert organ.GetLabelValue() == 1
    terminology = vtk.reference("")
    assert organ.GetTag("TerminologyEntry", terminology)
    assert "SCT^10200004^Liver" in str(terminology)
    reference = add_volume_node(scene, oblique_ct)
    lesion = segment_mask(node, segmentation.GetSegmentIdBySegmentName("lesion"), reference)
    np.testing.assert_array_equal(lesion, labels == 2)  # the same voxels, on the input's grid
    geometry = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(segmentation.GetSegmentIdBySegmentName("organ"), geometry)
    ijk_to_ras = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(ijk_to_ras)
    expected = oblique_ct.ijk_to_ras()
    got = np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(got[:3, :3], expected[:3, :3], atol=1e-6)


def test_our_header_matches_the_one_slicers_storage_node_writes(tmp_path, scene, tiny_model, oblique_ct):
    import nrrd
    labels = np.zeros(oblique_ct.array.shape, np.uint8)
    labels[5:15, 10:30, 10:40] = 1
    labels[8:12, 15:20, 20:25] = 2
    ours = write_seg_nrrd(oblique_ct.with_array(labels), load_card(tiny_model).labels, tmp_path / "ours.seg.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(ours))
    assert storage.ReadData(node)
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node)
    _, mine = nrrd.read(str(ours))
    _, theirs = nrrd.read(str(tmp_path / "slicer.seg.nrrd"))
    segment_keys = {key.split("_", 1)[1] for key in theirs if key.startswith("Segment0_")}
    assert segment_keys <= {key.split("_", 1)[1] for key in mine if key.startswith("Segment0_")}
    for index in (0, 1):
        for field in ("ID", "Name", "LabelValue", "Layer"):
            assert mine[f"Segment{index}_{field}"] == theirs[f"Segment{index}_{field}"], field
        assert np.allclose([float(v) for v in mine[f"Segment{index}_Color"].split()],
                           [float(v) for v in theirs[f"Segment{index}_Color"].split()], atol=1e-5)
    organ_terminology = mine["Segment0_Tags"].split("TerminologyEntry:")[1].split("|")[0]
    assert organ_terminology in theirs["Segment0_Tags"]
    assert mine["Segmentation_MasterRepresentation"] == theirs["Segmentation_MasterRepresentation"]
    assert mine["space"] == theirs["space"] == "left-posterior-superior"
    np.testing.assert_allclose(mine["space directions"], theirs["space directions"], atol=1e-6)
    # Slicer crops its file to the segments and records the shift; ours keeps the whole grid (offset 0)
    offset = np.array([int(v) for v in theirs["Segmentation_ReferenceImageExtentOffset"].split()])
    np.testing.assert_allclose(theirs["space origin"], mine["space origin"] + offset @ mine["space directions"], atol=1e-5)
    union = [int(v) for v in mine["Segment0_Extent"].split()]  # the organ's extent holds the lesion's
    assert [union[0], union[2], union[4]] == offset.tolist()


def test_import_replaces_segments_of_the_same_name_and_keeps_others(tmp_path, scene, tiny_model, ct_volume):
    volume_node = add_volume_node(scene, ct_volume)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    existing.GetSegmentation().AddEmptySegment("organ", "organ", [0, 0, 1])
    existing.GetSegmentation().AddEmptySegment("notes", "my notes", [1, 1, 0])
    labels = np.zeros(ct_volume.array.shape, np.uint8)
    labels[2:10, 5:20, 5:30] = 1
    labels[4:6, 8:12, 10:14] = 2
    path = write_seg_nrrd(ct_volume.with_array(labels), load_card(tiny_model).labels, tmp_path / "r.seg.nrrd")
    node = import_segmentation(scene, path, volume_node, target=existing)
    assert node is existing
    assert sorted(_segment_names(node)) == ["lesion", "my notes", "organ"]
    segmentation = node.GetSegmentation()
    organ_id, lesion_id = (segmentation.GetSegmentIdBySegmentName(name) for name in ("organ", "lesion"))
    np.testing.assert_allclose(segmentation.GetSegment(organ_id).GetColor(), (0.8, 0.2, 0.2), atol=1e-6)
    assert segmentation.GetSegment(organ_id).GetTag("TerminologyEntry", vtk.reference(""))
    for segment_id, value in ((organ_id, 1), (lesion_id, 2)):
        np.testing.assert_array_equal(segment_mask(node, segment_id, volume_node), labels == value)
    # the engine's segments share one labelmap, as Slicer reads them, not a full-size copy each
    assert segmentation.GetLayerIndex(organ_id) == segmentation.GetLayerIndex(lesion_id)
    new = import_segmentation(scene, path, volume_node)
    assert new.GetSegmentation().GetNumberOfSegments() == 2 and new.GetSegmentation().GetNumberOfLayers() == 1
    lesion = segment_mask(new, new.GetSegmentation().GetSegmentIdBySegmentName("lesion"), volume_node)
    np.testing.assert_array_equal(lesion, labels == 2)


def test_exchange_folder_is_in_memory_where_there_is_room(tmp_path, monkeypatch):
    memory = tmp_path / "shm"
    memory.mkdir()
    left_by_a_killed_run = memory / f"{EXCHANGE_PREFIX}{2**22 + 7}-abc"  # above Linux's largest process id
    left_by_a_killed_run.mkdir()
    of_a_live_process = memory / f"{EXCHANGE_PREFIX}{os.getpid()}-def"
    of_a_live_process.mkdir()
    folder = exchange_folder(10**6, memory)
    assert folder.parent == memory and folder.name.startswith(f"{EXCHANGE_PREFIX}{os.getpid()}-")
    assert not left_by_a_killed_run.exists() and of_a_live_process.exists()
    system_temp = tmp_path / "tmp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    assert exchange_folder(shutil.disk_usage(memory).free, memory).parent == system_temp  # no room for 4x
    assert exchange_folder(10**6, tmp_path / "absent").parent == system_temp


def test_background_run_creates_segments_surfaces_and_models(tmp_path, scene, tiny_model, oblique_ct):
    volume_node = add_volume_node(scene, oblique_ct, "patient CT")
    job = SegmentationJob(scene, [volume_node], str(tiny_model), device="cpu", env=STARTUP_ENVIRONMENT)
    job.start()
    workdir = job.workdir
    state = job.wait(timeout=300)
    assert state.status == "done", state.error
    assert not workdir.exists()
    node = job.segmentation_node
    assert node.GetName() == "patient CT tiny-test-model"
    assert set(_segment_names(node)) <= {"organ", "lesion"} and _segment_names(node)
    assert set(job.volumes_ml) == set(_segment_names(node)) and all(v > 0 for v in job.volumes_ml.values())
    reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
    assert reference is volume_node
    assert [node.GetAttribute(a) for a in ("AIReconstruct.Model", "AIReconstruct.ModelVersion")] == ["tiny-test-model", "0.0.1"]
    show_3d(node, smoothing=0.3)
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    models = export_to_models(scene, node)
    assert [m.GetName() for m in models] == _segment_names(node)[: len(models)]
    files = export_to_files(node, tmp_path / "meshes", ".stl")
    assert [f.name for f in files] == [f"{name}.stl" for name in _segment_names(node)]
    for file, model in zip(files, models):  # the engine's surfaces: closed and manifold also as STL,
        printed = trimesh.load(file)        # which joins corners in one place; the models the same, in RAS
        assert printed.is_watertight and printed.is_winding_consistent and printed.volume > 0, file.name
        ras = slicer.util.arrayFromModelPoints(model)
        (low, high) = printed.bounds  # LPS
        np.testing.assert_allclose(ras.min(axis=0), [-high[0], -high[1], low[2]], atol=1e-3)
    scene_files = export_to_files(node, tmp_path / "meshes", ".glb")
    assert [f.name for f in scene_files] == ["patient_CT_tiny-test-model.glb"] and scene_files[0].read_bytes()[:4] == b"glTF"
    printable = export_to_files(node, tmp_path / "meshes", ".3mf")
    assert [f.name for f in printable] == ["patient_CT_tiny-test-model.3mf"] and zipfile.is_zipfile(printable[0])


def test_background_run_with_uncertainty_adds_the_map_and_the_regions_to_check(scene, tiny_model, oblique_ct):
    volume_node = add_volume_node(scene, oblique_ct, "patient CT")
    job = SegmentationJob(scene, [volume_node], str(tiny_model), device="cpu", uncertainty=True,
                          env=STARTUP_ENVIRONMENT)
    job.start()
    state = job.wait(timeout=300)
    assert state.status == "done", state.error
    uncertainty = volume_from_node(job.uncertainty_node)
    assert job.uncertainty_node.GetName() == "patient CT tiny-test-model uncertainty"
    assert uncertainty.same_grid(oblique_ct) and 0 <= uncertainty.array.min() and uncertainty.array.max() <= 1
    regions = state.result["summary"]["flagged_regions"]
    assert regions  # an untrained network is unsure nearly everywhere
    points = job.check_points
    assert points.GetNumberOfControlPoints() == len(regions)
    ras = [0.0, 0.0, 0.0]
    points.GetNthControlPointPosition(0, ras)
    np.testing.assert_allclose(ras, np.array(regions[0]["centre_mm"]) * [-1, -1, 1], atol=1e-3)
    assert points.GetNthControlPointLabel(0).startswith("check 1:")

    for uncertainty_again in (True, False):  # runs into the same segmentation: the last run's map, or none
        again = SegmentationJob(scene, [volume_node], str(tiny_model), device="cpu", uncertainty=uncertainty_again,
                                target_segmentation=job.segmentation_node, env=STARTUP_ENVIRONMENT)
        again.start()
        assert again.wait(timeout=300).status == "done"
        maps = [n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if n.GetName().endswith("uncertainty")]
        lists = [n for n in scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode") if n.GetName().endswith("to check")]
        expected = [again.uncertainty_node] if uncertainty_again else []
        assert maps == expected and lists == ([again.check_points] if uncertainty_again else [])


def test_failed_run_leaves_the_scene_unchanged(scene, ct_volume):
    add_volume_node(scene, ct_volume)
    before = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    job = SegmentationJob(scene, [scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")], "no-such-model",
                          env=STARTUP_ENVIRONMENT)
    job.start()
    state = job.wait(timeout=120)
    assert state.status == "failed" and "No installed model named 'no-such-model'" in state.error
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == before
    assert job.segmentation_node is None and job.workdir is None


def test_cancelled_run_leaves_the_scene_unchanged(scene, tiny_model):
    big = noise_ct((120, 120, 120), spacing=(3, 3, 3))
    volume_node = add_volume_node(scene, big)
    count = scene.GetNumberOfNodes()
    job = SegmentationJob(scene, [volume_node], str(tiny_model), device="cpu", tta=True, env=STARTUP_ENVIRONMENT)
    job.start()
    while "window" not in job.poll().message:
        assert not job.engine.state.finished, job.engine.state.error
    job.cancel()
    state = job.wait(timeout=60)
    assert state.status == "cancelled"
    assert scene.GetNumberOfNodes() == count and job.workdir is None
    assert job.engine.worker.alive()  # the worker stopped the run, and stays for the next one


def _ball_to_correct(scene, seed: int):
    """A bright ball in noise on an oblique grid, its volume node, and a segmentation node with one
    empty segment to correct with points: (ball, volume, volume node, segmentation node, segment ID)."""
    k, j, i = np.mgrid[0:32, 0:60, 0:70]
    ball = (i - 30) ** 2 + ((j - 30) * 1.2) ** 2 + ((k - 15) * 2.0) ** 2 < 12 ** 2
    image = np.where(ball, 300.0, 0.0) + np.random.default_rng(seed).normal(0, 10, ball.shape)
    volume = Volume(image.astype(np.float32), (1.0, 1.2, 2.0), (4.0, -7.0, 11.0), oblique_direction(15))
    volume_node = add_volume_node(scene, volume, "FLAIR")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return ball, volume, volume_node, segmentation, segmentation.GetSegmentation().AddEmptySegment("", "tumour")


def test_points_correct_a_segment_in_place_and_undo_restores_it(scene):
    from AIReconstructAdapter.correction import SegmentCorrection
    from AIReconstructLib.interaction import dice

    ball, volume, volume_node, segmentation, segment_id = _ball_to_correct(scene, 0)
    correction = SegmentCorrection(scene, segmentation, segment_id, volume_node, env=STARTUP_ENVIRONMENT)
    assert correction.points[True].GetName() == "tumour include"
    correction.observe()  # as the panel does: placing a point re-segments

    centre_ras = volume.ijk_to_ras() @ [30, 30, 15, 1]
    correction.points[True].AddControlPoint(vtk.vtkVector3d(*centre_ras[:3]))
    assert correction.poll() and not correction.prompts  # the panel's timer: started in the engine's worker
    assert not segment_mask(segmentation, segment_id, volume_node).any()  # the segment changes once it is done
    correction.wait()
    assert len(correction.prompts) == 1 and not correction.sync()  # done once per point
    first = segment_mask(segmentation, segment_id, volume_node)
    assert dice(first, ball) > 0.9

    wrong_ras = volume.ijk_to_ras() @ [30, 35, 15, 1]  # inside the ball: excluding it removes a part
    correction.points[False].AddControlPoint(vtk.vtkVector3d(*wrong_ras[:3]))
    correction.wait()
    assert len(correction.prompts) == 2
    second = segment_mask(segmentation, segment_id, volume_node)
    assert second.sum() < first.sum()

    assert correction.undo()
    restored = segment_mask(segmentation, segment_id, volume_node)
    np.testing.assert_array_equal(restored, first)
    assert correction.points[False].GetNumberOfControlPoints() == 0
    correction.end(scene)
    assert scene.GetFirstNodeByName("tumour include") is None
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), first)  # the segment stays


def _correcting(scene, seed: int):
    """``_ball_to_correct``'s scene and a correction of its segment that follows its points and box,
    as the panel starts one: (ball, volume, volume node, segmentation node, segment ID, correction)."""
    from AIReconstructAdapter.correction import SegmentCorrection

    ball, volume, volume_node, segmentation, segment_id = _ball_to_correct(scene, seed)
    correction = SegmentCorrection(scene, segmentation, segment_id, volume_node, env=STARTUP_ENVIRONMENT)
    correction.observe()
    return ball, volume, volume_node, segmentation, segment_id, correction


def _place(correction, include: bool, volume, ijk) -> None:
    """Place an include or exclude point on voxel ``ijk`` (i, j, k), as a click on a slice does."""
    correction.points[include].AddControlPoint(vtk.vtkVector3d(*(volume.ijk_to_ras() @ [*ijk, 1])[:3]))


def _draw_box(box_node, corners_kji, volume):
    """Draw a box as Slicer's placement does: two opposite corners (RAS) as control points."""
    for corner in corners_kji:
        box_node.AddControlPoint(vtk.vtkVector3d(*(volume.ijk_to_ras() @ [*corner[::-1], 1])[:3]))


def test_a_box_drawn_around_a_segment_segments_it_and_undo_takes_it_back(scene):
    """A box drawn on an empty segment grows it from the box's centre to the edges inside it; an
    exclude point then cuts a part; undo takes back the point, then the box; a box drawn again
    replaces the one before; a box resized (its handles dragged) is followed."""
    from AIReconstructLib.interaction import dice

    ball, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 5)
    box_node = correction.new_box()
    assert box_node.GetName() == "tumour box" and not correction.prompts
    corners = np.argwhere(ball)
    _draw_box(box_node, [corners.min(axis=0) - 2, corners.max(axis=0) + 2], volume)
    correction.wait()
    boxed = segment_mask(segmentation, segment_id, volume_node)
    assert len(correction.prompts) == 1 and dice(boxed, ball) > 0.9

    _place(correction, False, volume, (30, 35, 15))
    correction.wait()
    assert segment_mask(segmentation, segment_id, volume_node).sum() < boxed.sum()
    assert correction.undo()
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), boxed)
    assert correction.undo() and correction.box is None and box_node.GetScene() is None
    assert not segment_mask(segmentation, segment_id, volume_node).any() and not correction.prompts

    half = correction.new_box()  # around the ball's lower half (j < 30) only
    _draw_box(half, [corners.min(axis=0) - 2, [corners.max(axis=0)[0] + 2, 29, corners.max(axis=0)[2] + 2]], volume)
    correction.wait()
    lower = segment_mask(segmentation, segment_id, volume_node)
    assert 0.2 < lower.sum() / ball.sum() < 0.7 and not lower[:, 36:].any()  # the box is oblique on this grid
    half.SetSize(*(np.array(half.GetSize()) * [1.0, 1.0, 1.0]))  # unchanged: nothing to follow
    assert not correction.sync()
    size = np.array(half.GetSize())
    half.SetSize(*(size + 60))  # its handles dragged out around the whole ball
    half.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    correction.wait()
    assert dice(segment_mask(segmentation, segment_id, volume_node), ball) > 0.9
    replaced = correction.new_box()  # drawn again: the box before goes, and its correction with it
    correction.wait()
    assert half.GetScene() is None and not segment_mask(segmentation, segment_id, volume_node).any()
    correction.end(scene)
    assert replaced.GetScene() is None and scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == 0


def test_a_point_after_the_box_corrects_near_it_and_the_box_still_bounds_the_segment(scene):
    """The box is not re-segmented for each later point (around a liver that takes seconds): the
    engine corrects near the point only, and the box, drawn before, still bounds the segment."""
    from AIReconstructLib.interaction import Click, box_slices, refine, to_voxel, to_voxel_box

    ball, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 12)
    corners = np.argwhere(ball)
    _draw_box(correction.new_box(), [corners.min(axis=0) - 2, corners.max(axis=0) + 2], volume)
    correction.wait()
    boxed = segment_mask(segmentation, segment_id, volume_node)
    bounds = correction.prompts[0][2]
    in_box = np.zeros(ball.shape, bool)
    in_box[box_slices(to_voxel_box(volume, [bounds[:3], bounds[3:]], "RAS"), (0, 0, 0))] = True

    for include, ijk in ((False, (30, 35, 15)), (True, (60, 8, 4))):  # the second outside the box
        before = segment_mask(segmentation, segment_id, volume_node)
        _place(correction, include, volume, ijk)
        assert correction.poll() and "--box" not in correction.step.run.arguments
        correction.wait()
        click = Click(to_voxel(volume, list((volume.ijk_to_ras() @ [*ijk, 1])[:3]), "RAS"), include)
        clicks = [Click(to_voxel(volume, list(prompt[2]), "RAS"), prompt[0]) for prompt in correction.prompts[1:-1]]
        expected = refine(volume, before, [*clicks, click]) & in_box
        np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), expected)
    assert segment_mask(segmentation, segment_id, volume_node).sum() < boxed.sum()
    correction.end(scene)


def test_a_point_placed_or_dragged_outside_the_image_is_refused_in_one_line(scene):
    """The panel's poll shows the error in a message; the point is taken off the slices, changes
    nothing, and later points still correct."""
    from AIReconstructLib.errors import InputError

    _, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 7)
    include = correction.points[True]
    include.AddControlPoint(vtk.vtkVector3d(*(volume.ijk_to_ras() @ [30, 30, 15, 1])[:3]))
    correction.wait()
    inside = segment_mask(segmentation, segment_id, volume_node)
    include.AddControlPoint(vtk.vtkVector3d(*(volume.ijk_to_ras() @ [900, 30, 15, 1])[:3]))
    with pytest.raises(InputError, match="^Outside the image: 1 point or box taken off the slices$"):
        correction.wait()
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), inside)
    assert include.GetNumberOfControlPoints() == 1 and len(correction.prompts) == 1
    _place(correction, False, volume, (30, 35, 15))
    correction.wait()
    assert len(correction.prompts) == 2  # later points still correct
    include.SetNthControlPointPositionWorld(0, *(volume.ijk_to_ras() @ [30, 30, 900, 1])[:3])
    include.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)  # dragged off the image
    with pytest.raises(InputError, match="^Moved outside the image: 1 point or box taken off the slices$"):
        correction.wait()
    correction.wait()
    assert include.GetNumberOfControlPoints() == 0 and [prompt[0] for prompt in correction.prompts] == [False]
    correction.end(scene)


def test_a_box_or_point_list_deleted_in_the_data_module_is_followed(scene):
    """Once the box's node is deleted, the next prompt (here its event alone) corrects the segment
    again without the box; a point list deleted, without its points, and the correction, no longer
    intact, is to be started anew."""
    ball, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 9)
    _place(correction, True, volume, (30, 30, 15))
    correction.wait()
    with_point = segment_mask(segmentation, segment_id, volume_node)
    corners = np.argwhere(ball)
    _draw_box(correction.new_box(), [corners.min(axis=0) - 2, [corners.max(axis=0)[0] + 2, 29, corners.max(axis=0)[2] + 2]],
              volume)
    correction.wait()
    assert len(correction.prompts) == 2
    scene.RemoveNode(correction.box)  # as the Data module deletes it: no event tells of that
    assert correction.sync()  # as the next prompt or undo does
    correction.wait()
    assert len(correction.prompts) == 1
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), with_point)
    assert correction.intact
    scene.RemoveNode(correction.points[True])
    assert correction.sync() and not correction.busy  # nothing left to correct with: as before the first point
    assert not correction.prompts and not correction.intact
    assert not segment_mask(segmentation, segment_id, volume_node).any()  # as before the first point
    correction.end(scene)


def test_edits_made_elsewhere_between_points_are_kept(scene):
    """Painted in the Segment Editor after a point: a point moved afterwards corrects the painted
    segment (instead of the segment before the first point), and undo, which would take the paint
    back with the point, refuses."""
    from AIReconstructLib.interaction import dice

    ball, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 3)
    include, moved = ((volume.ijk_to_ras() @ [30, j, 15, 1])[:3] for j in (30, 32))
    correction.points[True].AddControlPoint(vtk.vtkVector3d(*include))
    correction.wait()
    painted = segment_mask(segmentation, segment_id, volume_node)
    painted[2:6, 50:56, 60:66] = True  # far from the ball and the points
    set_segment_mask(segmentation, segment_id, volume_node, painted)

    assert not correction.undo()
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), painted)
    correction.points[True].SetNthControlPointPositionWorld(0, *moved)
    correction.points[True].InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    correction.wait()
    after = segment_mask(segmentation, segment_id, volume_node)
    assert after[2:6, 50:56, 60:66].all() and dice(after, ball | painted) > 0.9
    correction.end(scene)


def test_one_correction_at_a_time_so_old_points_cannot_undo_later_work(scene):
    """The panel starts a new correction when the user picks another segment and comes back, and
    ends the current one when a new result arrives: the points of the correction before are gone,
    and moving one of them (a reference still held) does not put the segment back as it was."""
    from AIReconstructAdapter.logic import AdapterLogic
    from AIReconstructLib.errors import InputError
    from AIReconstructLib.interaction import dice

    ball, volume, volume_node, segmentation, segment_id = _ball_to_correct(scene, 2)
    logic = AdapterLogic()
    include, outside, elsewhere = ((volume.ijk_to_ras() @ [30, j, 15, 1])[:3] for j in (30, 55, 5))
    first = logic.startCorrection(scene, segmentation, segment_id, volume_node, env=STARTUP_ENVIRONMENT)
    first.points[True].AddControlPoint(vtk.vtkVector3d(*include))
    first.wait()
    old_points = first.points[True]

    second = logic.startCorrection(scene, segmentation, segment_id, volume_node, env=STARTUP_ENVIRONMENT)
    assert logic.correction is second and old_points.GetScene() is None
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 2
    second.points[False].AddControlPoint(vtk.vtkVector3d(*outside))
    second.wait()
    corrected = segment_mask(segmentation, segment_id, volume_node)
    assert dice(corrected, ball) > 0.9

    old_points.SetNthControlPointPositionWorld(0, *elsewhere)
    old_points.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), corrected)

    with pytest.raises(InputError, match="Choose a segment of .* to correct"):
        logic.startCorrection(scene, segmentation, "", volume_node)  # none chosen: the current one goes on
    assert logic.correction is second and second.points[True].GetScene() is scene

    other_volume = add_volume_node(scene, volume.with_array(volume.array[::-1].copy()), "another series")
    third = logic.startCorrection(scene, segmentation, segment_id, other_volume)  # the input chosen now
    assert third.volume_node is volume_node  # points correct the segment on the image it was made on

    logic.endCorrection(scene)  # as when a new result arrives
    assert logic.correction is None and scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 0
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), corrected)


def test_points_removed_or_moved_in_the_markups_module_are_followed(scene):
    """A point removed in the Markups module leaves the segment as if it had never been placed; a
    point dragged elsewhere, as if it had been placed there; undo still steps back a point."""
    from AIReconstructLib.interaction import Click, refine, to_voxel

    ball, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 1)
    include, exclude, moved = ((volume.ijk_to_ras() @ [30, j, 15, 1])[:3] for j in (30, 35, 38))
    exclusions = correction.points[False]

    correction.points[True].AddControlPoint(vtk.vtkVector3d(*include))
    correction.wait()
    only_include = segment_mask(segmentation, segment_id, volume_node)
    exclusions.AddControlPoint(vtk.vtkVector3d(*exclude))
    correction.wait()
    assert segment_mask(segmentation, segment_id, volume_node).sum() < only_include.sum()
    exclusions.RemoveNthControlPoint(0)  # as the Markups module's delete does
    correction.wait()
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), only_include)
    assert len(correction.prompts) == 1

    exclusions.AddControlPoint(vtk.vtkVector3d(*exclude))
    exclusions.SetNthControlPointPositionWorld(0, *moved)  # dragged on a slice while it was being corrected for
    exclusions.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    correction.wait()
    clicks = [Click(to_voxel(volume, list(include), "RAS"), True)]
    expected = refine(volume, refine(volume, np.zeros_like(ball), clicks),
                      clicks + [Click(to_voxel(volume, list(moved), "RAS"), False)])
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), expected)
    assert not correction.sync()  # nothing changed since

    assert correction.undo() and exclusions.GetNumberOfControlPoints() == 0
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), only_include)

    for j in (20, 25, 40, 45, 50):  # more points than the history holds states, then the first one removed
        exclusions.AddControlPoint(vtk.vtkVector3d(*(volume.ijk_to_ras() @ [30, j, 15, 1])[:3]))
    correction.points[True].RemoveNthControlPoint(0)
    correction.wait()
    assert len(correction.prompts) == 5 and not segment_mask(segmentation, segment_id, volume_node).any()
    correction.end(scene)


def test_prompts_placed_while_a_correction_runs_are_taken_one_after_the_other(scene):
    """The panel stays free while the engine corrects: points placed meanwhile wait their turn, each
    is its own step in the history (undo takes back one at a time, first the one still waiting),
    and a paint made meanwhile in the Segment Editor is kept (the running correction, made on the
    segment before the paint, is dropped and made again on the painted segment)."""
    from AIReconstructLib.interaction import Click, dice, refine, to_voxel

    ball, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 4)
    include, exclude, other = ((volume.ijk_to_ras() @ [30, j, 15, 1])[:3] for j in (30, 36, 24))
    correction.points[True].AddControlPoint(vtk.vtkVector3d(*include))
    assert correction.poll()
    correction.points[False].AddControlPoint(vtk.vtkVector3d(*exclude))  # before the first is corrected for
    assert correction.poll() and len(correction.step.prompts) == 1
    correction.wait()
    clicks = [Click(to_voxel(volume, list(include), "RAS"), True)]
    first = refine(volume, np.zeros_like(ball), clicks)
    both = refine(volume, first, clicks + [Click(to_voxel(volume, list(exclude), "RAS"), False)])
    assert [prompt[0] for prompt in correction.prompts] == [True, False]
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), both)
    assert correction.undo()
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), first)

    correction.points[False].AddControlPoint(vtk.vtkVector3d(*other))
    assert correction.poll()
    correction.points[False].AddControlPoint(vtk.vtkVector3d(*exclude))
    assert correction.undo() and correction.points[False].GetNumberOfControlPoints() == 1  # the one still waiting
    correction.wait()
    assert len(correction.prompts) == 2

    correction.points[False].RemoveNthControlPoint(0)
    assert correction.poll()
    painted = segment_mask(segmentation, segment_id, volume_node)
    painted[2:6, 50:56, 60:66] = True  # painted while the segment was being corrected again
    set_segment_mask(segmentation, segment_id, volume_node, painted)
    correction.wait()
    after = segment_mask(segmentation, segment_id, volume_node)
    assert after[2:6, 50:56, 60:66].all() and dice(after, ball | painted) > 0.9
    correction.end(scene)


def test_a_failed_correction_takes_its_point_back_and_says_why(scene):
    """An engine that dies during a correction (killed here, as the system kills a process out of
    memory), or a result that cannot be read, leaves the segment as it was and takes the point
    back off the slices, with the reason in one line; the next point is corrected by a fresh
    worker; the exchange folder goes with the correction."""
    from AIReconstructLib.errors import InputError

    _, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 6)
    _place(correction, True, volume, (30, 30, 15))
    correction.wait()
    corrected = segment_mask(segmentation, segment_id, volume_node)
    _place(correction, False, volume, (30, 35, 15))
    assert correction.poll()
    correction.step.run.worker.process.kill()
    with pytest.raises(InputError, match="^The correction failed and its point or box was taken off the slices: "
                                         "The engine stopped unexpectedly"):
        correction.wait()
    assert correction.points[False].GetNumberOfControlPoints() == 0 and len(correction.prompts) == 1
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), corrected)
    _place(correction, False, volume, (30, 35, 15))
    correction.wait()
    assert len(correction.prompts) == 2 and segment_mask(segmentation, segment_id, volume_node).sum() < corrected.sum()

    before = segment_mask(segmentation, segment_id, volume_node)
    _place(correction, True, volume, (30, 26, 15))
    assert correction.poll()
    while not correction.step.run.poll().finished:
        time.sleep(0.02)
    correction.step.output.write_bytes(b"NRRD0004\nnot what the engine wrote\n")  # its result damaged
    with pytest.raises(InputError, match="^The correction failed and its point or box was taken off the slices: .+"):
        correction.wait()
    assert correction.points[True].GetNumberOfControlPoints() == 1 and len(correction.prompts) == 2
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume_node), before)
    workdir = correction.workdir
    correction.end(scene)
    assert correction.workdir is None and not workdir.exists()


def test_the_segment_and_the_others_read_straight_from_the_layers_as_the_segmentations_logic_reads_them(scene, tmp_path):
    """segment_and_others reads the labelmap layers of a segmentation made on the volume directly
    (shared layers, a segment moved to a layer of its own, overlapping segments, a cropped layer);
    on another grid it goes through the Segmentations logic; both agree with segment_mask."""
    from AIReconstructAdapter.nodes import _layers_on_grid, segment_and_others

    ball, volume, volume_node, segmentation, segment_id = _ball_to_correct(scene, 11)
    k, j, i = np.indices(ball.shape)
    ids = [segment_id] + [segmentation.GetSegmentation().AddEmptySegment("", name) for name in ("left", "right")]
    set_segment_mask(segmentation, ids[1], volume_node, ball & (i < 30))
    set_segment_mask(segmentation, ids[2], volume_node, (i > 50) & (j < 20))
    set_segment_mask(segmentation, segment_id, volume_node, ball & (i > 25))  # overlaps "left"
    shared = np.where((k < 10) & (j > 40), 1, np.where((k > 20) & (j > 40), 2, 0)).astype(np.uint8)
    write_seg_nrrd(volume.with_array(shared), [Label(1, "top", (1, 0, 0), {}, {}), Label(2, "bottom", (0, 1, 0), {}, {})],
                   tmp_path / "shared.seg.nrrd")
    import_segmentation(scene, tmp_path / "shared.seg.nrrd", volume_node, segmentation)  # one layer for both, cropped
    ids += [segmentation.GetSegmentation().GetSegmentIdBySegmentName(name) for name in ("top", "bottom")]
    layers = segmentation.GetSegmentation()
    assert any(len(layers.GetSegmentIDsForLayer(n)) == 2 for n in range(layers.GetNumberOfLayers()))
    other_grid = add_volume_node(scene, Volume(volume.array[::2, ::2, ::2].copy(), (2.0, 2.4, 4.0), volume.origin,
                                               volume.direction), "coarser")
    for reference in (volume_node, other_grid):
        masks = {i: segment_mask(segmentation, i, reference) for i in ids}
        for chosen in ids:
            expected = np.where(masks[chosen], 1, np.where(np.any(list(masks.values()), axis=0), 2, 0))
            np.testing.assert_array_equal(segment_and_others(segmentation, chosen, reference), expected)
    assert _layers_on_grid(segmentation, volume_node) and _layers_on_grid(segmentation, other_grid) is None


def test_a_correction_never_takes_the_voxels_of_another_segment(scene):
    """As the engine's refine command: an include point grows the segment only where there is no
    other segment; the neighbour keeps every voxel and the two do not overlap."""
    from AIReconstructAdapter.correction import SegmentCorrection

    ball, volume, volume_node, segmentation, segment_id = _ball_to_correct(scene, 10)
    neighbour = ball & (np.indices(ball.shape)[1] >= 34)  # the far part of the ball belongs to another segment
    neighbour_id = segmentation.GetSegmentation().AddEmptySegment("", "neighbour")
    set_segment_mask(segmentation, neighbour_id, volume_node, neighbour)
    correction = SegmentCorrection(scene, segmentation, segment_id, volume_node, env=STARTUP_ENVIRONMENT)
    correction.observe()
    _place(correction, True, volume, (30, 28, 15))
    correction.wait()
    grown = segment_mask(segmentation, segment_id, volume_node)
    assert (grown == (ball & ~neighbour)).mean() > 0.99 and not (grown & neighbour).any()
    np.testing.assert_array_equal(segment_mask(segmentation, neighbour_id, volume_node), neighbour)
    correction.end(scene)


def test_ending_a_correction_while_one_runs_drops_it(scene):
    """A correction still running when the correction ends (a new result arrives, the scene
    closes) changes nothing: waited for up to a limit, then its worker is ended."""
    _, volume, volume_node, segmentation, segment_id, correction = _correcting(scene, 8)
    _place(correction, True, volume, (30, 30, 15))
    assert correction.poll()
    run, workdir = correction.step.run, correction.workdir
    correction.end(scene, wait_seconds=0.0)
    assert run.poll().finished and not correction.busy and not workdir.exists()
    assert not segment_mask(segmentation, segment_id, volume_node).any()
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 0


def test_save_for_training_adds_a_case_the_trainer_reads(scene, tmp_path, tiny_model, ct_volume):
    from AIReconstructAdapter.nodes import save_for_training, set_segment_mask
    from AIReconstructLib.dataset import read_dataset
    from AIReconstructLib.errors import InputError
    from AIReconstructLib.io import read_labelmap

    card = load_card(tiny_model)
    volume_node = add_volume_node(scene, ct_volume, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    organ = np.zeros(ct_volume.array.shape, bool)
    organ[5:15, 10:30, 10:30] = True
    lesion = np.zeros_like(organ)
    lesion[8:11, 15:20, 15:20] = True
    notes = np.zeros_like(organ)
    notes[18:22, 2:6, 2:6] = True  # a segment of the user's own, not one of the model's labels
    for name, mask in (("organ", organ & ~lesion), ("lesion", lesion), ("my notes", notes)):
        set_segment_mask(segmentation, segmentation.GetSegmentation().AddEmptySegment("", name), volume_node, mask)
    dataset = save_for_training(segmentation, [volume_node], card, tmp_path / "corrections", "case_001")
    assert [c.case_id for c in dataset.cases] == ["case_001"] and dataset.channel_names == ["CT"]
    saved = read_labelmap(dataset.cases[0].label)
    np.testing.assert_array_equal(saved.array, np.where(lesion, 2, np.where(organ, 1, 0)))  # "my notes" left out
    save_for_training(segmentation, [volume_node], card, tmp_path / "corrections", "case_002")
    assert len(read_dataset(tmp_path / "corrections").cases) == 2
    other = dict(card.data, labels=card.data["labels"][:1])
    with pytest.raises(InputError, match="other channels or labels"):
        save_for_training(segmentation, [volume_node], type(card)(other, card.folder), tmp_path / "corrections", "x")
    renamed = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "renamed")
    renamed.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    set_segment_mask(renamed, renamed.GetSegmentation().AddEmptySegment("", "organ (corrected)"), volume_node, organ)
    with pytest.raises(InputError, match="No segment of 'renamed' is named as a label of model"):
        save_for_training(renamed, [volume_node], card, tmp_path / "corrections", "case_003")
    next_patient = add_volume_node(scene, ct_volume.with_array(ct_volume.array[:, ::-1].copy()), "next patient")
    with pytest.raises(InputError, match="segmentation was made on 'CT', not on 'next patient'"):
        save_for_training(segmentation, [next_patient], card, tmp_path / "corrections", "case_003")
    assert len(read_dataset(tmp_path / "corrections").cases) == 2


def test_report_of_the_segmentation_as_corrected_names_its_scan_and_the_model_that_made_it(scene, tmp_path, ct_volume):
    """*Save report...*: the segments as they are now (a corrected liver, the tumour, a segment of the user's
    own), on the volume the segmentation was made on; the model and version recorded by the run that made it."""
    from AIReconstructAdapter.logic import AdapterLogic
    from AIReconstructLib.errors import InputError

    volume_node = add_volume_node(scene, ct_volume, "CT 2026-11-30")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT demo-abdomen-ct")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    for attribute, value in (("AIReconstruct.Model", "demo-abdomen-ct"), ("AIReconstruct.ModelVersion", "0.9.0")):
        segmentation.SetAttribute(attribute, value)
    liver = np.zeros(ct_volume.array.shape, bool)
    liver[5:15, 10:30, 10:30] = True
    tumour = np.zeros_like(liver)
    tumour[8:11, 15:20, 15:20] = True
    notes = np.zeros_like(liver)
    notes[18:22, 2:6, 2:6] = True
    for name, mask in (("liver", liver & ~tumour), ("liver tumour", tumour), ("my notes", notes)):
        set_segment_mask(segmentation, segmentation.GetSegmentation().AddEmptySegment("", name), volume_node, mask)
    voxel_ml = np.prod(ct_volume.spacing) / 1000

    job = AdapterLogic().startReport(segmentation, tmp_path / "report.html", env=STARTUP_ENVIRONMENT)
    workdir = job.workdir
    assert job.wait(timeout=300).status == "done" and not workdir.exists()  # made in the engine's worker
    page = job.report_path.read_text(encoding="utf-8")
    assert "Image <b>CT 2026-11-30</b>, " in page and "(demo-abdomen-ct, version 0.9.0)" in page
    for name, mask in (("liver", liver & ~tumour), ("liver tumour", tumour), ("my notes", notes)):
        assert f"{name}</td><td>{mask.sum() * voxel_ml:.2f}</td>" in page, name  # volumes as segmented now
    assert "<h2>Lesions (safety margin 10 mm)</h2>" in page  # the model's label of that name is a lesion
    assert "Regions to check" not in page
    lines = {line.GetName(): line for line in job.axis_lines}  # the tumour's axes as rulers, in its colour
    assert sorted(lines) == ["liver tumour long axis", "liver tumour short axis"]
    tumour_colour = segmentation.GetSegmentation().GetSegment(segmentation.GetSegmentation().GetSegmentIdBySegmentName(
        "liver tumour")).GetColor()
    for axis, line in lines.items():
        length = float(re.search(r"<td>liver tumour</td><td>([\d.]+)</td><td>([\d.]+)</td>", page).group(
            1 if "long" in axis else 2))
        assert line.GetLineLengthWorld() == pytest.approx(length, abs=0.06)
        assert line.GetDisplayNode().GetSelectedColor() == pytest.approx(tumour_colour)
        centre = np.mean([line.GetNthControlPointPositionWorld(n) for n in range(2)], axis=0)
        kji = np.round(np.linalg.inv(ct_volume.ijk_to_ras()) @ [*centre, 1])[:3][::-1].astype(int)
        assert tumour[tuple(kji)], axis  # on the tumour, in Slicer's RAS
    assert segmentation.GetNumberOfNodeReferences("AIReconstructLesionAxes") == 2
    unsure = np.zeros(ct_volume.array.shape, np.float32)
    unsure[8:12, 14:21, 14:21] = 0.9
    uncertainty = add_volume_node(scene, ct_volume.with_array(unsure), "CT uncertainty")
    segmentation.SetNodeReferenceID("AIReconstructUncertainty", uncertainty.GetID())  # as a run with Uncertainty does
    job = AdapterLogic().startReport(segmentation, tmp_path / "with uncertainty.html", env=STARTUP_ENVIRONMENT)
    assert job.wait(timeout=300).status == "done"
    assert "<h2>Regions to check (uncertainty above 0.5)</h2>" in job.report_path.read_text(encoding="utf-8")
    assert all(line.GetScene() is None for line in lines.values())  # a later report's axes replace them
    assert scene.GetNodesByClass("vtkMRMLMarkupsLineNode").GetNumberOfItems() == 2

    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn by hand")
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segment_id = drawn.GetSegmentation().AddEmptySegment("", "nodule")
    set_segment_mask(drawn, segment_id, volume_node, tumour)
    entry = slicer.vtkSlicerTerminologyEntry()  # "Nodule" chosen in Slicer's terminology selector
    entry.SetTerminologyContextName("Segmentation category and type - DICOM master list")
    for code, (value, meaning) in ((entry.GetCategoryObject(), ("49755003", "Morphologically Altered Structure")),
                                   (entry.GetTypeObject(), ("27925004", "Nodule"))):
        code.SetCodingSchemeDesignator("SCT")
        code.SetCodeValue(value)
        code.SetCodeMeaning(meaning)
    drawn.GetSegmentation().GetSegment(segment_id).SetTag(
        "TerminologyEntry", slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry))
    set_segment_mask(drawn, drawn.GetSegmentation().AddEmptySegment("", "lung"), volume_node, liver & ~tumour)
    job = AdapterLogic().startReport(drawn, tmp_path / "drawn.html", env=STARTUP_ENVIRONMENT)
    assert job.wait(timeout=300).status == "done"
    page = job.report_path.read_text(encoding="utf-8")
    assert "(drawn by hand.seg.nrrd)" in page and "without a model card" in page and "version" not in page.split("<h2>")[0]
    assert "<h2>Lesions" in page  # the segment's own terminology: a nodule, inside the lung
    unplaced = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded from a file")
    with pytest.raises(InputError, match="'loaded from a file' has no volume it was made on"):
        AdapterLogic().startReport(unplaced, tmp_path / "none.html", env=STARTUP_ENVIRONMENT)
    assert not (tmp_path / "none.html").exists()


def test_a_cancelled_report_writes_nothing(scene, tmp_path):
    from AIReconstructAdapter.logic import AdapterLogic

    volume = noise_ct((160, 192, 192), spacing=(1.0, 1.0, 1.0))
    volume_node = add_volume_node(scene, volume, "large CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "large")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    k, j, i = np.indices(volume.array.shape)
    for n, name in enumerate(("organ", "lesion", "vessel")):
        ball = (k - 80) ** 2 + (j - 50 - 45 * n) ** 2 + (i - 96) ** 2 < 40 ** 2
        set_segment_mask(segmentation, segmentation.GetSegmentation().AddEmptySegment("", name), volume_node, ball)
    job = AdapterLogic().startReport(segmentation, tmp_path / "report.html", env=STARTUP_ENVIRONMENT)
    workdir = job.workdir
    job.cancel()
    state = job.wait(timeout=120)
    assert state.status == "cancelled", state
    assert not (tmp_path / "report.html").exists() and list(tmp_path.iterdir()) == [] and not workdir.exists()


def test_a_segmentation_slicer_saved_cropped_is_read_on_its_image_by_the_command_line(scene, tmp_path, ct_volume, capsys):
    """File > Save with "crop to minimum extent": Slicer writes only the segments' box; ``aireconstruct
    evaluate`` and ``report`` read it on the image's grid."""
    import json

    from AIReconstructLib.cli import main

    volume_node = add_volume_node(scene, ct_volume, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    tumour = np.zeros(ct_volume.array.shape, bool)
    tumour[8:11, 15:21, 14:20] = True
    set_segment_mask(segmentation, segmentation.GetSegmentation().AddEmptySegment("", "tumour"), volume_node, tumour)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetCropToMinimumExtent(True)
    storage.SetFileName(str(tmp_path / "saved.seg.nrrd"))
    assert storage.WriteData(segmentation)
    write_volume(ct_volume, tmp_path / "ct.nrrd")
    write_volume(ct_volume.with_array(tumour.astype(np.uint8)), tmp_path / "truth.nii.gz")
    assert main(["evaluate", str(tmp_path / "saved.seg.nrrd"), str(tmp_path / "truth.nii.gz"),
                 "--json", str(tmp_path / "scores.json")]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["mean"]["dice"] == 1.0
    assert main(["report", str(tmp_path / "ct.nrrd"), str(tmp_path / "saved.seg.nrrd"), "-o", str(tmp_path / "r.html")]) == 0
    assert f"{tumour.sum() * np.prod(ct_volume.spacing) / 1000:.2f}" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_saved_corrections_fine_tune_the_model_into_a_new_installed_version(scene, tmp_path, tiny_model, ct_volume):
    from AIReconstructAdapter.logic import AdapterLogic
    from AIReconstructAdapter.nodes import set_segment_mask
    from AIReconstructLib.modelcard import version_key

    logic = AdapterLogic()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    organ = ct_volume.array > 100
    next_patient = ct_volume.with_array(ct_volume.array[::-1].copy())  # another image under the same name
    for name, image in (("First CT", ct_volume), ("Second CT (arterial)", ct_volume), ("First CT", next_patient),
                        ("First CT", ct_volume)):  # the last, the first again: saved once more, it replaces
        volume_node = add_volume_node(scene, image, name)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("organ") or \
            segmentation.GetSegmentation().AddEmptySegment("", "organ")
        set_segment_mask(segmentation, segment_id, volume_node, organ)
        dataset = logic.saveForTraining(segmentation, [volume_node], str(tiny_model), tmp_path / "corrections")
    names = sorted(case.case_id for case in dataset.cases)
    assert len(names) == 3 and [n.rsplit("_", 1)[0] for n in names] == ["First_CT", "First_CT", "Second_CT_arterial"]

    models = tmp_path / "models"
    failed = logic.startFineTuning("brain-tumour-flair", tmp_path / "corrections", device="cpu",
                                   models_folder=models, env=STARTUP_ENVIRONMENT).wait(timeout=300)
    assert failed.status == "failed" and "is not label 1 of model 'brain-tumour-flair'" in failed.error
    assert list(models.iterdir()) == []  # nothing installed, no partial folder left

    (tmp_path / "earlier").mkdir()  # an earlier scan to rehearse, labelled by the model itself
    write_volume(ct_volume, tmp_path / "earlier" / "earlier_ct.nii.gz")
    job = logic.startFineTuning(str(tiny_model), tmp_path / "corrections", device="cpu", models_folder=models,
                                rehearse=tmp_path / "earlier", env=STARTUP_ENVIRONMENT)
    state = job.wait(timeout=300)
    assert state.status == "done", state.error
    assert [p.name for p in models.iterdir()] == ["tiny-test-model-0.1.0"] == [job.model_folder.name]
    tuned = load_card(job.model_folder / "card.json")
    assert version_key(tuned) > version_key(load_card(tiny_model))
    assert tuned.data["training"]["fine_tuned_from"]["encoder_frozen"] is True
    assert tuned.data["training"]["fine_tuned_from"]["rehearsal_scans"] == 1
    assert not (job.model_folder / "checkpoint.pt").exists()


def test_runs_use_the_prepared_engine_worker_and_a_dead_one_is_replaced(scene, tiny_model, ct_volume):
    from AIReconstructAdapter.engine_run import WARM_ENGINE

    volume_node = add_volume_node(scene, ct_volume, "patient CT")

    def run(**options):
        job = SegmentationJob(scene, [volume_node], str(tiny_model), device="cpu", **options)
        job.start()
        return job, job.engine.worker.process.pid

    WARM_ENGINE.shutdown()
    WARM_ENGINE.prepare()  # as the panel does when it opens: the worker imports the engine meanwhile
    prepared_pid = WARM_ENGINE.idle.process.pid
    first, first_pid = run()
    assert first.wait(timeout=300).status == "done", first.engine.state.error
    assert first_pid == prepared_pid
    second, second_pid = run(fast=True)
    assert second.wait(timeout=300).status == "done" and second_pid == first_pid
    assert WARM_ENGINE.idle is second.engine.worker

    crashing, crashing_pid = run()
    assert crashing_pid == first_pid
    crashing.engine.worker.process.kill()  # an engine that dies mid-run (out of memory, a crash)
    state = crashing.wait(timeout=60)
    assert state.status == "failed" and state.error.startswith("The engine stopped unexpectedly")
    assert crashing.workdir is None and WARM_ENGINE.idle is None
    after, after_pid = run()
    assert after.wait(timeout=300).status == "done" and after_pid != first_pid
    WARM_ENGINE.shutdown()
    assert after.engine.worker.process.wait(timeout=30) == 0  # ends when the module cleans up


def test_add_model_checks_the_folder_and_brings_the_model_it_runs_inside(tmp_path):
    """*Add model...*: a model folder is checked (card, weights' checksum) before it is copied
    among the user's models; a model cropped to another model's segments brings that model from
    beside it, and without it is refused, nothing copied."""
    from AIReconstructAdapter.logic import AdapterLogic
    from AIReconstructLib.errors import ModelCardError, WeightsError

    logic, installed = AdapterLogic(), tmp_path / "installed"
    source = tmp_path / "downloads"
    write_model(source / "finder", tiny_card("finder"))
    cropped = tiny_card("inside-the-organ")
    cropped["inference"]["crop_to_segments"] = {"model": "finder", "segments": ["organ"]}
    write_model(source / "inside-the-organ", cropped)
    assert logic.addModel(source / "inside-the-organ", installed) == "inside-the-organ"
    assert sorted(p.name for p in installed.iterdir()) == ["finder", "inside-the-organ"]
    with pytest.raises(ModelCardError, match="already installed"):
        logic.addModel(source / "inside-the-organ", installed)

    alone = tmp_path / "alone"
    shutil.copytree(source / "inside-the-organ", alone / "inside-the-organ")
    with pytest.raises(ModelCardError, match="model 'finder' finds first, and that model is not installed"):
        logic.addModel(alone / "inside-the-organ", tmp_path / "elsewhere")
    tampered = write_model(tmp_path / "tampered", tiny_card("tampered")).parent / "model.safetensors"
    tampered.write_bytes(tampered.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(WeightsError, match="does not match the SHA-256"):
        logic.addModel(tampered.parent, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_lesions_segmented_into_the_segmentation_of_their_organ_are_measured_against_it(scene, tmp_path, ct_volume):
    """Two runs into one segmentation, as the panel does them (TotalSegmentator's fast model, whose
    liver includes its lesions, then its liver-lesion model): the lesions, later, are reported
    inside the liver, each part on its own, with the liver's remnant."""
    from AIReconstructAdapter.nodes import segments_for_report
    from AIReconstructLib.measurements import measure
    from AIReconstructLib.modelcard import Label
    from AIReconstructLib.totalsegmentator import EXTRA_LABEL_INFO

    volume_node = add_volume_node(scene, ct_volume, "CT")
    liver = np.zeros(ct_volume.array.shape, np.uint8)
    liver[4:18, 8:32, 8:36] = 5
    lesions = np.zeros_like(liver)
    lesions[8:12, 14:19, 14:19] = lesions[8:11, 22:26, 26:30] = 1
    runs = [(liver, Label(5, "liver", (0.6, 0.3, 0.2), {"category": ["SCT", "123037004", "Anatomical Structure"],
                                                         "type": ["SCT", "10200004", "Liver"]}, {})),
            (lesions, Label(1, "liver_lesions", (1.0, 0.0, 0.8), EXTRA_LABEL_INFO["liver_lesions"]["terminology"], {}))]
    segmentation = None
    for number, (array, label) in enumerate(runs):
        path = write_seg_nrrd(ct_volume.with_array(array), [label], tmp_path / f"run{number}.seg.nrrd")
        segmentation = import_segmentation(scene, path, volume_node, target=segmentation)
    assert _segment_names(segmentation) == ["liver", "liver_lesions"]
    _, _, labelmap, labels = segments_for_report(segmentation)
    (lesion,) = measure(labelmap, labels)["lesions"]
    assert lesion["organ"] == "liver" and lesion["part_count"] == 2 and len(lesion["parts"]) == 2
    voxel_ml = np.prod(ct_volume.spacing) / 1000
    assert lesion["organ_with_lesion_ml"] == pytest.approx(np.count_nonzero(liver) * voxel_ml)
    assert 0 < lesion["remnant_ml"] < lesion["organ_with_lesion_ml"]


def test_liver_segments_then_lesions_give_the_resections_and_the_segments_of_each_lesion(scene, tmp_path, ct_volume):
    """TotalSegmentator's liver-segment model, then its liver-lesion model, into one segmentation (the
    liver-surgery workflow): the report's measurements name the Couinaud segments around each lesion
    part and list the resections with the parts each would leave."""
    from AIReconstructAdapter.nodes import segments_for_report
    from AIReconstructLib.measurements import measure
    from AIReconstructLib.modelcard import Label
    from AIReconstructLib.totalsegmentator import EXTRA_LABEL_INFO

    volume_node = add_volume_node(scene, ct_volume, "CT")
    segments = np.zeros(ct_volume.array.shape, np.uint8)
    segments[4:18, 8:32, 4:36] = np.arange(4, 36)[None, None, :] // 4  # segments I-VIII, 4 columns each
    lesions = np.zeros_like(segments)
    lesions[6:12, 14:20, 29:31] = 1  # inside VII (columns 28-31), the larger part
    lesions[8:11, 22:26, 10:14] = 1  # across II and III (columns 8-11, 12-15)
    runs = [(segments, [Label(n, f"liver_segment_{n}", (0.6, 0.3, 0.2), {}, {}) for n in range(1, 9)]),
            (lesions, [Label(1, "liver_lesions", (1.0, 0.0, 0.8), EXTRA_LABEL_INFO["liver_lesions"]["terminology"], {})])]
    segmentation = None
    for number, (array, labels) in enumerate(runs):
        path = write_seg_nrrd(ct_volume.with_array(array), labels, tmp_path / f"run{number}.seg.nrrd")
        segmentation = import_segmentation(scene, path, volume_node, target=segmentation)
    _, _, labelmap, labels = segments_for_report(segmentation)
    measured = measure(labelmap, labels)
    (lesion,) = measured["lesions"]
    first, second = lesion["parts"]
    assert set(first["bordering"]) == {"liver_segment_7"} and set(second["bordering"]) == {"liver_segment_2", "liver_segment_3"}
    resections = {r["name"]: r["lesion_parts_bordering_remnant"] for r in measured["liver_resections"]}
    assert resections["right hepatectomy"] == 1 and resections["left lateral sectionectomy"] == 1
    assert resections["right posterior sectionectomy"] == 1 and resections["left hepatectomy"] == 1


def test_the_parts_of_each_lesion_become_points_to_review(scene):
    """The demo model on a phantom with two liver tumours: a locked point at each tumour, largest
    first, named with its volume, which a later run into the same segmentation replaces."""
    from AIReconstructLib.phantom import make_phantom

    phantom = make_phantom(7)  # the demo's phantom: two liver tumours of 32 and 4 mL
    volume_node = add_volume_node(scene, phantom.image, "CT")
    job = SegmentationJob(scene, [volume_node], "demo-abdomen-ct", device="cpu", env=STARTUP_ENVIRONMENT)
    job.start()
    state = job.wait(timeout=300)
    assert state.status == "done", state.error
    assert job.lesion_parts == {"liver tumour": 2}
    points = job.lesion_points
    assert points.GetName() == "CT demo-abdomen-ct lesions" and points.GetNumberOfControlPoints() == 2
    tumours, count = ndimage.label(phantom.labels.array == 2, structure=np.ones((3, 3, 3)))
    assert count == 2
    truth = [phantom.image.ijk_to_ras() @ [*np.argwhere(tumours == n).mean(axis=0)[::-1], 1] for n in (1, 2)]
    found = []
    for index in range(2):
        ras = [0.0, 0.0, 0.0]
        points.GetNthControlPointPosition(index, ras)
        found.append(ras)
        assert points.GetNthControlPointLabel(index).startswith(f"liver tumour {index + 1}: ")
        assert points.GetNthControlPointLocked(index)
    distances = [[np.linalg.norm(np.subtract(f, t[:3])) for t in truth] for f in found]
    assert [np.argmin(d) for d in distances] == [0, 1] and max(min(d) for d in distances) < 3.0  # mm, largest first

    again = SegmentationJob(scene, [volume_node], "demo-abdomen-ct", device="cpu",
                            target_segmentation=job.segmentation_node, env=STARTUP_ENVIRONMENT)
    again.start()
    assert again.wait(timeout=300).status == "done"
    lists = [n for n in scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode") if n.GetName().endswith("lesions")]
    assert lists == [again.lesion_points]


def test_the_panel_imports_neither_torch_nor_monai():
    """Slicer's own process runs the panel's logic and jobs; the engine's PyTorch and MONAI load only
    in the engine's worker process (the download table, crop models and reports included)."""
    code = ("import sys, AIReconstructAdapter.logic, AIReconstructAdapter.jobs; "
            "print(sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'monai'}))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "AIReconstruct")})
    assert found.stdout.strip() == "[]"
