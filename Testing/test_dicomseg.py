"""DICOM-SEG output: a segmentation that refers to its DICOM series, read back with highdicom."""

import json
import shutil
import subprocess

import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="highdicom (the dicom extra) is not installed")
import pydicom  # noqa: E402  (highdicom's own dependency)

from AIReconstructLib.cli import main  # noqa: E402
from AIReconstructLib.dicomseg import write_dicom_seg  # noqa: E402
from AIReconstructLib.errors import InputError  # noqa: E402
from AIReconstructLib.io import read_labelmap, read_volume, write_volume  # noqa: E402
from AIReconstructLib.modelcard import load_card  # noqa: E402
from AIReconstructLib.volume import Volume  # noqa: E402
from conftest import tiny_card, write_dicom_series, write_model  # noqa: E402


@pytest.fixture
def series(tmp_path, ct_volume):
    return write_dicom_series(tmp_path / "series", ct_volume)


def _labels_per_slice(seg_path, series_folder, count: int) -> np.ndarray:
    """The SEG's segments as one label array, slice by slice of the series sorted along z."""
    sources = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in series_folder.iterdir()),
                     key=lambda dataset: float(dataset.ImagePositionPatient[2]))
    assert len(sources) == count
    return hd.seg.segread(seg_path).get_pixels_by_source_instance(
        [dataset.SOPInstanceUID for dataset in sources], combine_segments=True, assert_missing_frames_are_empty=True)


def test_dicom_seg_refers_to_its_series_with_the_cards_segments(tmp_path, series):
    card = tiny_card()
    card["labels"][1]["value"] = 5  # label values need not be consecutive: segments are numbered 1, 2
    card = load_card(write_model(tmp_path / "model", card))
    image = read_volume(series)
    labels = np.zeros(image.array.shape, np.uint8)
    labels[4:12, 10:30, 12:36] = 1
    labels[6:8, 15:20, 20:25] = 5
    labels[0, 0, 0] = 3  # a value the card does not name stays background
    path = write_dicom_seg(image.with_array(labels), card, series, tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "lesion"]
    organ, lesion = seg.SegmentSequence
    assert organ.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # the card's SNOMED CT code
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # no codes in the card
    assert organ.SegmentAlgorithmType == "AUTOMATIC" and organ.SegmentAlgorithmName == "tiny-test-model"
    expected = np.select([labels == 1, labels == 5], [1, 2], 0)
    np.testing.assert_array_equal(_labels_per_slice(path, series, labels.shape[0]), expected)


def _measurement_groups(sr_path, series_folder=None) -> tuple:
    """The SR, its volumetric measurement groups' volumes by the segment number they refer to, and
    its groups of lesion axes by their tracking identifier: {name: {"long": (length, its line in
    LPS, "SCOORD" or "SCOORD3D"), "short": (the same), "mean": the mean diameter, "sites": the
    finding sites' (code, laterality's meaning or None)}}; lines drawn on a source image are taken to
    LPS through that image of ``series_folder``."""
    from pydicom.sr.codedict import codes

    sr = hd.sr.srread(sr_path)
    report = hd.sr.MeasurementReport.from_sequence([sr])  # the SR document is the root content item
    volumes = {group.referenced_segment.referenced_segment_numbers[0]: [m.value for m in group.get_measurements()]
               for group in report.get_volumetric_roi_measurement_groups()}
    sources = {} if series_folder is None else {
        dataset.SOPInstanceUID: dataset for dataset in (pydicom.dcmread(p, stop_before_pixels=True) for p in series_folder.iterdir())}
    axes = {}
    for group in report.get_image_measurement_groups():
        (long,), (short,), (mean,) = (group.get_measurements(name=code) for code in
                                      (codes.SCT.LongAxis, codes.SCT.ShortAxis, codes.SCT.Diameter))
        assert mean.derivation == codes.SCT.Mean
        sites = [(site.value.value, site.laterality.meaning if site.laterality else None) for site in group.finding_sites]
        axes[group.tracking_identifier] = {"mean": mean.value, "sites": sites, **{
            key: (measurement.value, *_line_in_lps(measurement.referenced_coordinates[0], sources))
            for key, measurement in (("long", long), ("short", short))}}
    return sr, volumes, axes


def _line_in_lps(coordinates, sources: dict) -> tuple[np.ndarray, str]:
    """A measurement's line in patient coordinates (LPS), and whether it was given on an image."""
    if coordinates.ValueType == "SCOORD3D":
        return np.asarray(coordinates.value), "SCOORD3D"
    image = sources[coordinates.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
    along_row, along_column = np.reshape(np.asarray(image.ImageOrientationPatient, float), (2, 3))
    between_rows, between_columns = map(float, image.PixelSpacing)
    centres = np.asarray(coordinates.value) - 0.5  # (column, row) from the top left corner: pixel centres
    return (np.asarray(image.ImagePositionPatient, float) + np.outer(centres[:, 0] * between_columns, along_row)
            + np.outer(centres[:, 1] * between_rows, along_column)), "SCOORD"


def _card_with_a_lesion(tmp_path):
    """The tiny test model's card with its second label a mass (a lesion, which is measured)."""
    card = tiny_card()
    card["labels"][1]["terminology"] = {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                                        "type": ["SCT", "4147007", "Mass"]}
    return load_card(write_model(tmp_path / "model", card))


def test_a_measurement_report_refers_to_the_segments_with_their_volumes_and_a_lesions_axes(tmp_path, series):
    """Beside the DICOM-SEG, a DICOM SR (TID 1500) gives each segment present its volume, each group
    referring to its segment of the SEG, and a lesion its axial long and short axes (the report's
    measurements), each along its line, and their mean, in a group of its own; the model as the
    observing device."""
    from AIReconstructLib.measurements import measure

    card = _card_with_a_lesion(tmp_path)
    image = read_volume(series)
    labels = np.zeros(image.array.shape, np.uint8)
    labels[2:14, 8:32, 10:38] = 1
    labels[6:10, 15:23, 18:28] = 2
    labelmap = image.with_array(labels)
    measured = measure(labelmap, card.labels)
    write_dicom_seg(labelmap, card, series, tmp_path / "seg.dcm", tmp_path / "sr.dcm", measured)
    sr, volumes, axes = _measurement_groups(tmp_path / "sr.dcm", series)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.SeriesInstanceUID != seg.SeriesInstanceUID
    assert seg.SOPInstanceUID in {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                                  for study in sr.CurrentRequestedProcedureEvidenceSequence
                                  for item in study.ReferencedSeriesSequence}
    voxel_ml = image.voxel_volume_ml
    assert {number: volume for number, (volume,) in volumes.items()} == pytest.approx(
        {1: (labels == 1).sum() * voxel_ml, 2: (labels == 2).sum() * voxel_ml})  # segments: volume only
    (lesion,) = measured["lesions"]
    (name, group), = axes.items()
    assert name == lesion["name"]
    _assert_axes_as_measured(group, lesion["axial_axes"], np.eye(3))  # LPS, as measured
    assert group["long"][2] == group["short"][2] == "SCOORD"  # an axial series: drawn on its slice
    assert lesion["organ"] == "organ" and group["sites"] == [("10200004", None)]  # in the segment coded Liver
    segment_sites = {group.referenced_segment.referenced_segment_numbers[0]: [site.value.value for site in group.finding_sites]
                     for group in hd.sr.MeasurementReport.from_sequence([sr]).get_volumetric_roi_measurement_groups()}
    assert segment_sites == {1: [], 2: ["10200004"]}  # the lesion segment's volume is sited too

    write_dicom_seg(image.with_array(np.where(labels == 2, 0, labels)), card, series, tmp_path / "seg2.dcm",
                    tmp_path / "sr2.dcm")
    assert list(_measurement_groups(tmp_path / "sr2.dcm")[1]) == [1]  # only segments present are measured


def test_each_part_of_a_lesion_label_has_its_axes_in_the_measurement_report(tmp_path, series):
    """Several lesions in one label (lung nodules, metastases): each part measured gets its own
    group, named by its number (largest first), its axes' lines in the scan's patient coordinates
    (LPS) also where the measurements were taken in RAS, and sited in the organ that part lies in
    (with the organ's laterality), or in none outside it."""
    from AIReconstructLib.measurements import measure

    card = _card_with_a_lesion(tmp_path)
    card.labels[0].terminology["type"], card.labels[0].terminology["type_modifier"] = \
        ["SCT", "64033007", "Kidney"], ["SCT", "7771000", "Left"]
    image = read_volume(series)
    labels = np.zeros(image.array.shape, np.uint8)
    labels[2:14, 4:19, 4:30] = 1
    labels[4:10, 8:16, 8:20] = 2  # in the organ
    labels[5:9, 21:27, 18:24] = 2  # beside it
    labelmap = image.with_array(labels)
    measured = measure(labelmap, card.labels, coordinates="RAS")
    write_dicom_seg(labelmap, card, series, tmp_path / "seg.dcm", tmp_path / "sr.dcm", measured)
    _, _, axes = _measurement_groups(tmp_path / "sr.dcm", series)
    (lesion,) = measured["lesions"]
    assert [part["number"] for part in lesion["parts"]] == [1, 2] and "axial_axes" not in lesion
    assert list(axes) == [f"{lesion['name']}, part 1", f"{lesion['name']}, part 2"]
    for part, group in zip(lesion["parts"], axes.values()):
        _assert_axes_as_measured(group, part["axial_axes"], np.diag([-1.0, -1.0, 1.0]))  # RAS measured, LPS written
    assert axes[f"{lesion['name']}, part 1"]["long"][0] > axes[f"{lesion['name']}, part 2"]["long"][0]
    assert [part["organ"] for part in lesion["parts"]] == ["organ", None]
    assert [group["sites"] for group in axes.values()] == [[("64033007", "Left")], []]


def test_a_lesion_between_couinaud_segments_is_sited_in_the_liver(tmp_path, series):
    """The liver that its Couinaud segments make up is no label of its own: a lesion in it is sited
    in the liver (SNOMED CT 10200004)."""
    from AIReconstructLib.measurements import measure

    card = tiny_card()
    card["labels"] = [{"value": value, "name": name, "color": [0.5, 0.5, 0.5]}
                      for value, name in ((1, "liver_segment_7"), (2, "liver_segment_8"), (3, "tumour"))]
    card["labels"][2]["terminology"] = {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                                        "type": ["SCT", "4147007", "Mass"]}
    card = load_card(write_model(tmp_path / "model", card))
    image = read_volume(series)
    labels = np.zeros(image.array.shape, np.uint8)
    labels[2:14, 4:30, 4:17], labels[2:14, 4:30, 17:30], labels[6:10, 12:20, 12:22] = 1, 2, 3
    measured = measure(image.with_array(labels), card.labels)
    write_dicom_seg(image.with_array(labels), card, series, tmp_path / "seg.dcm", tmp_path / "sr.dcm", measured)
    (group,) = _measurement_groups(tmp_path / "sr.dcm", series)[2].values()
    assert measured["lesions"][0]["organ"] == "liver" and group["sites"] == [("10200004", None)]


def test_axes_across_the_slices_of_a_coronal_series_are_given_in_patient_coordinates(tmp_path, ct_volume):
    """On a coronal series the axial slice planes cut across its images: a line not on one image is
    written as two points in patient coordinates (SCOORD3D) instead of on an image."""
    from AIReconstructLib.measurements import measure

    series = _coronal_series(tmp_path, ct_volume)
    labelmap = _coronal_labels(read_volume(series))
    card = _card_with_a_lesion(tmp_path)
    measured = measure(labelmap, card.labels)
    write_dicom_seg(labelmap, card, series, tmp_path / "seg.dcm", tmp_path / "sr.dcm", measured)
    (lesion,) = measured["lesions"]
    (group,) = _measurement_groups(tmp_path / "sr.dcm", series)[2].values()
    _assert_axes_as_measured(group, lesion["axial_axes"], np.eye(3))
    assert group["long"][2] == "SCOORD3D"


def _coronal_series(tmp_path, ct_volume):
    coronal = Volume(ct_volume.array, ct_volume.spacing, ct_volume.origin, np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]))
    series = write_dicom_series(tmp_path / "coronal", coronal)
    np.testing.assert_allclose(read_volume(series).direction, coronal.direction, atol=1e-6)
    return series


def _coronal_labels(image: Volume) -> Volume:
    """A segment with a lesion inside whose longest axial axis runs across the coronal images."""
    labels = np.zeros(image.array.shape, np.uint8)
    labels[2:22, 8:32, 10:38] = 1
    labels[4:20, 15:23, 20:26] = 2  # longest from slice to slice: along the series' slice axis
    return image.with_array(labels)


@pytest.mark.skipif(not (shutil.which("dciodvfy") and shutil.which("dcentvfy")),
                    reason="dicom3tools' validators are not installed (make test installs Debian's dicom3tools as root)")
@pytest.mark.parametrize("orientation", ["axial", "coronal"])
def test_the_seg_and_the_measurement_report_pass_dicom3tools_validators(tmp_path, ct_volume, orientation):
    """David Clunie's dicom3tools find nothing to report: dciodvfy checks the SEG and the SR against
    their IODs (the lesion's lines on an image of an axial series, in patient coordinates for a
    coronal one), dcentvfy that the series, its SEG and its SR agree on patient, study and frame of
    reference."""
    from AIReconstructLib.measurements import measure

    if orientation == "axial":
        series = write_dicom_series(tmp_path / "axial", ct_volume)
        labels = np.zeros(ct_volume.array.shape, np.uint8)
        labels[2:14, 8:32, 10:38], labels[6:10, 15:23, 18:28] = 1, 2
        labelmap = read_volume(series).with_array(labels)
    else:
        series = _coronal_series(tmp_path, ct_volume)
        labelmap = _coronal_labels(read_volume(series))
    card = _card_with_a_lesion(tmp_path)
    write_dicom_seg(labelmap, card, series, tmp_path / "seg.dcm", tmp_path / "sr.dcm", measure(labelmap, card.labels))
    for path in ("seg.dcm", "sr.dcm"):
        checked = subprocess.run(["dciodvfy", str(tmp_path / path)], capture_output=True, text=True)
        findings = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith(("Error", "Warning"))]
        assert not findings, f"dciodvfy on the {path}:\n" + "\n".join(findings)
    slices = sorted(str(path) for path in series.iterdir())
    checked = subprocess.run(["dcentvfy", str(tmp_path / "seg.dcm"), str(tmp_path / "sr.dcm"), *slices],
                             capture_output=True, text=True)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "dcentvfy on the series, its SEG and its SR:\n" + "\n".join(errors[:20])


def _assert_axes_as_measured(group: dict, axes: dict, to_lps: np.ndarray) -> None:
    """A group of the SR holds the measured axes, each along its own line, and their mean."""
    for key in ("long", "short"):
        assert group[key][0] == pytest.approx(axes[f"{key}_axis_mm"])
        np.testing.assert_allclose(group[key][1], np.asarray(axes[f"{key}_axis_ends_mm"]) @ to_lps, atol=0.01)
    assert group["mean"] == pytest.approx((axes["long_axis_mm"] + axes["short_axis_mm"]) / 2)


def test_dicom_seg_needs_the_series_the_segmentation_lies_on(tmp_path, series, tiny_model):
    image = read_volume(series)
    card = load_card(tiny_model)
    shifted = Volume(np.zeros(image.array.shape, np.uint8), image.spacing,
                     tuple(np.asarray(image.origin) + [0, 0, 0.5 * image.spacing[2]]), image.direction)
    with pytest.raises(InputError, match="has no slice at the segmentation's slice 0"):
        write_dicom_seg(shifted, card, series, tmp_path / "seg.dcm")
    with pytest.raises(InputError, match="give the input as a DICOM series folder"):
        write_dicom_seg(image.with_array(np.zeros(image.array.shape, np.uint8)), card, tmp_path / "absent",
                        tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_segment_writes_a_dicom_seg_of_its_dicom_input(tmp_path, series, tiny_model, ct_volume, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(series), "-m", str(tiny_model), "-o", str(out), "--device", "cpu", "--dicom-seg"]) == 0
    labels = read_labelmap(out / "series_labels.nii.gz").array
    np.testing.assert_array_equal(_labels_per_slice(out / "series_seg.dcm", series, labels.shape[0]), labels)
    summary = json.loads((out / "series_summary.json").read_text(encoding="utf-8"))
    assert "DICOM-SEG" in summary["seconds"]
    names = {label.value: label.name for label in load_card(tiny_model).labels}
    _, volumes, _ = _measurement_groups(out / "series_sr.dcm")  # the volumes the summary gives, in the SR
    assert {names[number]: volume for number, (volume,) in volumes.items()} == pytest.approx(
        {name: volume for name, volume in summary["volumes_ml"].items() if volume > 0})
    nifti = write_volume(ct_volume, tmp_path / "ct.nii.gz")
    capsys.readouterr()
    assert main(["segment", str(nifti), "-m", str(tiny_model), "-o", str(tmp_path / "no"), "--dicom-seg"]) == 2
    assert "give the input as a DICOM series folder" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
