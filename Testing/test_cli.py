"""The command line end to end: outputs, one-line errors, JSON progress and cancellation."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from AIReconstructLib.cli import main
from AIReconstructLib.io import read_labelmap, read_volume, write_volume
from AIReconstructLib.modelcard import Label, load_card
from AIReconstructLib.segnrrd import made_by, read_seg_nrrd, write_seg_nrrd
from AIReconstructLib.volume import Volume
from conftest import noise_ct, tiny_card, write_model


@pytest.fixture
def ct_file(tmp_path, ct_volume):
    return write_volume(ct_volume, tmp_path / "patient one.nii.gz")  # a space in the name on purpose


def test_segment_writes_every_output(tmp_path, tiny_model, ct_file, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(ct_file), "-m", str(tiny_model), "-o", str(out), "--device", "cpu",
                 "--surfaces", "--format", "stl", "obj", "ply", "vtp", "glb", "--report"]) == 0
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"patient one.seg.nrrd", "patient one_labels.nii.gz", "patient one_summary.json",
            "patient one_report.html"} <= names
    labels = read_labelmap(out / "patient one_labels.nii.gz", like=read_volume(ct_file))
    summary = json.loads((out / "patient one_summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == "tiny-test-model" and set(summary["volumes_ml"]) == {"organ", "lesion"}
    assert {s["name"] for s in summary["measurements"]["segments"]} <= {"organ", "lesion"}
    stages = ["read", "load model", "preprocess", "predict", "resample back", "postprocess", "surfaces", "report", "write"]
    assert sorted(summary["seconds"], key=stages.index) == stages  # every stage timed, the benchmark prints them
    for name in summary.get("surfaces", {}):
        for suffix in (".stl", ".ply", ".vtp"):
            assert f"surfaces/{name}{suffix}" in names
    if summary.get("surfaces"):
        assert {"surfaces/patient one.glb", "surfaces/patient one.obj", "surfaces/patient one.mtl"} <= names
    assert not [n for n in names if "partial" in n]
    assert labels.array.shape == read_volume(ct_file).array.shape
    assert "wrote" in capsys.readouterr().out
    assert made_by(out / "patient one.seg.nrrd") == ("tiny-test-model", "0.0.1")  # the result says what made it


def test_outputs_for_import_are_the_seg_nrrd_alone_uncompressed(tmp_path, tiny_model, ct_file):
    """What the Slicer module asks for: the same segmentation, in a file it reads without unzipping."""
    for folder, extra in (("default", []), ("for-import", ["--for-import"])):
        assert main(["segment", str(ct_file), "-m", str(tiny_model), "-o", str(tmp_path / folder), "--device", "cpu",
                     *extra]) == 0
    assert sorted(p.name for p in (tmp_path / "for-import").iterdir()) == ["patient one.seg.nrrd", "patient one_summary.json"]
    seg_file = tmp_path / "for-import" / "patient one.seg.nrrd"
    assert b"encoding: raw" in seg_file.read_bytes()[:4096]
    (ours, segments), (default, default_segments) = (read_seg_nrrd(seg_file),
                                                     read_seg_nrrd(tmp_path / "default" / "patient one.seg.nrrd"))
    np.testing.assert_array_equal(ours.array, default.array)
    assert segments == default_segments and ours.same_grid(default)


def test_segment_folder_segments_every_case_and_goes_on_past_a_bad_one(tmp_path, tiny_model, ct_volume, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_volume(ct_volume, cases / "anna.nii.gz")
    write_volume(ct_volume.with_array(ct_volume.array[::-1].copy()), cases / "bert.nrrd")
    write_volume(ct_volume.with_array(np.zeros_like(ct_volume.array)), cases / "blank.nii.gz")
    out = tmp_path / "out"
    command = ["segment-folder", str(cases), "-m", str(tiny_model), "-o", str(out), "--device", "cpu"]
    assert main(command) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 3 cases could not be segmented (blank: blank.nii.gz is blank" in error and "cases.csv" in error
    assert sorted(p.name for p in out.iterdir()) == ["anna", "bert", "cases.csv"]  # nothing for the bad case
    for case in ("anna", "bert"):
        assert {".seg.nrrd", "_labels.nii.gz", "_summary.json"} == {p.name[len(case):] for p in (out / case).iterdir()}
    single = tmp_path / "single"
    assert main(["segment", str(cases / "bert.nrrd"), "-m", str(tiny_model), "-o", str(single), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(read_labelmap(out / "bert" / "bert_labels.nii.gz").array,
                                  read_labelmap(single / "bert_labels.nii.gz").array)  # as segment makes it
    table = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert table[0].startswith("case,status,error,seconds,organ (mL),lesion (mL)")
    assert [row.split(",")[:2] for row in table[1:]] == [["anna", "done"], ["bert", "done"], ["blank", "failed"]]
    volumes = json.loads((out / "anna" / "anna_summary.json").read_text(encoding="utf-8"))["volumes_ml"]
    assert float(table[1].split(",")[4]) == pytest.approx(volumes["organ"], abs=0.01)

    written = (out / "anna" / "anna.seg.nrrd").stat().st_mtime_ns
    assert main(command) == 2  # again: the cases already segmented are kept, with their figures in the table
    assert (out / "anna" / "anna.seg.nrrd").stat().st_mtime_ns == written
    rerun = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert [row.split(",")[1] for row in rerun[1:]] == ["done before", "done before", "failed"]
    assert rerun[1].split(",")[4] == table[1].split(",")[4]
    assert main(command + ["--overwrite"]) == 2
    assert (out / "anna" / "anna.seg.nrrd").stat().st_mtime_ns != written

    assert main(command + ["--tta"]) == 2  # other options: the earlier results are not this run's
    rerun = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert [row.split(",")[1] for row in rerun[1:]] == ["done", "done", "failed"]
    summary = json.loads((out / "anna" / "anna_summary.json").read_text(encoding="utf-8"))
    assert summary["options"]["tta"] and summary["model_version"] == load_card(tiny_model).data["version"]
    newer = write_model(tmp_path / "newer", {**tiny_card(), "version": "9.9.9"})
    assert main(["segment-folder", str(cases), "-m", str(newer), "-o", str(out), "--device", "cpu",
                 "--tta"]) == 2  # another version of the model: segmented again
    rerun = (out / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert [row.split(",")[1] for row in rerun[1:]] == ["done", "done", "failed"]


def test_evaluate_and_surfaces_commands(tmp_path, capsys):
    array = np.zeros((10, 12, 14), np.uint8)
    array[2:8, 3:9, 4:10] = 1
    ref = write_volume(Volume(array, (1, 1, 2)), tmp_path / "ref.nii.gz")
    shifted = np.roll(array, 1, axis=2)
    pred = write_volume(Volume(shifted, (1, 1, 2)), tmp_path / "pred.nii.gz")
    assert main(["evaluate", str(pred), str(ref), "--json", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert result["labels"]["label 1"]["dice"] == pytest.approx(2 * 180 / 432)
    assert "Dice" in capsys.readouterr().out
    write_seg_nrrd(Volume(shifted, (1, 1, 2)), [Label(1, "liver", (0.8, 0.4, 0.3), {}, {})], tmp_path / "pred.seg.nrrd")
    assert main(["evaluate", str(tmp_path / "pred.seg.nrrd"), str(ref)]) == 0  # the segment's own name
    assert "liver " in capsys.readouterr().out
    assert main(["surfaces", str(ref), "-o", str(tmp_path / "meshes"), "--format", "stl"]) == 0
    assert (tmp_path / "meshes" / "label_1.stl").is_file()
    empty = write_volume(Volume(np.zeros_like(array), (1, 1, 2)), tmp_path / "empty.nii.gz")
    capsys.readouterr()
    assert main(["surfaces", str(empty), "-o", str(tmp_path / "none")]) == 2
    assert "holds no segment (every voxel is background)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_evaluate_a_folder_of_cases(tmp_path, capsys):
    """Predictions laid out as segment-folder writes them (or as files beside each other) against
    a folder of references: one row per case and label, mean ± SD per label over the cases."""
    predictions, references = tmp_path / "predictions", tmp_path / "labelsTr"
    (predictions / "anna").mkdir(parents=True)
    references.mkdir()
    liver = [Label(1, "liver", (0.8, 0.4, 0.3), {}, {}), Label(2, "tumour", (0.9, 0.9, 0.2), {}, {})]
    array = np.zeros((10, 12, 14), np.uint8)
    array[2:8, 3:9, 4:10] = 1
    array[4:6, 5:7, 6:8] = 2
    for case, shift in (("anna", 1), ("bert", 2), ("carl", 0)):
        write_volume(Volume(array, (1, 1, 2)), references / f"{case}.nii.gz")
    write_seg_nrrd(Volume(np.roll(array, 1, axis=2), (1, 1, 2)), liver, predictions / "anna" / "anna.seg.nrrd")
    write_seg_nrrd(Volume(np.roll(array, 2, axis=2), (1, 1, 2)), liver, predictions / "bert.seg.nrrd")
    assert main(["evaluate", str(predictions), str(references / "anna.nii.gz")]) == 2
    assert "is a folder but" in capsys.readouterr().err
    folders = ["evaluate", str(predictions), str(references)]
    assert main(folders + ["--json", str(tmp_path / "two.json")]) == 0  # the cases segmented so far
    assert "not evaluated, no prediction: 1 of the 3 cases (carl)" in capsys.readouterr().out
    two = json.loads((tmp_path / "two.json").read_text(encoding="utf-8"))
    assert two["not_evaluated"] == ["carl"] and two["labels"]["liver"]["cases"] == 2
    (tmp_path / "nothing yet").mkdir()
    assert main(["evaluate", str(tmp_path / "nothing yet"), str(references)]) == 2
    assert "has a prediction for none of the" in capsys.readouterr().err
    write_seg_nrrd(Volume(array, (1, 1, 2)), liver, predictions / "carl.seg.nrrd")
    assert main(folders + ["--csv", str(tmp_path / "cases.csv"), "--json", str(tmp_path / "all.json")]) == 0
    output = capsys.readouterr().out
    assert "liver " in output and "not evaluated" not in output
    result = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))
    single = []
    for case, prediction in (("anna", predictions / "anna" / "anna.seg.nrrd"), ("bert", predictions / "bert.seg.nrrd"),
                             ("carl", predictions / "carl.seg.nrrd")):
        assert main(["evaluate", str(prediction), str(references / f"{case}.nii.gz"),
                     "--json", str(tmp_path / f"{case}.json")]) == 0
        single.append(json.loads((tmp_path / f"{case}.json").read_text(encoding="utf-8"))["labels"])
    for name in ("liver", "tumour"):
        dice = [case[name]["dice"] for case in single]
        assert result["labels"][name]["cases"] == 3 and dice[2] == 1.0
        assert result["labels"][name]["dice"]["mean"] == pytest.approx(np.mean(dice))
        assert result["labels"][name]["dice"]["sd"] == pytest.approx(np.std(dice))
    table = (tmp_path / "cases.csv").read_text(encoding="utf-8").splitlines()
    assert table[0].startswith("case,label,dice,iou,hd95_mm") and len(table) == 1 + 3 * 2


def test_models_lists_the_bundled_demo_model(capsys):
    assert main(["models"]) == 0
    assert "demo-abdomen-ct" in capsys.readouterr().out


@pytest.mark.parametrize("make_input,expected", [
    (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00garbage"), "corrupt"),
    (lambda p: write_volume(Volume(np.zeros((4, 5, 6), np.int16)), p), "blank"),
])
def test_bad_input_is_one_line_and_non_zero(tmp_path, tiny_model, capsys, make_input, expected):
    path = tmp_path / "bad.nii.gz"
    make_input(path)
    code = main(["segment", str(path), "-m", str(tiny_model), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and err.startswith("aireconstruct: error:") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_json_progress_lines(tmp_path, tiny_model, ct_file, capsys):
    assert main(["segment", str(ct_file), "-m", str(tiny_model), "-o", str(tmp_path / "o"),
                 "--device", "cpu", "--json-progress"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    fractions = [line["progress"] for line in lines if "progress" in line]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert lines[-1]["done"] is True and lines[-1]["outputs"]


def test_cancel_leaves_the_output_folder_as_it_was(tmp_path, tiny_model):
    big = noise_ct((96, 96, 96))
    image = write_volume(big, tmp_path / "big.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier result", encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "AIReconstructLib", "segment", str(image), "-m", str(tiny_model), "-o", str(out),
         "--device", "cpu", "--tta", "--json-progress"], stdout=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if json.loads(line).get("message", "").startswith("window"):
            break
    process.send_signal(signal.SIGTERM)
    remaining = process.stdout.read()
    assert process.wait(timeout=60) == 130
    assert '"cancelled": true' in remaining
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]


def _serve(*options):
    """An ``aireconstruct serve`` worker; its stdout is read line by line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "AIReconstructLib", "serve", *options], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def _request(worker, *arguments):
    """Send one request; returns its answer (the done or error line after its progress lines)."""
    worker.stdin.write(json.dumps(list(arguments)) + "\n")
    worker.stdin.flush()
    for line in worker.stdout:
        event = json.loads(line)
        if "progress" not in event:
            return event
    raise AssertionError("the worker ended without answering")


def test_worker_runs_requests_one_after_another_like_the_command_line(tmp_path, tiny_model, ct_file):
    worker = _serve()
    try:
        segment = ["segment", str(ct_file), "-m", str(tiny_model), "--device", "cpu"]
        first = _request(worker, *segment, "-o", str(tmp_path / "first"))
        invalid = _request(worker, "segment", "--no-such-option")
        not_json = _request(worker, "not", "a", "list")
        worker.stdin.write("segment this\n")
        worker.stdin.flush()
        garbled = json.loads(worker.stdout.readline())
        missing = _request(worker, "segment", str(ct_file), "-m", "no-such-model", "-o", str(tmp_path / "x"))
        second = _request(worker, *segment, "-o", str(tmp_path / "second"))
    finally:
        worker.stdin.close()
    assert worker.wait(timeout=60) == 0  # stdin closed: the worker ends
    assert first["done"] and second["done"]
    assert invalid == {"error": "Invalid request: the following arguments are required: -m/--model, -o/--output, "
                                "inputs", "cancelled": False}
    assert not_json["error"].startswith("Invalid request: argument command: invalid choice: 'not'")
    assert garbled["error"].startswith("Invalid request: a request is a JSON list of arguments")
    assert "No installed model named 'no-such-model'" in missing["error"] and not (tmp_path / "x").exists()
    cli_out = tmp_path / "command line"
    assert main(["segment", str(ct_file), "-m", str(tiny_model), "--device", "cpu", "-o", str(cli_out)]) == 0
    for run in ("first", "second"):
        np.testing.assert_array_equal(read_volume(tmp_path / run / "patient one_labels.nii.gz").array,
                                      read_volume(cli_out / "patient one_labels.nii.gz").array)


def test_worker_cancels_a_request_on_sigterm_and_goes_on_to_the_next(tmp_path, tiny_model, ct_file):
    big = write_volume(noise_ct((96, 96, 96)), tmp_path / "big.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier result", encoding="utf-8")
    worker = _serve()
    try:
        worker.stdin.write(json.dumps(["segment", str(big), "-m", str(tiny_model), "-o", str(out), "--device", "cpu",
                                       "--tta"]) + "\n")
        worker.stdin.flush()
        for line in worker.stdout:
            if json.loads(line).get("message", "").startswith("window"):
                break
        worker.send_signal(signal.SIGTERM)
        for line in worker.stdout:
            if "progress" not in json.loads(line):
                break
        assert json.loads(line)["cancelled"] is True
        assert [p.name for p in out.iterdir()] == ["earlier.txt"] and worker.poll() is None
        after = _request(worker, "segment", str(ct_file), "-m", str(tiny_model), "-o", str(tmp_path / "after"),
                         "--device", "cpu")
        assert after["done"]
        worker.send_signal(signal.SIGTERM)  # while idle, it ends the worker
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()


def test_worker_ends_by_itself_when_idle():
    worker = _serve("--idle-exit", "0.5")
    assert worker.wait(timeout=60) == 0


ANSWER_THEN_SIGTERM = """
import os, signal
from AIReconstructLib import cli, serve

def answer_then_sigterm(args, reporter):
    print('{"done": true}', flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the caller's Cancel, arriving just after the answer
    return 0

serve.serve(cli.build_parser(), cli.Reporter(True), answer_then_sigterm, 600)
"""


def test_a_sigterm_too_late_to_cancel_the_request_ends_the_worker():
    """A Cancel pressed as the run finished is not lost (the worker would otherwise wait for the next
    request with nothing to cancel): it ends the worker, as SIGTERM does while idle."""
    worker = subprocess.Popen([sys.executable, "-c", ANSWER_THEN_SIGTERM], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert _request(worker, "models")["done"]
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()


@pytest.mark.parametrize("arguments, message", [
    (["train", "data", "-o", "m", "--name", "x", "--epochs", "0"], "argument --epochs: must be an integer above 0, not 0"),
    (["train", "data", "-o", "m", "--name", "x", "--learning-rate", "nan"], "must be a finite number above 0, not nan"),
    (["train", "data", "-o", "m", "--name", "x", "--spacing", "1", "0", "1"], "argument --spacing: must be a finite"),
    (["train", "data", "-o", "m", "--name", "x", "--batch-size", "2.5"], "argument --batch-size: not an integer: 2.5"),
    (["train", "data", "-o", "m", "--name", "x", "--validation-fraction", "1"], "at least 0 and below 1, not 1"),
    (["surfaces", "labels.nii.gz", "-o", "s", "--decimate", "0.99"], "at least 0 and at most 0.95, not 0.99"),
    (["phantoms", "p", "--tumour-hu", "inf"], "argument --tumour-hu: must be a finite number, not inf"),
    (["benchmark", "data", "-o", "b", "--folds", "1"], "argument --folds: must be an integer at least 2, not 1"),
    (["federated", "a", "b", "-o", "f", "--name", "x", "--dp-delta", "1"], "above 0 and below 1, not 1"),
])
def test_a_number_no_run_can_use_is_a_one_line_usage_error(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(arguments)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_stops_early_gets_no_traceback():
    """``aireconstruct models | head -1``: the pipe is closed before the listing is printed."""
    process = subprocess.Popen([sys.executable, "-m", "AIReconstructLib", "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    process.stdout.close()  # the reader is gone before the engine has even started
    err = process.stderr.read()
    assert process.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
