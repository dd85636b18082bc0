"""Write a segmentation as a DICOM Segmentation object (DICOM-SEG) that refers to the DICOM series
it was made from, so that it can be stored in a PACS beside the images and opened by DICOM viewers
(3D Slicer reads it with its QuantitativeReporting extension), and beside it a DICOM SR measurement
report (TID 1500, the form QuantitativeReporting and PACS viewers read) of each segment's volume and
each lesion's (or lesion part's) axial long and short axes. Uses highdicom (the ``dicom`` extra).

Each of the card's labels is one segment (numbered 1, 2, ... in the card's order), with the label's
SNOMED CT category and type, its colour, and the model as the segmenting algorithm ("AUTOMATIC").
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from . import __version__
from .dataset import GENERIC_TISSUE
from .errors import AIReconstructError, InputError, OutputError
from .io import atomic_path
from .measurements import lesion_axes
from .modelcard import Label, ModelCard
from .volume import LPS_TO_RAS, Volume


def series_folder_of(path: str | os.PathLike) -> Path:
    """The DICOM series folder a DICOM-SEG will refer to; a one-line error for any other input."""
    path = Path(path)
    if not path.is_dir():
        raise InputError("DICOM-SEG refers to the input's DICOM images: give the input as a DICOM series folder")
    return path


def _source_images(folder: Path, labelmap: Volume) -> list:
    """The series' DICOM datasets in ``folder``, one for each slice ``k`` of ``labelmap`` in that
    order, matched by position (the segmentation lies on the series' own grid)."""
    import pydicom

    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in dataset:
            datasets.append(dataset)
    if len({dataset.SeriesInstanceUID for dataset in datasets}) != 1:
        raise InputError(f"{folder.name} does not hold exactly one DICOM series to refer to")
    positions = np.array([[float(v) for v in dataset.ImagePositionPatient] for dataset in datasets])
    ordered = []
    for k in range(labelmap.array.shape[0]):
        expected = np.asarray(labelmap.origin) + labelmap.direction[:, 2] * labelmap.spacing[2] * k
        distances = np.linalg.norm(positions - expected, axis=1)
        nearest = int(np.argmin(distances))
        if distances[nearest] > 0.01 * min(labelmap.spacing):
            raise InputError(f"The DICOM series in {folder.name} has no slice at the segmentation's slice {k}")
        ordered.append(datasets[nearest])
    return ordered


def _coded(terminology: dict, key: str):
    """A highdicom coded concept from a card label's ``[scheme, code, meaning]`` entry; a label
    without codes is generic tissue."""
    from highdicom.sr import CodedConcept

    scheme, code, meaning = terminology.get(key) or GENERIC_TISSUE[key]
    return CodedConcept(value=code, scheme_designator=scheme, meaning=meaning)


def _segment_descriptions(labels: list[Label], card: ModelCard) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=card.name, version=str(card.data.get("version", "")),
                                                   family=codes.cid7162.ArtificialIntelligence)
    return [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label.name[:64],
        segmented_property_category=_coded(label.terminology, "category"),
        segmented_property_type=_coded(label.terminology, "type"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in label.color)),
    ) for number, label in enumerate(labels, start=1)]


def _dicom_segmentation(labelmap: Volume, card: ModelCard, series_folder: Path):
    """The DICOM-SEG of ``labelmap`` (the card's labels as segments 1, 2, ...), the series' images it
    refers to, and the labels in segment order."""
    import highdicom as hd

    sources = _source_images(series_folder, labelmap)
    labels = sorted(card.labels, key=lambda label: label.value)
    numbering = np.zeros(max(int(labelmap.array.max(initial=0)), labels[-1].value) + 1, np.uint16)
    for number, label in enumerate(labels, start=1):
        numbering[label.value] = number  # values the card does not name stay background
    try:
        segmentation = hd.seg.Segmentation(
            source_images=sources, pixel_array=numbering[labelmap.array],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(labels, card),
            series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="AIReconstruct",
            manufacturer_model_name=card.name[:64], software_versions=__version__, device_serial_number="none",
            series_description=f"AIReconstruct {card.name}"[:64], content_label="AIRECONSTRUCT",
            content_description=str(card.data.get("intended_use", ""))[:64],
        )
    except ValueError as error:  # source images that the standard's SEG cannot refer to
        raise InputError(f"Cannot make a DICOM-SEG for the series in {series_folder.name}: "
                         f"{' '.join(str(error).split())}") from None
    return segmentation, sources, labels


def _line_coordinates(ends_lps: np.ndarray, sources: list, labelmap: Volume):
    """A line's coordinates for a TID 300 measurement: on the source image it lies in (SCOORD, in
    that image's pixels: the form most DICOM viewers draw) where both ends lie on one slice of the
    series, else as two points in the scan's patient coordinates (SCOORD3D)."""
    import highdicom as hd

    ijk = (np.linalg.inv(labelmap.ijk_to_lps()) @ np.c_[ends_lps, np.ones(2)].T)[:3].T
    k = np.rint(ijk[:, 2])
    if k[0] == k[1] and np.abs(ijk[:, 2] - k).max() < 0.01 and 0 <= k[0] < len(sources):
        return hd.sr.CoordinatesForMeasurement(  # (column, row), a pixel's centre at +0.5
            hd.sr.GraphicTypeValues.POLYLINE, ijk[:, :2] + 0.5, hd.sr.SourceImageForRegion.from_source_image(sources[int(k[0])]))
    return hd.sr.CoordinatesForMeasurement3D(hd.sr.GraphicTypeValues3D.POLYLINE, ends_lps, sources[0].FrameOfReferenceUID)


LATERALITIES = {"7771000", "24028007", "51440002"}  # SNOMED CT left, right, bilateral (DICOM CID 244)


def _finding_site(organ: str | None, labels_by_name: dict[str, Label]):
    """The organ a lesion lies in (its ``organ`` in the measurements) as a finding site: the organ
    label's SNOMED CT type, with its laterality where its modifier is one, or the liver that its
    Couinaud segments make up together; none where it lies in no organ or the organ has no code."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if organ is None:
        return None
    if organ not in labels_by_name:  # the liver of its Couinaud segments, which is no label of its own
        return hd.sr.FindingSite(codes.SCT.Liver)
    terminology = labels_by_name[organ].terminology
    if not terminology.get("type"):
        return None
    modifier = terminology.get("type_modifier")
    return hd.sr.FindingSite(_coded(terminology, "type"), laterality=_coded(terminology, "type_modifier")
                             if modifier and modifier[1] in LATERALITIES else None)


def _axes_groups(sources: list, labelmap: Volume, by_name: dict[str, Label], measured: dict, algorithm) -> list:
    """TID 1501 measurement groups of the lesions' axial long and short axes (``measured``: the
    report's measurements; ``by_name``: the card's labels by name) and their mean: one for each
    lesion, or for each part of a lesion label of several, each axis inferred from its own line
    (:func:`_line_coordinates`), named after the lesion (and the part's number, largest first),
    typed as its segment and sited in the organ it (or the part) lies in."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    to_lps = LPS_TO_RAS if measured["coordinates"] == "RAS" else np.eye(3)  # its own inverse
    groups = []
    for lesion, part, axes in lesion_axes(measured["lesions"]):
        name = lesion["name"] if part is None else f"{lesion['name']}, part {part['number']}"
        measurements = [hd.sr.Measurement(
            name=code, value=float(axes[f"{key}_axis_mm"]), unit=codes.UCUM.Millimeter, algorithm_id=algorithm,
            referenced_coordinates=[_line_coordinates(np.asarray(axes[f"{key}_axis_ends_mm"]) @ to_lps, sources, labelmap)])
            for code, key in ((codes.SCT.LongAxis, "long"), (codes.SCT.ShortAxis, "short"))]
        measurements.append(hd.sr.Measurement(name=codes.SCT.Diameter, derivation=codes.SCT.Mean, algorithm_id=algorithm,
                                              value=float(axes["mean_diameter_mm"]), unit=codes.UCUM.Millimeter))
        site = _finding_site((part or lesion)["organ"], by_name)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=name[:64]),
            finding_type=_coded(by_name[lesion["name"]].terminology, "type"), finding_sites=[site] if site else None,
            measurements=measurements))
    return groups


def _measurement_report(segmentation, sources: list, labels: list[Label], labelmap: Volume, card: ModelCard,
                        measured: dict | None):
    """A DICOM SR measurement report (TID 1500) of the DICOM-SEG ``segmentation``: for each segment
    present, its volume; with ``measured`` (the report's measurements), a lesion segment's organ as
    its finding site and each lesion's (or lesion part's) axial long and short axes
    (:func:`_axes_groups`); the model as the observing device and the measurements' algorithm."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    millilitre = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
    algorithm = hd.sr.AlgorithmIdentification(name=card.name[:64], version=str(card.data.get("version", "")))
    counts = np.bincount(labelmap.array.ravel(), minlength=labels[-1].value + 1)
    by_name = {label.name: label for label in labels}
    lesion_sites = {lesion["name"]: _finding_site(lesion["organ"], by_name) for lesion in (measured or {}).get("lesions", [])}
    groups = []
    for number, label in enumerate(labels, start=1):
        if not counts[label.value]:
            continue
        site = lesion_sites.get(label.name)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label.name[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=number, source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)),
            finding_type=_coded(label.terminology, "type"), finding_sites=[site] if site else None,
            measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=float(counts[label.value]) * labelmap.voxel_volume_ml,
                                            unit=millilitre, algorithm_id=algorithm)]))
    if measured:
        groups += _axes_groups(sources, labelmap, by_name, measured, algorithm)
    device = hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=(
        hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="AIReconstruct", manufacturer_name="AIReconstruct",
                                                  model_name=card.name[:64])))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, segmentation], content=report, series_instance_uid=hd.UID(),
        series_number=int(segmentation.SeriesNumber) + 1, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="AIReconstruct", series_description=f"AIReconstruct {card.name} measurements"[:64])


def write_dicom_seg(labelmap: Volume, card: ModelCard, series_folder: str | os.PathLike, path: str | os.PathLike,
                    report_path: str | os.PathLike | None = None, measured: dict | None = None) -> Path:
    """Write ``labelmap`` (on the grid of the DICOM series in ``series_folder``) with the card's
    labels as a DICOM-SEG file that refers to that series' images, and with ``report_path`` a DICOM
    SR measurement report of its segments (see :func:`_measurement_report`); atomically."""
    if importlib.util.find_spec("highdicom") is None:
        raise AIReconstructError("DICOM-SEG output needs highdicom: pip install 'aireconstructlib[dicom]'")
    series_folder, path = series_folder_of(series_folder), Path(path)
    segmentation, sources, labels = _dicom_segmentation(labelmap, card, series_folder)
    written = [(segmentation, path)]
    if report_path is not None:
        written.append((_measurement_report(segmentation, sources, labels, labelmap, card, measured), Path(report_path)))
    for dataset, target in written:
        try:
            with atomic_path(target) as tmp:
                dataset.save_as(tmp)
        except OSError as error:
            raise OutputError(f"Cannot write {target}: {error.strerror or error}") from None
    return path
