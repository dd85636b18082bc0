"""A self-contained HTML report for pre-surgical review (opens without a network connection).

Sections: a header without patient data (image size and spacing, model and intended use, date),
the surgical measurements (measurements.py), metrics against a reference when one is given,
axial / coronal / sagittal slices through each lesion (or the largest segment) with coloured
overlays, and an interactive 3D view of every surface (plotly's Mesh3d; its JavaScript is embedded).
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError, ModelCardError
from .io import atomic_path
from .measurements import is_lesion, lesion_axes, mask_centre, measure
from .metrics import evaluate
from .modelcard import Label, ModelCard, find_model
from .preprocess import reorientation_of, to_canonical
from .volume import Volume

SLICE_WIDTH_PX = 280
REPORT_TRIANGLES = 20000  # per segment in the 3D view, to keep the file small
BRAIN = Label(1, "brain (skull-stripped image)", (0.8, 0.8, 0.8), {}, {})
CONTEXT_OPACITY = 0.15
# Errors of any script on the page are collected before anything else runs; the 3D view marks itself drawn.
WATCH_ERRORS = """<script>window.reportErrors = [];
window.addEventListener("error", function (e) { window.reportErrors.push(String(e.message));
  document.documentElement.dataset.errors = window.reportErrors.join(" | "); });</script>"""
MARK_DRAWN = """var box = document.getElementById('{plot_id}').getBoundingClientRect();
document.documentElement.dataset.view3d = [box.left, box.top, box.width, box.height].map(Math.round).join(',');"""


def png_data_uri(rgb: np.ndarray) -> str:
    """An RGB uint8 image (rows, columns, 3) as a PNG data URI (zlib only, no imaging library)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _overlay(gray: np.ndarray, labels: np.ndarray, colours: dict[int, np.ndarray]) -> np.ndarray:
    """Grey image with every label filled at 40 % and outlined at full colour."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    edge = np.zeros(labels.shape, bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    for value, colour in colours.items():
        inside = labels == value
        rgb[inside] = 0.6 * rgb[inside] + 0.4 * colour
        rgb[inside & edge] = colour
    return np.clip(rgb, 0, 255).astype(np.uint8)


def slice_views(image: Volume, labelmap: Volume, labels: list[Label], through: np.ndarray,
                heat: Volume | None = None) -> list[dict]:
    """Axial, coronal and sagittal slices through the centre of the voxels ``through`` (a mask on the
    image's grid), in radiological display (patient right on the left of the axial and coronal views,
    anterior on the left of the sagittal view, superior up), with the labels' colours or, given
    ``heat`` (0-1, e.g. the uncertainty), a red heat overlay; each as {"plane", "uri", "width", "height"}."""
    how = reorientation_of(image, "SPL")
    grey = to_canonical(image.array, how)  # views: only the three slices are copied
    lab = to_canonical(labelmap.array, how)
    hot = to_canonical(heat.array, how) if heat is not None else None
    low, high = np.percentile(grey[::2, ::2, ::2], [1, 99.5])
    colours = {label.value: np.array(label.color, np.float32) * 255 for label in labels}
    s, p, l_ = np.round(mask_centre(to_canonical(through, how))).astype(int)
    dz, dy, dx = how.spacing_zyx
    cuts = [("axial", np.s_[s], (dy, dx), False), ("coronal", np.s_[:, p], (dz, dx), True),
            ("sagittal", np.s_[:, :, l_], (dz, dy), True)]
    views = []
    for plane, cut, (row_mm, column_mm), superior_up in cuts:
        flip = np.s_[::-1] if superior_up else np.s_[:]
        picture = np.clip((grey[cut][flip].astype(np.float32) - low) / max(high - low, 1e-6) * 255, 0, 255)
        if hot is None:
            rgb = _overlay(picture, lab[cut][flip], colours)
        else:
            alpha = np.clip(hot[cut][flip], 0, 1)[..., None] * 0.8
            rgb = (np.repeat(picture[..., None], 3, axis=2) * (1 - alpha) + np.array([255, 40, 0]) * alpha).astype(np.uint8)
        rows, columns = picture.shape
        views.append({"plane": plane, "uri": png_data_uri(rgb), "width": SLICE_WIDTH_PX,
                      "height": round(SLICE_WIDTH_PX * rows * row_mm / (columns * column_mm))})
    return views


def _figures(views: list[dict]) -> str:
    return '<div class="slices">' + "".join(
        f'<figure><img alt="{v["plane"]}" src="{v["uri"]}" width="{v["width"]}" height="{v["height"]}">'
        f'<figcaption>{v["plane"]}</figcaption></figure>' for v in views) + "</div>"


def view_3d(surfaces, context=()) -> str:
    """The surfaces as one interactive plotly figure (a div with plotly.js embedded), seen from the
    patient's front; organs are see-through where there are lesions to show inside them, and the
    ``context`` surfaces (the brain around a brain tumour) faint."""
    import plotly.graph_objects as go
    from vtkmodules.util import numpy_support

    figure = go.Figure()
    any_lesion = any(is_lesion(surface.label) for surface in surfaces)
    shown = [(surface, CONTEXT_OPACITY) for surface in context]
    shown += [(surface, 1.0 if is_lesion(surface.label) or not any_lesion else 0.4) for surface in surfaces]
    for surface, opacity in shown:
        points = numpy_support.vtk_to_numpy(surface.polydata.GetPoints().GetData())
        faces = numpy_support.vtk_to_numpy(surface.polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        r, g, b = (int(255 * c) for c in surface.label.color)
        figure.add_trace(go.Mesh3d(x=points[:, 0].round(1), y=points[:, 1].round(1), z=points[:, 2].round(1),
                                   i=faces[:, 0], j=faces[:, 1], k=faces[:, 2], color=f"rgb({r},{g},{b})",
                                   name=surface.label.name, showlegend=True, opacity=opacity, flatshading=False))
    coordinates = surfaces[0].coordinates
    axes = {f"{name}axis": dict(title=f"{code} (mm)", showbackground=False) for name, code in zip("xyz", coordinates)}
    front = -2.0 if coordinates == "LPS" else 2.0  # the patient's anterior is -y in LPS, +y in RAS
    camera = dict(eye=dict(x=0.0, y=front, z=0.4), up=dict(x=0, y=0, z=1))
    figure.update_layout(height=560, margin=dict(l=0, r=0, t=0, b=0), legend=dict(x=0.0, y=1.0),
                         scene=dict(aspectmode="data", camera=camera, **axes))
    return figure.to_html(full_html=False, include_plotlyjs=True, div_id="view3d", post_script=MARK_DRAWN,
                          config={"displaylogo": False})


def brain_outline(image: Volume, coordinates: str) -> list:
    """The surface of a skull-stripped image's brain (the voxels that differ from its background),
    to show a brain tumour in place."""
    from .preprocess import fill_value
    from .surfaces import extract_surfaces

    brain = image.with_array((image.array != fill_value(image.array)).view(np.uint8))
    return extract_surfaces(brain, [BRAIN], coordinates=coordinates, max_triangles=REPORT_TRIANGLES)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _swatch(label: Label | None, name: str) -> str:
    colour = "#%02x%02x%02x" % tuple(int(255 * c) for c in label.color) if label else "#999"
    return f'<span class="swatch" style="background:{colour}"></span>{html.escape(name)}'


ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}  # Couinaud's numbering


def _bordering(lesion: dict) -> str:
    """The segments around a lesion (or one of its parts) with their share of the voxels around it."""
    return "<br>".join(f"{html.escape(name)}: {percent:.0f}" for name, percent in lesion["bordering"].items()) or "—"


def _confidence_sections(image, labelmap, labels, uncertainty: Volume, confidence: dict, coordinates: str) -> list[str]:
    """Per-segment confidence (where ``confidence`` gives it: the run's own figures), the regions to
    check and slices through the largest, with the uncertainty."""
    from .uncertainty import flagged_regions

    parts = ["<h2>Confidence</h2>", _table(
        ["Segment", "Boundary uncertainty (0-1)", "Agreement of the TTA members (Dice)"],
        [[html.escape(name), f"{c['boundary_uncertainty']:.3f}", f"{c['member_dice']:.3f}"] for name, c in confidence.items()])
    ] if confidence else []
    regions = flagged_regions(uncertainty, coordinates=coordinates)
    if regions:
        parts += ["<h2>Regions to check (uncertainty above 0.5)</h2>", _table(
            [f"Centre {coordinates} (mm)", "Size (mL)", "Mean uncertainty"],
            [[", ".join(f"{c:.1f}" for c in r["centre_mm"]), f"{r['size_ml']:.2f}", f"{r['mean_uncertainty']:.2f}"]
             for r in regions]),
            "<h3>Uncertainty through the largest region</h3>",
            _figures(slice_views(image, labelmap, labels, _largest_region(uncertainty.array > 0.5), heat=uncertainty))]
    return parts


def _largest_region(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    components, _ = ndimage.label(mask)
    return components == np.argmax(np.bincount(components.ravel())[1:]) + 1


def _sections(image, labelmap, labels, measured, metrics, surfaces, context) -> list[str]:
    by_name = {label.name: label for label in labels}
    parts = ["<h2>Measurements</h2>", _table(
        ["Segment", "Volume (mL)", "Surface area (cm²)", "Largest diameter (mm)", f"Centroid {measured['coordinates']} (mm)"],
        [[_swatch(by_name.get(s["name"]), s["name"]), f"{s['volume_ml']:.2f}", f"{s['surface_area_cm2']:.1f}",
          f"{s['largest_diameter_mm']:.1f}", ", ".join(f"{c:.1f}" for c in s["centroid_mm"])] for s in measured["segments"]])]
    axes = [(lesion["name"] if part is None else f"{lesion['name']} #{part['number']}", found)
            for lesion, part, found in lesion_axes(measured["lesions"])]
    if axes:
        parts += ["<h2>Lesion axes on the axial slices</h2>", _table(
            ["Lesion", "Long axis (mm)", "Short axis (mm)", "Mean diameter (mm)", "Slice at S (mm)"],
            [[html.escape(name), f"{a['long_axis_mm']:.1f}", f"{a['short_axis_mm']:.1f}",
              f"{a['mean_diameter_mm']:.1f}",
              f"{np.mean([end[2] for end in a['long_axis_ends_mm']]):.1f}"] for name, a in axes]),
            "<p>As RECIST measures them: the longest diameter on any axial slice, and on that slice the "
            "longest line across the lesion at right angles to it. The mean diameter, their average, is how "
            "Lung-RADS and the Fleischner Society size a lung nodule.</p>"]
    if any(lesion["organ"] or lesion["distances_mm"] for lesion in measured["lesions"]):  # else only names
        rows = []
        for lesion in measured["lesions"]:
            nearest = sorted(lesion["distances_mm"].items(), key=lambda item: item[1])[:4]
            rows.append([_swatch(by_name.get(lesion["name"]), lesion["name"]), html.escape(lesion["organ"] or "—"),
                         _bordering(lesion),
                         f"{lesion['capsule_distance_mm']:.1f}" if "capsule_distance_mm" in lesion else "—",
                         "<br>".join(f"{html.escape(n)}: {d:.1f}" for n, d in nearest) or "—",
                         f"{lesion['organ_with_lesion_ml']:.1f}" if "remnant_ml" in lesion else "—",
                         f"{lesion['resection_ml']:.1f}" if "remnant_ml" in lesion else "—",
                         f"{lesion['remnant_ml']:.1f} ({lesion['remnant_percent']:.0f} %)" if "remnant_ml" in lesion else "—"])
        parts += [f"<h2>Lesions (safety margin {measured['margin_mm']:g} mm)</h2>", _table(
            ["Lesion", "In organ", "Borders (%)", "To capsule (mm)", "Nearest structures (mm)", "Organ + lesion (mL)",
             "Resection (mL)", "Remnant (mL)"], rows)]
    for lesion in measured["lesions"]:
        if "parts" in lesion:
            listed = "" if lesion["part_count"] == len(lesion["parts"]) else f", the largest {len(lesion['parts'])}"
            parts += [f"<h3>{html.escape(lesion['name'])}: {lesion['part_count']} separate parts{listed}</h3>", _table(
                ["#", "Volume (mL)", "Largest diameter (mm)", f"Centroid {measured['coordinates']} (mm)", "In organ",
                 "Borders (%)", "To capsule (mm)"],
                [[str(p["number"]), f"{p['volume_ml']:.2f}", f"{p['largest_diameter_mm']:.1f}",
                  ", ".join(f"{c:.1f}" for c in p["centroid_mm"]), html.escape(p["organ"] or "—"), _bordering(p),
                  f"{p['capsule_distance_mm']:.1f}" if "capsule_distance_mm" in p else "—"] for p in lesion["parts"]])]
    if measured["liver_resections"]:
        parts += ["<h2>Liver resections by Couinaud segments</h2>", _table(
            ["Resection", "Segments removed", "Remnant (mL)", "Remnant (% of the liver without lesions)",
             "Lesion parts bordering the remnant"],
            [[html.escape(r["name"]), ", ".join(ROMAN[n] for n in r["removed_segments"]), f"{r['remnant_ml']:.1f}",
              f"{r['remnant_percent']:.0f}", str(r["lesion_parts_bordering_remnant"])] for r in measured["liver_resections"]]),
            "<p>Anatomical resections by the segments the model found, not a plan: the remnant is the kept "
            "segments' volume, without vascular or functional assessment.</p>"]
    if metrics is not None:
        rows = [[html.escape(name), f"{s['dice']:.3f}", f"{s['iou']:.3f}", f"{s['hd95_mm']:.2f}"]
                for name, s in metrics["labels"].items() if s["present"]]
        parts += ["<h2>Agreement with the reference</h2>",
                  _table(["Segment", "Dice", "IoU", "HD95 (mm)"], rows),
                  f"<p>Voxel accuracy {metrics['accuracy']:.4f}</p>"]
    focus = [s for s in measured["segments"] if s["lesion"]] or sorted(measured["segments"], key=lambda s: -s["volume_ml"])[:1]
    for segment in focus:
        views = slice_views(image, labelmap, labels, labelmap.array == segment["value"])
        parts.append(f'<h2>Slices through {html.escape(segment["name"])}</h2>{_figures(views)}')
    parts += ["<h2>3D view</h2>", view_3d(surfaces, context) if surfaces else "<p>No segment to show.</p>"]
    return parts


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}.swatch{display:inline-block;width:12px;
height:12px;margin-right:6px;border:1px solid #555;vertical-align:middle}.slices{display:flex;gap:12px;flex-wrap:wrap}
figure{margin:0}figcaption{text-align:center;font-size:90%}.use{background:#fff4d6;padding:6px 10px}"""


def build_report(image: Volume, labelmap: Volume, labels: list[Label], model: dict, reference: Volume | None = None,
                 margin_mm: float = 10.0, coordinates: str = "LPS", uncertainty: Volume | None = None,
                 confidence: dict | None = None, image_name: str = "", progress=None,
                 cancel=None) -> tuple[str, dict]:
    """The report's HTML and the measurements it shows. ``model`` gives the card's ``name``,
    ``title``, ``version`` and ``intended_use``; ``image_name`` says which scan it is (its file);
    ``reference`` (a label map on the same grid) adds metrics; ``uncertainty`` (a 0-1 map on the
    same grid) adds the regions to check, and ``confidence`` (from ``segment`` with uncertainty) the
    per-segment confidence. ``progress(fraction, message)``
    follows its steps; ``cancel()`` returning True between them stops it (``Cancelled``)."""
    from .surfaces import shared_mesh, surfaces_from_mesh

    def step(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("Cancelled by the user; no report was written")
        if progress is not None:
            progress(fraction, message)

    if not labelmap.same_grid(image):
        raise InputError("The label map does not match its image (size, spacing, origin or direction differ)")
    if uncertainty is not None and not uncertainty.same_grid(image):
        raise InputError("The uncertainty map does not match the image (size, spacing, origin or direction differ)")
    step(0.0, "measuring the segments")
    mesh = shared_mesh(labelmap, [label.value for label in labels], coordinates=coordinates) if labelmap.array.any() else None
    measured = measure(labelmap, labels, margin_mm, coordinates=coordinates, mesh=mesh)
    metrics = None
    if reference is not None:
        if not reference.same_grid(image):
            raise InputError("The reference label map does not match the image (size, spacing, origin or direction differ)")
        metrics = evaluate(labelmap, reference, {label.value: label.name for label in labels})
    step(0.6, "surfaces for the 3D view")
    surfaces = surfaces_from_mesh(mesh, labels, coordinates, max_triangles=REPORT_TRIANGLES) if mesh else []
    spacing = " × ".join(f"{s:.3g}" for s in image.spacing)
    version = f", version {html.escape(model['version'])}" if model.get("version") else ""
    named = f"<b>{html.escape(image_name)}</b>, " if image_name else ""
    header = (f"<h1>AIReconstruct report</h1><p>Image {named}{' × '.join(map(str, image.shape_ijk))} voxels, spacing "
              f"{spacing} mm. Model <b>{html.escape(model.get('title') or model['name'])}</b> ({html.escape(model['name'])}"
              f"{version}). Generated {datetime.date.today().isoformat()}.</p>"
              f'<p class="use">{html.escape(model.get("intended_use", ""))}</p>')
    stripped = any(channel.get("skull_stripped") for channel in model.get("channels", ()))
    context = brain_outline(image, coordinates) if stripped and surfaces else []
    step(0.8, "slices and the page")
    sections = _sections(image, labelmap, labels, measured, metrics, surfaces, context)
    if uncertainty is not None:
        sections[-2:-2] = _confidence_sections(image, labelmap, labels, uncertainty, confidence or {}, coordinates)
    body = "\n".join([header, *sections])
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>AIReconstruct report</title>'
            f"<style>{STYLE}</style>{WATCH_ERRORS}</head><body>{body}</body></html>")
    return page, measured


def model_of_record(name: str | None, version: str | None, unnamed: str) -> tuple[ModelCard | None, dict]:
    """The model a segmentation records it was made with (name and version, or None): its installed
    card (None where it is not installed or none is recorded), and the ``model`` entry for
    :func:`build_report`: that card's data with the recorded version, else the recorded name (or
    ``unnamed``) alone."""
    try:
        card = find_model(name) if name else None
    except ModelCardError:  # no longer installed
        card = None
    model = dict(card.data) if card else {"name": name or unnamed,
                                          "intended_use": "Segmentation without a model card; not for clinical use"}
    if version:
        model["version"] = version  # the version that made it, though a later one may be installed now
    return card, model


def write_report(page: str, path: str | os.PathLike) -> Path:
    """Write the report atomically (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
