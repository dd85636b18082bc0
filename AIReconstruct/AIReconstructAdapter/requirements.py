"""Which of the engine's Python requirements are missing (standard library only, so the module
can ask before anything that needs them is imported)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"


def missing_requirements(requirements_file: Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of ``requirements_file`` whose package is not installed."""
    missing = []
    for line in requirements_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(line)
    return missing
