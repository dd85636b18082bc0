"""Correct one segment with include / exclude points placed on the slices (markups point lists)
and a box drawn around it (a markups ROI).

Each newly placed point, and the box once drawn, re-segments the segment near them in the
background: the markups' events mark the prompts as changed, the panel polls the correction from a
timer (``poll``: it reads the prompts once the event's change is complete, a box drawn with both
corners), and the engine's ``refine`` runs in the engine's worker process (``engine_run``) on the
block of the image and of the segment it may change (``refine_region``), written to an exchange
folder, while Slicer stays responsive; the corrected block then replaces that block of the segment.
As with the engine's ``refine`` command, voxels are added to the segment only where there is none
of the segmentation's other segments: a correction never overwrites or overlaps a neighbour. The
box is re-segmented when it is drawn or resized; a later point is corrected near the points, and
the box still bounds the segment. Prompts placed while a correction runs are taken one after the
other. The segmentation's history (the one the Segment Editor uses) keeps the state before each
prompt, so ``undo`` restores the last one and forgets the last point or the box (or takes back a
point not corrected for yet). A point or box removed, moved or resized afterwards (in the Markups
module, or dragged on a slice) is followed: the segment goes back to its state before the first
prompt (kept aside, as the history holds only the last few states) and is corrected again, prompt
by prompt, with the prompts as they are now. Where the segment was edited elsewhere since the last
prompt (painted in the Segment Editor), that edited segment is the one corrected again, and undo
refuses: it would take the edit back with the prompt; a correction that was running meanwhile is
dropped and started again on the edited segment. A point or box placed or moved outside the image
is taken off the slices and refused in one line (``poll`` raises it; the panel shows it in a
message).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer

from AIReconstructLib.errors import AIReconstructError, InputError
from AIReconstructLib.interaction import REACH_MM, Click, box_slices, refine_region, to_voxel, to_voxel_box
from AIReconstructLib.io import read_volume, write_volume
from AIReconstructLib.modelcard import Label
from AIReconstructLib.segnrrd import write_seg_nrrd

from .engine_run import EngineRun, exchange_folder
from .nodes import segment_and_others, set_segment_mask, volume_from_node

INCLUDE_COLOUR, EXCLUDE_COLOUR, BOX_COLOUR = (0.1, 0.8, 0.2), (0.9, 0.2, 0.1), (0.9, 0.8, 0.1)
BOX = "box"  # the kind of the box's prompt, where a point's is True (include) or False (exclude)
# the segment and the segmentation's other segments (the values nodes.segment_and_others gives them),
# as the engine's refine reads them: it adds voxels to the segment only where there is none of the others
SEGMENT_LABEL = Label(1, "segment", INCLUDE_COLOUR, {}, {})
OTHERS_LABEL = Label(2, "other segments", EXCLUDE_COLOUR, {}, {})


@dataclass
class CorrectionStep:
    """One correction running in the engine: the segment ``start`` corrected with ``prompts``
    (the last one new) in its block ``region``; ``replay``: ``start`` is the segment before the
    first prompt; ``seen``: the segments as they were when the step started (``_labelmap``: an
    edit elsewhere meanwhile makes the result stale); ``bound``: the voxel box of a box drawn at an
    earlier step, which the result is cut to (the engine corrects near the points only)."""

    prompts: list
    replay: bool
    start: np.ndarray
    region: tuple
    seen: np.ndarray
    run: EngineRun
    output: Path
    bound: tuple | None


class SegmentCorrection:
    """Include / exclude point lists and a box bound to one segment of a segmentation node."""

    def __init__(self, scene, segmentation_node, segment_id: str, volume_node, python: str | None = None,
                 env: dict | None = None):
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        if segment is None:
            raise InputError(f"Choose a segment of '{segmentation_node.GetName()}' to correct"
                             + (f" ('{segment_id}' is not one)" if segment_id else ""))
        self.scene, self.segmentation_node, self.segment_id = scene, segmentation_node, segment_id
        self.volume_node = volume_node
        self.volume = volume_from_node(volume_node)
        self.python, self.env = python, env  # how the engine's worker is started (as for the panel's jobs)
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        self.name = segment.GetName()
        self.points = {True: self._markups("vtkMRMLMarkupsFiducialNode", f"{self.name} include", INCLUDE_COLOUR),
                       False: self._markups("vtkMRMLMarkupsFiducialNode", f"{self.name} exclude", EXCLUDE_COLOUR)}
        self.box = None  # the markups ROI of the box, once one is to be drawn (new_box)
        # the prompts the segment shows: (include? or BOX, ID, RAS position or the box's RAS bounds), in the order given
        self.prompts: list[tuple] = []
        self.given: list[tuple] = []  # (kind, ID) of every prompt in the scene, in the order they were first seen
        self.before_points = None  # the segment's mask before the first prompt
        self.after_points = None  # the segment's mask as the last prompt left it
        self.step: CorrectionStep | None = None  # the correction running in the engine, if any
        self.workdir: Path | None = None  # the exchange folder, from the first step on
        self.observers: list[tuple] = []  # (markups node, observer tag), once placed prompts re-segment (observe)
        self.changed = False  # the prompts changed since the last sync: the next poll syncs

    def _markups(self, node_class: str, name: str, colour):
        node = self.scene.AddNewNodeByClass(node_class, name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*colour)
            display.SetColor(*colour)
        return node

    def observe(self) -> None:
        """Re-segment (at the next ``poll``) whenever a point is placed or the box drawn, and follow
        points and the box removed, moved or resized (in Slicer)."""
        for node in (*self.points.values(), *([self.box] if self.box is not None else [])):
            self._observe(node)

    @property
    def intact(self) -> bool:
        """Whether its point lists are still in the scene (not deleted in the Data or Markups module)."""
        return all(node.GetScene() is not None for node in self.points.values())

    @property
    def busy(self) -> bool:
        """Whether a correction is running in the engine."""
        return self.step is not None

    def _observe(self, node) -> None:
        markups = slicer.vtkMRMLMarkupsNode
        events = (markups.PointPositionDefinedEvent, markups.PointRemovedEvent, markups.PointEndInteractionEvent)
        self.observers += [(node, node.AddObserver(event, self._on_prompts_changed)) for event in events]

    def _on_prompts_changed(self, caller, event) -> None:
        self.changed = True

    def new_box(self):
        """A new, empty box (a markups ROI) to draw, in place of the box before, if any (the segment
        is then corrected again without it); returns its node."""
        self._remove_box()
        self.changed = True
        self.box = self._markups("vtkMRMLMarkupsROINode", f"{self.name} box", BOX_COLOUR)
        if self.observers:  # observing (in Slicer)
            self._observe(self.box)
        return self.box

    def _remove_box(self) -> None:
        """Take the box's node, if any, out of the scene, without following it."""
        if self.box is not None:
            for node, tag in [entry for entry in self.observers if entry[0] is self.box]:
                node.RemoveObserver(tag)
            self.observers = [entry for entry in self.observers if entry[0] is not self.box]
            if self.box.GetScene() is not None:  # not deleted already
                self.scene.RemoveNode(self.box)
            self.box = None

    def _prompts_now(self) -> list[tuple]:
        """Every point and the box as they are now (see ``prompts``), in the order they were given."""
        now = {prompt[:2]: prompt for prompt in [*self._points_now(True), *self._points_now(False), *self._box_now()]}
        self.given = [key for key in self.given if key in now] + [key for key in now if key not in self.given]
        return [now[key] for key in self.given]

    def _box_now(self) -> list[tuple]:
        """The box as it is now, as a prompt (none while it is not drawn). A box drawn on one slice,
        flat, is taken to reach as deep through the slices as it is wide."""
        if self.box is None or self.box.GetScene() is None or not self.box.GetNumberOfDefinedControlPoints():
            return []
        bounds = [0.0] * 6
        self.box.GetRASBounds(bounds)
        low, high = np.array(bounds[0::2]), np.array(bounds[1::2])
        size = high - low
        if (size > 0).sum() < 2:  # not drawn yet (a point, or a line while it is being placed)
            return []
        low, high = np.where(size > 0, low, low - size.max() / 2), np.where(size > 0, high, high + size.max() / 2)
        return [(BOX, self.box.GetID(), (*low, *high))]

    def _points_now(self, positive: bool) -> list[tuple]:
        """The points of one list as they are now: (include?, point ID, RAS position); none once
        the list was deleted."""
        node, ras = self.points[positive], [0.0, 0.0, 0.0]
        if node.GetScene() is None:
            return []
        points = []
        for index in range(node.GetNumberOfControlPoints()):
            node.GetNthControlPointPositionWorld(index, ras)
            points.append((positive, node.GetNthControlPointID(index), tuple(ras)))
        return points

    def _labelmap(self) -> np.ndarray:
        """The segmentation as it is now on the image's grid: the segment 1 (where segments overlap
        too), the other segments 2."""
        return segment_and_others(self.segmentation_node, self.segment_id, self.volume_node)

    def _segment(self):
        """The segment's mask as it is now."""
        return self._labelmap() == SEGMENT_LABEL.value

    def _show(self, mask) -> None:
        """Make ``mask`` the segment, as the points leave it."""
        set_segment_mask(self.segmentation_node, self.segment_id, self.volume_node, mask)
        self.after_points = mask

    def _in_voxels(self, prompts) -> tuple[list[Click], tuple | None]:
        """The points as clicks and the box as a voxel box, on the image's grid; refused in one line
        if one lies outside the image."""
        clicks = [Click(to_voxel(self.volume, list(ras), "RAS"), kind) for kind, _, ras in prompts if kind != BOX]
        boxes = [to_voxel_box(self.volume, [bounds[:3], bounds[3:]], "RAS")
                 for kind, _, bounds in prompts if kind == BOX]
        return clicks, boxes[0] if boxes else None

    def _lies_in_image(self, prompt) -> bool:
        try:
            self._in_voxels([prompt])
        except InputError:
            return False
        return True

    def _take_back(self, prompts) -> None:
        """Remove prompts' points (or the box) from the slices."""
        for kind, prompt_id, _ in prompts:
            if kind == BOX:
                self._remove_box()
            elif self.points[kind].GetScene() is not None:
                node = self.points[kind]
                index = node.GetNthControlPointIndexByID(prompt_id)
                if index >= 0:
                    node.RemoveNthControlPoint(index)

    def _edited_elsewhere(self, current) -> bool:
        """Whether the segment (``current``) was changed since the last prompt, other than by prompts."""
        return self.after_points is not None and not np.array_equal(current, self.after_points)

    def _start_from(self, current) -> None:
        """Take ``current`` as the segment the prompts are replayed on when there are none yet, or
        when it was edited elsewhere since the last prompt (the edit is then kept)."""
        if not self.prompts or self._edited_elsewhere(current):
            self.before_points = current

    def sync(self) -> bool:
        """Bring the segment in line with the prompts as they are now: start correcting it for the
        next prompt not shown yet, in the engine (after a prompt was removed, moved or resized:
        from the segment before the first prompt); while a correction runs, ``poll`` starts the next
        one when it ends. False if the segment shows every prompt as it is. A point or box outside
        the image is taken off the slices and refused in one line."""
        self.changed = False
        wanted = self._prompts_now()
        outside = [prompt for prompt in wanted if not self._lies_in_image(prompt)]
        self._take_back(outside)
        wanted = [prompt for prompt in wanted if prompt not in outside]
        in_line = wanted == self.prompts
        if not in_line and self.step is None:
            self._start_next(wanted)
        if outside:
            known = {prompt[:2] for prompt in self.prompts}
            moved = any(prompt[:2] in known for prompt in outside)
            raise InputError(f"{'Moved outside' if moved else 'Outside'} the image: {len(outside)} "
                             f"{'point or box' if len(outside) == 1 else 'points or boxes'} taken off the slices")
        return not in_line

    def _start_next(self, wanted: list) -> None:
        """Start the engine on the next prompt of ``wanted`` (on all of them, once, where the
        prompts shown are no longer the first of them); where none is left, show the segment
        before the first prompt."""
        labelmap = self._labelmap()
        current = labelmap == SEGMENT_LABEL.value
        self._start_from(current)
        replay = wanted[:len(self.prompts)] != self.prompts
        if replay and not wanted:
            self._show(self.before_points)
            self.prompts = []
            return
        prompts = wanted[:1] if replay else wanted[:len(self.prompts) + 1]
        start = self.before_points if replay else current
        clicks, box = self._in_voxels(prompts)
        # a box drawn at an earlier step is not re-segmented for a new point (a liver-sized box takes
        # seconds): the engine corrects near the points, and the box still bounds the segment
        bound = box if box is not None and prompts[-1][0] != BOX else None
        region = refine_region(start.shape, self.volume.spacing[::-1], clicks, None if bound else box, REACH_MM)
        if self.workdir is None:
            self.workdir = exchange_folder(3 * self.volume.array.nbytes)
        image = self.volume.cropped(region)
        image_file = write_volume(image, self.workdir / "image.nrrd", compress=False)
        block = np.where(start[region], SEGMENT_LABEL.value, np.where(labelmap[region] == OTHERS_LABEL.value,
                                                                      OTHERS_LABEL.value, 0)).astype(np.uint8)
        # a .seg.nrrd: it names the segment even while it is empty
        segment = write_seg_nrrd(image.with_array(block), [SEGMENT_LABEL, OTHERS_LABEL],
                                 self.workdir / "segment.seg.nrrd", compress=False)
        output = self.workdir / "corrected.nrrd"
        arguments = ["refine", str(image_file), str(segment), "--label", SEGMENT_LABEL.name,
                     "--coordinates", "RAS", "-o", str(output)]
        for kind, _, where in prompts:
            if kind != BOX or not bound:
                flag = "--box" if kind == BOX else "--include" if kind else "--exclude"
                arguments += [flag, *(f"{value:.4f}" for value in where)]  # "-1e-05" would read as an option
        run = EngineRun(arguments, self.python, self.env)
        run.start()
        self.step = CorrectionStep(prompts, replay, start, region, labelmap, run, output, bound)

    def poll(self) -> bool:
        """Follow the prompts changed since the last poll, and once the running correction has
        ended, show its result where it still holds (no prompt it used changed meanwhile and the
        segment was not edited elsewhere), then start the next; never blocks (a correction starts
        in a fraction of a second). True while a correction runs. A failed correction takes its
        new prompt off the slices and is refused in one line."""
        if self.step is not None:
            state = self.step.run.poll()
            if not state.finished:
                return True
            step, self.step = self.step, None
            self.changed = True  # the next prompt, if any, or the same again on the segment as it is now
            try:
                block = self._result(step, state)
            except AIReconstructError as error:  # not tried again: its prompt goes
                self._take_back(step.prompts[-1:])
                raise InputError("The correction failed and its point or box was taken off the slices: "
                                 f"{error}") from None
            corrected = step.start.copy()
            corrected[step.region] = block
            self._show_if_it_holds(step, corrected)
        if self.changed:
            self.sync()
        return self.step is not None

    @staticmethod
    def _result(step: CorrectionStep, state) -> np.ndarray:
        """The corrected block of a finished step; refused in one line if the engine failed or its
        result does not fit the block sent."""
        if state.status != "done":
            raise AIReconstructError(state.error)
        block = read_volume(step.output).array == SEGMENT_LABEL.value
        expected = tuple(part.stop - part.start for part in step.region)
        if block.shape != expected:
            raise AIReconstructError(f"the engine's result has the size {block.shape}, not {expected}")
        if step.bound is not None:
            inside = np.zeros(block.shape, bool)
            inside[box_slices(step.bound, [part.start for part in step.region])] = True
            block &= inside
        return block

    def _show_if_it_holds(self, step: CorrectionStep, corrected) -> None:
        """Show a finished step's result unless a prompt it used changed or the segment was edited
        elsewhere since it started."""
        if self._prompts_now()[:len(step.prompts)] == step.prompts and np.array_equal(self._labelmap(), step.seen):
            if step.replay:
                self._show(self.before_points)
            self.prompts = list(step.prompts)
            self.history.SaveState()
            self._show(corrected)

    def wait(self, timeout: float = 300.0) -> None:
        """Poll until every prompt is corrected for (for scripts and tests; the panel polls from a timer)."""
        deadline = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > deadline:
                raise TimeoutError(f"The correction of '{self.name}' took more than {timeout:.0f} s")
            time.sleep(0.02)

    def undo(self) -> bool:
        """Take back the last prompt: the last one placed while not corrected for yet, or else the
        last one the segment shows, restoring the segment as it was before it. False if there is
        none, or if the segment was edited elsewhere since (undoing the prompt would undo the edit)."""
        shown = {prompt[:2] for prompt in self.prompts}
        waiting = [prompt for prompt in self._prompts_now() if prompt[:2] not in shown]
        if waiting:
            self._take_back(waiting[-1:])
        elif (not self.prompts or not self.history.IsRestorePreviousStateAvailable()
              or self._edited_elsewhere(self._segment())):
            self.changed = True  # a point list or the box deleted since: followed at the next poll
            return False
        else:
            self.history.RestorePreviousState()
            self._take_back([self.prompts.pop()])
            self.after_points = self._segment()
        self.changed = True
        return True

    def end(self, scene, wait_seconds: float = 10.0) -> None:
        """Stop following the points and the box and remove them from the scene (the corrected
        segment stays; a correction still running is dropped: waited for up to ``wait_seconds``,
        so that its worker stays for the next run, then ended): prompts left behind would otherwise
        put the segment back to its state before them."""
        if self.step is not None:
            deadline = time.monotonic() + wait_seconds
            while not self.step.run.poll().finished and time.monotonic() < deadline:
                time.sleep(0.02)
            self.step.run.cancel(grace_seconds=0.0)  # nothing to do where it has ended
            self.step = None
        self._remove_workdir()
        for node, tag in self.observers:
            node.RemoveObserver(tag)
        self.observers = []
        self._remove_box()
        for node in self.points.values():
            if node.GetScene() is not None:
                scene.RemoveNode(node)

    def _remove_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
