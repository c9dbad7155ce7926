"""The model bundle: everything needed to score new data with a trained model.

A bundle is a directory (local path or any ``pyarrow.fs`` URI)::

    model.safetensors   weights (safetensors: loading runs no pickle)
    model.json          the spec: builder, args, input_shape, inputs (each input column's
                        name, dtype, stored shape, kind, normalize and model_shape:
                        :meth:`pipeline.train.inputs.ModelInputs.to_json`), num_outputs,
                        task, classes, feature_names, the shard set it was trained on
                        (uri + fingerprint), and the ``etl`` section that built it (scoring
                        reads and validates new data with it)
    metrics.json        {"epochs": [{epoch, train_loss, val_loss, val_accuracy|val_rmse,
                        seconds}], steps, world_size, attempts, resumed_from}
    config.yaml         the ``train`` config of the run
    features/           copy of the shard set's fitted Spark ML PipelineModel (when it has one)

A ``model.json`` without ``inputs`` (written before they were recorded) describes a model of
the ``features`` vector viewed as ``input_shape``; :attr:`LoadedBundle.inputs` reads both.

It is written into a temporary sibling directory and renamed into place, so a reader sees
the old bundle or the complete new one (object stores have no rename: there the files are
written in place with ``model.json`` last, and a directory without it is refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import safetensors
import safetensors.torch
import torch
import yaml
from torch import nn

from pipeline.core import storage
from pipeline.core.compat import NewerFormatError, check_format_version, written_by
from pipeline.core.configbase import ConfigError, to_dict
from pipeline.core.version import __version__
from pipeline.data.shardset import ShardSet
from pipeline.train.config import TrainConfig
from pipeline.train.ecosystem import portable_args
from pipeline.train.engine import model_inputs, model_shape
from pipeline.train.inputs import ModelInputs
from pipeline.train.models import BuilderError, build_model, cnn, resolve_builder

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "BundleTooNew",
    "LoadedBundle",
    "check_bundle_model",
    "features_source",
    "load_bundle",
    "model_spec",
    "read_spec",
    "require_bundle",
    "spec_builders",
    "write_bundle",
    "write_trained",
]

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SPEC = "model.json"
METRICS = "metrics.json"
CONFIG = "config.yaml"
FEATURES = "features"


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or does not match its spec."""


class BundleTooNew(BundleError, NewerFormatError):
    """``model.json`` was written by a newer spark-train (a higher ``format_version``)."""


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle loaded for inference: ``model`` is on CPU and in eval mode."""

    model: nn.Module
    spec: dict[str, Any]
    metrics: dict[str, Any]
    uri: str

    @property
    def features_uri(self) -> str | None:
        """URI of the bundled feature ``PipelineModel``, or None when the bundle has none."""
        return storage.join(self.uri, FEATURES) if self.spec.get("features") else None

    @property
    def inputs(self) -> ModelInputs:
        """The model's input columns, with the normalization it was trained with."""
        return ModelInputs.from_spec(self.spec)


def model_spec(
    cfg: TrainConfig, shards: ShardSet, *, input_shape: tuple[int, ...], num_outputs: int
) -> dict[str, Any]:
    """The ``model.json`` document for a model trained by ``cfg`` on ``shards``."""
    inputs = model_inputs(cfg, shards)
    manifest = shards.manifest
    fingerprint = (manifest.get("fingerprint") or {}).get("combined") or hashlib.sha256(
        json.dumps(manifest, sort_keys=True, default=str).encode()
    ).hexdigest()
    args = to_dict(cfg.model.args)
    args.pop("input_shape", None)
    args = portable_args(cfg.model.builder, args)
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "builder": cfg.model.builder,
        "args": args,
        "input_shape": list(input_shape),
        "inputs": inputs.to_json(),
        "num_outputs": num_outputs,
        "task": shards.task,  # train.task, when set, equals it (preflight)
        "classes": shards.classes if shards.task == "classification" else [],
        "feature_names": shards.feature_names,
        "shardset": {
            "uri": shards.uri,
            "fingerprint": fingerprint,
            "generation": manifest.get("generation"),
        },
        "etl": manifest.get("config"),
        "torch_version": torch.__version__,
        "spark_train": __version__,
    }


def features_source(shards: ShardSet) -> str | None:
    """URI of the shard set's fitted feature ``PipelineModel``; None (with a warning) if absent."""
    if not shards.info.features_model:
        log.warning(
            "shard set %s has no features model; the bundle will have no features/", shards.uri
        )
        return None
    uri = shards.features_model_uri
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path):
        log.warning(
            "features model %s named by the manifest is missing; the bundle will have no features/",
            uri,
        )
        return None
    return uri


def write_trained(
    cfg: TrainConfig,
    shards: ShardSet,
    model: nn.Module,
    *,
    metrics: dict[str, Any],
    init: dict[str, Any] | None = None,
) -> str:
    """Write the bundle of ``model`` trained by ``cfg`` on ``shards`` to ``train.output``.

    What every mode writes at the end: the weights, ``model.json`` (:func:`model_spec`; with
    ``init``, the source of the initial weights: uri, format, sha256), the metrics, the
    ``train`` section and a copy of the shard set's feature model.
    """
    input_shape, num_outputs = model_shape(cfg, shards)
    spec = model_spec(cfg, shards, input_shape=input_shape, num_outputs=num_outputs)
    if init is not None:
        spec["init"] = dict(init)
    return write_bundle(
        cfg.output,
        model=model,
        spec=spec,
        metrics=metrics,
        config={"train": to_dict(cfg)},
        features_uri=features_source(shards),
    )


def write_bundle(
    uri: str,
    *,
    model: nn.Module,
    spec: dict[str, Any],
    metrics: dict[str, Any],
    config: dict[str, Any],
    features_uri: str | None = None,
) -> str:
    """Write a bundle at ``uri`` (replacing one that is there); returns ``uri``."""
    fs, final = storage.resolve(uri)
    spec = {**spec, "features": features_uri is not None}
    weights = {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
    }
    files = {
        WEIGHTS: safetensors.torch.save(weights, metadata={"format": "pt"}),
        METRICS: json.dumps(metrics, indent=2, default=_json_default).encode(),
        CONFIG: yaml.safe_dump(config, sort_keys=False).encode(),
        SPEC: json.dumps(spec, indent=2).encode(),  # last: the commit marker on object stores
    }
    with storage.atomic_dir(fs, final) as target:
        if features_uri is not None:
            src_fs, src = storage.resolve(features_uri)
            pafs.copy_files(
                src,
                storage.join(target, FEATURES),
                source_filesystem=src_fs,
                destination_filesystem=fs,
            )
        for name, data in files.items():
            with fs.open_output_stream(storage.join(target, name)) as f:
                f.write(data)
    return uri


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def require_bundle(uri: str, key: str = "--model") -> None:
    """:class:`~pipeline.core.configbase.ConfigError` naming ``key`` when ``uri`` holds no bundle.

    A path without ``model.json`` is a wrong argument (exit 2 in the CLI); a bundle that is
    there but broken stays a :class:`BundleError` (exit 1).
    """
    fs, root = storage.resolve(uri)
    if not storage.exists(fs, storage.join(root, SPEC)):
        raise ConfigError(key, f"{uri} is not a model bundle (no {SPEC} there)")


def read_spec(uri: str) -> dict[str, Any]:
    """The bundle's ``model.json``; :class:`BundleError` when it is missing or unreadable.

    Every ``format_version`` up to :data:`BUNDLE_FORMAT_VERSION` is read; a newer one raises
    :class:`BundleTooNew` naming the spark-train that wrote it.
    """
    fs, root = storage.resolve(uri)
    spec_path = storage.join(root, SPEC)
    if not storage.exists(fs, spec_path):
        raise BundleError(f"{uri} is not a model bundle: {SPEC} is missing")
    try:
        spec: dict[str, Any] = json.loads(storage.read_bytes(fs, spec_path))
    except ValueError as e:
        raise BundleError(f"{storage.join(uri, SPEC)} is not valid JSON: {e}") from e
    if not isinstance(spec, dict):
        raise BundleError(f"{storage.join(uri, SPEC)} is not a JSON object")
    check_format_version(
        spec.get("format_version"),
        BUNDLE_FORMAT_VERSION,
        where=storage.join(uri, SPEC),
        writer=written_by(spec.get("spark_train")),
        newer=BundleTooNew,
        invalid=BundleError,
    )
    return spec


def spec_builders(spec: dict[str, Any]) -> list[str]:
    """The builders that may rebuild a bundle's model, in order: ``model.json``'s, as meant.

    A bundle of the built-in ``cnn`` without ``inputs`` in its spec was written before the
    ``cnn`` changed architecture (the same change began recording ``inputs``), so it is
    built with :func:`~pipeline.train.models.cnn_v1`, the architecture it was trained as —
    unless its weights say otherwise (they fit the current ``cnn``), then with ``cnn``.
    """
    builder = str(spec["builder"])
    if spec.get("inputs") is None and resolve_builder(builder) is cnn:
        return ["pipeline.train.models:cnn_v1", builder]
    return [builder]


def _fits(model: nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == weights.keys() and all(own[k].shape == weights[k].shape for k in own)


def _build(uri: str, spec: dict[str, Any], builder: str) -> nn.Module:
    """The untrained network ``model.json`` describes, built with ``builder``.

    ``builder`` is one of :func:`spec_builders`; ``BuilderError`` when it cannot be built.
    """
    inputs, vocab = None, None
    if spec.get("inputs") is not None:
        try:
            recorded = ModelInputs.from_spec(spec)
        except ValueError as e:
            raise BundleError(f"{storage.join(uri, SPEC)}: inputs: {e}") from e
        inputs, vocab = recorded.spec(), recorded.vocab()
    return build_model(
        builder,
        input_shape=tuple(spec["input_shape"]),
        num_outputs=int(spec["num_outputs"]),
        args=spec.get("args") or {},
        inputs=inputs,
        vocab=vocab,
    )


def check_bundle_model(uri: str, key: str = "--model") -> dict[str, Any]:
    """Build the bundle's model on the ``meta`` device, here; returns its ``model.json``.

    What scoring checks on the driver before any task starts (as training checks
    ``train.model.builder``): a builder that does not import here, or that rejects the
    recorded arguments, is a :class:`~pipeline.core.configbase.ConfigError` naming ``key``
    and the builder, instead of a traceback from every Python worker. The meta device
    allocates nothing, so this costs the same for any model size.
    """
    spec = read_spec(uri)
    try:
        with torch.device("meta"):
            _build(uri, spec, spec_builders(spec)[0])
    except BuilderError as e:
        reason = str(e).removeprefix("train.model.builder: ")
        raise ConfigError(
            key, f"{uri}: its model (builder {spec.get('builder')!r}) cannot be built: {reason}"
        ) from e
    except BundleError as e:  # e.g. model.json's inputs are unreadable
        raise ConfigError(key, str(e)) from e
    except Exception as e:  # e.g. a builder that cannot run on meta tensors
        log.debug("%s: the model was not built on the meta device (%s); not checked", uri, e)
    return spec


def load_bundle(uri: str, *, expected_sha256: str | None = None) -> LoadedBundle:
    """Load a bundle on CPU, in eval mode, without a process group and without pickle.

    With ``expected_sha256``, the weights file must have that digest (it is hashed from the
    same bytes that are loaded), else :class:`BundleError`.
    """
    spec = read_spec(uri)
    fs, root = storage.resolve(uri)
    data = storage.read_bytes(fs, storage.join(root, WEIGHTS))
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise BundleError(
            f"{storage.join(uri, WEIGHTS)} changed: its sha256 is no longer {expected_sha256[:16]}…"
        )
    try:
        weights = safetensors.torch.load(data)
    except safetensors.SafetensorError as e:  # e.g. a pickle saved under this name
        raise BundleError(
            f"{storage.join(uri, WEIGHTS)} is not a safetensors file ({e}); bundles load "
            "weights from safetensors only, never by unpickling"
        ) from e
    builders = spec_builders(spec)
    for builder in builders:
        model = _build(uri, spec, builder)
        if len(builders) == 1 or _fits(model, weights):
            break
    if builder != builders[-1]:
        log.info("%s: a bundle of the 0.1.0 cnn, built with %s", uri, builder)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{uri}: weights do not fit the model in {SPEC}: {e}") from e
    model.eval()
    metrics_path = storage.join(root, METRICS)
    metrics = (
        json.loads(storage.read_bytes(fs, metrics_path)) if storage.exists(fs, metrics_path) else {}
    )
    return LoadedBundle(model=model, spec=spec, metrics=metrics, uri=uri)
