"""The ``aireconstruct`` commands that work on a segmentation once it exists: evaluate, surfaces,
report, refine (correct with points), saliency and calibrate, and the mesh options that segment
shares (added to the parser of :mod:`cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import number
from .errors import AIReconstructError, InputError

if TYPE_CHECKING:
    from .cli import Reporter

METRIC_COLUMNS = ("dice", "iou", "hd95_mm", "asd_mm", "sensitivity", "specificity", "volume_ml", "reference_volume_ml")


def mesh_suffixes(formats: list[str]) -> list[str]:
    """File suffixes of the mesh formats asked for (``stl``, ``.VTP``...); unknown ones are an error."""
    from .meshfiles import MESH_FORMATS

    suffixes = ["." + f.lower().lstrip(".") for f in formats]
    for suffix in suffixes:
        if suffix not in MESH_FORMATS:
            raise AIReconstructError(f"Unknown mesh format '{suffix}' (use {', '.join(MESH_FORMATS)})")
    return suffixes


def add_mesh_options(p) -> None:
    """The surface options that segment and surfaces share."""
    p.add_argument("--format", "--surface-format", dest="surface_format", nargs="+", default=["stl", "vtp"],
                   help="mesh formats: stl ply vtp (a file per segment), obj glb 3mf (one scene of all segments)")
    p.add_argument("--smoothing", type=number(at_least=0, at_most=1), default=0.5, help="surface smoothing, 0 (none) to 1 (strong)")
    p.add_argument("--decimate", type=number(at_least=0, at_most=0.95), default=0.0, help="fraction of triangles to remove (0-0.95)")
    p.add_argument("--max-triangles", type=number(int, above=0), help="at most about this many triangles per segment")
    p.add_argument("--coordinates", choices=["LPS", "RAS"], default="LPS", help="mesh coordinate system")


def _evaluate_case(prediction_path, reference_path, card) -> tuple[dict, object, object]:
    """Metrics of one prediction (label map or ``.seg.nrrd``) against its reference label map, with
    the model's label names, else the ``.seg.nrrd``'s, else "label N": (metrics, prediction, reference)."""
    import numpy as np

    from .io import read_labelmap
    from .metrics import evaluate, label_voxel_counts
    from .segnrrd import read_segmentation

    reference = read_labelmap(reference_path)
    prediction, labels = read_segmentation(prediction_path, card, like=reference)
    if card is not None or str(prediction_path).lower().endswith(".seg.nrrd"):
        names = {label.value: label.name for label in labels}
    else:
        values = np.union1d(np.flatnonzero(label_voxel_counts(prediction.array)),
                            np.flatnonzero(label_voxel_counts(reference.array)))
        names = {int(value): f"label {value}" for value in values if value}
    return evaluate(prediction, reference, names), prediction, reference


def cmd_evaluate(args, reporter: Reporter) -> None:
    from .modelcard import find_model

    card = find_model(args.model) if args.model else None
    if Path(args.reference).is_dir():
        _evaluate_folders(args, card, reporter)
        return
    if Path(args.prediction).is_dir():
        raise InputError(f"{args.prediction} is a folder but {args.reference} is a file: evaluate compares two label "
                         "maps, or a folder of predictions with a folder of references")
    result, prediction, reference = _evaluate_case(args.prediction, args.reference, card)
    if args.uncertainty:
        from .uncertainty import error_detection_auc

        uncertainty = _map_on_grid(args.uncertainty, reference)
        result["uncertainty_error_auc"] = error_detection_auc(uncertainty, prediction.array, reference.array)
    if args.confidence:
        from .calibration import plot_reliability, pool_case, reliability_tables

        tables = reliability_tables()
        pool_case(_map_on_grid(args.confidence, reference), prediction.array, reference.array, tables)
        result["ece"] = {name: table.ece() for name, table in tables.items()}
        result["reliability"] = {name: table.table() for name, table in tables.items()}
        if args.reliability and not plot_reliability(tables, args.reliability):
            raise AIReconstructError("The reliability diagram needs matplotlib: pip install matplotlib")
    rows = [f"{'label':<20} {'Dice':>6} {'IoU':>6} {'HD95 mm':>8} {'ASD mm':>7}"]
    for name, s in result["labels"].items():
        if s["present"]:
            rows.append(f"{name:<20} {s['dice']:6.3f} {s['iou']:6.3f} {s['hd95_mm']:8.2f} {s['asd_mm']:7.2f}")
    m = result["mean"]
    rows.append(f"{'mean':<20} {m['dice']:6.3f} {m['iou']:6.3f} {m['hd95_mm']:8.2f} {m['asd_mm']:7.2f}")
    rows.append(f"voxel accuracy {result['accuracy']:.4f}")
    if result.get("uncertainty_error_auc") is not None:
        rows.append(f"uncertainty finds wrong voxels with AUC {result['uncertainty_error_auc']:.3f}")
    for name, ece in result.get("ece", {}).items():
        rows.append(f"expected calibration error ({name}): {ece:.4f}")
    if args.json:
        from .io import atomic_path
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    reporter.result("\n".join(rows), result)


def _prediction_of(folder: Path, case: str) -> Path | None:
    """A case's prediction in ``folder``: ``CASE/CASE.seg.nrrd`` (as segment-folder writes it), else
    ``CASE.seg.nrrd`` or a label map ``CASE.nii.gz`` (or another image suffix)."""
    from .io import IMAGE_SUFFIXES

    candidates = [folder / case / f"{case}.seg.nrrd", folder / f"{case}.seg.nrrd"]
    return next((path for path in candidates + [folder / f"{case}{suffix}" for suffix in IMAGE_SUFFIXES]
                 if path.is_file()), None)


def _evaluate_folders(args, card, reporter: Reporter) -> None:
    """Every reference label map of a folder that has a prediction against it: one row per case
    and label, and per label the mean ± standard deviation over the cases; the reference cases
    without a prediction are named (a test subset segmented, or cases whose run failed)."""
    import math

    import numpy as np

    from .io import atomic_path, find_cases, write_csv

    if args.uncertainty or args.confidence:
        raise InputError("--uncertainty and --confidence take one case; `aireconstruct calibrate` takes a data set")
    predictions = Path(args.prediction)
    cases = [(case, _prediction_of(predictions, case), paths[0]) for case, paths in find_cases(args.reference, 1)]
    pairs = [(case, prediction, reference) for case, prediction, reference in cases if prediction is not None]
    missing = [case for case, prediction, _ in cases if prediction is None]
    if not pairs:
        raise InputError(f"{predictions} has a prediction for none of the {len(cases)} cases of {args.reference}")
    rows = []
    for n, (case, prediction, reference) in enumerate(pairs):
        reporter.progress(n / len(pairs), f"evaluating {case}")
        result, _, _ = _evaluate_case(prediction, reference, card)
        rows += [{"case": case, "label": name, **{key: s[key] for key in METRIC_COLUMNS}}
                 for name, s in result["labels"].items() if s["present"]]
    summary = {}
    for name in dict.fromkeys(row["label"] for row in rows):
        scores = [row for row in rows if row["label"] == name]
        entry = {"cases": len(scores), "missed": sum(not math.isfinite(row["hd95_mm"]) for row in scores)}
        for key in ("dice", "iou", "hd95_mm", "asd_mm"):
            values = [row[key] for row in scores if math.isfinite(row[key])]  # distances: the cases with both masks
            entry[key] = {"mean": float(np.mean(values)) if values else math.nan,
                          "sd": float(np.std(values)) if values else math.nan}
        summary[name] = entry
    text = [f"{'label':<20} {'cases':>5}  {'Dice':<15} {'IoU':<15} {'HD95 mm':<15} ASD mm"]
    for name, e in summary.items():
        cells = [f"{e[key]['mean']:.{digits}f} ± {e[key]['sd']:.{digits}f}"
                 for key, digits in (("dice", 3), ("iou", 3), ("hd95_mm", 2), ("asd_mm", 2))]
        missed = f" ({e['missed']} missed: no distance)" if e["missed"] else ""
        text.append((f"{name:<20} {e['cases']:>5}  " + " ".join(f"{cell:<15}" for cell in cells)).rstrip() + missed)
    if missing:
        text.append(f"not evaluated, no prediction: {len(missing)} of the {len(cases)} cases "
                    f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    result = {"labels": summary, "cases": rows, "not_evaluated": missing}
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    reporter.result("\n".join(text), result)


def _map_on_grid(path: str, reference):
    """A 0-1 map (uncertainty, confidence) that must lie on the reference's grid, as an array."""
    from .io import read_volume

    values = read_volume(path)
    if not values.same_grid(reference):
        raise AIReconstructError(f"{Path(path).name} does not match the reference's grid")
    return values.array


def cmd_surfaces(args, reporter: Reporter) -> None:
    from .export import export_surfaces
    from .io import StagedOutput
    from .modelcard import find_model
    from .segnrrd import read_segmentation

    labelmap, labels = read_segmentation(args.labelmap, find_model(args.model) if args.model else None)
    if not labelmap.array.any():
        raise InputError(f"{args.labelmap} holds no segment (every voxel is background): there is no surface to build")
    with StagedOutput(args.output) as out:
        measurements = export_surfaces(labelmap, labels, out, mesh_suffixes(args.surface_format), args.smoothing,
                                       args.decimate, args.coordinates, folder=".", max_triangles=args.max_triangles)
        written = out.commit()
    text = "\n".join(f"{name}: {m['volume_ml']:.1f} mL, {m['triangles']} triangles, closed={m['closed']}"
                     for name, m in measurements.items())
    reporter.result(text, {"outputs": [str(p) for p in written], "surfaces": measurements})


def cmd_report(args, reporter: Reporter) -> None:
    from .io import read_volume
    from .modelcard import find_model
    from .report import build_report, model_of_record, write_report
    from .segnrrd import made_by, read_segmentation

    image = read_volume(args.image)
    if args.model:
        card = find_model(args.model)
        model = card.data
    else:  # the model recorded in the engine's .seg.nrrd, if any
        card, model = model_of_record(*(made_by(args.labelmap) or (None, None)), Path(args.labelmap).name)
    labelmap, labels = read_segmentation(args.labelmap, card, like=image)
    reference = read_segmentation(args.reference, like=image)[0] if args.reference else None
    uncertainty = read_volume(args.uncertainty) if args.uncertainty else None
    page, measured = build_report(image, labelmap, labels, model, reference, args.margin, args.coordinates,
                                  uncertainty=uncertainty, image_name=args.image_name or Path(args.image).name,
                                  progress=reporter.progress, cancel=reporter.cancel_requested)
    path = write_report(page, args.output)
    lines = [f"{s['name']}: {s['volume_ml']:.1f} mL, largest diameter {s['largest_diameter_mm']:.1f} mm"
             for s in measured["segments"]]
    reporter.result("\n".join(lines + [f"wrote {path}"]), {"outputs": [str(path)], "measurements": measured})


def cmd_refine(args, reporter: Reporter) -> None:
    from .interaction import refine_labelmap
    from .io import read_volume, write_volume
    from .modelcard import find_model
    from .segnrrd import made_by, read_segmentation, write_seg_nrrd

    image = read_volume(args.image)
    labelmap, labels = read_segmentation(args.labelmap, find_model(args.model) if args.model else None, like=image)
    by_name = {label.name: label.value for label in labels}
    value = by_name.get(args.label) or (int(args.label) if args.label.isdigit() else None)
    if value not in by_name.values():
        hint = "" if args.model else "; -m MODEL gives a label map its model's label names"
        raise AIReconstructError(f"No segment '{args.label}' in {Path(args.labelmap).name} "
                                 f"(it has: {', '.join(f'{name} = {value}' for name, value in by_name.items())}{hint})")
    box = [args.box[:3], args.box[3:]] if args.box else None
    method = None
    if args.guided:
        from .guided import GuidedRefiner
        method = GuidedRefiner(find_model(args.guided))
    refined = refine_labelmap(image, labelmap, value, args.include or [], args.exclude or [], box, args.coordinates,
                              method=method)
    output = Path(args.output)
    path = (write_seg_nrrd(refined, labels, output, made_by=made_by(args.labelmap))  # still that model's, corrected
            if output.name.lower().endswith(".seg.nrrd") else write_volume(refined, output))
    change = int((refined.array != labelmap.array).sum())
    reporter.result(f"{change} voxels changed; wrote {path}", {"outputs": [str(path)], "changed_voxels": change})


def cmd_saliency(args, reporter: Reporter) -> None:
    from .io import read_image_for_model, write_map
    from .modelcard import find_model
    from .saliency import saliency

    channels = [read_image_for_model(path) for path in args.inputs]
    device = "cuda" if args.device == "cuda" else "cpu"
    path = write_map(saliency(channels, find_model(args.model), args.segment, device), args.output)
    reporter.result(f"wrote {path}", {"outputs": [str(path)]})


def cmd_calibrate(args, reporter: Reporter) -> None:
    from .calibration import run_calibration

    text, data = run_calibration(args.dataset, args.model, args.output, args.cases, args.device,
                                 reporter.progress, reporter.cancel_requested)
    reporter.result(text, data)


def add_result_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aireconstruct`` subparsers."""
    p = sub.add_parser("evaluate", parents=[common],
                       help="Dice, IoU, accuracy, HD95 of a prediction, or of a folder of them (mean ± SD)")
    p.add_argument("prediction", help="a label map or .seg.nrrd; or a folder of them (as segment-folder writes "
                                      "them, CASE/CASE.seg.nrrd, or CASE.seg.nrrd, CASE.nii.gz...)")
    p.add_argument("reference", help="the reference label map; or a folder of them, CASE.nii.gz (e.g. labelsTr)")
    p.add_argument("-m", "--model", help="model whose label names to use")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--csv", help="folders: also write one row per case and label to this CSV file")
    p.add_argument("--uncertainty", help="an uncertainty map (segment --uncertainty): how well it finds wrong voxels (AUC)")
    p.add_argument("--confidence", help="a confidence map (segment --uncertainty): expected calibration error")
    p.add_argument("--reliability", help="with --confidence: write the reliability diagram to this PNG")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("surfaces", parents=[common], help="meshes from a label map or .seg.nrrd")
    p.add_argument("labelmap")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-m", "--model", help="model whose label names and colours to use")
    add_mesh_options(p)
    p.set_defaults(func=cmd_surfaces)

    p = sub.add_parser("report", parents=[common], help="HTML report: measurements, slices, 3D view")
    p.add_argument("image", help="the image the label map belongs to")
    p.add_argument("labelmap", help="label map (NIfTI, NRRD) or .seg.nrrd")
    p.add_argument("-o", "--output", required=True, help="the report's file (.html)")
    p.add_argument("-m", "--model", help="model whose label names, colours and lesion labels to use")
    p.add_argument("--reference", help="a reference label map: adds Dice, IoU and HD95 to the report")
    p.add_argument("--margin", type=number(at_least=0), default=10.0, help="safety margin around lesions for the remnant, mm")
    p.add_argument("--coordinates", choices=["LPS", "RAS"], default="LPS", help="coordinates of centroids and 3D view")
    p.add_argument("--image-name", help="how the report names the scan (default: the image file's name)")
    p.add_argument("--uncertainty", help="the 0-1 uncertainty map segment --uncertainty wrote: adds the regions to check")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("refine", parents=[common], help="correct one segment with include/exclude points or a box")
    p.add_argument("image")
    p.add_argument("labelmap", help="label map (NIfTI, NRRD) or .seg.nrrd")
    p.add_argument("--label", required=True, help="the segment's name or label value")
    p.add_argument("--include", nargs=3, type=number(), action="append", metavar=("X", "Y", "Z"),
                   help="a point (mm) that belongs to the segment; repeat for more")
    p.add_argument("--exclude", nargs=3, type=number(), action="append", metavar=("X", "Y", "Z"),
                   help="a point (mm) that does not; repeat for more")
    p.add_argument("--box", nargs=6, type=number(), metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                   help="two opposite corners (mm) of a box the segment lies in")
    p.add_argument("--coordinates", choices=["LPS", "RAS"], default="LPS", help="coordinates of the points")
    p.add_argument("-m", "--model", help="model whose label names to use for a NIfTI label map")
    p.add_argument("--guided", help="a guided model (trained with points) to correct with, instead of the watershed")
    p.add_argument("-o", "--output", required=True, help="the corrected label map (.nii.gz, .nrrd, .seg.nrrd)")
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("saliency", parents=[common], help="which image voxels drove a segment (0-1 map)")
    p.add_argument("inputs", nargs="+", help="input volume(s), as for segment")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--segment", required=True, help="the segment's name in the model card")
    p.add_argument("-o", "--output", required=True, help="the saliency map's file (.nii.gz, .nrrd)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=cmd_saliency)

    p = sub.add_parser("calibrate", parents=[common],
                       help="calibration (ECE, reliability diagram) and error detection of the uncertainty on a data set")
    p.add_argument("dataset", help="a labelled data set folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-o", "--output", required=True, help="folder for calibration.json, .md and reliability.png")
    p.add_argument("--cases", nargs="+", help="only these case ids (e.g. cases the model never saw)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_calibrate)
