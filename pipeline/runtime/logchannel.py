"""A small authenticated TCP channel from training ranks to the driver.

The driver runs a :class:`ChannelServer` for one launch attempt; every rank connects a
:class:`ChannelClient`, proves it knows the attempt's run token, and streams
newline-delimited JSON messages: log records, output lines, progress reports and failure
reports. A message the driver answers (the launcher's rendezvous) is a
:meth:`ChannelClient.request`. The channel is best-effort: a rank that cannot reach the
driver keeps training and logs locally; no send blocks for longer than the socket timeout.

Spark-free: it runs on the driver and inside executors alike.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "ChannelClient",
    "ChannelServer",
    "active_client",
    "encode",
    "install_client",
]

log = logging.getLogger(__name__)

Message = dict[str, Any]
_MAX_LINE = 1 << 20
_SEND_TIMEOUT_S = 10.0
_BACKLOG = 4096
"""Pending connections the server's listen queue holds (ranks connect all at once)."""
_HELLO_TIMEOUT_S = 30.0
"""A connection must prove the run token this fast (a rank sends it right after connecting);
a silent or slow stray connection is dropped instead of holding a server thread."""


class ChannelServer:
    """Accepts rank connections on ``host`` and hands each message to ``on_message(rank, msg)``.

    ``advertise`` is the host name ranks connect to (default ``host``; Spark's
    ``spark.driver.host`` where ``host`` is ``spark.driver.bindAddress``). ``on_message`` runs
    on the connection's thread, so it must be thread-safe; a message it returns (a dict, or
    bytes made by :func:`encode`) is sent back to that connection as the answer to a
    request. Use as a context manager: leaving it closes the listener and every open
    connection.
    """

    def __init__(
        self,
        host: str,
        token: str,
        on_message: Callable[[int, Message], Message | bytes | None],
        advertise: str | None = None,
    ) -> None:
        self._advertise = advertise or host
        self._token = token
        self._on_message = on_message
        self._lock = threading.Condition()
        self._open: set[socket.socket] = set()
        self._finished: set[int] = set()
        self._heard = time.monotonic()  # when the last message arrived
        self._server = _Server((host, 0), _Handler)
        self._server.channel = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="spark-train-log-server",
            daemon=True,
        )

    @property
    def address(self) -> str:
        """``host:port`` that ranks connect to."""
        return f"{self._advertise}:{self._server.server_address[1]}"

    def __enter__(self) -> ChannelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, cut open connections and join the server thread (bounded)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in list(self._open):
                _shutdown(sock)
        self._thread.join(timeout_s)

    def wait_finished(self, ranks: int | None, timeout_s: float) -> bool:
        """Wait until no connection is open and, if ``ranks`` is given, that many ranks said bye.

        Returns False when ``timeout_s`` passed with no message arriving: the wait goes on
        while the ranks' last records still drain (at 32 ranks logging flat out, a fixed
        10 s bound dropped 11,326 of 295,873 records: bench/RESULTS.md, Scale).
        """

        def done() -> bool:
            return not self._open and (ranks is None or len(self._finished) >= ranks)

        with self._lock:
            while not done():
                idle = time.monotonic() - self._heard
                if idle >= timeout_s:
                    return False
                self._lock.wait(timeout_s - idle)
            return True

    def _serve(self, sock: socket.socket, reader: Any) -> None:
        sock.settimeout(_HELLO_TIMEOUT_S)
        hello = _read(reader)
        token = b"" if hello is None else str(hello.get("token", "")).encode("utf-8", "replace")
        if hello is None or not hmac.compare_digest(token, self._token.encode()):
            log.warning("log server: rejected a connection without the run token")
            return
        sock.settimeout(None)
        rank = int(hello.get("rank", -1))
        with self._lock:
            self._open.add(sock)
        try:
            while (msg := _read(reader)) is not None:
                self._heard = time.monotonic()  # (a plain store: no lock per message)
                if msg.get("t") == "bye":
                    with self._lock:
                        self._finished.add(rank)
                    break
                reply = self._on_message(rank, msg)
                if reply is not None:
                    sock.sendall(reply if isinstance(reply, bytes) else encode(reply))
        finally:
            with self._lock:
                self._open.discard(sock)
                self._lock.notify_all()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Every rank connects at the start of a launch: socketserver's default backlog of 5
    # overflows from about 16 ranks on, and the kernel then resets or delays connections
    # (the listen queue is capped at net.core.somaxconn, 4096 on current kernels).
    request_queue_size = _BACKLOG
    channel: ChannelServer


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.channel._serve(self.request, self.rfile)


def encode(msg: Message) -> bytes:
    """``msg`` as it travels: one JSON line (an answer the same for many ranks, once)."""
    return (json.dumps(msg, default=str) + "\n").encode()


def _read(reader: Any) -> Message | None:
    """The next message, or None at the end of the stream or on garbage."""
    try:
        return _read_or_raise(reader)
    except (OSError, ValueError):
        return None


def _read_or_raise(reader: Any) -> Message:
    try:
        line = reader.readline(_MAX_LINE)
    except TimeoutError:
        raise TimeoutError("no answer from the driver in time") from None
    if not line:
        raise ConnectionError("the driver closed the connection")
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError(f"not a channel message: {line[:200]!r}")
    return msg


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


class ChannelClient:
    """One rank's connection to the driver. Thread-safe; a broken connection drops messages."""

    def __init__(
        self, address: str, token: str, rank: int, timeout_s: float = _SEND_TIMEOUT_S
    ) -> None:
        host, _, port = address.rpartition(":")
        self._pid = os.getpid()
        self._lock = threading.Lock()
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        sock.settimeout(timeout_s)
        self._sock: socket.socket | None = sock
        self._reader = sock.makefile("rb")
        self.send({"token": token, "rank": rank})

    @property
    def usable(self) -> bool:
        """False once the connection broke, was closed, or this is a forked child's copy."""
        return self._sock is not None and os.getpid() == self._pid

    def request(self, msg: Message, timeout_s: float) -> Message:
        """Send ``msg`` and wait up to ``timeout_s`` for the driver's answer.

        Only one thread may make requests. Raises ``ConnectionError`` when the connection
        is (or becomes) unusable and ``TimeoutError`` when no answer came in time.
        """
        self.send(msg)
        sock = self._sock
        if not self.usable or sock is None:
            raise ConnectionError("the connection to the driver is closed")
        sock.settimeout(timeout_s)  # affects sends too, until restored below
        try:
            reply = _read_or_raise(self._reader)
        finally:
            sock.settimeout(_SEND_TIMEOUT_S)
        return reply

    def send(self, msg: Message) -> None:
        """Send one message; on a socket error the client goes quiet instead of raising."""
        data = encode(msg)
        with self._lock:
            if not self.usable:
                return
            assert self._sock is not None
            try:
                self._sock.sendall(data)
            except OSError:
                self._sock.close()
                self._sock = None

    def close(self) -> None:
        """Say bye (so the driver knows nothing more is coming) and close."""
        if os.getpid() != self._pid:
            return
        self.send({"t": "bye"})
        with self._lock:
            self._reader.close()
            if self._sock is not None:
                _shutdown(self._sock)
                self._sock.close()
                self._sock = None


_client: ChannelClient | None = None
_client_lock = threading.Lock()


def install_client(client: ChannelClient | None) -> None:
    """Make ``client`` this process's channel (the launcher does this around a rank)."""
    global _client
    with _client_lock:
        _client = client


def active_client() -> ChannelClient | None:
    """The channel from this process to the driver, or None (not a launcher rank's process)."""
    with _client_lock:
        client = _client
    return client if client is not None and client.usable else None
