"""From a :class:`Volume` to the network's input grid, and back.

Inputs are reoriented by axis permutation and flips only (exactly invertible) so that array
axes run along S, P, L (array ``[k, j, i]`` ~ z, y, x in LPS), resampled to the model's spacing
and normalised as the model card says. Outputs (logits or probabilities) go back through the
same steps in reverse, so a label map always lands on the input's own grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, ModelCardError
from .volume import Volume


@dataclass(frozen=True)
class Reorientation:
    """How an input array was permuted and flipped to reach the canonical axis order."""

    permutation: tuple[int, int, int]  # canonical array axis n <- input array axis permutation[n]
    flips: tuple[bool, bool, bool]  # canonical array axes that were reversed
    spacing_zyx: tuple[float, float, float]  # spacing along the canonical array axes


AXIS_CODES = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}  # LPS axis, sign


def reorientation_of(volume: Volume, axes: str = "SPL") -> Reorientation:
    """Find the permutation and flips that make array axis n run toward ``axes[n]`` (default S, P, L:
    the engine's canonical order; ``"SAR"`` is a RAS-canonical NIfTI read the same way)."""
    if sorted(AXIS_CODES[code][0] for code in axes) != [0, 1, 2]:
        raise ValueError(f"Orientation '{axes}' does not name each of L/R, P/A and S/I once")
    direction = np.abs(volume.direction)  # rows: physical x, y, z; columns: voxel i, j, k
    voxel_axis_of = {}
    for flat in np.argsort(-direction.ravel(), kind="stable"):
        physical, voxel = divmod(int(flat), 3)
        if physical not in voxel_axis_of and voxel not in voxel_axis_of.values():
            voxel_axis_of[physical] = voxel
    # array axis a holds voxel axis 2 - a
    physical_sign = [AXIS_CODES[code] for code in axes]
    permutation = tuple(2 - voxel_axis_of[p] for p, _ in physical_sign)
    flips = tuple(bool(volume.direction[p, voxel_axis_of[p]] * sign < 0) for p, sign in physical_sign)
    spacing_zyx = tuple(volume.spacing[voxel_axis_of[p]] for p, _ in physical_sign)
    return Reorientation(permutation, flips, spacing_zyx)


def to_canonical(array: np.ndarray, how: Reorientation) -> np.ndarray:
    """Permute and flip an input-ordered array ``[k, j, i]`` to canonical order (a view)."""
    out = np.transpose(array, how.permutation)
    for axis, flip in enumerate(how.flips):
        if flip:
            out = np.flip(out, axis)
    return out


def from_canonical(tensor: torch.Tensor, how: Reorientation) -> torch.Tensor:
    """Undo :func:`to_canonical` on the last three axes of a tensor ``[..., z, y, x]``."""
    lead = tensor.ndim - 3
    flip_dims = [lead + axis for axis, flip in enumerate(how.flips) if flip]
    if flip_dims:
        tensor = torch.flip(tensor, flip_dims)
    inverse = np.argsort(how.permutation)
    return tensor.permute(*range(lead), *(lead + int(a) for a in inverse))


def resampled_shape(shape, spacing, target_spacing, grid: str = "field_of_view") -> tuple[int, int, int]:
    """Grid size at ``target_spacing``: covering the same field of view, or (``first_voxel``, MONAI's
    ``Spacingd``) starting at the first voxel's centre and reaching the last one's."""
    if grid == "first_voxel":
        return tuple(int(round((n - 1) * s / t)) + 1 for n, s, t in zip(shape, spacing, target_spacing))
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def resample(tensor: torch.Tensor, shape, steps=None) -> torch.Tensor:
    """Trilinear resampling of ``[C, z, y, x]`` to ``shape``: over the same field of view, or with
    ``steps`` (the source index distance between output voxels per axis) from the first voxel's
    centre, clamped at the last (MONAI's ``Spacingd`` and its inverse)."""
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    if steps is None:
        return F.interpolate(tensor[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]
    for axis, (n_out, step) in enumerate(zip(shape, steps), start=1):
        low, high, weight_low, weight_high = _linear_taps(n_out, tensor.shape[axis], step)
        view = [1] * tensor.ndim
        view[axis] = n_out
        tensor = (tensor.index_select(axis, low) * weight_low.view(view)
                  + tensor.index_select(axis, high) * weight_high.view(view))
    return tensor


def fill_value(array: np.ndarray) -> float:
    """The value an image holds outside the body: 0, or its minimum where more voxels hold the
    minimum than hold 0 (a skull-stripped MRI stored with another constant outside the brain, such
    as BraTS 2013's FLAIR, z-scored inside the brain)."""
    lowest = float(array.min())
    return lowest if np.count_nonzero(array == lowest) > np.count_nonzero(array == 0) else 0.0


BRAIN_ML_AT_MOST = 2100.0  # a skull-stripped adult brain holds 1.1-1.9 L (BraTS: 1.1-1.7 L); a head 2.5 L and more
SIGNAL_SHARE = 0.01  # a voxel holds signal above its background by 1 % of the 99th percentile's height


def check_skull_stripped(volume: Volume, subject: str) -> None:
    """Refuse an image that is not a skull-stripped brain: more of it holds signal (voxels 1 % of
    the 99th percentile above its background value, :func:`fill_value`) than a brain fills. A head
    with skull, scalp and the noise of the air around it is several litres. ``subject`` names the
    image in the message ("The FLAIR image for model ...")."""
    background = fill_value(volume.array)
    height = float(np.percentile(volume.array[::4, ::4, ::4], 99)) - background  # every 64th voxel suffices
    signal_ml = np.count_nonzero(volume.array > background + SIGNAL_SHARE * height) * volume.voxel_volume_ml
    if signal_ml > BRAIN_ML_AT_MOST:
        raise InputError(f"{subject} is not skull-stripped: {signal_ml / 1000:.1f} L of it holds signal, more than "
                         f"a brain ({BRAIN_ML_AT_MOST / 1000:.1f} L at most); strip the skull first "
                         "(e.g. with HD-BET, in Slicer its HDBrainExtraction extension, or SynthStrip)")


def check_stripped_channels(channels: list[Volume], channel_specs: list[dict], whose: str) -> None:
    """:func:`check_skull_stripped` on every channel its card entry marks ``skull_stripped``;
    ``whose`` completes the image's name in the message ("for model ...", "of case ...")."""
    for channel, spec in zip(channels, channel_specs):
        if spec.get("skull_stripped"):
            check_skull_stripped(channel, f"The {spec['name']} image {whose}")


def normalise(array: np.ndarray, scheme: dict, mask: np.ndarray | None = None) -> np.ndarray:
    """Intensity normalisation of one channel as a model card describes it (float32 out); the
    z-score of ``zscore_nonzero`` is over ``mask`` where given (nnU-Net's filled non-zero region),
    else over the non-zero voxels (MONAI's ``nonzero``); that of ``zscore_foreground`` (the
    engine's own training for MRI) is over the voxels that differ from :func:`fill_value`, and the
    others become 0, so an image looks the same to the network whatever its fill. A ``rescale``
    range then maps the result's minimum and maximum onto it (MONAI's ``ScaleIntensity``).

    Works in place on one float32 copy: no further full-size temporaries.
    """
    data = array.astype(np.float32, copy=True)
    kind = scheme["scheme"]
    if kind == "ct":
        np.clip(data, *scheme["clip"], out=data)
        data -= scheme["mean"]
        data /= scheme["std"]
    elif kind in ("zscore_nonzero", "zscore_foreground"):
        if mask is None:
            mask = data != (fill_value(data) if kind == "zscore_foreground" else 0)
        if mask.any():
            values = data[mask]
            data[mask] = (values - values.mean()) / max(float(values.std()), 1e-8)
        if kind == "zscore_foreground":
            data[~mask] = 0.0
    elif kind == "zscore":
        mean, std = float(data.mean()), max(float(data.std()), 1e-8)
        data -= mean
        data /= std
    if "rescale" in scheme:
        low, high = scheme["rescale"]
        smallest, largest = float(data.min()), float(data.max())
        if largest > smallest:
            data -= smallest
            data *= (high - low) / (largest - smallest)
            data += low
        else:  # a constant image: MONAI multiplies it by the minimum
            data *= low
    return data


@dataclass(frozen=True)
class Prepared:
    """A network-ready tensor ``[C, z, y, x]`` and what is needed to map results back: ``steps_back``
    is None on a field-of-view grid, else the network-grid index distance between input voxels."""

    tensor: torch.Tensor
    reorientation: Reorientation
    canonical_shape: tuple[int, int, int]
    steps_back: tuple[float, float, float] | None = None


def in_array_order(values_xyz, axes: str = "SPL") -> tuple:
    """Per-axis values given along physical x, y, z (a card's spacing or patch size) in the order of
    the array axes that ``axes`` names (``"SPL"``: z, y, x)."""
    return tuple(values_xyz[AXIS_CODES[code][0]] for code in axes)


def prepare(channels: list[Volume], channel_specs: list[dict], target_spacing_xyz, axes: str = "SPL",
            grid: str = "field_of_view", normalise_first: bool = True) -> Prepared:
    """Reorient (array axes toward ``axes``), normalise and resample the input channels (all on one
    grid of the kind ``grid`` names, see :func:`resampled_shape`) for a model; normalised on the
    network's grid instead when not ``normalise_first`` (MONAI bundles whose intensity transforms
    follow Spacingd)."""
    how = reorientation_of(channels[0], axes)
    arrays = [to_canonical(ch.array, how) for ch in channels]
    if normalise_first:
        arrays = [normalise(array, spec["normalisation"]) for array, spec in zip(arrays, channel_specs)]
    stacked = arrays[0][None] if len(arrays) == 1 else np.stack(arrays)  # no extra copy for one channel
    tensor = torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32))
    canonical_shape = tuple(tensor.shape[1:])
    target = in_array_order(target_spacing_xyz, axes)
    steps = tuple(t / s for s, t in zip(how.spacing_zyx, target)) if grid == "first_voxel" else None
    tensor = resample(tensor, resampled_shape(canonical_shape, how.spacing_zyx, target, grid), steps)
    if not normalise_first:
        tensor = torch.from_numpy(np.stack([normalise(channel, spec["normalisation"])
                                            for channel, spec in zip(tensor.numpy(), channel_specs)]))
    return Prepared(tensor, how, canonical_shape, tuple(1 / step for step in steps) if steps else None)


def prepare_for_card(channels: list[Volume], card, fast: bool = False) -> Prepared:
    """:func:`prepare` as a model card asks: its channels' normalisation, (fast) spacing,
    orientation, grid and order of normalising and resampling."""
    return prepare(channels, card.channels, card.spacing(fast), card.orientation, card.inference.get("grid", "field_of_view"),
                   card.inference.get("normalise") != "after_resampling")


BODY_HU = -500.0  # CT voxels above this are the body (or the table); below, air
BODY_MARGIN_MM = 24.0
BODY_BOX_MAX_SHARE = 0.9  # a box nearly as large as the grid is not worth cropping to


def body_box(prepared: Prepared, card, fast: bool = False) -> tuple[slice, slice, slice] | None:
    """The box of the network's grid around the body of a CT (the card's first channel: voxels above
    -500 HU) grown by 24 mm, or None where it is nearly the whole grid or empty."""
    scheme = card.channels[0]["normalisation"]
    if scheme["scheme"] != "ct":
        raise ModelCardError(f"Model '{card.name}' crops to the body, which needs a CT channel (normalisation ct)")
    inside = prepared.tensor[0] > (max(BODY_HU, scheme["clip"][0]) - scheme["mean"]) / scheme["std"]
    box = []
    for axis, spacing in enumerate(in_array_order(card.spacing(fast), card.orientation)):
        present = torch.nonzero(inside.any(dim=[a for a in range(3) if a != axis]))[:, 0]
        if len(present) == 0:
            return None
        margin = int(np.ceil(BODY_MARGIN_MM / spacing))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, inside.shape[axis])))
    if math.prod(s.stop - s.start for s in box) > BODY_BOX_MAX_SHARE * inside.numel():
        return None
    return tuple(box)


def _linear_taps(n_out: int, n_in: int, step: float | None = None):
    """Source indices and weights of linear resampling from ``n_in`` to ``n_out`` samples over the same
    field of view (the arithmetic of ``F.interpolate(..., align_corners=False)``), or with ``step``
    from the first sample on (clamped at the last)."""
    if step is None:
        source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    else:
        source = (torch.arange(n_out, dtype=torch.float64) * step).clamp(0, n_in - 1)
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    weight_high = (source - low).float()
    return low, high, 1 - weight_high, weight_high


def class_argmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scores.argmax(0)`` as ``dtype``, by a running maximum over the classes (several times faster
    here than PyTorch's reduction across the first axis); ties go to the first class, as there."""
    best = scores[0].clone()
    labels = torch.zeros(scores.shape[1:], dtype=dtype)
    for value in range(1, scores.shape[0]):
        better = scores[value] > best
        labels.masked_fill_(better, value)
        torch.maximum(best, scores[value], out=best)
    return labels


def _agreeing_cells(coarse: torch.Tensor, interpolate_first_axis: bool, dtype: torch.dtype) -> torch.Tensor:
    """For each cell of a coarse label grid, the label all its corners share, or -1 where they
    differ. Cell ``(i, j, k)`` has the corners ``i`` and ``i + 1`` along each axis (the last point
    standing in for ``i + 1`` at the far edge, where the taps clamp), and only ``i`` along the first
    axis when it is not interpolated (nearest)."""
    padded = coarse.to(dtype)
    for axis in range(3):
        padded = torch.cat([padded, padded.narrow(axis, padded.shape[axis] - 1, 1)], axis)
    depth, rows, columns = coarse.shape
    base = padded[:depth, :rows, :columns]
    same = torch.ones(base.shape, dtype=torch.bool)
    for dz in ((0, 1) if interpolate_first_axis else (0,)):
        for dy in (0, 1):
            for dx in (0, 1):
                same &= padded[dz:dz + depth, dy:dy + rows, dx:dx + columns] == base
    return torch.where(same, base, torch.tensor(-1, dtype=dtype))


def _runs(low: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the ``n_in`` source samples, the first output sample whose lower tap it is and
    how many are: the taps never decrease, so each source sample's outputs are one run."""
    counts = torch.bincount(low, minlength=n_in)
    return torch.cumsum(counts, 0) - counts, counts


def _interpolated_cells(scores: torch.Tensor, cells: torch.Tensor, taps: list, runs: list) -> tuple:
    """The argmax of the trilinear scores at every output voxel of the coarse ``cells [n, 3]``, as
    (flat output indices, labels). All voxels of a cell share its 8 corners, so each cell's corners
    are interpolated along x, y then z over the cell's runs, padded to the longest run."""
    axes = []
    for axis, ((low, high, _, weight_high), (starts, counts)) in enumerate(zip(taps, runs)):
        cell = cells[:, axis]
        offsets = torch.arange(int(counts.max()))
        valid = offsets < counts[cell][:, None]  # [n, longest run]
        voxels = (starts[cell][:, None] + offsets).clamp(max=len(low) - 1)
        corners = torch.stack([low[voxels[:, 0]], high[voxels[:, 0]]], 1)  # [n, 2]
        axes.append((voxels, valid, corners, torch.where(valid, weight_high[voxels], 0)))
    (z, z_valid, z_corners, z_weight), (y, y_valid, y_corners, y_weight), (x, x_valid, x_corners, x_weight) = axes
    corners = ((z_corners[:, :, None, None] * scores.shape[2] + y_corners[:, None, :, None]) * scores.shape[3]
               + x_corners[:, None, None, :])
    by_voxel = scores.reshape(scores.shape[0], -1).t()
    values = by_voxel[corners.reshape(-1)].reshape(len(cells), 2, 2, 2, scores.shape[0])
    values = torch.lerp(values[:, :, :, :1], values[:, :, :, 1:], x_weight[:, None, None, :, None])
    values = torch.lerp(values[:, :, :1], values[:, :, 1:], y_weight[:, None, :, None, None])
    values = torch.lerp(values[:, :1], values[:, 1:], z_weight[:, :, None, None, None])  # [n, z, y, x, classes]
    valid = z_valid[:, :, None, None] & y_valid[:, None, :, None] & x_valid[:, None, None, :]
    flat = (z[:, :, None, None] * len(taps[1][0]) + y[:, None, :, None]) * len(taps[2][0]) + x[:, None, None, :]
    return flat[valid], values.argmax(-1)[valid]


def _interpolated_slabs(scores: torch.Tensor, shape, taps: list, bilinear: bool, dtype: torch.dtype,
                        slab: int = 16) -> torch.Tensor:
    """The argmax of the trilinear scores at every output voxel, a slab of output planes at a time
    (PyTorch's own bilinear resampling in-plane where the taps are its own)."""
    (z_low, z_high, z_w0, z_w1), (y_low, y_high, y_w0, y_w1), (x_low, x_high, x_w0, x_w1) = taps
    labels = torch.empty(tuple(shape), dtype=dtype)
    for start in range(0, shape[0], slab):
        z = slice(start, min(start + slab, shape[0]))
        dense = scores[:, z_low[z]] * z_w0[z][None, :, None, None] + scores[:, z_high[z]] * z_w1[z][None, :, None, None]
        if bilinear:
            dense = F.interpolate(dense.transpose(0, 1), size=tuple(shape[1:]), mode="bilinear",
                                  align_corners=False).transpose(0, 1)
        else:
            dense = dense[:, :, y_low] * y_w0[None, None, :, None] + dense[:, :, y_high] * y_w1[None, None, :, None]
            dense = dense[..., x_low] * x_w0 + dense[..., x_high] * x_w1
        labels[z] = class_argmax(dense, dtype)
    return labels


def resample_argmax(scores: torch.Tensor, shape, nearest_first_axis: bool = False, steps=None,
                    slabs_above: float = 1 / 3, voxels_per_chunk: int = 2**21) -> torch.Tensor:
    """The argmax labels of ``scores [C, z, y, x]`` (on the CPU) resampled to ``shape``: trilinear
    over the same field of view, as ``F.interpolate(..., align_corners=False)``, or from the first
    voxel on with ``steps`` (see :func:`resample`), or nearest along z when ``nearest_first_axis``
    (as nnU-Net does along the coarse axis of anisotropic images). Full-resolution scores never exist.

    Exact shortcut: a voxel whose (up to 8) source grid points all have the same argmax gets that
    label, because a convex combination of score vectors keeps a class that is largest at every
    point the largest. Whether they agree is found once per cell of the coarse grid; agreeing cells
    are copied to their voxels, and only the cells that hold a label boundary are interpolated, a
    chunk of cells at a time; when more than ``slabs_above`` of the voxels lie in such cells
    (boundaries everywhere), every voxel is interpolated, a slab at a time (cheaper per voxel).
    """
    dtype = torch.uint8 if scores.shape[0] <= 256 else torch.int16
    taps = [_linear_taps(n_out, n_in, step) for n_out, n_in, step in zip(shape, scores.shape[1:], steps or (None,) * 3)]
    if nearest_first_axis:
        nearest = nearest_taps(shape[0], scores.shape[1])
        taps[0] = (nearest, nearest, torch.ones(shape[0]), torch.zeros(shape[0]))
    cells = _agreeing_cells(class_argmax(scores, dtype), not nearest_first_axis,
                            torch.int16 if scores.shape[0] <= 2**15 else torch.int32)
    runs = [_runs(low, n_in) for (low, *_), n_in in zip(taps, scores.shape[1:])]
    boundary = torch.nonzero(cells < 0)  # cells whose corners disagree: [n, 3]
    boundary_voxels = runs[0][1][boundary[:, 0]] * runs[1][1][boundary[:, 1]] * runs[2][1][boundary[:, 2]]
    if int(boundary_voxels.sum()) > slabs_above * math.prod(shape):
        return _interpolated_slabs(scores, shape, taps, steps is None, dtype)
    boundary = boundary[boundary_voxels > 0]  # cells that no output voxel falls in need nothing
    labels = cells.clamp(min=0).to(dtype).numpy()
    for axis, (_, counts) in enumerate(runs):
        labels = np.repeat(labels, counts.numpy(), axis)  # each cell's label to its voxels
    labels = torch.from_numpy(labels)
    cells_per_chunk = max(1, voxels_per_chunk // (math.prod(int(counts.max()) for _, counts in runs) * scores.shape[0]))
    for start in range(0, len(boundary), cells_per_chunk):
        voxels, values = _interpolated_cells(scores, boundary[start:start + cells_per_chunk], taps, runs)
        labels.view(-1)[voxels] = values.to(dtype)
    return labels


def nearest_taps(n_out: int, n_in: int) -> torch.Tensor:
    """Source index of nearest-neighbour resampling from ``n_in`` to ``n_out`` samples (same field of view)."""
    source = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    return torch.floor(source + 0.5).long().clamp(0, n_in - 1)


def restore_scalar(values: torch.Tensor, prepared: Prepared) -> np.ndarray:
    """A scalar map ``[z, y, x]`` on the model's grid, resampled (trilinear) to the input's grid and order."""
    restored = resample(values[None].float(), prepared.canonical_shape, prepared.steps_back)[0]
    return np.ascontiguousarray(from_canonical(restored, prepared.reorientation).numpy())


def restore_labels(scores: torch.Tensor, prepared: Prepared, nearest: bool = False) -> np.ndarray:
    """The argmax label map on the input's grid, in the input array order: the scores resampled and
    then their argmax, or with ``nearest`` the argmax on the model's grid taken to each input voxel
    from the nearest grid point (as MONAI's ``Invertd`` with nearest interpolation)."""
    if not nearest:
        labels = resample_argmax(scores, prepared.canonical_shape, steps=prepared.steps_back)
    else:
        labels = class_argmax(scores, torch.uint8 if scores.shape[0] <= 256 else torch.int16)
        for axis, (n_out, step) in enumerate(zip(prepared.canonical_shape, prepared.steps_back or (None,) * 3)):
            source = (nearest_taps(n_out, labels.shape[axis]) if step is None else
                      (torch.arange(n_out, dtype=torch.float64) * step).round().long().clamp(0, labels.shape[axis] - 1))
            labels = labels.index_select(axis, source)
    return np.ascontiguousarray(from_canonical(labels, prepared.reorientation).numpy())
