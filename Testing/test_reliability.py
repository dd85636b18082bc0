"""Reliability: out-of-memory fallback, determinism, runs killed at random moments, fuzzed readers
(damaged compressed data included)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from AIReconstructLib.errors import AIReconstructError
from AIReconstructLib.io import read_volume, write_volume
from AIReconstructLib.modelcard import Label, load_card
from AIReconstructLib.networks import load_network
from AIReconstructLib.pipeline import SegmentOptions, segment
from AIReconstructLib.predict import Predictor
from AIReconstructLib.segnrrd import read_seg_nrrd, write_seg_nrrd
from AIReconstructLib.volume import Volume
from conftest import noise_ct, tiny_card


class WindowLimit(torch.nn.Module):
    """A simulated allocation limit: more than ``fits`` windows at once run out of memory."""

    def __init__(self, network, fits: int):
        super().__init__()
        self.network, self.fits = network, fits

    def forward(self, batch):
        if batch.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"simulated: {batch.shape[0]} windows do not fit")
        return self.network(batch)


def test_out_of_memory_retries_with_fewer_windows(tiny_model, caplog):
    """PyTorch's fallbacks (what a GPU needs; OpenVINO runs one window at a time anyway)."""
    network = load_network(load_card(tiny_model))
    image = torch.randn(1, 40, 48, 56)
    expected = Predictor(network, (32, 32, 32), device="cpu", sw_batch_size=1, backend="torch")(image)
    limited = Predictor(WindowLimit(network, fits=1), (32, 32, 32), device="cpu", sw_batch_size=4, backend="torch")
    with caplog.at_level("WARNING"):
        result = limited(image)
    assert "Out of memory (4 window(s) per batch" in caplog.text
    torch.testing.assert_close(result, expected)


def test_out_of_memory_everywhere_is_a_clear_error(tiny_model):
    network = WindowLimit(load_network(load_card(tiny_model)), fits=0)
    with pytest.raises(AIReconstructError, match="Out of memory even on the CPU"):
        Predictor(network, (32, 32, 32), device="cpu", sw_batch_size=2, backend="torch")(torch.randn(1, 32, 32, 32))


def test_same_input_same_labels(tiny_model, ct_volume):
    card = load_card(tiny_model)
    first = segment([ct_volume], card, SegmentOptions(device="cpu", tta=True)).labelmap.array
    second = segment([ct_volume], card, SegmentOptions(device="cpu", tta=True)).labelmap.array
    np.testing.assert_array_equal(first, second)


def test_runs_killed_at_random_moments_leave_no_partial_output(tmp_path, tiny_model):
    image = write_volume(noise_ct((64, 80, 80)), tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep", encoding="utf-8")
    command = [sys.executable, "-m", "AIReconstructLib", "segment", str(image), "-m", str(tiny_model), "-o", str(out),
               "--device", "cpu", "--surfaces", "--tta"]
    rng = random.Random(1)
    outcomes = set()
    for _ in range(4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if visible == ["earlier.txt"]:
            outcomes.add("nothing")
        else:  # the run had committed: every output is there and readable
            assert {"ct.seg.nrrd", "ct_labels.nii.gz", "ct_summary.json", "surfaces"} <= set(visible), visible
            read_seg_nrrd(out / "ct.seg.nrrd")
            json.loads((out / "ct_summary.json").read_text(encoding="utf-8"))
            outcomes.add("complete")
    # a later run clears the hidden staging folders the killed runs left behind
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert "nothing" in outcomes


NIFTI, NRRD, MHA = ".nii", ".nrrd", ".mha"


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    volume = Volume(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5), (1.0, 2.0, 3.0))
    return {suffix: write_volume(volume, folder / f"image{suffix}", compress=False).read_bytes()
            for suffix in (NIFTI, NRRD, MHA)}


@st.composite
def mutated(draw, original: bytes):
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position: position + draw(st.integers(1, 64))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


FUZZ = settings(max_examples=int(os.environ.get("AIRECONSTRUCT_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("suffix", [NIFTI, NRRD, MHA])
def test_fuzzed_image_files_give_only_engine_errors(tmp_path, valid_files, suffix):
    path = tmp_path / f"fuzz{suffix}"

    @FUZZ
    @given(data=st.data())
    def check(data):
        path.write_bytes(data.draw(mutated(valid_files[suffix])))
        try:
            read_volume(path)
        except AIReconstructError as error:
            assert "\n" not in str(error)

    check()


# compressed file -> where its compressed data starts (after any text header)
COMPRESSED_DATA_START = {".nii.gz": lambda data: 0, ".nrrd": lambda data: data.index(b"\n\n") + 2,
                         ".mha": lambda data: data.index(b"ElementDataFile = LOCAL\n") + 24,
                         ".seg.nrrd": lambda data: data.index(b"\n\n") + 2}


@pytest.mark.parametrize("suffix", COMPRESSED_DATA_START)
def test_damaged_compressed_data_is_refused_never_read_as_other_voxels(tmp_path, suffix):
    """Mutations of a compressed file's data (its header left alone) either give an engine error or
    leave the voxels as they were: ITK alone read such files as garbage voxels (docs: integrity.py)."""
    labels = np.indices((6, 7, 8)).sum(0).astype(np.uint8) % 3
    volume = Volume(labels, (1.0, 2.0, 3.0))
    path = tmp_path / f"image{suffix}"
    if suffix == ".seg.nrrd":
        write_seg_nrrd(volume, [Label(v, f"organ {v}", (0.5, 0.5, 0.5), {}, {}) for v in (1, 2)], path)
        read = lambda: read_seg_nrrd(path)[0]  # noqa: E731
    else:
        write_volume(volume, path, compress=True)
        read = lambda: read_volume(path)  # noqa: E731
    original = path.read_bytes()
    start = COMPRESSED_DATA_START[suffix](original)

    @FUZZ
    @given(data=st.data())
    def check(data):
        path.write_bytes(original[:start] + data.draw(mutated(original[start:])))
        try:
            voxels = read().array
        except AIReconstructError as error:
            assert "\n" not in str(error)
            return
        np.testing.assert_array_equal(voxels, labels)

    check()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_a_gzip_header_failing_its_own_checksum_is_refused(tmp_path, suffix):
    """The gzip header may carry its own CRC (flag FHCRC): one that does not match is damage. Python's
    gzip module skips it while pynrrd's reader fails on it with zlib's error (found by the fuzzing
    above on a .seg.nrrd); both ways of reading now refuse such a file with the engine's error."""
    volume = Volume(np.indices((6, 7, 8)).sum(0).astype(np.uint8) % 3, (1.0, 2.0, 3.0))
    path = tmp_path / f"image{suffix}"
    if suffix == ".seg.nrrd":
        write_seg_nrrd(volume, [Label(v, f"organ {v}", (0.5, 0.5, 0.5), {}, {}) for v in (1, 2)], path)
    else:
        write_volume(volume, path, compress=True)
    original = path.read_bytes()
    start = COMPRESSED_DATA_START[suffix](original)
    gzip_header = original[start:start + 10]
    assert gzip_header[:3] == b"\x1f\x8b\x08" and gzip_header[3] == 0  # no optional fields yet
    flagged = gzip_header[:3] + b"\x02" + gzip_header[4:] + b"\x00\x00"  # a header CRC of 0: wrong
    path.write_bytes(original[:start] + flagged + original[start + 10:])
    with pytest.raises(AIReconstructError, match="truncated or corrupt"):
        read_seg_nrrd(path) if suffix == ".seg.nrrd" else read_volume(path)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def test_fuzzed_model_cards_give_only_card_errors(tmp_path):
    path = tmp_path / "card.json"

    @FUZZ
    @given(field=st.sampled_from(sorted(tiny_card())), value=JSON_VALUES, drop=st.booleans())
    def check(field, value, drop):
        card = tiny_card()
        if drop:
            card.pop(field)
        else:
            card[field] = value
        path.write_text(json.dumps(card), encoding="utf-8")
        try:
            load_card(path)
        except AIReconstructError as error:
            assert "\n" not in str(error)

    check()
