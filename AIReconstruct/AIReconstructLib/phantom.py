"""Synthetic abdominal CT phantoms with exact ground truth, for the demo model and tests.

Anatomy is defined as smooth implicit shapes in patient coordinates (LPS mm) and sampled on any
grid, so the same patient can be imaged with anisotropic or oblique geometry. Each seed varies
body size, organ position, shape and contrast, the number of liver tumours, noise and spacing.
Hounsfield values follow typical portal-venous-phase CT: fat -100, liver ~100, spleen ~110,
kidney cortex ~170, aorta ~200 (blood pool), cancellous bone 300-500, cortical bone ~900,
lung -850, bowel gas -900.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .volume import Volume

# Label ids and their meaning for the phantom data set; the trained model's card gets them
# (with colours and SNOMED CT codes) from the data set's dataset.json, not from code.
PHANTOM_LABELS = [
    # value, name, RGB 0-1, terminology (category, type, [type modifier], [region])
    (1, "liver", (0.86, 0.51, 0.40), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "10200004", "Liver"), None, None),
    (2, "liver tumour", (0.96, 0.84, 0.20), ("SCT", "49755003", "Morphologically Altered Structure"),
     ("SCT", "108369006", "Neoplasm"), None, ("SCT", "10200004", "Liver")),
    (3, "spleen", (0.62, 0.37, 0.60), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "78961009", "Spleen"), None, None),
    (4, "right kidney", (0.73, 0.42, 0.30), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "64033007", "Kidney"),
     ("SCT", "24028007", "Right"), None),
    (5, "left kidney", (0.80, 0.50, 0.35), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "64033007", "Kidney"),
     ("SCT", "7771000", "Left"), None),
    (6, "aorta", (0.88, 0.26, 0.24), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "15825003", "Aorta"), None, None),
    (7, "vertebrae", (0.95, 0.93, 0.86), ("SCT", "123037004", "Anatomical Structure"),
     ("SCT", "421060004", "Spinal column"), None, None),
    (8, "pelvis", (0.90, 0.87, 0.78), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "12921003", "Pelvis"), None, None),
    (9, "lungs", (0.77, 0.87, 0.93), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "39607008", "Lung"), None, None),
]


def phantom_label_entries() -> list[dict]:
    """The phantom's labels as model-card entries (name, colour, SNOMED CT codes)."""
    entries = []
    for value, name, color, category, type_, modifier, region in PHANTOM_LABELS:
        terminology = {"category": list(category), "type": list(type_)}
        if modifier:
            terminology["type_modifier"] = list(modifier)
        if region:
            terminology["region"] = list(region)
        entries.append({"value": value, "name": name, "color": list(color), "terminology": terminology})
    return entries


@dataclass(frozen=True)
class Phantom:
    """A CT image and its exact label map on the same grid."""

    image: Volume
    labels: Volume


def _grid_points(shape_ijk, spacing, origin, direction) -> np.ndarray:
    """LPS coordinates of every voxel centre, as an array ``[3, k, j, i]``."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape_ijk[::-1]), indexing="ij")
    ijk = np.stack([i * spacing[0], j * spacing[1], k * spacing[2]])
    return np.einsum("pq,q...->p...", np.asarray(direction, np.float32), ijk) + np.asarray(origin, np.float32)[:, None, None, None]


class _Anatomy:
    """Implicit shapes of one random patient, evaluated at LPS points."""

    def __init__(self, rng: np.random.Generator, points: np.ndarray):
        self.rng = rng
        self.x, self.y, self.z = points

    def jitter(self, scale: float) -> float:
        return float(self.rng.normal(0.0, scale))

    def blob(self, centre, semi_axes, wobble: float = 0.08) -> np.ndarray:
        """An ellipsoid whose surface is perturbed by smooth random lobes, which move it by at most
        ``wobble`` (in units of the semi-axes): the lobes are evaluated only at points within that reach."""
        lobes = []
        for _ in range(3):
            axis = self.rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            lobes.append((axis, self.rng.uniform(1.5, 3.0), self.rng.uniform(0, 2 * np.pi)))
        dx, dy, dz = ((c - o) / a for c, o, a in zip((self.x, self.y, self.z), centre, semi_axes))
        radius = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        reach = radius < 1.0 + wobble + 1e-3
        dx, dy, dz, radius = dx[reach], dy[reach], dz[reach], radius[reach]
        ux, uy, uz = dx / radius, dy / radius, dz / radius
        bumps = np.zeros_like(radius)
        for axis, frequency, phase in lobes:
            bumps += np.sin(frequency * (axis[0] * ux + axis[1] * uy + axis[2] * uz) * np.pi + phase)
        inside = np.zeros(reach.shape, bool)
        inside[reach] = radius < 1.0 + wobble * bumps / 3.0
        return inside

    def tube_z(self, cx, cy, radius, z_low, z_high) -> np.ndarray:
        return ((self.x - cx) ** 2 + (self.y - cy) ** 2 < radius**2) & (self.z > z_low) & (self.z < z_high)


def _random_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    in_plane = float(rng.uniform(1.2, 1.8))
    return (in_plane, in_plane, float(rng.choice([2.0, 2.5, 3.0, 3.5])))


def make_phantom(seed: int, spacing=None, direction=None, field_of_view_mm=(320.0, 240.0, 300.0),
                 tumour_hu: float = 45.0) -> Phantom:
    """Make one abdominal CT phantom; ``spacing``/``direction`` default to the seed's own.

    Liver tumours are hypodense (45 HU against the liver's 100) unless ``tumour_hu`` says otherwise,
    for example 170 for tumours that enhance in the arterial phase: a kind the demo model never saw.
    """
    rng = np.random.default_rng(seed)
    spacing = tuple(spacing) if spacing is not None else _random_spacing(rng)
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    shape_ijk = tuple(int(round(f / s)) for f, s in zip(field_of_view_mm, spacing))
    # centre the field of view on the patient's origin
    half_extent = direction @ (np.asarray(spacing) * (np.asarray(shape_ijk) - 1) / 2.0)
    origin = tuple(-half_extent)
    points = _grid_points(shape_ijk, spacing, origin, direction)
    a = _Anatomy(rng, points)
    x, y, z = a.x, a.y, a.z

    image = np.full(x.shape, -1000.0, np.float32)
    labels = np.zeros(x.shape, np.uint8)

    body_a, body_b = 140 + a.jitter(10), 105 + a.jitter(8)
    body = (x / body_a) ** 2 + (y / body_b) ** 2 < 1.0
    fat = float(rng.uniform(12, 30))
    inner = (x / (body_a - fat)) ** 2 + (y / (body_b - fat)) ** 2 < 1.0
    image[body] = -100 + a.jitter(10)
    image[inner] = 40 + a.jitter(5)  # muscle and soft tissue

    for _ in range(int(rng.integers(4, 8))):  # bowel loops with gas: unlabelled confusers
        centre = (rng.uniform(-60, 80), rng.uniform(-70, 0), rng.uniform(-90, 10))
        loop = a.blob(centre, rng.uniform(12, 25, size=3), 0.2) & inner
        image[loop] = rng.uniform(10, 50)
        image[a.blob(centre, rng.uniform(5, 10, size=3), 0.2) & loop] = -900

    dome = 70 + a.jitter(8)
    for side in (-1, 1):  # lungs above the diaphragm
        lung = a.blob((side * 65 + a.jitter(4), 5 + a.jitter(4), dome + 75), (50 + a.jitter(4), 70, 85), 0.06)
        lung &= inner & (z > dome - 10 + 25 * ((x * side) < 0))
        image[lung] = -850 + a.jitter(20)
        labels[lung] = 9

    liver_centre = (-55 + a.jitter(6), -5 + a.jitter(6), dome - 40 + a.jitter(5))
    liver = a.blob(liver_centre, (75 + a.jitter(5), 65 + a.jitter(5), 50 + a.jitter(4)), 0.1) & inner & (labels == 0)
    image[liver] = 100 + a.jitter(10)
    labels[liver] = 1
    for _ in range(int(rng.integers(1, 4))):  # hypodense tumours well inside the liver
        radius = rng.uniform(10, 22)
        offset = rng.normal(0, 1, 3)
        offset = offset / np.linalg.norm(offset) * rng.uniform(0, 25)
        centre = tuple(np.asarray(liver_centre) + offset)
        tumour = a.blob(centre, (radius, radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2)), 0.12) & liver
        image[tumour] = tumour_hu + a.jitter(8)
        labels[tumour] = 2

    spleen = a.blob((85 + a.jitter(5), 40 + a.jitter(5), dome - 35 + a.jitter(5)), (28, 45, 50 + a.jitter(4)), 0.1)
    spleen &= inner & (labels == 0)
    image[spleen] = 115 + a.jitter(8)
    labels[spleen] = 3

    for value, side, shift in ((4, -1, -15), (5, 1, 0)):  # the right kidney sits lower
        kidney = a.blob((side * 68 + a.jitter(4), 50 + a.jitter(4), -15 + shift + a.jitter(6)), (24, 22, 50), 0.08)
        kidney &= inner & (labels == 0)
        image[kidney] = 170 + a.jitter(12)
        image[kidney & a.blob((side * 55, 45, -15 + shift), (9, 9, 28), 0.05)] = 30  # renal pelvis
        labels[kidney] = value

    spine_x, spine_y = a.jitter(3), 65 + a.jitter(4)
    aorta = a.tube_z(spine_x + 18, spine_y - 38, 11 + a.jitter(1), -70, dome + 40) & inner
    image[aorta] = 200 + a.jitter(20)
    labels[aorta] = 6

    vertebrae = np.zeros_like(body)
    for level in np.arange(-95, 160, 32.0):  # vertebral bodies with discs in between
        centre_z = level + a.jitter(1.5)
        vertebrae |= a.tube_z(spine_x, spine_y, 19, centre_z - 13, centre_z + 13)
        vertebrae |= (np.abs(x - spine_x) < 7) & (y > spine_y + 15) & (y < spine_y + 45) & (np.abs(z - centre_z) < 10)
    image[a.tube_z(spine_x, spine_y, 19, -110, 170)] = 80  # discs
    image[vertebrae] = 350 + a.jitter(30)
    image[vertebrae & ~ndimage.binary_erosion(vertebrae, iterations=1)] = 850
    labels[vertebrae] = 7

    pelvis = a.blob((spine_x, spine_y + 10, -125), (28, 25, 35), 0.05)  # sacrum
    for side in (-1, 1):  # iliac wings
        wing = a.blob((side * 85, 30 + a.jitter(4), -115 + a.jitter(4)), (22, 55, 45), 0.08)
        pelvis |= wing & ~a.blob((side * 70, 25, -100), (18, 50, 40), 0.05)
    pelvis &= inner & ~vertebrae
    image[pelvis] = 450 + a.jitter(40)
    image[pelvis & ~ndimage.binary_erosion(pelvis, iterations=1)] = 900
    labels[pelvis] = 8

    blur = (0.6, 0.5, 0.5)  # slice profile and in-plane point spread, in voxels
    image = ndimage.gaussian_filter(image, sigma=blur)
    image += rng.normal(0, rng.uniform(8, 20), image.shape).astype(np.float32)
    geometry = dict(spacing=spacing, origin=origin, direction=direction)
    return Phantom(Volume(np.round(image).astype(np.int16), **geometry), Volume(labels, **geometry))
