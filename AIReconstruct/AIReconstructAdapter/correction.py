"""Correct one segment with include / exclude points placed on the slices (markups point lists)
and a box drawn around it (a markups ROI).

Each newly placed point, and the box once drawn, re-segments the segment near them (the engine's
``refine``, a fraction of a second) and updates it in place; the segmentation's history (the one
the Segment Editor uses) keeps every previous state, so ``undo`` restores the last one and forgets
the last point or the box. A point or box removed, moved or resized afterwards (in the Markups
module, or dragged on a slice) is followed: the segment goes back to its state before the first
prompt (kept aside, as the history holds only the last few states) and is corrected again, prompt
by prompt, with the prompts as they are now. Where the segment was edited elsewhere since the last
prompt (painted in the Segment Editor), that edited segment is the one corrected again, and undo
refuses: it would take the edit back with the prompt. A point or box placed or moved outside the
image is taken off the slices and refused in one line (shown by the panel's ``guard``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import slicer

from AIReconstructLib.errors import InputError
from AIReconstructLib.interaction import Click, refine, to_voxel, to_voxel_box

from .nodes import segment_mask, set_segment_mask, volume_from_node

INCLUDE_COLOUR, EXCLUDE_COLOUR, BOX_COLOUR = (0.1, 0.8, 0.2), (0.9, 0.2, 0.1), (0.9, 0.8, 0.1)
BOX = "box"  # the kind of the box's prompt, where a point's is True (include) or False (exclude)


class SegmentCorrection:
    """Include / exclude point lists and a box bound to one segment of a segmentation node."""

    def __init__(self, scene, segmentation_node, segment_id: str, volume_node, reach_mm: float = 20.0):
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        if segment is None:
            raise InputError(f"Choose a segment of '{segmentation_node.GetName()}' to correct"
                             + (f" ('{segment_id}' is not one)" if segment_id else ""))
        self.scene, self.segmentation_node, self.segment_id = scene, segmentation_node, segment_id
        self.volume_node = volume_node
        self.volume = volume_from_node(volume_node)
        self.reach_mm = reach_mm
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        self.name = segment.GetName()
        self.points = {True: self._markups("vtkMRMLMarkupsFiducialNode", f"{self.name} include", INCLUDE_COLOUR),
                       False: self._markups("vtkMRMLMarkupsFiducialNode", f"{self.name} exclude", EXCLUDE_COLOUR)}
        self.box = None  # the markups ROI of the box, once one is to be drawn (new_box)
        # (include? or BOX, ID, RAS position or the box's RAS bounds), in the order given
        self.prompts: list[tuple] = []
        self.before_points = None  # the segment's mask before the first prompt
        self.after_points = None  # the segment's mask as the last prompt left it
        self.observers: list[tuple] = []  # (markups node, observer tag), once placed prompts re-segment (observe)
        # what each correction a placed prompt starts runs in: the panel's shows a wait cursor, and
        # an error (a point or box outside the image) in a message instead of the Python console only
        self.guard = contextlib.nullcontext

    def _markups(self, node_class: str, name: str, colour):
        node = self.scene.AddNewNodeByClass(node_class, name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*colour)
            display.SetColor(*colour)
        return node

    def observe(self) -> None:
        """Re-segment whenever a point is placed or the box drawn, and follow points and the box
        removed, moved or resized (in Slicer)."""
        for node in (*self.points.values(), *([self.box] if self.box is not None else [])):
            self._observe(node)

    @property
    def intact(self) -> bool:
        """Whether its point lists are still in the scene (not deleted in the Data or Markups module)."""
        return all(node.GetScene() is not None for node in self.points.values())

    def _observe(self, node) -> None:
        markups = slicer.vtkMRMLMarkupsNode
        events = {markups.PointPositionDefinedEvent: self.update, markups.PointRemovedEvent: self.follow_points,
                  markups.PointEndInteractionEvent: self.follow_points}
        self.observers += [(node, node.AddObserver(event, lambda caller, _event, react=react: self._guarded(react)))
                           for event, react in events.items()]

    def _guarded(self, react) -> None:
        with self.guard():
            react()

    def new_box(self):
        """A new, empty box (a markups ROI) to draw, in place of the box before, if any (the segment
        is then corrected again without it); returns its node."""
        self._remove_box()
        self.follow_points()
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
        """Every point and the box as they are now (see ``prompts``), the box last."""
        return [*self._points_now(True), *self._points_now(False), *self._box_now()]

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

    def _segment(self):
        """The segment's mask as it is now."""
        return segment_mask(self.segmentation_node, self.segment_id, self.volume_node)

    def _show(self, mask) -> None:
        """Make ``mask`` the segment, as the points leave it."""
        set_segment_mask(self.segmentation_node, self.segment_id, self.volume_node, mask)
        self.after_points = mask

    def _in_voxels(self, prompts) -> tuple[list[Click], tuple | None]:
        """The points as clicks and the box as a voxel box, on the image's grid; refused in one line
        if one lies outside the image."""
        clicks = [Click(to_voxel(self.volume, list(ras), "RAS"), kind) for kind, _, ras in prompts if kind != BOX]
        boxes = [to_voxel_box(self.volume, [bounds[:3], bounds[3:]], "RAS") for kind, _, bounds in prompts if kind == BOX]
        return clicks, boxes[0] if boxes else None

    def _lies_in_image(self, prompt) -> bool:
        try:
            self._in_voxels([prompt])
        except InputError:
            return False
        return True

    def _correct(self, current) -> None:
        """Correct the segment, ``current`` as it is now, with every prompt in ``prompts``; saved in
        the history first."""
        clicks, box = self._in_voxels(self.prompts)
        corrected = refine(self.volume, current, clicks, box=box, reach_mm=self.reach_mm)
        self.history.SaveState()
        self._show(corrected)

    def _take_back(self, prompts, why: str = "") -> None:
        """Remove prompts' points (or the box) from the slices, without following them; with ``why``,
        then say in one line why they were refused."""
        for kind, prompt_id, _ in prompts:
            if kind == BOX:
                self._remove_box()
            else:
                node = self.points[kind]
                node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(prompt_id))  # followed: no change
        if prompts and why:
            raise InputError(f"{why}: {len(prompts)} {'point or box' if len(prompts) == 1 else 'points or boxes'} "
                             "taken off the slices")

    def _edited_elsewhere(self, current) -> bool:
        """Whether the segment (``current``) was changed since the last prompt, other than by prompts."""
        return self.after_points is not None and not np.array_equal(current, self.after_points)

    def _start_from(self, current) -> None:
        """Take ``current`` as the segment the prompts are replayed on when there are none yet, or
        when it was edited elsewhere since the last prompt (the edit is then kept)."""
        if not self.prompts or self._edited_elsewhere(current):
            self.before_points = current

    def update(self) -> bool:
        """Re-segment with every point placed and the box drawn so far; False if there was no new one."""
        self.follow_points()  # a point list or the box deleted (in the Data module) since: no event tells of that
        known = {prompt[:2] for prompt in self.prompts}  # IDs are unique per list
        new = [prompt for prompt in self._prompts_now() if prompt[:2] not in known]
        if not new:
            return False
        self._take_back([prompt for prompt in new if not self._lies_in_image(prompt)], "Outside the image")
        current = self._segment()
        self._start_from(current)
        self.prompts += new
        self._correct(current)
        return True

    def follow_points(self) -> bool:
        """After points or the box were removed, moved or resized: back to the segment as it was
        before the first prompt (or as edited elsewhere since the last one), then corrected again
        with the remaining prompts, in the order they were given, as they are now. False if every
        prompt is as it was."""
        now = {prompt[:2]: prompt for prompt in self._prompts_now()}
        remaining = [now[prompt[:2]] for prompt in self.prompts if prompt[:2] in now]
        if remaining == self.prompts:
            return False
        self._start_from(self._segment())
        self._show(self.before_points)
        self.prompts = []
        for prompt in remaining:
            if self._lies_in_image(prompt):
                self.prompts.append(prompt)
                self._correct(self.after_points)
        self._take_back([prompt for prompt in remaining if prompt not in self.prompts], "Moved outside the image")
        return True

    def undo(self) -> bool:
        """Restore the segment as it was before the last prompt, and remove that point or the box;
        False if there is none, or if the segment was edited elsewhere since (undoing the prompt
        would undo the edit)."""
        self.follow_points()  # a point list or the box deleted since
        if not self.prompts or not self.history.IsRestorePreviousStateAvailable() or self._edited_elsewhere(self._segment()):
            return False
        self.history.RestorePreviousState()
        self._take_back([self.prompts.pop()])
        self.after_points = self._segment()
        return True

    def end(self, scene) -> None:
        """Stop following the points and the box and remove them from the scene (the corrected
        segment stays): prompts left behind would otherwise put the segment back to its state
        before them."""
        for node, tag in self.observers:
            node.RemoveObserver(tag)
        self.observers = []
        self._remove_box()
        for node in self.points.values():
            if node.GetScene() is not None:
                scene.RemoveNode(node)
