"""Reading and writing volumes: geometry round trips and bad inputs with one-line errors."""

import numpy as np
import pytest
import SimpleITK as sitk

from AIReconstructLib.errors import InputError, OutputError
from AIReconstructLib.io import (StagedOutput, find_cases, read_image_for_model, read_labelmap, read_volume,
                                 write_volume)
from AIReconstructLib.segnrrd import write_seg_nrrd
from AIReconstructLib.volume import Volume
from conftest import oblique_direction, write_dicom_series


def _oblique_volume(dtype=np.float32) -> Volume:
    rng = np.random.default_rng(1)
    array = rng.normal(size=(7, 9, 11)).astype(dtype)
    return Volume(array, (0.7, 1.3, 3.1), (12.5, -40.25, 101.0), oblique_direction())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_oblique_anisotropic_geometry_survives_round_trip(tmp_path, suffix):
    volume = _oblique_volume()
    path = write_volume(volume, tmp_path / f"image{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)


def test_ijk_to_ras_matrix_round_trip():
    volume = _oblique_volume()
    again = Volume.from_ijk_to_ras(volume.array, volume.ijk_to_ras())
    np.testing.assert_allclose(again.spacing, volume.spacing)
    np.testing.assert_allclose(again.origin, volume.origin)
    np.testing.assert_allclose(again.direction, volume.direction, atol=1e-12)
    # RAS and LPS differ by the sign of x and y only
    np.testing.assert_allclose(volume.ijk_to_ras()[:2], -volume.ijk_to_lps()[:2])


def test_dicom_series_folder(tmp_path):
    volume = Volume(np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5), (0.8, 0.8, 2.5), (-10.0, 20.0, 30.0))
    back = read_volume(write_dicom_series(tmp_path / "series", volume))
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)


def _error_of(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_truncated_file(tmp_path):
    path = write_volume(_oblique_volume(), tmp_path / "image.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "corrupt" in _error_of(lambda: read_volume(path))


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nrrd"
    path.write_text("hello, this is not an image", encoding="utf-8")
    assert "corrupt" in _error_of(lambda: read_volume(path))


def test_missing_file(tmp_path):
    assert "not found" in _error_of(lambda: read_volume(tmp_path / "nothing.nii.gz"))


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(path))
    assert "2D" in _error_of(lambda: read_volume(path))


def test_4d_image(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False), str(path))
    assert "4D" in _error_of(lambda: read_volume(path))


def test_4d_with_one_time_point_is_accepted(tmp_path):
    path = tmp_path / "single.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 4, 5, 6), np.float32), isVector=False), str(path))
    assert read_volume(path).array.shape == (4, 5, 6)


def test_rgb_image(tmp_path):
    path = tmp_path / "colour.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    assert "components" in _error_of(lambda: read_volume(path))


def test_blank_volume(tmp_path):
    path = write_volume(Volume(np.zeros((4, 5, 6), np.int16)), tmp_path / "blank.nii.gz")
    assert "blank" in _error_of(lambda: read_image_for_model(path))


def test_nan_voxels(tmp_path):
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    path = write_volume(Volume(array), tmp_path / "nan.nrrd")
    assert "2 NaN or infinite" in _error_of(lambda: read_volume(path))


def test_labelmap_on_another_grid(tmp_path):
    image = Volume(np.zeros((4, 5, 6), np.int16))
    labels = write_volume(Volume(np.zeros((4, 5, 7), np.uint8)), tmp_path / "labels.nii.gz")
    assert "does not match" in _error_of(lambda: read_labelmap(labels, like=image))


def test_labelmap_with_fractions(tmp_path):
    path = write_volume(Volume(np.full((4, 5, 6), 0.5, np.float32)), tmp_path / "soft.nii.gz")
    assert "non-integer" in _error_of(lambda: read_labelmap(path))


def test_staged_output_leaves_folder_unchanged_on_failure(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with StagedOutput(tmp_path / "out") as out:
            out.path("new.txt").write_text("half done", encoding="utf-8")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.txt"]
    with pytest.raises(RuntimeError):
        with StagedOutput(tmp_path / "fresh") as out:
            out.path("a.txt").write_text("x", encoding="utf-8")
            raise RuntimeError("boom")
    assert not (tmp_path / "fresh").exists()


def test_staged_output_commits_all_files(tmp_path):
    with StagedOutput(tmp_path / "out") as out:
        out.path("a.txt").write_text("a", encoding="utf-8")
        out.path("sub/b.txt").write_text("b", encoding="utf-8")
        written = out.commit()
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["a.txt", "sub/b.txt"]
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(OutputError):
        with StagedOutput(blocker / "sub"):
            pass


def test_read_voxels_are_a_read_only_view_that_outlives_the_image(tmp_path, ct_volume):
    """The reader lends ITK's buffer to numpy without a copy; the array keeps the image alive."""
    import gc

    path = write_volume(ct_volume, tmp_path / "ct.nrrd", compress=False)
    volume = read_volume(path)
    gc.collect()
    np.testing.assert_array_equal(volume.array, ct_volume.array)
    assert not volume.array.flags.writeable
    with pytest.raises(ValueError):
        volume.array[0, 0, 0] = 1  # inputs are never changed in place


def test_cases_of_a_folder(tmp_path):
    volume = _oblique_volume()
    for folder in ("single", "channels", "twice", "empty", "numbered", "imagesTs"):
        (tmp_path / folder).mkdir()
    single = tmp_path / "single"
    for name in ("b.nii.gz", "a.nrrd"):
        write_volume(volume, single / name)
    (single / "notes.txt").write_text("not an image")
    write_seg_nrrd(volume.with_array(np.ones((7, 9, 11), np.uint8)), [], single / "a_result.seg.nrrd")  # a result
    write_dicom_series(single / "c", Volume(np.zeros((3, 4, 5), np.int16), (1.0, 1.0, 2.0)))
    assert [(case, [p.name for p in paths]) for case, paths in find_cases(single, 1)] == [
        ("a", ["a.nrrd"]), ("b", ["b.nii.gz"]), ("c", ["c"])]  # a DICOM series folder is a case
    assert "CASE_0000, CASE_0001" in _error_of(lambda: find_cases(single, 2))
    for name in ("scan_5300.nii.gz", "scan_5301.nii.gz"):  # numbered scans, not channels of one case
        write_volume(volume, tmp_path / "numbered" / name)
    assert [case for case, _ in find_cases(tmp_path / "numbered", 1)] == ["scan_5300", "scan_5301"]
    for name in ("p1_0000.nii.gz", "p2_0000.nii.gz"):  # nnU-Net's names for one channel
        write_volume(volume, tmp_path / "imagesTs" / name)
    assert [case for case, _ in find_cases(tmp_path / "imagesTs", 1)] == ["p1", "p2"]

    channels = tmp_path / "channels"
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii.gz", "p2_0001.nii.gz"):
        write_volume(volume, channels / name)
    assert [(case, [p.name for p in paths]) for case, paths in find_cases(channels, 2)] == [
        ("p1", ["p1_0000.nii.gz", "p1_0001.nii.gz"]), ("p2", ["p2_0000.nii.gz", "p2_0001.nii.gz"])]
    (channels / "p2_0001.nii.gz").unlink()
    assert "p2_0000, p2_0001" in _error_of(lambda: find_cases(channels, 2))
    write_volume(volume, tmp_path / "twice" / "a.nii.gz")
    write_volume(volume, tmp_path / "twice" / "a.mha")
    assert "two images of case a" in _error_of(lambda: find_cases(tmp_path / "twice", 1))
    assert "no images" in _error_of(lambda: find_cases(tmp_path / "empty", 1))
    assert "not a folder" in _error_of(lambda: find_cases(tmp_path / "absent", 1))
