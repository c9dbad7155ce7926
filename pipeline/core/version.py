"""spark-train's version: one number, in ``pyproject.toml``, read from the installed metadata.

A leaf module (it imports nothing of the project), so that any layer can name the version —
in a manifest's ``created_by``, a bundle's or checkpoint's ``spark_train``, an error about an
artifact written by a newer release — without importing the :mod:`pipeline` facade.

Not installed (a source checkout on ``PYTHONPATH``, e.g. an executor that ships the tree),
the version is read from the checkout's ``pyproject.toml``; without one it is ``0+unknown``.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

__all__ = ["DISTRIBUTION", "__version__", "version_tuple"]

DISTRIBUTION = "spark-train"
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _from_pyproject(path: Path) -> str | None:
    """``[project] version`` of a checkout's ``pyproject.toml`` (a plain string), or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = project and re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return found.group(1) if found else None


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return _from_pyproject(_PYPROJECT) or "0+unknown"


__version__: str = _version()


def version_tuple(version: str = __version__) -> tuple[int, ...]:
    """The leading numeric release of ``version``: ``"0.2.0"`` → ``(0, 2, 0)``; ``()`` if none."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()
