"""One entry for every kind of model trained elsewhere (``aireconstruct import-model``): build its
card with the importer of its kind and write it, so the model is used like the bundled ones."""

from __future__ import annotations

from pathlib import Path

from .errors import AIReconstructError
from .modelcard import USER_MODELS, ModelCard, read_json, save_card

KINDS = ("nnunet", "totalsegmentator", "monai-bundle", "torchscript", "onnx")
# bundles of MONAI's model zoo offered for download (import-model monai-bundle NAME --download): name ->
# what it segments
MODEL_ZOO = {"wholeBody_ct_segmentation": "104 CT structures, among them the heart chambers, lung lobes, hip bones "
                                          "and sacrum (SegResNet trained on TotalSegmentator's first data)"}


def downloadable_models() -> dict[str, str]:
    """The models ``import-model --download`` fetches by name: ``kind:name`` -> what it segments."""
    from .totalsegmentator import TASKS

    models = {f"totalsegmentator:{task}": f"TotalSegmentator {task}: {spec['structures']}" for task, spec in TASKS.items()}
    return {**models, **{f"monai-bundle:{name}": f"MONAI {name}: {what}" for name, what in MODEL_ZOO.items()}}


def download_command(key: str, downloads: Path, output: Path, url: str | None = None) -> list[str]:
    """The ``aireconstruct`` arguments that download the model ``key`` (of :func:`downloadable_models`)
    into ``downloads`` (TotalSegmentator's weights in ``totalsegmentator/``, bundles in
    ``monai-bundles/NAME``) and write its card to ``output``; ``url``: a mirror."""
    if key not in downloadable_models():
        raise AIReconstructError(f"No downloadable model '{key}' (known: {', '.join(downloadable_models())})")
    kind, name = key.split(":", 1)
    source = ([str(Path(downloads) / "totalsegmentator"), "--task", name] if kind == "totalsegmentator"
              else [str(Path(downloads) / "monai-bundles" / name)])
    return ["import-model", kind, *source, "--download", "-o", str(output), *(["--url", url] if url else [])]


def import_model(kind: str, path: str | Path, output: str | Path | None = None, *, name: str | None = None,
                 card: str | None = None, labels: str | None = None, task: str = "total-fast",
                 download: bool = False, url: str | None = None, skull_stripped: bool = False,
                 progress=None, cancel=None, **nnunet_options) -> ModelCard:
    """Write the card for the model at ``path`` into ``output`` (default ``~/.aireconstruct/models/NAME``).

    ``card``: a hand-written card file (torchscript, onnx); ``labels``: a label-info file (nnunet);
    ``task``, ``download``, ``url``: TotalSegmentator's task and where its weights come from (a task
    cropped to organs also imports the model that finds them, beside the card); for a MONAI bundle,
    ``download`` fetches the model-zoo bundle named as ``path``'s folder (``url``: a zip of it);
    ``progress`` and ``cancel`` follow and stop the download (see
    :func:`totalsegmentator.download_weights`, :func:`monai_bundle.download_bundle`);
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
        from .monai_bundle import default_name, download_bundle, import_bundle

        if download:
            download_bundle(path, url, progress, cancel)
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
