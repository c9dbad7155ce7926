"""The names ``train.mode`` accepts, known without importing a mode: :func:`mode_names`.

:mod:`pipeline.train.registry` resolves a name to its mode with this table (and its
``get_mode`` refuses an unknown name, on the driver, before any rank starts; the config
itself does not check ``train.mode``, so a rank rebuilding it needs no registration). Imports
nothing of the project; Spark- and torch-free.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["BUILTIN", "REGISTERED", "mode_names"]

BUILTIN: Final[dict[str, str]] = {
    "ddp": "pipeline.train.modes.ddp:MODE",
    "fsdp": "pipeline.train.modes.fsdp:MODE",
    "average": "pipeline.train.modes.average:MODE",
}
"""Built-in mode name → ``module:attribute`` of its instance, imported on first use."""

REGISTERED: Final[dict[str, Any]] = {}
"""Mode name → mode, for every mode registered or imported so far in this process."""


def mode_names() -> list[str]:
    """Every name ``train.mode`` accepts, built-in first."""
    return [*BUILTIN, *(n for n in REGISTERED if n not in BUILTIN)]
