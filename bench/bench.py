#!/usr/bin/env python3
"""Benchmark pop3lite against poplib and a plain one-buffer reader (issues 7 and 11).

    python3 bench/bench.py            # full run: 50 MB, 1000 x 4 KB, 5 rounds (about a minute)
    python3 bench/bench.py --quick    # smaller sizes, 1 round (a few seconds)
    python3 bench/bench.py --before 93956e7   # also that revision's pop3lite, in the same run

A local POP3 server runs in this process: every response is rendered and dot-stuffed before the
first client connects, so serving is a lookup and a sendall; its ceiling is measured and printed.
A round trip is simulated by sending each response no earlier than its command's arrival plus the
delay, so a batch of pipelined commands costs about one delay, as on a real network.
Each client runs in a process of its own (timing without tracemalloc; one more run with
tracemalloc for peak memory), clients interleaved, several rounds; medians and the ratios between
them come from the same run. Every result is checked with SHA-256 against the server's messages.
Modules are imported before the clock starts (import time is measured on its own). The plain
reader is the reference of issue 11: recv_into one bytearray pre-sized from "+OK n octets", one
find for the terminator once the announced octets are in, one replace, all RETRs sent at once;
for the session over a round trip (issue 18) it sends USER, PASS and STAT in one write.
Standard library only; runs on CPython 3.7+ and PyPy.
"""

# SPDX-License-Identifier: MIT
from __future__ import annotations

import argparse
import atexit
import base64
import datetime
import hashlib
import json
import os
import platform
import queue
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from inspect import signature
from typing import Any, Callable, Iterator, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
PASSWORD = "bench-password"
SOCKET_TIMEOUT = 120.0
CLIENT_TIMEOUT = 600.0  # seconds for one client process

# ------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------


_POOL: list[bytes] = []


def line_pool() -> list[bytes]:
    """509 body lines of 76 characters as in base64 bodies, made once.

    One line in fifty starts with a dot and a few are a lone dot or empty, so dot-stuffing is
    exercised more often than in real mail.
    """
    if not _POOL:
        rng = random.Random(7)
        for i in range(509):
            line = base64.b64encode(bytes(rng.getrandbits(8) for _ in range(57)))
            if i % 50 == 0:
                line = b"." + line[1:]
            elif i % 97 == 1:
                line = b"."
            elif i % 89 == 2:
                line = b""
            _POOL.append(line + b"\r\n")
    return _POOL


def make_message(number: int, size: int) -> bytes:
    """A deterministic RFC 5322 message of at least ``size`` octets with CRLF line ends.

    A 50 MB message has about 650 000 lines, as many line objects as poplib makes of it.
    """
    header = (
        "From: Bench Sender <sender@example.invalid>\r\n"
        "To: Bench Receiver <receiver@example.invalid>\r\n"
        "Subject: benchmark message %d\r\n"
        "Message-ID: <%d.%d@bench.invalid>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n" % (number, number, size)
    ).encode("ascii")
    pool = line_pool()
    lines = [header]
    total = len(header)
    i = number * 31
    while total < size:
        line = pool[i % len(pool)]
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


def dot_stuff(message: bytes) -> bytes:
    """The message as it goes on the wire in a multi-line response, terminator included."""
    stuffed = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


class Mailbox(NamedTuple):
    responses: list[bytes]  # pre-rendered RETR responses, index 0 is message 1
    sizes: list[int]
    digests: list[str]  # SHA-256 of each message


def make_mailbox(count: int, size: int) -> Mailbox:
    responses, sizes, digests = [], [], []
    for number in range(1, count + 1):
        message = make_message(number, size)
        sizes.append(len(message))
        digests.append(hashlib.sha256(message).hexdigest())
        responses.append(b"+OK %d octets\r\n" % len(message) + dot_stuff(message))
    return Mailbox(responses, sizes, digests)


def digest_of_many(digests: list[str]) -> str:
    """What a client reports for several messages: SHA-256 over their SHA-256s, in order."""
    return hashlib.sha256("".join(digests).encode("ascii")).hexdigest()


# ------------------------------------------------------------------------------------------------
# Server
# ------------------------------------------------------------------------------------------------


class BenchServer:
    """A minimal, fast POP3 server on 127.0.0.1; the user name picks the mailbox.

    With ``delay`` > 0 each connection has a reader thread that stamps every command with its
    arrival time and a writer thread that sends the response no earlier than arrival + delay.
    """

    def __init__(self, mailboxes: dict[str, Mailbox], delay: float = 0.0) -> None:
        self.mailboxes = mailboxes
        self.delay = delay
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.port: int = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> BenchServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        try:
            # Wake the accept() call.
            socket.create_connection((HOST, self.port), timeout=5).close()
        except OSError:
            pass
        self._thread.join(10)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._closing:
            conn, _ = self.listener.accept()
            if self._closing:
                conn.close()
                break
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(SOCKET_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.delay > 0:
                self._serve_delayed(conn)
            else:
                self._serve_direct(conn)
        except (OSError, ValueError) as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def _commands(self, conn: socket.socket) -> Iterator[tuple[float, list[bytes]]]:
        """Yields (arrival time, complete command lines) for each recv()."""
        pending = b""
        while True:
            data = conn.recv(262144)
            arrival = time.monotonic()
            if not data:
                return
            pending += data
            if len(pending) > 1 << 20:
                raise ValueError("client sent over 1 MB without a line end")
            *lines, pending = pending.split(b"\n")
            yield arrival, [line.rstrip(b"\r") for line in lines]

    def _serve_direct(self, conn: socket.socket) -> None:
        session = Session(self.mailboxes)
        conn.sendall(session.greeting)
        for _, lines in self._commands(conn):
            batch: list[bytes] = []
            size = 0
            for line in lines:
                response = session.respond(line)
                if len(response) > 65536:
                    if batch:
                        conn.sendall(b"".join(batch))
                        batch, size = [], 0
                    conn.sendall(response)
                else:
                    batch.append(response)
                    size += len(response)
                    if size > 262144:
                        conn.sendall(b"".join(batch))
                        batch, size = [], 0
                if session.done:
                    break
            if batch:
                conn.sendall(b"".join(batch))
            if session.done:
                return

    def _serve_delayed(self, conn: socket.socket) -> None:
        session = Session(self.mailboxes)
        outbox: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
        outbox.put((time.monotonic() + self.delay, session.greeting))  # the connect round trip
        writer = threading.Thread(target=self._writer, args=(conn, outbox), daemon=True)
        writer.start()
        try:
            for arrival, lines in self._commands(conn):
                for line in lines:
                    outbox.put((arrival + self.delay, session.respond(line)))
                    if session.done:
                        return
        finally:
            outbox.put(None)
            writer.join(SOCKET_TIMEOUT)

    def _writer(self, conn: socket.socket, outbox: queue.Queue[tuple[float, bytes] | None]) -> None:
        try:
            while True:
                item = outbox.get(timeout=SOCKET_TIMEOUT)
                if item is None:
                    return
                due, response = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                batch = [response]
                size = len(response)
                # Send everything else that is due now in the same call.
                while size < 262144:
                    try:
                        nxt = outbox.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        conn.sendall(b"".join(batch))
                        return
                    if nxt[0] > time.monotonic():
                        conn.sendall(b"".join(batch))
                        batch, size = [], 0
                        wait = nxt[0] - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    batch.append(nxt[1])
                    size += len(nxt[1])
                conn.sendall(b"".join(batch))
        except (OSError, queue.Empty) as exc:
            self.errors.append(exc)


class Session:
    """The POP3 state of one connection: USER/PASS, then the transaction commands."""

    greeting = b"+OK bench POP3 server ready <1.1@bench.invalid>\r\n"
    capa = b"+OK capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\nPIPELINING\r\n.\r\n"

    def __init__(self, mailboxes: dict[str, Mailbox]) -> None:
        self.mailboxes = mailboxes
        self.user: str | None = None
        self.box: Mailbox | None = None
        self.done = False

    def respond(self, line: bytes) -> bytes:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        args = rest.split()
        if verb == b"QUIT":
            self.done = True
            return b"+OK bye\r\n"
        if verb == b"CAPA":
            return self.capa
        if verb == b"NOOP":
            return b"+OK\r\n"
        if self.box is None:
            if verb == b"USER" and len(args) == 1:
                self.user = args[0].decode("ascii", "replace")
                return b"+OK\r\n"
            if verb == b"PASS" and self.user in self.mailboxes and rest == PASSWORD.encode():
                self.box = self.mailboxes[self.user]
                return b"+OK logged in\r\n"
            self.user = None
            return b"-ERR [AUTH] no\r\n"
        box = self.box
        if verb == b"STAT":
            return b"+OK %d %d\r\n" % (len(box.sizes), sum(box.sizes))
        if verb in (b"LIST", b"UIDL") and not args:
            values = box.sizes if verb == b"LIST" else box.digests
            lines = b"".join(
                b"%d %s\r\n" % (n, str(v).encode("ascii")) for n, v in enumerate(values, 1)
            )
            return b"+OK\r\n" + lines + b".\r\n"
        if verb in (b"RETR", b"LIST", b"UIDL", b"DELE") and len(args) == 1:
            try:
                number = int(args[0])
            except ValueError:
                return b"-ERR bad number\r\n"
            if not 1 <= number <= len(box.sizes):
                return b"-ERR no such message\r\n"
            if verb == b"RETR":
                return box.responses[number - 1]
            if verb == b"LIST":
                return b"+OK %d %d\r\n" % (number, box.sizes[number - 1])
            if verb == b"UIDL":
                return b"+OK %d %s\r\n" % (number, box.digests[number - 1].encode("ascii"))
            return b"+OK marked (nothing is deleted in the benchmark)\r\n"
        if verb == b"RSET":
            return b"+OK\r\n"
        return b"-ERR unknown command\r\n"


# ------------------------------------------------------------------------------------------------
# Clients (each runs in a process of its own: bench.py --client ...)
# ------------------------------------------------------------------------------------------------


class NotAvailable(Exception):
    """The client lacks what the case needs (reported as n/a)."""


class Plain:
    """A tight reference reader (issue 11): one bytearray that recv_into() fills, pre-sized from
    the "+OK n octets" hint; the terminator is looked for once the hinted octets are in (one
    find), and dot-stuffing is removed with one replace. Correct without the hint, only slower.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)
        self.buf = bytearray(1 << 18)
        self.start = 0  # first unread byte
        self.end = 0  # end of received data
        self.status()

    def _recv(self, room: int) -> None:
        """Receives more data, first making ``room`` octets free after the data."""
        if len(self.buf) - self.end < room:
            keep = min(self.start, 2)  # the CRLF before ``start``, which body() searches from
            if self.start > keep:
                size = self.end - self.start + keep
                self.buf[:size] = self.buf[self.start - keep : self.end]
                self.start, self.end = keep, size
            if len(self.buf) - self.end < room:
                bigger = bytearray(self.end + max(room, len(self.buf)))
                bigger[: self.end] = memoryview(self.buf)[: self.end]
                self.buf = bigger
        with memoryview(self.buf) as view:
            n = self.sock.recv_into(view[self.end :])
        if not n:
            raise ConnectionError("server closed the connection")
        self.end += n

    def status(self) -> bytes:
        i = self.buf.find(b"\r\n", self.start, self.end)
        while i < 0:
            searched = max(0, self.end - self.start - 1)  # relative: _recv() may move the data
            self._recv(65536)
            i = self.buf.find(b"\r\n", self.start + searched, self.end)
        line = bytes(self.buf[self.start : i])
        self.start = i + 2
        if not line.startswith(b"+OK"):
            raise RuntimeError("server said %r" % line)
        return line

    def body(self, hint: int = 0) -> bytes:
        """The multi-line body after the status line, dot-stuffing removed. ``hint`` is the
        announced size: the stuffed body and ".CRLF" take at least ``hint`` + 3 octets."""
        want = hint + 3
        if self.end - self.start < want:
            # Room for the rest of the announced size, plus 1/32 for the stuffing dots, so a big
            # message needs one allocation; then receive at least the announced octets.
            self._recv(max(65536, want + hint // 32 + 2 - (self.end - self.start)))
            while self.end - self.start < want:
                self._recv(65536)
        # From the status line's CRLF, so an empty body ("." at ``start``) is found too.
        scanned = -2
        i = self.buf.find(b"\r\n.\r\n", self.start + scanned, self.end)
        while i < 0:  # the hint was low (or absent): search on as data comes in
            scanned = max(self.end - self.start - 4, scanned)
            self._recv(65536)
            i = self.buf.find(b"\r\n.\r\n", self.start + scanned, self.end)
        with memoryview(self.buf) as view:
            data = bytes(view[self.start : i + 2])
        self.start = i + 5
        if data.startswith(b".."):
            data = data[1:]
        return data.replace(b"\r\n..", b"\r\n.")

    @staticmethod
    def octets(status: bytes) -> int:
        match = OCTETS.match(status)
        return int(match.group(1)) if match else 0

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.status()

    def login(self, user: str) -> None:
        """USER, PASS and STAT in one write (the reference of issue 18's session goal)."""
        lines = b"USER %s\r\nPASS %s\r\nSTAT\r\n" % (user.encode(), PASSWORD.encode())
        self.sock.sendall(lines)
        for _ in range(3):
            self.status()

    def retr(self, number: int) -> bytes:
        return self.body(self.octets(self.command(b"RETR %d" % number)))

    def retr_all_pipelined(self, numbers: list[int]) -> Iterator[bytes]:
        """Sends every RETR at once, then reads the responses."""
        self.sock.sendall(b"".join(b"RETR %d\r\n" % n for n in numbers))
        for _ in numbers:
            yield self.body(self.octets(self.status()))

    def quit(self) -> None:
        self.command(b"QUIT")
        self.sock.close()


OCTETS = re.compile(rb"\+OK (\d+) octets")


def run_client(
    client: str, case: str, port: int, user: str, count: int, trace: bool, module: str = REPO
) -> dict[str, Any]:
    """Runs one case with one client; returns timings (seconds), digest and peak memory.
    ``module`` is the directory pop3lite is imported from (another copy for --before)."""
    numbers = list(range(1, count + 1))
    phases: dict[str, float] = {}
    # Modules are imported before the clock starts: import time has a row of its own.
    if client == "poplib":
        import poplib
    elif client == "pop3lite":
        sys.path.insert(0, module)
        try:
            import pop3lite
        except ImportError as exc:
            raise NotAvailable("cannot import pop3lite: %s" % exc) from None
    t0 = time.perf_counter()

    if client == "poplib":
        pop: Any = poplib.POP3(HOST, port, timeout=SOCKET_TIMEOUT)
        pop.user(user)
        pop.pass_(PASSWORD)

        def retr(number: int) -> bytes:
            lines = pop.retr(number)[1]
            return b"\r\n".join(lines) + b"\r\n"

        def many(numbers: list[int]) -> Iterator[bytes]:
            raise NotAvailable("poplib has no pipelining")

        def retr_to(number: int, f: Any) -> int:
            raise NotAvailable("poplib cannot stream")

        def quit() -> None:
            pop.quit()

    elif client == "plain":
        plain = Plain(port)
        plain.login(user)
        retr = plain.retr
        many = plain.retr_all_pipelined

        def retr_to(number: int, f: Any) -> int:
            raise NotAvailable("the plain reader does not stream")

        quit = plain.quit

    elif client == "pop3lite":
        if not hasattr(pop3lite, "POP3"):
            raise NotAvailable("pop3lite has no POP3")
        lite: Any = pop3lite.POP3(HOST, port, tls="none", timeout=SOCKET_TIMEOUT)
        lite.login(user, PASSWORD)

        def retr(number: int) -> bytes:
            if not hasattr(lite, "retr"):
                raise NotAvailable("pop3lite has no retr")
            return bytes(lite.retr(number))

        def many(numbers: list[int]) -> Iterator[bytes]:
            if not hasattr(lite, "retr_many"):
                raise NotAvailable("pop3lite has no retr_many")
            expected = iter(numbers)
            # The session ends with the batch: QUIT may go behind it (where pop3lite has that).
            then_quit = "then_quit" in signature(lite.retr_many).parameters
            options = {"then_quit": True} if then_quit else {}
            for fetched in lite.retr_many(numbers, **options):
                if fetched.error is not None or fetched.number != next(expected):
                    raise RuntimeError("retr_many gave %r" % (fetched[:1] + fetched[2:],))
                yield fetched.data

        def retr_to(number: int, f: Any) -> int:
            if not hasattr(lite, "retr_to"):
                raise NotAvailable("pop3lite has no retr_to")
            return int(lite.retr_to(number, f))

        quit = lite.quit
    else:
        raise SystemExit("unknown client %r" % client)

    phases["login"] = time.perf_counter() - t0
    if trace:
        import tracemalloc

        tracemalloc.start()
        trace = tracemalloc.is_tracing()  # PyPy has the module but does not trace
    digests: list[str] = []
    keep: Any = None
    t1 = time.perf_counter()
    if case == "retr":
        keep = retr(1)
        phases["fetch"] = time.perf_counter() - t1
        digests.append(hashlib.sha256(keep).hexdigest())
    elif case == "retr_to":
        with tempfile.TemporaryFile() as f:
            written = retr_to(1, f)
            phases["fetch"] = time.perf_counter() - t1
            f.seek(0)
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            if written != f.tell():
                raise RuntimeError("retr_to returned %d, wrote %d" % (written, f.tell()))
            digests.append(h.hexdigest())
    elif case == "one":
        keep = [retr(n) for n in numbers]
        phases["fetch"] = time.perf_counter() - t1
        digests = [hashlib.sha256(data).hexdigest() for data in keep]
    elif case == "many":
        keep = list(many(numbers))
        phases["fetch"] = time.perf_counter() - t1
        digests = [hashlib.sha256(data).hexdigest() for data in keep]
    else:
        raise SystemExit("unknown case %r" % case)
    peak = None
    if trace:
        import tracemalloc

        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    del keep
    t2 = time.perf_counter()
    quit()
    phases["quit"] = time.perf_counter() - t2
    return {
        "phases": phases,
        "digest": digest_of_many(digests),
        "count": len(digests),
        "peak": peak,
    }


def run_drain(port: int, user: str, case: str, count: int, expected: int) -> dict[str, Any]:
    """The server's ceiling: send every RETR at once and discard exactly the bytes expected.

    With case "ping": ``count`` NOOPs one at a time, the round trip that no client can beat.
    """
    sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)
    sock.sendall(b"USER %s\r\nPASS %s\r\n" % (user.encode(), PASSWORD.encode()))
    buf = bytearray(1 << 20)
    got = 0
    hello = len(Session.greeting) + len(b"+OK\r\n+OK logged in\r\n")
    while got < hello:
        n = sock.recv_into(buf, hello - got)
        if not n:
            raise ConnectionError("server closed early")
        got += n
    t0 = time.perf_counter()
    if case == "ping":
        for _ in range(count):
            sock.sendall(b"NOOP\r\n")
            if sock.recv_into(buf) != 5:  # "+OK\r\n"
                raise ConnectionError("unexpected answer to NOOP")
        expected = 0
    else:
        sock.sendall(b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1)))
    got = 0
    while got < expected:
        n = sock.recv_into(buf)
        if not n:
            raise ConnectionError("server closed early")
        got += n
    elapsed = time.perf_counter() - t0
    sock.close()
    return {"phases": {"fetch": elapsed}, "digest": "", "count": count, "peak": None}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--expected", type=int, default=0)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--module", default=REPO)
    args = parser.parse_args(argv)
    try:
        if args.client == "drain":
            result = run_drain(args.port, args.user, args.case, args.count, args.expected)
        else:
            result = run_client(
                args.client, args.case, args.port, args.user, args.count, args.trace, args.module
            )
    except NotAvailable as exc:
        result = {"na": str(exc)}
    except Exception as exc:  # reported by the parent, which fails the run
        result = {"error": "%s: %s" % (type(exc).__name__, exc)}
    print("RESULT " + json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------


class Config(NamedTuple):
    rounds: int
    big: int  # octets of the big message
    small: int  # octets of each small message
    messages: int  # number of small messages
    delay: float  # the simulated round trip, seconds
    delay_poplib_messages: int  # poplib does one round trip per message: fewer, then scaled
    import_rounds: int


FULL = Config(5, 50_000_000, 4096, 1000, 0.010, 100, 9)
QUICK = Config(1, 5_000_000, 4096, 300, 0.010, 30, 3)
SELF_CHECK = Config(1, 300_000, 4096, 40, 0.005, 5, 1)


class Case(NamedTuple):
    key: str
    title: str
    case: str  # what the client does: retr, retr_to, one, many
    box: str  # which mailbox (user name)
    delayed: bool
    clients: tuple[str, ...]
    traced: tuple[str, ...]  # clients whose peak memory is measured


CASES = [
    Case(
        "big",
        "{big} retr() -> bytes",
        "retr",
        "big",
        False,
        ("poplib", "plain", "pop3lite"),
        ("poplib", "plain", "pop3lite"),
    ),
    Case("big_to", "{big} retr_to(file)", "retr_to", "big", False, ("pop3lite",), ("pop3lite",)),
    Case(
        "many",
        "{count} x {small} retr_many, no delay",
        "many",
        "small",
        False,
        ("plain", "pop3lite"),
        (),
    ),
    Case(
        "one",
        "{count} x {small} one retr at a time",
        "one",
        "small",
        False,
        ("poplib", "plain", "pop3lite"),
        (),
    ),
    Case(
        "rtt",
        "{count} x {small} over {delay} round trip",
        "many",
        "small",
        True,
        ("poplib", "plain", "pop3lite"),
        (),
    ),
]


class Outcome(NamedTuple):
    seconds: float | None  # median of the case's timed quantity; None when n/a or failed
    peak: int | None
    note: str


def human_size(n: float) -> str:
    if n >= 1e6:
        return "%.0f MB" % (n / 1e6) if n >= 1e7 else "%.1f MB" % (n / 1e6)
    return "%.0f KB" % (n / 1e3) if n >= 1e3 else "%d B" % n


def pop3lite_source(before: str) -> bytes:
    """The pop3lite.py that --before names: a file, or a git revision of this repository."""
    if os.path.isfile(before):
        with open(before, "rb") as f:
            return f.read()
    proc = subprocess.run(
        ["git", "show", before + ":pop3lite.py"], capture_output=True, cwd=REPO, timeout=60
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr.decode("utf-8", "replace").strip())
    return proc.stdout


def with_before(case: Case) -> Case:
    """The case with client 'before' run wherever pop3lite runs."""

    def add(clients: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(
            c for name in clients for c in (("before", name) if name == "pop3lite" else (name,))
        )

    return case._replace(clients=add(case.clients), traced=add(case.traced))


def spawn(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONTRACEMALLOC", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)] + args,
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        env=env,
        cwd=REPO,
    )
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    return {"error": "client exited %d: %s" % (proc.returncode, proc.stderr.decode()[-2000:])}


def import_time(module: str) -> int:
    """Microseconds that `import module` adds after start-up, from -X importtime."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # compare with a warm __pycache__, as poplib has
    env.pop("PYTHONPROFILEIMPORTTIME", None)

    def top_level(code: str) -> dict[str, int]:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            timeout=60,
            env=env,
            cwd=REPO,
        )
        if proc.returncode:
            raise RuntimeError(proc.stderr.decode()[-2000:])
        found: dict[str, int] = {}
        for line in proc.stderr.decode().splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\S.*)$", line)
            if m:  # a name without indentation: imported at the top level
                found[m.group(3)] = found.get(m.group(3), 0) + int(m.group(2))
        return found

    baseline = top_level("pass")
    measured = top_level("import " + module)
    if not measured:
        raise NotAvailable("no -X importtime on this Python")
    return sum(v for k, v in measured.items() if k not in baseline)


def can_trace() -> bool:
    """Whether tracemalloc works here (PyPy has the module but not its C part)."""
    try:
        import tracemalloc

        tracemalloc.start()
        tracing = tracemalloc.is_tracing()
        tracemalloc.stop()
        return tracing
    except ImportError:
        return False


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        return client_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="tiny sizes: check that every client and the harness work (used by the tests)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--before",
        metavar="REV|FILE",
        help="also run another pop3lite, as client 'before': a git revision of this repository "
        "(its pop3lite.py) or a path to a pop3lite.py; the targets are shown for both",
    )
    parser.add_argument(
        "--cases",
        help="comma-separated subset of the cases to run: " + ",".join(c.key for c in CASES),
    )
    args = parser.parse_args(argv)
    config = SELF_CHECK if args.self_check else QUICK if args.quick else FULL
    if args.rounds:
        config = config._replace(rounds=args.rounds)
    mode = "self-check" if args.self_check else "quick" if args.quick else "full"
    started = time.perf_counter()
    cases = CASES
    if args.cases:
        chosen = args.cases.split(",")
        unknown = set(chosen) - {c.key for c in CASES}
        if unknown:
            parser.error("unknown case(s): " + ", ".join(sorted(unknown)))
        cases = [c for c in CASES if c.key in chosen]
    before_dir = None
    if args.before:
        before_dir = tempfile.mkdtemp(prefix="pop3lite-before-")
        atexit.register(shutil.rmtree, before_dir, True)
        try:
            with open(os.path.join(before_dir, "pop3lite.py"), "wb") as f:
                f.write(pop3lite_source(args.before))
        except (OSError, RuntimeError) as exc:
            parser.error("--before %s: %s" % (args.before, exc))
        cases = [with_before(c) for c in cases]
    modules = {"before": before_dir or REPO}

    print(
        "pop3lite benchmark: %s %s on %s %s, %d CPUs, %s, mode %s, %d round%s%s"
        % (
            platform.python_implementation(),
            platform.python_version(),
            platform.system(),
            platform.machine(),
            os.cpu_count() or 0,
            datetime.date.today().isoformat(),
            mode,
            config.rounds,
            "" if config.rounds == 1 else "s",
            "" if not args.before else "; 'before' is pop3lite.py of %s" % args.before,
        )
    )
    names = {
        "big": human_size(config.big),
        "small": human_size(config.small),
        "count": str(config.messages),
        "delay": "%g ms" % (config.delay * 1000),
    }
    boxes = {
        "big": make_mailbox(1, config.big),
        "small": make_mailbox(config.messages, config.small),
    }
    expected = {
        "big": digest_of_many(boxes["big"].digests),
        "small": digest_of_many(boxes["small"].digests),
        "small_poplib_rtt": digest_of_many(boxes["small"].digests[: config.delay_poplib_messages]),
    }
    problems: list[str] = []
    with BenchServer(boxes) as fast, BenchServer(boxes, config.delay) as slow:
        # The server's ceiling.
        def drain(box: str, case: str, count: int, expected: int) -> float:
            """The best of a few runs of the discarding client, in seconds."""
            command = ["--client", "drain", "--case", case, "--port", str(fast.port)]
            command += ["--user", box, "--count", str(count), "--expected", str(expected)]
            runs = [spawn(command) for _ in range(1 if args.self_check else 3)]
            times = [r["phases"]["fetch"] for r in runs if "phases" in r]
            if not times:
                problems.append("server ceiling: %s" % runs[0].get("error"))
                return float("nan")
            return float(min(times))

        big_bytes = len(boxes["big"].responses[0])
        small_bytes = sum(len(r) for r in boxes["small"].responses)
        ceiling_big = big_bytes / drain("big", "retr", 1, big_bytes)
        ceiling_small = config.messages / drain("small", "retr", config.messages, small_bytes)
        ping = drain("small", "ping", 2000 if args.self_check else 10000, 0) / (
            2000 if args.self_check else 10000
        )
        print(
            "server ceiling (a client that discards the bytes): %.0f MB/s for %s; %.0fk msg/s "
            "for %d x %s pipelined; %.0f us per NOOP round trip"
            % (
                ceiling_big / 1e6,
                names["big"],
                ceiling_small / 1e3,
                config.messages,
                names["small"],
                ping * 1e6,
            )
        )

        samples: dict[tuple[str, str], list[float]] = {}
        peaks: dict[tuple[str, str], int | None] = {}
        notes: dict[tuple[str, str], str] = {}
        imports: dict[str, list[int]] = {"pop3lite": [], "poplib": []}

        def run(case: Case, client: str, trace: bool) -> None:
            key = (case.key, client)
            if key in notes and (notes[key].startswith("n/a") or notes[key].startswith("FAILED")):
                return
            server = slow if case.delayed else fast
            count = 1 if case.box == "big" else config.messages
            want = expected[case.box]
            if case.delayed and client == "poplib":
                count = config.delay_poplib_messages
                want = expected["small_poplib_rtt"]
            what = "one" if client == "poplib" and case.case == "many" else case.case
            command = [
                "--client",
                "pop3lite" if client == "before" else client,
                "--case",
                what,
                "--port",
                str(server.port),
                "--user",
                case.box,
                "--count",
                str(count),
            ]
            if client in modules:
                command += ["--module", modules[client]]
            result = spawn(command + (["--trace"] if trace else []))
            if "na" in result:
                notes[key] = "n/a (%s)" % result["na"]
                if args.self_check and client == "pop3lite":  # the check must cover pop3lite
                    problems.append("%s / %s: %s" % (case.key, client, notes[key]))
                return
            if "error" in result:
                notes[key] = "FAILED: " + result["error"]
                problems.append("%s / %s: %s" % (case.key, client, result["error"]))
                return
            if result["digest"] != want or result["count"] != count:
                notes[key] = "FAILED: wrong data (hash mismatch)"
                problems.append("%s / %s: hash mismatch" % (case.key, client))
                return
            if trace:
                peaks[key] = result["peak"]
                return
            phases = result["phases"]
            if case.delayed:
                seconds = (
                    phases["login"] + phases["fetch"] * config.messages / count + phases["quit"]
                )
                if count != config.messages:
                    notes[key] = "%d messages measured, fetch time scaled x%g" % (
                        count,
                        config.messages / count,
                    )
            else:
                seconds = phases["fetch"]
            samples.setdefault(key, []).append(seconds)

        for module in imports:  # warm __pycache__ before measuring
            try:
                import_time(module)
            except (RuntimeError, NotAvailable):
                pass
        for round_number in range(config.rounds):
            for case in cases:
                clients = list(case.clients)
                shift = round_number % len(clients)
                for client in clients[shift:] + clients[:shift]:  # interleaved, order rotated
                    run(case, client, trace=False)
            for module in (
                ("pop3lite", "poplib") if round_number % 2 == 0 else ("poplib", "pop3lite")
            ):
                for _ in range(max(1, config.import_rounds // config.rounds)):
                    try:
                        imports[module].append(import_time(module))
                    except NotAvailable as exc:
                        notes[("import", module)] = "n/a (%s)" % exc
                        break
                    except RuntimeError as exc:
                        notes[("import", module)] = "FAILED: " + str(exc).strip().splitlines()[-1]
                        problems.append("import %s: %s" % (module, notes[("import", module)]))
                        break
        if can_trace():
            for case in cases:
                for client in case.traced:
                    run(case, client, trace=True)
        else:
            print("peak memory: n/a (tracemalloc does not work on this Python)")
        errors = list(fast.errors) + list(slow.errors)

    results: dict[tuple[str, str], Outcome] = {}
    for case in cases:
        for client in case.clients:
            key = (case.key, client)
            times = samples.get(key)
            results[key] = Outcome(
                median(times) if times else None, peaks.get(key), notes.get(key, "")
            )

    # The table of measurements.
    print()
    print("%-36s %-9s %10s %16s %16s  %s" % ("case", "client", "median", "rate", "peak memory", ""))
    for case in cases:
        title = case.title.format(**names)
        for client in case.clients:
            out = results[(case.key, client)]
            if out.seconds is None:
                print("%-36s %-9s %10s %16s %16s  %s" % (title, client, "-", "-", "-", out.note))
                continue
            if case.box == "big":
                rate = "%.0f MB/s" % (config.big / out.seconds / 1e6)
            elif case.delayed:
                rate = "session"
            else:
                rate = "%.0f msg/s" % (config.messages / out.seconds)
            memory = "-"
            if out.peak is not None:
                memory = human_size(out.peak)
                if case.box == "big":
                    memory += " (%.2fx)" % (out.peak / config.big)
            print(
                "%-36s %-9s %9.3fs %16s %16s  %s"
                % (title, client, out.seconds, rate, memory, out.note)
            )
    samples_median = {k: v.seconds for k, v in results.items() if v.seconds is not None}
    import_medians = {
        m: median([float(v) for v in imports[m]]) if imports[m] else None for m in imports
    }
    for module in ("pop3lite", "poplib"):
        value = import_medians[module]
        note = notes.get(("import", module), "")
        shown = "%8.1f ms" % (value / 1000) if value is not None else "-"
        print(
            "%-36s %-9s %10s %16s %16s  %s"
            % ("import (-X importtime)", module, shown, "", "", note)
        )

    # The targets of issues 7 and 11, for pop3lite and (with --before) the other copy.
    def sec(case: str, client: str) -> float | None:
        out = results.get((case, client))
        return out.seconds if out else None

    def peak(case: str, client: str) -> int | None:
        out = results.get((case, client))
        return out.peak if out else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    big, cnt, rtt = names["big"], names["count"], names["delay"]

    def targets(lite: str) -> list[tuple[str, str, float | None, Callable[[float], bool], str]]:
        """(case, target, measured value, pass test, unit) for the pop3lite client ``lite``.
        Speed ratios say how many times faster pop3lite is: the other client's time divided
        by pop3lite's; the session row is the other way round (pop3lite's time over plain's)."""
        big_peak, to_peak = peak("big", lite), peak("big_to", lite)
        return [
            (
                f"{big} retr()",
                ">= 0.8x plain reader",
                ratio(sec("big", "plain"), sec("big", lite)),
                lambda r: r >= 0.8,
                "x",
            ),
            (
                f"{big} retr()",
                ">= 3x poplib",
                ratio(sec("big", "poplib"), sec("big", lite)),
                lambda r: r >= 3,
                "x",
            ),
            (
                f"{big} retr()",
                "peak <= 2.1x message",
                big_peak and big_peak / config.big,
                lambda r: r <= 2.1,
                "x",
            ),
            (
                f"{big} retr_to(file)",
                ">= 0.8x plain reader's rate",
                ratio(sec("big", "plain"), sec("big_to", lite)),
                lambda r: r >= 0.8,
                "x",
            ),
            (
                f"{big} retr_to(file)",
                "peak < 4 MB",
                to_peak and to_peak / 1e6,
                lambda r: r < 4.0,
                " MB",
            ),
            (
                f"{cnt} retr_many",
                ">= 0.8x pipelined plain",
                ratio(sec("many", "plain"), sec("many", lite)),
                lambda r: r >= 0.8,
                "x",
            ),
            (
                f"{cnt} retr_many",
                ">= 10x poplib (issue 7)",
                ratio(sec("one", "poplib"), sec("many", lite)),
                lambda r: r >= 10,
                "x",
            ),
            (
                f"{cnt} one retr at a time",
                ">= 1.5x poplib",
                ratio(sec("one", "poplib"), sec("one", lite)),
                lambda r: r >= 1.5,
                "x",
            ),
            (
                f"{cnt} over {rtt} RTT",
                "session <= 1.5x plain's time",
                ratio(sec("rtt", lite), sec("rtt", "plain")),
                lambda r: r <= 1.5,
                "x",
            ),
            (
                f"{cnt} over {rtt} RTT",
                ">= 50x poplib",
                ratio(sec("rtt", "poplib"), sec("rtt", lite)),
                lambda r: r >= 50,
                "x",
            ),
            (
                "import pop3lite",
                "below import poplib",
                ratio(import_medians["pop3lite"], import_medians["poplib"])
                if lite == "pop3lite"
                else None,
                lambda r: r < 1.0,
                "x",
            ),
        ]

    # The server is not the bottleneck: its ceiling against the fastest client measured.
    fastest_big = min(
        (t for k, t in samples_median.items() if k[0] in ("big", "big_to")), default=0
    )
    fastest_many = min((t for k, t in samples_median.items() if k[0] == "many"), default=0)
    if fastest_big and fastest_many:
        print(
            "server headroom: its ceiling is %.1fx the fastest client's rate for %s, %.1fx for "
            "%s x %s pipelined"
            % (
                ceiling_big * fastest_big / config.big,
                big,
                ceiling_small * fastest_many / config.messages,
                cnt,
                names["small"],
            )
        )
    print()
    print(
        "Targets of issues 7 and 11 (ratios from this run%s)"
        % (
            ""
            if mode == "full"
            else "; %s mode uses smaller sizes, so only the full run counts" % mode
        )
    )
    lites = ["before", "pop3lite"] if args.before else ["pop3lite"]
    rows = {lite: targets(lite) for lite in lites}
    print("%-28s %-30s" % ("case", "target") + "".join(" %16s" % lite for lite in lites))
    failed = 0
    for index, (case_name, target, *_) in enumerate(rows["pop3lite"]):
        shown = []
        for lite in lites:
            _, _, value, check, unit = rows[lite][index]
            if value is None:
                shown.append("-")
                continue
            ok = check(value)
            if lite == "pop3lite":
                failed += not ok
            shown.append("%.2f%s %s" % (value, unit, "PASS" if ok else "FAIL"))
        print("%-28s %-30s" % (case_name, target) + "".join(" %16s" % v for v in shown))

    for error in errors:
        problems.append("server: %s: %s" % (type(error).__name__, error))
    print()
    print("finished in %.1f s" % (time.perf_counter() - started))
    if problems:
        print("CORRECTNESS PROBLEMS:")
        for problem in problems:
            print("  " + problem)
        return 1
    print(
        "self-check: ok (every result matched its hash)"
        if args.self_check
        else "every result matched its hash; %d target%s failed"
        % (failed, "" if failed == 1 else "s")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
