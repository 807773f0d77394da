"""Hostile input (issue 8): the client survives any server.

Client side. Good sessions are recorded from fakeserver.py over a raw socket (the OperaMail seed,
a CAPA + UIDL + LIST session, a pipelined RETR batch, SASL exchanges), then replayed by one
in-process server thread on one reused listening socket, whole, cut at every byte, and changed
by a seeded mutator (`random.Random(seed)`: byte flips, inserted CR/LF/NUL/8-bit bytes,
duplicated and dropped lines, wrong status tokens, huge and negative numbers, bad UIDs...).
`Model` states, as plainly as possible over the whole byte stream, what the client must make of
those bytes: every call's value or error is compared with it, and every error must be a
pop3lite.Error. Targeted tests cover timeouts (a server that stops mid-line, trickles, never
sends the final "."), memory (a 10 GB announced size, endless lines and responses, checked with
tracemalloc) and deletions (nothing marked is committed when a session fails).

The fake server's side (hostile clients) is in test_fakeserver_hostile.py.

Soak mode: ``POP3LITE_SOAK=N`` (default 1) multiplies every random case count by N, and with
N > 1 the long sessions are cut at every byte instead of at every line boundary and a sample.
Seeds are fixed: a failure names its session, mutation and seed, and reruns identically.
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import base64
import io
import queue
import random
import re
import socket
import threading
import time
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import pytest

import fakeserver
import pop3lite
from conftest import (
    SLACK,
    SOAK,
    TIMEOUT,
    MakeServer,
    MiB,
    Peer,
    connect,
    message_top,
    operamail_drop,
    peak_memory,
    scripted,
    unlocked,
)
from fakeserver import FakeServer, Fault

STALL = 4.0  # a replayed client that sends nothing for this long is taken to be stuck

CRLF = b"\r\n"


# =============================================================================================
# Recorded good sessions: what fakeserver.py sends, reply by reply
# =============================================================================================


class Session(NamedTuple):
    """A recorded session: the server's replies (``replies[0]`` is the greeting, then one per
    command line the client sends) and the calls that make pop3lite send those lines."""

    name: str
    replies: list[bytes]
    calls: list[tuple[Any, ...]]


def read_reply(sock_file: Any, multiline: bool) -> bytes:
    """One reply as raw bytes: a status line, and for a multi-line +OK the body up to "."."""
    data: bytes = sock_file.readline(100000)
    assert data.endswith(b"\n"), data
    if multiline and data.startswith(b"+OK"):
        for _ in range(100000):
            line = sock_file.readline(100000)
            assert line.endswith(b"\n"), line
            data += line
            if line.rstrip(b"\r\n") == b".":
                break
    return data


MULTILINE = {"LIST", "UIDL", "RETR", "TOP", "CAPA"}


def record(server: FakeServer, lines: Sequence[bytes | Callable[[bytes], bytes]]) -> list[bytes]:
    """Send each command line to ``server`` (one at a time) and return the replies, greeting
    first. A callable computes its line from the previous reply (SASL responses)."""
    replies = []
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        sock_file = sock.makefile("rb")
        replies.append(read_reply(sock_file, False))
        for line in lines:
            if callable(line):
                line = line(replies[-1])
            sock.sendall(line)
            words = line.split()
            verb = words[0].decode().upper() if words else ""
            multiline = verb in MULTILINE and not (verb in ("LIST", "UIDL") and len(words) > 1)
            replies.append(read_reply(sock_file, multiline))
        sock_file.close()
    return replies


def sasl_answer(mechanism: pop3lite.Mechanism) -> Callable[[bytes], bytes]:
    """A command line for `record`: the mechanism's answer to the challenge just received."""

    def answer(reply: bytes) -> bytes:
        assert reply.startswith(b"+ "), reply
        response = mechanism.respond(base64.b64decode(reply[2:].strip()))
        return base64.b64encode(response) + CRLF

    return answer


SCRAM_NONCE = "fixed-nonce-for-replay"  # replay needs the same nonce; never do this outside tests


def scram() -> pop3lite.Mechanism:
    return pop3lite.ScramSHA256Mechanism("hogehoge", "fugafuga", _nonce=SCRAM_NONCE)


OPERAMAIL_LINES = [b"CAPA\r\n", b"USER hogehoge\r\n", b"PASS fugafuga\r\n", b"STAT\r\n",
                   b"LIST\r\n", b"UIDL\r\n", b"RETR 1\r\n", b"TOP 2 5\r\n", b"LIST 2\r\n",
                   b"UIDL 1\r\n", b"DELE 1\r\n", b"QUIT\r\n"]
OPERAMAIL_CALLS = [("login", "hogehoge", "fugafuga"), ("stat",), ("list",), ("uidl",),
                   ("retr", 1), ("top", 2, 5), ("list", 2), ("uidl", 1), ("dele", 1), ("quit",)]


def operamail_session() -> Session:
    with FakeServer() as server:
        return Session("operamail", record(server, OPERAMAIL_LINES), OPERAMAIL_CALLS)


def rfc_session() -> Session:
    lines = [b"CAPA\r\n", b"USER hogehoge\r\n", b"PASS fugafuga\r\n", b"CAPA\r\n", b"UIDL\r\n",
             b"LIST\r\n", b"LIST 9\r\n", b"RETR 2\r\n", b"TOP 3 1\r\n", b"RETR 2\r\n",
             b"NOOP\r\n", b"DELE 3\r\n", b"RSET\r\n", b"STAT\r\n", b"QUIT\r\n"]
    calls = [("capa",), ("login", "hogehoge", "fugafuga"), ("capa",), ("uidl",), ("list",),
             ("list", 9), ("retr", 2), ("top", 3, 1), ("retr_to", 2), ("noop",), ("dele", 3),
             ("rset",), ("stat",), ("quit",)]
    with FakeServer("rfc") as server:
        return Session("rfc", record(server, lines), calls)


def pipelined_session() -> Session:
    lines = [b"CAPA\r\n", b"USER hogehoge\r\n", b"PASS fugafuga\r\n", b"RETR 1\r\n",
             b"RETR 2\r\n", b"RETR 3\r\n", b"TOP 3 0\r\n", b"TOP 1 0\r\n", b"DELE 1\r\n",
             b"DELE 2\r\n", b"STAT\r\n", b"QUIT\r\n"]
    calls = [("login", "hogehoge", "fugafuga"), ("retr_many", (1, 2, 3)),
             ("top_many", (3, 1), 0), ("dele_many", (1, 2)), ("stat",), ("quit",)]
    with FakeServer("rfc") as server:
        return Session("pipelined", record(server, lines), calls)


def scram_session() -> Session:
    mechanism = scram()
    first = base64.b64encode(mechanism.initial_response() or b"")
    lines: list[bytes | Callable[[bytes], bytes]] = [
        b"AUTH SCRAM-SHA-256 " + first + CRLF, sasl_answer(mechanism), sasl_answer(mechanism),
        b"STAT\r\n", b"UIDL 2\r\n", b"QUIT\r\n"]
    calls = [("auth", "SCRAM-SHA-256"), ("stat",), ("uidl", 2), ("quit",)]
    with FakeServer("rfc") as server:
        return Session("scram", record(server, lines), calls)


def sasl_session() -> Session:
    """CRAM-MD5 refused (wrong password), XOAUTH2 refused with its JSON error, PLAIN accepted."""
    cram = pop3lite.CramMD5Mechanism("hogehoge", "wrong")
    xoauth2 = pop3lite.XOAuth2Mechanism("hogehoge", "bad-token")
    plain = base64.b64encode(b"\0hogehoge\0fugafuga")
    lines: list[bytes | Callable[[bytes], bytes]] = [
        b"AUTH CRAM-MD5\r\n", sasl_answer(cram),
        b"AUTH XOAUTH2 " + base64.b64encode(xoauth2.initial_response()) + CRLF,
        sasl_answer(xoauth2), b"AUTH PLAIN " + plain + CRLF, b"LIST\r\n", b"QUIT\r\n"]
    calls = [("auth", "CRAM-MD5", "wrong"), ("auth", "XOAUTH2", "bad-token"),
             ("auth", "PLAIN", "fugafuga"), ("list",), ("quit",)]
    with FakeServer("rfc") as server:
        return Session("sasl", record(server, lines), calls)


def lf_session() -> Session:
    """The OperaMail session from a server that ends every line with a bare LF."""
    with FakeServer(faults=[Fault("lf")]) as server:
        replies = record(server, OPERAMAIL_LINES)
    assert all(b"\r" not in reply for reply in replies)
    return Session("lf", replies, OPERAMAIL_CALLS)


_SESSIONS: dict[str, Session] = {}
_SESSION_MAKERS = {
    "operamail": operamail_session,
    "rfc": rfc_session,
    "pipelined": pipelined_session,
    "scram": scram_session,
    "sasl": sasl_session,
    "lf": lf_session,
}


def session(name: str) -> Session:
    """A recorded session, recorded once per test run."""
    if name not in _SESSIONS:
        _SESSIONS[name] = _SESSION_MAKERS[name]()
    return _SESSIONS[name]


# =============================================================================================
# The model: what the client must make of the bytes a server sent
# =============================================================================================
#
# The documented behaviour, stated over the whole stream at once (no buffers, no sockets):
# a status line ends at LF and is at most MAX_RESPONSE_LINE octets (SASL lines MAX_SASL_LINE);
# a CR anywhere but before that LF is not POP3; "+OK" or "-ERR", then nothing or a space; a
# response is framed with the line end of its status line, CRLF or (tolerated) a bare LF, and
# the body of a bare-LF response comes back with CRLF; a body ends at the first "." line, a line
# that starts with ".." loses one dot and any other line is kept as it is; bytes the server sent
# beyond the response asked for (in the same write, so that the client has them before it sends
# its next command) put the session out of step. Errors that put the session out of step close
# the connection; the calls after it raise NetworkError("connection closed ...") without
# touching the network.


class Outcome(NamedTuple):
    """The result of one call: ``kind`` is "ok" (``value``), "server" (a -ERR; ``value`` is the
    ServerError class), "parse" (ProtocolError, the session still in step), "fatal" (``value``:
    "limit", "protocol" or "eof"; the connection is closed), "closed" (a call after that),
    "auth" (SASL: ``value`` is the final status, "+OK" or "-ERR"), "partial" for a batch
    (``value`` is (items, the fatal kind)), or "unknown" (the model cannot tell)."""

    kind: str
    value: Any = None
    warned: bool = False


class _Incomplete(Exception):
    """The server's bytes end inside a response."""


class _Fatal(Exception):
    """The client must close the connection; args[0] is "limit", "protocol" or "eof"."""


class _Awaiting(Exception):
    """The client has a command to send before it needs more bytes (see Model.answered)."""


LARGE_BODY = 1024 * 1024  # pop3lite reads bodies announced larger than this another way


class Model:
    """Decode ``data`` (all the server sent) as the replies to ``calls``. ``ends`` are the
    offsets where the server's writes ended: the client has every byte of a write before it
    can act on any of it, and nothing of the next one before it sends its next command.

    ``answered``: while the session is still going, how many command lines the server has
    answered; the model then tells a client that is about to send a command (the replayer waits
    for it) from one that waits for bytes which will never come (``stuck``: hang up).
    """

    def __init__(self, data: bytes, ends: Sequence[int], max_message_size: int,
                 strict_size: bool = False, *, answered: int | None = None) -> None:
        self.data = data
        self.answered = answered
        self.sent = 0  # command lines the client has sent
        self.ends = list(ends)
        self.max_message_size = max_message_size
        self.strict_size = strict_size
        self.unknown = False  # from here on the client's reading depends on timing
        self.pos = 0
        self.eol = CRLF
        self.caps: dict[str, list[str]] | None = None
        self.caps_before_login: dict[str, list[str]] | None = None
        # RFC 1939 section 8: the maildrop is locked, so a listing may not name a message
        # beyond the highest number the session knows (from STAT, or from the first listing).
        self.highest: int | None = None
        self.marked: set[int] = set()
        self.stuck = False  # the data ended inside a reply the client was waiting for

    # -- the stream ---------------------------------------------------------------------------

    def available(self, offset: int) -> int:
        """How much of the stream the client holds once it has read up to ``offset``."""
        for end in self.ends:
            if end >= offset:
                return end
        return len(self.data)

    def in_step(self) -> None:
        if self.available(self.pos) > self.pos:
            raise _Fatal("protocol")

    def send(self, commands: int = 1) -> None:
        """The client sends command lines: first it checks that nothing unasked-for arrived."""
        self.in_step()
        self.sent += commands

    def line(self, limit: int) -> bytes:
        """The first line of a reply (status line or SASL challenge), its line end removed."""
        data, pos = self.data, self.pos
        if pos == len(data) and self.answered is not None and self.sent > self.answered:
            raise _Awaiting()
        index = data.find(b"\n", pos)
        if index < 0:
            if len(data) - pos > limit:
                raise _Fatal("limit")
            raise _Incomplete()
        if index + 1 - pos > limit:
            raise _Fatal("limit")
        line = data[pos : index + 1]
        if b"\r" in line[:-2]:
            raise _Fatal("protocol")
        self.pos = index + 1
        self.eol = CRLF if line.endswith(CRLF) else b"\n"  # this response's line end
        return line[: -len(self.eol)]

    def status(self, limit: int = pop3lite.MAX_RESPONSE_LINE) -> tuple[bool, bytes]:
        line = self.line(limit)
        if line[:3] == b"+OK" and line[3:4] in (b"", b" "):
            return True, line[4:]
        if line[:4] == b"-ERR" and line[4:5] in (b"", b" "):
            return False, line[5:]
        raise _Fatal("protocol")

    def error(self, text: bytes, verb: str) -> Outcome:
        code, _ = pop3lite.parse_response_code(text)
        return Outcome("server", type(pop3lite.server_error("", code, verb)))

    def body(self, limit: int, announced: int | None = None) -> bytes:
        """A multi-line body, dot-stuffing removed, CRLF line ends (b"" when only telling
        whether the client is stuck: then the values do not matter)."""
        data, start, eol = self.data, self.pos, self.eol
        terminator = b"." + eol
        if data.startswith(terminator, start):
            end = start
        else:
            index = data.find(eol + terminator, start)
            if index < 0:
                if len(data) - start > limit + len(terminator):
                    raise _Fatal("limit")
                raise _Incomplete()
            end = index + len(eol)
        if end - start > limit:
            raise _Fatal("limit")
        self.pos = end + len(terminator)
        if self.answered is not None:
            return b""
        lines = data[start:end].split(eol)[:-1] if end > start else []
        out = []
        for line in lines:
            if eol == b"\n" and line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b".."):
                line = line[1:]
            out.append(line + CRLF)
        return b"".join(out)

    # -- calls --------------------------------------------------------------------------------

    def run(self, calls: Sequence[tuple[Any, ...]]) -> list[Outcome]:
        """The outcome of the greeting and of every call, in order."""
        outcomes: list[Outcome] = []
        closed = False
        for call in [("greeting",), *calls]:
            if closed:
                cached = call[0] == "capa" and self.caps is not None
                outcomes.append(Outcome("ok", self.caps) if cached else Outcome("closed"))
                continue
            try:
                outcome = getattr(self, "call_" + call[0])(*call[1:])
            except _Awaiting:
                break
            except _Incomplete:
                self.stuck = True
                outcome = Outcome("fatal", "eof")
            except _Fatal as exc:
                outcome = Outcome("fatal", exc.args[0])
            outcomes.append(Outcome("unknown") if self.unknown else outcome)
            failed_greeting = call[0] == "greeting" and outcome.kind != "ok"
            if outcome.kind in ("fatal", "partial") or failed_greeting or call[0] == "quit":
                closed = True
        return outcomes

    def simple(self, verb: str) -> Outcome:
        self.send()
        ok, text = self.status()
        if not ok:
            self.in_step()
            return self.error(text, verb)
        self.in_step()
        return Outcome("ok", text)

    def call_greeting(self) -> Outcome:
        ok, text = self.status()
        if not ok:
            return self.error(text, "greeting")
        self.in_step()
        return Outcome("ok", (pop3lite.display_text(text), pop3lite.find_apop_timestamp(text)))

    def call_login(self, user: str, password: str) -> Outcome:
        self.call_capa()  # PIPELINING? (UTF8 is not asked for: drive() says utf8=False)
        if "PIPELINING" in (self.caps or {}):
            outcome = self.pipelined_login()
        else:
            outcome = self.simple("USER")
            if outcome.kind != "ok":
                return outcome
            outcome = self.simple("PASS")
        if outcome.kind == "ok":
            self.caps_before_login, self.caps = self.caps, None
            return Outcome("ok", pop3lite.display_text(outcome.value))
        return outcome

    def pipelined_login(self) -> Outcome:
        """USER and PASS in one write: both replies are read before a -ERR counts."""
        self.send(2)
        user_ok, user_text = self.status()
        ok, text = self.status()
        self.in_step()
        if not user_ok:
            return self.error(user_text, "USER")
        return Outcome("ok", text) if ok else self.error(text, "PASS")

    def text_call(self, verb: str) -> Outcome:
        outcome = self.simple(verb)
        if outcome.kind == "ok":
            return Outcome("ok", pop3lite.display_text(outcome.value))
        return outcome

    def call_noop(self) -> Outcome:
        return self.text_call("NOOP")

    def call_rset(self) -> Outcome:
        outcome = self.text_call("RSET")
        if outcome.kind == "ok":
            self.marked.clear()
        return outcome

    def call_dele(self, number: int) -> Outcome:
        outcome = self.text_call("DELE")
        if outcome.kind == "ok":
            self.marked.add(number)
        return outcome

    def call_quit(self) -> Outcome:
        self.send()
        ok, text = self.status()
        if not ok:
            self.in_step()
            return self.error(text, "QUIT")
        return Outcome("ok", pop3lite.display_text(text))

    def parsed(self, parse: Callable[[], Any]) -> Outcome:
        try:
            return Outcome("ok", parse())
        except pop3lite.ProtocolError:
            return Outcome("parse")

    def call_stat(self) -> Outcome:
        outcome = self.simple("STAT")
        if outcome.kind != "ok":
            return outcome
        result = self.parsed(lambda: tuple(pop3lite.parse_stat(outcome.value)))
        if result.kind == "ok" and self.highest is None:
            self.highest = result.value[0] + len(self.marked)
        return result

    def known(self, listing: Any) -> Any:
        """The rule of a full listing: no message beyond the highest known number."""
        highest = max(listing, default=0)
        if self.highest is not None and highest > self.highest:
            raise pop3lite.ProtocolError("beyond the maildrop")
        if self.highest is None:
            self.highest = max(highest, max(self.marked, default=0))
        return listing

    @staticmethod
    def one(asked: int, pair: tuple[int, Any]) -> Any:
        if pair[0] != asked:
            raise pop3lite.ProtocolError("answered for another message")
        return pair[1]

    def multiline(self, verb: str, limit: int = pop3lite.MAX_LISTING_SIZE) -> Outcome:
        self.send()
        ok, text = self.status()
        if not ok:
            self.in_step()
            return self.error(text, verb)
        answered, self.answered = self.answered, None  # CAPA decides on pipelining: decode
        try:
            lines = self.body(limit).split(CRLF)[:-1]
        finally:
            self.answered = answered
        self.in_step()
        return Outcome("ok", lines)

    def call_list(self, number: int | None = None) -> Outcome:
        if number is not None:
            outcome = self.simple("LIST")
            if outcome.kind != "ok":
                return outcome
            return self.parsed(lambda: self.one(number, pop3lite.parse_scan_listing(outcome.value)))
        outcome = self.multiline("LIST")
        if outcome.kind != "ok":
            return outcome
        return self.parsed(lambda: self.known(
            pop3lite.unique_listing(map(pop3lite.parse_scan_listing, outcome.value), "LIST")
        ))

    def call_uidl(self, number: int | None = None) -> Outcome:
        if number is not None:
            outcome = self.simple("UIDL")
            if outcome.kind != "ok":
                return outcome
            return self.parsed(lambda: self.one(number, pop3lite.parse_uid_listing(outcome.value)))
        outcome = self.multiline("UIDL")
        if outcome.kind != "ok":
            return outcome

        def parse() -> Any:
            pairs = map(pop3lite.parse_uid_listing, outcome.value)
            uids = pop3lite.UIDList(pop3lite.unique_listing(pairs, "UIDL").items())
            self.known(uids)
            return dict(uids), uids.duplicates

        return self.parsed(parse)

    def call_capa(self) -> Outcome:
        if self.caps is None:
            outcome = self.multiline("CAPA")
            if outcome.kind == "server":
                self.caps = {}
            else:
                self.caps = dict(pop3lite.parse_capabilities(outcome.value))
        return Outcome("ok", self.caps)

    def message(self, verb: str, limit: int | None) -> Outcome:
        self.sent += 1
        ok, text = self.status()
        if not ok:
            self.in_step()
            return self.error(text, verb)
        announced = pop3lite.parse_announced_size(text) if verb == "RETR" else None
        body = self.body(limit if limit is not None else len(self.data), announced)
        self.in_step()
        mismatch = announced is not None and announced != len(body)
        if mismatch and self.strict_size:
            return Outcome("parse")
        return Outcome("ok", body, mismatch)

    def call_retr(self, number: int) -> Outcome:
        return self.message("RETR", self.max_message_size)

    def call_retr_to(self, number: int) -> Outcome:
        return self.message("RETR", None)

    def call_top(self, number: int, lines: int) -> Outcome:
        return self.message("TOP", self.max_message_size)

    def batch(self, verb: str, numbers: Sequence[int]) -> Outcome:
        # RFC 2449 section 5: what was announced before login holds after it.
        pipelined = self.caps is None and "PIPELINING" in (self.caps_before_login or {})
        if not pipelined:
            self.call_capa()
            pipelined = "PIPELINING" in (self.caps or {})
        items: list[tuple[int, bytes | None, Any]] = []
        for index, number in enumerate(numbers):
            try:
                if not pipelined:
                    self.send()
                elif index == 0:
                    self.send(len(numbers))  # all at once: the window is far larger
                ok, text = self.status()
                if not ok:
                    error = self.error(text, verb).value
                    item: tuple[int, bytes | None, Any] = (number, None, error)
                elif verb == "DELE":
                    item = (number, None, None)
                    self.marked.add(number)
                else:
                    announced = pop3lite.parse_announced_size(text) if verb == "RETR" else None
                    body = self.body(self.max_message_size, announced)
                    mismatch = announced is not None and announced != len(body)
                    item = (number, body, "warned" if mismatch else None)
                if not pipelined or index == len(numbers) - 1:
                    self.in_step()  # nothing more is in flight: nothing may follow
                items.append(item)
            except _Incomplete:
                self.stuck = True
                return Outcome("partial", (items, "eof"))
            except _Fatal as exc:
                return Outcome("partial", (items, exc.args[0]))
        return Outcome("ok", items)

    def call_retr_many(self, numbers: Sequence[int]) -> Outcome:
        return self.batch("RETR", numbers)

    def call_top_many(self, numbers: Sequence[int], lines: int) -> Outcome:
        return self.batch("TOP", numbers)

    def call_dele_many(self, numbers: Sequence[int]) -> Outcome:
        return self.batch("DELE", numbers)

    def call_auth(self, mechanism: str, secret: str = "") -> Outcome:
        self.send()
        for _ in range(pop3lite.MAX_SASL_ROUNDS):
            line = self.line(pop3lite.MAX_SASL_LINE)
            if line[:1] != b"+" or line[:3] == b"+OK":
                break
            if self.available(self.pos) > self.pos:  # more than one challenge at a time
                raise _Fatal("protocol")
            self.sent += 1  # the answer to a challenge (or "*")
        else:
            raise _Fatal("protocol")
        if line[:3] == b"+OK" and line[3:4] in (b"", b" "):
            if self.available(self.pos) > self.pos:
                raise _Fatal("protocol")
            self.caps_before_login, self.caps = self.caps, None
            return Outcome("auth", "+OK")
        if line[:4] == b"-ERR" and line[4:5] in (b"", b" "):
            self.in_step()
            return Outcome("auth", "-ERR")
        raise _Fatal("protocol")


# =============================================================================================
# The replayer: one listening socket and one server thread for every replayed case
# =============================================================================================


class Served(NamedTuple):
    """What the replayer sent in one case: all of it, where each write ended, and whether it
    had to give up waiting for a client the model said was not stuck."""

    data: bytes
    ends: list[int]
    stalled: bool


class Job(NamedTuple):
    replies: list[bytes]
    budget: int | None  # stop (and hang up) after this many octets
    stuck: Callable[[bytes, list[int], int], bool]  # the model: is the client stuck?


class Replayer:
    """Serves one Job per connection: the first reply at once, then one reply per command line
    received, whatever the line says (a hostile server answers what it likes). It hangs up when
    the budget or the replies run out, or when the model says the client is waiting for bytes
    that will never come; so a case costs a few round trips, never a timeout."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.results: queue.Queue[Served | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self.loop, name="replayer", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(TIMEOUT)
        self.listener.close()

    def loop(self) -> None:
        for _ in range(10**9):
            job = self.jobs.get()
            if job is None:
                return
            try:
                conn, _ = self.listener.accept()
                with conn:
                    self.results.put(self.serve(conn, job))
            except BaseException as exc:  # reported in the test's thread
                self.results.put(exc)

    def serve(self, conn: socket.socket, job: Job) -> Served:
        conn.settimeout(STALL)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = bytearray()
        ends: list[int] = []
        stalled = False

        def send(data: bytes) -> bool:
            """Send within the budget; False once it is spent."""
            if job.budget is not None:
                data = data[: max(0, job.budget - len(sent))]
            if data:
                conn.sendall(data)
                sent.extend(data)
                ends.append(len(sent))
            return job.budget is None or len(sent) < job.budget

        try:
            more = send(job.replies[0])
            pending = b""
            index = 1
            while more:
                if b"\n" not in pending:
                    if job.stuck(bytes(sent), ends, index - 1):
                        break
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        stalled = True
                        break
                    if not chunk:
                        break
                    pending += chunk
                    continue
                _, _, pending = pending.partition(b"\n")
                if index >= len(job.replies):
                    break
                more = send(job.replies[index])
                index += 1
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(TIMEOUT)
            for _ in range(10000):  # until the client closes its end
                if not conn.recv(65536):
                    break
        except OSError:
            pass  # the client closed first: what it did is in its own outcomes
        return Served(bytes(sent), ends, stalled)

    def run(self, job: Job, client: Callable[[int], Any]) -> tuple[Served, Any]:
        self.jobs.put(job)
        try:
            result = client(self.port)
        finally:  # collect this case's result even when the client side failed
            served = self.results.get(timeout=TIMEOUT * 2)
        if isinstance(served, BaseException):
            raise served
        return served, result


@pytest.fixture(scope="module")
def replayer() -> Iterator[Replayer]:
    server = Replayer()
    yield server
    server.close()


# =============================================================================================
# Driving the client through a session's calls
# =============================================================================================


class Options(NamedTuple):
    max_message_size: int = 64 * 1024
    strict_size: bool = False


DEFAULTS = Options()


def fatal_kind(exc: pop3lite.Error) -> str:
    if isinstance(exc, pop3lite.LimitExceeded):
        return "limit"
    if isinstance(exc, pop3lite.Timeout):
        return "timeout"
    if isinstance(exc, pop3lite.NetworkError):
        return "eof"
    return "protocol"


def is_closed(pop: pop3lite.POP3) -> bool:
    return "closed" in repr(pop)


def perform(pop: pop3lite.POP3, call: tuple[Any, ...]) -> Any:
    """Make one call; the value in the form Model gives it."""
    verb, args = call[0], call[1:]
    if verb == "login":
        return pop.login(*args)
    if verb == "auth":
        if args[0] == "SCRAM-SHA-256":
            return pop.auth(scram())
        if args[0] == "XOAUTH2":
            return pop.auth("XOAUTH2", "hogehoge", token=args[1])
        return pop.auth(args[0], "hogehoge", args[1])
    if verb == "stat":
        return tuple(pop.stat())
    if verb == "uidl" and not args:
        uids = pop.uidl()
        return dict(uids), uids.duplicates
    if verb == "capa":
        return dict(pop.capa())
    if verb == "retr_to":
        out = io.BytesIO()
        count = pop.retr_to(args[0], out)
        assert count == len(out.getvalue())
        return out.getvalue()
    return getattr(pop, verb)(*args)


def perform_batch(pop: pop3lite.POP3, call: tuple[Any, ...]) -> Outcome:
    items: list[tuple[int, bytes | None, Any]] = []
    iterator = getattr(pop, call[0])(*call[1:])
    for _ in range(len(call[1]) + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                item = next(iterator)
            except StopIteration:
                return Outcome("ok", items)
            except pop3lite.ServerError:
                raise
            except pop3lite.Error as exc:
                if not is_closed(pop):
                    raise
                return Outcome("partial", (items, fatal_kind(exc)))
        error: Any = type(item.error) if item.error is not None else None
        if any(issubclass(w.category, pop3lite.SizeMismatchWarning) for w in caught):
            error = "warned"
        items.append((item.number, item.data, error))
    raise AssertionError("batch yielded more items than numbers")


def observe(pop: pop3lite.POP3, call: tuple[Any, ...]) -> Outcome:
    """One call's outcome as the client gave it. Anything but a pop3lite.Error propagates."""
    if is_closed(pop):
        with pytest.raises(pop3lite.NetworkError) as info:
            if call[0] in ("retr_many", "top_many", "dele_many"):
                list(getattr(pop, call[0])(*call[1:]))
            else:
                perform(pop, call)
        assert str(info.value).startswith("connection closed"), info.value
        return Outcome("closed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if call[0] in ("retr_many", "top_many", "dele_many"):
                outcome = perform_batch(pop, call)
            else:
                value = perform(pop, call)
                warned = any(issubclass(w.category, pop3lite.SizeMismatchWarning) for w in caught)
                outcome = Outcome("ok", value, warned)
        except pop3lite.Error as exc:
            if isinstance(exc, pop3lite.ServerError):
                return Outcome("server", type(exc))
            if not is_closed(pop):
                assert isinstance(exc, pop3lite.ProtocolError), exc
                return Outcome("parse")
            return Outcome("fatal", fatal_kind(exc))
    if call[0] == "auth":
        return Outcome("auth", "+OK")
    return outcome


def drive(port: int, calls: Sequence[tuple[Any, ...]], options: Options) -> list[Outcome]:
    """Connect, make every call whatever happens, and return the outcomes (greeting first)."""
    try:
        pop = pop3lite.POP3(
            "127.0.0.1", port, timeout=TIMEOUT, tls="none", utf8=False, **options._asdict()
        )
    except pop3lite.ServerError as exc:
        return [Outcome("server", type(exc))]
    except pop3lite.Error as exc:
        return [Outcome("fatal", fatal_kind(exc))]
    try:
        outcomes = [Outcome("ok", (pop.greeting, pop.timestamp))]
        outcomes += [observe(pop, call) for call in calls]
    finally:
        pop.close()
    return outcomes


_STUCK: dict[tuple[Any, ...], bool] = {}  # the replayer asks about the same prefixes often


class Case(NamedTuple):
    label: str
    expected: list[Outcome]
    got: list[Outcome]
    served: Served
    elapsed: float


def replay(replayer: Replayer, recorded: Session, *, replies: list[bytes] | None = None,
           budget: int | None = None, options: Options = DEFAULTS, label: str = "") -> Case:
    """Replay a session (its replies, or changed ones) and model what the client had to do."""
    replies = recorded.replies if replies is None else replies

    def model(data: bytes, ends: Sequence[int], answered: int | None = None) -> Model:
        return Model(data, ends, options.max_message_size, options.strict_size,
                     answered=answered)

    def stuck(data: bytes, ends: list[int], answered: int) -> bool:
        key = (recorded.name, options, hash(data), len(data), tuple(ends), answered)
        if key not in _STUCK:
            checker = model(data, ends, answered)
            checker.run(recorded.calls)
            _STUCK[key] = checker.stuck
        return _STUCK[key]

    started = time.monotonic()
    try:
        served, got = replayer.run(
            Job(replies, budget, stuck), lambda port: drive(port, recorded.calls, options)
        )
    except Exception as exc:  # anything but a pop3lite.Error, or a failed check
        raise AssertionError(f"{label or recorded.name}: {exc!r}") from exc
    elapsed = time.monotonic() - started
    expected = model(served.data, served.ends).run(recorded.calls)
    return Case(label or recorded.name, expected, got, served, elapsed)


def mismatches(case: Case, calls: Sequence[tuple[Any, ...]]) -> list[str]:
    """How the client's outcomes differ from the model's (empty when they agree)."""
    problems = []
    guessing = any(outcome.kind == "unknown" for outcome in case.expected)
    if case.served.stalled and not guessing:
        problems.append("the client sent nothing although the model says it had its reply")
    if case.elapsed > STALL + 3.0:
        problems.append(f"took {case.elapsed:.1f}s")
    names = ["greeting"] + [" ".join(map(str, call)) for call in calls]
    dead = False
    for name, want, got in zip(names, case.expected, case.got):
        if dead:
            if got.kind != "closed" and got != want:  # capa() answers from its cache
                problems.append(f"{name}: {short(got)} after the connection closed")
            continue
        dead = got.kind == "fatal" or got.kind == "partial"
        if want.kind == "unknown":
            fine = True
        elif name.startswith("auth"):
            # The mechanism decides whether a challenge is acceptable, so the model knows only
            # the final status; unless the client gave up, it read exactly as far as the model.
            if got.kind == "auth":
                fine = want == Outcome("auth", "+OK")
            else:
                fine = dead or want.kind == "auth"
        else:
            fine = got == want
        if not fine:
            problems.append(f"{name}: expected {short(want)}, got {short(got)}")
    return problems


def short(outcome: Outcome) -> str:
    text = repr(outcome)
    return text if len(text) < 300 else text[:300] + "..."


def check(case: Case, calls: Sequence[tuple[Any, ...]]) -> None:
    problems = mismatches(case, calls)
    assert not problems, f"{case.label}: " + "; ".join(problems)


# =============================================================================================
# The mutator: seeded changes to recorded replies
# =============================================================================================


def lines_of(reply: bytes) -> list[bytes]:
    """A reply's lines, each with its line end."""
    return reply.splitlines(keepends=True)


def spot(rng: random.Random, reply: bytes) -> int:
    """A position in ``reply``: half the time anywhere, otherwise where framing lives (the
    status line, the last octets, either side of a line end)."""
    if not reply or rng.random() < 0.5:
        return rng.randrange(len(reply) + 1)
    choice = rng.randrange(3)
    if choice == 0:
        return rng.randrange(reply.find(b"\n") + 2 if b"\n" in reply else len(reply) + 1)
    if choice == 1:
        return max(0, len(reply) - rng.randrange(1, 9))
    ends = [m.start() for m in re.finditer(b"\n", reply)]
    return min(len(reply), max(0, rng.choice(ends) + rng.randrange(-2, 3))) if ends else 0


def pick(rng: random.Random, replies: list[bytes], multiline: bool = False) -> int:
    """A reply to change; with ``multiline``, one with a body if there is one."""
    candidates = [i for i, r in enumerate(replies) if r.count(b"\n") > 1] if multiline else []
    return rng.choice(candidates or range(len(replies)))


INSERTS = [b"\r", b"\n", b"\0", b"\r\n", b".", b"\r\n.\r\n", b"\n.\n", b" ", b"\xff", b"\x80",
           b"\xe9", b"+OK\r\n", b"-ERR\r\n", b"\x1b[2J"]
STATUS_WORDS = [b"+ok", b"+OKAY", b"+Ok", b"OK", b"+OK\t", b"+", b"-ERROR", b"-ERR", b"-err",
                b"* OK", b"", b"+OK+OK", b" +OK", b"\0+OK", b"+\xefOK", b"-ERR\t", b"+OK\x00"]
NUMBERS = [b"0", b"-1", b"-0", b"00001", b"10737418240", b"18446744073709551616",
           b"99999999999999999999", b"999999999999999999999", b"9" * 50, b"1e9", b"0x10",
           b"\xd9\xa1", b"\xef\xbc\x91", b"+1", b"1.0", b" 1", b""]
UIDS = [b"x" * 70, b"x" * 71, b"", b"a b", b"a\x7fb", b"a\xffb", b"a\0b", b"\xe3\x81\x82",
        b"3C4B82C800000001", b"whqtswO00WBw418f9t5JxYwZ"]


def mutate(rng: random.Random, replies: list[bytes], kind: str) -> tuple[str, list[bytes]]:
    """One change of the given kind; returns what was done (for the failure message)."""
    out = list(replies)
    index = pick(rng, out, multiline=kind in ("dup-line", "drop-line", "stuffing"))
    reply = out[index]
    where = spot(rng, reply)
    if kind == "flip":
        where = min(where, len(reply) - 1)
        if where < 0:
            return "flip in an empty reply", out
        byte = rng.choice([b for b in range(256) if b != reply[where]])
        out[index] = reply[:where] + bytes([byte]) + reply[where + 1 :]
        return f"reply {index} byte {where} -> {byte:#04x}", out
    if kind == "insert":
        data = rng.choice(INSERTS)
        out[index] = reply[:where] + data + reply[where:]
        return f"reply {index} insert {data!r} at {where}", out
    if kind == "delete":
        out[index] = reply[:where] + reply[where + 1 :]
        return f"reply {index} delete byte {where}", out
    lines = lines_of(reply)
    line_no = rng.randrange(len(lines)) if lines else 0
    if kind == "dup-line" and lines:
        lines.insert(line_no, lines[line_no])
        out[index] = b"".join(lines)
        return f"reply {index} line {line_no} twice", out
    if kind == "drop-line" and lines:
        del lines[line_no]
        out[index] = b"".join(lines)
        return f"reply {index} line {line_no} dropped", out
    if kind == "status":
        word = rng.choice(STATUS_WORDS)
        match = re.match(rb"\+OK|-ERR|\+ ", reply)
        cut = match.end() if match else 0
        out[index] = word + reply[cut:]
        return f"reply {index} status {word!r}", out
    if kind == "number":
        runs = list(re.finditer(rb"\d+", reply))
        if not runs:
            return "no number", out
        run = rng.choice(runs[:40])
        number = rng.choice(NUMBERS)
        out[index] = reply[: run.start()] + number + reply[run.end() :]
        return f"reply {index} number {run.group()!r} -> {number!r}", out
    if kind == "uid":
        listing = [i for i, r in enumerate(out) if re.search(rb"(?m)^(\+OK )?\d+ [!-~]{8,}\r?$", r)]
        if not listing:
            return "no UID", out
        index = rng.choice(listing)
        lines = lines_of(out[index])
        candidates = [n for n, line in enumerate(lines) if re.match(rb"(\+OK )?\d+ [!-~]", line)]
        line_no = rng.choice(candidates)
        prefix, number, uid, end = re.match(
            rb"(\+OK )?(\d+) (\S*)(\r?\n)$", lines[line_no]
        ).groups()  # type: ignore[union-attr]
        if rng.random() < 0.5:
            number = rng.choice([b"0", b"3", b"4", b"99", b"-1", b"4294967296", b"1" * 21])
        else:
            uid = rng.choice(UIDS)
        lines[line_no] = (prefix or b"") + number + b" " + uid + end
        out[index] = b"".join(lines)
        return f"reply {index} UID line {line_no} -> {lines[line_no]!r}", out
    if kind == "stuffing":
        body = lines[1:-1]
        choice = rng.randrange(4)
        if choice == 0 and any(line.startswith(b"..") for line in body):
            n = rng.choice([i for i, line in enumerate(body) if line.startswith(b"..")])
            body[n] = body[n][1:]  # a server that forgot to stuff
            done = f"line {n + 1} unstuffed"
        elif choice == 1 and body:
            n = rng.randrange(len(body))
            body[n] = b"." + body[n]
            done = f"line {n + 1} gets a leading dot"
        elif choice == 2:
            n = rng.randrange(len(body) + 1)
            body.insert(n, rng.choice([b".\r\n", b". \r\n", b"..\r\n", b".\n", b"...\r\n"]))
            done = f"dot line inserted at {n + 1}"
        else:
            done = "terminator dropped"
            lines = lines[:-1]
        out[index] = b"".join(lines[:1] + body + lines[-1:]) if choice < 3 else b"".join(lines)
        return f"reply {index} {done}", out
    if kind == "line-ends":
        choice = rng.randrange(4)
        if choice == 0:
            out[index] = reply.replace(b"\r\n", b"\n")
            return f"reply {index} with bare LF", out
        if choice == 1:
            out[index] = reply.replace(b"\r\n", b"\r")
            return f"reply {index} with bare CR", out
        if choice == 2 and lines:
            end = rng.choice([b"\n", b"\r\r\n", b"\n\r"])
            lines[line_no] = lines[line_no].rstrip(b"\r\n") + end
            out[index] = b"".join(lines)
            return f"reply {index} line {line_no} end changed", out
        out = [r.replace(b"\r\n", b"\n") for r in out]
        return "every reply with bare LF", out
    if kind == "replies":
        choice = rng.randrange(5)
        if choice == 0:
            out.insert(index, reply)
            return f"reply {index} sent twice", out
        if choice == 1 and index > 0:
            del out[index]
            return f"reply {index} never sent", out
        if choice == 2 and index + 1 < len(out):
            out[index], out[index + 1] = out[index + 1], out[index]
            return f"replies {index} and {index + 1} swapped", out
        if choice == 3 and index + 1 < len(out):
            out[index : index + 2] = [reply + out[index + 1], b""]
            return f"reply {index + 1} sent with reply {index}", out
        out[index] = b""
        return f"reply {index} empty", out
    raise AssertionError(kind)


MUTATIONS = ["flip", "insert", "delete", "dup-line", "drop-line", "status", "number", "uid",
             "stuffing", "line-ends", "replies"]


# =============================================================================================
# The client against recorded, cut and mutated sessions
# =============================================================================================

SESSIONS = list(_SESSION_MAKERS)
# The same calls with other options: strict octet counts, and a limit below message 1's size.
VARIANTS = [(name, Options()) for name in SESSIONS] + [
    ("operamail", Options(strict_size=True)),
    ("operamail", Options(max_message_size=5000)),
]


def test_recorded_sessions_replay_exactly(replayer: Replayer) -> None:
    """The harness itself: every recorded session, replayed as it was, gives the fake
    server's data (so the model and the replayer are right before anything is mutated)."""
    opera = fakeserver.OPERAMAIL_MESSAGES
    opera_values = [
        "Password accepted", (2, 10180), {1: 5954, 2: 4226},
        (dict(enumerate(fakeserver.OPERAMAIL_UIDS, 1)), {}), opera[0],
        message_top(opera[1], 5), 4226, fakeserver.OPERAMAIL_UIDS[0], "message 1 deleted",
        "InterChange POP3 Server Signing Off",
    ]
    for name in SESSIONS:
        recorded = session(name)
        case = replay(replayer, recorded)
        check(case, recorded.calls)
        assert all(outcome.kind in ("ok", "auth", "server") for outcome in case.got)
        values = [outcome.value for outcome in case.got[1:]]
        if name in ("operamail", "lf"):  # bare LF: tolerated, and bodies come back with CRLF
            assert values == opera_values
            assert case.got[0].value[1] == fakeserver.OPERAMAIL_TIMESTAMP
        rfc = fakeserver.RFC_MESSAGES
        if name == "rfc":
            assert values[6] == values[8] == rfc[1]  # retr and retr_to undo the stuffing
            assert case.got[6] == Outcome("server", pop3lite.ServerError)  # LIST 9
            assert values[-2] == (3, sum(map(len, rfc)))
        if name == "pipelined":
            assert values[1] == [(n, rfc[n - 1], None) for n in (1, 2, 3)]
            assert values[2] == [(3, message_top(rfc[2], 0), None),
                                 (1, message_top(rfc[0], 0), None)]
            assert values[3] == [(1, None, None), (2, None, None)]
            assert values[4] == (1, len(rfc[2]))
        if name == "scram":
            assert case.got[1] == Outcome("auth", "+OK")
        if name == "sasl":
            assert case.got[1] == case.got[2] == Outcome("server", pop3lite.AuthenticationError)
            assert case.got[3] == Outcome("auth", "+OK")


def cut_points(recorded: Session, seed: str) -> list[int]:
    """Where to cut a session's bytes: every byte, or for the long sessions (unless soaking)
    every byte of each status line and line end, the last octets of each reply, and a sample."""
    data = b"".join(recorded.replies)
    if len(data) < 3000 or SOAK > 1:
        return list(range(len(data)))
    points: set[int] = set()
    offset = 0
    for reply in recorded.replies:
        first = reply.find(b"\n") + 1
        points.update(range(offset, offset + first + 1))
        points.update(range(offset + len(reply) - 8, offset + len(reply)))
        offset += len(reply)
    for match in re.finditer(b"\n", data):
        points.update(range(match.start() - 2, match.start() + 3))
    rng = random.Random(seed)
    points.update(rng.sample(range(len(data)), 150))
    return sorted(p for p in points if 0 <= p < len(data))


@pytest.mark.parametrize("name", SESSIONS)
def test_a_session_cut_at_any_byte(replayer: Replayer, name: str) -> None:
    """A server that hangs up anywhere: no call returns part of a reply as if it were whole,
    every error is a pop3lite.Error, and the calls after it say "connection closed"."""
    recorded = session(name)
    points = cut_points(recorded, name)
    for budget in points:
        case = replay(replayer, recorded, budget=budget, label=f"{name} cut at {budget}")
        check(case, recorded.calls)
    assert len(points) > 300


@pytest.mark.parametrize("kind", MUTATIONS)
def test_mutated_sessions(replayer: Replayer, kind: str) -> None:
    """Seeded changes to every recorded session (and two option variants): whatever the
    server sends, the client's values and errors are the model's."""
    count = 0
    for name, options in VARIANTS:
        recorded = session(name)
        for seed in range(15 * SOAK):
            rng = random.Random(f"{name}/{options}/{kind}/{seed}")
            what, replies = mutate(rng, recorded.replies, kind)
            label = f"{name} {options} {kind} seed {seed}: {what}"
            check(replay(replayer, recorded, replies=replies, options=options, label=label),
                  recorded.calls)
            count += 1
    assert count == len(VARIANTS) * 15 * SOAK


# =============================================================================================
# The client against a scripted raw peer: time and memory
# =============================================================================================


GREETING = b"+OK ready <1896.697170952@dbc.mtview.ca.us>\r\n"


QUICK = 0.25  # the client timeout in the tests below


def answer_then(reply: bytes, then: str = "hold") -> Callable[[Peer], None]:
    """A script: greeting, read one command, send ``reply``, then hold or trickle."""

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        if peer.line():
            if then == "trickle":
                peer.trickle(reply)
            else:
                peer.send(reply)
                peer.hold()

    return script


def pipelined_then_stall(peer: Peer) -> None:
    peer.send(GREETING)
    peer.line()
    peer.send(b"+OK\r\nPIPELINING\r\n.\r\n")
    peer.line()
    peer.send(b"+OK\r\nfirst\r\n.\r\n+OK\r\nsecond, never end")
    peer.hold()


SLOW_SERVERS: dict[str, tuple[Callable[[Peer], None], Callable[[pop3lite.POP3], Any]]] = {
    # name: (script, the call that must time out)
    "silent": (answer_then(b""), lambda pop: pop.stat()),
    "stops mid-line": (answer_then(b"+OK 2 10"), lambda pop: pop.stat()),
    "stops after the status line": (answer_then(b"+OK 12 octets\r\n"), lambda pop: pop.retr(1)),
    "stops mid-body": (answer_then(b"+OK\r\nSubject: x\r\n\r\nbo"), lambda pop: pop.retr(1)),
    "never sends the final dot": (answer_then(b"+OK\r\nbody\r\n"), lambda pop: pop.top(1, 0)),
    "stops before the final CRLF": (answer_then(b"+OK\r\nbody\r\n."), lambda pop: pop.list()),
    "trickles a status line": (answer_then(b"+OK 2 10180", "trickle"), lambda pop: pop.stat()),
    "trickles a body": (answer_then(b"+OK\r\nSubject: x\r\n", "trickle"), lambda pop: pop.retr(1)),
    "trickles body lines": (answer_then(b"+OK\r\nx\r\n", "trickle"), lambda pop: pop.uidl()),
    "trickles into retr_to": (answer_then(b"+OK\r\nx\r\n", "trickle"),
                              lambda pop: pop.retr_to(1, io.BytesIO())),
    "trickles a SASL challenge": (answer_then(b"+ ", "trickle"),
                                  lambda pop: pop.auth("PLAIN", "u", "p")),
    "stalls inside a batch": (pipelined_then_stall, lambda pop: list(pop.retr_many([1, 2]))),
}


@pytest.mark.parametrize("name", list(SLOW_SERVERS))
def test_a_slow_or_silent_server_cannot_outlast_the_timeout(name: str) -> None:
    script, call = SLOW_SERVERS[name]
    with scripted(script) as port:
        pop = connect(port, timeout=QUICK)
        started = time.monotonic()
        with pytest.raises(pop3lite.Timeout) as info:
            call(pop)
        elapsed = time.monotonic() - started
        assert isinstance(info.value, TimeoutError)
        assert elapsed < QUICK + SLACK, elapsed
        with pytest.raises(pop3lite.NetworkError, match="^connection closed"):
            pop.noop()
        pop.close()


@pytest.mark.parametrize("greeting", [b"", b"+OK waiting", b"+OK trickled forever"])
def test_a_greeting_that_never_ends_times_out(greeting: bytes) -> None:
    def script(peer: Peer) -> None:
        if greeting.endswith(b"forever"):
            peer.trickle(greeting)
        else:
            peer.send(greeting)
            peer.hold()

    with scripted(script) as port:
        started = time.monotonic()
        with pytest.raises(pop3lite.Timeout):
            connect(port, timeout=QUICK)
        assert time.monotonic() - started < QUICK + SLACK


@pytest.mark.parametrize("fault", [Fault("delay", "RETR", 0.75), Fault("tls-stall")])
def test_fake_server_stalls_time_out(fault: Fault, make_pop3_server: MakeServer) -> None:
    tls = "implicit" if fault.kind == "tls-stall" else None
    server = make_pop3_server("operamail", tls=tls, faults=[fault], idle_timeout=5)
    started = time.monotonic()
    with pytest.raises(pop3lite.Timeout):
        with pop3lite.POP3(server.host, server.port, timeout=QUICK, tls=tls or "none",
                           ssl_context=fakeserver.client_context()) as pop:
            pop.login("hogehoge", "fugafuga")
            pop.retr(1)
    assert time.monotonic() - started < QUICK + SLACK


LINES = (b"y" * 78 + b"\r\n") * 13108  # about 1 MiB of body lines


def endless(status: bytes, chunk: bytes = LINES, total: int | None = None,
            capa: bool = False) -> Callable[[Peer], None]:
    """A script: ``status``, then ``chunk`` again and again (``total`` octets, then hang up;
    or until the client goes); with ``capa``, CAPA is answered first. Sends views of one
    buffer, so it allocates nothing itself."""
    view = memoryview(chunk)

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        if capa and peer.line():
            peer.send(b"+OK\r\nPIPELINING\r\n.\r\n")
        if not peer.line():
            return
        peer.send(status)
        for count in range(100000):
            if peer.stop.is_set() or (total is not None and count * len(chunk) >= total):
                return
            if not peer.send(view):
                return

    return script


def later(status: bytes, rest: bytes) -> Callable[[Peer], None]:
    """A script: ``status`` at once, ``rest`` a moment later (a slow server, not a wait)."""

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        if peer.line():
            peer.send(status)
            peer.stop.wait(0.05)
            peer.send(rest)
            peer.hold()

    return script


class NullFile(io.BytesIO):
    """A binary file that keeps nothing."""

    written = 0

    def write(self, data: Any) -> int:
        self.written += len(data)
        return len(data)


HUGE = b"10737418240"  # 10 GB
MEMORY_CASES: dict[str, tuple[Callable[[Peer], None], Callable[[pop3lite.POP3], Any], int,
                              Any, float]] = {
    # name: (script, call, max_message_size, expected error or None, bound on the peak)
    "10 GB announced, 7 octets sent": (
        later(b"+OK " + HUGE + b" octets\r\nshort\r\n", b".\r\n"),
        lambda pop: pop.retr(1), 8 * MiB, None, 8 * MiB * 1.05 + MiB),
    "10 GB announced, endless body": (
        endless(b"+OK " + HUGE + b" octets\r\n"), lambda pop: pop.retr(1), MiB,
        pop3lite.LimitExceeded, MiB * 1.3 + MiB),
    "endless body": (
        endless(b"+OK\r\n"), lambda pop: pop.retr(1), MiB, pop3lite.LimitExceeded,
        MiB * 1.3 + MiB),
    "endless TOP": (
        endless(b"+OK\r\n"), lambda pop: pop.top(1, 5), MiB, pop3lite.LimitExceeded,
        MiB * 1.3 + MiB),
    "endless batch item": (
        endless(b"+OK\r\n", capa=True), lambda pop: list(pop.retr_many([1, 2])), MiB,
        pop3lite.LimitExceeded, MiB * 1.3 + MiB),
    "endless status line": (
        endless(b"+OK ", b"z" * MiB), lambda pop: pop.stat(), MiB, pop3lite.LimitExceeded,
        pop3lite.MAX_RESPONSE_LINE + MiB),
    "endless SASL challenge": (
        endless(b"+ ", b"z" * MiB), lambda pop: pop.auth("PLAIN", "u", "p"), MiB,
        pop3lite.LimitExceeded, pop3lite.MAX_SASL_LINE + MiB),
    "endless LIST": (
        endless(b"+OK\r\n", b"1 2\r\n" * 200000), lambda pop: pop.list(), MiB,
        pop3lite.LimitExceeded, pop3lite.MAX_LISTING_SIZE * 1.15 + MiB),
    "32 MiB into retr_to, then hang up": (
        endless(b"+OK " + HUGE + b" octets\r\n", total=32 * MiB),
        lambda pop: pop.retr_to(1, NullFile()), MiB, pop3lite.TruncatedResponse,
        pop3lite.STREAM_CHUNK * 3 + MiB),
}


@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_memory_stays_within_the_limits(name: str) -> None:
    """A claimed 10 GB is trusted only up to max_message_size; endless lines and responses
    stop at their limits (retr_to has none, but streams in constant memory)."""
    script, call, limit, error, bound = MEMORY_CASES[name]
    with scripted(script) as port:
        pop = connect(port, max_message_size=limit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pop3lite.SizeMismatchWarning)
            result, peak = peak_memory(lambda: call(pop))
        pop.close()
    if error is None:
        assert result == b"short\r\n"
    else:
        assert isinstance(result, error), result
    assert peak is None or peak < bound, f"{peak / MiB:.1f} MiB"


# =============================================================================================
# The client against the fake server's faults: errors, and no deletion by accident
# =============================================================================================


def fake_pop(server: FakeServer, **kwargs: Any) -> pop3lite.POP3:
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("tls", "none")
    kwargs.setdefault("ssl_context", fakeserver.client_context())
    return pop3lite.POP3(server.host, server.port, **kwargs)


RFC = {"preset": "rfc", "messages": fakeserver.RFC_MESSAGES}
DOTS = fakeserver.RFC_MESSAGES[1]  # has a line that is a single ".": unstuffed, it ends the body
FAULT_CASES: dict[str, tuple[dict[str, Any], list[Fault], Callable[[pop3lite.POP3], Any], Any]] = {
    # name: (FakeServer arguments, faults, the call after DELE 2, the error or the value)
    "drop in RETR": ({}, [Fault("drop", "RETR", 100)], lambda p: p.retr(1),
                     pop3lite.TruncatedResponse),
    "drop after a status line": ({}, [Fault("drop", "RETR", 17)], lambda p: p.retr(1),
                                 pop3lite.NetworkError),
    "no terminator": ({}, [Fault("no-terminator", "RETR")], lambda p: p.retr(1),
                      pop3lite.TruncatedResponse),
    "status line over the limit": ({}, [Fault("long-line", "NOOP", 10000)],
                                   lambda p: p.noop(), pop3lite.LimitExceeded),
    "long status line": ({}, [Fault("long-line", "STAT", 2048)], lambda p: p.stat(), (1, 5954)),
    "long first LIST line": ({}, [Fault("long-line", "LIST", 300)], lambda p: p.list(),
                             pop3lite.ProtocolError),
    "bare LF everywhere": ({}, [Fault("lf")], lambda p: (p.list(), p.retr(1)),
                           ({1: 5954}, fakeserver.OPERAMAIL_MESSAGES[0])),
    "unstuffed dot line": ({"messages": [DOTS, *fakeserver.RFC_MESSAGES]},
                           [Fault("unstuffed-dot")], lambda p: p.retr(1), pop3lite.ProtocolError),
    "8-bit and NUL in a status line": ({}, [Fault("8bit", "NOOP")], lambda p: p.noop(),
                                       "8bit:\ufffd\ufffd\ufffd nul:\\x00"),
    "8-bit and NUL in a listing": ({}, [Fault("8bit", "UIDL")], lambda p: p.uidl(),
                                   pop3lite.ProtocolError),
    "8-bit in a message": (RFC, [Fault("8bit", "RETR")], lambda p: p.retr(1)[-16:],
                           b"8bit:\xe9\xff\x80 nul:\x00\r\n"),
    "huge sizes": ({}, [Fault("huge-sizes")], lambda p: (p.stat(), p.list()),
                   ((1, 5954 + 2**32), {1: 5954 + 2**32})),
    "temporary failure": ({}, [Fault("sys-temp", "RETR")], lambda p: p.retr(1),
                          pop3lite.TemporaryError),
    "permanent failure": ({}, [Fault("sys-perm", "STAT")], lambda p: p.stat(),
                          pop3lite.PermanentError),
    "two answers to NOOP": ({}, [Fault("raw", "NOOP", b"+OK\r\n+OK\r\n")], lambda p: p.noop(),
                            pop3lite.ProtocolError),
    "an answer and an -ERR": ({}, [Fault("raw", "NOOP", b"+OK\r\n-ERR surprise\r\n")],
                              lambda p: p.noop(), pop3lite.ProtocolError),
    "not POP3 at all": ({}, [Fault("raw", "NOOP", b"HTTP/1.1 400 Bad Request\r\n")],
                        lambda p: p.noop(), pop3lite.ProtocolError),
    "negative count": ({}, [Fault("raw", "STAT", b"+OK -1 5954\r\n")], lambda p: p.stat(),
                       pop3lite.ProtocolError),
    "UID too long": ({}, [Fault("raw", "UIDL", b"+OK\r\n1 " + b"u" * 71 + b"\r\n.\r\n")],
                     lambda p: p.uidl(), pop3lite.ProtocolError),
    "UID number zero": ({}, [Fault("raw", "UIDL", b"+OK 0 abc\r\n")], lambda p: p.uidl(1),
                        pop3lite.ProtocolError),
    "one byte at a time": ({}, [Fault("bytewise", "RETR")], lambda p: p.retr(1),
                           fakeserver.OPERAMAIL_MESSAGES[0]),
    "a short delay": ({}, [Fault("delay", "STAT", 0.05)], lambda p: p.stat(), (1, 5954)),
}


@pytest.mark.parametrize("name", list(FAULT_CASES))
def test_fake_server_faults(name: str) -> None:
    """Each fault gives its documented outcome, and message 2, marked for deletion before the
    fault, is gone afterwards exactly when the `with` block ended without an error (QUIT)."""
    kwargs, faults, call, expected = FAULT_CASES[name]
    kwargs = dict(kwargs)
    messages = kwargs.pop("messages", fakeserver.OPERAMAIL_MESSAGES)
    drop = fakeserver.Maildrop("fugafuga", messages)
    with FakeServer(**kwargs, users={"hogehoge": drop}, faults=faults,
                    idle_timeout=TIMEOUT) as server:
        try:
            with fake_pop(server) as pop, warnings.catch_warnings():
                warnings.simplefilter("ignore", pop3lite.SizeMismatchWarning)
                pop.login("hogehoge", "fugafuga")
                pop.dele(2)
                value = call(pop)
        except pop3lite.Error as exc:
            assert isinstance(expected, type) and isinstance(exc, expected), repr(exc)
            unlocked(drop)
            assert drop.messages == list(messages)  # no QUIT, no UPDATE
        else:
            assert value == expected
            unlocked(drop)
            assert drop.messages == [messages[0], *messages[2:]]
    assert not server.errors


def test_size_disagreement_warns_or_raises_and_the_session_goes_on(
    make_pop3_server: MakeServer,
) -> None:
    server = make_pop3_server("operamail", faults=[Fault("wrong-octets", "RETR", 9999)])
    with fake_pop(server) as pop:
        pop.login("hogehoge", "fugafuga")
        with pytest.warns(pop3lite.SizeMismatchWarning, match="announced 9999"):
            assert pop.retr(1) == fakeserver.OPERAMAIL_MESSAGES[0]
        pop.strict_size = True
        with pytest.raises(pop3lite.ProtocolError, match="announced 9999"):
            pop.retr(2)
        assert pop.stat() == (2, 10180)  # in step: the whole response was read


def test_unstuffed_dots_are_kept_or_caught_by_the_size_check(make_pop3_server: MakeServer) -> None:
    """A server that forgets dot-stuffing: a line starting with one "." is kept as it is (as
    documented), a line starting with ".." loses a dot, which the octet count catches."""
    message = b"Subject: dots\r\n\r\n..two dots\r\n.one dot\r\nend\r\n"
    users = {"hogehoge": fakeserver.Maildrop("fugafuga", [message])}
    server = make_pop3_server("operamail", users=users, faults=[Fault("unstuffed-dot")])
    with fake_pop(server) as pop:
        pop.login("hogehoge", "fugafuga")
        with pytest.warns(pop3lite.SizeMismatchWarning):
            assert pop.retr(1) == message.replace(b"..two", b".two")
        pop.strict_size = True
        with pytest.raises(pop3lite.ProtocolError, match="announced"):
            pop.retr(1)


def test_a_connection_dropped_anywhere_commits_nothing() -> None:
    """The fake server hangs up after N octets of the session, for N at either edge of every
    status line and a sample: the session fails with a pop3lite.Error, and only a QUIT that the
    server received commits the deletion."""
    with FakeServer(users={"hogehoge": operamail_drop()}) as server:
        with fake_pop(server) as pop:
            pop.login("hogehoge", "fugafuga")
            pop.dele(1)
            pop.stat(), pop.list(), pop.retr(2)
    points: set[int] = set()
    offset = 0
    for line in server.transcripts[0]:
        if line.startswith("S: "):  # the line as sent, without its CRLF (7-bit here)
            end = offset + len(line) - 3 + 2
            if line.startswith(("S: +OK", "S: -ERR")):
                points.update((offset, offset + 1, end - 1, end))
            offset = end
    rng = random.Random("drop")
    points.update(rng.sample(range(offset), 16 * SOAK))
    assert len(points) > 40
    for budget in sorted(points):
        drop = operamail_drop()
        before = drop.messages
        with FakeServer(users={"hogehoge": drop}, faults=[Fault("drop", None, budget)]) as server:
            quit_sent = False
            try:
                with fake_pop(server) as pop:
                    pop.login("hogehoge", "fugafuga")
                    pop.dele(1)
                    assert pop.stat() == (1, 4226)
                    assert pop.list() == {2: 4226}
                    assert pop.retr(2) == before[1]
                    quit_sent = True
            except pop3lite.Error:
                pass
        unlocked(drop)
        assert drop.messages == (before[1:] if quit_sent else before), budget


# =============================================================================================
# pop3lite: surplus bytes are found, never taken as the next answer
# =============================================================================================


# Bytes that come after a -ERR (nothing follows one) would answer the next command.
def test_bytes_after_an_err_put_the_session_out_of_step() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(b"-ERR no such message\r\n+OK 9 9\r\n")
        if peer.line():
            peer.send(b"+OK 2 320\r\n")
        peer.hold()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.Error):
            pop.dele(7)
        with pytest.raises(pop3lite.NetworkError, match="^connection closed"):
            pop.stat()
        pop.close()


# The same after the -ERR that answers a cancelled AUTH ("*").
def test_bytes_after_the_err_to_a_cancelled_auth() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()  # AUTH PLAIN <initial response>
        peer.send(b"+ not base64!\r\n")
        peer.line()  # "*"
        peer.send(b"-ERR cancelled\r\n+OK 9 9\r\n")
        if peer.line():
            peer.send(b"+OK 2 320\r\n")
        peer.hold()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.Error):
            pop.auth("PLAIN", "user", "password")
        with pytest.raises(pop3lite.NetworkError, match="^connection closed"):
            pop.stat()
        pop.close()


# A surplus reply after a batch's last one is found before the next command is sent.
def test_bytes_after_a_batch_put_the_session_out_of_step() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(b"+OK\r\nPIPELINING\r\n.\r\n")
        peer.line()
        peer.send(b"+OK\r\none\r\n.\r\n+OK 9 9\r\n")
        if peer.line():
            peer.send(b"+OK 2 320\r\n")
        peer.hold()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.ProtocolError, match="more than was asked"):
            list(pop.retr_many([1]))
        with pytest.raises(pop3lite.NetworkError, match="^connection closed"):
            pop.stat()
        pop.close()


# A server must wait for the answer to its challenge; anything after one is out of step.
def test_bytes_after_a_sasl_challenge_put_the_session_out_of_step() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()  # AUTH LOGIN
        peer.send(b"+ VXNlcm5hbWU6\r\n+OK logged in\r\n")
        if peer.line():  # the user name
            peer.send(b"+ UGFzc3dvcmQ6\r\n")
        if peer.line():
            peer.send(b"+OK 2 320\r\n")
        peer.hold()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.ProtocolError):
            pop.auth("LOGIN", "user", "password")
        pop.close()


# Once a batch has failed and closed the connection, nothing left in the buffer is parsed.
def test_a_failed_batch_yields_nothing_more() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(b"+OK\r\nPIPELINING\r\n.\r\n")
        peer.line()
        peer.send(b"+OK\r\none\r\n.\r\n+OKAY\r\n+OK\r\nforged\r\n.\r\n")
        peer.hold()

    with scripted(script) as port:
        pop = connect(port, pipeline_window=2)
        batch = pop.retr_many([1, 2, 3])
        assert next(batch).data == b"one\r\n"
        with pytest.raises(pop3lite.ProtocolError):
            next(batch)
        assert "closed" in repr(pop)
        with pytest.raises(pop3lite.NetworkError, match="^connection closed"):
            next(batch)
        pop.close()

# =============================================================================================
# pop3lite: limits
# =============================================================================================


# A body announced as large and arriving with its status line is still held to the limit.
def test_a_body_announced_as_large_is_still_held_to_the_limit() -> None:
    body = b"x" * 4998 + b"\r\n"
    with scripted(answer_then(b"+OK 2000000 octets\r\n" + body + b".\r\n")) as port:
        pop = connect(port, max_message_size=1000)
        with pytest.raises(pop3lite.LimitExceeded):
            pop.retr(1)
        pop.close()


# Received octets extend the deadline, but silence never lasts longer than the timeout.
def test_silence_after_a_burst_times_out() -> None:
    chunk = (b"y" * 78 + b"\r\n") * 13108  # about 1 MiB

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        if peer.line():
            peer.send(b"+OK\r\n" + chunk)
            peer.hold()

    with scripted(script) as port:
        pop = connect(port, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(pop3lite.Timeout):
            pop.retr(1)
        assert time.monotonic() - started < 0.5 + SLACK
        pop.close()


# retr_to() streams without a limit unless given max_size; with it, an endless stream ends.
def test_retr_to_against_an_endless_stream_ends() -> None:
    chunk = memoryview((b"y" * 78 + b"\r\n") * 13108)

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        if peer.line():
            peer.send(b"+OK\r\n")
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and peer.send(chunk):
                pass

    with scripted(script) as port:
        pop = connect(port, timeout=0.5, max_message_size=1024 * 1024)
        started = time.monotonic()
        with pytest.raises(pop3lite.LimitExceeded):
            pop.retr_to(1, NullFile(), max_size=1024 * 1024)
        assert time.monotonic() - started < 0.5 + SLACK
        pop.close()


# A message number listed twice is an error, not a silently merged dict entry.
@pytest.mark.parametrize("verb", ["LIST", "UIDL"])
def test_duplicate_message_numbers_are_not_silently_merged(verb: str) -> None:
    body = b"1 100\r\n1 200\r\n.\r\n" if verb == "LIST" else b"1 aaa\r\n1 bbb\r\n.\r\n"
    with scripted(answer_then(b"+OK\r\n" + body)) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.ProtocolError):
            pop.list() if verb == "LIST" else pop.uidl()
        pop.close()
