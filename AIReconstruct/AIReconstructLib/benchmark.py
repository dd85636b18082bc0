"""``aireconstruct benchmark``: compare architectures, with and without adversarial refinement.

Every configuration is trained on the same cross-validation folds with the same seed, each run in
a process of its own (so its peak memory is its own; the cases, resampled and normalised once, are
shared through ``cache/`` in the output folder), and then segments its fold's held-out cases
on their original grids. Written to the output folder: ``cases.csv`` (metrics per case),
``segmentations/<configuration>/`` (each case's label map from the fold model that never saw it:
out-of-fold results, the segments ``train-guided --start-segments`` teaches a guided model to correct),
``table.csv`` and ``table.md`` (mean ± standard deviation over folds, parameters, training time
per epoch, inference time per volume, peak training memory), ``dice.png`` and, per architecture,
a Wilcoxon signed-rank test over cases of adversarial vs plain Dice: a difference is claimed only
when p < 0.05. A configuration already trained in the output folder with the same settings (an
interrupted comparison run again) is reused, not retrained, and so is its evaluation while its card,
the device and the engine's version are those it was evaluated with; one trained with other
settings (epochs, training arguments, ...) is refused, not reused under the new run's table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from . import __version__
from .dataset import read_dataset
from .errors import AIReconstructError, Cancelled
from .io import atomic_path, read_image_for_model, read_labelmap, write_csv, write_volume
from .metrics import evaluate
from .modelcard import load_card, sha256_of
from .networks import load_network
from .pipeline import SegmentOptions, segment

METRICS = ["dice", "iou", "accuracy", "hd95_mm", "sensitivity", "specificity"]


@dataclass
class BenchmarkConfig:
    """What to compare and with which training budget (the same for every configuration)."""

    dataset: str
    output: str
    architectures: list = field(default_factory=lambda: ["UNet", "SegResNet"])
    adversarial_variants: list = field(default_factory=lambda: [False, True])
    folds: int = 3
    epochs: int = 20
    iterations: int = 50
    batch_size: int = 2
    seed: int = 0
    device: str = "auto"
    extra_train_arguments: list = field(default_factory=list)  # e.g. --spacing 2 2 2 --patch-size ...


RUN_RECORD = "benchmark_run.json"
EVALUATION_RECORD = "benchmark_evaluation.json"


def _train_in_child(config: BenchmarkConfig, architecture: str, adversarial: bool, fold: int, folder: Path, cancel):
    """Train one configuration in its own process (unless already trained there); returns its peak
    resident memory in MiB, or None where an earlier run trained it without recording it. When
    ``cancel()`` turns true the child is asked to stop (SIGTERM: it cancels at its next iteration),
    waited for, and :class:`Cancelled` raised."""
    settings = ["--name", f"{architecture.lower()}{'-adv' if adversarial else ''}-fold{fold}",
                "--architecture", architecture, "--folds", str(config.folds), "--fold", str(fold),
                "--epochs", str(config.epochs), "--iterations", str(config.iterations),
                "--batch-size", str(config.batch_size), "--validate-every", str(config.epochs),
                "--seed", str(config.seed), "--device", config.device,
                *(["--adversarial"] if adversarial else []), *config.extra_train_arguments]
    record = folder / RUN_RECORD
    if (folder / "card.json").is_file():
        earlier = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        if earlier.get("settings", settings) != settings:  # (records older than the settings: not checked)
            raise AIReconstructError(f"{folder} holds a model trained otherwise ({' '.join(earlier['settings'])}); "
                                     "give the benchmark another output folder, or remove that one")
        return earlier.get("peak_rss_mib")
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "AIReconstructLib", "train", config.dataset, "-o", str(folder), *settings,
               "--json-progress", "--cache", str(Path(config.output) / "cache"),
               "--overwrite"]  # what a cancelled run of this configuration left there
    with open(folder / "train.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        status, usage = _wait_for_child(process, cancel)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        last = (folder / "train.log").read_text(encoding="utf-8").strip().splitlines()[-1:] or ["no output"]
        raise AIReconstructError(f"Training {architecture}{' + adversarial' if adversarial else ''} failed (see "
                                 f"{folder / 'train.log'}): {last[0][:300]}")
    peak = usage.ru_maxrss / 1024
    record.write_text(json.dumps({"peak_rss_mib": peak, "settings": settings}), encoding="utf-8")
    return peak


def _wait_for_child(process: subprocess.Popen, cancel) -> tuple[int, object]:
    """The child's wait status and resource usage once it has ended; a cancel request is passed on
    to it (after a minute without an answer it is killed) and raised as :class:`Cancelled`."""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return status, usage
        if cancel():
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise Cancelled("Benchmark cancelled by the user; the configurations finished so far are kept "
                            "and a re-run reuses them")
        time.sleep(0.2)


def _evaluate_fold(folder: Path, case_ids: list[str], dataset, device: str, cancel,
                   segmentations: Path) -> tuple[list[dict], dict]:
    """Segment the fold's held-out cases (their label maps written into ``segmentations``); per-case
    metrics and the model's figures."""
    card = load_card(folder)
    names = {label.value: label.name for label in card.labels}
    by_id = {case.case_id: case for case in dataset.cases}
    rows = []
    for case_id in case_ids:
        case = by_id[case_id]
        channels = [read_image_for_model(path) for path in case.images]
        started = time.perf_counter()
        result = segment(channels, card, SegmentOptions(device=device), cancel=cancel)
        seconds = time.perf_counter() - started
        write_volume(result.labelmap, segmentations / f"{case_id}{dataset.file_ending}")
        scores = evaluate(result.labelmap, read_labelmap(case.label, like=channels[0]), names)
        rows.append({"case": case_id, **{m: scores["mean"][m] for m in METRICS}, "inference_s": seconds})
    training = card.data["training"]
    figures = {"parameters": sum(p.numel() for p in load_network(card).parameters()),
               "train_s_per_epoch": 60 * training["minutes"] / max(training["epochs_run"], 1)}
    return rows, figures


def _evaluated_fold(folder: Path, case_ids: list[str], dataset, device: str, cancel,
                    segmentations: Path) -> tuple[list[dict], dict]:
    """:func:`_evaluate_fold`, or its result recorded by an earlier run for the same card, cases,
    device and engine version while the cases' label maps are still in ``segmentations``."""
    key = {"card_sha256": sha256_of(folder / "card.json"), "cases": case_ids, "device": device, "engine": __version__}
    record = folder / EVALUATION_RECORD
    written = all((segmentations / f"{case_id}{dataset.file_ending}").is_file() for case_id in case_ids)
    if record.is_file() and written:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["rows"], saved["figures"]
    segmentations.mkdir(parents=True, exist_ok=True)
    rows, figures = _evaluate_fold(folder, case_ids, dataset, device, cancel, segmentations)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"key": key, "rows": rows, "figures": figures}), encoding="utf-8")
    return rows, figures


def run_benchmark(config: BenchmarkConfig, progress=None, cancel=None) -> Path:
    """Train and evaluate every configuration; returns the path of ``table.md``. ``cancel()`` true
    stops the run (the training child with it) with :class:`Cancelled`."""
    report = progress or (lambda fraction, message: None)
    cancel = cancel or (lambda: False)
    dataset = read_dataset(config.dataset)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    runs = [(a, adv, f) for a in config.architectures for adv in config.adversarial_variants for f in range(config.folds)]
    case_rows, summary = [], {}
    for number, (architecture, adversarial, fold) in enumerate(runs):
        variant = f"{architecture}{' + adversarial' if adversarial else ''}"
        report(number / len(runs), f"training {variant}, fold {fold + 1}/{config.folds}")
        configuration = f"{architecture}{'-adversarial' if adversarial else ''}"
        folder = output / "models" / configuration / f"fold{fold}"
        peak_mib = _train_in_child(config, architecture, adversarial, fold, folder, cancel)
        held_out = json.loads((folder / "splits.json").read_text(encoding="utf-8"))["folds"][fold]["validation"]
        rows, figures = _evaluated_fold(folder, held_out, dataset, config.device, cancel,
                                        output / "segmentations" / configuration)
        for row in rows:
            case_rows.append({"architecture": architecture, "adversarial": adversarial, "fold": fold, **row})
        entry = summary.setdefault((architecture, adversarial), {"folds": [], **figures, "peak_rss_mib": []})
        entry["folds"].append({m: float(np.mean([r[m] for r in rows])) for m in METRICS + ["inference_s"]})
        entry["peak_rss_mib"].append(peak_mib)
    report(1.0, "writing the tables")
    write_csv(output / "cases.csv", case_rows)
    table = _table_rows(summary)
    write_csv(output / "table.csv", table)
    tests = _significance(case_rows, config)
    markdown = _markdown(config, table, tests, _plot(output / "dice.png", table))
    with atomic_path(output / "table.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    return output / "table.md"


def _table_rows(summary: dict) -> list[dict]:
    rows = []
    for (architecture, adversarial), entry in summary.items():
        row = {"architecture": architecture, "adversarial": adversarial}
        for metric in METRICS + ["inference_s"]:
            values = [fold[metric] for fold in entry["folds"]]
            row[f"{metric}_mean"], row[f"{metric}_sd"] = float(np.mean(values)), float(np.std(values))
        known = [peak for peak in entry["peak_rss_mib"] if peak is not None]
        row.update(parameters=entry["parameters"], train_s_per_epoch=round(entry["train_s_per_epoch"], 1),
                   peak_rss_mib=round(max(known)) if known else "n/a")
        rows.append(row)
    return rows


def _significance(case_rows: list[dict], config: BenchmarkConfig) -> dict[str, str]:
    """Wilcoxon signed-rank test over cases, adversarial vs plain Dice, per architecture."""
    if sorted(config.adversarial_variants) != [False, True]:
        return {}
    results = {}
    for architecture in config.architectures:
        dice = {adv: {r["case"]: r["dice"] for r in case_rows if r["architecture"] == architecture
                      and r["adversarial"] == adv} for adv in (False, True)}
        cases = sorted(set(dice[False]) & set(dice[True]))
        differences = [dice[True][c] - dice[False][c] for c in cases]
        if len(cases) < 2 or not any(differences):
            results[architecture] = f"not testable ({len(cases)} paired cases, mean difference {np.mean(differences or [0]):+.4f})"
            continue
        p = float(stats.wilcoxon(differences).pvalue)
        verdict = "significant" if p < 0.05 else "not significant"
        results[architecture] = (f"mean Dice difference {np.mean(differences):+.4f} over {len(cases)} cases, "
                                 f"Wilcoxon p = {p:.3f}: {verdict} at 0.05")
    return results


def _plot(path: Path, table: list[dict]) -> bool:
    """A bar plot of mean Dice ± SD per configuration, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['architecture']}{' +adv' if r['adversarial'] else ''}" for r in table]
    figure, axis = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.5))
    axis.bar(labels, [r["dice_mean"] for r in table], yerr=[r["dice_sd"] for r in table], capsize=4, color="#d98866")
    axis.set_ylabel("Dice (mean ± SD over folds)")
    axis.set_ylim(0, 1)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return True


def _markdown(config: BenchmarkConfig, table: list[dict], tests: dict, plotted: bool) -> str:
    lines = [f"# Architecture comparison on {Path(config.dataset).name}", "",
             f"{config.folds}-fold cross-validation, seed {config.seed}, {config.epochs} epochs x {config.iterations} "
             f"iterations, batch {config.batch_size}, device {config.device}. Mean ± SD over folds of the per-fold "
             "mean over held-out cases (each case on its original grid).", "",
             "| architecture | adversarial | Dice | IoU | accuracy | HD95 (mm) | sensitivity | specificity | "
             "parameters | train s/epoch | inference s/volume | peak train RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in table:
        cells = [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_sd']:.3f}" for m in METRICS]
        lines.append(f"| {r['architecture']} | {'yes' if r['adversarial'] else 'no'} | " + " | ".join(cells)
                     + f" | {r['parameters']:,} | {r['train_s_per_epoch']} | {r['inference_s_mean']:.2f} | "
                       f"{r['peak_rss_mib']} |")
    if tests:
        lines += ["", "Adversarial refinement vs none (paired over cases):", ""]
        lines += [f"- {architecture}: {result}" for architecture, result in tests.items()]
    lines += ["", "![Dice per configuration](dice.png)" if plotted else "(matplotlib is not installed: no plot)"]
    return "\n".join(lines) + "\n"
