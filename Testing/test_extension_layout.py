"""The Slicer extension's CMake files list every file the module ships."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "AIReconstruct"


def _cmake_list(name: str) -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(rf"set\({name}\n(.*?)\n\s*\)", text, re.S).group(1)
    return {line.strip().replace("${MODULE_NAME}", "AIReconstruct") for line in block.splitlines() if line.strip()}


def test_every_python_file_is_listed():
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert _cmake_list("MODULE_PYTHON_SCRIPTS") == on_disk


def test_every_resource_is_listed_and_exists():
    listed = _cmake_list("MODULE_PYTHON_RESOURCES")
    shipped = {p.relative_to(MODULE).as_posix() for p in (MODULE / "AIReconstructLib").rglob("*")
               if p.is_file() and p.suffix in (".json", ".safetensors")}
    shipped |= {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert listed == shipped
    assert all((MODULE / item).is_file() for item in listed)


def test_extension_metadata():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} \".+\"\)", text), key
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "find_package(Slicer REQUIRED)" in text and "add_subdirectory(AIReconstruct)" in text
    assert (ROOT / "AIReconstruct.png").is_file()


def test_slicer_installs_what_the_engine_needs():
    """The module's requirements are the engine's dependencies (same versions) but those 3D Slicer
    ships or installs otherwise: numpy, SimpleITK, VTK, torch (PyTorch Utils) and meshoptimizer (needs a
    compiler; the engine decimates with VTK without it)."""
    import tomllib

    def specifiers(lines):
        entries = [line.split("#")[0].strip() for line in lines]
        return {re.split(r"[<>=!~\[ ;]", entry, maxsplit=1)[0].lower(): entry for entry in entries if entry}

    engine = specifiers(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"])
    slicer = specifiers((MODULE / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines())
    provided = {"numpy", "simpleitk", "vtk", "torch", "meshoptimizer"}
    assert slicer == {name: entry for name, entry in engine.items() if name not in provided}
