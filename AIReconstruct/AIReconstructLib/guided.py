"""A guided model: a network that sees the image plus include points, exclude points and the current
segment as three more channels, and returns the corrected segment (docs/interaction.md).

Its card lists the image channels first, then the three guidance channels (normalisation "none"),
and ``"guidance": {"radius_mm": R}``: points are drawn as balls of radius R. Training simulates
users: the current segment is the truth damaged (parts of its border lost or grown irregularly,
eroded, dilated, a part cut out or a false part added, or empty) or, where given, a model's own
result on the case from a model that never saw it (its real errors); the points are placed, one
after the other, in the largest error left, and in nine patches of ten the image's evidence for what
the points correct is weakened (:func:`weakened_evidence`). The network starts from the base model's weights
(:func:`warm_started_network`), so it begins as good as the base model and learns what the points
and the segment add.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .dataset import read_dataset
from .errors import InputError
from .interaction import REACH_MM, Click, ball_in_window, box_centre, box_slices, next_click, refine_region
from .io import write_csv
from .modelcard import CARD_FILE, ModelCard, save_card, sha256_of
from .networks import build_network, check_patch_size, load_network, save_weights, unique_state
from .predict import Predictor
from .preprocess import in_array_order, normalise, prepare, restore_labels
from .training_data import PatchSampler, load_case
from .volume import Volume, kji_to_patient

GUIDANCE = ("include points", "exclude points", "current segment")


def guidance_maps(shape, clicks: list[Click], mask: np.ndarray, spacing_kji, radius_mm: float) -> list[np.ndarray]:
    """Include balls, exclude balls and the current segment as float32 arrays of ``shape``."""
    maps = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
    for click in clicks:
        window, ball = ball_in_window(shape, click.kji, spacing_kji, radius_mm)
        maps[0 if click.positive else 1][window][ball] = 1.0
    return maps + [mask.astype(np.float32)]


def damaged_segment(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The truth spoilt as a model spoils it: emptied; parts of its border lost or grown irregularly
    (a smooth random field, thresholded, within 2-6 voxels of the border: a model's usual miss, such
    as oedema at a tumour's edge); or eroded or dilated by 1-3 voxels, with a ball cut out or added."""
    choice = rng.random()
    if choice < 0.2 or not truth.any():
        return np.zeros_like(truth)
    if choice < 0.6:
        loss = rng.random() < 0.7
        depth = int(rng.integers(2, 7))
        band = truth & ~ndimage.binary_erosion(truth, iterations=depth) if loss else \
            ndimage.binary_dilation(truth, iterations=depth) & ~truth
        field = ndimage.gaussian_filter(rng.standard_normal(truth.shape).astype(np.float32), 3)
        blobs = band & (field > np.quantile(field, rng.uniform(0.2, 0.7)))
        return truth & ~blobs if loss else truth | blobs
    steps = int(rng.integers(1, 4))
    mask = ndimage.binary_erosion(truth, iterations=steps) if rng.random() < 0.5 else \
        ndimage.binary_dilation(truth, iterations=steps)
    if rng.random() < 0.5:  # cut out or add a ball
        centre = np.argwhere(truth)[rng.integers(truth.sum())] + rng.integers(-6, 7, 3)
        grid = np.ogrid[tuple(slice(0, n) for n in truth.shape)]
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) < rng.integers(3, 9) ** 2
        mask = mask & ~ball if rng.random() < 0.5 else mask | ball
    return mask


def simulated_guidance(truth: np.ndarray, rng: np.random.Generator, spacing_kji,
                       start: np.ndarray | None = None) -> tuple[np.ndarray, list[Click], np.ndarray]:
    """A segment to correct (``start``, else the truth damaged: :func:`damaged_segment`), 1-5
    simulated points that correct it, each in the largest error left after the points before it,
    and the voxels those points corrected."""
    mask = damaged_segment(truth, rng) if start is None else start.copy()
    clicks, virtual = [], mask.copy()
    for _ in range(int(rng.integers(1, 6))):
        click = next_click(virtual, truth, spacing_kji)
        if click is None:
            break
        clicks.append(click)
        errors = virtual != truth
        component = ndimage.label(errors)[0]
        virtual[component == component[click.kji]] = truth[component == component[click.kji]]
    return mask, clicks, virtual != mask


def weakened_evidence(image: np.ndarray, truth: np.ndarray, corrected: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """The image (channels first) with the evidence for the points' corrections weakened: missed
    tumour the points add is moved 70-100 % of the way toward the intensity of the brain around the
    tumour, wrongly added parts the points remove toward the tumour's. A network remembers its
    training cases' images, so without this the image alone would tell it what the points say; on a
    new case the points matter where the image is ambiguous (a faint oedema's edge, a bright region
    that is not tumour), and this is what it learns from."""
    around = ndimage.binary_dilation(truth, iterations=4) & ~truth
    result = image.copy()
    for region, like in ((corrected & truth, around), (corrected & ~truth, truth)):
        if region.any() and like.any():
            weight = rng.uniform(0.7, 1.0) * np.clip(ndimage.gaussian_filter(region.astype(np.float32), 1.0), 0, 1)
            level = np.median(image[:, like], axis=1).reshape(-1, 1, 1, 1)
            result += weight * (level - result)
    return result


def warm_started_network(base: ModelCard) -> torch.nn.Module:
    """The guided network with the base model's weights: the weights that read the guidance channels
    are zero, so until training changes them it answers as the base model whatever the points, and
    its two classes (background, segment) are the base's background and first label."""
    network = build_network(base.data["architecture"], len(base.channels) + len(GUIDANCE), 2)
    trained = unique_state(load_network(base))
    classes = torch.tensor([0, base.labels[0].value])
    with torch.no_grad():
        for key, tensor in unique_state(network).items():
            source = trained[key]
            differing = [axis for axis, (a, b) in enumerate(zip(source.shape, tensor.shape)) if a != b]
            axis = differing[0] if len(differing) == 1 else None
            if not differing:
                tensor.copy_(source)
            elif axis is not None and tensor.shape[axis] == source.shape[axis] + len(GUIDANCE):  # reads the input
                tensor.zero_()
                tensor.narrow(axis, 0, source.shape[axis]).copy_(source)
            elif axis is not None and tensor.shape[axis] == 2:  # gives the classes
                tensor.copy_(source.index_select(axis, classes))
            else:
                raise InputError(f"Cannot start a guided model from '{base.name}': its layer {key} has shape "
                                 f"{tuple(source.shape)}, the guided network's {tuple(tensor.shape)}")
    return network


def start_segments_on_grid(folder, dataset, cases, base: ModelCard, spacing) -> list[torch.Tensor]:
    """Each case's segment to correct from ``folder`` (``CASE<file ending>``: a model's result on the
    case, from a model that never saw it), at ``spacing`` (``[1, z, y, x]``, 1 inside)."""
    segments = []
    for case in cases:
        path = Path(folder) / f"{case.case_id}{dataset.file_ending}"
        if not path.is_file():
            raise InputError(f"No segment to correct for case {case.case_id}: {path} is missing")
        _, labels = load_case(dataclasses.replace(case, label=path), base.channels, spacing)
        segments.append((labels == base.labels[0].value).float())
    return segments


def _guided_batch(sampler: PatchSampler, size: int, rng, spacing_kji, radius_mm: float, device):
    """A batch of (image + guidance, truth); a patch's label holds truth + 2 x start segment where
    the cases come with segments to correct, and half those patches correct it."""
    images, labels = sampler.batch(size, "cpu")
    inputs, truths = [], []
    for image, label in zip(images, labels):
        code = label[0].numpy().round().astype(np.uint8)
        truth, given = code % 2 == 1, code >= 2
        start = given if sampler.num_classes == 4 and rng.random() < 0.5 else None
        mask, clicks, corrected = simulated_guidance(truth, rng, spacing_kji, start)
        if rng.random() < 0.9:
            image = torch.from_numpy(weakened_evidence(image.numpy(), truth, corrected, rng))
        maps = guidance_maps(truth.shape, clicks, mask, spacing_kji, radius_mm)
        inputs.append(torch.cat([image, torch.from_numpy(np.stack(maps))]))
        truths.append(torch.from_numpy(truth)[None])
    return torch.stack(inputs).to(device), torch.stack(truths).long().to(device)


def train_guided(dataset_folder, base: ModelCard, output, minutes: float, cases=None, seed: int = 0,
                 radius_mm: float = 3.0, batch_size: int = 2, learning_rate: float = 1e-3,
                 start_segments=None, spacing=None, patch_size=None, progress=None, overwrite: bool = False) -> Path:
    """Train a guided model for ``minutes`` on a data set's cases (all, or ``cases``), started from the
    ``base`` model (its image channels, architecture and weights, and its spacing and patch size
    unless ``spacing`` and ``patch_size`` (x, y, z) give the guided model a grid of its own), for the base's
    first label (the others count as background); returns the card's path. With ``start_segments``
    (a folder of each case's segment to correct, see :func:`start_segments_on_grid`) half the patches
    correct those segments, and patches are centred on their misses and false parts as often as on
    tumour and on background. A model already in ``output`` is replaced only with ``overwrite``."""
    from .training import segmentation_loss
    from .training_outputs import check_output_free

    check_output_free(output, overwrite)
    started = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dataset = read_dataset(dataset_folder)
    chosen = [case for case in dataset.cases if not cases or case.case_id in cases]
    if not chosen:
        raise InputError(f"No training cases chosen from {dataset.folder.name}")
    spacing = tuple(spacing or base.spacing())
    patch_size = tuple(patch_size or base.patch_size)
    spacing_kji = in_array_order(spacing, base.orientation)
    patch = in_array_order(patch_size, base.orientation)
    network = warm_started_network(base).train()
    check_patch_size(network, base.data["architecture"]["name"], len(base.channels) + len(GUIDANCE), patch)
    value = base.labels[0].value
    loaded = [(image, (labels == value).float()) for image, labels in
              (load_case(case, base.channels, spacing) for case in chosen)]
    if start_segments is None:
        sampler = PatchSampler(loaded, patch, 2)
    else:
        given = start_segments_on_grid(start_segments, dataset, chosen, base, spacing)
        sampler = PatchSampler([(image, truth + 2 * segment) for (image, truth), segment in zip(loaded, given)], patch, 4)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-5)
    loss_fn = segmentation_loss(base.data["architecture"].get("args"))
    history, step = [], 0
    while step == 0 or time.time() - started < 60 * minutes:  # at least one step, however short the time
        images, targets = _guided_batch(sampler, batch_size, rng, spacing_kji, radius_mm, "cpu")
        for group in optimiser.param_groups:
            group["lr"] = learning_rate * max(1 - (time.time() - started) / (60 * minutes), 0.02) ** 0.9
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(network(images), targets)
        loss.backward()
        optimiser.step()
        step += 1
        history.append({"step": step, "loss": round(loss.item(), 5), "seconds": round(time.time() - started, 1)})
        if progress is not None and step % 10 == 0:
            progress(min((time.time() - started) / (60 * minutes), 1.0), f"step {step} loss {loss.item():.4f}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_weights(network, output / "model.safetensors")
    write_csv(output / "training_log.csv", history)
    data = json.loads(json.dumps(base.data))
    data.update(name=f"{base.name}-guided", title=f"{base.data['title']}: corrected with points",
                description="Guided model: image + include points + exclude points + current segment -> segment",
                channels=[*base.channels, *({"name": name, "normalisation": {"scheme": "none"}} for name in GUIDANCE)],
                guidance={"radius_mm": radius_mm}, spacing=list(spacing), patch_size=list(patch_size),
                labels=[{**base.data["labels"][0], "value": 1, "name": "segment"}],
                weights=[{"file": "model.safetensors", "sha256": sha256_of(output / "model.safetensors")}],
                training={"dataset": dataset.folder.name, "cases": [c.case_id for c in chosen], "steps": step,
                          "minutes": round((time.time() - started) / 60, 1), "seed": seed, "base_model": base.name,
                          "start_segments": Path(start_segments).name if start_segments else None,
                          "started_from": {"version": base.data.get("version"), "sha256": base.data["weights"][0]["sha256"]}})
    data["inference"] = {**base.data["inference"], "mirror_axes": []}
    save_card(data, output)
    return output / CARD_FILE


class GuidedRefiner:
    """``refine`` with a guided model: the network sees a box around the points (and the box given,
    if any), grown by ``reach_mm`` and to at least the model's patch (the image around them, as in
    training, not padding: zeros are not background for every normalisation), and its answer
    changes the segment near the points as :func:`edit_as_the_points_ask` allows, or inside a given
    box as :func:`edit_in_the_box` does. The image is normalised over the whole volume before the
    window is cut out, as in training: a z-score over the window alone, mostly tumour, would give
    the network another image."""

    def __init__(self, card: ModelCard, device: str = "cpu"):
        if "guidance" not in card.data:
            raise InputError(f"Model '{card.name}' is not a guided model (its card has no 'guidance')")
        self.card, self.network = card, load_network(card)
        self.patch_mm = max(size * step for size, step in zip(card.patch_size, card.spacing()))
        self.predictor = Predictor(self.network, in_array_order(card.patch_size, card.orientation),
                                   card.inference["overlap"], device, sliding_window=card.inference.get("sliding_window"))

    def __call__(self, volume: Volume, mask: np.ndarray, clicks: list[Click], box=None, reach_mm: float = REACH_MM):
        """The segment ``mask`` corrected by ``clicks`` and ``box`` ((k0, j0, i0), (k1, j1, i1), as
        :func:`~AIReconstructLib.interaction.refine` takes them)."""
        spacing = np.array(volume.spacing[::-1])
        if box is not None:
            clicks = [*clicks, *implied_centre_point(mask, clicks, box)]
        if not clicks:
            return mask.copy()
        corners = [np.array(c.kji) for c in clicks] + ([np.array(corner) for corner in box] if box else [])
        centre = (np.min(corners, axis=0) + np.max(corners, axis=0)) / 2
        half = (np.max(corners, axis=0) - np.min(corners, axis=0)) / 2 + reach_mm / spacing
        half = np.maximum(half, self.patch_mm / 2 / spacing)  # the image around, not padding, fills a window
        low = np.maximum(np.floor(centre - half).astype(int), 0)
        high = np.minimum(np.ceil(centre + half).astype(int) + 1, mask.shape)
        region = tuple(slice(a, b) for a, b in zip(low, high))
        origin = kji_to_patient(low, volume.ijk_to_lps())
        image_spec = self.card.channels[0]
        crop = Volume(normalise(volume.array, image_spec["normalisation"])[region], volume.spacing, origin, volume.direction)
        local = [Click(tuple(np.array(c.kji) - low), c.positive) for c in clicks]
        radius_mm = self.card.data["guidance"]["radius_mm"]
        maps = guidance_maps(crop.array.shape, local, mask[region], spacing, radius_mm)
        channels = [crop] + [crop.with_array(m) for m in maps]
        as_given = [{**spec, "normalisation": {"scheme": "none"}} for spec in self.card.channels]
        prepared = prepare(channels, as_given, self.card.spacing(), self.card.orientation,
                           self.card.inference.get("grid", "field_of_view"))
        proposal = restore_labels(self.predictor(prepared.tensor), prepared) == 1
        corrected = mask.copy()
        if box is None:
            corrected[region] = edit_as_the_points_ask(mask[region], proposal, local, spacing, reach_mm, radius_mm)
        else:
            local_box = tuple(tuple(np.array(corner) - low) for corner in box)
            corrected[region] = edit_in_the_box(mask[region], proposal, local, local_box, spacing, reach_mm, radius_mm)
        return corrected


def implied_centre_point(mask: np.ndarray, clicks: list[Click], box) -> list[Click]:
    """An include point at the box's centre when the box holds neither an include point nor any of
    the segment (the object it is drawn around is assumed there, as :func:`refine` assumes it): the
    network is then told where to look. Empty otherwise."""
    inside = box_slices(box, (0, 0, 0))
    holds_point = any(c.positive and all(a <= k <= b for k, a, b in zip(c.kji, *box)) for c in clicks)
    if holds_point or mask[inside].any():
        return []
    return [Click(box_centre(box), True)]


def edit_in_the_box(mask: np.ndarray, proposal: np.ndarray, clicks: list[Click], box, spacing_kji,
                    reach_mm: float, radius_mm: float) -> np.ndarray:
    """``mask`` with the box ((k0, j0, i0), (k1, j1, i1), inclusive) re-segmented by the guided
    model's ``proposal``: inside the box the proposal is the segment, with the include points'
    balls added and the exclude points' removed; outside it, within ``reach_mm`` of the box and the
    points, nothing belongs to the segment any more (the box bounds it, whatever the points outside
    it say), as in :func:`~AIReconstructLib.interaction.refine`; farther away it stays as it was."""
    include, exclude, _ = guidance_maps(mask.shape, clicks, mask, spacing_kji, radius_mm)
    inside = box_slices(box, (0, 0, 0))
    around = refine_region(mask.shape, spacing_kji, clicks, box, reach_mm)
    result = mask.copy()
    result[around] = False
    result[inside] = (proposal | (include > 0))[inside] & ~(exclude > 0)[inside]
    return result


def edit_as_the_points_ask(mask: np.ndarray, proposal: np.ndarray, clicks: list[Click], spacing_kji,
                           reach_mm: float, radius_mm: float) -> np.ndarray:
    """``mask`` changed toward the guided model's ``proposal`` only as the points ask: within
    ``reach_mm`` of include points voxels are only added — the parts of the proposal that hold an
    include point, with the point's ball — and within reach of exclude points only removed, likewise.
    The rest of the segment stays as it was, so a point never spoils what it was not placed on."""
    balls = guidance_maps(mask.shape, clicks, mask, spacing_kji, radius_mm)
    result = mask.copy()
    for positive, ball in ((True, balls[0] > 0), (False, balls[1] > 0)):
        points = [click.kji for click in clicks if click.positive == positive]
        if not points:
            continue
        seeds = np.zeros(mask.shape, bool)
        seeds[tuple(np.array(points).T)] = True
        near = ndimage.distance_transform_edt(~seeds, sampling=spacing_kji) < reach_mm
        change = ((proposal & near) | ball) & ~result if positive else ((~proposal & near) | ball) & result
        components, _ = ndimage.label(change)
        held = np.unique(components[seeds & change])
        change = np.isin(components, held[held > 0])
        result = result | change if positive else result & ~change
    return result
