"""Every kind of bad input: one clear sentence, a non-zero exit, nothing written, nothing lost.

Each case builds its bad input in a temporary folder and runs the command line on it, with an
output folder that already holds an earlier result: afterwards that folder must be exactly as it
was and the error must be one line naming the problem.
"""

import dataclasses
import gzip
import json
import os
import pickle
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from AIReconstructLib.cli import main
from AIReconstructLib.errors import InputError
from AIReconstructLib.io import write_volume
from AIReconstructLib.modelcard import Label, sha256_of
from AIReconstructLib.segnrrd import write_seg_nrrd
from AIReconstructLib.volume import Volume
from conftest import PickleExploit, oblique_direction, tiny_card, write_dicom_series, write_model

CT = Volume(np.where(np.indices((12, 16, 20)).sum(0) % 7 == 0, -1000, 40).astype(np.int16), (2.0, 2.0, 3.0))


def _image(tmp, name="ct.nii.gz", volume=CT):
    return write_volume(volume, tmp / name)


def _truncated(suffix, compress=True):
    def make(tmp):
        path = write_volume(CT, tmp / f"cut{suffix}", compress=compress)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    return make


def _damaged(suffix):
    """A compressed image with one byte of its compressed data flipped (near the end, past any header)."""
    def make(tmp):
        path = write_volume(CT, tmp / f"flipped{suffix}", compress=True)
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
        return path
    return make


# a gzip NRRD whose "space origin" is empty, which pynrrd's header parser fails on with an IndexError
EMPTY_ORIGIN_NRRD = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nspace: left-posterior-superior\n"
                     b"space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: \nencoding: gzip\n\n"
                     + gzip.compress(np.arange(64, dtype=np.int16).tobytes()))


def _raw(name, content: bytes):
    def make(tmp):
        (tmp / name).write_bytes(content)
        return tmp / name
    return make


def _array(array, spacing=(1.0, 1.0, 1.0), name="bad.nrrd", is_vector=False):
    def make(tmp):
        image = sitk.GetImageFromArray(array, isVector=is_vector)
        image.SetSpacing(spacing[: image.GetDimension()] if len(spacing) >= image.GetDimension() else [1.0] * image.GetDimension())
        sitk.WriteImage(image, str(tmp / name))
        return tmp / name
    return make


def _nhdr(sizes, directions, name):
    def make(tmp):
        (tmp / f"{name}.raw").write_bytes(bytes(2 * 64))
        (tmp / f"{name}.nhdr").write_text(
            "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
            f"sizes: {sizes}\nspace directions: {directions}\nkinds: domain domain domain\n"
            f"endian: little\nencoding: raw\nspace origin: (0,0,0)\ndata file: {name}.raw\n", encoding="utf-8")
        return tmp / f"{name}.nhdr"
    return make


def _dicom(**kwargs):
    def make(tmp):
        return write_dicom_series(tmp / "dicom", CT, **kwargs)
    return make


def _dicom_with_a_truncated_slice(tmp):
    folder = write_dicom_series(tmp / "dicom", CT)
    damaged = sorted(folder.iterdir())[5]
    damaged.write_bytes(damaged.read_bytes()[:200])
    return folder


def _mixed_dicom(tmp):
    write_dicom_series(tmp / "dicom", CT)
    return write_dicom_series(tmp / "dicom", CT, series_uid="1.2.826.0.1.3680043.2.1125.2", description="T2 FLAIR")


def _empty_folder(tmp):
    (tmp / "nothing").mkdir()
    return tmp / "nothing"


def _with_value(value):
    array = CT.array.astype(np.float32)
    array[3, 4, 5] = value
    return lambda tmp: write_volume(CT.with_array(array), tmp / "odd.nrrd")


# kind -> (make the input path, words the error must contain)
IMAGE_CASES = {
    "truncated NIfTI (gzip)": (_truncated(".nii.gz"), "truncated"),
    "truncated NIfTI": (_truncated(".nii", compress=False), "truncated"),
    "truncated NRRD": (_truncated(".nrrd"), "corrupt"),
    "truncated MHA": (_truncated(".mha"), "corrupt"),
    "damaged NIfTI (gzip)": (_damaged(".nii.gz"), "truncated or corrupt"),
    "damaged NRRD (gzip)": (_damaged(".nrrd"), "fails its checksum"),
    "damaged MHA (zlib)": (_damaged(".mha"), "fails its checksum"),
    "random bytes as NIfTI": (_raw("noise.nii.gz", bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8))),
                              "truncated or corrupt"),
    "text as NRRD": (_raw("notes.nrrd", b"these are my notes, not an image"), "corrupt"),
    "NRRD with an empty space origin": (_raw("no-origin.nrrd", EMPTY_ORIGIN_NRRD), "corrupt"),
    "empty file": (_raw("empty.mha", b""), "corrupt"),
    "missing file": (lambda tmp: tmp / "absent.nii.gz", "not found"),
    "DICOM with a missing slice": (_dicom(skip_slices=(5,)), "uneven"),
    "DICOM with a truncated slice": (_dicom_with_a_truncated_slice, "not read as slices (truncated, corrupt or not "
                                                                     "DICOM): 25.1_005.dcm"),
    "DICOM with uneven spacing": (_dicom(z_offsets=[0.0] * 6 + [1.2] * 6), "uneven"),
    "DICOM folder with two series": (_mixed_dicom, "2 DICOM series ('series 1.2.826.0.1.3680043.2.1125.1' (12 images), "
                                                   "'T2 FLAIR' (12 images))"),
    "folder without DICOM": (_empty_folder, "no DICOM"),
    "2D image": (_array(np.zeros((16, 16), np.int16)), "2D"),
    "4D image": (_array(np.zeros((2, 4, 5, 6), np.int16), (1.0,) * 4), "4D"),
    "RGB image": (_array(np.zeros((4, 5, 6, 3), np.uint8), is_vector=True), "components per voxel"),
    "blank volume": (lambda tmp: _image(tmp, volume=CT.with_array(np.zeros_like(CT.array))), "blank"),
    "constant volume": (lambda tmp: _image(tmp, volume=CT.with_array(np.full_like(CT.array, -1000))), "blank"),
    "NaN voxel": (_with_value(np.nan), "NaN or infinite"),
    "infinite voxel": (_with_value(np.inf), "NaN or infinite"),
    "1-voxel-thick volume": (_array(np.zeros((1, 16, 16), np.int16)), "1 voxel thick"),
    "too large for memory (from its header)": (
        _nhdr("40000 40000 40000", "(1,0,0) (0,1,0) (0,0,1)", "huge"), "too large"),
    "non-orthonormal directions": (_nhdr("4 4 4", "(1,0,0) (0.7,0.7,0) (0,0,1)", "sheared"), "not orthonormal"),
    "MR image for a CT model": (lambda tmp: _image(tmp, volume=CT.with_array(np.abs(CT.array) % 700)),
                                "does not look like CT"),
}


def _model_with(tmp, edit_card=None, edit_weights=None):
    card = tiny_card()
    if edit_card:
        edit_card(card)
    path = write_model(tmp / "model", card)
    if edit_weights:
        edit_weights(path.parent)
    return path


def _tamper(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def _truncate_and_reseal(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _reseal(folder)


def _reseal(folder):
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    card["weights"][0]["sha256"] = sha256_of(folder / card["weights"][0]["file"])
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")


def _malicious_pickle(folder):
    (folder / "model.safetensors").write_bytes(pickle.dumps({"state_dict": PickleExploit(str(folder / "PWNED"))}))
    _reseal(folder)


def _edit_json(edit):
    def change(folder):
        card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
        edit(card)
        (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    return change


def _not_json(folder):
    (folder / "card.json").write_text("{ this is not json", encoding="utf-8")


MODEL_CASES = {
    "missing weights": (lambda f: (f / "model.safetensors").unlink(), "missing"),
    "tampered weights": (_tamper, "does not match the SHA-256"),
    "truncated weights (checksum updated)": (_truncate_and_reseal, "cannot be read as safetensors"),
    "malicious pickle as weights": (_malicious_pickle, "cannot be read as safetensors"),
    "card without a required field": (_edit_json(lambda c: c.pop("patch_size")), "'patch_size' is missing"),
    "card with a wrong field": (_edit_json(lambda c: c["labels"][0].update(color="red")), "labels[0].color"),
    "card that is not JSON": (_not_json, "not valid JSON"),
    "card naming an unknown architecture": (_edit_json(lambda c: c["architecture"].update(name="ResNet9000")),
                                            "Unknown architecture"),
}


def _error_line(stderr: str) -> str:
    """The error printed after the (closed) progress bar: the last line, which must be the only one."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("aireconstruct: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def _run_and_check(tmp_path, capsys, argv, expected, writes_output=True):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "earlier.seg.nrrd").write_bytes(b"an earlier result")
    code = main(argv + (["-o", str(out)] if writes_output else []))
    err = _error_line(capsys.readouterr().err)
    assert code != 0
    assert expected in err, err
    assert sorted(p.name for p in out.iterdir()) == ["earlier.seg.nrrd"]
    assert (out / "earlier.seg.nrrd").read_bytes() == b"an earlier result"
    return err


@pytest.mark.parametrize("kind", IMAGE_CASES)
def test_bad_image(tmp_path, capsys, tiny_model, kind):
    make, expected = IMAGE_CASES[kind]
    path = make(tmp_path)
    _run_and_check(tmp_path, capsys, ["segment", str(path), "-m", str(tiny_model), "--device", "cpu"], expected)


@pytest.mark.parametrize("kind", MODEL_CASES)
def test_bad_model(tmp_path, capsys, kind):
    edit, expected = MODEL_CASES[kind]
    card = _model_with(tmp_path, edit_weights=edit)
    image = _image(tmp_path)
    _run_and_check(tmp_path, capsys, ["segment", str(image), "-m", str(card), "--device", "cpu"], expected)
    assert not (card.parent / "PWNED").exists()


def test_unknown_model_name(tmp_path, capsys):
    _run_and_check(tmp_path, capsys, ["segment", str(_image(tmp_path)), "-m", "no-such-model"], "No installed model")


def test_fast_mode_the_model_does_not_have(tmp_path, capsys):
    card = _model_with(tmp_path, edit_card=lambda c: c.pop("fast_spacing"))
    _run_and_check(tmp_path, capsys, ["segment", str(_image(tmp_path)), "-m", str(card), "--fast"], "no fast mode")


def test_wrong_number_of_channels(tmp_path, capsys, tiny_model):
    image = _image(tmp_path)
    _run_and_check(tmp_path, capsys, ["segment", str(image), str(image), "-m", str(tiny_model)], "needs 1 input")


def test_channels_on_different_grids(tmp_path, capsys):
    def two_channels(card):
        card["channels"].append({"name": "CT late", "normalisation": {"scheme": "zscore"}})
    card = _model_with(tmp_path, edit_card=two_channels)
    first = _image(tmp_path)
    moved = _image(tmp_path, "moved.nii.gz", Volume(CT.array, CT.spacing, (5.0, 0.0, 0.0)))
    _run_and_check(tmp_path, capsys, ["segment", str(first), str(moved), "-m", str(card)], "not on the same grid")


def test_label_map_on_another_grid(tmp_path, capsys):
    reference = write_volume(CT.with_array((CT.array > 0).astype(np.uint8)), tmp_path / "ref.nii.gz")
    other = write_volume(Volume((CT.array > 0).astype(np.uint8), CT.spacing, (0, 0, 0), oblique_direction()),
                         tmp_path / "pred.nii.gz")
    _run_and_check(tmp_path, capsys, ["evaluate", str(other), str(reference)], "does not match", writes_output=False)


def test_damaged_segmentation_file(tmp_path, capsys):
    """A .seg.nrrd whose compressed data has a flipped byte: one line naming the damage (pynrrd
    alone gave zlib's traceback or a size mismatch, depending on where the byte was)."""
    mask = (CT.array > 0).astype(np.uint8)
    reference = write_volume(CT.with_array(mask), tmp_path / "ref.nii.gz")
    prediction = write_seg_nrrd(CT.with_array(mask), [Label(1, "liver", (0.8, 0.4, 0.3), {}, {})],
                                tmp_path / "pred.seg.nrrd")
    data = bytearray(prediction.read_bytes())
    data[-10] ^= 0xFF
    prediction.write_bytes(bytes(data))
    _run_and_check(tmp_path, capsys, ["evaluate", str(prediction), str(reference)], "fails its checksum",
                   writes_output=False)


def test_label_map_with_fractions(tmp_path, capsys):
    reference = write_volume(CT.with_array((CT.array > 0).astype(np.uint8)), tmp_path / "ref.nii.gz")
    soft = write_volume(CT.with_array(np.full(CT.array.shape, 0.5, np.float32)), tmp_path / "soft.nii.gz")
    _run_and_check(tmp_path, capsys, ["evaluate", str(soft), str(reference)], "non-integer", writes_output=False)


def test_an_image_given_as_a_label_map(tmp_path, capsys):
    """An MR image with integer intensities where a label map belongs: refused, not meshed value by value."""
    image = write_volume(CT.with_array((np.arange(CT.array.size) % 2000).reshape(CT.array.shape).astype(np.int16)),
                         tmp_path / "flair.nii.gz")
    _run_and_check(tmp_path, capsys, ["surfaces", str(image)], "more than 1000 different values")


def test_output_folder_that_cannot_be_made(tmp_path, capsys, tiny_model):
    blocker = tmp_path / "a file"
    blocker.write_text("", encoding="utf-8")
    code = main(["segment", str(_image(tmp_path)), "-m", str(tiny_model), "-o", str(blocker / "out")])
    assert code == 2 and "Cannot write into" in _error_line(capsys.readouterr().err)


def test_full_disk_leaves_the_output_folder_untouched(tmp_path, tiny_model):
    """The output file system 'fills up' (a file-size limit in the child process) mid-run."""
    image = _image(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep", encoding="utf-8")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    result = subprocess.run([sys.executable, "-m", "AIReconstructLib", "segment", str(image), "-m", str(tiny_model),
                             "-o", str(out), "--device", "cpu", "--surfaces"], capture_output=True, text=True,
                            encoding="utf-8", preexec_fn=limit_file_size, env=dict(os.environ), timeout=300)
    assert result.returncode == 2, result.stderr
    error = _error_line(result.stderr)
    assert f"Cannot write {out}/" in error and "partial" not in error, error
    assert error.split(": ")[-1].strip(), error  # and the reason
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]


def test_spaces_and_non_ascii_in_paths_work(tmp_path, capsys, tiny_model):
    folder = tmp_path / "Patiënt Müller – CT"
    folder.mkdir()
    image = _image(folder, "séance 1.nii.gz")
    assert main(["segment", str(image), "-m", str(tiny_model), "-o", str(folder / "résultat"), "--device", "cpu"]) == 0
    assert (folder / "résultat" / "séance 1.seg.nrrd").is_file()


def _mr_head(stripped: bool, air_noise: bool = True) -> Volume:
    """A 1.5 mm FLAIR-like head: a 1.2 L brain; unless ``stripped``, a dark skull and bright scalp
    around it (2.2 L in all) and, with ``air_noise``, the scanner's noise in the air (else zeros)."""
    z, y, x = np.indices((110, 160, 140)) * 1.5
    def inside(extra_mm):
        return ((z - 82) / (55 + extra_mm)) ** 2 + ((y - 120) / (80 + extra_mm)) ** 2 + ((x - 105) / (65 + extra_mm)) ** 2 < 1
    rng = np.random.default_rng(0)
    image = np.where(inside(0), rng.normal(100, 10, z.shape), 0.0)
    if not stripped:
        image = np.where(inside(15) & ~inside(0), np.where(inside(7), 5.0, 150.0), image)
        if air_noise:
            image = np.where(inside(15), image, np.abs(rng.normal(0, 3, z.shape)))
    return Volume(image.astype(np.float32), (1.5, 1.5, 1.5))


@pytest.mark.parametrize("air_noise", [True, False])
def test_a_head_that_is_not_skull_stripped_is_refused_by_a_model_for_brains(tmp_path, capsys, air_noise):
    """The brain-tumour model was trained on skull-stripped FLAIR: a clinical head (skull, scalp, noise
    in the air or zeros there) is refused in one line instead of segmented into nonsense."""
    path = tmp_path / "head.nii.gz"
    write_volume(_mr_head(stripped=False, air_noise=air_noise), path)
    err = _run_and_check(tmp_path, capsys, ["segment", str(path), "-m", "brain-tumour-flair", "--device", "cpu"],
                         "The FLAIR image for model 'brain-tumour-flair' is not skull-stripped")
    assert "strip the skull first" in err


def test_skull_stripped_brains_pass_the_check_whatever_their_background():
    from AIReconstructLib.preprocess import check_skull_stripped

    brain = _mr_head(stripped=True)
    check_skull_stripped(brain, "The brain")
    inside = brain.array > 0
    scored = np.where(inside, (brain.array - brain.array[inside].mean()) / brain.array[inside].std(), 0)
    scored[~inside] = scored[inside].min() - 0.5  # BraTS 2013: z-scored, its minimum outside the brain
    check_skull_stripped(brain.with_array(scored.astype(np.float32)), "The z-scored brain")
    with pytest.raises(InputError, match=r"^The head is not skull-stripped: 2\.2 L of it holds signal"):
        check_skull_stripped(_mr_head(stripped=False, air_noise=False), "The head")


def test_training_marked_skull_stripped_refuses_a_case_that_is_not(tmp_path):
    """``train --skull-stripped``: the card says so (its model then refuses heads), and a data set case that
    is a whole head is named before any training."""
    from AIReconstructLib.dataset import read_dataset
    from AIReconstructLib.training_data import channel_normalisation, load_case

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case, stripped in (("brain", True), ("head", False)):
        volume = _mr_head(stripped)
        write_volume(volume, tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        write_volume(volume.with_array((volume.array > 115).astype(np.uint8)), tmp_path / "labelsTr" / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR"}, "file_ending": ".nii.gz",
                                                       "labels": {"background": 0, "tumour": 1}}), encoding="utf-8")
    dataset = read_dataset(tmp_path)
    channels = channel_normalisation(dataset, "nonzero", skull_stripped=True)
    assert channels == [{"name": "FLAIR", "skull_stripped": True, "normalisation": {"scheme": "zscore_nonzero"}}]
    brain, head = dataset.cases
    load_case(brain, channels, [3.0, 3.0, 3.0])
    ct = dataclasses.replace(dataset, channel_names=["CT"])
    with pytest.raises(InputError, match="this data set's channels are all CT"):
        channel_normalisation(ct, "nonzero", skull_stripped=True)
    with pytest.raises(InputError, match="^The FLAIR image of case head is not skull-stripped"):
        load_case(head, channels, [3.0, 3.0, 3.0])
