"""Everything the module's panel does, as methods a script or test can call (no Qt).

``AIReconstructLogic`` in ``AIReconstruct.py`` (Slicer's ``ScriptedLoadableModuleLogic``, with the
parameter node) creates one :class:`AdapterLogic` once the engine's requirements are installed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from AIReconstructLib.errors import ModelCardError
from AIReconstructLib.importers import downloadable_models
from AIReconstructLib.modelcard import (USER_MODELS, crop_model_of, find_model, installed_models, load_card,
                                        verified_weight_paths)

from . import nodes
from .correction import SegmentCorrection
from .engine_run import WARM_ENGINE
from .jobs import FineTuningJob, ModelDownloadJob, ReportJob, SegmentationJob

CORRECTIONS = USER_MODELS.parent / "corrections"  # a data set folder per model, for fine-tuning
DOWNLOADS = USER_MODELS.parent  # downloaded weights and bundles, once: totalsegmentator/, monai-bundles/


class AdapterLogic:
    """The panel's actions on a MRML scene; the scene is changed only by successful runs."""

    correction: SegmentCorrection | None = None  # the segment being corrected with points

    def installedModels(self) -> list:
        """Model cards the engine finds (bundled, user-added and on $AIRECONSTRUCT_MODEL_PATH)."""
        return installed_models()

    def modelChannelNames(self, model: str) -> list[str]:
        """The names of a model's input channels, e.g. ``["FLAIR", "T1"]``."""
        return [channel["name"] for channel in find_model(model).channels]

    def addModel(self, path: str | Path, models_folder: Path = USER_MODELS) -> str:
        """Check a model folder (card and weights) and copy it into the user's models; returns its name.
        A model run inside another model's segments brings that model along from beside its folder
        unless it is installed already."""
        card = load_card(path)
        verified_weight_paths(card)
        destination = Path(models_folder) / card.name
        if destination.exists():
            raise ModelCardError(f"A model named '{card.name}' is already installed in {destination}")
        crop_card = crop_model_of(card) if "crop_to_segments" in card.inference else None  # missing: refused
        if crop_card is not None and crop_card.folder.parent == card.folder.parent:  # found beside, not installed
            verified_weight_paths(crop_card)
            if not (Path(models_folder) / crop_card.name).exists():
                shutil.copytree(crop_card.folder, Path(models_folder) / crop_card.name)
        shutil.copytree(card.folder, destination)
        return card.name

    def downloadableModels(self) -> dict[str, str]:
        """The models the panel can download (TotalSegmentator's, MONAI model-zoo bundles): key -> what it segments."""
        return downloadable_models()

    def startModelDownload(self, key: str, python: str | None = None, env: dict | None = None,
                           models_folder: Path = USER_MODELS, downloads_folder: Path = DOWNLOADS,
                           url: str | None = None) -> ModelDownloadJob:
        """Download a model of :meth:`downloadableModels` (``url``: a mirror) in the background and
        install it among the user's models on success; poll the returned job."""
        job = ModelDownloadJob(key, models_folder, downloads_folder, url, python, env)
        job.start()
        return job

    def deviceDescription(self) -> str:
        """The GPU the engine would use, with its memory, or why the CPU will be used."""
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed yet"
        if not torch.cuda.is_available():
            return "No CUDA GPU found: the CPU will be used"
        properties = torch.cuda.get_device_properties(0)
        return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB)"

    def startSegmentation(self, scene, input_nodes: list, model: str, device: str = "auto", fast: bool = False,
                          tta: bool = False, target_segmentation=None, python: str | None = None,
                          env: dict | None = None, uncertainty: bool = False) -> SegmentationJob:
        """Start the engine in the background on the input volume nodes; poll the returned job. With
        ``uncertainty`` the job also adds the uncertainty map and the regions to check to the scene."""
        expected = self.modelChannelNames(model)
        chosen = [node for node in input_nodes if node is not None]
        if len(chosen) != len(expected):
            raise ModelCardError(f"Model '{model}' needs {len(expected)} input volume(s): {', '.join(expected)}")
        job = SegmentationJob(scene, chosen, model, device, fast, tta, target_segmentation, python, env, uncertainty)
        job.start()
        return job

    def prepareEngine(self, python: str | None = None, env: dict | None = None) -> None:
        """Start the engine worker ahead of the first run: it imports the engine's libraries (about
        2 s) while the user picks the inputs, so the first run does not wait for them."""
        WARM_ENGINE.prepare(python, env)

    def shutdown(self) -> None:
        """End the engine worker kept for the next run (it holds the libraries and the last model)."""
        WARM_ENGINE.shutdown()

    def startCorrection(self, scene, segmentation_node, segment_id: str, volume_node, python: str | None = None,
                        env: dict | None = None) -> SegmentCorrection:
        """Include / exclude point lists for one segment; each placed point re-segments near it in
        the engine's worker, on the image the segmentation was made on (``volume_node``, the input
        chosen now, only where it does not say); poll the returned correction. The correction
        before, if any, ends first: one segment at a time."""
        image = nodes.source_volume(segmentation_node) or volume_node
        # a missing segment: refused here
        correction = SegmentCorrection(scene, segmentation_node, segment_id, image, python, env)
        self.endCorrection(scene)
        correction.observe()
        self.correction = correction
        return correction

    def endCorrection(self, scene) -> None:
        """End the correction with points, if any (its points leave the scene, the segment stays as
        corrected); the panel does so when a new result arrives, whose segments the points were not
        placed on."""
        if self.correction is not None:
            self.correction.end(scene)
            self.correction = None

    def showSurfaces(self, segmentation_node, smoothing: float) -> None:
        nodes.show_3d(segmentation_node, smoothing)

    def exportSurfacesToModels(self, scene, segmentation_node) -> list:
        return nodes.export_to_models(scene, segmentation_node)

    def exportSurfacesToFiles(self, segmentation_node, folder: str | Path, suffix: str = ".stl") -> list[Path]:
        return nodes.export_to_files(segmentation_node, folder, suffix)

    def startReport(self, segmentation_node, path: str | Path, python: str | None = None,
                    env: dict | None = None) -> ReportJob:
        """Write the HTML report of the segmentation as it is now (corrections included) to ``path``
        in the background; poll the returned job."""
        job = ReportJob(segmentation_node, path, python, env)
        job.start()
        return job

    def correctionsFolder(self, model: str) -> Path:
        """Where corrected cases of a model are saved for training unless the user picks a folder."""
        return CORRECTIONS / find_model(model).name

    def saveForTraining(self, segmentation_node, volume_nodes: list, model: str, folder: str | Path | None = None):
        """Save the input volume(s) and the corrected segments as a training case named after the
        first volume and a fingerprint of its image: saving the same image again replaces its case,
        another patient's volume of the same name ("3: FLAIR") gets a case of its own. Returns the
        data set."""
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", volume_nodes[0].GetName()).strip("_") or "case"
        case_id = f"{name}_{nodes.image_fingerprint(volume_nodes[0])}"
        return nodes.save_for_training(segmentation_node, volume_nodes, find_model(model),
                                       folder or self.correctionsFolder(model), case_id)

    def startFineTuning(self, model: str, folder: str | Path | None = None, freeze_encoder: bool = True,
                        device: str = "auto", python: str | None = None, env: dict | None = None,
                        models_folder: Path = USER_MODELS, rehearse: str | Path | None = None) -> FineTuningJob:
        """Fine-tune a model on its saved corrections in the background (``rehearse``: a folder of
        earlier scans the model should keep segmenting as it does); on success the new version is
        installed among the user's models and supersedes the old one. Poll the returned job."""
        job = FineTuningJob(model, folder or self.correctionsFolder(model), models_folder, freeze_encoder, device,
                            python, env, rehearse)
        job.start()
        return job
