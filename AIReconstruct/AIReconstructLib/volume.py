"""The engine's one geometry convention.

A :class:`Volume` holds a numpy array indexed ``[k, j, i]`` (slice, row, column: the order
SimpleITK's and Slicer's numpy views use) and the geometry that maps voxel index ``(i, j, k)``
to patient coordinates in **LPS** millimetres::

    point = origin + direction @ (spacing * (i, j, k))

``direction`` is 3x3 with one column per voxel axis (i, j, k). Conversion to Slicer's RAS
happens only in the Slicer adapter (and in mesh export when RAS is asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def kji_to_patient(kji: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Voxel indices ``[..., (k, j, i)]`` (fractional too) as patient mm, by a 4x4 index-to-patient
    matrix (:meth:`Volume.ijk_to_lps` or :meth:`Volume.ijk_to_ras`)."""
    return np.asarray(kji)[..., ::-1] @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True)
class Volume:
    """A 3D scalar image with its geometry (array ``[k, j, i]``, LPS physical space)."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=float).reshape(3, 3))

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to RAS millimetres (Slicer's convention)."""
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ self.ijk_to_lps()

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry around another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return replace(self, array=array)

    def same_grid(self, other: "Volume", tolerance: float = 1e-4) -> bool:
        """True when both volumes share shape, spacing, origin and direction."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def cropped(self, box: tuple[slice, slice, slice]) -> "Volume":
        """The block ``array[box]`` (slices along k, j, i with steps of 1) where it lies in space."""
        first_voxel = [part.start for part in box]
        return replace(self, array=self.array[box], origin=tuple(kji_to_patient(first_voxel, self.ijk_to_lps())))

    def with_block(self, block: np.ndarray, box: tuple[slice, slice, slice], fill=0) -> "Volume":
        """This grid holding ``block`` at ``box`` (as :meth:`cropped` cut it) and ``fill`` elsewhere."""
        array = np.full(self.array.shape, fill, block.dtype)
        array[box] = block
        return self.with_array(array)

    def placed_on(self, grid: "Volume", tolerance: float = 1e-4) -> "Volume | None":
        """This volume on ``grid``'s voxels, zeros around it, when it is a block of that grid: the same
        spacing and direction, its first voxel on one of the grid's, all of it inside (a segmentation
        saved cropped to its segments, as Slicer does with "crop to minimum extent"); else None."""
        if not (np.allclose(self.spacing, grid.spacing, atol=tolerance)
                and np.allclose(self.direction, grid.direction, atol=tolerance)):
            return None
        offset = np.linalg.solve(grid.ijk_to_lps()[:3, :3], np.subtract(self.origin, grid.origin))
        start = np.round(offset)
        if not np.allclose(offset, start, atol=tolerance):
            return None
        start = start.astype(int)
        stop = start + self.shape_ijk
        if (start < 0).any() or (stop > grid.shape_ijk).any():
            return None
        return grid.with_block(self.array, tuple(slice(a, b) for a, b in zip(start[::-1], stop[::-1])))

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """Build a volume from an array ``[k, j, i]`` and Slicer's 4x4 IJK-to-RAS matrix."""
        ijk_to_lps = np.asarray(ijk_to_ras, dtype=float).copy()
        ijk_to_lps[:3, :] = LPS_TO_RAS @ ijk_to_lps[:3, :]
        scaled = ijk_to_lps[:3, :3]
        spacing = np.linalg.norm(scaled, axis=0)
        return cls(array, tuple(spacing), tuple(ijk_to_lps[:3, 3]), scaled / spacing)
