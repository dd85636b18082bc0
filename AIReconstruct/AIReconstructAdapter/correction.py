"""Correct one segment with include / exclude points placed on the slices (markups point lists).

Each newly placed point re-segments the segment near the points (the engine's ``refine``, a
fraction of a second) and updates it in place; the segmentation's history (the one the Segment
Editor uses) keeps every previous state, so ``undo`` restores the last one and forgets the last point.
A point removed or moved afterwards (in the Markups module, or dragged on a slice) is followed: the
segment goes back to its state before the first point (kept aside, as the history holds only the
last few states) and is corrected again, point by point, with the points as they are now. Where the
segment was edited elsewhere since the last point (painted in the Segment Editor), that edited
segment is the one corrected again, and undo refuses: it would take the edit back with the point.
"""

from __future__ import annotations

import numpy as np
import slicer

from AIReconstructLib.errors import InputError
from AIReconstructLib.interaction import Click, refine, to_voxel

from .nodes import segment_mask, set_segment_mask, volume_from_node

INCLUDE_COLOUR, EXCLUDE_COLOUR = (0.1, 0.8, 0.2), (0.9, 0.2, 0.1)


class SegmentCorrection:
    """Include / exclude point lists bound to one segment of a segmentation node."""

    def __init__(self, scene, segmentation_node, segment_id: str, volume_node, reach_mm: float = 20.0):
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        if segment is None:
            raise InputError(f"Choose a segment of '{segmentation_node.GetName()}' to correct"
                             + (f" ('{segment_id}' is not one)" if segment_id else ""))
        self.segmentation_node, self.segment_id, self.volume_node = segmentation_node, segment_id, volume_node
        self.volume = volume_from_node(volume_node)
        self.reach_mm = reach_mm
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        name = segment.GetName()
        self.points = {True: self._point_list(scene, f"{name} include", INCLUDE_COLOUR),
                       False: self._point_list(scene, f"{name} exclude", EXCLUDE_COLOUR)}
        self.clicks: list[tuple[bool, str, tuple]] = []  # (include?, point ID, RAS position), in the order placed
        self.before_points = None  # the segment's mask before the first point
        self.after_points = None  # the segment's mask as the last point left it
        self.observers: list[tuple] = []  # (point list, observer tag) while placed points re-segment

    @staticmethod
    def _point_list(scene, name: str, colour):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*colour)
            display.SetColor(*colour)
        return node

    def observe(self) -> None:
        """Re-segment whenever a point is placed, and follow points removed or moved (in Slicer)."""
        markups = slicer.vtkMRMLMarkupsNode
        events = {markups.PointPositionDefinedEvent: self.update, markups.PointRemovedEvent: self.follow_points,
                  markups.PointEndInteractionEvent: self.follow_points}
        self.observers += [(node, node.AddObserver(event, lambda caller, _event, react=react: react()))
                           for node in self.points.values() for event, react in events.items()]

    def _points_now(self, positive: bool) -> list[tuple[bool, str, tuple]]:
        """The points of one list as they are now: (include?, point ID, RAS position)."""
        node, ras = self.points[positive], [0.0, 0.0, 0.0]
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

    def _correct(self, current) -> None:
        """Correct the segment, ``current`` as it is now, with every point in ``clicks``; saved in the
        history first."""
        clicks = [Click(to_voxel(self.volume, list(ras), "RAS"), positive) for positive, _, ras in self.clicks]
        corrected = refine(self.volume, current, clicks, reach_mm=self.reach_mm)
        self.history.SaveState()
        self._show(corrected)

    def _edited_elsewhere(self, current) -> bool:
        """Whether the segment (``current``) was changed since the last point, other than by points."""
        return self.after_points is not None and not np.array_equal(current, self.after_points)

    def _start_from(self, current) -> None:
        """Take ``current`` as the segment the points are replayed on when there are no points yet,
        or when it was edited elsewhere since the last point (the edit is then kept)."""
        if not self.clicks or self._edited_elsewhere(current):
            self.before_points = current

    def update(self) -> bool:
        """Re-segment with every point placed so far; False if there was no new point."""
        known = {(positive, point_id) for positive, point_id, _ in self.clicks}  # IDs are unique per list
        new = [point for positive in self.points for point in self._points_now(positive) if point[:2] not in known]
        if not new:
            return False
        current = self._segment()
        self._start_from(current)
        self.clicks += new
        self._correct(current)
        return True

    def follow_points(self) -> bool:
        """After points were removed or moved: back to the segment as it was before the first point
        (or as edited elsewhere since the last one), then corrected again with the remaining points,
        in the order they were placed, at their positions now. False if every point is where it was."""
        now = {point[:2]: point for positive in self.points for point in self._points_now(positive)}
        remaining = [now[click[:2]] for click in self.clicks if click[:2] in now]
        if remaining == self.clicks:
            return False
        self._start_from(self._segment())
        self._show(self.before_points)
        self.clicks = []
        for point in remaining:
            self.clicks.append(point)
            self._correct(self.after_points)
        return True

    def undo(self) -> bool:
        """Restore the segment as it was before the last point, and remove that point; False if there
        is none, or if the segment was edited elsewhere since (undoing the point would undo the edit)."""
        if not self.clicks or not self.history.IsRestorePreviousStateAvailable() or self._edited_elsewhere(self._segment()):
            return False
        self.history.RestorePreviousState()
        positive, point_id, _ = self.clicks.pop()
        node = self.points[positive]
        node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(point_id))  # already followed: no change
        self.after_points = self._segment()
        return True

    def end(self, scene) -> None:
        """Stop following the points and remove their lists from the scene (the corrected segment
        stays): points left behind would otherwise put the segment back to its state before them."""
        for node, tag in self.observers:
            node.RemoveObserver(tag)
        self.observers = []
        for node in self.points.values():
            scene.RemoveNode(node)
