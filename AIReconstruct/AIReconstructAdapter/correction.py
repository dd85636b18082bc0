"""Correct one segment with include / exclude points placed on the slices (markups point lists).

Each newly placed point re-segments the segment near the points (the engine's ``refine``, a
fraction of a second) and updates it in place; the segmentation's history (the one the Segment
Editor uses) keeps every previous state, so ``undo`` restores the last one and forgets the last point.
"""

from __future__ import annotations

import slicer

from AIReconstructLib.interaction import Click, refine, to_voxel

from .nodes import segment_mask, set_segment_mask, volume_from_node

INCLUDE_COLOUR, EXCLUDE_COLOUR = (0.1, 0.8, 0.2), (0.9, 0.2, 0.1)


class SegmentCorrection:
    """Include / exclude point lists bound to one segment of a segmentation node."""

    def __init__(self, scene, segmentation_node, segment_id: str, volume_node, reach_mm: float = 20.0):
        self.segmentation_node, self.segment_id, self.volume_node = segmentation_node, segment_id, volume_node
        self.volume = volume_from_node(volume_node)
        self.reach_mm = reach_mm
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
        self.points = {True: self._point_list(scene, f"{name} include", INCLUDE_COLOUR),
                       False: self._point_list(scene, f"{name} exclude", EXCLUDE_COLOUR)}
        self.clicks: list[tuple[bool, int]] = []  # (include?, index in its list), in the order placed

    @staticmethod
    def _point_list(scene, name: str, colour):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*colour)
            display.SetColor(*colour)
        return node

    def observe(self) -> list:
        """Re-segment whenever a point is placed (in Slicer); returns the observer tags."""
        event = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        return [(node, node.AddObserver(event, lambda caller, _event: self.update())) for node in self.points.values()]

    def _new_clicks(self) -> None:
        for positive, node in self.points.items():
            known = sum(1 for p, _ in self.clicks if p == positive)
            self.clicks += [(positive, index) for index in range(known, node.GetNumberOfControlPoints())]

    def update(self) -> bool:
        """Re-segment with every point placed so far; False if there was no new point."""
        before = len(self.clicks)
        self._new_clicks()
        if len(self.clicks) == before:
            return False
        clicks = []
        for positive, index in self.clicks:
            ras = [0.0, 0.0, 0.0]
            self.points[positive].GetNthControlPointPositionWorld(index, ras)
            clicks.append(Click(to_voxel(self.volume, ras, "RAS"), positive))
        current = segment_mask(self.segmentation_node, self.segment_id, self.volume_node)
        corrected = refine(self.volume, current, clicks, reach_mm=self.reach_mm)
        self.history.SaveState()
        set_segment_mask(self.segmentation_node, self.segment_id, self.volume_node, corrected)
        return True

    def undo(self) -> bool:
        """Restore the segment as it was before the last point, and remove that point."""
        if not self.clicks or not self.history.IsRestorePreviousStateAvailable():
            return False
        self.history.RestorePreviousState()
        positive, index = self.clicks.pop()
        node = self.points[positive]
        was = node.GetDisableModifiedEvent()
        node.SetDisableModifiedEvent(True)  # removing a point is not placing one
        node.RemoveNthControlPoint(index)
        node.SetDisableModifiedEvent(was)
        return True

    def remove(self, scene) -> None:
        """Remove the point lists from the scene (the corrected segment stays)."""
        for node in self.points.values():
            scene.RemoveNode(node)
