"""Atomic training checkpoints, found by listing and loaded without unpickling code.

Layout under the checkpoint root (a local path or any ``pyarrow.fs`` URI)::

    step-000000001234/state.pt    torch.save of the state mapping
    step-000000001234/meta.json   step, torch version, top-level keys, size and sha256 of state.pt

A checkpoint is written into ``.tmp-<uuid>-step-…`` and renamed into place
(:func:`pipeline.core.storage.atomic_dir`), so a crash mid-write leaves only a temporary directory,
which listings skip. Object stores (S3, GCS) cannot rename a directory: there the files are
written in place and ``meta.json`` — written last, in one PUT — is the commit marker. In both
cases a checkpoint counts only when ``meta.json`` parses and ``state.pt`` has the recorded
size. There is no ``latest`` pointer file to be half-written: :meth:`CheckpointManager.latest_step`
lists the ``step-*`` directories and takes the newest complete one whose ``state.pt`` matches
its sha256, passing over a corrupt newer one with a warning (a crash or a bad disk leaves the
previous checkpoint usable). :meth:`CheckpointManager.load` checks the sha256 too.

Loading uses ``torch.load(..., weights_only=True)`` only. :meth:`CheckpointManager.save`
refuses, before writing, any value such a load could not restore (numpy arrays, arbitrary
objects), naming its key; a file that would need real unpickling is refused at load with
:class:`CheckpointError` naming the file. Only one process (rank 0) should save to a root.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import IO, Any, Final, cast

import numpy as np
import pyarrow.fs as pafs
import torch

from pipeline.core import storage
from pipeline.core.compat import NewerFormatError, check_format_version, written_by
from pipeline.core.version import __version__
from pipeline.runtime import faults

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointTooNew",
    "capture_rng_state",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
STATE_FILE: Final = "state.pt"
META_FILE: Final = "meta.json"
_DIR_RE: Final = re.compile(r"step-(\d{12})")
_SCALARS: Final = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the directory or file."""


class CheckpointTooNew(CheckpointError, NewerFormatError):
    """A checkpoint's ``meta.json`` was written by a newer spark-train; never skipped silently."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's files do not match its ``meta.json`` (or are unreadable)."""


def _dir_name(step: int) -> str:
    return f"step-{step:012d}"


class CheckpointManager:
    """Save, list, prune and load the checkpoints under ``uri``, keeping the newest ``keep``."""

    def __init__(self, uri: str, keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self.uri = uri
        self.keep = keep
        self.fs, self.root = storage.resolve(uri)

    def path(self, step: int) -> str:
        """The URI of the checkpoint directory of ``step``."""
        return storage.join(self.uri, _dir_name(step))

    # -- save -------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any]) -> str:
        """Write ``state`` as the checkpoint of ``step`` (replacing one there); returns its URI."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        _check_weights_only(dict(state), "state")
        final = storage.join(self.root, _dir_name(step))
        with storage.atomic_dir(self.fs, final) as target:
            with self.fs.open_output_stream(storage.join(target, STATE_FILE)) as raw:
                sink = storage.HashingWriter(raw)
                torch.save(dict(state), cast(IO[bytes], sink))  # it has what save uses
            faults.checkpoint_write_point(step)  # test-only: a crash between the files
            meta = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "created_unix": time.time(),
                "torch": torch.__version__,
                "spark_train": __version__,
                "keys": sorted(str(k) for k in state),
                "files": {STATE_FILE: {"bytes": sink.size, "sha256": sink.sha256}},
            }
            # Last: on object stores its presence is the commit.
            with self.fs.open_output_stream(storage.join(target, META_FILE)) as f:
                f.write(json.dumps(meta, indent=2).encode())
        log.info("saved checkpoint %s (%d bytes)", self.path(step), sink.size)
        self._prune()
        return self.path(step)

    def _prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; delete older ones and leftovers."""
        steps = self._complete_steps(warn=False)
        if not steps:
            return
        keep = set(steps[-self.keep :])
        for entry in storage.list_dir(self.fs, self.root):
            name = entry.base_name
            match = _DIR_RE.fullmatch(name)
            stale_tmp = name.startswith(storage.TMP_PREFIX) and "step-" in name
            old = (
                match is not None
                and int(match.group(1)) not in keep
                and int(match.group(1)) < max(keep)
            )
            if entry.type == pafs.FileType.Directory and (stale_tmp or old):
                try:
                    self.fs.delete_dir(entry.path)
                except OSError as e:
                    log.warning("could not delete old checkpoint %s: %s", entry.path, e)

    # -- list -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint whose sha256 checks out, found by listing; or None.

        A corrupt newer checkpoint is passed over with a warning, so that a caller who
        broadcasts this step to every rank and loads it explicitly gets the fallback too.
        """
        for step in reversed(self._complete_steps(warn=True)):
            try:
                self._verified_state_file(step)
            except CheckpointCorrupt as e:
                log.warning(
                    "checkpoint %s is corrupt (%s); falling back to the previous one",
                    self.path(step),
                    e,
                )
                continue
            return step
        return None

    def steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return self._complete_steps(warn=True)

    def delete_all(self) -> None:
        """Delete every complete checkpoint (those of a finished earlier run)."""
        for step in self.steps():
            self.fs.delete_dir(storage.join(self.root, _dir_name(step)))

    def _complete_steps(self, *, warn: bool) -> list[int]:
        out = []
        for entry in storage.list_dir(self.fs, self.root):
            name = entry.base_name
            if name.startswith(storage.TMP_PREFIX):
                if warn:
                    log.warning("ignoring %s: an unfinished checkpoint write", entry.path)
                continue
            match = _DIR_RE.fullmatch(name)
            if match is None or entry.type != pafs.FileType.Directory:
                continue
            try:
                self._meta(entry.path)
            except CheckpointCorrupt as e:
                if warn:
                    log.warning("ignoring incomplete checkpoint: %s", e)
                continue
            out.append(int(match.group(1)))
        return sorted(out)

    def _meta(self, directory: str) -> dict[str, Any]:
        """``meta.json`` of a checkpoint, once the files it lists are found with their sizes."""
        meta_path = storage.join(directory, META_FILE)
        try:
            meta = json.loads(storage.read_bytes(self.fs, meta_path))
            sizes = {name: int(entry["bytes"]) for name, entry in meta["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorrupt(f"{meta_path} is missing or unreadable: {e}") from e
        # A newer format is not a corrupt checkpoint to pass over: it stops the run.
        check_format_version(
            meta.get("format_version"),
            FORMAT_VERSION,
            where=meta_path,
            writer=written_by(meta.get("spark_train")),
            newer=CheckpointTooNew,
            invalid=CheckpointCorrupt,
        )
        for name, expected in sizes.items():
            path = storage.join(directory, name)
            size = self.fs.get_file_info(path).size
            if size != expected:
                raise CheckpointCorrupt(f"{path} has {size} bytes, {META_FILE} says {expected}")
        return dict(meta)

    # -- load -------------------------------------------------------------------------------
    def load(
        self, step: int | None = None, *, map_location: str | torch.device = "cpu"
    ) -> dict[str, Any] | None:
        """The state saved at ``step``; with None, at :meth:`latest_step` (None if there is none).

        An explicitly requested ``step`` that is missing or corrupt raises
        :class:`CheckpointError`, and so does a file that is not weights-only loadable.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        elif step not in self._complete_steps(warn=True):
            raise CheckpointError(
                f"no complete checkpoint for step {step} under {self.uri} "
                f"(complete: {self._complete_steps(warn=False) or 'none'})"
            )
        path, shown = self._verified_state_file(step)
        try:
            with self.fs.open_input_file(path) as f:
                state = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{shown} needs objects that a weights-only load does not restore; refusing to "
                f"unpickle it (it may run code). {str(e).splitlines()[0]}"
            ) from e
        except (RuntimeError, OSError, EOFError) as e:
            raise CheckpointCorrupt(f"{shown} cannot be read: {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{shown} holds a {type(state).__name__}, not a state mapping")
        return state

    def _verified_state_file(self, step: int) -> tuple[str, str]:
        """``(path, URI)`` of ``state.pt`` of ``step`` once its sha256 matches ``meta.json``."""
        directory = storage.join(self.root, _dir_name(step))
        expected = self._meta(directory)["files"][STATE_FILE]["sha256"]
        path = storage.join(directory, STATE_FILE)
        shown = storage.join(self.path(step), STATE_FILE)
        digest, _ = storage.sha256_file(self.fs, path)
        if digest != expected:
            raise CheckpointCorrupt(f"{shown}: sha256 {digest[:16]}… does not match {META_FILE}")
        return path, shown


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise ValueError naming ``where`` unless a weights-only load can restore ``obj``."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _SCALARS):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            _check_weights_only(key, f"{where} key {key!r}")
            _check_weights_only(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_weights_only(value, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) cannot restore: convert it to tensors, numbers, "
        "strings, lists or dicts"
    )


# -- RNG state ---------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), global numpy and ``random`` states of this process.

    Only tensors, ints, floats, strings and None, so that a weights-only load restores it.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only with as many devices)."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds RNG states of %d CUDA devices, this process sees %d: "
                "CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate(
        (int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
    )
