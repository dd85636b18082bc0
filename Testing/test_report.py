"""The HTML report: self-contained, shows the measurements, and renders (3D view included) in a
real headless Chromium without JavaScript errors."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from AIReconstructLib.cli import main
from AIReconstructLib.errors import InputError
from AIReconstructLib.io import write_volume
from AIReconstructLib.modelcard import Label, find_model
from AIReconstructLib.phantom import make_phantom
from AIReconstructLib.report import build_report, png_data_uri, write_report
from AIReconstructLib.segnrrd import write_seg_nrrd
from AIReconstructLib.volume import Volume

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=30000"]


@pytest.fixture(scope="module")
def phantom_report(tmp_path_factory):
    phantom = make_phantom(11, field_of_view_mm=(300.0, 220.0, 260.0))
    card = find_model("demo-abdomen-ct")
    prediction = phantom.labels.with_array(np.where(phantom.labels.array == 9, 0, phantom.labels.array).astype(np.uint8))
    page, measured = build_report(phantom.image, prediction, card.labels, card.data, reference=phantom.labels,
                                  image_name="patient<7>.nii.gz")
    path = write_report(page, tmp_path_factory.mktemp("report") / "report.html")
    return path, page, measured


def test_report_is_self_contained_and_shows_the_measurements(phantom_report):
    _, page, measured = phantom_report
    markup = re.sub(r"<script[^>]*>.*?</script>", "<script></script>", page, flags=re.S)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", markup)  # nothing fetched from a network
    assert "<script src" not in markup and "<link" not in markup
    assert "Plotly.newPlot" in page and markup.count("data:image/png;base64,") == 3  # slices through the one lesion
    names = [s["name"] for s in measured["segments"]]
    assert "liver tumour" in names and "lungs" not in names  # the prediction left the lungs out
    liver = next(s for s in measured["segments"] if s["name"] == "liver")
    assert f"{liver['volume_ml']:.2f}" in page and f"{liver['largest_diameter_mm']:.1f}" in page
    assert "Agreement with the reference" in page and "Research" not in page
    assert "Demo model trained on synthetic phantoms, not for clinical use" in page
    assert "Image <b>patient&lt;7&gt;.nii.gz</b>, " in page  # which scan, escaped
    assert f"(demo-abdomen-ct, version {find_model('demo-abdomen-ct').data['version']})" in page
    (lesion,) = measured["lesions"]
    assert f"{lesion['remnant_ml']:.1f}" in page
    assert lesion["organ"] == "liver" and lesion["bordering"]["liver"] >= 50  # what lies around it, in a column
    assert "<th>Borders (%)</th>" in page and f"<td>liver: {lesion['bordering']['liver']:.0f}" in page
    assert measured["liver_resections"] == [] and "Couinaud" not in page  # no liver segments here



def test_a_brain_tumour_is_shown_in_its_brain_and_gets_no_table_of_organs_around_it():
    """The brain-tumour model segments the tumour and nothing else: no lesion table of dashes; its
    skull-stripped input's brain is drawn faintly around the tumour in the 3D view."""
    card = find_model("brain-tumour-flair")
    z, y, x = np.indices((40, 48, 48))
    image = Volume(np.where((z - 20) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 < 300, 100.0, 0.0).astype(np.float32), (2.0,) * 3)
    tumour = image.with_array(((z - 20) ** 2 + (y - 24) ** 2 + (x - 30) ** 2 < 25).astype(np.uint8))
    page, measured = build_report(image, tumour, card.labels, card.data)
    assert [lesion["name"] for lesion in measured["lesions"]] == ["whole tumour"]
    assert "<h2>Lesions" not in page and "<h2>Measurements</h2>" in page
    assert page.count('"name":"brain (skull-stripped image)"') == 1 and '"opacity":0.15' in page
    demo = find_model("demo-abdomen-ct")
    assert "skull-stripped image" not in build_report(image, tumour, demo.labels, demo.data)[0]  # CT: no brain
    assert "separate parts" not in page
    axes = measured["lesions"][0]["axial_axes"]  # a ball of radius 5 voxels (10 mm): its diameter both ways
    assert axes["long_axis_mm"] == pytest.approx(20.0, abs=2.0) and axes["short_axis_mm"] == pytest.approx(20.0, abs=2.0)
    assert "<h2>Lesion axes on the axial slices</h2>" in page
    assert (f"<td>whole tumour</td><td>{axes['long_axis_mm']:.1f}</td><td>{axes['short_axis_mm']:.1f}</td>"
            f"<td>{(axes['long_axis_mm'] + axes['short_axis_mm']) / 2:.1f}</td>") in page  # and their mean

    second = tumour.with_array(tumour.array | ((z - 20) ** 2 + (y - 24) ** 2 + (x - 14) ** 2 < 9).astype(np.uint8))
    page, measured = build_report(image, second, card.labels, card.data)
    (lesion,) = measured["lesions"]
    assert "<h3>whole tumour: 2 separate parts</h3>" in page  # each measured, though in no organ
    assert [p["volume_ml"] for p in lesion["parts"]] == pytest.approx([tumour.array.sum() * 0.008,
                                                                       (second.array - tumour.array).sum() * 0.008])
    assert all(f"<td>{p['largest_diameter_mm']:.1f}</td>" in page for p in lesion["parts"])
    assert all(", ".join(f"{c:.1f}" for c in p["centroid_mm"]) + "</td><td>—</td>" in page  # in no organ
               for p in lesion["parts"]) and "<th>In organ</th>" in page
    assert all(f"<td>whole tumour #{p['number']}</td><td>{p['axial_axes']['long_axis_mm']:.1f}</td>" in page
               for p in lesion["parts"])



def test_a_report_names_the_model_recorded_in_the_seg_nrrd_also_after_refine(tmp_path, capsys):
    """``segment`` records its model and version in the .seg.nrrd: ``report`` names them without ``-m``,
    and a result corrected with ``refine`` stays that model's."""
    phantom = make_phantom(12, field_of_view_mm=(200.0, 160.0, 160.0))
    card = find_model("demo-abdomen-ct")
    image = write_volume(phantom.image, tmp_path / "ct.nii.gz")
    seg = write_seg_nrrd(phantom.labels, card.labels, tmp_path / "ct.seg.nrrd", made_by=("demo-abdomen-ct", "0.9.0"))
    centre_mm = phantom.image.ijk_to_lps() @ [*np.argwhere(phantom.labels.array == 1).mean(axis=0)[::-1], 1]
    assert main(["refine", str(image), str(seg), "--label", "liver", "--include", *map(str, centre_mm[:3]),
                 "-o", str(tmp_path / "corrected.seg.nrrd")]) == 0
    for name in ("ct.seg.nrrd", "corrected.seg.nrrd"):
        assert main(["report", str(image), str(tmp_path / name), "-o", str(tmp_path / f"{name}.html")]) == 0
        page = (tmp_path / f"{name}.html").read_text(encoding="utf-8")
        assert "(demo-abdomen-ct, version 0.9.0)" in page and "<h2>Lesions" in page, name
    unrecorded = write_seg_nrrd(phantom.labels, card.labels, tmp_path / "other.seg.nrrd")
    assert main(["report", str(image), str(unrecorded), "-o", str(tmp_path / "other.html")]) == 0
    assert "(other.seg.nrrd)" in (tmp_path / "other.html").read_text(encoding="utf-8")


def test_report_command_shows_the_regions_to_check_of_an_uncertainty_map(tmp_path, capsys):
    phantom = make_phantom(12, field_of_view_mm=(200.0, 160.0, 160.0))
    image = write_volume(phantom.image, tmp_path / "ct.nii.gz")
    labels = write_volume(phantom.labels, tmp_path / "labels.nii.gz")
    unsure = np.zeros(phantom.image.array.shape, np.float32)
    unsure[20:26, 30:40, 30:40] = 0.8  # one region to check
    uncertainty = write_volume(phantom.image.with_array(unsure), tmp_path / "uncertainty.nii.gz")
    assert main(["report", str(image), str(labels), "-m", "demo-abdomen-ct", "--uncertainty", str(uncertainty),
                 "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<h2>Regions to check (uncertainty above 0.5)</h2>" in page and "<h2>Confidence</h2>" not in page
    other = write_volume(Volume(unsure[:, :, :-1].copy(), phantom.image.spacing), tmp_path / "other.nii.gz")
    assert main(["report", str(image), str(labels), "--uncertainty", str(other), "-o", str(tmp_path / "bad.html")]) != 0
    assert "The uncertainty map does not match the image" in capsys.readouterr().err
    assert not (tmp_path / "bad.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs Debian's chromium as root)")
def test_report_renders_in_headless_chromium(phantom_report, tmp_path):
    path, _, _ = phantom_report
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1150,2600"]
    dom = subprocess.run([*common, "--dump-dom", path.as_uri()], capture_output=True, encoding="utf-8", timeout=180).stdout
    root = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-errors" not in root, root  # no script raised an error
    drawn = re.search(r'data-view3d="(\d+),(\d+),(\d+),(\d+)"', root)
    assert drawn, "the 3D view never finished drawing"
    assert dom.count("<table>") == 4 and "gl-container" in dom  # measurements, axes, lesions, agreement

    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=180, check=True)
    matplotlib_image = pytest.importorskip("matplotlib.image")
    pixels = (matplotlib_image.imread(shot)[..., :3] * 255).astype(int)
    left, top, width, height = map(int, drawn.groups())
    view = pixels[top:top + height, left:left + width]
    assert view.size, "the 3D view lies outside the screenshot"
    coloured = np.abs(view - view.mean(axis=-1, keepdims=True)).max(axis=-1) > 25  # not white, grey or black
    assert coloured.mean() > 0.03, "the 3D view shows no coloured surfaces"


def test_report_command_and_mismatched_label_maps(tmp_path, capsys):
    phantom = make_phantom(12, field_of_view_mm=(200.0, 160.0, 160.0))
    image = write_volume(phantom.image, tmp_path / "ct.nii.gz")
    labels = write_volume(phantom.labels, tmp_path / "labels.nii.gz")
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(image), str(labels), "-m", "demo-abdomen-ct", "-o", str(out), "--json-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["outputs"] == [str(out)] and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert result["measurements"]["lesions"][0]["organ"] == "liver"

    other = write_volume(make_phantom(13, field_of_view_mm=(180.0, 160.0, 160.0)).labels, tmp_path / "other.nii.gz")
    assert main(["report", str(image), str(other), "-o", str(tmp_path / "bad.html")]) != 0
    assert "does not match its image" in capsys.readouterr().err
    assert not (tmp_path / "bad.html").exists()
    with pytest.raises(InputError, match="does not match its image"):
        cut = phantom.labels
        build_report(phantom.image, Volume(cut.array[:, :, :-1], cut.spacing, cut.origin, cut.direction), [], {"name": "x"})


def test_png_encoder_writes_a_valid_png(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    import base64

    (tmp_path / "x.png").write_bytes(base64.b64decode(png_data_uri(rgb).split(",", 1)[1]))
    np.testing.assert_array_equal((matplotlib_image.imread(tmp_path / "x.png")[..., :3] * 255).round(), rgb)


def test_the_liver_resections_table_names_couinaud_segments():
    """With the liver's eight Couinaud segments, the report lists the standard resections, the
    segments each removes in Couinaud's numbering and its remnant."""
    z, y, x = np.indices((20, 24, 64))
    image = Volume(np.full((20, 24, 64), 60.0, np.float32), (1.5, 1.5, 1.5))
    labelmap = image.with_array((x // 8 + 1).astype(np.uint8))
    labels = [Label(n, f"liver_segment_{n}", (0.6, 0.3, 0.2), {}, {}) for n in range(1, 9)]
    page, measured = build_report(image, labelmap, labels, find_model("demo-abdomen-ct").data)
    right = next(r for r in measured["liver_resections"] if r["name"] == "right hepatectomy")
    assert right["remnant_percent"] == pytest.approx(50.0)
    assert "<h2>Liver resections by Couinaud segments</h2>" in page
    assert "<td>right hepatectomy</td><td>V, VI, VII, VIII</td>" in page and f"<td>{right['remnant_ml']:.1f}</td>" in page
