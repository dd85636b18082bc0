"""Write a segmentation's result set into a staged output folder.

``<stem>.seg.nrrd`` (Slicer), ``<stem>_labels.nii.gz`` (NIfTI label map), optional meshes under
``surfaces/``, optional ``<stem>_uncertainty.nii.gz`` and ``<stem>_confidence.nii.gz``, an optional ``<stem>_report.html`` and
``<stem>_summary.json`` (per-segment volumes, confidence, flagged regions, mesh and surgical
measurements, timings).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from .io import StagedOutput, write_map, write_volume
from .measurements import lesion_parts
from .metrics import label_volumes_ml
from .pipeline import Segmentation
from .segnrrd import write_seg_nrrd


def export_surfaces(segmentation_labelmap, labels, out: StagedOutput, formats, smoothing: float = 0.5,
                    decimate: float = 0.0, coordinates: str = "LPS", folder: str = "surfaces",
                    stem: str = "surfaces", max_triangles: int | None = None) -> dict:
    """Build every label's surface in one pass and write it in each format: STL, PLY, VTP one file
    per segment, OBJ and GLB one scene ``<folder>/<stem>.obj|.glb``; returns the mesh measurements."""
    from .meshfiles import SCENE_FORMATS, mesh_file_name, write_mesh, write_scene  # VTK: only for meshes
    from .surfaces import extract_surfaces, mesh_measurements

    surfaces = extract_surfaces(segmentation_labelmap, labels, smoothing, decimate, coordinates, max_triangles)
    for suffix in formats:
        if suffix in SCENE_FORMATS:
            write_scene(surfaces, out.path(f"{folder}/{stem}{suffix}"))
        else:
            for surface in surfaces:
                write_mesh(surface.polydata, out.path(f"{folder}/{mesh_file_name(surface.label.name, suffix)}"))
    return {surface.label.name: mesh_measurements(surface.polydata) for surface in surfaces}


def export_segmentation(segmentation: Segmentation, out: StagedOutput, stem: str, surface_formats=(),
                        smoothing: float = 0.5, decimate: float = 0.0, coordinates: str = "LPS",
                        max_triangles: int | None = None, report_image=None, margin_mm: float = 10.0,
                        for_import: bool = False, dicom_series=None, options: dict | None = None) -> dict:
    """Write the label map, the ``.seg.nrrd``, meshes (if formats are given), the HTML report (if
    ``report_image``, the input, is given; its measurements go into the summary), a DICOM-SEG
    ``<stem>_seg.dcm`` referring to the input's images and a DICOM SR ``<stem>_sr.dcm`` of its
    segments' measurements (if ``dicom_series``, the input's DICOM series folder, is given) and a summary, which records the model's name and version and ``options``, the
    options the result was made with. ``for_import``: for a caller that imports the result at once
    (the Slicer module), only the ``.seg.nrrd``, uncompressed."""
    labels = segmentation.card.labels
    with ThreadPoolExecutor(1) as writer:  # the label files are written (outside the GIL) while the rest runs
        made_by = (segmentation.card.name, segmentation.card.data["version"])
        label_files = writer.submit(_write_label_files, segmentation.labelmap, labels, out, stem, for_import, made_by)
        seconds = dict(segmentation.seconds)
        summary = {
            "model": segmentation.card.name,
            "model_version": segmentation.card.data["version"],
            "intended_use": segmentation.card.data["intended_use"],
            "volumes_ml": label_volumes_ml(segmentation.labelmap, segmentation.label_names),
        }
        parts = lesion_parts(segmentation.labelmap, labels, coordinates)
        if parts:
            summary["lesion_parts"] = parts  # each lesion label's separate parts (metastases, nodules)
        if options is not None:
            summary["options"] = options
        if segmentation.peak_gpu_memory_mib is not None:
            summary["peak_gpu_memory_mib"] = round(segmentation.peak_gpu_memory_mib, 1)
        if segmentation.uncertainty is not None:
            from .uncertainty import flagged_regions

            write_map(segmentation.uncertainty, out.path(f"{stem}_uncertainty.nii.gz"))
            write_map(segmentation.probability, out.path(f"{stem}_confidence.nii.gz"))
            summary["confidence"] = segmentation.confidence
            summary["flagged_regions"] = flagged_regions(segmentation.uncertainty, coordinates=coordinates)
        if surface_formats:
            started = time.perf_counter()
            summary["surfaces"] = export_surfaces(segmentation.labelmap, labels, out, surface_formats, smoothing,
                                                  decimate, coordinates, stem=stem, max_triangles=max_triangles)
            summary["surface_coordinates"] = coordinates
            seconds["surfaces"] = time.perf_counter() - started
        if report_image is not None:
            from .report import build_report, write_report

            started = time.perf_counter()
            page, summary["measurements"] = build_report(report_image, segmentation.labelmap, labels,
                                                         segmentation.card.data, margin_mm=margin_mm,
                                                         coordinates=coordinates, uncertainty=segmentation.uncertainty,
                                                         confidence=segmentation.confidence, image_name=stem)
            write_report(page, out.path(f"{stem}_report.html"))
            seconds["report"] = time.perf_counter() - started
        if dicom_series is not None:
            from .dicomseg import write_dicom_seg

            started = time.perf_counter()
            write_dicom_seg(segmentation.labelmap, segmentation.card, dicom_series, out.path(f"{stem}_seg.dcm"),
                            out.path(f"{stem}_sr.dcm"), summary.get("measurements"))
            seconds["DICOM-SEG"] = time.perf_counter() - started
        seconds["write"] = label_files.result()
    summary["seconds"] = {key: round(value, 3) for key, value in seconds.items()}
    out.write_text(f"{stem}_summary.json", json.dumps(summary, indent=2))
    return summary


def _write_label_files(labelmap, labels, out: StagedOutput, stem: str, for_import: bool, made_by) -> float:
    """Write ``<stem>.seg.nrrd`` (recording ``made_by``: model name and version) and
    ``<stem>_labels.nii.gz`` (``for_import``: only the first, uncompressed); returns the seconds it took."""
    started = time.perf_counter()
    write_seg_nrrd(labelmap, labels, out.path(f"{stem}.seg.nrrd"), compress=not for_import, made_by=made_by)
    if not for_import:
        write_volume(labelmap, out.path(f"{stem}_labels.nii.gz"))
    return time.perf_counter() - started
