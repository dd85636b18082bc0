"""AIReconstruct: one-click AI segmentation into editable segments and 3D surfaces.

A thin adapter: the Widget holds the GUI, the Logic the panel's actions (in
``AIReconstructAdapter``, tested outside Slicer on real MRML), and the engine
(``AIReconstructLib``) runs in a separate process so that Slicer stays responsive.
"""

import logging
import pathlib
import shutil
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from AIReconstructAdapter.requirements import REQUIREMENTS_FILE, missing_requirements

MAX_INPUTS = 4
MESH_FORMATS = [".stl", ".ply", ".vtp", ".obj", ".glb", ".3mf"]  # as AIReconstructLib.meshfiles.MESH_FORMATS


class AIReconstruct(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AI Reconstruct")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AIReconstruct developers"]
        self.parent.helpText = _(
            "Segment organs, lesions and bones of a CT or MRI with a deep network, as editable segments and "
            "smooth 3D surfaces for pre-surgical review. Pick a model (or download one of TotalSegmentator's: "
            "117 CT structures, MRI organs, lung nodules, airways and vessels, liver lesions, segments and "
            "vessels; or MONAI's whole-body model with the heart chambers) and an input volume, press Apply; "
            "correct a segment with include/exclude points and a box, save a report of the measurements, and save "
            "corrected cases to fine-tune the model. "
            'See the <a href="https://github.com/AIReconstruct/SlicerAIReconstruct#readme">user guide</a>.')
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, PyTorch, MONAI, SimpleITK and VTK; TotalSegmentator's models are by "
            "Wasserthal et al. (Apache-2.0). The bundled demo model was trained on synthetic phantoms and is not "
            "for clinical use.")


@parameterNodeWrapper
class AIReconstructParameterNode:
    """The panel's state; each field is bound to a widget by its ``SlicerParameterName``."""

    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    model: str = "demo-abdomen-ct"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    fastMode: bool = False
    testTimeAugmentation: bool = False
    uncertainty: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    surfaceSmoothing: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    show3D: bool = True
    freezeEncoder: bool = True
    rehearsalFolder: pathlib.Path  # earlier scans to rehearse while fine-tuning (empty: none)

    def inputVolumes(self) -> list:
        return [self.inputVolume0, self.inputVolume1, self.inputVolume2, self.inputVolume3]


class AIReconstructWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: every action is a call to :class:`AIReconstructLogic`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None
        self.onJobDone = None  # what to do when the background job succeeds
        self.cards = {}  # installed model cards by name, read once per refresh
        self.logLinesShown = 0
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self.onPoll)
        self.correctionTimer = qt.QTimer()  # polls the correction with points and a box while there is one
        self.correctionTimer.setInterval(50)
        self.correctionTimer.connect("timeout()", self.onCorrectionPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AIReconstruct.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AIReconstructLogic()
        self.ui.exportFormatComboBox.addItems(MESH_FORMATS)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.exportFilesButton.connect("clicked(bool)", self.onExportFiles)
        self.ui.exportModelsButton.connect("clicked(bool)", self.onExportModels)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.ui.includePointsButton.connect("clicked(bool)", lambda: self.onPlacePoints(True))
        self.ui.excludePointsButton.connect("clicked(bool)", lambda: self.onPlacePoints(False))
        self.ui.drawBoxButton.connect("clicked(bool)", self.onDrawBox)
        self.ui.undoCorrectionButton.connect("clicked(bool)", self.onUndoCorrection)
        self.ui.saveForTrainingButton.connect("clicked(bool)", self.onSaveForTraining)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        self.onCancel()
        self.correctionTimer.stop()
        self.removeObservers()
        self.logic.endCorrection()
        self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.logic.prepareEngine()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.onCancel()
        self.logic.endCorrection()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume0:  # the first image loaded, not a label map
            images = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                      if not node.IsA("vtkMRMLLabelMapVolumeNode")]
            self._parameterNode.inputVolume0 = images[0] if images else None

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    def refreshModels(self) -> None:
        """List installed models; needs the engine's requirements, so it asks to install them first."""
        if not self.logic.requirementsInstalled():
            self.ui.modelInfoLabel.text = _("Press Apply to install the engine's Python packages first.")
            return
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        self.cards = {card.name: card for card in self.logic.adapter.installedModels()}
        for card in self.cards.values():
            self.ui.modelComboBox.addItem(card.data["title"], card.name)
        self.ui.modelComboBox.blockSignals(False)
        index = self.ui.modelComboBox.findData(self._parameterNode.model if self._parameterNode else "")
        self.ui.modelComboBox.setCurrentIndex(max(index, 0))
        self.onModelChanged()
        self.ui.deviceInfoLabel.text = self.logic.adapter.deviceDescription()
        if not self.ui.downloadTaskComboBox.count:
            for key, description in self.logic.adapter.downloadableModels().items():
                self.ui.downloadTaskComboBox.addItem(description, key)

    def onModelChanged(self, index=None) -> None:
        model = self.ui.modelComboBox.currentData
        if not model or not self._parameterNode:
            return
        self._parameterNode.model = model
        card = self.cards[model]
        self.ui.modelInfoLabel.text = card.summary()
        channels = [channel["name"] for channel in card.channels]
        for n in range(MAX_INPUTS):
            visible = n < len(channels)
            getattr(self.ui, f"inputVolumeLabel{n}").visible = visible
            getattr(self.ui, f"inputVolumeSelector{n}").visible = visible
            if visible:
                getattr(self.ui, f"inputVolumeLabel{n}").text = f"{channels[n]} volume:"
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        running = self.job is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume0)
        self.ui.applyButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        self.ui.fineTuneButton.enabled = not running
        self.ui.downloadModelButton.enabled = not running and self.ui.downloadTaskComboBox.count > 0
        hasResult = bool(self._parameterNode and self._parameterNode.outputSegmentation)
        for button in (self.ui.exportFilesButton, self.ui.exportModelsButton, self.ui.editButton,
                       self.ui.saveReportButton, self.ui.includePointsButton, self.ui.excludePointsButton,
                       self.ui.drawBoxButton,
                       self.ui.undoCorrectionButton, self.ui.saveForTrainingButton):
            button.enabled = hasResult and not running
        self.refreshCorrectionSegments()

    def refreshCorrectionSegments(self) -> None:
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        names = []
        if node is not None:
            segmentation = node.GetSegmentation()
            names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        if names != [self.ui.correctionSegmentComboBox.itemText(i) for i in range(self.ui.correctionSegmentComboBox.count)]:
            self.ui.correctionSegmentComboBox.clear()
            self.ui.correctionSegmentComboBox.addItems(names)

    def onPlacePoints(self, include: bool) -> None:
        """Place include or exclude points on the selected segment; each one re-segments near it."""
        with slicer.util.tryWithErrorDisplay(_("Points cannot be placed."), waitCursor=True):
            self.startPlacing(self.selectedCorrection().points[include], persistent=True)

    def onDrawBox(self) -> None:
        """Draw a box around the selected segment (in place of the box before); inside it the segment
        is re-segmented."""
        with slicer.util.tryWithErrorDisplay(_("A box cannot be drawn."), waitCursor=True):
            self.startPlacing(self.selectedCorrection().new_box(), persistent=False)

    def selectedCorrection(self):
        """The correction of the segment chosen in the panel, started if it is not the current one."""
        segmentationNode = self._parameterNode.outputSegmentation
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(
            self.ui.correctionSegmentComboBox.currentText)
        correction = self.logic.adapter.correction
        if (correction is None or not correction.intact or correction.segmentation_node is not segmentationNode
                or correction.segment_id != segmentId):
            correction = self.logic.adapter.startCorrection(
                slicer.mrmlScene, segmentationNode, segmentId, self._parameterNode.inputVolume0,
                **self.logic.engineProcess())
            self.correctionTimer.start()
        return correction

    def onCorrectionPoll(self) -> None:
        """Start the correction of newly placed points (or the box) in the engine's worker, and show
        its result once there; an error (a point outside the image) in a message."""
        self.correctionTimer.stop()  # not again while a message is shown
        correction = self.logic.adapter.correction  # the timer starts with one
        if correction is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The segment could not be corrected.")):
            if correction.poll():
                slicer.util.showStatusMessage(_("Correcting '{name}'...").format(name=correction.name), 500)
        self.correctionTimer.start()

    @staticmethod
    def startPlacing(markupsNode, persistent: bool) -> None:
        slicer.modules.markups.logic().SetActiveListID(markupsNode)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(1 if persistent else 0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onUndoCorrection(self) -> None:
        correction = self.logic.adapter.correction
        if correction is not None and not correction.undo():
            self.ui.logTextEdit.appendPlainText(
                _("No point or box to undo, or the segment was edited since (undo that in the Segment Editor)."))

    def onApply(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            if not self.logic.requirementsInstalled():
                self.logic.installRequirements()
                self.refreshModels()
            self.startJob(self.logic.process(self._parameterNode), self.onSegmentationDone)
        self.updateButtons()

    def startJob(self, job, onDone) -> None:
        """Follow a background job in the log and the progress bar; ``onDone(job)`` when it succeeds."""
        self.ui.logTextEdit.clear()
        self.logLinesShown = 0
        self.job, self.onJobDone = job, onDone
        self.timer.start()

    def onPoll(self) -> None:
        state = self.job.poll()
        self.ui.progressBar.value = int(100 * state.progress)
        self.ui.progressBar.format = state.message
        for line in state.log[self.logLinesShown:]:
            self.ui.logTextEdit.appendPlainText(line)
        self.logLinesShown = len(state.log)
        if not state.finished:
            return
        self.timer.stop()
        job, self.job = self.job, None
        if state.status == "done":
            self.onJobDone(job)
            self.ui.logTextEdit.appendPlainText(_("Done."))
        elif state.status == "failed":
            slicer.util.errorDisplay(state.error)
        else:
            self.ui.logTextEdit.appendPlainText(_("Cancelled; nothing was changed."))
        self.updateButtons()

    def onSegmentationDone(self, job) -> None:
        self.logic.endCorrection()  # its points were placed on the result before
        self._parameterNode.outputSegmentation = job.segmentation_node
        for name, volume in job.volumes_ml.items():
            parts = job.lesion_parts.get(name, 1)
            line = _("{name}: {volume:.1f} mL in {parts} separate parts") if parts > 1 else _("{name}: {volume:.1f} mL")
            self.ui.logTextEdit.appendPlainText(line.format(name=name, volume=volume, parts=parts))
        if job.lesion_points is not None:
            self.ui.logTextEdit.appendPlainText(_("Lesions to review: {count} (Markups module: '{name}')").format(
                count=job.lesion_points.GetNumberOfControlPoints(), name=job.lesion_points.GetName()))
        if self._parameterNode.show3D:
            self.logic.adapter.showSurfaces(job.segmentation_node, self._parameterNode.surfaceSmoothing)
        if job.uncertainty_node is not None:
            self.showUncertainty(job)

    def onSaveForTraining(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The case could not be saved for training."), waitCursor=True):
            dataset = self.logic.adapter.saveForTraining(
                self._parameterNode.outputSegmentation, [v for v in self._parameterNode.inputVolumes() if v],
                self._parameterNode.model)
            self.ui.logTextEdit.appendPlainText(_("Saved for training: {folder} now holds {count} case(s).").format(
                folder=dataset.folder, count=len(dataset.cases)))

    def onFineTune(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start."), waitCursor=True):
            job = self.logic.adapter.startFineTuning(
                self._parameterNode.model, freeze_encoder=self._parameterNode.freezeEncoder,
                device=self._parameterNode.device, rehearse=self.rehearsalFolder(), **self.logic.engineProcess())
            self.startJob(job, self.onFineTuningDone)
        self.updateButtons()

    def rehearsalFolder(self) -> str | None:
        """The folder of earlier scans chosen for rehearsal, or None (an empty path edit reads as ".")."""
        folder = str(self._parameterNode.rehearsalFolder)
        return folder if folder not in ("", ".") else None

    def onFineTuningDone(self, job) -> None:
        self.refreshModels()
        self.ui.logTextEdit.appendPlainText(_("New model version installed in {folder}").format(folder=job.model_folder))

    def showUncertainty(self, job) -> None:
        """The uncertainty over the slices (red: unsure) and the regions to check in the log."""
        display = job.uncertainty_node.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeRed")
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
        slicer.util.setSliceViewerLayers(foreground=job.uncertainty_node, foregroundOpacity=0.4)
        points = job.check_points
        count = points.GetNumberOfControlPoints() if points is not None else 0
        self.ui.logTextEdit.appendPlainText(_("Regions to check: {count} (Markups module: '{name}')").format(
            count=count, name=points.GetName() if points is not None else "-"))
        for index in range(count):
            self.ui.logTextEdit.appendPlainText("  " + points.GetNthControlPointLabel(index))

    def onCancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def onAddModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Model folder (with card.json)"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("The model could not be added.")):
                self.logic.adapter.addModel(folder)
                self.refreshModels()

    def onDownloadModel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The model could not be downloaded."), waitCursor=True):
            job = self.logic.adapter.startModelDownload(self.ui.downloadTaskComboBox.currentData,
                                                        **self.logic.engineProcess())
            self.startJob(job, self.onModelDownloaded)
        self.updateButtons()

    def onModelDownloaded(self, job) -> None:
        self._parameterNode.model = job.model_name
        self.refreshModels()
        self.ui.logTextEdit.appendPlainText(_("Model installed: {name}").format(name=job.model_name))

    def onExportFiles(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Export surfaces to folder"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Surfaces could not be exported."), waitCursor=True):
                written = self.logic.adapter.exportSurfacesToFiles(
                    self._parameterNode.outputSegmentation, folder, self.ui.exportFormatComboBox.currentText)
                self.ui.logTextEdit.appendPlainText(_("Wrote {count} surfaces to {folder}").format(
                    count=len(written), folder=folder))

    def onExportModels(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Surfaces could not be exported."), waitCursor=True):
            self.logic.adapter.exportSurfacesToModels(slicer.mrmlScene, self._parameterNode.outputSegmentation)

    def onSaveReport(self) -> None:
        segmentation = self._parameterNode.outputSegmentation
        suggested = pathlib.Path(slicer.app.defaultScenePath) / f"{segmentation.GetName()} report.html"
        path = qt.QFileDialog.getSaveFileName(None, _("Save report"), str(suggested), _("HTML page (*.html)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("The report could not be made."), waitCursor=True):
                self.startJob(self.logic.adapter.startReport(segmentation, path, **self.logic.engineProcess()),
                              self.onReportDone)
            self.updateButtons()

    def onReportDone(self, job) -> None:
        self.ui.logTextEdit.appendPlainText(_("Report saved: {path}").format(path=job.report_path))
        if job.axis_lines:
            self.ui.logTextEdit.appendPlainText(
                _("The lesions' long and short axes on the axial slices are lines in the Markups module: {names}").format(
                    names=", ".join(line.GetName() for line in job.axis_lines)))

    def onEdit(self) -> None:
        self.logic.openInSegmentEditor(self._parameterNode.outputSegmentation, self._parameterNode.inputVolume0)


class AIReconstructLogic(ScriptedLoadableModuleLogic):
    """The module's logic: parameter node, requirements, and the adapter's panel actions."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._adapter = None

    def getParameterNode(self):
        return AIReconstructParameterNode(super().getParameterNode())

    def requirementsInstalled(self) -> bool:
        return not missing_requirements() and self._torchInstalled()

    @staticmethod
    def _torchInstalled() -> bool:
        import importlib.util
        return importlib.util.find_spec("torch") is not None

    def installRequirements(self) -> None:
        """Install the engine's packages (never upgrading what Slicer ships) and PyTorch."""
        if not self._torchInstalled():
            try:
                import PyTorchUtils  # the PyTorch Utils extension picks the build that fits the GPU
            except ImportError:
                slicer.util.pip_install("torch")
            else:
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                    raise RuntimeError(_("PyTorch is needed; it was not installed."))
        if hasattr(slicer, "packaging"):  # Slicer >= 5.12
            requirements = slicer.packaging.load_requirements(str(REQUIREMENTS_FILE))
            slicer.packaging.pip_ensure(requirements, requester="AIReconstruct")
        else:
            for requirement in missing_requirements():
                slicer.util.pip_install(requirement)

    @property
    def adapter(self):
        """The panel's actions (imported once the requirements are there)."""
        if self._adapter is None:
            from AIReconstructAdapter.logic import AdapterLogic
            self._adapter = AdapterLogic()
        return self._adapter

    def endCorrection(self) -> None:
        """End the correction with points, if one was started (its points leave the scene)."""
        if self._adapter is not None:
            self._adapter.endCorrection(slicer.mrmlScene)

    @staticmethod
    def engineProcess() -> dict:
        """How the engine's process is started: Slicer's own Python, in Slicer's start-up environment."""
        return {"python": shutil.which("PythonSlicer") or None, "env": slicer.util.startupEnvironment()}

    def prepareEngine(self) -> None:
        """Start the engine worker while the user picks the inputs (once the requirements are installed)."""
        if self.requirementsInstalled():
            self.adapter.prepareEngine(**self.engineProcess())

    def shutdown(self) -> None:
        """End the engine worker kept between runs, if one was started."""
        if self._adapter is not None:
            self._adapter.shutdown()

    def process(self, parameterNode):
        """Start segmenting with the panel's parameters; returns the running job to poll."""
        return self.adapter.startSegmentation(
            slicer.mrmlScene, parameterNode.inputVolumes(), parameterNode.model, parameterNode.device,
            parameterNode.fastMode, parameterNode.testTimeAugmentation, parameterNode.outputSegmentation,
            uncertainty=parameterNode.uncertainty, **self.engineProcess())

    def openInSegmentEditor(self, segmentationNode, sourceVolumeNode) -> None:
        """The Segment Editor on the segmentation, with the volume it was made on as source volume
        (``sourceVolumeNode``, the input chosen now, only where the segmentation does not say)."""
        from AIReconstructAdapter.nodes import source_volume

        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(source_volume(segmentationNode) or sourceVolumeNode)


class AIReconstructTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a phantom volume segmented end to end with the demo model, then a
    segment corrected with a point and with a box, each undone, then the report saved."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DemoModelOnPhantom()

    def test_DemoModelOnPhantom(self):
        import tempfile

        import numpy as np

        from AIReconstructLib.phantom import make_phantom

        self.delayDisplay(_("Making a CT phantom"))
        logic = AIReconstructLogic()
        if not logic.requirementsInstalled():
            logic.installRequirements()
        phantom = make_phantom(11, spacing=(2.0, 2.0, 3.0))
        volumeNode = slicer.util.addVolumeFromArray(phantom.image.array, name="phantom CT")
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, phantom.image.ijk_to_ras()[r, c])
        volumeNode.SetIJKToRASMatrix(matrix)

        self.delayDisplay(_("Segmenting with the demo model"))
        parameterNode = logic.getParameterNode()
        parameterNode.inputVolume0 = volumeNode
        parameterNode.model = "demo-abdomen-ct"
        job = logic.process(parameterNode)
        state = job.wait(timeout=900)
        self.assertEqual(state.status, "done", state.error)

        segmentationNode = job.segmentation_node
        card = next(c for c in logic.adapter.installedModels() if c.name == "demo-abdomen-ct")
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertIn("liver", names)
        for label in card.labels:
            segmentId = segmentation.GetSegmentIdBySegmentName(label.name)
            if segmentId:
                np.testing.assert_allclose(segmentation.GetSegment(segmentId).GetColor(), label.color, atol=1e-5)
        liverId = segmentation.GetSegmentIdBySegmentName("liver")
        liver = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, liverId, volumeNode)
        truth = phantom.labels.array == 1
        dice = 2 * np.count_nonzero(liver & truth) / (np.count_nonzero(liver) + np.count_nonzero(truth))
        self.assertGreater(dice, 0.85)
        logic.adapter.showSurfaces(segmentationNode, 0.5)
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        models = logic.adapter.exportSurfacesToModels(slicer.mrmlScene, segmentationNode)
        self.assertIn("liver", [model.GetName() for model in models])
        self.assertLessEqual({model.GetName() for model in models}, set(names))
        with tempfile.TemporaryDirectory() as folder:
            written = logic.adapter.exportSurfacesToFiles(segmentationNode, folder, ".3mf")
            self.assertTrue(written[0].stat().st_size > 0)

        self.delayDisplay(_("Correcting the liver with a point and a box"))
        correction = logic.adapter.startCorrection(slicer.mrmlScene, segmentationNode, liverId, volumeNode,
                                                   **logic.engineProcess())
        centre = np.argwhere(truth).mean(axis=0).round().astype(int)  # (k, j, i)
        correction.points[True].AddControlPoint(vtk.vtkVector3d(*(phantom.image.ijk_to_ras() @ [*centre[::-1], 1])[:3]))
        correction.wait()  # as the panel's timer polls it
        self.assertEqual(len(correction.prompts), 1)  # placing the point re-segmented the liver in the engine
        self.assertTrue(correction.undo())
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, liverId, volumeNode),
                                      liver)
        box = correction.new_box()  # drawn as the Box button lets one: two opposite corners
        for corner in (np.argwhere(truth).min(axis=0) - 2, np.argwhere(truth).max(axis=0) + 2):
            box.AddControlPoint(vtk.vtkVector3d(*(phantom.image.ijk_to_ras() @ [*corner[::-1], 1])[:3]))
        correction.wait()
        self.assertEqual(len(correction.prompts), 1)  # drawing the box re-segmented the liver inside it
        self.assertTrue(correction.undo())
        logic.endCorrection()
        self.assertIsNone(logic.adapter.correction)

        self.delayDisplay(_("Saving the report"))
        with tempfile.TemporaryDirectory() as folder:
            job = logic.adapter.startReport(segmentationNode, pathlib.Path(folder) / "report.html",
                                            **logic.engineProcess())
            state = job.wait(timeout=300)
            self.assertEqual(state.status, "done", state.error)
            page = job.report_path.read_text(encoding="utf-8")
        self.assertIn("demo-abdomen-ct, version", page)
        self.assertIn("liver</td>", page)
        logging.info(f"AIReconstruct self-test: liver Dice {dice:.3f}")
        self.delayDisplay(_("Test passed"))
