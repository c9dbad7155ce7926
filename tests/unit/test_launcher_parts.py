"""Spark-free launcher parts: rank environment, log channel, progress, rank runner, errors."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.launch import errors, launcher
from pipeline.launch import rendezvous as rendezvous_module
from pipeline.launch.rendezvous import Rendezvous
from pipeline.runtime import distenv, logchannel, progress, rankrun
from pipeline.runtime.rankrun import RankInfo


def _env(rank: int, infos: list[RankInfo]) -> dict[str, str]:
    return rankrun.rank_environment(rank, infos, cpus=2, attempt=1, run_token="tok", log_addr="h:1")


# -- rank environment ----------------------------------------------------------------------


def test_rank_environment_cpu_counts_ranks_per_host() -> None:
    infos = [RankInfo(host="a", port=4242), RankInfo(host="a"), RankInfo(host="b")]
    envs = [_env(r, infos) for r in range(3)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["2", "2", "1"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("a", "4242")}
    assert envs[0][distenv.ATTEMPT] == "1" and envs[0][distenv.RUN_TOKEN] == "tok"
    assert envs[0][distenv.DEVICE] == "cpu" and envs[0]["CUDA_VISIBLE_DEVICES"] == ""
    assert envs[0]["OMP_NUM_THREADS"] == "2"


def test_rank_environment_gpu_lists_host_gpus_in_local_rank_order() -> None:
    infos = [
        RankInfo(host="a", gpus=("3",), port=1),
        RankInfo(host="a", gpus=("1",)),
        RankInfo(host="b", gpus=("0",)),
    ]
    envs = [_env(r, infos) for r in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,1", "3,1", "0"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0"]
    assert {e[distenv.DEVICE] for e in envs} == {"cuda"}


def test_rank_environment_isolated_gpus_with_equal_ids_get_their_own() -> None:
    infos = [RankInfo(host="a", gpus=("0",), port=1), RankInfo(host="a", gpus=("0",))]
    assert [_env(r, infos)["CUDA_VISIBLE_DEVICES"] for r in range(2)] == ["0", "0"]


@pytest.mark.parametrize("gpus", [[("0", "1"), ("2", "3")], [("0",), ()]])
def test_rank_environment_needs_one_gpu_per_rank(gpus: list[tuple[str, ...]]) -> None:
    infos = [RankInfo(host="a", gpus=g) for g in gpus]
    with pytest.raises(ValueError, match=r"spark\.task\.resource\.gpu\.amount"):
        _env(0, infos)


def test_physical_gpus_respects_existing_visible_devices() -> None:
    assert rankrun.physical_gpus(["1"], None) == ("1",)
    assert rankrun.physical_gpus(["1"], "4,5") == ("5",)  # a position in the visible list
    assert rankrun.physical_gpus(["5"], "4,5") == ("5",)  # already a listed id
    assert rankrun.physical_gpus(["GPU-ab"], "GPU-ab,GPU-cd") == ("GPU-ab",)


def test_an_averaging_task_trains_on_its_gpu_or_hides_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Averaging tasks (no barrier) get the device variables of the GPU Spark gave them."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert rankrun.task_device_environment(["1"]) == {
        distenv.DEVICE: "cuda",
        "CUDA_VISIBLE_DEVICES": "5",
    }
    assert rankrun.task_device_environment([]) == {
        distenv.DEVICE: "cpu",
        "CUDA_VISIBLE_DEVICES": "",
    }
    with rankrun.scoped_environ(rankrun.task_device_environment([])):
        device, backend = distenv.device_and_backend()
    assert (device.type, backend) == ("cpu", "gloo")


def test_rank_info_round_trips_through_json() -> None:
    info = RankInfo(host="h", gpus=("0",), port=7)
    assert RankInfo.from_json(info.to_json()) == info


# -- distenv -------------------------------------------------------------------------------


def test_current_defaults_to_a_world_of_one() -> None:
    env = distenv.current({})
    assert (env.rank, env.world_size, env.local_rank, env.attempt) == (0, 1, 0, 0)
    with pytest.raises(ValueError, match="RANK"):
        distenv.current({"RANK": "x"})


def test_device_and_backend_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(distenv.DEVICE, raising=False)
    assert distenv.device_and_backend() == (torch.device("cpu"), "gloo")
    monkeypatch.setenv(distenv.DEVICE, "cpu")
    with pytest.raises(RuntimeError, match=r"spark\.task\.resource\.gpu\.amount"):
        distenv.device_and_backend("cuda")
    monkeypatch.setenv(distenv.DEVICE, "cuda")
    with pytest.raises(RuntimeError, match="torch sees none"):
        distenv.device_and_backend()


def test_device_and_backend_indexes_gpus_by_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv(distenv.DEVICE, "cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distenv.device_and_backend() == (torch.device("cuda", 1), "nccl")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RuntimeError, match="one rank per GPU"):
        distenv.device_and_backend()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distenv.device_and_backend() == (torch.device("cuda", 0), "nccl")


# -- log channel ---------------------------------------------------------------------------


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[int, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, rank: int, msg: dict[str, Any]) -> None:
        with self._lock:
            self.messages.append((rank, msg))


@pytest.fixture()
def channel() -> Iterator[tuple[logchannel.ChannelServer, _Inbox]]:
    inbox = _Inbox()
    with logchannel.ChannelServer("127.0.0.1", "secret", inbox) as server:
        yield server, inbox


def test_channel_delivers_messages_in_order_and_counts_byes(
    channel: tuple[logchannel.ChannelServer, _Inbox],
) -> None:
    server, inbox = channel
    clients = [logchannel.ChannelClient(server.address, "secret", rank) for rank in (0, 1)]
    for i in range(3):
        for client in clients:
            client.send({"t": "out", "line": f"line {i}"})
    for client in clients:
        client.close()
    assert server.wait_finished(ranks=2, timeout_s=10)
    for rank in (0, 1):
        assert [m["line"] for r, m in inbox.messages if r == rank] == ["line 0", "line 1", "line 2"]


def test_the_wait_for_last_messages_lasts_while_they_arrive(
    channel: tuple[logchannel.ChannelServer, _Inbox],
) -> None:
    """The bound is on silence, not on the whole drain: a rank still sending its last
    records (a backlog after the job ended) for 3 s is waited for with a 1 s bound."""
    server, inbox = channel
    client = logchannel.ChannelClient(server.address, "secret", 0)

    def trickle() -> None:
        for i in range(30):
            client.send({"t": "out", "line": f"late {i}"})
            time.sleep(0.1)  # a slow drain: each record 0.1 s after the last
        client.close()

    sender = threading.Thread(target=trickle)
    sender.start()
    start = time.monotonic()
    assert server.wait_finished(ranks=1, timeout_s=1.0)
    assert time.monotonic() - start > 2.0
    sender.join()
    assert len(inbox.messages) == 30
    silent = logchannel.ChannelClient(server.address, "secret", 1)  # open, says nothing
    start = time.monotonic()
    assert not server.wait_finished(ranks=2, timeout_s=0.5)
    assert 0.4 < time.monotonic() - start < 3.0
    silent.close()


def test_channel_rejects_a_wrong_token(channel: tuple[logchannel.ChannelServer, _Inbox]) -> None:
    server, inbox = channel
    client = logchannel.ChannelClient(server.address, "wrong", 0)
    client.send({"t": "out", "line": "intruder"})
    client.close()
    assert server.wait_finished(ranks=None, timeout_s=10)
    assert not server.wait_finished(ranks=1, timeout_s=0.1)  # its bye did not count
    assert inbox.messages == []


def test_channel_request_gets_the_answer() -> None:
    def answer(rank: int, msg: dict[str, Any]) -> dict[str, Any] | None:
        return {"t": "pong", "rank": rank, "n": msg["n"] + 1} if msg["t"] == "ping" else None

    with logchannel.ChannelServer("127.0.0.1", "secret", answer) as server:
        client = logchannel.ChannelClient(server.address, "secret", 3)
        client.send({"t": "out", "line": "no answer expected"})
        assert client.request({"t": "ping", "n": 1}, timeout_s=10) == {
            "t": "pong",
            "rank": 3,
            "n": 2,
        }
        client.close()
        assert server.wait_finished(ranks=1, timeout_s=10)


def _join_all(rendezvous: Rendezvous, ranks: list[int]) -> dict[int, Any]:
    answers: dict[int, Any] = {}
    threads = [
        threading.Thread(target=lambda r=r: answers.update({r: rendezvous.join(r, f"p{r}")}))
        for r in ranks
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers


def test_rendezvous_answers_every_rank_with_all_parts_in_rank_order() -> None:
    answers = _join_all(Rendezvous(3), [2, 0, 1])
    assert answers == {r: ["p0", "p1", "p2"] for r in range(3)}


def test_channel_rendezvous_of_512_ranks_connecting_at_once() -> None:
    # socketserver's default listen backlog (5) reset connections from ~16 simultaneous
    # ranks on: those ranks' tasks failed and the rest fell back to allGather after 30 s.
    ranks = 512
    collector = launcher._Collector(progress.ProgressDisplay(enabled=False), ranks)
    answers: dict[int, Any] = {}
    start = threading.Barrier(ranks)

    def rank(r: int, address: str) -> None:
        start.wait()
        try:
            client = logchannel.ChannelClient(address, "secret", r)
            answers[r] = client.request({"t": "rendezvous", "part": f"p{r}"}, timeout_s=60)
            client.close()
        except OSError as err:
            answers[r] = err

    with logchannel.ChannelServer("127.0.0.1", "secret", collector.on_message) as server:
        threads = [threading.Thread(target=rank, args=(r, server.address)) for r in range(ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert server.wait_finished(ranks=ranks, timeout_s=30)
    expected = {"t": "rendezvous", "parts": [f"p{r}" for r in range(ranks)]}
    assert [r for r in range(ranks) if answers.get(r) != expected] == []


def test_rendezvous_falls_back_to_allgather_when_a_rank_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rendezvous_module, "RENDEZVOUS_WAIT_S", 0.2)
    rendezvous = Rendezvous(3)
    assert _join_all(rendezvous, [0, 1]) == {0: None, 1: None}
    assert rendezvous.join(2, "late") is None  # a late rank takes the same path


# -- progress ------------------------------------------------------------------------------


def test_report_logs_locally_without_the_launcher(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for var in (distenv.RUN_TOKEN, distenv.LOG_ADDR, "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(progress, "_local_last", float("-inf"))
    caplog.set_level(logging.INFO, logger="pipeline.runtime.progress")
    progress.report(epoch=1, step=5, steps=10, samples_per_s=12.5, loss=0.25)
    progress.report(epoch=1, step=6, steps=10, samples_per_s=12.5, loss=0.25)  # rate limited
    monkeypatch.setenv("RANK", "1")
    progress.report(epoch=1, step=10, steps=10, samples_per_s=1, loss=1)  # not rank 0
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 1 step 5/10 loss 0.25 12.5 samples/s"
    ]


def test_report_goes_to_the_installed_client(
    channel: tuple[logchannel.ChannelServer, _Inbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, inbox = channel
    monkeypatch.delenv("RANK", raising=False)
    client = logchannel.ChannelClient(server.address, "secret", 0)
    logchannel.install_client(client)
    try:
        progress.report(epoch=0, step=1, steps=2, samples_per_s=3.0, loss=4.0)
    finally:
        logchannel.install_client(None)
        client.close()
    assert server.wait_finished(ranks=1, timeout_s=10)
    assert inbox.messages == [
        (0, {"t": "progress", "epoch": 0, "step": 1, "steps": 2, "samples_per_s": 3.0, "loss": 4.0})
    ]


def test_display_logs_at_most_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.runtime.progress")
    display = progress.ProgressDisplay(enabled=None, log_every_s=3600)
    for step in (1, 2, 3):
        display.update({"epoch": 0, "step": step, "steps": 3, "samples_per_s": 1.0, "loss": 1.0})
    display.close()
    assert [r.getMessage() for r in caplog.records] == [
        "progress: epoch 0 step 1/3 loss 1 1.0 samples/s",
        "progress: epoch 0 step 3/3 loss 1 1.0 samples/s",  # the last step is always shown
    ]
    silent = progress.ProgressDisplay(enabled=False)
    silent.update({"epoch": 0, "step": 1, "steps": 1, "samples_per_s": 1.0, "loss": 1.0})
    assert len(caplog.records) == 2 and silent.last is not None


# -- running a rank ------------------------------------------------------------------------

_RANK_ENV = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1234", distenv.ATTEMPT: "0"}


def _sees_env(tag: str) -> dict[str, str | None]:
    print(f"hello {tag}")
    logging.getLogger("user.code").info("info from %s", tag)
    return {k: os.environ.get(k) for k in ("RANK", "MASTER_PORT", "EXTRA")}


def _fails() -> None:
    print("about to fail")
    raise KeyError("missing thing")


def _run_with_client(
    server: logchannel.ChannelServer, spec: rankrun.RankSpec, env: dict[str, str] = _RANK_ENV
) -> Any:
    client = logchannel.ChannelClient(server.address, "secret", int(env["RANK"]))
    logchannel.install_client(client)
    try:
        return rankrun.run_rank(spec, env, cpus=1)
    finally:
        logchannel.install_client(None)
        client.close()
        assert server.wait_finished(ranks=1, timeout_s=10)


def test_run_rank_applies_and_restores_env_and_forwards_output(
    channel: tuple[logchannel.ChannelServer, _Inbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    server, inbox = channel
    monkeypatch.setenv("MASTER_PORT", "999")
    monkeypatch.delenv("RANK", raising=False)
    threads = torch.get_num_threads()
    spec = rankrun.RankSpec(target=_sees_env, args=("x",), env={"EXTRA": "1"})
    assert _run_with_client(server, spec) == {"RANK": "1", "MASTER_PORT": "1234", "EXTRA": "1"}
    assert os.environ.get("RANK") is None and os.environ["MASTER_PORT"] == "999"
    assert "EXTRA" not in os.environ and torch.get_num_threads() == threads
    assert not isinstance(sys.stdout, rankrun._LineTee)
    kinds = [(m["t"], m.get("line") or m.get("msg")) for _, m in inbox.messages]
    assert ("out", "hello x") in kinds and ("log", "user.code: info from x") in kinds


def test_run_rank_reports_a_failure_with_type_and_tail(
    channel: tuple[logchannel.ChannelServer, _Inbox],
) -> None:
    server, inbox = channel
    with pytest.raises(KeyError, match="missing thing"):
        _run_with_client(server, rankrun.RankSpec(target=_fails))
    [failure] = [m for _, m in inbox.messages if m["t"] == "failure"]
    assert (failure["rank"], failure["type"], failure["module"]) == (1, "KeyError", "builtins")
    assert failure["tail"][0] == "about to fail"
    assert "Traceback (most recent call last):" in failure["tail"]
    assert not any("rankrun.py" in line for line in failure["tail"])  # user frames only
    assert failure["tail"][-1] == "KeyError: 'missing thing'"


def test_run_rank_script_returns_its_exit_code_or_raises_with_output(
    channel: tuple[logchannel.ChannelServer, _Inbox], tmp_path: Any
) -> None:
    server, inbox = channel
    script = tmp_path / "s.py"
    script.write_text(
        "import os, sys\n"
        "print('rank', os.environ['RANK'], 'argv', sys.argv[1:])\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    assert _run_with_client(server, rankrun.RankSpec(target=str(script), args=(0,))) == 0
    with pytest.raises(rankrun.ScriptError, match="exited with code 3"):
        _run_with_client(server, rankrun.RankSpec(target=str(script), args=(3,)))
    [failure] = [m for _, m in inbox.messages if m["t"] == "failure"]
    assert failure["tail"] == ["rank 1 argv ['3']", "to stderr", f"{script} exited with code 3"]


# -- driver-side errors --------------------------------------------------------------------


class _CustomError(Exception):
    pass


def test_errors_take_the_rank_exception_type_when_the_driver_has_it() -> None:
    err = errors.rank_error(1, "ValueError", "builtins", "bad", ["l1", "ValueError: bad"], 0)
    assert isinstance(err, ValueError) and isinstance(err, launcher.DistributedError)
    assert str(err).startswith("rank 1 failed with ValueError: bad (attempt 0)")
    assert str(err).endswith("l1\nValueError: bad")
    custom = errors.rank_error(0, "_CustomError", __name__, "x", [], 0)
    assert isinstance(custom, _CustomError)
    unknown = errors.rank_error(0, "Gone", "no.such.module", "x", [], 0)
    assert type(unknown) is launcher.DistributedError
    key = errors.rank_error(0, "KeyError", "builtins", "'k'", [], 0)
    assert isinstance(key, KeyError) and str(key).startswith("rank 0 failed with KeyError")


def test_first_real_cause_wins_over_peer_consequences() -> None:
    peer = launcher._Failure(
        rank=0,
        exc_type="DistBackendError",
        module="torch.distributed",
        message="Connection reset by peer",
        tail=[],
    )
    real = launcher._Failure(
        rank=1, exc_type="ValueError", module="builtins", message="boom", tail=["ValueError: boom"]
    )
    collector = launcher._Collector(progress.ProgressDisplay(enabled=False), ranks=2)
    collector.failures.extend([peer, real])
    err = launcher._attempt_error(collector, None, attempt=0)
    assert (err.rank, err.exc_type) == (1, "ValueError")
    assert "also failed after it: rank 0 DistBackendError" in str(err)


def test_spark_error_text_is_parsed_when_no_rank_reported() -> None:
    text = (
        "An error occurred while calling o1.collect.\n"
        ": org.apache.spark.SparkException: Job aborted due to stage failure: Could not recover "
        "from a failed barrier ResultStage. Most recent failure reason: Stage failed because "
        "barrier task ResultTask(3, 1) finished unsuccessfully.\n"
        "org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "MemoryError: out of memory\n\tat org.apache.spark.Foo(Foo.scala:1)\n"
    )
    outputs = {1: ["last words of rank 1"], 0: ["rank 0 output"]}
    err = errors.from_spark_error(RuntimeError(text), attempt=2, outputs=outputs)
    assert (err.rank, err.exc_type, err.exc_message) == (1, "MemoryError", "out of memory")
    assert err.tail == [
        "last words of rank 1",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "MemoryError: out of memory",
    ]
    assert isinstance(err, MemoryError)


def test_all_failed_lists_every_attempt() -> None:
    errs = [
        errors.rank_error(1, "ValueError", "builtins", f"boom {a}", [f"tail {a}"], a)
        for a in (0, 1)
    ]
    err = errors.all_failed(errs)
    lines = str(err).splitlines()
    assert lines[0] == "all 2 attempts failed:"
    assert lines[1].startswith("  attempt 0: rank 1 failed with ValueError: boom 0")
    assert lines[2].startswith("  attempt 1: rank 1 failed with ValueError: boom 1")
    assert lines[-1] == "tail 1" and err.attempts == tuple(errs) and isinstance(err, ValueError)


def test_script_child_progress_is_forwarded_by_its_rank(
    channel: tuple[logchannel.ChannelServer, _Inbox], tmp_path: Any
) -> None:
    server, inbox = channel
    script = tmp_path / "p.py"
    script.write_text(
        "from pipeline.runtime.progress import report\n"
        "print('training')\n"
        "report(epoch=2, step=7, steps=9, samples_per_s=5.0, loss=0.5)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    env = {
        **_RANK_ENV,
        "RANK": "0",
        distenv.RUN_TOKEN: "secret",
        distenv.LOG_ADDR: server.address,
        "PYTHONPATH": repo,
    }
    assert _run_with_client(server, rankrun.RankSpec(target=str(script)), env) == 0
    assert [m for _, m in inbox.messages] == [
        {"t": "out", "line": "training"},
        {"t": "progress", "epoch": 2, "step": 7, "steps": 9, "samples_per_s": 5.0, "loss": 0.5},
    ]
