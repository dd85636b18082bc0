"""The .seg.nrrd writer: Slicer's keys, terminology and the input's geometry."""

import nrrd
import numpy as np
import pytest

from AIReconstructLib.errors import InputError
from AIReconstructLib.modelcard import Label, load_card
from AIReconstructLib.segnrrd import (made_by, read_seg_nrrd, read_segmentation, terminology_from_string,
                                      terminology_string, write_seg_nrrd)
from AIReconstructLib.volume import Volume
from conftest import oblique_direction


def _labelmap():
    array = np.zeros((5, 6, 7), np.uint8)
    array[1:3, 2:4, 3:6] = 1
    array[4, 5, 6] = 2
    return Volume(array, (0.8, 1.1, 2.7), (10.0, -20.0, 30.0), oblique_direction())


def test_header_has_slicer_segment_fields(tmp_path, tiny_model):
    card = load_card(tiny_model)
    path = write_seg_nrrd(_labelmap(), card.labels, tmp_path / "case.seg.nrrd")
    data, header = nrrd.read(str(path))
    assert header["type"] in ("unsigned char", "uint8") and header["space"] == "left-posterior-superior"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert header["Segment0_Name"] == "organ" and header["Segment1_Name"] == "lesion"
    assert header["Segment0_LabelValue"] == "1" and header["Segment1_LabelValue"] == "2"
    assert header["Segment0_Layer"] == "0"
    assert header["Segment0_Color"] == "0.8 0.2 0.2"
    assert header["Segment0_Extent"] == "3 5 2 3 1 2"  # i range, j range, k range
    assert header["Segment1_Extent"] == "6 6 5 5 4 4"
    assert header["Segment0_Tags"] == (
        "Segmentation.Status:inprogress|TerminologyEntry:Segmentation category and type - DICOM master list"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^|")
    assert "TerminologyEntry" not in header["Segment1_Tags"]  # the lesion label has no codes


def test_geometry_equals_the_input(tmp_path, tiny_model):
    labelmap = _labelmap()
    path = write_seg_nrrd(labelmap, load_card(tiny_model).labels, tmp_path / "case.seg.nrrd")
    data, header = nrrd.read(str(path))
    np.testing.assert_allclose(header["space origin"], labelmap.origin)
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, labelmap.direction @ np.diag(labelmap.spacing))
    back, segments = read_seg_nrrd(path)
    np.testing.assert_array_equal(back.array, labelmap.array)
    assert back.same_grid(labelmap, tolerance=1e-9)
    assert [s["Name"] for s in segments] == ["organ", "lesion"]


def test_terminology_with_modifier_and_region():
    text = terminology_string({"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                               "type": ["SCT", "108369006", "Neoplasm"], "region": ["SCT", "10200004", "Liver"]})
    assert text.endswith("~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^")


def test_a_segments_own_terminology_is_read_back_and_slicers_default_for_a_new_segment_is_none(tmp_path):
    codes = {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
             "type": ["SCT", "108369006", "Neoplasm"], "region": ["SCT", "10200004", "Liver"]}
    assert terminology_from_string(terminology_string(codes)) == codes
    assert terminology_from_string("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue"
                                   "~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^") == {}
    assert terminology_from_string("not a terminology") == {}
    labels = [Label(1, "tumour", (1.0, 0.0, 0.0), codes, {}), Label(2, "notes", (0.0, 1.0, 0.0), {}, {})]
    path = write_seg_nrrd(_labelmap(), labels, tmp_path / "edited.seg.nrrd")
    _, read = read_segmentation(path)  # no model: each segment's terminology from the file itself
    assert [(label.name, label.terminology) for label in read] == [("tumour", codes), ("notes", {})]


def test_a_seg_nrrd_saved_cropped_to_its_segments_is_placed_on_its_image(tmp_path):
    """Slicer's "crop to minimum extent" saves only the segments' box: read on the image's grid it is
    placed where it belongs; a box off the grid's voxels or reaching outside the image is refused."""
    image = _labelmap().with_array(np.zeros((5, 6, 7), np.int16))
    full = _labelmap()
    labels = [Label(1, "organ", (1.0, 0.0, 0.0), {}, {}), Label(2, "lesion", (0.0, 1.0, 0.0), {}, {})]
    block = (slice(1, 5), slice(2, 6), slice(3, 7))  # [k, j, i]: every labelled voxel
    corner = full.ijk_to_lps() @ [3, 2, 1, 1]
    cropped = Volume(full.array[block].copy(), full.spacing, tuple(corner[:3]), full.direction)
    path = write_seg_nrrd(cropped, labels, tmp_path / "cropped.seg.nrrd")
    placed, _ = read_segmentation(path, like=image)
    np.testing.assert_array_equal(placed.array, full.array)
    assert placed.same_grid(image)
    for origin in (tuple(corner[:3] + 0.4), tuple(full.ijk_to_lps() @ [5, 4, 3, 1])[:3]):  # off the voxels; outside
        path = write_seg_nrrd(Volume(cropped.array, full.spacing, origin, full.direction), labels, tmp_path / "off.seg.nrrd")
        with pytest.raises(InputError, match="off.seg.nrrd does not match its image's grid"):
            read_segmentation(path, like=image)


def test_a_seg_nrrd_whose_header_cannot_be_parsed_is_refused_in_one_line(tmp_path):
    from test_bad_inputs import EMPTY_ORIGIN_NRRD

    path = tmp_path / "damaged.seg.nrrd"
    path.write_bytes(EMPTY_ORIGIN_NRRD)
    assert made_by(path) is None
    with pytest.raises(InputError, match="^Cannot read damaged.seg.nrrd as a segmentation"):
        read_segmentation(path)
