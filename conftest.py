"""Helpers and fixtures shared by the test files; each is defined here once.

The fake server's own pytest plugin (fixtures ``pop3_server``, ``make_pop3_server``,
``pop3_ca_file``) is loaded for the whole suite, so the tests use it the way its users do.
Helpers that are not fixtures are imported by name: ``from conftest import scripted``.
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

import pop3lite

if TYPE_CHECKING:
    from fakeserver import FakeServer, Maildrop

try:
    import tracemalloc
except ImportError:  # PyPy: memory bounds are not measured there, behaviour still is
    tracemalloc = None  # type: ignore[assignment]

# fakeserver itself is imported inside the helpers below: imported here, before pytest loads it as
# a plugin, its asserts could not be rewritten (pytest warns).
pytest_plugins = ["fakeserver"]

TIMEOUT = 5.0  # every socket in the tests gives up after this long
MakeServer = Callable[..., "FakeServer"]  # the type of the plugin's make_pop3_server fixture
MiB = 1024 * 1024
SLACK = 2.0  # how far past its timeout a client may be (scheduling, not speed)
# POP3LITE_SOAK=N multiplies every random case count of the hostile-input tests by N.
SOAK = max(1, int(os.environ.get("POP3LITE_SOAK") or "1"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def address(server: FakeServer) -> str:
    """HOST:PORT of a server, as the command lines take it."""
    return f"{server.host}:{server.port}"


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll a condition that another thread makes true (bounded; no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty home directory: no ~/.netrc, no saved state of the person running the tests."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def cli_environment(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """For the command line in-process: HOME is ``home`` (returned), no inherited password, a
    wide table, a stdin that is not a terminal."""
    import io
    import sys

    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("POP3_PASSWORD", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return home


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """pop3lite.main(argv) in-process: (exit status, stdout, stderr); never a traceback."""
    status = pop3lite.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


# =============================================================================================
# A scripted peer: the server side of one connection, exact bytes both ways (client tests)
# =============================================================================================


class Peer:
    """The server side of one connection, driven by a test's script function."""

    def __init__(self, conn: socket.socket, stop: threading.Event) -> None:
        self.conn = conn
        self.stop = stop  # set when the test is done: trickling and holding scripts end
        self.buf = b""

    def send(self, data: bytes | memoryview) -> bool:
        """Send; False if the client has gone."""
        try:
            self.conn.sendall(data)
        except OSError:
            return False
        return True

    def send_bytewise(self, data: bytes) -> None:
        for i in range(len(data)):
            self.conn.sendall(data[i : i + 1])

    def line(self) -> bytes:
        """The next command line (CRLF included), or b"" when the client closed."""
        for _ in range(10000):
            if b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                return line + b"\n"
            try:
                chunk = self.conn.recv(65536)
            except OSError:
                return b""
            if not chunk:
                return b""
            self.buf += chunk
        raise AssertionError("no line from the client")

    def expect(self, command: bytes, reply: bytes) -> None:
        got = self.line()
        assert got == command, (got, command)
        self.send(reply)

    def eof(self) -> bool:
        """True if the client closed the connection without sending anything more."""
        if self.buf:
            return False
        try:
            return self.conn.recv(1) == b""
        except ConnectionResetError:
            return True

    def trickle(self, data: bytes, every: float = 0.02) -> None:
        """Send ``data`` one byte at a time, then keep sending ``data[-1:]``, until stopped."""
        for index in range(100000):
            if self.stop.wait(every):
                return
            piece = data[index : index + 1] or data[-1:]
            if not self.send(piece):
                return

    def hold(self) -> None:
        """Say nothing more; wait until the test is done or the client closes."""
        self.conn.settimeout(0.05)
        while not self.stop.is_set():
            try:
                if not self.conn.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
                return


@contextlib.contextmanager
def scripted(script: Callable[[Peer], None]) -> Iterator[int]:
    """Run ``script`` as the server of one loopback connection; yield the port.

    An assertion or error in the script fails the test at the end of the block."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                script(Peer(conn, stop))
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(TIMEOUT * 2)
        listener.close()
    assert not thread.is_alive(), "scripted server did not finish"
    if errors:
        raise errors[0]


def message_top(message: bytes, lines: int) -> bytes:
    """What TOP returns: the header, the empty line, and the first ``lines`` body lines."""
    header, _, body = message.partition(b"\r\n\r\n")
    kept = body.split(b"\r\n")[:-1][:lines]
    return header + b"\r\n\r\n" + b"".join(line + b"\r\n" for line in kept)


def connect(port: int, **kwargs: Any) -> pop3lite.POP3:
    """A pop3lite client for a scripted peer: plaintext, loopback, short timeout."""
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("tls", "none")
    return pop3lite.POP3("127.0.0.1", port, **kwargs)


# =============================================================================================
# A raw client: the other side of server tests (never pop3lite: the server must be right alone)
# =============================================================================================


class RawClient:
    """A raw-socket POP3 client: sends what it is told, reads lines or everything, and never
    trusts the server to answer (every read is bounded by the timeout)."""

    def __init__(self, server: FakeServer | tuple[str, int], timeout: float = TIMEOUT) -> None:
        address = server if isinstance(server, tuple) else server.address
        self.sock: socket.socket = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def start_tls(self, hostname: str = "localhost") -> None:
        """Wrap the connection in TLS (the fake server's test CA) and read through it."""
        import fakeserver

        self.sock = fakeserver.client_context().wrap_socket(self.sock, server_hostname=hostname)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> bool:
        """Send; False if the server has already hung up."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def line(self) -> bytes:
        """One line without its CRLF; b"<EOF>" at the end of input."""
        data = self.file.readline(100000)
        if not data:
            return b"<EOF>"
        assert data.endswith(b"\r\n"), data
        return data[:-2]

    def cmd(self, command: str) -> str:
        self.send(command.encode() + b"\r\n")
        return self.line().decode()

    def body(self) -> list[bytes]:
        """The lines of a multi-line reply up to the ".", as sent (still dot-stuffed)."""
        lines: list[bytes] = []
        for _ in range(100000):
            line = self.line()
            assert line != b"<EOF>"
            if line == b".":
                return lines
            lines.append(line)
        raise AssertionError("no terminator")

    def eof(self) -> bool:
        return self.file.read(1) == b""

    def until_eof(self, limit: int = 64 * MiB) -> bytes:
        """Everything the server sends until it closes (bounded)."""
        data = bytearray()
        for _ in range(100000):
            try:
                chunk = self.file.read1(65536)
            except ConnectionResetError:
                break
            if not chunk or len(data) > limit:
                break
            data += chunk
        return bytes(data)

    def reset(self) -> None:
        """Vanish: close with a TCP reset (SO_LINGER 0), no FIN, nothing more sent."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


def login(client: RawClient, user: str = "hogehoge", password: str = "fugafuga") -> None:
    """Read the greeting and log in with USER and PASS."""
    assert client.line().startswith(b"+OK")
    assert client.cmd("USER " + user).startswith("+OK")
    assert client.cmd("PASS " + password).startswith("+OK")


# =============================================================================================
# Maildrops and memory
# =============================================================================================


def peak_memory(call: Callable[[], Any]) -> tuple[Any, int | None]:
    """Call; return what it returned or raised, and the peak of memory allocated meanwhile
    (None where tracemalloc is missing)."""
    if tracemalloc is not None:
        tracemalloc.start()
    try:
        try:
            result: Any = call()
        except pop3lite.Error as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1] if tracemalloc is not None else None
    finally:
        if tracemalloc is not None:
            tracemalloc.stop()


def raw_login(server: FakeServer, user: str, password: str) -> bytes:
    """USER and PASS over a raw socket; the answer to PASS (without CRLF). The connection is
    then dropped (no QUIT, so no UPDATE)."""
    with RawClient(server) as client:
        assert client.line().startswith(b"+OK")
        client.send(b"USER %s\r\nPASS %s\r\n" % (user.encode(), password.encode()))
        client.line()
        return client.line()


def unlocked(drop: Maildrop, user: str = "hogehoge") -> None:
    """Poll until a login to ``drop`` succeeds (not -ERR [IN-USE]) on a second server without
    faults that serves the same Maildrop object: the lock of a session that went is released."""
    from fakeserver import FakeServer

    with FakeServer(users={user: drop}) as checker:
        deadline = time.monotonic() + TIMEOUT
        for _ in range(10000):
            answer = raw_login(checker, user, drop.password)
            if answer.startswith(b"+OK"):
                return
            assert answer.startswith(b"-ERR [IN-USE]"), answer
            assert time.monotonic() < deadline, "the maildrop stayed locked"
            time.sleep(0.005)


def operamail_drop() -> Maildrop:
    import fakeserver

    return fakeserver.Maildrop("fugafuga", fakeserver.OPERAMAIL_MESSAGES,
                               uids=fakeserver.OPERAMAIL_UIDS)
