"""The public surface of spark-train, as data: what ``surface.json`` records and the test checks.

    python -m tests.compat.surface --write     # record today's surface (after adding names)

Recorded: ``pipeline.__all__`` and the public names of the documented ``preprocessing``
modules; old module paths with the names documented under them (they must keep resolving
through :data:`pipeline.core.compat.MOVED_MODULES`); the builder paths (old spellings
included); every config key of the config dataclasses; the CLI's subcommands and flags;
the exit codes; and each artifact kind's ``format_version``. ``tests/compat/test_surface.py``
fails when a recorded entry no longer resolves — a name, key, builder or flag removed or
renamed without an alias.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

SURFACE = Path(__file__).resolve().parent / "surface.json"

PREPROCESSING_MODULES = ("preprocessing.config", "preprocessing.etl", "preprocessing.make_data")
BUILTIN_BUILDERS = ("mlp", "cnn", "cnn_v1", "fusion", "text")
# Old module paths -> names their release documented under them (README, docstrings).
MOVED_NAMES: dict[str, list[str]] = {
    "pipeline.models": ["mlp", "cnn", "build_model", "resolve_builder", "BuilderError"],
    "pipeline.bundle": ["load_bundle", "write_bundle", "BundleError"],
    "pipeline.launcher": ["run_distributed", "DistributedError"],
    "pipeline.checkpoint": ["CheckpointManager", "CheckpointError"],
    "pipeline.shardset": ["ShardSet", "ShardSetError", "MANIFEST_NAME"],
    "pipeline.reader": ["ShardReader"],
    "pipeline.configbase": ["ConfigError"],
    "pipeline.train_config": ["TrainConfig"],
    "preprocessing.validate": ["RawInput"],
}
# Builders as earlier releases spelled them (0.1.0 before the restructuring).
OLD_BUILDERS = ("pipeline.models:mlp", "pipeline.models:cnn")


def cli_surface() -> dict[str, list[str]]:
    """``{subcommand: sorted flags}`` of ``spark-train``'s parser."""
    from jobs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, list[str]] = {}
    for name, p in sub.choices.items():
        flags = {s for a in p._actions for s in a.option_strings if s.startswith("--")}
        positional = {a.dest for a in p._actions if not a.option_strings and a.dest != "help"}
        out[name] = sorted(flags | {f"<{d}>" for d in positional})
    return dict(sorted(out.items()))


def format_versions() -> dict[str, int]:
    """The ``format_version`` each artifact kind is written with today."""
    from jobs.runsummary import SUMMARY_FORMAT_VERSION
    from pipeline.data.shardset import FORMAT_VERSION
    from pipeline.train import checkpoint
    from pipeline.train.bundle import BUNDLE_FORMAT_VERSION

    return {
        "shardset": FORMAT_VERSION,
        "bundle": BUNDLE_FORMAT_VERSION,
        "checkpoint": checkpoint.FORMAT_VERSION,
        "run_summary": SUMMARY_FORMAT_VERSION,
    }


def current_surface() -> dict[str, Any]:
    """Today's surface, in the shape of ``surface.json``."""
    import pipeline
    from jobs import clierrors, configref

    names = {"pipeline": sorted(pipeline.__all__)}
    for mod in PREPROCESSING_MODULES:
        names[mod] = sorted(importlib.import_module(mod).__all__)
    return {
        "python": names,
        "moved_modules": MOVED_NAMES,
        "builders": [f"pipeline.train.models:{b}" for b in BUILTIN_BUILDERS] + list(OLD_BUILDERS),
        "config_keys": sorted(configref.keys()),
        "cli": cli_surface(),
        "exit_codes": {
            "ok": clierrors.EXIT_OK,
            "runtime": clierrors.EXIT_RUNTIME,
            "usage": clierrors.EXIT_USAGE,
        },
        "format_versions": format_versions(),
    }


def load() -> dict[str, Any]:
    """The checked-in ``surface.json``."""
    return json.loads(SURFACE.read_text())


def _resolves(builder: str) -> bool:
    from pipeline.train.models import BuilderError, resolve_builder

    try:
        resolve_builder(builder)
    except BuilderError:
        return False
    return True


def missing_entries(recorded: dict[str, Any]) -> list[str]:
    """Every recorded entry that no longer resolves today (through an alias or not)."""
    import pipeline

    now = current_surface()
    out: list[str] = []
    for mod, names in recorded["python"].items():
        module = pipeline if mod == "pipeline" else importlib.import_module(mod)
        out += [f"python name {mod}.{n}" for n in names if not hasattr(module, n)]
    for mod, names in recorded["moved_modules"].items():
        try:
            module = importlib.import_module(mod)
        except ImportError:
            out.append(f"module {mod}")
            continue
        out += [f"python name {mod}.{n}" for n in names if not hasattr(module, n)]
    out += [f"builder {spec}" for spec in recorded["builders"] if not _resolves(spec)]
    out += [f"config key {k}" for k in recorded["config_keys"] if k not in now["config_keys"]]
    for cmd, flags in recorded["cli"].items():
        if cmd not in now["cli"]:
            out.append(f"CLI subcommand {cmd}")
            continue
        out += [f"CLI flag {cmd} {f}" for f in flags if f not in now["cli"][cmd]]
    for name, code in recorded["exit_codes"].items():
        if now["exit_codes"].get(name) != code:
            out.append(f"exit code {name}={code} (now {now['exit_codes'].get(name)})")
    for kind, version in recorded["format_versions"].items():
        if now["format_versions"].get(kind, 0) < version:
            out.append(f"format_version of {kind} went down from {version}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="record the public surface in surface.json")
    ap.add_argument("--write", action="store_true")
    ns = ap.parse_args(argv)
    text = json.dumps(current_surface(), indent=2) + "\n"
    if ns.write:
        SURFACE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
