"""File I/O at the engine's edges: read and check volumes, write atomically.

Everything inside the engine works on :class:`~AIReconstructLib.volume.Volume` objects; only
this module (and the writers for segmentations and meshes) touches paths.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .dicom_series import read_dicom_series
from .integrity import check_image_file
from .volume import Volume

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_INPUT_BYTES_ENV = "AIRECONSTRUCT_MAX_INPUT_BYTES"
MAX_LABEL_VALUES = 1000  # brain parcellations have ~200 labels, TotalSegmentator 117; a 12-bit image, thousands


def max_input_bytes() -> int:
    """The largest input (as float32) the engine accepts: a quarter of physical memory, since a
    run holds the image, its resampled copy and per-class scores at once (override with
    $AIRECONSTRUCT_MAX_INPUT_BYTES)."""
    if os.environ.get(MAX_INPUT_BYTES_ENV):
        return int(os.environ[MAX_INPUT_BYTES_ENV])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".seg.nrrd",) + IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix


def image_stem(path: str | os.PathLike) -> str:
    """A file's name without its image suffix (``case 1.nii.gz`` -> ``case 1``)."""
    path = Path(path)
    return path.name[: len(path.name) - len(_suffix(path))]


def find_cases(folder: str | os.PathLike, channels: int) -> list[tuple[str, tuple[Path, ...]]]:
    """The cases of a folder of images, as (case name, one input per channel), sorted by name.

    For a model of several channels, files named as in nnU-Net's ``imagesTs`` (``CASE_0000.nii.gz``,
    ``CASE_0001.nii.gz``, ...: one file per channel) are grouped by case. For a single-channel model
    every image file and every sub-folder (a DICOM series) is a case of its own, named after the
    file (without ``_0000`` where every file ends so, as in ``imagesTs``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
             and not p.name.lower().endswith(".seg.nrrd")]
    stems = [image_stem(p) for p in files]
    numbered = all(len(s) > 5 and s[-5] == "_" and s[-4:].isdigit() for s in stems)
    if channels > 1 and files and numbered:
        by_case: dict[str, dict[int, Path]] = {}
        for stem, path in zip(stems, files):
            by_case.setdefault(stem[:-5], {})[int(stem[-4:])] = path
        for case, found in by_case.items():
            if sorted(found) != list(range(channels)):
                expected = ", ".join(f"{case}_{c:04d}" for c in range(channels))
                raise InputError(f"Case {case} in {folder.name} has channel files {sorted(found)}; "
                                 f"the model takes {channels}: {expected}")
        return [(case, tuple(found[c] for c in range(channels))) for case, found in sorted(by_case.items())]
    if channels != 1:
        raise InputError(f"The model takes {channels} channels: name each case's files CASE_0000, CASE_0001, ... "
                         f"in {folder.name}")
    if files and all(s.endswith("_0000") for s in stems):  # nnU-Net's names for one channel: CASE_0000
        stems = [s[:-5] for s in stems]
    cases = [(stem, (path,)) for stem, path in zip(stems, files)]
    cases += [(sub.name, (sub,)) for sub in entries if sub.is_dir() and not sub.name.startswith(".")]
    if not cases:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders")
    names = [case for case, _ in cases]
    twice = next((case for case in names if names.count(case) > 1), None)
    if twice is not None:
        raise InputError(f"{folder.name} has two images of case {twice}")
    return sorted(cases)


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError(f"Input not found: {path}")
    check_image_file(path)
    try:
        if path.is_dir():
            image = read_dicom_series(path)
            _check_size(image.GetSize(), image.GetNumberOfComponentsPerPixel(), path.name)
            return image
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        _check_size(reader.GetSize(), reader.GetNumberOfComponents(), path.name)
        return reader.Execute()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise InputError(
            f"Cannot read {path.name}: the file is corrupt or not a supported image "
            f"(NIfTI, NRRD, MHA/MHD or a DICOM folder) ({first_line.strip()[:120]})"
        ) from None


def _check_size(size, components: int, name: str) -> None:
    """Refuse, from the header alone, an image too large to process in this machine's memory."""
    needed = int(np.prod(size, dtype=np.float64)) * max(components, 1) * 4
    allowed = max_input_bytes()
    if needed > allowed:
        raise InputError(
            f"{name} is too large to process here: {' x '.join(map(str, size))} voxels need "
            f"{needed / 2**30:.1f} GiB as float32, more than the {allowed / 2**30:.1f} GiB allowed"
        )


def _squeeze_to_3d(image: sitk.Image, name: str) -> sitk.Image:
    """Drop trailing singleton dimensions (a 4D NIfTI with one time point is a 3D volume)."""
    while image.GetDimension() > 3 and image.GetSize()[-1] == 1:
        size = list(image.GetSize())
        size[-1] = 0
        image = sitk.Extract(image, size, [0] * image.GetDimension())
    if image.GetDimension() != 3:
        raise InputError(
            f"{name} is a {image.GetDimension()}D image of size {image.GetSize()}; "
            "a single 3D volume is needed"
        )
    return image


class _VoxelsOf:
    """Lends a SimpleITK image's voxels to numpy without copying them (``np.asarray`` of it is a
    read-only view that keeps the image alive): a 512 x 512 x 300 CT is not copied once more."""

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def volume_from_sitk(image: sitk.Image, name: str = "image") -> Volume:
    """Convert a SimpleITK image to a :class:`Volume`, refusing anything but a 3D scalar image."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "a single-channel scalar volume is needed"
        )
    image = _squeeze_to_3d(image, name)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(f"{name} has direction cosines that are not orthonormal (a sheared or skewed grid)")
    if min(image.GetSize()) == 0:
        raise InputError(f"{name} is empty: it has no voxels")
    if min(image.GetSize()) < 2:
        raise InputError(f"{name} is only 1 voxel thick (size {image.GetSize()}); a 3D volume is needed")
    array = np.asarray(_VoxelsOf(image))
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"{name} contains {bad} NaN or infinite voxel values")
    return Volume(array, image.GetSpacing(), image.GetOrigin(), direction)


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """Convert a :class:`Volume` to a SimpleITK image with the same geometry."""
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction.ravel()))
    return image


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA/MHD or a DICOM series folder)."""
    path = Path(path)
    return volume_from_sitk(_read_sitk(path), path.name)


def read_image_for_model(path: str | os.PathLike) -> Volume:
    """Read a volume to segment: like :func:`read_volume`, and it must not be blank."""
    volume = read_volume(path)
    low, high = float(volume.array.min()), float(volume.array.max())
    if low == high:
        raise InputError(f"{Path(path).name} is blank: every voxel has the value {low:g}")
    return volume


def read_labelmap(path: str | os.PathLike, like: Volume | None = None) -> Volume:
    """Read an integer label map; with ``like``, require it to lie on that image's grid."""
    path = Path(path)
    volume = read_volume(path)
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise InputError(f"{path.name} is not a label map: it has non-integer voxel values")
    if array.min() < 0:
        raise InputError(f"{path.name} is not a label map: it has negative voxel values")
    largest = array.max()
    if largest > np.iinfo(np.uint16).max:
        raise InputError(f"{path.name} is not a label map: it has values above 65535")
    volume = volume.with_array(array.astype(np.uint16 if largest > 255 else np.uint8))
    if volume.array.dtype == np.uint16 and np.count_nonzero(np.bincount(volume.array.ravel())) > MAX_LABEL_VALUES:
        raise InputError(f"{path.name} is not a label map: it has more than {MAX_LABEL_VALUES} different values, "
                         "as an image has")
    if like is not None and not volume.same_grid(like):
        raise InputError(
            f"{path.name} does not match its image's grid (size {volume.shape_ijk} vs {like.shape_ijk}, "
            "or different spacing, origin or direction)"
        )
    return volume


def _file_mode() -> int:
    """The permissions a plainly created file gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    suffix = _suffix(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # mkstemp makes it private; the result gets ordinary permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows (dicts; columns in order of first appearance) as a CSV file, atomically."""
    path = Path(path)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume to NIfTI/NRRD/MHA atomically; returns the path written."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            sitk.WriteImage(volume_to_sitk(volume), str(tmp), useCompression=compress)
    except (OSError, RuntimeError) as error:
        raise OutputError(f"Cannot write {path}: {error}") from None
    return path


MAP_STEP = 1 / 1024  # the precision 0-1 maps are stored with: exact in float32, 0.0005 at most from the value


def write_map(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a 0-1 map (uncertainty, confidence, saliency) in steps of ``MAP_STEP``: its full float32
    precision is noise gzip cannot compress (a 240 x 240 x 155 uncertainty map: 30 MB, written in
    0.9 s; rounded: under 1 MB in 0.1 s), and no reader needs more than three decimals of it."""
    return write_volume(volume.with_array((np.round(volume.array / MAP_STEP) * MAP_STEP).astype(np.float32)), path)


STAGING_PREFIX = ".aireconstruct-partial-"


def remove_stale_folders(folder: Path, prefix: str) -> None:
    """Remove the folders ``<prefix><pid>-...`` in ``folder`` that processes no longer running left
    behind (killed runs)."""
    for stale in folder.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


class StagedOutput:
    """An output folder whose new files appear all together, or not at all.

    Files are written into a hidden staging folder inside ``folder``; :meth:`commit` moves
    them into place. If the block fails (or is cancelled) the staging folder is removed and
    ``folder`` is exactly as it was (it is removed again if this run created it). A run killed
    outright leaves only its hidden staging folder, which the next run there removes.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.created_folder = False
        self.staging: Path | None = None
        self.committed: list[Path] = []

    def __enter__(self) -> "StagedOutput":
        try:
            if not self.folder.exists():
                self.folder.mkdir(parents=True)
                self.created_folder = True
            remove_stale_folders(self.folder, STAGING_PREFIX)
            self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.folder))
        except OSError as error:
            raise OutputError(f"Cannot write into {self.folder}: {error.strerror or error}") from None
        return self

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` (inside the staging folder)."""
        assert self.staging is not None, "use StagedOutput as a context manager"
        target = self.staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_text(self, name: str, text: str) -> Path:
        """Write a text output (UTF-8) into the staging folder."""
        target = self.path(name)
        try:
            target.write_text(text, encoding="utf-8")
        except OSError as error:  # the message's staged path becomes the real one in __exit__
            raise OutputError(f"Cannot write {target}: {error.strerror or error}") from None
        return target

    def commit(self) -> list[Path]:
        """Move every staged file into the output folder; returns the final paths."""
        assert self.staging is not None
        try:
            for staged in sorted(p for p in self.staging.rglob("*") if p.is_file()):
                final = self.folder / staged.relative_to(self.staging)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
                self.committed.append(final)
        except OSError as error:
            raise OutputError(f"Cannot move the results into {self.folder}: {error.strerror or error}") from None
        return self.committed

    def __exit__(self, exc_type, exc, tb):
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if exc_type is not None and self.created_folder and not any(self.folder.iterdir()):
            self.folder.rmdir()
        if isinstance(exc, OutputError) and self.staging is not None:  # name the real folder, not the hidden one
            raise OutputError(str(exc).replace(str(self.staging), str(self.folder))) from None
        return False
