"""MRML nodes <-> engine inputs and outputs.

- a scalar volume node (with any linear parent transform) -> a file the engine reads;
- the engine's ``.seg.nrrd`` -> segments in a segmentation node (new, or replacing segments of the
  same name in an existing one), with names, colours and terminology, geometry from the input;
- segments -> closed surfaces, model nodes, mesh files, or a label map for the engine's HTML report.
The scene is changed only once everything has been read successfully.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from AIReconstructLib.dataset import save_case
from AIReconstructLib.errors import InputError
from AIReconstructLib.io import write_volume
from AIReconstructLib.meshfiles import SCENE_FORMATS, mesh_file_name, write_mesh, write_scene
from AIReconstructLib.measurements import lesion_axes
from AIReconstructLib.modelcard import Label
from AIReconstructLib.segnrrd import terminology_from_string
from AIReconstructLib.surfaces import Surface, extract_surfaces
from AIReconstructLib.volume import LPS_TO_RAS, Volume


MADE_BY = ("AIReconstruct.Model", "AIReconstruct.ModelVersion")  # node attributes: the model that made a segmentation
CONVERTER_RULES = ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule")


def ensure_converter_rules() -> None:
    """Register the labelmap <-> closed-surface converters, as Slicer's Segmentations module does
    at start-up (a no-op inside the application; needed where only the MRML libraries are loaded)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in CONVERTER_RULES:
        if name not in registered:
            factory.RegisterConverterRule(getattr(slicer, name)())


def _ijk_to_ras(volume_node) -> np.ndarray:
    """A volume node's own IJK to RAS matrix (4 x 4), its parent transforms left out."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_from_node(volume_node) -> Volume:
    """The engine's :class:`Volume` of a scalar volume node, in world coordinates."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("No input volume is selected, or it has no image data")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"Volume '{volume_node.GetName()}' is not a scalar volume")
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    return Volume.from_ijk_to_ras(array, _world_ijk_to_ras(volume_node))


def _world_ijk_to_ras(volume_node) -> np.ndarray:
    """A volume node's IJK to world RAS matrix (4 x 4), through its linear parent transforms."""
    matrix = _ijk_to_ras(volume_node)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise InputError(f"Volume '{volume_node.GetName()}' is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        matrix = np.array([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)]) @ matrix
    return matrix


def add_volume_node(scene, volume: Volume, name: str = "Volume"):
    """A new scalar volume node holding ``volume`` (voxels and geometry)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, volume.array)
    matrix = vtk.vtkMatrix4x4()
    for row, values in enumerate(volume.ijk_to_ras()):
        for column, value in enumerate(values):
            matrix.SetElement(row, column, float(value))
    node.SetIJKToRASMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    return node


def segments_labelmap(segmentation_node, segment_ids: list[str], reference_volume_node=None) -> Volume:
    """Segments as one label map, the n-th of ``segment_ids`` with the value n + 1 (where segments
    overlap, the later one's), through the Segmentations logic: on a volume node's grid, or without
    one on the segmentation's own grid around its segments."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AIReconstruct temporary")
    try:
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume_node):
            grid = f" on the grid of '{reference_volume_node.GetName()}'" if reference_volume_node else ""
            raise InputError(f"The segments of '{segmentation_node.GetName()}' cannot be read{grid}")
        return volume_from_node(labelmap)
    finally:
        scene.RemoveNode(labelmap)


def segment_mask(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """A segment's voxels on a volume node's grid (boolean ``[k, j, i]``)."""
    return segments_labelmap(segmentation_node, [segment_id], reference_volume_node).array > 0


def segment_and_others(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """The segmentation on a volume node's grid as a label map (``uint8 [k, j, i]``): 1 where the
    segment is, 2 where only other segments are, 0 elsewhere. Read straight from the segmentation's
    labelmap layers where they lie on the volume's grid (a segmentation made on that volume), which
    takes as long for a hundred segments as for one; else through the Segmentations logic, which
    extracts each segment in turn."""
    segmentation = segmentation_node.GetSegmentation()
    layers = _layers_on_grid(segmentation_node, reference_volume_node)
    if layers is None:
        others = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())
                  if segmentation.GetNthSegmentID(n) != segment_id]
        labelmap = segments_labelmap(segmentation_node, [*others, segment_id], reference_volume_node).array
        return np.where(labelmap == len(others) + 1, 1, np.where(labelmap > 0, 2, 0)).astype(np.uint8)
    result = np.zeros(reference_volume_node.GetImageData().GetDimensions()[::-1], np.uint8)
    for index, image, block in layers:
        layer = vtk_to_numpy(image.GetPointData().GetScalars())
        extent = image.GetExtent()
        layer = layer.reshape(extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        layer = layer[tuple(slice(part.start - low, part.stop - low)
                            for part, low in zip(block, (extent[4], extent[2], extent[0])))]
        target = result[block]
        target[(layer != 0) & (target == 0)] = 2  # a layer's values are its segments' label values
        if segment_id in segmentation.GetSegmentIDsForLayer(index):
            target[layer == segmentation.GetSegment(segment_id).GetLabelValue()] = 1
    return result


def _layers_on_grid(segmentation_node, reference_volume_node):
    """The segmentation's labelmap layers with the block of the volume's grid each covers, as
    (layer index, vtkOrientedImageData, (k, j, i) slices), where every layer lies on that grid (the same voxels);
    None where one does not, or where the segments are not held as labelmaps, or are transformed."""
    segmentation = segmentation_node.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != binary or segmentation_node.GetParentTransformNode() is not None:
        return None
    grid = _world_ijk_to_ras(reference_volume_node)
    shape = reference_volume_node.GetImageData().GetDimensions()[::-1]
    layers = []
    for index in range(segmentation.GetNumberOfLayers()):
        image = segmentation.GetLayerDataObject(index)
        to_world = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(to_world)
        if not np.allclose([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)], grid, atol=1e-4):
            return None
        extent = image.GetExtent()
        low = (extent[4], extent[2], extent[0])
        high = (extent[5] + 1, extent[3] + 1, extent[1] + 1)
        if any(a >= b for a, b in zip(low, high)) or image.GetPointData().GetScalars() is None:
            continue  # an empty layer
        if any(a < 0 for a in low) or any(b > n for b, n in zip(high, shape)):
            return None  # reaching beyond the volume's grid
        layers.append((index, image, tuple(slice(a, b) for a, b in zip(low, high))))
    return layers


def set_segment_mask(segmentation_node, segment_id: str, reference_volume_node, mask: np.ndarray) -> None:
    """Replace a segment's voxels with ``mask`` (boolean, on the volume node's grid)."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AIReconstruct temporary")
    try:
        labelmap.CopyOrientation(reference_volume_node)
        slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ids):
            raise InputError(f"Segment '{segment_id}' cannot be updated")
    finally:
        scene.RemoveNode(labelmap)


def source_volume(segmentation_node):
    """The volume node a segmentation was made on (its reference geometry's volume), or None."""
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def image_fingerprint(volume_node) -> str:
    """Eight hexadecimal digits of a SHA-256 over a volume node's voxels and geometry: the same
    image gives the same digits, another image (almost surely) others."""
    digest = hashlib.sha256(np.ascontiguousarray(slicer.util.arrayFromVolume(volume_node)).tobytes())
    digest.update(_ijk_to_ras(volume_node).tobytes())
    return digest.hexdigest()[:8]


def save_for_training(segmentation_node, volume_nodes: list, card, folder: str | Path, case_id: str):
    """Store the input volume(s) and the (corrected) segments named as the card's labels as one case
    of a training data set folder (nnU-Net layout), for fine-tuning later; returns the data set.
    Refused if the segmentation was made on another volume than the first input (the next patient
    already chosen as input would be saved with this patient's segments)."""
    source = source_volume(segmentation_node)
    if source is not None and source is not volume_nodes[0]:
        raise InputError(f"The segmentation was made on '{source.GetName()}', not on '{volume_nodes[0].GetName()}': "
                         "choose that volume as the input to save it for training")
    segmentation = segmentation_node.GetSegmentation()
    named = [(label, segmentation.GetSegmentIdBySegmentName(label.name)) for label in card.labels]
    if not any(segment_id for _, segment_id in named):  # all background: it would teach the model to find nothing
        raise InputError(f"No segment of '{segmentation_node.GetName()}' is named as a label of model '{card.name}' "
                         f"({', '.join(label.name for label in card.labels)})")
    channels = [volume_from_node(node) for node in volume_nodes]
    array = np.zeros(channels[0].array.shape, np.uint16 if card.num_classes > 256 else np.uint8)
    for label, segment_id in named:
        if segment_id:
            array[segment_mask(segmentation_node, segment_id, volume_nodes[0]) & (array == 0)] = label.value
    return save_case(folder, case_id, channels, channels[0].with_array(array), card)


def all_segments(segmentation_node, purpose: str, reference_volume_node=None) -> tuple[Volume, list[Label]]:
    """Every segment as it is now (corrections included) as one label map (where segments overlap,
    the later one's) on a volume node's grid, or without one on the segmentation's own, and its
    labels with each segment's name, colour and own terminology, in the segments' order; no
    segments is an error naming what they were wanted ``purpose`` for."""
    segmentation = segmentation_node.GetSegmentation()
    count = segmentation.GetNumberOfSegments()
    if count == 0:
        raise InputError(f"'{segmentation_node.GetName()}' has no segments {purpose}")
    ids = [segmentation.GetNthSegmentID(index) for index in range(count)]
    labelmap = segments_labelmap(segmentation_node, ids, reference_volume_node)  # one export for all of them
    labels = [Label(value, segment.GetName(), tuple(segment.GetColor()), terminology_from_string(segment.GetTerminology()), {})
              for value, segment in enumerate(map(segmentation.GetSegment, ids), start=1)]
    return labelmap.with_array(labelmap.array.astype(np.uint16 if count > 255 else np.uint8, copy=False)), labels


def segments_for_report(segmentation_node) -> tuple:
    """The segments (:func:`all_segments`) on the volume the segmentation was made on, for the
    engine's report: (that volume node, its image, the label map, its labels)."""
    volume_node = source_volume(segmentation_node)
    if volume_node is None:
        raise InputError(f"'{segmentation_node.GetName()}' has no volume it was made on; segment a volume first")
    segments, labels = all_segments(segmentation_node, "to report on", volume_node)
    image = volume_from_node(volume_node)
    return volume_node, image, image.with_array(segments.array), labels


def _ras_point(position, coordinates: str):
    """A position in patient mm (``coordinates``: LPS or RAS) as the RAS point Slicer's markups take."""
    return vtk.vtkVector3d(*(LPS_TO_RAS @ np.asarray(position, float) if coordinates == "LPS" else position))


def add_point_list(scene, places: list[tuple[str, list]], name: str, coordinates: str = "LPS"):
    """A locked point list with one point per (label, centre in patient mm), so that the Markups
    module's list can jump the slice views to each; ``None`` if there are none."""
    if not places:
        return None
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, centre in places:
        index = points.AddControlPoint(_ras_point(centre, coordinates), label)
        points.SetNthControlPointLocked(index, True)
    return points


def add_axis_lines(scene, lesions: list[dict], colours: dict, coordinates: str = "LPS") -> list:
    """Line markups of each lesion's (or each of its parts') long and short axes on the axial slices
    (the report's measurements), in the lesion's colour: the rulers a radiologist draws for RECIST,
    which Slicer labels with their length and which can be moved to adjust them."""
    lines = []
    for lesion, part, axes in lesion_axes(lesions):
        name = lesion["name"] if part is None else f"{lesion['name']} {part['number']}"
        for axis in ("long", "short"):
            line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", f"{name} {axis} axis")
            for end in axes[f"{axis}_axis_ends_mm"]:
                line.AddControlPoint(_ras_point(end, coordinates))
            line.CreateDefaultDisplayNodes()
            if lesion["name"] in colours:
                line.GetDisplayNode().SetSelectedColor(*colours[lesion["name"]])
            lines.append(line)
    return lines


def voxel_bytes(volume_node) -> int:
    """The size of a volume node's voxels in bytes (0 without a node or image data)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    return image.GetNumberOfPoints() * image.GetScalarSize() if image is not None else 0


def write_volume_node(volume_node, path: str | Path) -> Path:
    """Write a volume node (with its world geometry) to a file the engine can read; uncompressed,
    since the file only carries the volume to the engine and is removed after the run."""
    return write_volume(volume_from_node(volume_node), path, compress=False)


def _read_segmentation(path: Path, scratch_scene):
    """Read a ``.seg.nrrd`` into a segmentation node of a scratch scene (never the user's)."""
    ensure_converter_rules()
    node = scratch_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise InputError(f"Slicer cannot read the engine's result {path.name}")
    return node


def import_segmentation(scene, seg_path: str | Path, reference_volume_node, target=None, name: str | None = None):
    """Put the segments of ``seg_path`` into ``target`` (or a new segmentation node).

    Segments whose names already exist in ``target`` are replaced; other segments are kept.
    The node's reference geometry is the input volume's. The segments keep sharing the one labelmap
    they were read into (Slicer's copy of a segment, or its removal from the scratch segmentation,
    would give each segment a full-size labelmap of its own). Returns the segmentation node.
    """
    scratch_scene = slicer.vtkMRMLScene()
    loaded = _read_segmentation(Path(seg_path), scratch_scene).GetSegmentation()
    if loaded.GetNumberOfSegments() == 0:
        raise InputError("The engine's result has no segments")
    if target is None:
        target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "Segmentation")
        target.CreateDefaultDisplayNodes()
    target.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    segmentation = target.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    modifying = target.StartModify()  # one modified event for all the segments
    try:
        for index in range(loaded.GetNumberOfSegments()):
            source = loaded.GetNthSegment(index)
            existing = segmentation.GetSegmentIdBySegmentName(source.GetName())
            if existing:
                segmentation.RemoveSegment(existing)
            segment = slicer.vtkSegment()
            segment.DeepCopyMetadata(source)  # name, colour, terminology, label value
            segment.AddRepresentation(binary, source.GetRepresentation(binary))
            segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(loaded.GetNthSegmentID(index)))
    finally:
        target.EndModify(modifying)
        for index in range(loaded.GetNumberOfSegments()):  # the scratch segmentation lets go of the labelmap,
            loaded.GetNthSegment(index).RemoveRepresentation(binary)  # so its end erases nothing handed over
    return target


def show_3d(segmentation_node, smoothing: float = 0.5) -> None:
    """Build the closed-surface representation with a smoothing factor (0-1) and show it."""
    ensure_converter_rules()
    segmentation = segmentation_node.GetSegmentation()
    segmentation.SetConversionParameter("Smoothing factor", str(float(smoothing)))
    segmentation_node.RemoveClosedSurfaceRepresentation()
    segmentation_node.CreateClosedSurfaceRepresentation()
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetPreferredDisplayRepresentationName3D("Closed surface")
        display.SetVisibility3D(True)


def segment_surfaces(segmentation_node, coordinates: str) -> list[Surface]:
    """The engine's closed surfaces of the segments as they are now (:func:`all_segments`),
    smoothed by the segmentation's own smoothing factor, in ``coordinates`` ("LPS" or "RAS")
    millimetres: closed, manifold also as STL, and touching segments sharing their faces, as on
    the command line (Slicer's own 3D-view surfaces need not be)."""
    labelmap, labels = all_segments(segmentation_node, "to make surfaces of")
    smoothing = float(segmentation_node.GetSegmentation().GetConversionParameter("Smoothing factor") or 0.5)
    return extract_surfaces(labelmap, labels, smoothing, coordinates=coordinates)


def export_to_models(scene, segmentation_node) -> list:
    """One model node per segment (its surface, name and colour); returns the nodes."""
    models = []
    for surface in segment_surfaces(segmentation_node, "RAS"):
        model = scene.AddNewNodeByClass("vtkMRMLModelNode", surface.label.name)
        model.SetAndObservePolyData(surface.polydata)
        model.CreateDefaultDisplayNodes()
        model.GetDisplayNode().SetColor(surface.label.color)
        models.append(model)
    return models


def export_to_files(segmentation_node, folder: str | Path, suffix: str = ".stl") -> list[Path]:
    """Write the segments' surfaces to ``folder`` in LPS millimetres (as Slicer reads them): one
    file per segment (.stl, .ply, .vtp) or one scene named after the node (.obj + .mtl, .glb, .3mf)."""
    surfaces = segment_surfaces(segmentation_node, "LPS")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if suffix in SCENE_FORMATS:
        return write_scene(surfaces, folder / mesh_file_name(segmentation_node.GetName(), suffix))
    return [write_mesh(s.polydata, folder / mesh_file_name(s.label.name, suffix)) for s in surfaces]
