"""Read one DICOM image series from a folder, refusing what would be read wrong: a folder of
several series (each named, so the user can tell them apart), or slices missing, duplicated or
from another series (uneven spacing), naming the files GDCM could not read as slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError


def read_dicom_series(folder: Path) -> sitk.Image:
    """The one image series in ``folder`` as a SimpleITK image."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"{folder.name} holds no DICOM image series")
    if len(series_ids) > 1:
        raise InputError(f"{folder.name} holds {len(series_ids)} DICOM series ({_series_names(folder, series_ids)}); "
                         "put the one to segment in a folder of its own")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    try:
        _check_slice_positions(files, folder.name)
    except InputError as error:  # name the files GDCM did not read as slices: a damaged slice is one
        in_series = set(files)
        unread = sorted(p.name for p in folder.iterdir() if p.is_file() and str(p) not in in_series)
        if not unread:
            raise
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise InputError(f"{error}; files not read as slices (truncated, corrupt or not DICOM): "
                         f"{', '.join(unread[:3])}{more}") from None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _series_names(folder: Path, series_ids) -> str:
    """The series of a folder as "'description' (N images)", for a message: the user's way to tell them apart."""
    reader = sitk.ImageFileReader()
    names = []
    for uid in series_ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        description = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
        names.append(f"'{description or 'series ' + uid}' ({len(files)} images)")
    return ", ".join(names)


def _check_slice_positions(files, name: str) -> None:
    """Refuse a series whose slices are not evenly spaced (missing, duplicated or mixed slices)."""
    positions = []
    for file in files:
        header = sitk.ImageFileReader()
        header.SetFileName(file)
        header.ReadImageInformation()
        if not header.HasMetaDataKey("0020|0032"):
            return  # no positions to check (a single multi-frame file, for instance)
        positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
    if len(positions) < 3:
        return
    along = np.diff(np.asarray(positions), axis=0)
    gaps = np.linalg.norm(along, axis=1)
    if gaps.min() < 1e-3 or gaps.max() > 1.05 * np.median(gaps) or gaps.min() < 0.95 * np.median(gaps):
        raise InputError(
            f"{name}: slice spacing is uneven ({gaps.min():.2f} to {gaps.max():.2f} mm); "
            "slices are missing, duplicated or from another series"
        )
