"""Is an image file whole? Checked before ITK reads it, because ITK does not always say.

ITK reads a truncated NIfTI without complaint, and a compressed NRRD or MetaImage whose data is
damaged (one flipped bit) as an image with garbage voxels: MetaImage only prints "Uncompress
failed", NRRD checks no checksum. Each compressed format here carries a checksum (gzip's CRC-32,
bzip2's CRC, zlib's Adler-32), so the data is decompressed once, as a stream, and must end where its
checksum says. Uncompressed NRRD and MetaImage need no check: ITK refuses them when cut short.
"""

from __future__ import annotations

import bz2
import re
import struct
import zlib
from pathlib import Path

import nrrd
import numpy as np

from .errors import InputError

CHUNK = 1 << 16  # compressed bytes read at a time (at most ~64 MiB once inflated)
# what pynrrd raises on a header it cannot parse (an empty vector field such as "space origin: " is an IndexError)
NRRD_HEADER_ERRORS = (nrrd.NRRDError, ValueError, IndexError)
NRRD_CODECS = {"gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
DAMAGED = (EOFError, OSError, zlib.error)  # what the decompressors raise for damaged or cut data


def check_image_file(path: Path) -> None:
    """Raise :class:`InputError` if ``path`` (NIfTI, NRRD or MetaImage) is cut short or its
    compressed data is damaged; other files are left to their reader."""
    if not path.is_file():
        return
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
        return
    data = _nrrd_data(path) if name.endswith((".nrrd", ".nhdr")) else \
        _metaimage_data(path) if name.endswith((".mha", ".mhd")) else None
    if data is None:
        return
    data_path, offset, codec = data
    try:
        with open(data_path, "rb") as handle:
            handle.seek(offset)
            for _ in _decompressed(handle, codec):  # read through: the checksum is checked at the end
                pass
    except FileNotFoundError:
        return  # a missing data file is the reader's to report
    except DAMAGED:
        raise InputError(f"Cannot read {path.name}: the file is truncated or corrupt "
                         "(its compressed image data ends early or fails its checksum)") from None


def _decompressed(handle, codec: str):
    """The data from ``handle``'s position on, decompressed in chunks, its checksum checked at the
    end; raises one of ``DAMAGED`` when the data is damaged or ends early. gzip goes through zlib
    (one member after the other), which checks a header's CRC as pynrrd's reader does; Python's
    gzip module skips it."""
    if codec == "bzip2":
        with bz2.BZ2File(handle) as stream:
            yield from iter(lambda: stream.read(1 << 22), b"")
        return
    wbits = zlib.MAX_WBITS | 16 if codec == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    for chunk in iter(lambda: handle.read(CHUNK), b""):
        while chunk:
            if codec == "gzip" and inflater.eof:  # the next member, or the zeros that may pad the last
                chunk = chunk.lstrip(b"\0")
                if not chunk:
                    break
                inflater = zlib.decompressobj(wbits)
            yield inflater.decompress(chunk)
            chunk = inflater.unused_data if codec == "gzip" and inflater.eof else b""
    yield inflater.flush()
    if not inflater.eof:
        raise EOFError(f"the {codec} stream ends early")


def _check_nifti(path: Path) -> None:
    """A NIfTI (gzip or not) must hold as many bytes as its header announces."""
    try:
        with open(path, "rb") as handle:
            if not path.name.lower().endswith(".gz"):
                header, received = handle.read(540), path.stat().st_size
            else:
                header, received = b"", 0
                for chunk in _decompressed(handle, "gzip"):
                    if len(header) < 540:
                        header += chunk[: 540 - len(header)]
                    received += len(chunk)
    except DAMAGED:
        raise InputError(f"Cannot read {path.name}: the file is truncated or corrupt") from None
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix, offset = struct.unpack(order + "h", header[72:74])[0], struct.unpack(order + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:  # NIfTI-2
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix, offset = struct.unpack(order + "h", header[14:16])[0], struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        raise InputError(f"Cannot read {path.name}: it has no NIfTI header (corrupt or not a NIfTI file)")
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
    expected = int(offset) + voxels * int(bitpix) // 8
    if received < expected:
        raise InputError(f"Cannot read {path.name}: the file is truncated ({received} of {expected} bytes)")


def _single_data_file(header: Path, value: str) -> Path | None:
    """The one data file a detached header names, or None for a list or a numbered pattern."""
    if not value or " " in value or "%" in value or value.upper().startswith("LIST"):
        return None
    return header.parent / value


def _nrrd_data(path: Path) -> tuple[Path, int, str] | None:
    """(file, offset, codec) of a gzip or bzip2 NRRD's data, or None when it is not compressed or
    its layout is one this check leaves to the reader (skipped lines, several data files, a header
    pynrrd cannot parse)."""
    try:
        with open(path, "rb") as handle:
            fields = nrrd.read_header(handle)
            attached_at = handle.tell()  # the header's empty line read: attached data starts here
    except NRRD_HEADER_ERRORS:
        return None
    codec = NRRD_CODECS.get(str(fields.get("encoding", "")).lower())
    if codec is None or "line skip" in fields or "lineskip" in fields:
        return None
    detached = fields.get("data file", fields.get("datafile"))
    if detached is None:
        return path, attached_at, codec
    data_file = _single_data_file(path, str(detached))
    return None if data_file is None else (data_file, 0, codec)


def _metaimage_data(path: Path) -> tuple[Path, int, str] | None:
    """(file, offset, "zlib") of a compressed MetaImage's data, or None when it is not compressed
    or its data is spread over several files."""
    with open(path, "rb") as handle:
        text = handle.read(CHUNK).decode("latin-1")  # the header's text: it precedes any local data
    element_data = re.search(r"^ElementDataFile\s*=\s*(.*?)\r?\n", text, re.MULTILINE)
    compressed = re.search(r"^CompressedData\s*=\s*true\s*$", text[: element_data.start() if element_data else 0],
                           re.MULTILINE | re.IGNORECASE)
    if element_data is None or compressed is None:
        return None
    value = element_data.group(1).strip()
    if value.upper() == "LOCAL":
        return path, element_data.end(), "zlib"  # latin-1: one character per byte
    data_file = _single_data_file(path, value)
    return None if data_file is None else (data_file, 0, "zlib")
