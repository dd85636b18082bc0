"""DICOM-SEG output: a segmentation that refers to its DICOM series, read back with highdicom."""

import json

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
    assert "DICOM-SEG" in json.loads((out / "series_summary.json").read_text(encoding="utf-8"))["seconds"]
    nifti = write_volume(ct_volume, tmp_path / "ct.nii.gz")
    capsys.readouterr()
    assert main(["segment", str(nifti), "-m", str(tiny_model), "-o", str(tmp_path / "no"), "--dicom-seg"]) == 2
    assert "give the input as a DICOM series folder" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
