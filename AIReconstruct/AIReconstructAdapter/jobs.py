"""The panel's background jobs, each an engine run on files in a temporary folder: segment volume
nodes and import the result, write the report of a segmentation node, fine-tune a model on saved
corrections, download a model (TotalSegmentator's, a MONAI bundle). The scene (or the installed models) changes only
when a job succeeds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from AIReconstructLib.importers import download_command
from AIReconstructLib.io import read_volume, write_volume
from AIReconstructLib.segnrrd import write_seg_nrrd

from .engine_run import BackgroundJob, EngineRun, exchange_folder
from .nodes import (MADE_BY, add_axis_lines, add_point_list, add_volume_node, import_segmentation, segments_for_report,
                    voxel_bytes, write_volume_node)


# the segmentation node's references to its last run's uncertainty map and regions to check
UNCERTAINTY_ROLES = ("AIReconstructUncertainty", "AIReconstructRegionsToCheck")
LESIONS_ROLE = "AIReconstructLesions"  # and to the point list of its lesions' separate parts
AXES_ROLE = "AIReconstructLesionAxes"  # and to the lines of its lesions' axes, from its latest report


class SegmentationJob(BackgroundJob):
    """Segment MRML volume nodes with a model in the background; import the result on success."""

    def __init__(self, scene, input_nodes: list, model: str, device: str = "auto", fast: bool = False,
                 tta: bool = False, target_segmentation=None, python: str | None = None, env: dict | None = None,
                 uncertainty: bool = False):
        self.scene = scene
        self.input_nodes = list(input_nodes)
        self.model = model
        self.options = (["--device", device] + (["--fast"] if fast else []) + (["--tta"] if tta else [])
                        + (["--uncertainty"] if uncertainty else []))
        self.target = target_segmentation
        self.python, self.env = python, env
        self.segmentation_node = None
        self.uncertainty_node = None  # with uncertainty: the 0-1 map as a volume node
        self.check_points = None  # and a point list of the regions to check
        self.volumes_ml: dict = {}  # each segment's volume, as the engine measured it
        self.lesion_parts: dict = {}  # how many separate parts each lesion segment has
        self.lesion_points = None  # a point list of the largest parts of every lesion segment

    def start(self) -> None:
        """Write the inputs to a temporary folder and start the engine on them."""
        self.workdir = exchange_folder(sum(map(voxel_bytes, self.input_nodes)))
        try:  # whatever fails here, no temporary folder is left behind
            inputs = [str(write_volume_node(node, self.workdir / f"input_{n}.nrrd"))
                      for n, node in enumerate(self.input_nodes)]
            self.engine = EngineRun(["segment", *inputs, "-m", str(self.model), "-o", str(self.workdir / "output"),
                                     "--for-import", *self.options], self.python, self.env)
            self.engine.start()
        except BaseException:
            self._remove_workdir()
            raise

    def _on_success(self, result: dict) -> None:
        """Read every result file first, then change the scene: segmentation, uncertainty, points (the
        regions to check; the largest parts of each lesion segment). The uncertainty map and point
        lists of an earlier run into the same segmentation leave the scene (they describe segments
        just replaced); the segmentation refers to this run's."""
        seg_file = next(p for p in result["outputs"] if p.endswith(".seg.nrrd"))
        uncertainty_file = next((p for p in result["outputs"] if p.endswith("_uncertainty.nii.gz")), None)
        uncertainty = read_volume(uncertainty_file) if uncertainty_file else None
        name = f"{self.input_nodes[0].GetName()} {result['summary']['model']}"
        self.volumes_ml = result["summary"]["volumes_ml"]
        lesions = result["summary"].get("lesion_parts", {})
        self.lesion_parts = {segment: lesion["count"] for segment, lesion in lesions.items()}
        roles = (*UNCERTAINTY_ROLES, LESIONS_ROLE)
        earlier = [self.target.GetNodeReference(role) for role in roles] if self.target else []
        self.segmentation_node = import_segmentation(self.scene, seg_file, self.input_nodes[0], self.target, name)
        for attribute, value in zip(MADE_BY, (result["summary"]["model"], result["summary"]["model_version"])):
            self.segmentation_node.SetAttribute(attribute, value)
        for node in filter(None, earlier):
            self.scene.RemoveNode(node)
        if uncertainty is not None:
            self.uncertainty_node = add_volume_node(self.scene, uncertainty, f"{name} uncertainty")
            regions = result["summary"].get("flagged_regions", [])
            self.check_points = add_point_list(
                self.scene, [(f"check {n}: {r['size_ml']:.2f} mL", r["centre_mm"]) for n, r in enumerate(regions, 1)],
                f"{name} regions to check")
        self.lesion_points = add_point_list(
            self.scene, [(f"{segment} {n}: {part['volume_ml']:.2f} mL", part["centre_mm"])
                         for segment, lesion in lesions.items() for n, part in enumerate(lesion["largest"], 1)],
            f"{name} lesions")
        for role, node in zip(roles, (self.uncertainty_node, self.check_points, self.lesion_points)):
            self.segmentation_node.SetNodeReferenceID(role, node.GetID() if node is not None else None)


class ReportJob(BackgroundJob):
    """The engine's HTML report of a segmentation node as it is now (corrections and the user's own
    segments included), written in the engine's worker to ``path``; it names the scan and the model
    and version recorded on the node by the run that made it, and shows the regions to check where
    that run made an uncertainty map. A cancelled or failed run writes nothing."""

    def __init__(self, segmentation_node, path: str | Path, python: str | None = None, env: dict | None = None):
        self.segmentation_node, self.path = segmentation_node, Path(path)
        self.python, self.env = python, env
        self.report_path: Path | None = None
        self.axis_lines: list = []  # line markups of the lesions' axes, on success

    def start(self) -> None:
        """Write the volume and the segments to a temporary folder and start the engine's ``report``."""
        volume_node, image, labelmap, labels = segments_for_report(self.segmentation_node)  # refused before any work
        recorded = tuple(self.segmentation_node.GetAttribute(attribute) for attribute in MADE_BY)
        self.workdir = exchange_folder(4 * voxel_bytes(volume_node))  # image, segments, a float uncertainty map
        try:  # whatever fails here, no temporary folder is left behind
            image_file = write_volume(image, self.workdir / "image.nrrd", compress=False)  # as write_volume_node
            # named after the node: the report names a segmentation by its file where no model is recorded
            name = re.sub(r"[/\\\x00]", "_", self.segmentation_node.GetName()) or "segmentation"
            segments = write_seg_nrrd(labelmap, labels, self.workdir / f"{name}.seg.nrrd", compress=False,
                                      made_by=recorded if all(recorded) else None)
            arguments = ["report", str(image_file), str(segments), "-o", str(self.path),
                         "--image-name", volume_node.GetName()]
            uncertainty = self.segmentation_node.GetNodeReference(UNCERTAINTY_ROLES[0])  # of the run that made it
            if uncertainty is not None:
                arguments += ["--uncertainty", str(write_volume_node(uncertainty, self.workdir / "uncertainty.nrrd"))]
            self.engine = EngineRun(arguments, self.python, self.env)
            self.engine.start()
        except BaseException:
            self._remove_workdir()
            raise

    def _on_success(self, result: dict) -> None:
        """The report's path; the lesions' axes it measured become line markups (those of an earlier
        report on the same segmentation leave the scene)."""
        self.report_path = Path(result["outputs"][0])
        node, measured = self.segmentation_node, result["measurements"]
        scene = node.GetScene()
        for earlier in [node.GetNthNodeReference(AXES_ROLE, n) for n in range(node.GetNumberOfNodeReferences(AXES_ROLE))]:
            if earlier is not None:
                scene.RemoveNode(earlier)
        node.RemoveNodeReferenceIDs(AXES_ROLE)
        segmentation = node.GetSegmentation()
        colours = {segment.GetName(): segment.GetColor() for segment in
                   map(segmentation.GetNthSegment, range(segmentation.GetNumberOfSegments()))}
        self.axis_lines = add_axis_lines(scene, measured["lesions"], colours, measured["coordinates"])
        for line in self.axis_lines:
            node.AddNodeReferenceID(AXES_ROLE, line.GetID())


class FineTuningJob(BackgroundJob):
    """Fine-tune a model on a folder of corrected cases in the background. The new version is
    written to a hidden folder among the user's models and moved into place (``NAME-VERSION``) only
    when training succeeds; then it supersedes the base model (the highest version of a name wins).
    A cancelled or failed run leaves the installed models as they were."""

    def __init__(self, model: str, dataset_folder: str | Path, models_folder: Path, freeze_encoder: bool = True,
                 device: str = "auto", python: str | None = None, env: dict | None = None,
                 rehearse: str | Path | None = None):
        self.model, self.dataset_folder, self.models_folder = model, Path(dataset_folder), Path(models_folder)
        self.options = ["--device", device] + (["--freeze-encoder"] if freeze_encoder else []) \
            + (["--rehearse", str(rehearse)] if rehearse else [])
        self.python, self.env = python, env
        self.model_folder: Path | None = None  # where the new version was installed

    def start(self) -> None:
        self._start_in_hidden_folder(self.models_folder, ".fine-tuning-", lambda workdir: [
            "finetune", self.model, str(self.dataset_folder), "-o", str(workdir), *self.options])

    def _on_success(self, result: dict) -> None:
        """Move the new version among the installed models."""
        card = json.loads((self.workdir / "card.json").read_text(encoding="utf-8"))
        destination = self.models_folder / f"{card['name']}-{card['version']}"
        if destination.exists():
            raise OSError(f"{destination} already exists; remove it or fine-tune into another version")
        (self.workdir / "checkpoint.pt").unlink(missing_ok=True)  # resuming is for the command line
        self.workdir.rename(destination)
        self.workdir, self.model_folder = None, destination


class ModelDownloadJob(BackgroundJob):
    """Download a model of :func:`importers.downloadable_models` (``import-model ... --download``: its
    weights or bundle into ``downloads_folder``, once) in the background and install its card among
    the user's models, with the card of the model whose organs it runs inside where it has one. The
    cards are written to a hidden folder there and moved into place only when the import succeeds."""

    def __init__(self, key: str, models_folder: Path, downloads_folder: Path, url: str | None = None,
                 python: str | None = None, env: dict | None = None):
        self.key, self.models_folder, self.downloads_folder = key, Path(models_folder), Path(downloads_folder)
        self.url, self.python, self.env = url, python, env
        self.model_name: str | None = None  # the installed model, on success

    def start(self) -> None:
        self._start_in_hidden_folder(self.models_folder, ".download-", lambda workdir: download_command(
            self.key, self.downloads_folder, workdir / self.key.split(":", 1)[1], self.url))

    def _on_success(self, result: dict) -> None:
        """Install the imported cards (a card of the same name, imported before, is replaced)."""
        for folder in sorted(self.workdir.iterdir()):
            name = json.loads((folder / "card.json").read_text(encoding="utf-8"))["name"]
            destination = self.models_folder / name
            if destination.exists():
                shutil.rmtree(destination)
            folder.rename(destination)
        self.model_name = result["name"]
