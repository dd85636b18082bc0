"""Write a segmentation's result set into a staged output folder.

``<stem>.seg.nrrd`` (Slicer), ``<stem>_labels.nii.gz`` (NIfTI label map), optional meshes under
``surfaces/`` and ``<stem>_summary.json`` (per-segment volumes, mesh measurements, timings).
"""

from __future__ import annotations

import json
import time

from .io import StagedOutput, write_volume
from .metrics import label_volumes_ml
from .pipeline import Segmentation
from .segnrrd import write_seg_nrrd


def export_surfaces(segmentation_labelmap, labels, out: StagedOutput, formats, smoothing: float = 0.5,
                    decimate: float = 0.0, coordinates: str = "LPS", folder: str = "surfaces") -> dict:
    """Build every label's surface in one pass and write it in each format; returns measurements."""
    from .surfaces import extract_surfaces, mesh_file_name, mesh_measurements, write_mesh  # VTK: only for meshes

    measurements = {}
    for surface in extract_surfaces(segmentation_labelmap, labels, smoothing, decimate, coordinates):
        for suffix in formats:
            write_mesh(surface.polydata, out.path(f"{folder}/{mesh_file_name(surface.label.name, suffix)}"))
        measurements[surface.label.name] = mesh_measurements(surface.polydata)
    return measurements


def export_segmentation(segmentation: Segmentation, out: StagedOutput, stem: str, surface_formats=(),
                        smoothing: float = 0.5, decimate: float = 0.0, coordinates: str = "LPS") -> dict:
    """Write the label map, the ``.seg.nrrd``, meshes (if formats are given) and a summary."""
    labels = segmentation.card.labels
    started = time.perf_counter()
    write_seg_nrrd(segmentation.labelmap, labels, out.path(f"{stem}.seg.nrrd"))
    write_volume(segmentation.labelmap, out.path(f"{stem}_labels.nii.gz"))
    seconds = dict(segmentation.seconds, write=time.perf_counter() - started)
    summary = {
        "model": segmentation.card.name,
        "intended_use": segmentation.card.data["intended_use"],
        "volumes_ml": label_volumes_ml(segmentation.labelmap, segmentation.label_names),
    }
    if surface_formats:
        started = time.perf_counter()
        summary["surfaces"] = export_surfaces(segmentation.labelmap, labels, out, surface_formats,
                                              smoothing, decimate, coordinates)
        summary["surface_coordinates"] = coordinates
        seconds["surfaces"] = time.perf_counter() - started
    summary["seconds"] = {key: round(value, 3) for key, value in seconds.items()}
    out.write_text(f"{stem}_summary.json", json.dumps(summary, indent=2))
    return summary
