"""Model cards: the one place that says what a model needs and gives.

A card is a JSON file (``card.json``) in a model folder beside its weights. It is validated
against ``schemas/model_card.schema.json``; labels, normalisation, spacing, architecture and
post-processing are read from it and never hard-coded elsewhere.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema

from .errors import ModelCardError, WeightsError

CARD_FILE = "card.json"
SUMMARY_LABELS = 12  # label names a card's one-line summary lists (TotalSegmentator's models have 117)
BUNDLED_MODELS = Path(__file__).parent / "models"
USER_MODELS = Path.home() / ".aireconstruct" / "models"
MODEL_PATH_ENV = "AIRECONSTRUCT_MODEL_PATH"


@dataclass(frozen=True)
class Label:
    """One output label: its value in the label map, name, RGB colour (0-1) and codes."""

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: dict
    postprocess: dict


@dataclass(frozen=True)
class ModelCard:
    """A validated model card and the folder it came from."""

    data: dict
    folder: Path

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def labels(self) -> list[Label]:
        return [
            Label(
                entry["value"], entry["name"], tuple(entry["color"]),
                entry.get("terminology", {}), entry.get("postprocess", {}),
            )
            for entry in self.data["labels"]
        ]

    @property
    def num_classes(self) -> int:
        """Network output channels: background plus the highest label value."""
        return max(label.value for label in self.labels) + 1

    @property
    def channels(self) -> list[dict]:
        return self.data["channels"]

    @property
    def weight_paths(self) -> list[Path]:
        """The weight files (one per fold or ensemble member); relative paths are in the card's folder."""
        return [self.folder / entry["file"] for entry in self.data["weights"]]

    def spacing(self, fast: bool = False) -> tuple[float, float, float]:
        """Target spacing (i, j, k) in mm; the coarser one in fast mode."""
        if fast:
            if "fast_spacing" not in self.data:
                raise ModelCardError(f"Model '{self.name}' has no fast mode (its card gives no fast_spacing)")
            return tuple(self.data["fast_spacing"])
        return tuple(self.data["spacing"])

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.data["patch_size"])

    @property
    def orientation(self) -> str:
        """Where the network's array axes point (``"SPL"``: the engine's own; ``"RAS"``: MONAI's)."""
        return self.data.get("orientation", "SPL")

    @property
    def inference(self) -> dict:
        return {"overlap": 0.5, "mirror_axes": [], **self.data.get("inference", {})}

    def summary(self) -> str:
        """One line for listings: name, modality (skull-stripped where the model needs it), labels
        (the first twelve, and how many more; what they are found inside, for a model cropped to
        another's segments), licence, intended use."""
        shown = [label.name for label in self.labels[:SUMMARY_LABELS]]
        names = ", ".join(shown) + (f" and {len(self.labels) - len(shown)} more" if len(self.labels) > len(shown) else "")
        stripped = ", skull-stripped" if any(channel.get("skull_stripped") for channel in self.channels) else ""
        crop = self.inference.get("crop_to_segments")
        inside = f" inside the {', '.join(crop['segments'])} found by {crop['model']}" if crop else ""
        return (f"{self.name} ({self.data['modality']}{stripped}; {names}{inside}; licence {self.data['licence']}) — "
                f"{self.data['intended_use']}")


@lru_cache(maxsize=1)
def _schema() -> dict:
    text = resources.files(__package__).joinpath("schemas/model_card.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _field_name(path) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else (f".{part}" if parts else str(part)))
    return "".join(parts) or "(top level)"


def validate_card(data: dict, source: str = "model card") -> None:
    """Raise :class:`ModelCardError` naming the first bad field, if ``data`` is not a valid card."""
    validator = jsonschema.Draft202012Validator(_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        if error.validator == "required":
            missing = error.message.split("'")[1] if "'" in error.message else error.message
            field = _field_name([*error.absolute_path, missing])
            raise ModelCardError(f"{source}: required field '{field}' is missing")
        raise ModelCardError(f"{source}: field '{_field_name(error.absolute_path)}' is invalid: {error.message}")
    values = [entry["value"] for entry in data["labels"]]
    if len(set(values)) != len(values):
        raise ModelCardError(f"{source}: field 'labels' repeats a label value")
    names = [entry["name"] for entry in data["labels"]]
    if len(set(names)) != len(names):
        raise ModelCardError(f"{source}: field 'labels' repeats a label name")


def load_card(path: str | os.PathLike) -> ModelCard:
    """Load and validate a model card from its JSON file or its model folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.is_file():
        raise ModelCardError(f"No model card at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelCardError(f"Model card {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"Model card {path} is not a JSON object")
    validate_card(data, f"Model card {path.name}")
    return ModelCard(data, path.parent)


def read_json(path: str | os.PathLike, what: str, error_type: type[Exception] = ModelCardError):
    """A JSON file (one that describes a model, unless ``error_type`` says otherwise); ``error_type``
    naming ``what`` if it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error_type(f"{what}: {path.name} is missing from {path.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise error_type(f"{what}: {path} cannot be read as JSON ({error})") from None


def model_name(text: str) -> str:
    """A valid model name made from free text (a data set or folder name)."""
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-")


def label_colour(index: int) -> list[float]:
    """A distinct, stable colour for the ``index``-th label of a model that gives none (golden-ratio hues)."""
    hue = (0.08 + index * 0.618034) % 1.0
    return [round(c, 3) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.9)]


def save_card(data: dict, folder: str | os.PathLike) -> ModelCard:
    """Validate a card and write it atomically as ``folder/card.json``; weight files inside ``folder``
    are recorded relative to it, so the folder can be moved."""
    from .io import atomic_path

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = {**data, "weights": [
        {**entry, "file": str(Path(entry["file"]).relative_to(folder))} if Path(entry["file"]).is_relative_to(folder)
        else entry for entry in data["weights"]]}
    validate_card(data, f"Model card for {folder}")
    with atomic_path(folder / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return ModelCard(data, folder)


def model_folders() -> list[Path]:
    """Folders searched for installed models, in order: $AIRECONSTRUCT_MODEL_PATH, user, bundled."""
    extra = [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, USER_MODELS, BUNDLED_MODELS]


def installed_models() -> list[ModelCard]:
    """Every valid model card found in :func:`model_folders`: per name the highest version (a
    fine-tuned version supersedes its base), and of equal versions the one in the earlier folder."""
    cards: dict[str, ModelCard] = {}
    for root in model_folders():
        if not root.is_dir():
            continue
        for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
            if card_path.parent.name.startswith("."):  # work in progress (a fine-tuning run), not installed
                continue
            try:
                card = load_card(card_path)
            except ModelCardError:
                continue
            if card.name not in cards or version_key(card) > version_key(cards[card.name]):
                cards[card.name] = card
    return list(cards.values())


def version_key(card: ModelCard) -> tuple[int, ...]:
    """A card's version ("1.2.0") as numbers that sort in release order."""
    return tuple(int(part) if part.isdigit() else 0 for part in str(card.data.get("version", "0")).split("."))


def find_model(name_or_path: str | os.PathLike) -> ModelCard:
    """Resolve an installed model's name, or the path of a card or model folder, to its card."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return load_card(path)
    for card in installed_models():
        if card.name == str(name_or_path):
            return card
    known = ", ".join(card.name for card in installed_models()) or "none"
    raise ModelCardError(f"No installed model named '{name_or_path}' (installed: {known})")


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_weight_paths(card: ModelCard) -> list[Path]:
    """The weight files, after checking that each exists and matches the card's SHA-256."""
    for path, entry in zip(card.weight_paths, card.data["weights"]):
        if not path.is_file():
            raise WeightsError(f"Weights file {path.name} of model '{card.name}' is missing from {path.parent}")
        if sha256_of(path) != entry["sha256"]:
            raise WeightsError(
                f"Weights file {path.name} of model '{card.name}' does not match the SHA-256 in its card "
                "(corrupt or tampered); refusing to load it"
            )
    return card.weight_paths


def crop_model_of(card: ModelCard) -> ModelCard:
    """The model that finds the segments ``card`` is cropped to (``inference.crop_to_segments``): the
    one of that name in a folder beside the card's (as ``import-model -o`` leaves it), else the
    installed one."""
    name = card.inference["crop_to_segments"]["model"]
    beside = card.folder.parent / name / CARD_FILE
    crop_card = load_card(beside) if beside.is_file() else None
    if crop_card is None or crop_card.name != name:
        try:
            crop_card = find_model(name)
        except ModelCardError as error:
            raise ModelCardError(f"Model '{card.name}' segments inside what model '{name}' finds first, "
                                 f"and that model is not installed ({error})") from None
    if "crop_to_segments" in crop_card.inference:
        raise ModelCardError(f"Model '{card.name}' is cropped by model '{name}', which is cropped by another model "
                             "itself: one crop model at most")
    return crop_card
