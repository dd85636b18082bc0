"""Static checks of the Slicer module (the parts that need the Slicer application to run)."""

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1] / "AIReconstruct"
SOURCE = (MODULE_DIR / "AIReconstruct.py").read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)
UI = ET.parse(MODULE_DIR / "Resources" / "UI" / "AIReconstruct.ui")


def _class(name):
    return next(node for node in TREE.body if isinstance(node, ast.ClassDef) and node.name == name)


def _parameter_fields() -> set[str]:
    return {node.target.id for node in _class("AIReconstructParameterNode").body if isinstance(node, ast.AnnAssign)}


def _ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


def test_module_has_the_scripted_module_classes():
    for name, base in [("AIReconstruct", "ScriptedLoadableModule"), ("AIReconstructWidget", "ScriptedLoadableModuleWidget"),
                       ("AIReconstructLogic", "ScriptedLoadableModuleLogic"), ("AIReconstructTest", "ScriptedLoadableModuleTest")]:
        assert base in [b.id for b in _class(name).bases if isinstance(b, ast.Name)]
    decorators = [d.id for d in _class("AIReconstructParameterNode").decorator_list]
    assert decorators == ["parameterNodeWrapper"]


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = {node.attr for node in ast.walk(TREE)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    for node in ast.walk(TREE):  # getattr(self.ui, f"name{n}") for the numbered input selectors
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr" and isinstance(node.args[1], ast.JoinedStr):
            prefix = node.args[1].values[0].value
            used |= {f"{prefix}{n}" for n in range(4)}
    missing = used - set(_ui_widgets())
    assert not missing, missing


def test_every_parameter_name_in_the_ui_is_a_parameter_node_field():
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("name")
    assert set(bound) <= _parameter_fields(), set(bound) - _parameter_fields()
    assert _parameter_fields() - set(bound) == {"model"}  # the model list is filled from the installed cards


def test_module_stays_thin_and_clean():
    assert len(SOURCE.splitlines()) < 600
    assert "processEvents" not in SOURCE
    assert not [h for h in ast.walk(TREE) if isinstance(h, ast.ExceptHandler) and h.type is None]


def test_the_engine_never_imports_slicer():
    for path in (MODULE_DIR / "AIReconstructLib").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"slicer", "qt", "ctk", "AIReconstructAdapter"}, path


def test_the_export_menu_offers_the_engine_formats():
    from AIReconstructLib.meshfiles import MESH_FORMATS

    assignment = next(node for node in TREE.body if isinstance(node, ast.Assign) and node.targets[0].id == "MESH_FORMATS")
    assert ast.literal_eval(assignment.value) == list(MESH_FORMATS)


def test_input_selectors_offer_images_not_label_maps():
    """Slicer's convention for an image input: scalar volumes without their label-map subclass."""
    for n in range(4):
        selector = next(w for w in UI.iter("widget") if w.get("name") == f"inputVolumeSelector{n}")
        properties = {p.get("name"): p for p in selector.findall("property")}
        assert [s.text for s in properties["nodeTypes"].iter("string")] == ["vtkMRMLScalarVolumeNode"]
        assert properties["showChildNodeTypes"].find("bool").text == "false"
