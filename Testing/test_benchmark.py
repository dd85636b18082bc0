"""The architecture comparison end to end on a tiny budget: every table, figure and test is written."""

import csv
import json
import time
from pathlib import Path

import pytest

from AIReconstructLib import benchmark
from AIReconstructLib.cli import main
from AIReconstructLib.dataset import write_phantom_dataset
from AIReconstructLib.errors import Cancelled
from AIReconstructLib.io import read_labelmap, read_volume


def test_benchmark_compares_a_network_with_and_without_adversarial_refinement(tmp_path, capsys, monkeypatch):
    write_phantom_dataset(tmp_path / "data", count=3, first_seed=700, spacing=(6.0, 6.0, 8.0))
    command = ["benchmark", str(tmp_path / "data"), "-o", str(tmp_path / "bench"), "--architectures", "UNet",
               "--folds", "2", "--epochs", "1", "--iterations", "2", "--batch-size", "1",
               "--device", "cpu", "--train-arguments", "--spacing", "8", "8", "8", "--patch-size", "32", "32", "32",
               "--adversarial-warmup", "0"]
    assert main(command) == 0
    with open(tmp_path / "bench" / "table.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["architecture"], r["adversarial"]) for r in table] == [("UNet", "False"), ("UNet", "True")]
    for row in table:
        assert 0 <= float(row["dice_mean"]) <= 1 and float(row["dice_sd"]) >= 0
        assert int(row["parameters"]) > 0 and float(row["peak_rss_mib"]) > 100
    with open(tmp_path / "bench" / "cases.csv", encoding="utf-8") as handle:
        cases = list(csv.DictReader(handle))
    assert len(cases) == 2 * 3  # every configuration segments each of the 3 cases once, in its held-out fold
    markdown = (tmp_path / "bench" / "table.md").read_text(encoding="utf-8")
    assert "| UNet | yes |" in markdown
    assert "- UNet: " in markdown and ("Wilcoxon" in markdown or "not testable" in markdown)
    assert (tmp_path / "bench" / "dice.png").stat().st_size > 1000
    assert len(list((tmp_path / "bench" / "cache").glob("*.safetensors"))) == 3  # each case prepared once
    for configuration in ("UNet", "UNet-adversarial"):  # each case's out-of-fold label map, on its grid
        written = sorted((tmp_path / "bench" / "segmentations" / configuration).iterdir())
        assert [p.name for p in written] == [f"phantom_{seed:04d}.nii.gz" for seed in (700, 701, 702)]
        for path in written:
            image = read_volume(tmp_path / "data" / "imagesTr" / path.name.replace(".nii.gz", "_0000.nii.gz"))
            assert read_labelmap(path, like=image).array.max() <= 9
    assert "Architecture comparison" in capsys.readouterr().out
    # run again: every configuration is already trained and evaluated there, so both are reused and the
    # tables rewritten; a changed card is evaluated again, and so is a fold whose label maps are gone
    trained = sorted(p.stat().st_mtime for p in (tmp_path / "bench" / "models").rglob("model.safetensors"))
    evaluated, real = [], benchmark._evaluate_fold
    monkeypatch.setattr(benchmark, "_evaluate_fold", lambda folder, *rest: evaluated.append(folder) or real(folder, *rest))
    changed = tmp_path / "bench" / "models" / "UNet" / "fold1" / "card.json"
    changed.write_text(changed.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    held_out = json.loads((changed.parent / "splits.json").read_text(encoding="utf-8"))["folds"][0]["validation"]
    (tmp_path / "bench" / "segmentations" / "UNet-adversarial" / f"{held_out[0]}.nii.gz").unlink()
    assert main(command) == 0
    assert sorted(p.stat().st_mtime for p in (tmp_path / "bench" / "models").rglob("model.safetensors")) == trained
    assert evaluated == [changed.parent, tmp_path / "bench" / "models" / "UNet-adversarial" / "fold0"]
    assert (tmp_path / "bench" / "cases.csv").read_text(encoding="utf-8").count("\n") == 1 + 2 * 3
    table = (tmp_path / "bench" / "table.md").read_text(encoding="utf-8")
    # with another budget the models there are not this run's: refused, rather than tabled as its
    assert main([*command[:9], "5", *command[10:]]) == 2  # 5 epochs instead of 1
    assert "holds a model trained otherwise" in capsys.readouterr().err
    assert (tmp_path / "bench" / "table.md").read_text(encoding="utf-8") == table


def test_a_configuration_that_fails_to_train_is_named_with_its_log(tmp_path, capsys):
    write_phantom_dataset(tmp_path / "data", count=2, first_seed=700, spacing=(6.0, 6.0, 8.0))
    code = main(["benchmark", str(tmp_path / "data"), "-o", str(tmp_path / "bench"), "--architectures", "SwinUNETR",
                 "--folds", "2", "--epochs", "1", "--iterations", "1", "--no-adversarial", "--device", "cpu",
                 "--train-arguments", "--patch-size", "40", "40", "40"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert f"Training SwinUNETR failed (see {tmp_path / 'bench' / 'models' / 'SwinUNETR' / 'fold0' / 'train.log'})" in error
    assert "cannot take patches of 40 x 40 x 40 voxels" in error


def test_cancelling_stops_the_training_child_and_writes_no_table(tmp_path):
    """A cancel (SIGTERM or Ctrl-C to the command) used to leave the benchmark waiting
    for its training child, which went on to the end of its budget."""
    write_phantom_dataset(tmp_path / "data", count=2, first_seed=700, spacing=(6.0, 6.0, 8.0))
    config = benchmark.BenchmarkConfig(dataset=str(tmp_path / "data"), output=str(tmp_path / "bench"),
                                       architectures=["UNet"], adversarial_variants=[False], folds=2,
                                       epochs=1000, iterations=1000, batch_size=1, device="cpu",
                                       extra_train_arguments=["--spacing", "8", "8", "8", "--patch-size", "32", "32", "32"])
    log = tmp_path / "bench" / "models" / "UNet" / "fold0" / "train.log"
    started, child_seen = time.monotonic(), []

    def cancel():  # a second after the training child has started
        if log.is_file() and not child_seen:
            child_seen.append(time.monotonic())
        return bool(child_seen) and time.monotonic() - child_seen[0] > 1

    with pytest.raises(Cancelled, match="Benchmark cancelled"):
        benchmark.run_benchmark(config, cancel=cancel)
    assert time.monotonic() - started < 120
    assert not any(str(tmp_path / "bench").encode() in _read_or_empty(cmdline)  # no training process left
                   for cmdline in Path("/proc").glob("[0-9]*/cmdline"))
    assert not (tmp_path / "bench" / "models" / "UNet" / "fold0" / "card.json").exists()
    assert not (tmp_path / "bench" / "table.md").exists()


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended meanwhile
        return b""
