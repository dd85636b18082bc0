"""Every segment's surface in one file, named and coloured: glTF binary (.glb) for AR/VR headsets
and web viewers, Wavefront OBJ with a material library (.obj + .mtl) for 3D software.

glTF has +Y up, +Z toward the viewer (the patient's front) and metres, so patient millimetres are
turned as x → patient left, y → superior, z → anterior and scaled by 1/1000 (a rotation: the
triangles' winding, outward, is kept). OBJ keeps the surfaces' own coordinates (LPS or RAS mm).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from vtkmodules.util import numpy_support

from .errors import OutputError
from .io import atomic_path
from .surfaces import Surface, mesh_file_name

# rows: glTF x (left), y (superior), z (anterior) from patient LPS / RAS x, y, z
TO_GLTF = {"LPS": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float),
           "RAS": np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float)}
GLB_MAGIC, GLB_VERSION, JSON_CHUNK, BIN_CHUNK = 0x46546C67, 2, 0x4E4F534A, 0x004E4942
FLOAT, UNSIGNED_INT, ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER, TRIANGLES = 5126, 5125, 34962, 34963, 4


def _mesh_arrays(surface: Surface) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, point normals (zeros if the mesh has none) and triangles of a surface."""
    poly = surface.polydata
    points = numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)
    normals = poly.GetPointData().GetNormals()
    normals = numpy_support.vtk_to_numpy(normals).astype(np.float64) if normals is not None else np.zeros_like(points)
    triangles = numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return points, normals, triangles


def glb_bytes(surfaces: list[Surface]) -> bytes:
    """A glTF 2.0 binary scene: one node, mesh and material (colour, name) per surface."""
    gltf = {"asset": {"version": "2.0", "generator": "AIReconstruct"}, "scene": 0, "scenes": [{"nodes": []}],
            "nodes": [], "meshes": [], "materials": [], "accessors": [], "bufferViews": [], "buffers": []}
    blob = bytearray()

    def add(array: np.ndarray, target: int, component: int, kind: str, bounds: bool = False) -> int:
        while len(blob) % 4:
            blob.append(0)
        gltf["bufferViews"].append({"buffer": 0, "byteOffset": len(blob), "byteLength": array.nbytes, "target": target})
        blob.extend(array.tobytes())
        accessor = {"bufferView": len(gltf["bufferViews"]) - 1, "componentType": component,
                    "count": len(array) if kind != "SCALAR" else array.size, "type": kind}
        if bounds:
            accessor.update(min=array.min(axis=0).tolist(), max=array.max(axis=0).tolist())
        gltf["accessors"].append(accessor)
        return len(gltf["accessors"]) - 1

    for index, surface in enumerate(surfaces):
        points, normals, triangles = _mesh_arrays(surface)
        turn = TO_GLTF[surface.coordinates]
        attributes = {"POSITION": add((points @ turn.T / 1000.0).astype("<f4"), ARRAY_BUFFER, FLOAT, "VEC3", True)}
        if np.any(normals):
            attributes["NORMAL"] = add((normals @ turn.T).astype("<f4"), ARRAY_BUFFER, FLOAT, "VEC3")
        indices = add(triangles.astype("<u4").ravel(), ELEMENT_ARRAY_BUFFER, UNSIGNED_INT, "SCALAR")
        gltf["materials"].append({"name": surface.label.name, "doubleSided": False, "pbrMetallicRoughness": {
            "baseColorFactor": [*map(float, surface.label.color), 1.0], "metallicFactor": 0.0, "roughnessFactor": 0.6}})
        gltf["meshes"].append({"name": surface.label.name, "primitives": [
            {"attributes": attributes, "indices": indices, "material": index, "mode": TRIANGLES}]})
        gltf["nodes"].append({"name": surface.label.name, "mesh": index})
        gltf["scenes"][0]["nodes"].append(index)
    while len(blob) % 4:
        blob.append(0)
    gltf["buffers"].append({"byteLength": len(blob)})
    header = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 4)
    total = 12 + 8 + len(header) + 8 + len(blob)
    return b"".join([struct.pack("<III", GLB_MAGIC, GLB_VERSION, total), struct.pack("<II", len(header), JSON_CHUNK),
                     header, struct.pack("<II", len(blob), BIN_CHUNK), bytes(blob)])


def _obj_texts(surfaces: list[Surface], material_file: str) -> tuple[str, str]:
    materials, lines, offset = [], [f"# AIReconstruct surfaces\nmtllib {material_file}"], 1
    for surface in surfaces:
        name = mesh_file_name(surface.label.name, "")
        points, normals, triangles = _mesh_arrays(surface)
        r, g, b = surface.label.color
        materials.append(f"newmtl {name}\nKa 0 0 0\nKd {r:.4f} {g:.4f} {b:.4f}\nKs 0.1 0.1 0.1\nNs 20\nd 1\nillum 2\n")
        lines.append(f"o {name}\nusemtl {name}")
        lines.append("\n".join(f"v {x:.4f} {y:.4f} {z:.4f}" for x, y, z in points))
        lines.append("\n".join(f"vn {x:.4f} {y:.4f} {z:.4f}" for x, y, z in normals))
        faces = triangles + offset
        lines.append("\n".join(f"f {a}//{a} {b}//{b} {c}//{c}" for a, b, c in faces))
        offset += len(points)
    return "\n".join(lines) + "\n", "\n".join(materials)


def write_scene(surfaces: list[Surface], path: str | os.PathLike) -> list[Path]:
    """Write every surface into one .glb, or one .obj with its .mtl beside it; returns the files written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".glb":
        with atomic_path(path) as tmp:
            tmp.write_bytes(glb_bytes(surfaces))
        return [path]
    if suffix == ".obj":
        material_path = path.with_suffix(".mtl")
        obj_text, material_text = _obj_texts(surfaces, material_path.name)
        with atomic_path(material_path) as tmp:
            tmp.write_text(material_text, encoding="utf-8")
        with atomic_path(path) as tmp:
            tmp.write_text(obj_text, encoding="utf-8")
        return [path, material_path]
    raise OutputError(f"Unknown scene format '{suffix}' (use .glb or .obj)")
