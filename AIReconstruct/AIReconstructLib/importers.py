"""One entry for every kind of model trained elsewhere (``aireconstruct import-model``): build its
card with the importer of its kind and write it, so the model is used like the bundled ones."""

from __future__ import annotations

from pathlib import Path

from .errors import AIReconstructError
from .modelcard import USER_MODELS, ModelCard, read_json, save_card

KINDS = ("nnunet", "totalsegmentator", "monai-bundle", "torchscript", "onnx")


def import_model(kind: str, path: str | Path, output: str | Path | None = None, *, name: str | None = None,
                 card: str | None = None, labels: str | None = None, task: str = "total-fast",
                 download: bool = False, url: str | None = None, skull_stripped: bool = False,
                 progress=None, cancel=None, **nnunet_options) -> ModelCard:
    """Write the card for the model at ``path`` into ``output`` (default ``~/.aireconstruct/models/NAME``).

    ``card``: a hand-written card file (torchscript, onnx); ``labels``: a label-info file (nnunet);
    ``task``, ``download``, ``url``: TotalSegmentator's task and where its weights come from (a task
    cropped to organs also imports the model that finds them, beside the card); ``progress`` and
    ``cancel`` follow and stop the download (see :func:`totalsegmentator.download_weights`);
    ``skull_stripped``: the model was trained on skull-stripped brains (its channels are marked so,
    and images that are not are refused);
    ``nnunet_options``: configuration, folds, checkpoint, modality, orientation, licence, intended_use,
    previous_stage.
    """
    if kind in ("torchscript", "onnx"):
        from .networks import import_exported

        if not card:
            raise AIReconstructError(f"import-model {kind} needs --card: a hand-written card (labels, channels, "
                                     "spacing, patch size, licence ...) for the network")
        data = import_exported(path, read_json(card, "Hand-written card"),
                               {"torchscript": "TorchScript", "onnx": "ONNX"}[kind])
    elif kind == "monai-bundle":
        from .monai_bundle import default_name, import_bundle

        output = output or USER_MODELS / (name or default_name(path))  # the weights are written there too
        data = import_bundle(path, output, name)
    elif kind == "totalsegmentator":
        from .totalsegmentator import card_name, download_weights, import_totalsegmentator, task_names

        needed = task_names(task)  # a task cropped to organs needs the model that finds them first
        if download:
            for number, each in enumerate(needed):
                download_weights(each, path, url, cancel=cancel, progress=None if progress is None else
                                 lambda f, message, n=number: progress((n + f) / len(needed), message))
        data = import_totalsegmentator(task, path)  # refuses first a folder that lacks any weights needed
        for crop_task in needed[:-1]:
            folder = (Path(output).parent if output else USER_MODELS) / card_name(crop_task)
            save_card(import_totalsegmentator(crop_task, path), folder)
    else:
        from .nnunet_import import import_nnunet

        label_info = read_json(labels, "Label file") if labels else {}
        data = import_nnunet(path, name=name, label_info=label_info, **nnunet_options)
    if skull_stripped:
        for channel in data["channels"]:
            channel["skull_stripped"] = True
    return save_card(data, output or USER_MODELS / data["name"])
