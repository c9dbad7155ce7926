"""The names ``train.mode`` accepts, known without importing a mode: :func:`mode_names`.

:class:`~pipeline.train.config.TrainConfig` checks ``train.mode`` against them, and
:mod:`pipeline.train.registry` resolves a name to its mode; both import this table, so the
config does not import the registry (which names the config in its types) and no import
circle forms. Imports nothing of the project; Spark- and torch-free.
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
