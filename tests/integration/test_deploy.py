"""What can be checked locally of the YARN / Kubernetes recipes in jobs/deploy/.

The GPU discovery script runs against a fake ``nvidia-smi`` and through Spark's own resource
discovery; every Spark setting in the defaults files and example commands is looked up in
the JVM's registry of settings (and its value converted by it); the files the commands and
the Airflow DAG name exist, their arguments parse with the CLI, and the configs load.
"""

from __future__ import annotations

import json
import os
import py_compile
import re
import runpy
import shlex
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import build_parser
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "jobs" / "deploy"
DISCOVERY = DEPLOY / "gpu_discovery.sh"
IMAGE_ROOT = "/opt/spark-train/"  # where jobs/deploy/Dockerfile puts the repository
DEFAULTS = sorted(DEPLOY.glob("spark-defaults.*.conf"))
SUBMIT_SCRIPTS = sorted(DEPLOY.glob("submit-*.sh"))
# Settings whose names carry a user-chosen part (environment variables, Hadoop options…).
PREFIXES = (
    "spark.executorEnv.",
    "spark.yarn.appMasterEnv.",
    "spark.kubernetes.driverEnv.",
    "spark.hadoop.",
)
RESOURCE_KEY = re.compile(r"spark\.(executor|driver|task)\.resource\.(\w+)\.(\w+)")
SWITCHES = {"--verbose", "--supervise", "--help", "--version", "--load-spark-defaults"}

pytestmark = [pytest.mark.timeout(300)]

FAKE_SMI = """#!/bin/sh
[ "$*" = "--query-gpu=index,uuid --format=csv,noheader" ] || {{ echo "bad args: $*" >&2; exit 2; }}
{body}
"""
TWO_GPUS = "printf '0, GPU-0a1b2c3d-0000\\n1, GPU-0a1b2c3d-1111\\n'"


def _discover(tmp_path: Path, smi_body: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the discovery script with PATH holding only a fake nvidia-smi (or nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if smi_body is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(FAKE_SMI.format(body=smi_body))
        smi.chmod(0o755)
    return subprocess.run(
        ["/bin/bash", str(DISCOVERY)],
        env={"PATH": str(bin_dir), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _addresses(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"name", "addresses"} and doc["name"] == "gpu"
    assert proc.stdout.count("\n") == 1
    return list(doc["addresses"])


# -- GPU discovery ---------------------------------------------------------------------------


def test_discovery_script_is_an_executable_bash_script() -> None:
    assert os.access(DISCOVERY, os.X_OK), "Spark executes the script directly: chmod +x"
    assert DISCOVERY.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(DISCOVERY)], check=True, timeout=30)


def test_discovery_lists_the_gpus_nvidia_smi_reports(tmp_path: Path) -> None:
    assert _addresses(_discover(tmp_path, TWO_GPUS)) == ["0", "1"]
    # A resource manager or container that restricted the process: only those GPUs.
    assert _addresses(_discover(tmp_path, TWO_GPUS, CUDA_VISIBLE_DEVICES="1")) == ["1"]
    only0 = _discover(tmp_path, TWO_GPUS, CUDA_VISIBLE_DEVICES="GPU-0a1b2c3d-0000")
    assert _addresses(only0) == ["0"]
    assert _addresses(_discover(tmp_path, TWO_GPUS, CUDA_VISIBLE_DEVICES="0, 1")) == ["0", "1"]
    assert _addresses(_discover(tmp_path, TWO_GPUS, CUDA_VISIBLE_DEVICES="")) == []


def test_discovery_without_gpus_reports_none_or_fails_clearly(tmp_path: Path) -> None:
    absent = _discover(tmp_path, None)
    assert _addresses(absent) == [] and "nvidia-smi is not on PATH" in absent.stderr
    no_device = _discover(tmp_path / "x", 'echo "No devices were found"; exit 6')
    assert _addresses(no_device) == [] and "found no GPU" in no_device.stderr
    broken = _discover(tmp_path / "y", 'echo "NVIDIA-SMI has failed: driver not loaded"; exit 9')
    assert broken.returncode == 1 and broken.stdout == ""
    assert "exit status 9" in broken.stderr and "driver not loaded" in broken.stderr
    garbage = _discover(tmp_path / "z", "echo 'not, a gpu'")
    assert garbage.returncode == 1 and "unexpected nvidia-smi output" in garbage.stderr


@pytest.mark.spark
def test_sparks_own_resource_discovery_runs_the_script(spark: Any, tmp_path: Path) -> None:
    """ResourceUtils.getOrDiscoverAllResources: what an executor does at start-up."""
    jvm = spark.sparkContext._jvm
    fake = tmp_path / "bin"
    _discover(tmp_path, TWO_GPUS)  # writes the fake nvidia-smi
    wrapper = tmp_path / "discover.sh"  # Spark runs the script with the JVM's environment
    wrapper.write_text(f'#!/bin/bash\nPATH="{fake}" exec /bin/bash "{DISCOVERY}"\n')
    wrapper.chmod(0o755)

    def discover(amount: int) -> dict[str, list[str]]:
        conf = jvm.org.apache.spark.SparkConf(False)
        conf.set("spark.executor.resource.gpu.amount", str(amount))
        conf.set("spark.executor.resource.gpu.discoveryScript", str(wrapper))
        found = jvm.org.apache.spark.resource.ResourceUtils.getOrDiscoverAllResources(
            conf, "spark.executor", jvm.scala.Option.empty()
        )
        info = found.apply("gpu")
        return {str(info.name()): [str(a) for a in info.addresses()]}

    assert discover(2) == {"gpu": ["0", "1"]}
    with pytest.raises(Exception, match="less than what the user requested: 3"):
        discover(3)
    (fake / "nvidia-smi").unlink()  # a node without GPUs: Spark's error names the resource
    with pytest.raises(Exception, match=r"Resource: gpu, with addresses:\s+is less than"):
        discover(1)


# -- spark-defaults files and example commands ---------------------------------------------


def _properties(path: Path) -> dict[str, str]:
    """A spark-defaults file: ``key value`` lines, ``#`` comments; keys must be unique."""
    props: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 1)
        assert len(parts) == 2, f"{path.name}:{n}: expected 'key value', got {line!r}"
        key, value = parts[0], parts[1].strip()
        assert key not in props, f"{path.name}:{n}: {key} set twice"
        props[key] = value
    return props


# The objects that declare Spark's settings; each registers its settings when loaded.
SETTING_HOLDERS = (
    "org.apache.spark.internal.config.package$",
    "org.apache.spark.internal.config.Python$",
    "org.apache.spark.internal.config.UI$",
    "org.apache.spark.deploy.yarn.config.package$",
    "org.apache.spark.deploy.k8s.Config$",
    "org.apache.spark.sql.internal.SQLConf$",
)


def _check_settings(jvm: Any, settings: dict[str, str], where: str) -> None:
    """Every key is a Spark setting (or a documented prefix) and its value converts."""
    from py4j.protocol import Py4JJavaError

    for holder in SETTING_HOLDERS:
        jvm.java.lang.Class.forName(holder)
    entries = jvm.org.apache.spark.internal.config.ConfigEntry
    conf = jvm.org.apache.spark.SparkConf(False)
    for key, value in settings.items():
        conf.set(key, value)
        if key.startswith(PREFIXES):
            continue
        if resource := RESOURCE_KEY.fullmatch(key):
            assert resource.group(3) in {"amount", "discoveryScript", "vendor"}, f"{where}: {key}"
            continue
        entry = entries.findEntry(key)
        assert entry is not None, f"{where}: {key} is not a Spark setting"
        if "$" in value:  # a shell variable filled in at submit time
            continue
        try:
            conf.get(entry)  # Spark's conversion: INVALID_CONF_VALUE for a wrong value
        except Py4JJavaError as err:
            raise AssertionError(f"{where}: {key}={value}: {err.java_exception}") from None
        except ValueError:
            pass  # converted by Spark; py4j cannot hand some numeric types to Python
    utils = jvm.org.apache.spark.resource.ResourceUtils
    utils.parseAllResourceRequests(conf, "spark.executor")
    utils.parseResourceRequirements(conf, "spark.task")


@dataclass
class Submit:
    """One spark-submit command line of an example script."""

    options: list[tuple[str, str | None]] = field(default_factory=list)
    app: str = ""
    args: list[str] = field(default_factory=list)

    def values(self, option: str) -> list[str]:
        return [v for o, v in self.options if o == option and v is not None]

    @property
    def conf(self) -> dict[str, str]:
        return dict(v.split("=", 1) for v in self.values("--conf"))


def _submits(script: Path) -> Iterator[Submit]:
    text = script.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.strip().startswith("spark-submit "):
            continue
        tokens = shlex.split(line, comments=True)[1:]
        cmd = Submit()
        while tokens and tokens[0].startswith("--"):
            option = tokens.pop(0)
            cmd.options.append((option, None if option in SWITCHES else tokens.pop(0)))
        cmd.app, cmd.args = tokens[0], tokens[1:]
        yield cmd


def _repo_path(ref: str) -> Path:
    return REPO / ref.removeprefix(f"local://{IMAGE_ROOT}")


def _submit_options() -> set[str]:
    import pyspark

    [jar] = (Path(pyspark.__file__).parent / "jars").glob("spark-launcher_*.jar")
    code = zipfile.ZipFile(jar).read("org/apache/spark/launcher/SparkSubmitOptionParser.class")
    return {m.decode() for m in re.findall(rb"--[a-z][a-z-]+", code)}


def test_every_deploy_script_is_valid_bash() -> None:
    scripts = sorted(DEPLOY.glob("*.sh"))
    assert {s.name for s in scripts} >= {"gpu_discovery.sh", "pack_env.sh", "submit-yarn.sh"}
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.spark
def test_spark_defaults_files_hold_real_settings(spark: Any) -> None:
    jvm = spark.sparkContext._jvm
    assert {p.name for p in DEFAULTS} == {
        "spark-defaults.etl.conf",
        "spark-defaults.train-k8s-gpu.conf",
        "spark-defaults.train-yarn-gpu.conf",
    }
    for path in DEFAULTS:
        _check_settings(jvm, _properties(path), path.name)
    for name in ("train-yarn-gpu", "train-k8s-gpu"):
        p = _properties(DEPLOY / f"spark-defaults.{name}.conf")
        # one barrier task per executor, one GPU per task, a fixed set of executors
        assert p["spark.executor.cores"] == p["spark.task.cpus"]
        assert p["spark.executor.resource.gpu.amount"] == p["spark.task.resource.gpu.amount"] == "1"
        assert p["spark.dynamicAllocation.enabled"] == "false"
        assert p["spark.scheduler.minRegisteredResourcesRatio"] == "1.0"
        assert p["spark.executor.resource.gpu.discoveryScript"].endswith("gpu_discovery.sh")
    etl = _properties(DEPLOY / "spark-defaults.etl.conf")
    assert etl["spark.dynamicAllocation.enabled"] == "true"
    assert "spark.task.resource.gpu.amount" not in etl


@pytest.mark.spark
def test_example_commands_use_real_options_settings_and_files(spark: Any) -> None:
    jvm = spark.sparkContext._jvm
    known_options = _submit_options()
    assert {"--archives", "--properties-file", "--deploy-mode", "--conf"} <= known_options
    seen_jobs = set()
    for script in SUBMIT_SCRIPTS:
        commands = list(_submits(script))
        assert len(commands) == 3, f"{script.name}: expected etl, train and evaluate"
        for cmd in commands:
            where = f"{script.name} ({cmd.app})"
            assert {o for o, _ in cmd.options} <= known_options, where
            props: dict[str, str] = {}
            for ref in cmd.values("--properties-file"):
                props.update(_properties(REPO / ref))
            _check_settings(jvm, {**props, **cmd.conf}, where)
            for ref in [*cmd.values("--files"), *cmd.values("--archives")]:
                for item in ref.split(","):
                    if "$" not in item:
                        assert (REPO / item).is_file(), f"{where}: {item} does not exist"
            template = cmd.conf.get("spark.kubernetes.executor.podTemplateFile")
            if template:
                assert yaml.safe_load((REPO / template).read_text())["kind"] == "Pod"
            for archive in cmd.values("--archives"):  # the python runs from the unpacked env
                alias = archive.rsplit("#", 1)[1]
                assert {**props, **cmd.conf}["spark.pyspark.python"].startswith(f"./{alias}/")
            job = _repo_path(cmd.app)
            assert job.is_file() and job.parent == REPO / "jobs", where
            seen_jobs.add(job.stem)
            _check_cli_args(job.stem, cmd.args, where)
    assert seen_jobs == {"etl", "train", "evaluate"}


def _check_cli_args(command: str, args: list[str], where: str) -> None:
    """The job's arguments parse with the CLI, and its --set overrides are real config keys."""
    concrete = ["c.yaml" if "$" in a else a for a in args]
    parsed = build_parser().parse_args([command, *concrete])
    assert parsed.config == "c.yaml", where
    load_config(DEPLOY / "cluster.yaml", parsed.overrides)


def test_configs_and_templates_parse() -> None:
    configs = [*sorted((REPO / "jobs" / "configs").glob("*.yaml")), DEPLOY / "cluster.yaml"]
    for path in configs:
        cfg = load_config(path)
        assert cfg.etl.output == cfg.train.dataset, path  # `run` requires it
    cluster = load_config(DEPLOY / "cluster.yaml")
    assert "://" in cluster.etl.input.path and "://" in cluster.train.output
    pod = yaml.safe_load((DEPLOY / "k8s-executor-gpu.yaml").read_text())
    assert pod["kind"] == "Pod" and pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_dockerfile_matches_the_kubernetes_settings() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    k8s = _properties(DEPLOY / "spark-defaults.train-k8s-gpu.conf")
    assert (
        k8s["spark.executor.resource.gpu.discoveryScript"]
        == f"{IMAGE_ROOT}{DISCOVERY.relative_to(REPO)}"
    )
    assert f"PYSPARK_PYTHON={k8s['spark.pyspark.python']}" in text


# -- Airflow ---------------------------------------------------------------------------------


class _Operator:
    """Records a SparkSubmitOperator's arguments and its downstream tasks."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.downstream: list[_Operator] = []

    def __rshift__(self, other: _Operator) -> _Operator:
        self.downstream.append(other)
        return other


class _Dag:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __enter__(self) -> _Dag:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_airflow_dag_compiles(tmp_path: Path) -> None:
    out = tmp_path / "airflow_dag.pyc"
    py_compile.compile(str(DEPLOY / "airflow_dag.py"), cfile=str(out), doraise=True)
    assert out.stat().st_size > 0


@pytest.mark.spark
def test_airflow_dag_submits_the_jobs_with_real_arguments(
    spark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the DAG file against recording stand-ins for Airflow's DAG and operator."""
    names = "airflow.providers.apache.spark.operators.spark_submit".split(".")
    for i in range(1, len(names) + 1):
        monkeypatch.setitem(sys.modules, ".".join(names[:i]), types.ModuleType(".".join(names[:i])))
    sys.modules["airflow"].DAG = _Dag  # type: ignore[attr-defined]
    sys.modules[".".join(names)].SparkSubmitOperator = _Operator  # type: ignore[attr-defined]
    monkeypatch.delenv("SPARK_TRAIN_HOME", raising=False)
    monkeypatch.delenv("SPARK_TRAIN_CONFIG", raising=False)

    ns = runpy.run_path(str(DEPLOY / "airflow_dag.py"))
    etl, train, score = ns["etl"], ns["train"], ns["score"]
    assert etl.downstream == [train] and train.downstream == [score]
    assert ns["dag"].kwargs["dag_id"] == "spark_train"
    jvm = spark.sparkContext._jvm
    for task in (etl, train, score):
        kw = task.kwargs
        job = Path(kw["application"])
        assert job.is_file() and job.parent == REPO / "jobs", kw["task_id"]
        props = _properties(Path(kw["properties_file"]))
        _check_settings(jvm, {**props, **kw["conf"]}, kw["task_id"])
        for item in kw["files"].split(","):
            assert Path(item).is_file(), item
        alias = kw["archives"].rsplit("#", 1)[1]
        assert kw["conf"]["spark.pyspark.python"].startswith(f"./{alias}/")
        args = [a.replace("{{ ds_nodash }}", "20260101") for a in kw["application_args"]]
        parsed = build_parser().parse_args([job.stem, *args])
        assert Path(kw["files"].split(",")[0]).name == parsed.config
        load_config(DEPLOY / "cluster.yaml", parsed.overrides)
    assert [Path(t.kwargs["application"]).stem for t in (etl, train, score)] == [
        "etl",
        "run",
        "score",
    ]
    assert "train-yarn-gpu" in train.kwargs["properties_file"]


def test_airflow_dag_imports_with_real_airflow() -> None:
    pytest.importorskip("airflow.providers.apache.spark.operators.spark_submit")
    ns = runpy.run_path(str(DEPLOY / "airflow_dag.py"))
    assert {t.task_id for t in ns["dag"].tasks} == {"etl", "train", "score"}
