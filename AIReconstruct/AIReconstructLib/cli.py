"""The ``aireconstruct`` command line: every engine job without Slicer.

Errors print one line (``aireconstruct: error: ...``) and exit non-zero; ``--debug`` shows the
traceback. ``--json-progress`` prints one JSON object per line on stdout instead of a progress
bar (``{"progress": 0.42, "message": ...}``, then ``{"done": true, ...}`` or ``{"error": ...}``),
which is how the Slicer module follows a run. SIGTERM or Ctrl-C cancels within one window and
leaves the output folder as it was.

This module has segment, segment-folder and the model commands; the commands that work on a
segmentation are in :mod:`cli_results`, those that make models in :mod:`cli_training`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .errors import AIReconstructError, Cancelled, InputError, OutputError


def number(kind=float, above=None, at_least=None, below=None, at_most=None):
    """An argparse ``type``: a finite ``kind`` (int or float) within the bounds given, so that a value
    no run can use is a one-line usage error."""
    bounds = {"above": (above, lambda v, b: v > b), "at least": (at_least, lambda v, b: v >= b),
              "below": (below, lambda v, b: v < b), "at most": (at_most, lambda v, b: v <= b)}
    bounds = {name: test for name, test in bounds.items() if test[0] is not None}

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text}") from None
        if not (math.isfinite(value) and all(within(value, bound) for bound, within in bounds.values())):
            limits = " and ".join(f"{name} {bound}" for name, (bound, _) in bounds.items())
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what}{' ' * bool(limits)}{limits}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class Reporter:
    """Progress as a tqdm bar on stderr, or as JSON lines on stdout."""

    def __init__(self, json_lines: bool):
        self.json_lines = json_lines
        self.bar = None
        self.cancelled = False

    def progress(self, fraction: float, message: str) -> None:
        if self.json_lines:
            print(json.dumps({"progress": round(fraction, 4), "message": message}), flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}", file=sys.stderr)
        self.bar.set_description(message[:40])
        self.bar.update(int(fraction * 1000) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def result(self, text: str, data: dict) -> None:
        self.close()
        if self.json_lines:
            print(json.dumps({"done": True, **data}), flush=True)
        else:
            print(text)

    def cancel_requested(self) -> bool:
        return self.cancelled


# arguments that do not change what segment writes: where from and to, which model (recorded by name
# and version), and what runs the network
NOT_SHAPING_THE_RESULT = {"func", "command", "json_progress", "debug", "inputs", "folder", "output", "overwrite",
                          "model", "device", "backend"}


def _result_options(args) -> dict:
    """The options a result is made with (every other argument of segment / segment-folder)."""
    return {key: value for key, value in sorted(vars(args).items()) if key not in NOT_SHAPING_THE_RESULT}


def _segment_and_write(inputs, stem: str, output, card, args, progress, cancel_requested) -> tuple[list, dict]:
    """Segment one case (an input per channel) and write its result set into ``output``, all files
    at once or none: (the files written, the summary)."""
    from .cli_results import mesh_suffixes
    from .export import export_segmentation
    from .io import StagedOutput, read_image_for_model
    from .pipeline import SegmentOptions, segment

    if args.dicom_seg:
        from .dicomseg import series_folder_of

        series_folder_of(inputs[0])  # before any work: an input that is not a DICOM series is refused
    started = time.perf_counter()
    channels = [read_image_for_model(path) for path in inputs]
    read_seconds = time.perf_counter() - started
    options = SegmentOptions(device=args.device, fast=args.fast, tta=args.tta, postprocess=not args.no_postprocess,
                             cpu_bfloat16=args.cpu_bfloat16, uncertainty=args.uncertainty, backend=args.backend)
    with StagedOutput(output) as out:
        result = segment(channels, card, options, progress, cancel_requested)
        result.seconds = {"read": read_seconds, **result.seconds}
        formats = mesh_suffixes(args.surface_format) if args.surfaces else ()
        summary = export_segmentation(result, out, stem, formats, args.smoothing, args.decimate, args.coordinates,
                                      args.max_triangles, report_image=channels[0] if args.report else None,
                                      margin_mm=args.margin, for_import=args.for_import,
                                      dicom_series=inputs[0] if args.dicom_seg else None, options=_result_options(args))
        if cancel_requested():
            raise Cancelled("Cancelled by the user; nothing was written")
        return out.commit(), summary


def cmd_segment(args, reporter: Reporter) -> None:
    from .io import image_stem
    from .modelcard import find_model

    card = find_model(args.model)
    written, summary = _segment_and_write(args.inputs, image_stem(args.inputs[0]), args.output, card, args,
                                          reporter.progress, reporter.cancel_requested)
    parts = {name: lesion["count"] for name, lesion in summary.get("lesion_parts", {}).items()}
    lines = [f"{name}: {volume:.1f} mL" + (f" in {parts[name]} separate parts" if parts.get(name, 1) > 1 else "")
             for name, volume in summary["volumes_ml"].items()]
    lines += [f"check: {r['size_ml']:.2f} mL of uncertainty {r['mean_uncertainty']:.2f} around "
              f"({', '.join(f'{c:.1f}' for c in r['centre_mm'])}) mm {args.coordinates}"
              for r in summary.get("flagged_regions", [])]
    reporter.result("\n".join(lines + [f"wrote {path}" for path in written]),
                    {"outputs": [str(p) for p in written], "summary": summary})


def _earlier_summary(path: Path, card, args) -> dict | None:
    """The summary a previous run wrote for a case with this model (name and version) and these
    options, or None where there is none (or it was made otherwise: its result is not this run's)."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    made_alike = (summary.get("model"), summary.get("model_version"), summary.get("options")) == \
        (card.name, card.data["version"], _result_options(args))
    return summary if made_alike else None


def cmd_segment_folder(args, reporter: Reporter) -> None:
    """Every case of a folder into ``OUTPUT/<case>/``; a case whose input is unusable is noted and
    skipped, and cases already segmented there with the same model, version and options are kept
    (unless ``--overwrite``); the others are segmented again. ``cases.csv``
    (status, volumes, seconds per case) is rewritten after each case."""
    from .io import find_cases, write_csv
    from .modelcard import find_model

    card = find_model(args.model)
    cases = find_cases(args.folder, len(card.channels))
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot write into {output}: {error.strerror or error}") from None
    rows = []
    for n, (case, inputs) in enumerate(cases):
        row = {"case": case, "status": "done", "error": ""}
        summary = None if args.overwrite else _earlier_summary(output / case / f"{case}_summary.json", card, args)
        try:
            if summary is not None:
                row["status"] = "done before"
            else:
                _, summary = _segment_and_write(
                    inputs, case, output / case, card, args,
                    lambda fraction, message, n=n, case=case: reporter.progress((n + fraction) / len(cases),
                                                                                f"{case}: {message}"),
                    reporter.cancel_requested)
        except InputError as error:  # this case's input: the others go on
            row.update(status="failed", error=str(error))
        else:
            row["seconds"] = round(sum(summary["seconds"].values()), 2)
            row.update({f"{name} (mL)": round(volume, 2) for name, volume in summary["volumes_ml"].items()})
        rows.append(row)
        write_csv(output / "cases.csv", rows)
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:
        reasons = "; ".join(f"{row['case']}: {row['error']}" for row in failed[:3]) + ("; ..." if len(failed) > 3 else "")
        raise InputError(f"{len(failed)} of {len(rows)} cases could not be segmented ({reasons}); "
                         f"the others are in {output}, see {output / 'cases.csv'}")
    reporter.result("\n".join(f"{row['case']}: {row['status']}" for row in rows) + f"\nwrote {output / 'cases.csv'}",
                    {"cases": rows, "table": str(output / "cases.csv")})


def cmd_models(args, reporter: Reporter) -> None:
    from .modelcard import installed_models, model_folders

    cards = installed_models()
    text = "\n".join(card.summary() for card in cards) or "no models installed"
    text += "\nsearched: " + ", ".join(str(folder) for folder in model_folders())
    reporter.result(text, {"models": [card.data for card in cards]})


def cmd_import_model(args, reporter: Reporter) -> None:
    from .importers import import_model

    saved = import_model(args.kind, args.path, args.output, name=args.name, card=args.card, labels=args.labels,
                         task=args.task, download=args.download, url=args.url, configuration=args.configuration,
                         folds=args.folds, checkpoint=args.checkpoint, modality=args.modality,
                         orientation=args.orientation, licence=args.licence, intended_use=args.intended_use,
                         previous_stage=args.previous_stage, skull_stripped=args.skull_stripped,
                         progress=reporter.progress, cancel=reporter.cancel_requested)
    reporter.result(f"imported {saved.summary()}\ncard: {saved.folder / 'card.json'}",
                    {"card": str(saved.folder / "card.json"), "name": saved.name})


def cmd_demo(args, reporter: Reporter) -> None:
    from .demo import run_demo

    text, data = run_demo(Path(args.output), args.seed, args.extra_cases, args.device, reporter.progress,
                          reporter.cancel_requested)
    reporter.result(text, data)


def cmd_serve(args, reporter: Reporter) -> None:
    """Run commands one after another, each a JSON list of arguments on a line of stdin, until stdin
    closes or none comes for ``--idle-exit`` seconds. SIGTERM cancels the running command (the
    worker goes on to the next); while idle it ends the worker."""
    from .serve import serve

    reporter.json_lines = True
    serve(build_parser(), reporter, run_command, args.idle_exit)


def build_parser() -> argparse.ArgumentParser:
    from .cli_results import add_mesh_options, add_result_commands
    from .cli_training import add_training_commands
    from .importers import KINDS
    from .totalsegmentator import TASKS as TOTALSEGMENTATOR_TASKS

    parser = argparse.ArgumentParser(prog="aireconstruct", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json-progress", action="store_true", help="progress as JSON lines on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    segmenting = argparse.ArgumentParser(add_help=False)  # the options of segment and segment-folder
    segmenting.add_argument("-m", "--model", required=True, help="installed model name or path of a model card")
    segmenting.add_argument("-o", "--output", required=True, help="output folder")
    segmenting.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    segmenting.add_argument("--fast", action="store_true", help="coarser spacing, where the model allows it")
    segmenting.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    segmenting.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                            help="what runs the network on the CPU: OpenVINO where installed (auto), or PyTorch")
    segmenting.add_argument("--cpu-bfloat16", action="store_true",
                            help="run the network in bfloat16 on the CPU: about 2x faster on CPUs with BF16 "
                                 "instructions; labels may differ at near-ties (docs/benchmarks.md)")
    segmenting.add_argument("--surfaces", action="store_true", help="also write one mesh per segment")
    segmenting.add_argument("--no-postprocess", action="store_true", help="skip the card's post-processing")
    segmenting.add_argument("--uncertainty", action="store_true", help="also write <name>_uncertainty.nii.gz "
                            "(0-1), per-segment confidence and the regions to check")
    segmenting.add_argument("--report", action="store_true",
                            help="also write <name>_report.html: measurements, slices through lesions, 3D view")
    segmenting.add_argument("--margin", type=number(at_least=0), default=10.0,
                            help="safety margin around lesions for the remnant, mm")
    segmenting.add_argument("--dicom-seg", action="store_true",
                            help="also write <name>_seg.dcm, a DICOM Segmentation referring to the input's DICOM "
                                 "series, and <name>_sr.dcm, a DICOM SR measurement report of its segments' volumes "
                                 "(with --report also each lesion's organ and axial long and short axes) (the input must be a "
                                 "DICOM series folder; needs the dicom extra)")
    add_mesh_options(segmenting)

    p = sub.add_parser("segment", parents=[common, segmenting], help="segment an image with a model")
    p.add_argument("inputs", nargs="+", help="input volume(s): one per model channel (file or DICOM folder)")
    p.add_argument("--for-import", action="store_true",
                   help="for a caller that imports the result at once (the Slicer module): write the .seg.nrrd "
                        "uncompressed and no <name>_labels.nii.gz")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("segment-folder", parents=[common, segmenting],
                       help="segment every case of a folder into OUTPUT/<case>/, with a table of all cases")
    p.add_argument("folder", help="image files (one per case, or CASE_0000, CASE_0001, ... one per channel) "
                                  "and DICOM series folders")
    p.add_argument("--overwrite", action="store_true",
                   help="segment cases again that an earlier run has already segmented into OUTPUT")
    p.set_defaults(func=cmd_segment_folder, for_import=False)

    add_result_commands(sub, common)

    p = sub.add_parser("models", parents=[common], help="list installed model cards")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("import-model", parents=[common],
                       help="write a model card for a model trained elsewhere, so it can be used like any other")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("path", help="nnunet: the trained model folder (dataset.json, plans.json, fold_N/); "
                                "totalsegmentator: the folder that holds (or gets, with --download) its weights; "
                                "monai-bundle: the bundle folder (configs/, models/; with --download, named as the "
                                "bundle in MONAI's model zoo, e.g. wholeBody_ct_segmentation); torchscript, onnx: the network file")
    p.add_argument("--card", help="torchscript, onnx: hand-written card JSON (all but architecture and weights)")
    p.add_argument("--task", default="total-fast", choices=list(TOTALSEGMENTATOR_TASKS),
                   help="totalsegmentator: total (five part models, 1.5 mm), total-fast (one, 3 mm), their MRI "
                        "models total-mr and total-mr-fast, or a lung or liver model (each run inside the lungs "
                        "or liver that total-fast finds first, imported with it)")
    p.add_argument("--download", action="store_true",
                   help="totalsegmentator: download the weights first; monai-bundle: download the bundle first "
                        "from MONAI's model zoo (unless the folder holds it)")
    p.add_argument("--url", help="totalsegmentator: a mirror of its GitHub release archives, laid out the same way; "
                                 "monai-bundle: a zip of the bundle")
    p.add_argument("-o", "--output", help="folder for the card (default ~/.aireconstruct/models/NAME)")
    p.add_argument("--name", help="model name (default from the data set and configuration)")
    p.add_argument("--configuration", help="nnU-Net configuration (default: the checkpoint's)")
    p.add_argument("--folds", nargs="+", help="nnU-Net folds to ensemble (default: all found)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--previous-stage", help="nnU-Net cascade: the first stage's model folder (default: beside it)")
    p.add_argument("--modality", choices=["CT", "MR", "PT", "US", "OTHER"])
    p.add_argument("--orientation", help="axis codes the model was trained in (e.g. SAR for RAS-canonical NIfTI); "
                                         "default: images as stored, as nnU-Net reads them")
    p.add_argument("--labels", help="JSON object: label name -> {name, color, terminology} for the card")
    p.add_argument("--licence", default="See the model's source")
    p.add_argument("--intended-use")
    p.add_argument("--skull-stripped", action="store_true",
                   help="the model was trained on skull-stripped brains: images that are not are refused")
    p.set_defaults(func=cmd_import_model)

    p = sub.add_parser("demo", parents=[common], help="segment a synthetic CT phantom with the demo model")
    p.add_argument("-o", "--output", default="demo-output")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (the demo model never saw seeds < 1000)")
    p.add_argument("--extra-cases", type=number(int, at_least=0), default=2, help="further unseen phantoms for the mean Dice")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_demo)

    add_training_commands(sub, common)

    p = sub.add_parser("serve", parents=[common],
                       help="a long-lived engine for the Slicer module: runs the commands it reads from stdin "
                            "(one JSON list of arguments per line) with JSON progress, without starting again")
    p.add_argument("--idle-exit", type=number(above=0), default=600.0, help="end after this many seconds without a command")
    p.set_defaults(func=cmd_serve)
    return parser


def run_command(args, reporter: Reporter) -> int:
    """Run one parsed command; an engine error becomes one line (and a JSON line) and an exit code."""
    try:
        args.func(args, reporter)
        return 0
    except AIReconstructError as error:
        reporter.close()
        if args.debug:
            raise
        if args.json_progress:
            print(json.dumps({"error": str(error), "cancelled": isinstance(error, Cancelled)}), flush=True)
        print(f"aireconstruct: error: {error}", file=sys.stderr)
        return error.exit_code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a terminal without UTF-8 must not crash a finished run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    reporter = Reporter(args.json_progress)

    def request_cancel(signum, frame):
        reporter.cancelled = True

    signal.signal(signal.SIGTERM, request_cancel)
    signal.signal(signal.SIGINT, request_cancel)
    try:
        return run_command(args, reporter)
    except BrokenPipeError:  # the reader of stdout went away (``aireconstruct models | head``): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
