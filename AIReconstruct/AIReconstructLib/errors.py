"""The engine's error types: each carries one sentence a user can act on."""


class AIReconstructError(Exception):
    """Base class: the CLI prints its message as one line and exits non-zero."""

    exit_code = 2


class InputError(AIReconstructError):
    """An input image or label map cannot be used (corrupt, wrong shape, NaNs, ...)."""


class ModelCardError(AIReconstructError):
    """A model card is missing, malformed or names something that does not exist."""


class WeightsError(AIReconstructError):
    """A weights file is missing, truncated, tampered with or does not fit its network."""


class OutputError(AIReconstructError):
    """An output cannot be written (unwritable folder, disk full, ...)."""


class Cancelled(AIReconstructError):
    """The user cancelled a long operation; nothing was written."""

    exit_code = 130
