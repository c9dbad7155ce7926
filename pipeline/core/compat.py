"""Compatibility helpers: artifact format versions and deprecated spellings.

Every artifact spark-train writes carries a ``format_version`` (shard-set manifest, bundle
``model.json``, checkpoint ``meta.json``, run summary) and the version of spark-train that
wrote it. A reader accepts every version up to its own and refuses a newer one with
:class:`NewerFormatError`, one line that says who wrote it and what to do::

    out/model/model.json: written by spark-train 0.4.0 (format_version 2); this is
    spark-train 0.2.0 which reads up to 1: upgrade

The CLI exits 2 on it (like a config error: retrying cannot help, upgrading does).

An old spelling (a config key, a builder path, a module or public name that moved) keeps
working through an alias that logs one deprecation line per process naming the new spelling
(:func:`deprecated`); the README's "Compatibility" section says how long.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import re
import sys
import threading
import types
from typing import Any

from pipeline.core.version import __version__

__all__ = [
    "DEPRECATION_LOGGER",
    "NewerFormatError",
    "canonical_builder",
    "check_format_version",
    "deprecated",
    "install_module_aliases",
    "moved_module",
    "written_by",
]

DEPRECATION_LOGGER = "spark_train.deprecation"
log = logging.getLogger(DEPRECATION_LOGGER)

_said: set[tuple[str, str]] = set()
_lock = threading.Lock()


def deprecated(old: str, new: str, *, what: str = "name") -> None:
    """Log, once per process, that ``old`` is deprecated in favour of ``new``.

    ``what`` says which kind of spelling it is (``"config key"``, ``"builder"``, ``"module"``…).
    """
    with _lock:
        if (old, new) in _said:
            return
        _said.add((old, new))
    log.warning(
        "DEPRECATED %s %r: use %r (the old spelling keeps working for at least two more minor "
        "releases; see the README's Compatibility section)",
        what,
        old,
        new,
    )


class NewerFormatError(Exception):
    """An artifact was written in a newer format than this spark-train reads; upgrade.

    Readers raise a subclass that is also their own error type (``BundleError``,
    ``ShardSetError``, ``CheckpointError``), so existing handlers keep catching it.
    """


def written_by(value: Any) -> str | None:
    """The spark-train version in a ``created_by`` / ``spark_train`` field, or None."""
    if not isinstance(value, str):
        return None
    match = re.search(r"spark-train\s+(\S+)", value)
    return match.group(1) if match else value.strip() or None


def check_format_version(
    found: Any,
    supported: int,
    *,
    where: str,
    writer: str | None,
    newer: type[Exception],
    invalid: type[Exception],
) -> int:
    """``found`` as an int when this build reads it, else raise one line.

    Every version from 1 to ``supported`` is read; a newer one raises ``newer`` (a subclass
    of :class:`NewerFormatError`) saying who wrote it and to upgrade; a missing or malformed
    one raises ``invalid``, naming the value.
    """
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise invalid(
            f"{where}: format_version {found!r} is not a format spark-train wrote "
            f"(this is spark-train {__version__}, which reads 1 to {supported})"
        )
    if found > supported:
        raise newer(
            f"{where}: written by {f'spark-train {writer}' if writer else 'a newer spark-train'} "
            f"(format_version {found}); this is spark-train {__version__} which reads up to "
            f"{supported}: upgrade"
        )
    return found


# -- modules that moved ------------------------------------------------------------------------
# Module paths of 0.1.0 before the restructuring into layers (git 668cac7) -> where that code
# lives now. ``import pipeline.models`` (and a builder ``pipeline.models:mlp``) still works and
# logs one deprecation line. Not aliased, because the old name now means something else:
# ``pipeline.train`` (the package), ``pipeline.evaluate`` and ``pipeline.score`` (the functions
# of the public API) and ``preprocessing.features`` (a package).
MOVED_MODULES: dict[str, str] = {
    "pipeline.averaging": "pipeline.train.modes.average",
    "pipeline.bundle": "pipeline.train.bundle",
    "pipeline.checkpoint": "pipeline.train.checkpoint",
    "pipeline.comm_hooks": "pipeline.train.comm_hooks",
    "pipeline.configbase": "pipeline.core.configbase",
    "pipeline.ddp": "pipeline.train.loop",
    "pipeline.distenv": "pipeline.runtime.distenv",
    "pipeline.faults": "pipeline.runtime.faults",
    "pipeline.fsdp": "pipeline.train.modes.fsdp",
    "pipeline.inspect": "pipeline.serve.inspect",
    "pipeline.launcher": "pipeline.launch.launcher",
    "pipeline.logchannel": "pipeline.runtime.logchannel",
    "pipeline.metrics": "pipeline.train.metrics",
    "pipeline.models": "pipeline.train.models",
    "pipeline.optim": "pipeline.train.optim",
    "pipeline.outputs": "pipeline.core.outputs",
    "pipeline.preflight": "pipeline.train.preflight",
    "pipeline.progress": "pipeline.runtime.progress",
    "pipeline.rankrun": "pipeline.runtime.rankrun",
    "pipeline.reader": "pipeline.data.reader",
    "pipeline.redact": "pipeline.core.redact",
    "pipeline.shardset": "pipeline.data.shardset",
    "pipeline.storage": "pipeline.core.storage",
    "pipeline.tfrecord": "pipeline.data.formats.tfrecord",
    "pipeline.timeouts": "pipeline.runtime.timeouts",
    "pipeline.tracking": "pipeline.launch.tracking",
    "pipeline.train_config": "pipeline.train.config",
    "preprocessing.schema_policy": "preprocessing.read.schema_policy",
    "preprocessing.validate": "preprocessing.read.validation",
}


def moved_module(name: str) -> str | None:
    """The current module of an old module path, or None when ``name`` did not move."""
    return MOVED_MODULES.get(name)


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module path as the module it moved to (the same module object)."""

    def __init__(self, new: str) -> None:
        self.new = new
        self.real_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        deprecated(spec.name, self.new, what="module")
        module = importlib.import_module(self.new)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run; give the module back its own spec (the import system set ours)."""
        module.__spec__ = self.real_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED_MODULES`; nothing else."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install_module_aliases() -> None:
    """Make the old module paths importable (idempotent; :mod:`pipeline` calls it)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


def canonical_builder(spec: str) -> str:
    """``spec`` with a moved module replaced (``pipeline.models:mlp`` → ``pipeline.train.models:mlp``).

    Logs one deprecation line (per process and spelling) when it replaces one.
    """
    module, sep, attr = spec.partition(":")
    new = MOVED_MODULES.get(module)
    if not sep or new is None:
        return spec
    renamed = f"{new}:{attr}"
    deprecated(spec, renamed, what="builder (train.model.builder)")
    return renamed
