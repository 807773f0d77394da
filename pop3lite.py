"""pop3lite: a strict, secure POP3 client in one file, standard library only.

    import pop3lite
    with pop3lite.POP3("pop.example.com") as pop:   # TLS on port 995, certificate verified
        pop.login("user", "password")
        for number, size in pop.list().items():
            print(number, size, pop.message(number)["Subject"])

Copy this file into a project or run it: ``python pop3lite.py HOST USER`` checks a mailbox.
RFC 1939 (POP3), 2449 (CAPA, response codes, PIPELINING), 2595 and 8314 (TLS), 5034 (SASL),
6856 (UTF8).
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import contextlib
import re
import socket
import sys
import time
from collections import deque
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    NoReturn,
    Sequence,
    TypeVar,
    Union,
    cast,
    overload,
)

if TYPE_CHECKING:  # imported lazily at run time: a minimal Python may lack them
    import argparse
    import http.server
    import logging
    import ssl
    import subprocess
    from email.message import EmailMessage

__version__ = "0.2.0"

__all__ = [
    "POP3",
    "Capabilities",
    "Stat",
    "Fetched",
    "Streamed",
    "UIDList",
    "Error",
    "ServerError",
    "TemporaryError",
    "InUseError",
    "LoginDelayError",
    "PermanentError",
    "AuthenticationError",
    "ProtocolError",
    "LimitExceeded",
    "TruncatedResponse",
    "NetworkError",
    "TLSError",
    "Timeout",
    "InsecureError",
    "OAuth2Error",
    "SizeMismatchWarning",
    "repair_encoded_words",
    "create_tls_context",
    "Response",
    "ReplyReader",
    "Expected",
    "StatusLine",
    "Challenge",
    "BodyPiece",
    "BodyEnd",
    "NEED_DATA",
    "STATUS_MODE",
    "WHOLE_BODY_MODE",
    "STREAMED_BODY_MODE",
    "BODY_END_MODE",
    "SaslExchange",
    "DeliveryError",
    "Destination",
    "Maildir",
    "Mbox",
    "MDA",
    "SaveReport",
    "save",
    "OAuth2",
    "main",
]


# =============================================================================================
# Constants
# =============================================================================================

POP3_PORT = 110
POP3S_PORT = 995  # RFC 8314 section 7: implicit TLS

DEFAULT_TIMEOUT = 30.0
"""Seconds one operation may take. A deadline for the whole operation, not for each recv."""

MIN_TRANSFER_RATE = 64 * 1024
"""Octets per second that extend the deadline of a message transfer.

A 50 MB message over a slow link needs more than DEFAULT_TIMEOUT, so every octet received adds
1/MIN_TRANSFER_RATE seconds. A server trickling one byte a second gains nothing measurable."""

MAX_COMMAND_LENGTH = 255
"""RFC 2449 section 4: a command line is at most 255 octets including CRLF."""

MAX_RESPONSE_LINE = 8192
"""RFC 2449 section 4 caps status lines at 512 octets, but real servers send longer greetings
and CAPA lines; 8 KiB is tolerant of them and still bounds memory."""

MAX_SASL_LINE = 64 * 1024
"""RFC 5034 section 4: challenges "may be of arbitrary length"; SCRAM and OAuth ones are short."""

MAX_SASL_ROUNDS = 16
"""No mechanism here needs more than three challenges; a server that keeps asking is broken."""

DEFAULT_MAX_MESSAGE_SIZE = 100 * 1024 * 1024
"""Largest message retr() or top() holds in memory; retr_to() streams and has no limit."""

MAX_LISTING_SIZE = 16 * 1024 * 1024
"""Largest LIST, UIDL or CAPA response: about a million messages (parsed, some 100 MB)."""

MAX_UID_LENGTH = 70  # RFC 1939 section 7, UIDL

PIPELINE_WINDOW = 1024
"""Commands in flight in retr_many() and friends when the server advertises PIPELINING: enough
to cover a 10 ms round trip at the rate the client parses small messages."""

PIPELINE_MEMORY = 8 * 1024 * 1024
"""Octets of responses a batch lets into flight (by LIST sizes when known, else by the average
so far; before the first answer, by STAT's maildrop size or max_message_size if they are small):
the most an interrupted batch has to hold in memory, besides the message at hand."""

PIPELINE_WINDOW_BYTES = 16 * 1024
"""Octets of unanswered commands. Kept below the receive buffer of any common server (64 KiB
and up) so a write never blocks while the server is blocked writing responses that we are not
reading: no deadlock."""

STREAM_CHUNK = 256 * 1024
"""retr_to() writes the message in pieces of about this size."""

RECV_SIZE = 256 * 1024
"""Octets the reader's buffer starts with and grows by; a body announced as larger than this
gets a buffer of its announced size (bounded by the limit), so it is received and copied once."""

TLS_MODES = ("auto", "implicit", "starttls", "none")
# Seconds a server on a port other than 110 and 995 gets to greet in plaintext (auto mode)
# before implicit TLS is tried: greetings come within a second; a TLS-first port never greets.
_GREETING_WAIT = 3.0

_T = TypeVar("_T")
_DEBUG = 10  # logging.DEBUG, without importing logging at module import time


# =============================================================================================
# Errors
# =============================================================================================


class Error(Exception):
    """Base class of every error pop3lite raises (besides ValueError for caller mistakes).

    ``reason`` is a short fixed word saying why, for programs to act on (the message is for
    people and may change): e.g. TLSError "certificate", "hostname", "not-tls", "no-stls";
    NetworkError "resolve", "connect", "closed"; Timeout "connect", "handshake", "read".
    Empty where the class says it all.
    """

    reason: str = ""

    def __init__(self, *args: Any, reason: str = "") -> None:
        super().__init__(*args)
        if reason:
            self.reason = reason


class ServerError(Error):
    """The server answered -ERR.

    ``code`` is the RFC 2449 / RFC 3206 response code (``"IN-USE"``, ``"SYS/TEMP"``...) or None,
    ``text`` the rest of the server's line, ``command`` the verb that failed (never arguments).
    """

    def __init__(
        self,
        text: str,
        code: str | None = None,
        command: str = "",
        *,
        message: str | None = None,
    ) -> None:
        self.text = text
        self.code = code
        self.command = command
        shown = f"[{code}] {text}" if code else text
        where = f" to {command}" if command else ""
        # ``message`` is for a refusal that did not come as a -ERR line (a SCRAM "e=" inside
        # the exchange): the message never claims the server said what it did not.
        super().__init__(message or f"server said -ERR{where}: {shown}")


class TemporaryError(ServerError):
    """[SYS/TEMP]: a transient condition; trying again later may work."""


class InUseError(TemporaryError):
    """[IN-USE]: the maildrop is locked by another session (RFC 2449 section 8.1.2)."""


class LoginDelayError(TemporaryError):
    """[LOGIN-DELAY]: logged in too soon after the last login (RFC 2449 section 8.1.1)."""


class PermanentError(ServerError):
    """[SYS/PERM]: a permanent condition; retrying will not help (RFC 3206)."""


class AuthenticationError(ServerError):
    """The credentials were refused ([AUTH], or -ERR to USER, PASS, APOP or AUTH)."""

    details: dict[str, Any] | None = None
    """The decoded JSON error an OAuth2 server sent, when there was one."""


class ProtocolError(Error):
    """The server sent bytes that are not POP3. ``data`` holds (the start of) those bytes."""

    def __init__(self, message: str, data: bytes = b"", *, reason: str = "") -> None:
        self.data = bytes(data[:200])
        if data:
            message = f"{message}: {self.data!r}"
        super().__init__(message, reason=reason)


class LimitExceeded(ProtocolError):
    """A line or response exceeded a configured limit; the connection was closed."""


class NetworkError(Error, ConnectionError):
    """The connection failed, was closed, or is no longer usable."""


class TruncatedResponse(ProtocolError, NetworkError):
    """The server closed the connection in the middle of a response."""


class TLSError(NetworkError):
    """TLS could not be established or verified, or STLS was refused or tampered with."""


class Timeout(Error, TimeoutError):
    """An operation did not complete before its deadline; the connection was closed."""


class InsecureError(Error):
    """A password or token would cross an unencrypted link; pass tls="none" to allow it.

    ``what`` names what would have crossed in clear ("a password", "a PLAIN credential")."""

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message, reason="plaintext")
        self.what = what


class OAuth2Error(Error):
    """No OAuth2 access token could be had. ``reason``: "sign-in" (the provider refused: the
    refresh token expired or was revoked, the sign-in was declined or timed out; sign in
    again), "endpoint" (the token endpoint could not be reached, or answered with something
    that is not OAuth2: a 5xx, HTML, a huge body), "token-file" (the file is damaged, locked,
    or made for another account or provider), "permissions" (the file is open to others).
    ``error`` and ``description`` are the provider's words (RFC 6749 section 5.2), AADSTS
    codes included."""

    def __init__(self, message: str, *, reason: str, error: str = "", description: str = ""):
        super().__init__(message, reason=reason)
        self.error = error
        self.description = description


class DeliveryError(Error):
    """A delivery command (MDA) failed: the message stays on the server and save() stops.
    ``reason``: "tempfail" (exit status 75, EX_TEMPFAIL: try again later), "failed" (another
    status, or killed by a signal), "timeout" (it ran out of time and was killed), "start" (it
    could not be started). ``status``: its exit status (negative: the signal), or None."""

    def __init__(self, message: str, *, reason: str, status: int | None = None) -> None:
        super().__init__(message, reason=reason)
        self.status = status


class SizeMismatchWarning(UserWarning):
    """A message's length differs from the size the server announced for it."""


_CODE_CLASSES: dict[str, type] = {
    "IN-USE": InUseError,
    "LOGIN-DELAY": LoginDelayError,
    "SYS/TEMP": TemporaryError,
    "SYS/PERM": PermanentError,
    "AUTH": AuthenticationError,
}
_AUTH_COMMANDS = frozenset({"USER", "PASS", "APOP", "AUTH"})


def server_error(text: str, code: str | None, command: str) -> ServerError:
    """The ServerError subclass that fits a -ERR's response code and command."""
    levels = (code or "").upper().split("/")
    cls = None
    # RFC 2449 section 8: "clients MUST ignore unknown hierarchical detail", so
    # [SYS/TEMP/DB] is a SYS/TEMP and [IN-USE/x] an IN-USE: the longest known prefix decides.
    for depth in range(len(levels), 0, -1):
        cls = _CODE_CLASSES.get("/".join(levels[:depth]))
        if cls is not None:
            break
    if cls is None:
        system = levels[0] == "SYS"  # a system problem, not a credential one, whatever the verb
        cls = AuthenticationError if command in _AUTH_COMMANDS and not system else ServerError
    error: ServerError = cls(text, code, command)
    return error


# =============================================================================================
# Text shown to people: server text made safe, charsets that lie
# =============================================================================================
#
# Whatever a server sends may reach a terminal or a log. Every string shown to people passes
# printable(): one set of unsafe characters, one escape format. The charset guesses serve the
# seed's mail (Shift_JIS labelled ISO-2022-JP) and its like. This section comes before the
# protocol: server text in errors and replies is made safe here.

# Characters that must not reach a terminal as they are: C0 controls but TAB (escape
# sequences, and CR/LF that would forge a line), DEL, C1 controls, and the bidirectional marks
# and overrides that can make text display in a misleading order (Unicode TR 9).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    # Python's own escapes, whose length says where they end: \x1b, \u202e (never \x202e,
    # which would read as \x20 followed by "2e").
    return match.group().encode("unicode_escape").decode("ascii")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal or into a log: unsafe characters escaped."""
    return _UNSAFE.sub(_escape, text)


def display_text(data: bytes) -> str:
    """Server bytes as text safe to show: UTF-8 where valid (U+FFFD elsewhere), escaped."""
    return printable(data.decode("utf-8", "replace"))


def _escaped(data: bytes) -> str:
    """Bytes as printable ASCII: non-ASCII bytes as \\xNN, controls escaped (a raw view)."""
    return printable(data.decode("ascii", "backslashreplace"))


# RFC 2047 section 2: encoded-word = "=?" charset "?" encoding "?" encoded-text "?=". The
# B-text may be broken by a fold, as real mailers did (the seed's message 2 does).
_ENCODED_WORD = re.compile(rb"=\?([!-~]+?)\?([bB])\?([A-Za-z0-9+/=\r\n\t ]*?)\?=")
_FALLBACK_CHARSETS = ("utf-8", "cp932")  # valid UTF-8 is rarely an accident; then Shift_JIS


def repair_encoded_words(header: bytes) -> bytes:
    """Relabel RFC 2047 B-encoded words whose bytes do not decode in their declared charset.

    A Japanese mailer of 2002 sent Shift_JIS bytes labelled ISO-2022-JP; a reader shows
    mojibake. A word that fails to decode strictly in its charset but decodes in CP932 or
    UTF-8 is re-encoded with that label, and white space inside its base64 is dropped.
    Words that decode as declared are left exactly as they are.
    """
    import base64
    import binascii

    def fix(match: re.Match[bytes]) -> bytes:
        charset = match.group(1).split(b"*")[0].decode("ascii").lower()  # RFC 2231 language
        text = re.sub(rb"\s+", b"", match.group(3))
        try:
            raw = base64.b64decode(text + b"=" * (-len(text) % 4))
        except binascii.Error:
            return match.group(0)
        import codecs

        try:
            if not codecs.lookup(charset)._is_text_encoding:  # e.g. "base64", "zlib"
                return match.group(0)
            raw.decode(charset)
        except LookupError:
            return match.group(0)
        except UnicodeError:  # some codecs raise the parent class, not UnicodeDecodeError
            for fallback in _FALLBACK_CHARSETS:
                try:
                    raw.decode(fallback)
                except UnicodeDecodeError:
                    continue
                return b"=?%s?B?%s?=" % (fallback.encode(), base64.b64encode(raw))
            return match.group(0)
        if text == match.group(3):
            return match.group(0)
        return b"=?%s?B?%s?=" % (match.group(1), text)

    return _ENCODED_WORD.sub(fix, header)


# =============================================================================================
# Protocol core: bytes in, values out. Nothing here touches a socket.
# =============================================================================================


class Stat(NamedTuple):
    """STAT: the number of messages and their total size in octets."""

    count: int  # type: ignore[assignment]  # shadows tuple.count; the name users expect
    size: int


class Fetched(NamedTuple):
    """One result of retr_many(), top_many() or dele_many(), in the order asked.

    ``data`` is the message (None for DELE or after an error); ``error`` the -ERR, if any.
    """

    number: int
    data: bytes | None
    error: ServerError | None


class Streamed(NamedTuple):
    """One result of retr_many_to(), in the order asked: the octets the server sent (CRLF line
    ends, dot-stuffing removed) and the error, if any: a ServerError for a -ERR, LimitExceeded
    for a message over ``max_size`` (read to its end and discarded; the batch goes on)."""

    number: int
    octets: int
    error: Error | None


class UIDList(Dict[int, str]):
    """UIDL: ``{number: uid}``. ``duplicates`` maps each UID that several messages share to
    their numbers (RFC 1939 forbids it, real servers do it; inverting this dict would lose mail).
    """

    def __init__(self, items: Iterable[tuple[int, str]] = ()) -> None:
        super().__init__(items)
        seen: dict[str, list[int]] = {}
        for number, uid in self.items():
            seen.setdefault(uid, []).append(number)
        self.duplicates: dict[str, list[int]] = {u: n for u, n in seen.items() if len(n) > 1}


class Capabilities(Dict[str, List[str]]):
    """CAPA (RFC 2449): ``{NAME: [arguments]}`` with names upper-cased, plus typed access."""

    @property
    def sasl(self) -> list[str]:
        """The SASL mechanisms offered, upper-cased (RFC 5034 section 6)."""
        return [m.upper() for m in self.get("SASL", [])]

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self

    @property
    def stls(self) -> bool:
        return "STLS" in self

    @property
    def utf8(self) -> bool:
        return "UTF8" in self

    @property
    def utf8_user(self) -> bool:
        """UTF8 USER: UTF-8 user names and passwords are accepted (RFC 6856 section 2.2)."""
        return "USER" in (a.upper() for a in self.get("UTF8", []))

    @property
    def login_delay(self) -> int | None:
        """Minimum seconds between logins (RFC 2449 section 6.5), or None."""
        args = self.get("LOGIN-DELAY", [])
        return int(args[0]) if args and re.fullmatch("[0-9]{1,10}", args[0]) else None

    @property
    def expire(self) -> str | None:
        """Days the server keeps retrieved mail, "NEVER", or None (RFC 2449 section 6.7)."""
        args = self.get("EXPIRE", [])
        return args[0] if args else None

    @property
    def implementation(self) -> str | None:
        args = self.get("IMPLEMENTATION")
        return " ".join(args) if args else None


def parse_status(line: bytes) -> tuple[bool, bytes]:
    """Split a status line (its line end removed) into (is +OK, the text after the indicator).

    RFC 1939 section 3: "+OK" or "-ERR", then optionally a space and text. Anything else
    (``+ok``, ``+OKAY``, ``-ERROR``) is not POP3 and raises ProtocolError.
    """
    if line[:3] == b"+OK" and (len(line) == 3 or line[3:4] == b" "):
        return True, line[4:]
    if line[:4] == b"-ERR" and (len(line) == 4 or line[4:5] == b" "):
        return False, line[5:]
    raise ProtocolError("expected +OK or -ERR from the server", line)


# RFC 2449 section 8: resp-code = "[" resp-level *("/" resp-level) "]"
_RESP_CODE = re.compile(rb"\[([!-.0-\\^-~]+(?:/[!-.0-\\^-~]+)*)\] ?")


def parse_response_code(text: bytes) -> tuple[str | None, bytes]:
    """Split off an RFC 2449 response code: ``b"[IN-USE] busy"`` -> ("IN-USE", b"busy")."""
    match = _RESP_CODE.match(text)
    if match is None:
        return None, text
    return match.group(1).decode("ascii").upper(), text[match.end() :]


def refusal(text: bytes, command: str) -> ServerError:
    """The ServerError for a -ERR whose text (after "-ERR ") is ``text``: its response code
    split off, the rest made safe to show."""
    code, rest = parse_response_code(text)
    return server_error(display_text(rest), code, command)


# RFC 1939 section 5: STAT's "+OK" SP count SP size, and a LIST "scan listing" msg-number SP
# size; both may be followed by more text after a space (some servers add it).
_TWO_NUMBERS = re.compile(rb"(\d{1,20}) (\d{1,20})(?: .*)?\Z", re.S)
# RFC 1939 section 7: unique-id listing = msg-number SP uid; uid is 1-70 chars 0x21-0x7E.
_UID_LISTING = re.compile(rb"(\d{1,20}) ([!-~]{1,%d})\Z" % MAX_UID_LENGTH)
_OCTETS = re.compile(rb"(\d{1,20}) octets", re.I)


def parse_stat(text: bytes) -> Stat:
    """The text of a STAT +OK (``b"2 10180"``) as Stat(count, size)."""
    match = _TWO_NUMBERS.match(text)
    if match is None:
        raise ProtocolError("malformed STAT response", text)
    return Stat(int(match.group(1)), int(match.group(2)))


def parse_scan_listing(line: bytes) -> tuple[int, int]:
    """One LIST line (``b"1 5954"``) as (number, size)."""
    match = _TWO_NUMBERS.match(line)
    if match is None or int(match.group(1)) < 1:
        raise ProtocolError("malformed LIST line", line)
    return int(match.group(1)), int(match.group(2))


def parse_uid_listing(line: bytes) -> tuple[int, str]:
    """One UIDL line (``b"1 whqtswO00WBw418f9t5JxYwZ"``) as (number, uid)."""
    match = _UID_LISTING.match(line)
    if match is None or int(match.group(1)) < 1:
        raise ProtocolError("malformed UIDL line", line)
    return int(match.group(1)), match.group(2).decode("ascii")


_Value = TypeVar("_Value")


def unique_listing(pairs: Iterable[tuple[int, _Value]], what: str) -> dict[int, _Value]:
    """LIST or UIDL lines as ``{number: value}``. A number listed twice is a ProtocolError:
    a dict would silently keep only the last line."""
    listing: dict[int, _Value] = {}
    for number, value in pairs:
        if number in listing:
            raise ProtocolError(f"{what} lists message {number} twice")
        listing[number] = value
    return listing


def parse_capabilities(lines: Iterable[bytes]) -> Capabilities:
    """CAPA lines as Capabilities. Tolerant: undecodable bytes are replaced, not fatal."""
    caps = Capabilities()
    for line in lines:
        words = line.decode("utf-8", "replace").split()
        if words:  # a repeated capability (two SASL lines) adds its arguments
            caps.setdefault(words[0].upper(), []).extend(words[1:])
    return caps


def parse_announced_size(text: bytes) -> int | None:
    """The size a RETR +OK announces (``b"5954 octets"``), or None; informational only."""
    match = _OCTETS.match(text)
    return int(match.group(1)) if match else None


# RFC 1939 section 7 requires the APOP timestamp to have the syntax of an RFC 822 msg-id.
# Accepting only printable ASCII without spaces and angle brackets inside blocks the
# CVE-2007-1558 attack, which needs a server-chosen timestamp with arbitrary bytes.
_APOP_TIMESTAMP = re.compile(rb"<[!-;=?A-~]+@[!-;=?A-~]+>")


def find_apop_timestamp(greeting: bytes) -> str | None:
    """The APOP challenge in a greeting (``<1896.697170952@dbc.mtview.ca.us>``), or None.

    Only the first ``<...>`` counts; if it does not have the msg-id shape there is no timestamp.
    """
    start = greeting.find(b"<")
    end = greeting.find(b">", start)
    if start < 0 or end < 0:
        return None
    candidate = greeting[start : end + 1]
    if not _APOP_TIMESTAMP.fullmatch(candidate):
        return None
    return candidate.decode("ascii")


def apop_digest(timestamp: str, password: str) -> str:
    """RFC 1939 section 7: lower-case hex MD5 of the timestamp followed by the password."""
    import hashlib

    data = (timestamp + password).encode("utf-8")
    try:  # APOP's MD5 is not a security primitive here: allow it on FIPS builds (3.9+)
        digest = hashlib.md5(data, usedforsecurity=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        digest = hashlib.md5(data)
    return digest.hexdigest()


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; no DNS, no ipaddress import."""
    address = address.split("%")[0].lower()
    if address.startswith("::ffff:"):
        address = address[7:]
    return address.startswith("127.") or address == "::1"


# RFC 2449 section 9: keyword = 3*4VCHAR. Checked so that no verb carries a space, a line end
# or a second command; a few servers have longer extension verbs, so up to 40 are allowed.
_KEYWORD = re.compile("[!-~]{3,40}")


def format_command(verb: str, *args: str, encoding: str = "ascii") -> bytes:
    """One command line, CRLF-terminated. The only place that builds a command line.

    Raises ValueError, before anything is sent, for a verb that is not a keyword, for CR, LF or
    NUL in any argument (they would smuggle a second command onto the wire) and for lines over
    255 octets (RFC 2449 section 4).
    """
    if not _KEYWORD.fullmatch(verb):
        raise ValueError(f"not a POP3 keyword: {verb[:8]!r}")
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"POP3 arguments must be str, not {type(arg).__name__}")
        if "\r" in arg or "\n" in arg or "\0" in arg:
            raise ValueError(f"argument to {verb} contains CR, LF or NUL")
    try:
        line = " ".join((verb, *args)).encode(encoding) + b"\r\n"
    except UnicodeEncodeError:
        line = b""
    if not line:
        # Raised outside the except block: the UnicodeEncodeError holds the whole line (maybe a
        # password) and would ride along as __context__.
        raise ValueError(f"argument to {verb} is not {encoding}")
    if len(line) > MAX_COMMAND_LENGTH:
        raise ValueError(f"{verb} command is {len(line)} octets; POP3 allows {MAX_COMMAND_LENGTH}")
    return line


def format_numbered(verb: str, *extra: str, encoding: str = "ascii") -> Callable[[int], bytes]:
    """``format_command(verb, str(number), *extra)`` as a function of a message number, for
    batches: the verb and ``extra`` are checked once, here; a number adds only digits."""
    sample = format_command(verb, "0", *extra, encoding=encoding)
    split = len(verb.encode(encoding)) + 1  # where the "0" is
    head, tail = sample[:split], sample[split + 1 :]

    def format_line(number: int) -> bytes:
        line = b"%s%d%s" % (head, number, tail)
        if len(line) > MAX_COMMAND_LENGTH:
            limit = MAX_COMMAND_LENGTH
            raise ValueError(f"{verb} command is {len(line)} octets; POP3 allows {limit}")
        return line

    return format_line


def message_number(number: int) -> str:
    """A message number as a command argument; ValueError unless it is a positive int."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"message number must be a positive integer, not {number!r}")
    return str(number)


def find_body_end(
    buf: bytes | bytearray, start: int, search_from: int, eol: bytes, end: int | None = None
) -> int:
    """Where the body of a multi-line response that starts at ``start`` ends, or -1.

    Returns the index just past the last body line's line end (the terminating ``.`` line
    begins there). ``start`` must be at the start of a line; ``search_from`` lets a caller that
    already searched part of the buffer skip it; nothing at or past ``end`` is looked at.
    ``eol`` is CRLF, or LF for a bare-LF server.
    """
    if end is None:
        end = len(buf)
    dot_line = b"." + eol
    if buf.startswith(dot_line, start, end):
        return start
    index = buf.find(eol + dot_line, max(start, search_from), end)
    return -1 if index < 0 else index + len(eol)


def unstuff(data: bytes, eol: bytes = b"\r\n", at_line_start: bool = True) -> bytes:
    """Remove RFC 1939 section 3 byte-stuffing: a leading "." of a line that starts with ".".

    Done in bulk with one replace; ``data`` must end at a line end (or hold no line end).
    A line that starts with a single "." (a server bug) is kept as it is.
    """
    if at_line_start and data.startswith(b".."):
        data = data[1:]
    return data.replace(eol + b"..", eol + b".")


# A line end followed by a dot, per line end: the regular expression engine finds it faster
# than bytes.find() does (it looks for the first octet, then compares).
_DOT_LINE = {b"\r\n": re.compile(rb"\r\n\."), b"\n": re.compile(rb"\n\.")}

# Below this many octets per stuffed line, one replace() over a copy beats a loop per line.
_DENSE_STUFFING = 256


def cut_out(buf: bytearray, start: int, end: int, offsets: Iterable[int]) -> bytes:
    """``buf[start:end]`` without the octets at ``offsets`` (from ``start``, ascending), as
    bytes copied once. The slices between them are first moved together inside ``buf``, which
    is overwritten: no memory is needed beyond the result. (The slices of ``view`` that are
    moved are released as soon as they are moved: CPython frees them at once.)"""
    with memoryview(buf) as view:
        write = -1  # where the next kept slice goes, once the first octet is cut out
        read = start
        for offset in offsets:
            cut = start + offset
            if write < 0:
                write = cut
            elif cut > read:
                view[write : write + cut - read] = view[read:cut]  # overlapping: a memmove
                write += cut - read
            read = cut + 1
        if write < 0:
            write = read = end
        elif end > read:
            view[write : write + end - read] = view[read:end]
            write += end - read
        with view[start:write] as part:
            return bytes(part)


def unstuff_slice(
    buf: bytearray, start: int, end: int, eol: bytes = b"\r\n", at_line_start: bool = True
) -> bytes:
    """``unstuff(buf[start:end])``, copied once instead of twice; ``buf[start:end]`` is
    overwritten (see cut_out). Mail has few lines that start with a dot; where nearly every
    line does, one replace() over a copy is faster than a loop per line."""
    stuffed = eol + b".."
    offsets = [0] if at_line_start and buf.startswith(b"..", start, end) else []
    index = buf.find(stuffed, start, end)
    while index >= 0:
        if len(offsets) >= 64 and index - start < _DENSE_STUFFING * len(offsets):
            return unstuff(cut_out(buf, start, end, ()), eol, at_line_start)
        dot = index + len(eol)  # the stuffing dot, left out
        offsets.append(dot - start)
        index = buf.find(stuffed, dot + 1, end)
    return cut_out(buf, start, end, offsets)


def to_crlf(data: bytes) -> bytes:
    """Bare-LF line ends as CRLF (for servers that send LF only)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def safe_cut(buf: bytes | bytearray, start: int, end: int, eol: bytes) -> tuple[int, bool]:
    """Where a streaming reader may cut ``buf[start:end]`` without splitting a line end, a
    stuffed dot or the terminator: (cut index, whether the cut is at the start of a line)."""
    index = buf.rfind(eol, start, end)
    if index >= 0:
        return index + len(eol), True
    # One long line: keep a trailing CR, which may begin the next line end.
    cut = end - 1 if buf[end - 1 : end] == b"\r" else end
    return cut, False


# -- Framing: a sans-I/O reader of server replies -----------------------------------------
#
# RFC 1939 section 3: a reply is a status line ("+OK" or "-ERR", text, CRLF); after +OK some
# commands send a multi-line body, ended by a line holding a single "."; a body line that
# starts with "." is sent with one more "." in front (byte-stuffing). RFC 5034 section 4 adds
# the SASL continuation, "+" SP base64 CRLF, which asks the client for an answer.
#
# ReplyReader knows all of that and nothing about sockets: the caller says which replies it
# expects (expect()), puts the server's bytes into the reader (feed(), or receive_buffer()
# and received() to receive straight into it) and asks for events (next_event()) until the
# reply it wants is complete. Every framing rule is enforced here, once: line limits, bare
# CR, bare-LF servers, dot-unstuffing, body limits, and "nothing may follow": bytes beyond
# the replies that were asked for mean the server and the client are out of step.


class StatusLine(NamedTuple):
    """A reply's status line: ``ok`` for +OK, ``text`` what follows the indicator."""

    ok: bool
    text: bytes


class Challenge(NamedTuple):
    """A SASL continuation line (RFC 5034 section 4): ``data`` is the base64 after "+ "."""

    data: bytes


class BodyPiece(NamedTuple):
    """Part of a multi-line body, dot-stuffing removed, CRLF line ends; in order."""

    data: bytes


class BodyEnd(NamedTuple):
    """The multi-line body is complete; ``octets`` is its size as delivered."""

    octets: int


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""next_event()'s answer when the reader needs more bytes from the server."""

ReplyEvent = Union[StatusLine, Challenge, BodyPiece, BodyEnd]


class Expected(NamedTuple):
    """One reply the reader is to expect, in the order the commands were sent.

    ``multiline``: a body follows a +OK. ``sasl``: the reply may be a continuation.
    ``limit``: the longest body accepted. ``stream``: deliver the body in pieces of about
    STREAM_CHUNK octets instead of whole (memory stays flat). ``last``: the session ends with
    this reply (QUIT), so whatever follows it is never read and does not matter.
    """

    multiline: bool = False
    sasl: bool = False
    limit: int = MAX_LISTING_SIZE
    stream: bool = False
    last: bool = False


_SINGLE_LINE = Expected()
_SASL_REPLY = Expected(sasl=True)
_LAST_REPLY = Expected(last=True)


class _ReceiveBuffer:
    """The server's bytes received and not yet read, in one bytearray: ``buf[start:end]`` is
    unread, and ``search`` is where the next search for a line end or terminator begins (so
    no byte is searched twice while a reply arrives). Consumed bytes are dropped from the
    front and never copied again."""

    __slots__ = ("buf", "start", "end", "search", "receive_size", "min_receive")

    def __init__(self, receive_size: int) -> None:
        self.receive_size = receive_size
        self.min_receive = min(4096, receive_size)  # less free space than this: make room
        self.buf = bytearray(receive_size)
        self.start = self.end = self.search = 0

    @property
    def pending(self) -> int:
        return self.end - self.start

    def unread(self) -> bytes:
        return bytes(self.buf[self.start : self.end])

    def space(self) -> memoryview:
        """Free space at the end, to receive into (see ReplyReader.receive_buffer)."""
        if len(self.buf) - self.end < self.min_receive:
            self.make_room(max(self.min_receive, self.receive_size // 4))
        return memoryview(self.buf)[self.end :]

    def make_room(self, want: int) -> None:
        """Make ``want`` octets of free space after the unread bytes. For a large body of
        known size the buffer is replaced by one of that size; otherwise it grows in
        receive_size steps (the bytearray over-allocates by an eighth), so a body costs
        little more than its size."""
        unread = self.end - self.start
        if unread + want > 2 * len(self.buf):
            fresh = bytearray(unread + want)
            with memoryview(self.buf) as view, view[self.start : self.end] as part:
                fresh[:unread] = part
            self.buf = fresh
        else:
            if self.start:  # the unread part of a reply: small, or moved once per reply
                self.buf[:unread] = self.buf[self.start : self.end]
            if len(self.buf) - unread < want:
                steps = -(-(want - len(self.buf) + unread) // self.receive_size)
                self.buf += bytes(self.receive_size) * steps
        self.search -= self.start
        self.start = 0
        self.end = unread

    def shrink(self) -> None:
        """Between replies: start over when all is read, and give back a large body's memory."""
        if self.start == self.end:
            self.start = self.end = self.search = 0
        if len(self.buf) > 4 * self.receive_size and self.pending < self.receive_size:
            fresh = bytearray(self.receive_size)
            fresh[: self.pending] = self.buf[self.start : self.end]
            self.search -= self.start
            self.end -= self.start
            self.start = 0
            self.buf = fresh


# The reader's modes: what the next unread byte belongs to.
STATUS_MODE = "status line"  # a status line (or a SASL challenge), between replies
WHOLE_BODY_MODE = "whole body"  # a body delivered as one BodyPiece
STREAMED_BODY_MODE = "streamed body"  # a body delivered in pieces of about STREAM_CHUNK
BODY_END_MODE = "body end"  # the body's last piece was delivered; its BodyEnd is next


class _WholeBody:
    """A body delivered whole (limit: the most octets accepted), found in one scan for line
    ends followed by a dot: a second dot is stuffing (its offset kept, cut out at the end), a
    line end the terminator. A body where nearly every line is stuffed is scanned twice
    instead (find_body_end, then unstuff_slice), which is faster for it."""

    __slots__ = ("eol", "limit", "status_text", "stuffed", "first_line")

    def __init__(self) -> None:
        self.start(b"\r\n", 0, b"")

    def start(self, eol: bytes, limit: int, status_text: bytes) -> None:
        """Begin a body (one object serves every body of a session: none is made per reply)."""
        self.eol = eol
        self.limit = limit
        self.status_text: bytes | None = status_text  # for presizing, until it is done
        self.stuffed: list[int] | None = []  # offsets of stuffed dots; None: scan twice
        self.first_line = True  # the first line is yet to be looked at

    def read(self, rb: _ReceiveBuffer) -> bytes | None:
        """The body (dot-stuffing removed, CRLF line ends), or None until it has arrived."""
        end = None if self.stuffed is None else self._scan(rb)
        if end is None:  # dense stuffing: scan twice
            end = self._find_end(rb)
        if end < 0:
            self._need_more(rb)
            return None
        start, skip = rb.start, len(self.eol)
        rb.start = rb.search = end + skip + 1
        if self.stuffed is None:
            data = unstuff_slice(rb.buf, start, end, self.eol, True)
        else:
            data = cut_out(rb.buf, start, end, self.stuffed) if end > start else b""
        if skip == 1:  # a bare-LF server
            data = to_crlf(data)
        if len(data) > self.limit:
            raise LimitExceeded(f"response larger than {self.limit} octets")
        return data

    def _scan(self, rb: _ReceiveBuffer) -> int | None:
        """Where the terminator begins (-1: not yet known), noting stuffed dots on the way;
        None when the stuffing is dense enough to be worth the other way."""
        buf, start, end, eol, stuffed = rb.buf, rb.start, rb.end, self.eol, self.stuffed
        assert stuffed is not None
        skip = len(eol)
        last = end - 1 - skip  # the last place a "." line can begin and be told apart
        if self.first_line:  # it has no line end before it
            if start > last:
                return -1
            self.first_line = False
            if buf[start] == 46:  # "."
                if buf[start + 1] == 46:
                    stuffed.append(0)
                elif buf.startswith(eol, start + 1):
                    return start
        search = _DOT_LINE[eol].search
        found = search(buf, max(start, rb.search), end)
        while found:
            index = found.start()
            at = index + skip  # a line that starts with "."
            if at > last:  # too close to the end to tell
                rb.search = index
                return -1
            if buf[at + 1] == 46:
                stuffed.append(at - start)
                if len(stuffed) >= 64 and at - start < _DENSE_STUFFING * len(stuffed):
                    self.stuffed = None  # nearly every line: see unstuff_slice()
                    rb.search = index
                    return None
            elif buf.startswith(eol, at + 1):
                return at
            found = search(buf, at + 1, end)
        rb.search = max(start, end - skip)
        return -1

    def _find_end(self, rb: _ReceiveBuffer) -> int:
        """Where the terminator begins (-1: not yet), for a densely stuffed body."""
        end = find_body_end(rb.buf, rb.start, rb.search, self.eol, rb.end)
        if end < 0:
            rb.search = max(rb.start, rb.end - 2 * len(self.eol))
        return end

    def _need_more(self, rb: _ReceiveBuffer) -> None:
        """More of the body is needed: check its limit (on the message, so the dots that
        stuffing added do not count), and size the buffer for it once."""
        slack = len(self.eol) + 1  # the start of the terminator may be here already
        start, end = rb.start, rb.end
        if end - start > self.limit + slack:
            stuffed = rb.buf.count(self.eol + b"..", start, end)
            stuffed += rb.buf.startswith(b"..", start)
            if end - start - stuffed > self.limit + slack:
                raise LimitExceeded(f"response larger than {self.limit} octets")
        if self.status_text is not None:
            # Receive a large message into one buffer of about its size (the announced size
            # is of the unstuffed message: allow 1/64 for stuffed dots), bounded by the limit.
            # Only now that the body has not all arrived with its status line: a server may
            # announce any size.
            announced = parse_announced_size(self.status_text) or 0
            self.status_text = None
            if announced > rb.receive_size:
                size = min(announced, self.limit)
                rb.make_room(size + size // 64 + 4096)


class _StreamedBody:
    """A body delivered in pieces of about ``chunk`` octets, each cut at a line end where
    possible; no limit (the caller counts what it writes)."""

    __slots__ = ("eol", "chunk", "at_line_start")

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.start(b"\r\n")

    def start(self, eol: bytes) -> None:
        """Begin a body."""
        self.eol = eol
        self.at_line_start = True  # the next unread byte begins a body line

    def read(self, rb: _ReceiveBuffer) -> tuple[bytes, bool] | None:
        """(a piece, whether it is the last), or None until more has arrived."""
        buf, start, end, eol = rb.buf, rb.start, rb.end, self.eol
        if self.at_line_start:
            body_end = find_body_end(buf, start, rb.search, eol, end)
        else:  # cut inside a long line: the terminator needs a line end before it
            index = buf.find(eol + b"." + eol, max(start, rb.search), end)
            body_end = -1 if index < 0 else index + len(eol)
        if body_end >= 0:
            rb.start = rb.search = body_end + len(eol) + 1
            return self._piece(buf, start, body_end, self.at_line_start), True
        if end - start >= self.chunk:
            cut, at_line_start = safe_cut(buf, start, end, eol)
            if cut > start:
                piece = self._piece(buf, start, cut, self.at_line_start)
                rb.start = rb.search = cut
                self.at_line_start = at_line_start
                return piece, False
        rb.search = max(start, end - 2 * len(eol))
        return None

    def _piece(self, buf: bytearray, start: int, end: int, at_line_start: bool) -> bytes:
        data = unstuff_slice(buf, start, end, self.eol, at_line_start)
        return to_crlf(data) if len(self.eol) == 1 else data


class ReplyReader:
    """Turns the server's bytes into reply events. Never touches a socket.

    A receive buffer, and one reader per framing: the status line (here), a body delivered
    whole (_WholeBody), a body delivered in pieces (_StreamedBody); ``mode`` says which reads
    next. Errors it raises (ProtocolError, LimitExceeded) mean the session is out of step:
    the caller must close the connection. The reader's state is then undefined.
    """

    def __init__(self) -> None:
        self.eol = b"\r\n"
        """The line end of the last status line: CRLF, or LF for a server that sends bare LF
        (tolerated: its bodies are framed with LF and delivered with CRLF)."""
        self.mode = STATUS_MODE
        # The sizes are read when the reader is made, so a test can make them tiny.
        self._rb = _ReceiveBuffer(RECV_SIZE)
        self._expected: deque[Expected] = deque()
        self._whole = _WholeBody()  # reads in WHOLE_BODY_MODE
        self._streamed = _StreamedBody(STREAM_CHUNK)  # reads in STREAMED_BODY_MODE
        self._octets = 0  # of the body being read
        self._status_text = b""  # of the body being read (next_reply)

    # -- what to expect, and what is left ---------------------------------------------------

    def expect(self, expected: Expected = _SINGLE_LINE) -> None:
        """Note that one more command was sent, and the shape of the reply it will get."""
        self._expected.append(expected)

    @property
    def awaiting(self) -> int:
        """Replies expected and not yet complete (the one being read included)."""
        return len(self._expected)

    @property
    def pending(self) -> int:
        """Octets received and not yet read."""
        return self._rb.pending

    def unread(self) -> bytes:
        """The octets received and not yet read (for error messages and STLS)."""
        return self._rb.unread()

    def in_reply(self) -> bool:
        """True when part of a reply has been read or received: stopping now, the rest of it
        is still on its way (the session would be out of step)."""
        return self.mode != STATUS_MODE or self._rb.pending > 0

    def connection_closed(self) -> NetworkError:
        """The error that fits the server closing the connection now."""
        if self.in_reply():
            return TruncatedResponse(
                "server closed the connection in the middle of a response",
                self.unread(),
                reason="truncated",
            )
        return NetworkError("server closed the connection", reason="closed")

    # -- putting bytes in -----------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """Free space at the end of the buffer to receive into; then call received(n). Release
        the view before calling anything else (a bytearray with a view cannot be resized)."""
        return self._rb.space()

    def received(self, count: int) -> None:
        """``count`` octets were written at the start of the last receive_buffer()."""
        rb = self._rb
        if not 0 <= count <= len(rb.buf) - rb.end:
            raise ValueError("received() count outside the receive buffer")
        rb.end += count

    def feed(self, data: bytes) -> None:
        """Append ``data`` (bytes from the server) to what the reader holds."""
        while data:
            with self.receive_buffer() as space:
                count = min(len(space), len(data))
                space[:count] = data[:count]
            self.received(count)
            data = data[count:]

    @property
    def capacity(self) -> int:
        """Octets of memory the receive buffer holds now."""
        return len(self._rb.buf)

    # -- taking events out ----------------------------------------------------------------

    def next_event(self) -> ReplyEvent | _NeedData:
        """The next event of the reply being read, or NEED_DATA."""
        mode = self.mode
        if mode is STATUS_MODE:
            if not self._expected:
                raise RuntimeError("next_event() with no reply expected")
            status = self._read_status()
            if isinstance(status, (Challenge, _NeedData)):
                return status
            return StatusLine(*status)
        if mode is WHOLE_BODY_MODE:
            data = self._whole.read(self._rb)
            if data is None:
                return NEED_DATA
            return self._body_piece(data, True)
        if mode is STREAMED_BODY_MODE:
            read = self._streamed.read(self._rb)
            if read is None:
                return NEED_DATA
            return self._body_piece(*read)
        self._complete()  # BODY_END_MODE
        return BodyEnd(self._octets)

    def next_reply(self) -> tuple[bool, bytes, bytes | None] | _NeedData:
        """The reply at the head of the queue at once, or NEED_DATA: (ok, the text after the
        indicator, the body read whole or None). For a reply expected with ``stream`` it
        returns after the status line, and the body's pieces come from next_event(). The
        same framing as next_event(), without an event object per step: one call per reply."""
        if self.mode is STATUS_MODE:
            if not self._expected:
                raise RuntimeError("next_reply() with no reply expected")
            status = self._read_status()
            if isinstance(status, (Challenge, _NeedData)):
                if isinstance(status, _NeedData):
                    return NEED_DATA
                raise RuntimeError("next_reply() in a SASL exchange: use next_event()")
            ok, text = status
            if self.mode is not WHOLE_BODY_MODE:
                return ok, text, None
            self._status_text = text
        elif self.mode is not WHOLE_BODY_MODE:
            raise RuntimeError(f"next_reply() in the {self.mode} mode: use next_event()")
        data = self._whole.read(self._rb)
        if data is None:
            return NEED_DATA
        self._octets = len(data)
        self._complete()
        return True, self._status_text, data

    def _body_piece(self, data: bytes, last: bool) -> ReplyEvent:
        """A piece of the body (none for an empty end), and the mode that follows it."""
        self._octets += len(data)
        if last:
            self.mode = BODY_END_MODE
            if not data:  # nothing more: the BodyEnd at once
                self._complete()
                return BodyEnd(self._octets)
        return BodyPiece(data)

    def _read_status(self) -> tuple[bool, bytes] | Challenge | _NeedData:
        """The status line (ok, text), or a SASL challenge, of the reply at the head of the
        queue; it sets the mode that reads what follows."""
        expected = self._expected[0]
        limit = MAX_SASL_LINE if expected.sasl else MAX_RESPONSE_LINE
        rb = self._rb
        buf, start = rb.buf, rb.start
        index = buf.find(b"\n", rb.search, rb.end)
        if index < 0 or index + 1 - start > limit:
            if rb.end - start > limit or index >= 0:
                raise LimitExceeded(
                    f"server line longer than {limit} octets", bytes(buf[start : start + 80])
                )
            rb.search = rb.end
            return NEED_DATA
        rb.start = rb.search = index + 1
        if index > start and buf[index - 1] == 13:  # CR LF
            self.eol, line_end = b"\r\n", index - 1
        else:
            self.eol, line_end = b"\n", index
        line = bytes(buf[start:line_end])
        if b"\r" in line:
            raise ProtocolError("bare CR in a server line", bytes(buf[start : index + 1]))
        # RFC 5034 section 4: continue-req = "+" SP [base64] CRLF; a bare "+" is tolerated as
        # an empty challenge. Anything else that starts with "+" must be a status line.
        if expected.sasl and (line == b"+" or line[:2] == b"+ "):
            self._complete()  # the server now waits for our answer: nothing may follow
            return Challenge(line[2:])
        ok, text = parse_status(line)
        if ok and expected.multiline:  # a body follows
            self._octets = 0
            if expected.stream:
                self._streamed.start(self.eol)
                self.mode = STREAMED_BODY_MODE
            else:
                self._whole.start(self.eol, expected.limit, text)
                self.mode = WHOLE_BODY_MODE
        else:
            self._complete()
        return ok, text

    def _complete(self) -> None:
        """The reply at the head of the queue is complete."""
        last = self._expected.popleft().last
        self.mode = STATUS_MODE
        rb = self._rb
        if rb.start == rb.end or len(rb.buf) > 4 * rb.receive_size:
            rb.shrink()
        # Nothing may follow a reply nobody asked for: surplus bytes mean the server answered
        # something else (or injected a reply), and every later reply would be misread.
        if not self._expected and rb.end > rb.start and not last:
            raise ProtocolError(
                "server sent more than was asked for", self.unread(), reason="surplus"
            )


# =============================================================================================
# SASL mechanisms (RFC 4422, RFC 5034)
# =============================================================================================

#
# Sans-I/O: a mechanism object turns server challenges into client responses. Both are raw
# bytes; the transport base64-decodes the text after "+ " and base64-encodes what respond()
# returns (RFC 5034 section 4). One object serves one AUTH exchange. The transport:
#
#   1. sends "AUTH <name>" with initial_response() on the same line when there is one and
#      the line fits in 255 octets; otherwise sends "AUTH <name>" alone and, if there is an
#      initial response, sends it as the answer to the server's first (empty) challenge;
#   2. answers every further "+ <challenge>" with respond(challenge); when respond() raises,
#      it cancels with "*" (RFC 5034 section 4) and re-raises once the server has answered;
#   3. on "+OK" calls finish(), which raises if the server never proved itself (SCRAM).
#
# Secrets live only in private attributes; reprs and exception messages never show them.

# Password mechanisms, strongest first. SCRAM never sends the password or anything a
# passive listener can replay, and proves the server knows it (RFC 5802 section 1);
# CRAM-MD5 sends no password but the server must store it in the clear (RFC 2195 section
# 4); PLAIN and LOGIN send the password itself, LOGIN last as it is not even standardised.
PASSWORD_MECHANISMS_BY_STRENGTH = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")

# RFC 5802 section 5.1 and RFC 7677 section 4: servers SHOULD announce at least 4096 SCRAM
# iterations, and the IANA SCRAM registry (RFC 7677 section 5) lists 4096 as the minimum.
# The client enforces it because the server chooses the count: an impostor (no TLS, or a
# MITM) that asks for i=1 receives a ClientProof it can test password guesses against at
# one HMAC each instead of 4096. Override per mechanism with min_iterations= if a real
# server is configured lower.
SCRAM_MIN_ITERATIONS = 4096
# RFC 5802 section 9: "A hostile server can perform a computational denial-of-service
# attack on clients by sending a big iteration count value." PBKDF2 runs in C without
# releasing control to a timeout, so cap it: a million rounds take about 0.4 s on a current
# PC (seconds on a small board), and the cap still admits servers following today's advice
# (OWASP suggests 600,000 for PBKDF2-SHA-256).
SCRAM_MAX_ITERATIONS = 1_000_000


def _protocol_error(message: str, data: bytes = b"") -> ProtocolError:
    """The exception for a challenge that cannot be valid."""
    return ProtocolError(message, data[:80])


def _utf8(text: str, what: str) -> bytes:
    """Encode to UTF-8; a lone surrogate is the caller's mistake (ValueError)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    # Raised outside the except block so the UnicodeEncodeError, whose .object is the
    # whole string (perhaps a password), is not chained onto the traceback.
    raise ValueError(f"{what} is not encodable as UTF-8 (lone surrogate)")


def _require(value: str, what: str) -> None:
    if not value:
        raise ValueError(f"{what} is empty")


def _reject(value: str, characters: str, what: str) -> None:
    """ValueError if value holds a character the mechanism's syntax uses as a delimiter."""
    for ch in characters:
        if ch in value:
            raise ValueError(f"{what} contains {ch!r}, which this mechanism cannot carry")


def _check_token(token: str) -> None:
    # RFC 6750 section 2.1: a bearer token (b64token) is printable ASCII without spaces;
    # checking just that keeps %x01 (the key/value separator) and line ends out.
    _require(token, "token")
    if not all("\x21" <= ch <= "\x7e" for ch in token):
        raise ValueError("token contains a character outside printable ASCII")


def saslprep(text: str, *, what: str = "string", allow_unassigned: bool = True) -> str:
    """Prepare a user name or password with SASLprep (RFC 4013); ValueError if prohibited.

    `what` names the value in the error message, which never contains the value itself.
    Unassigned code points are allowed by default ("query" strings, RFC 3454 section 7).
    """
    # Printable ASCII comes out unchanged: no such character is mapped (tables B.1, C.1.2),
    # changed by NFKC, prohibited (C.2.1 holds only the controls) or right-to-left (D.1).
    if all(" " <= ch <= "~" for ch in text):
        return text
    import stringprep
    import unicodedata

    # RFC 4013 section 2.1: non-ASCII spaces (C.1.2) map to SPACE, "commonly mapped to
    # nothing" characters (B.1, such as SOFT HYPHEN) are removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    # Section 2.2: NFKC, with the Unicode 3.2 tables that stringprep (RFC 3454) is bound to,
    # so that client and server agree whatever Unicode version each Python ships.
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,  # non-ASCII space characters
        stringprep.in_table_c21,  # ASCII control characters
        stringprep.in_table_c22,  # non-ASCII control characters
        stringprep.in_table_c3,  # private use
        stringprep.in_table_c4,  # non-character code points
        stringprep.in_table_c5,  # surrogate code points
        stringprep.in_table_c6,  # inappropriate for plain text
        stringprep.in_table_c7,  # inappropriate for canonical representation
        stringprep.in_table_c8,  # change display properties or deprecated
        stringprep.in_table_c9,  # tagging characters
    )
    for ch in prepared:
        # Section 2.3 (prohibited output) and 2.5 (A.1, unassigned in Unicode 3.2).
        if any(table(ch) for table in prohibited) or (
            not allow_unassigned and stringprep.in_table_a1(ch)
        ):
            raise ValueError(f"{what} contains a character that SASLprep prohibits")
    # Section 2.4, RFC 3454 section 6: a string with right-to-left characters (D.1) holds no
    # left-to-right ones (D.2) and starts and ends with a right-to-left character.
    if any(stringprep.in_table_d1(ch) for ch in prepared) and (
        any(stringprep.in_table_d2(ch) for ch in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        raise ValueError(f"{what} mixes text directions in a way SASLprep prohibits")
    return prepared


def _saslname(name: str) -> str:
    # RFC 5802 section 5.1 and RFC 5801 section 4: "," and "=" are sent as "=2C" and "=3D"
    # ("=" first, so the "=" of "=2C" is not escaped again).
    return name.replace("=", "=3D").replace(",", "=2C")


class Mechanism:
    """One SASL authentication exchange, without I/O (see the comment above)."""

    name: ClassVar[str]
    # True when the password or token crosses the wire as it is, so the client allows the
    # mechanism only over TLS, to a loopback host, or with tls="none". True unless a
    # mechanism says otherwise: a forgotten declaration must not weaken the check.
    sends_secret: ClassVar[bool] = True

    def __init__(self, user: str) -> None:
        _require(user, "user name")
        self.user = user

    def initial_response(self) -> bytes | None:
        """Return the first client response, or None when the server speaks first."""
        return None

    def respond(self, challenge: bytes) -> bytes:
        """Return the response to a decoded challenge; ProtocolError if it cannot be valid."""
        raise _protocol_error(f"unexpected {self.name} challenge", challenge)

    def finish(self) -> None:
        """Check the exchange once the server said +OK; raise if the server is unverified."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} user={self.user!r}>"


class PlainMechanism(Mechanism):
    """PLAIN (RFC 4616): authzid NUL authcid NUL password, in one message."""

    name = "PLAIN"
    sends_secret = True

    def __init__(self, user: str, password: str, authzid: str = "") -> None:
        super().__init__(user)
        _require(password, "password")  # RFC 4616 section 2: passwd = 1*SAFE
        # NUL separates the fields (section 2); the server applies SASLprep (section 2,
        # "presented strings"), so the client sends the strings as they are.
        for value, what in ((user, "user name"), (password, "password"), (authzid, "authzid")):
            _reject(value, "\0", what)
        self._message = b"\0".join(
            (_utf8(authzid, "authzid"), _utf8(user, "user name"), _utf8(password, "password"))
        )

    def initial_response(self) -> bytes:
        return self._message


class LoginMechanism(Mechanism):
    """LOGIN (draft-murchison-sasl-login): answers two prompts with user name, password."""

    name = "LOGIN"
    sends_secret = True

    def __init__(self, user: str, password: str) -> None:
        super().__init__(user)
        _require(password, "password")
        self._answers = (_utf8(user, "user name"), _utf8(password, "password"))
        self._step = 0

    def respond(self, challenge: bytes) -> bytes:
        # Servers word the prompts differently ("Username:", "User Name", localised, or
        # empty), so answer by position and ignore the text.
        if self._step >= len(self._answers):
            raise _protocol_error("unexpected third LOGIN challenge", challenge)
        self._step += 1
        return self._answers[self._step - 1]


def _md5_usable() -> bool:
    # Under a FIPS-enforcing OpenSSL, hmac.new(..., "md5") raises ValueError.
    import hmac

    try:
        hmac.new(b"", b"", "md5")
    except ValueError:
        return False
    return True


class CramMD5Mechanism(Mechanism):
    """CRAM-MD5 (RFC 2195): user name, space, lower-case hex HMAC-MD5 of the challenge."""

    name = "CRAM-MD5"
    sends_secret = False

    def __init__(self, user: str, password: str) -> None:
        super().__init__(user)
        _require(password, "password")
        # Checked here so the failure comes before anything is sent (see _md5_usable).
        if not _md5_usable():
            raise ValueError("CRAM-MD5 needs MD5, which this Python does not allow (FIPS mode)")
        self._user = _utf8(user, "user name")
        self._key = _utf8(password, "password")
        self._answered = False

    def respond(self, challenge: bytes) -> bytes:
        # RFC 2195 section 2: one challenge (a msg-id such as "<1896.697170952@host>"; not
        # enforced, as only its being non-empty matters to the digest), one response.
        if self._answered or not challenge:
            raise _protocol_error("unexpected CRAM-MD5 challenge", challenge)
        self._answered = True
        import hmac

        # hexdigest() is lower case, as section 2 requires.
        return self._user + b" " + hmac.new(self._key, challenge, "md5").hexdigest().encode()


class ScramMechanism(Mechanism):
    """SCRAM without channel binding (RFC 5802, RFC 7677); subclasses name the hash.

    `_nonce` is for tests only (the RFC examples fix the client nonce); never pass it
    otherwise, as a repeated nonce lets a recorded exchange be replayed.
    """

    sends_secret = False
    hash_name: ClassVar[str]  # hashlib name of the mechanism's H and HMAC

    def __init__(
        self,
        user: str,
        password: str,
        authzid: str = "",
        *,
        min_iterations: int = SCRAM_MIN_ITERATIONS,
        max_iterations: int = SCRAM_MAX_ITERATIONS,
        _nonce: str | None = None,
    ) -> None:
        super().__init__(user)
        if not 1 <= min_iterations <= max_iterations:
            raise ValueError("need 1 <= min_iterations <= max_iterations")
        self._min_iterations = min_iterations
        self._max_iterations = max_iterations
        # RFC 5802 section 5.1: the user name goes through SASLprep as a query string and
        # the exchange is abandoned when that fails or leaves nothing.
        prepared_user = saslprep(user, what="user name")
        _require(prepared_user, "user name after SASLprep")
        # Section 2.2, Normalize(): the password goes through SASLprep too. That section
        # calls it a "stored string" (unassigned code points prohibited); we allow them as
        # for a query: Python's tables are Unicode 3.2, so "unassigned" would refuse every
        # character added since 2002, and only the server can tell whether it matches.
        self._password = _utf8(saslprep(password, what="password"), "password")
        for value, what in ((user, "user name"), (authzid, "authzid")):
            _reject(value, "\0", what)  # saslname excludes NUL (section 7)
        if _nonce is None:
            import secrets

            # 24 random bytes as URL-safe base64: printable and free of "," (section 7).
            _nonce = secrets.token_urlsafe(24)
        elif not _nonce or not all("\x21" <= ch <= "\x7e" and ch != "," for ch in _nonce):
            raise ValueError("_nonce must be non-empty printable ASCII without ','")
        self._client_nonce = _nonce.encode("ascii")
        # Section 7, gs2-header: "n" = the client does not support channel binding.
        authzid_field = b"a=" + _utf8(_saslname(authzid), "authzid") if authzid else b""
        self._gs2_header = b"n," + authzid_field + b","
        username = _utf8(_saslname(prepared_user), "user name")
        self._client_first_bare = b"n=" + username + b",r=" + self._client_nonce
        self._server_signature = b""
        self._state = "initial"  # -> "proved" -> "verified", or "failed"

    def initial_response(self) -> bytes:
        # SCRAM is client-first (section 5): client-first-message.
        return self._gs2_header + self._client_first_bare

    def respond(self, challenge: bytes) -> bytes:
        state, self._state = self._state, "failed"  # stays "failed" if anything raises
        if state == "initial":
            response = self._client_final(challenge)
            self._state = "proved"
            return response
        if state == "proved":
            self._check_server_final(challenge)
            self._state = "verified"
            # POP3 has no additional data with +OK (RFC 5034 section 4), so the server-final
            # message came as a challenge, and the empty response lets the server say +OK.
            return b""
        raise _protocol_error("unexpected challenge after the SCRAM exchange", challenge)

    def finish(self) -> None:
        # RFC 5802 section 5: the client authenticates the server by its ServerSignature;
        # +OK without a valid one means the server never proved it knows the password.
        if self._state != "verified":
            self._state = "failed"
            raise _protocol_error(
                "server accepted SCRAM authentication without proving it knows the password"
            )

    def _attributes(self, message: bytes, what: str) -> list[tuple[str, str]]:
        # Section 7: attr-val *("," attr-val), attr-val = ALPHA "=" value, UTF-8 throughout.
        text: str | None
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None:
            raise _protocol_error(f"SCRAM {what} is not UTF-8", message)
        attributes: list[tuple[str, str]] = []
        for item in text.split(","):
            if len(item) < 2 or item[1] != "=" or not ("a" <= item[0].lower() <= "z"):
                raise _protocol_error(f"malformed SCRAM {what}", message)
            attributes.append((item[0], item[2:]))
        if attributes[0][0] == "m":
            # Section 7, reserved-mext: a mandatory extension we cannot know; section 5.1
            # says to fail the exchange.
            raise _protocol_error(f"SCRAM {what} requires an unsupported extension", message)
        if attributes[0][0] == "e":
            # Section 7, server-error; the grammar puts it only in server-final, but an
            # error is an error wherever a server sends it.
            reason = attributes[0][1][:200]
            # Not a -ERR line, so the message does not say it was one.
            text = f"server rejected SCRAM authentication: {reason}"
            error = AuthenticationError(text, None, "AUTH", message=text)
            error.reason = "in-exchange"
            raise error
        return attributes

    def _client_final(self, server_first: bytes) -> bytes:
        # server-first-message = [reserved-mext ","] nonce "," salt "," iteration-count
        #                        ["," extensions]                    (RFC 5802 section 7)
        attributes = self._attributes(server_first, "server-first message")
        if [key for key, _ in attributes[:3]] != ["r", "s", "i"]:
            raise _protocol_error("malformed SCRAM server-first message", server_first)
        nonce, salt_b64, count = (value for _, value in attributes[:3])
        # Section 5.1, "r": the server appends its own nonce to ours; a nonce that does not
        # extend ours belongs to another exchange (replay), one that adds nothing is no nonce.
        nonce_bytes = nonce.encode("utf-8")
        if (
            not nonce_bytes.startswith(self._client_nonce)
            or len(nonce_bytes) == len(self._client_nonce)
            or not all(0x21 <= byte <= 0x7E for byte in nonce_bytes)
        ):
            raise _protocol_error("SCRAM nonce does not extend the client nonce", server_first)
        salt = _b64decode(salt_b64)
        if not salt:
            raise _protocol_error("SCRAM salt is empty or not base64", server_first)
        # posit-number = %x31-39 *DIGIT; ten digits already exceed any sane count, and the
        # length check keeps int() from parsing a hostile megabyte of digits.
        if not (count.isdigit() and count.isascii() and count[0] != "0" and len(count) <= 10):
            raise _protocol_error("SCRAM iteration count is not a positive number", server_first)
        iterations = int(count)
        if iterations < self._min_iterations:
            raise _protocol_error(
                f"SCRAM iteration count {iterations} is below the minimum {self._min_iterations}"
                " (a low count would make guessing the password from our proof cheap)"
            )
        if iterations > self._max_iterations:
            raise _protocol_error(
                f"SCRAM iteration count {iterations} is above the limit {self._max_iterations}"
            )

        import base64
        import hashlib

        # Section 3: SaltedPassword = Hi(Normalize(password), salt, i), Hi being PBKDF2.
        salted = hashlib.pbkdf2_hmac(self.hash_name, self._password, salt, iterations)
        self._password = b""  # no longer needed: drop our reference to it
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self.hash_name, client_key).digest()
        # client-final-message-without-proof = channel-binding "," nonce; with gs2 flag "n"
        # the channel binding input is the gs2 header alone ("n,," -> "c=biws").
        without_proof = b"c=" + base64.b64encode(self._gs2_header) + b",r=" + nonce_bytes
        auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        client_signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature))
        self._server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)

    def _check_server_final(self, server_final: bytes) -> None:
        # server-final-message = (server-error / verifier) ["," extensions]   (section 7)
        # A server-error "e=..." raises AuthenticationError in _attributes().
        key, value = self._attributes(server_final, "server-final message")[0]
        if key != "v":
            raise _protocol_error("malformed SCRAM server-final message", server_final)
        import hmac

        # compare_digest: no timing hint about how much of a forged signature was right.
        if not hmac.compare_digest(_b64decode(value), self._server_signature):
            raise _protocol_error(
                "SCRAM server signature is wrong: the server does not know the password"
                " (or is an impostor)"
            )

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        import hmac

        return hmac.new(key, message, self.hash_name).digest()


def _b64decode(value: str) -> bytes:
    """Decode canonical base64 only (RFC 4648 section 4); b"" when value is not that."""
    import base64

    try:
        encoded = value.encode("ascii")
        decoded = base64.b64decode(encoded, validate=True)
    except ValueError:  # UnicodeEncodeError and binascii.Error are ValueErrors
        return b""
    # validate=True checks the alphabet only; before 3.13 b64decode also accepts padding
    # in the wrong place or too much of it. Re-encoding catches both and non-zero pad bits.
    return decoded if base64.b64encode(decoded) == encoded else b""


class ScramSHA1Mechanism(ScramMechanism):
    """SCRAM-SHA-1 (RFC 5802)."""

    name = "SCRAM-SHA-1"
    hash_name = "sha1"


class ScramSHA256Mechanism(ScramMechanism):
    """SCRAM-SHA-256 (RFC 7677)."""

    name = "SCRAM-SHA-256"
    hash_name = "sha256"


def _json_object(data: bytes) -> dict[str, Any] | None:
    """A JSON object from UTF-8 bytes, or None if they hold anything else."""
    import json

    try:
        details = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # Unicode/JSON errors; "[[[[..." nested too deep
        return None
    return details if isinstance(details, dict) else None


class _BearerMechanism(Mechanism):
    """A bearer-token mechanism: one message with the token, then at most one challenge, the
    server's JSON error, kept in ``error_details`` and answered with ``error_answer`` so the
    server can send its final -ERR."""

    sends_secret = True
    error_answer: ClassVar[bytes]

    def __init__(self, user: str) -> None:
        super().__init__(user)
        self._message = b""
        self.error_details: dict[str, Any] | None = None

    def initial_response(self) -> bytes:
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        if self.error_details is not None:
            raise _protocol_error(f"unexpected {self.name} challenge after the error", challenge)
        # RFC 7628 section 3.2.2: the error challenge is a JSON object.
        self.error_details = _json_object(challenge)
        if self.error_details is None:
            raise _protocol_error(f"{self.name} challenge is not a JSON error object", challenge)
        return self.error_answer


class XOAuth2Mechanism(_BearerMechanism):
    """XOAUTH2 (Google's and Microsoft's format): user and bearer token in one message.

    After a failure the server's JSON error (e.g. {"status": "401", ...}) is in
    `error_details`.
    """

    name = "XOAUTH2"
    # The documented answer to the error challenge is an empty response.
    error_answer = b""

    def __init__(self, user: str, token: str) -> None:
        super().__init__(user)
        _reject(user, "\x01", "user name")  # %x01 ends the field
        _check_token(token)
        self._message = (
            b"user=" + _utf8(user, "user name") + b"\x01auth=Bearer " + token.encode() + b"\x01\x01"
        )


class OAuthBearerMechanism(_BearerMechanism):
    """OAUTHBEARER (RFC 7628) with a bearer token; host and port are optional.

    The gs2 header names `authzid` if given, else `user`. After a failure the server's
    JSON error (RFC 7628 section 3.2.2) is in `error_details`.
    """

    name = "OAUTHBEARER"
    # RFC 7628 section 3.2.3: the client answers the error challenge with a single %x01.
    error_answer = b"\x01"

    def __init__(
        self,
        user: str,
        token: str,
        authzid: str = "",
        *,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(user)
        _check_token(token)
        identity = authzid or user
        _reject(identity, "\0\x01", "authzid" if authzid else "user name")
        # RFC 7628 section 3.1: gs2-header kvsep *kvpair kvsep, kvpair = key "=" value kvsep;
        # the gs2 header is RFC 5801's, so the authzid is a saslname ("=2C", "=3D").
        pairs: list[bytes] = []
        if host is not None:
            _require(host, "host")
            _reject(host, "\0\x01\r\n", "host")
            pairs.append(b"host=" + _utf8(host, "host"))
        if port is not None:
            # Section 3.1: "a decimal positive integer string without leading zeros".
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"port must be an integer from 1 to 65535, not {port!r}")
            pairs.append(b"port=" + str(port).encode())
        pairs.append(b"auth=Bearer " + token.encode())
        gs2_header = b"n,a=" + _utf8(_saslname(identity), "user name") + b","
        self._message = gs2_header + b"\x01" + b"".join(pair + b"\x01" for pair in pairs) + b"\x01"


# Every mechanism mechanism_for() builds (for error messages, a command line's help).
SUPPORTED_MECHANISMS = (*PASSWORD_MECHANISMS_BY_STRENGTH, "XOAUTH2", "OAUTHBEARER")


def mechanism_for(
    name: str,
    user: str,
    password: str | None = None,
    token: str | None = None,
    authzid: str = "",
    *,
    host: str | None = None,
    port: int | None = None,
) -> Mechanism:
    """Return a new mechanism object for `name` (any case); ValueError if it cannot be built.

    Password mechanisms need `password`, XOAUTH2 and OAUTHBEARER need `token`; `authzid` is
    refused by the mechanisms that cannot carry one (LOGIN, CRAM-MD5, XOAUTH2); `host` and
    `port` are sent by OAUTHBEARER only (RFC 7628 section 3.1).
    """
    # isascii() first: str.upper() maps some non-ASCII letters to ASCII ("\u017f" -> "S").
    key = name.upper() if name.isascii() else ""
    if key not in SUPPORTED_MECHANISMS:
        supported = ", ".join(SUPPORTED_MECHANISMS)
        raise ValueError(f"unsupported SASL mechanism {name!r}; supported: {supported}")
    if key in ("XOAUTH2", "OAUTHBEARER"):
        if token is None:
            raise ValueError(f"{key} needs a token")
        if key == "OAUTHBEARER":
            return OAuthBearerMechanism(user, token, authzid, host=host, port=port)
    elif password is None:
        raise ValueError(f"{key} needs a password")
    if key == "PLAIN":
        return PlainMechanism(user, password or "", authzid)
    if key == "SCRAM-SHA-256":
        return ScramSHA256Mechanism(user, password or "", authzid)
    if key == "SCRAM-SHA-1":
        return ScramSHA1Mechanism(user, password or "", authzid)
    if authzid:
        raise ValueError(f"{key} cannot carry an authorization identity")
    if key == "XOAUTH2":
        return XOAuth2Mechanism(user, token or "")
    if key == "LOGIN":
        return LoginMechanism(user, password or "")
    return CramMD5Mechanism(user, password or "")


def choose_password_mechanism(offered: Iterable[str]) -> str | None:
    """Return the strongest password mechanism in `offered` (any case), or None.

    `offered` is the server's SASL capability arguments (RFC 2449 section 6.3); a single
    string is split on white space. CRAM-MD5 is passed over where MD5 is disabled (FIPS).
    Callers try only the mechanism returned: after a failure, trying a weaker one would
    count twice towards a lockout and may send the password in a weaker form.
    """
    if isinstance(offered, str):
        offered = offered.split()
    available = {item.upper() for item in offered if item.isascii()}
    for name in PASSWORD_MECHANISMS_BY_STRENGTH:
        if name in available and (name != "CRAM-MD5" or _md5_usable()):
            return name
    return None


def choose_oauth2_mechanism(offered: Iterable[str]) -> str:
    """OAUTHBEARER (RFC 7628, the standard) when offered, else XOAUTH2 (Google, Microsoft)."""
    return "OAUTHBEARER" if "OAUTHBEARER" in (m.upper() for m in offered) else "XOAUTH2"


class SaslExchange:
    """The client's side of one AUTH exchange (RFC 5034 section 4), without I/O.

    ``arguments`` are what follows "AUTH"; answer() turns each challenge (the base64 text
    after "+ ") into the line to send back; finish() judges the final status line. A challenge
    that cannot be valid is answered with "*", which cancels the exchange (RFC 5034 section 4);
    finish() then raises the reason once the server has answered the cancel.
    """

    def __init__(self, mechanism: Mechanism) -> None:
        import base64

        self.mechanism = mechanism
        self._pending_initial: bytes | None = None
        self._failure: Error | None = None
        self.rounds = 0
        initial = mechanism.initial_response()
        if initial is None:
            self.arguments: tuple[str, ...] = (mechanism.name,)
            return
        first = base64.b64encode(initial) or b"="  # RFC 5034 section 4: "=" is empty
        # RFC 5034 section 4: the initial response rides on the AUTH line only if the whole
        # line fits in 255 octets; otherwise it answers the server's first, empty challenge.
        if len(b"AUTH %s %s\r\n" % (mechanism.name.encode(), first)) <= MAX_COMMAND_LENGTH:
            self.arguments = (mechanism.name, first.decode("ascii"))
        else:
            self.arguments = (mechanism.name,)
            self._pending_initial = first

    @property
    def cancelled(self) -> bool:
        """The client answered "*": the exchange can only end in -ERR."""
        return self._failure is not None

    def answer(self, challenge: bytes) -> bytes:
        """The line (without CRLF) that answers a challenge: base64, or b"*" to cancel."""
        import base64
        import binascii

        self.rounds += 1
        if self.rounds > MAX_SASL_ROUNDS:
            raise ProtocolError("server kept sending SASL challenges")
        if self._failure is not None:  # RFC 5034 section 4: "*" MUST be answered with -ERR
            raise ProtocolError("server sent a challenge after the client cancelled")
        if self._pending_initial is not None:
            first, self._pending_initial = self._pending_initial, None
            return first
        try:
            decoded = base64.b64decode(challenge, validate=True)
        except (binascii.Error, ValueError):
            self._failure = ProtocolError("server sent a challenge that is not base64", challenge)
            return b"*"
        try:
            return base64.b64encode(self.mechanism.respond(decoded))
        except Error as exc:
            self._failure = exc
            return b"*"

    def finish(self, ok: bool, text: bytes) -> bytes:
        """Judge the final status line; returns the +OK text or raises.

        A refusal raises the ServerError that fits it (with the OAuth2 JSON error, if any);
        +OK to a cancelled exchange means nobody knows the state any more (ProtocolError);
        +OK without the server's proof (SCRAM) may come from an impostor (ProtocolError)."""
        if self._failure is not None:
            if ok:
                raise ProtocolError("server accepted a cancelled AUTH")
            raise self._failure  # RFC 5034 section 4: the server MUST answer "*" with -ERR
        if not ok:
            error = refusal(text, "AUTH")
            if isinstance(error, AuthenticationError):
                error.details = getattr(self.mechanism, "error_details", None)
            raise error
        self.mechanism.finish()
        return text


# =============================================================================================
# Transport: the only code that touches a socket
# =============================================================================================


def create_tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """The TLS settings pop3lite uses unless given others: the certificate and the host name
    verified (against the system's CAs, or ``cafile``), TLS 1.2 at least (RFC 8314 section
    4.1). Raises TLSError (reason "no-ssl") on a Python without the ssl module."""
    try:
        import ssl
    except ImportError:
        message = "this Python has no ssl module, so TLS is unavailable"
        raise TLSError(message, reason="no-ssl") from None
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Transport:
    """One connection: connect, TLS, send, receive into a ReplyReader, shut down, close.

    Every socket call of the module is here, and so is the one place (``_error``) that turns
    OSError and ssl.SSLError into pop3lite errors. Each operation has a deadline: ``timeout``
    seconds from start_operation(), lengthened by 1/MIN_TRANSFER_RATE s per octet received.
    Any failure closes the connection: the session is out of step and cannot be trusted.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        source_address: tuple[str, int] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.closed_reason = ""
        self.tls_version: str | None = None
        self.cipher: str | None = None
        self.peer_certificate: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self.is_open = False  # an attribute, not a property: it is read once per reply event
        try:
            self._sock = socket.create_connection((host, port), timeout, source_address)
            self.is_open = True
            self.peer_address = str(self._sock.getpeername()[0])
        except OSError as exc:
            self.fail(self._error(exc, "connecting"))

    # -- lifetime and errors ----------------------------------------------------------------

    def _live(self) -> socket.socket:
        """The socket; a closed connection raises NetworkError saying why it closed."""
        if self._sock is None:
            raise NetworkError(f"connection closed ({self.closed_reason})", reason="closed")
        return self._sock

    def check_open(self) -> None:
        self._live()

    def close(self, reason: str = "closed by the client", graceful: bool = False) -> None:
        sock, self._sock = self._sock, None
        self.is_open = False
        if sock is not None:
            self.closed_reason = self.closed_reason or reason
            unwrap = getattr(sock, "unwrap", None)
            if unwrap is not None:
                # RFC 8446 section 6.1: close_notify first, so that the server can tell a
                # closed connection from a cut one (couriertls logs the latter as an error);
                # after QUIT unwrap() waits for the server's own briefly, else not at all.
                sock.settimeout(min(self.timeout, 1.0) if graceful else 0.0)
                with contextlib.suppress(OSError, ValueError):
                    unwrap()
            sock.close()

    def abort(self, reason: str = "aborted by the client") -> None:
        """Shut the socket down first, so that a call blocked on it in another thread returns
        at once, then close it."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self.close(reason)

    def fail(self, error: Error) -> NoReturn:
        """Close the connection (the session is out of step) and raise ``error``."""
        self.close(str(error))
        raise error

    def start_operation(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.fail(
                Timeout(f"no answer from the server within {self.timeout:g}s", reason="read")
            )
        return remaining

    def _error(self, exc: OSError, doing: str) -> Error:
        """The pop3lite error for a failed socket or TLS call: the one translation table."""
        where = f"{self.host}:{self.port}"
        ssl = sys.modules.get("ssl")
        if isinstance(exc, socket.timeout):  # not a TimeoutError subclass before 3.10
            if doing == "connecting":
                return Timeout(f"timed out connecting to {where}", reason="connect")
            if doing == "handshake":
                return Timeout(f"TLS handshake with {self.host} timed out", reason="handshake")
            reason = "send" if doing == "sending" else "read"
            return Timeout(f"timed out {doing} after {self.timeout:g}s", reason=reason)
        if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
            # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: a
            # valid certificate, for another name or address.
            reason = "hostname" if exc.verify_code in (62, 64) else "certificate"
            return TLSError(
                f"certificate of {self.host} is not trusted: {exc.verify_message}", reason=reason
            )
        if ssl is not None and isinstance(exc, ssl.SSLError):
            # WRONG_VERSION_NUMBER: the first bytes back were not TLS (a plaintext greeting).
            reason = "not-tls" if exc.reason == "WRONG_VERSION_NUMBER" else "handshake"
            if doing == "handshake":
                return TLSError(f"TLS handshake with {self.host} failed: {exc}", reason=reason)
            return TLSError(f"TLS error while {doing}: {exc}", reason="tls")
        if doing == "connecting":
            if isinstance(exc, socket.gaierror):
                message = f"cannot resolve {self.host!r}: {exc.strerror}"
                return NetworkError(message, reason="resolve")
            return NetworkError(f"cannot connect to {where}: {exc}", reason="connect")
        if doing == "handshake":
            return TLSError(f"TLS handshake with {self.host} failed: {exc}", reason="handshake")
        return NetworkError(f"connection failed while {doing}: {exc}", reason="io")

    # -- TLS ----------------------------------------------------------------------------------

    def start_tls(self, context: ssl.SSLContext) -> None:
        """Wrap the connection in TLS, verifying the server as ``context`` says, and record
        the version, cipher and certificate."""
        sock = self._live()
        remaining = self._remaining()  # outside the try: Timeout is an OSError too
        try:
            sock.settimeout(remaining)
            wrapped = context.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:  # ssl.SSLError is an OSError
            self.fail(self._error(exc, "handshake"))
        self._sock = wrapped
        self.tls_version = wrapped.version()
        cipher = wrapped.cipher()
        self.cipher = cipher[0] if cipher else None
        self.peer_certificate = wrapped.getpeercert()

    def data_waiting(self) -> bool:
        """True if a byte is already waiting on the socket (looked at without blocking)."""
        sock = self._live()
        try:
            sock.setblocking(False)
            try:
                return bool(sock.recv(1, socket.MSG_PEEK))
            finally:
                sock.setblocking(True)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # a reset right after +OK is just as suspicious

    # -- sending and receiving -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        sock = self._live()
        remaining = self._remaining()
        try:
            sock.settimeout(remaining)
            sock.sendall(data)
        except OSError as exc:
            self.fail(self._error(exc, "sending"))

    def receive(self, reader: ReplyReader, doing: str = "reading a response") -> None:
        """Receive once, straight into the reader's buffer. The server closing the connection
        raises the error the reader says fits (truncated, or just closed)."""
        sock = self._live()
        # Silence is never allowed longer than ``timeout``; the octets received so far extend
        # the deadline of the whole operation.
        wait = min(self.timeout, self._remaining())
        try:
            sock.settimeout(wait)
            with reader.receive_buffer() as space:
                count = sock.recv_into(space)
        except OSError as exc:
            self.fail(self._error(exc, doing))
        if count == 0:
            self.fail(reader.connection_closed())
        reader.received(count)
        self.deadline += count / MIN_TRANSFER_RATE


# =============================================================================================
# Client
# =============================================================================================


class _Log:
    """The "pop3lite" logger, looked up once something has imported logging. Until then no
    handler or level can have been set, so nothing would be logged, and the import (several
    milliseconds, most of a short session's start-up) is saved."""

    def __init__(self) -> None:
        self._logger: logging.Logger | None = None

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name: it stands in for one
        if self._logger is None:
            if "logging" not in sys.modules:
                return False
            import logging

            self._logger = logging.getLogger("pop3lite")
        return self._logger.isEnabledFor(level)

    def debug(self, message: str, *args: object) -> None:
        if self.isEnabledFor(_DEBUG):
            cast("logging.Logger", self._logger).debug(message, *args)


def _check_lines(lines: int) -> str:
    if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
        raise ValueError(f"lines must be a non-negative integer, not {lines!r}")
    return str(lines)


def _masked(verb: str, args: tuple[str, ...], public: int) -> bytes:
    """A command line as the log shows it: the arguments after the first ``public`` (secrets)
    as one ****."""
    return " ".join((verb, *args[:public], *("****" for _ in args[public:1 + public]))).encode()


class Response(NamedTuple):
    """What command() returns: the text after +OK (raw bytes) and, for a multi-line reply,
    the body (dot-stuffing removed, CRLF line ends), else None."""

    text: bytes
    body: bytes | None


# Verbs that command() refuses, with the method that does them: they carry credentials that
# must stay out of logs, or change the state of the session in ways the client must track.
_OWN_METHOD_VERBS = {
    "USER": "login()",
    "PASS": "login()",
    "APOP": "apop()",
    "AUTH": "auth()",
    "STLS": "stls()",
    "UTF8": "utf8()",
    "QUIT": "quit()",
}
# RFC 1939 section 5 and RFC 2449 section 5 / RFC 6856 section 3: these verbs answer with a
# multi-line body after +OK (LIST, UIDL and LANG only without an argument).
_MULTILINE_VERBS = frozenset({"RETR", "TOP", "CAPA"})
_MULTILINE_WITHOUT_ARGUMENT = frozenset({"LIST", "UIDL", "LANG"})


def is_multiline(verb: str, *args: str) -> bool:
    """Whether a +OK to this command is followed by a multi-line body (for known verbs)."""
    verb = verb.upper()
    return verb in _MULTILINE_VERBS or (verb in _MULTILINE_WITHOUT_ARGUMENT and not args)


def _check_arguments(tls: str, timeout: float, pipeline_window: int, port: object) -> None:
    """POP3()'s checks of its arguments, before anything is sent."""
    if tls not in TLS_MODES:
        raise ValueError("tls must be one of {}, not {!r}".format(", ".join(TLS_MODES), tls))
    if not timeout or timeout <= 0:
        raise ValueError("timeout must be a positive number of seconds")
    if pipeline_window < 1:
        raise ValueError("pipeline_window must be at least 1")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise TypeError(f"port must be an int, not {type(port).__name__}")


class POP3:
    """A POP3 session. Connects, secures the link and reads the greeting on construction.

    ``tls``: "auto" (the default: no port or port 995 means TLS from the first byte; any other
    port means STLS, required unless the server is on a loopback address, where it is used if
    offered), "implicit", "starttls" (STLS required) or "none" (plaintext: the explicit opt-in).

    A port that expects TLS from the first byte stays silent until a ClientHello comes (RFC
    8314 section 3.3). So with tls="auto" on a port other than 110 and 995, the server gets
    _GREETING_WAIT (3) seconds to greet in plaintext; if it does not, implicit TLS is tried on
    a new connection (said in the log at DEBUG). An ``ssl_context`` is no hint either way: STLS
    needs one as much as implicit TLS does. ``greeting_timeout``: seconds to wait for the
    greeting (default: ``timeout``); when they pass, Timeout with reason "greeting" and no
    second try: the wait is then the caller's.

    ``utf8``: send UTF8 (RFC 6856) before login when the server offers it, so that messages
    come as they are stored: without it a server may replace a message with 8-bit headers by
    a surrogate (Courier sends a "Cannot display Unicode content" wrapper). False keeps the
    session in ASCII mode.
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: str = "auto",
        ssl_context: ssl.SSLContext | None = None,
        source_address: tuple[str, int] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        strict_size: bool = False,
        pipeline_window: int = PIPELINE_WINDOW,
        greeting_timeout: float | None = None,
        utf8: bool = True,
    ) -> None:
        _check_arguments(tls, timeout, pipeline_window, port)
        implicit = tls == "implicit" or (tls == "auto" and port in (None, POP3S_PORT))
        self.host = host
        self.port = port if port is not None else POP3S_PORT if implicit else POP3_PORT
        self.timeout = float(timeout)
        self.max_message_size = max_message_size
        self.strict_size = strict_size
        self.pipeline_window = pipeline_window
        self.greeting = ""
        """The greeting's text after +OK, control characters escaped."""
        self.timestamp: str | None = None
        """The APOP challenge from the greeting, or None (also after STLS)."""
        self.loopback = False
        self._tls_mode = tls
        self._ssl_context = ssl_context
        self._log = _Log()
        self._want_utf8 = utf8
        self._caps: Capabilities | None = None
        self._caps_before_login: Capabilities | None = None
        self._user: str | None = None  # who logged in, once someone has
        self._utf8 = False  # UTF-8 on the wire: UTF8 mode, or credentials said UTF8 USER
        self._utf8_mode = False  # the server accepted UTF8
        self._authenticated = False
        self._quit_sent = False
        self._quit_result: bytes | ServerError | None = None  # QUIT's reply, once read
        self._batch: _Batch | None = None
        self._sizes: dict[int, int] | None = None  # the last full LIST, to plan pipelining
        # The maildrop's size from STAT: an upper bound for the rest of the session (RFC 1939
        # section 8: the maildrop is locked, DELE only takes away), to plan pipelining.
        self._maildrop_octets: int | None = None
        # RFC 1939 section 8: the maildrop is locked for the session, so its messages keep
        # their numbers; only DELE (undone by RSET) hides one. A listing that names a number
        # beyond ``_highest`` is not a gap but a server out of step with itself.
        self._marked: set[int] = set()
        self._highest: int | None = None
        self._connect(source_address, implicit, greeting_timeout)

    def _connect(
        self, source_address: tuple[str, int] | None, implicit: bool, wait: float | None
    ) -> None:
        """Connect and read the greeting. tls="auto" on a port that is neither 110 nor 995
        cannot know which TLS the port speaks: a short wait for a plaintext greeting tells."""
        probe = (
            self._tls_mode == "auto"
            and self.port != POP3_PORT
            and not implicit
            and wait is None
            and self.timeout > _GREETING_WAIT
        )
        try:
            self._setup(source_address, implicit, _GREETING_WAIT if probe else wait)
        except Timeout as exc:
            if not probe or exc.reason != "greeting":
                raise
            self._log.debug(
                "no plaintext greeting from %s:%d within %gs: the port may expect TLS from "
                "the first byte, so trying implicit TLS (tls='implicit' skips this wait)",
                self.host,
                self.port,
                _GREETING_WAIT,
            )
            self._tls_mode = "implicit"
            self._setup(source_address, True, None)

    def _setup(
        self, source_address: tuple[str, int] | None, implicit: bool, wait: float | None
    ) -> None:
        """Connect, secure the link as ``implicit`` and the TLS mode say, read the greeting."""
        self._reader = ReplyReader()
        self._transport = _Transport(self.host, self.port, self.timeout, source_address)
        try:
            self.loopback = is_loopback(self._transport.peer_address)
            if implicit:
                self._start_tls()
            self._read_greeting(wait, implicit)
            if not implicit and self._tls_mode in ("auto", "starttls"):
                self._negotiate_stls(required=self._tls_mode == "starttls" or not self.loopback)
        except BaseException:
            self._transport.close("failed during connection setup")
            raise

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use ("TLSv1.3"), or None on a plaintext connection."""
        return self._transport.tls_version

    @property
    def cipher(self) -> str | None:
        return self._transport.cipher

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The server's certificate as ssl.SSLSocket.getpeercert() gives it, or None."""
        return self._transport.peer_certificate

    # -- context manager and lifetime --------------------------------------------------------

    def __enter__(self) -> POP3:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and self._transport.is_open and not self._quit_sent:
            self.quit()
        else:  # the block raised: close without QUIT, so nothing marked is deleted
            self.close()

    def __repr__(self) -> str:
        if not self._transport.is_open:
            state = "closed"
        else:
            state = "transaction" if self._authenticated else "authorization"
        link = self.tls_version or ("loopback" if self.loopback else "plaintext")
        return f"<pop3lite.POP3 {self.host}:{self.port} {state} {link}>"

    @property
    def user(self) -> str | None:
        """The user name the session logged in with (the SASL authentication identity), or
        None before login."""
        return self._user

    @property
    def is_open(self) -> bool:
        """True until the connection is closed (by quit(), close(), abort() or a failure)."""
        return self._transport.is_open

    def close(self) -> None:
        """Close without QUIT: messages marked for deletion stay on the server."""
        self._transport.close("closed by the client")

    def abort(self) -> None:
        """Like close(), but shut the socket down first, so that a call blocked on it in
        another thread returns at once."""
        self._transport.abort("aborted by the client")

    # -- the command/reply cycle: every command and every reply passes here -----------------------

    def _log_line(self, direction: str, line: bytes) -> None:
        self._log.debug("%s %s", direction, display_text(line.rstrip(b"\r\n")))

    @property
    def _encoding(self) -> str:
        return "utf-8" if self._utf8 else "ascii"

    def _send(
        self,
        verb: str,
        *args: str,
        public: int | None = None,
        expected: Expected = _SINGLE_LINE,
    ) -> None:
        """Send one command and note the reply it expects. With ``public`` set, only that many
        leading arguments reach the log; the rest (passwords, digests) are logged as ****."""
        line = format_command(verb, *args, encoding=self._encoding)
        shown = None if public is None else [_masked(verb, args, public)]
        self._transmit([line], [expected], shown)

    def _transmit(
        self,
        lines: list[bytes],
        expected: list[Expected],
        shown: list[bytes] | None = None,
        sender: _Batch | None = None,
    ) -> None:
        """Send formatted command lines (or SASL responses) in one write, each with the reply
        it expects: every byte the client sends passes here, and is logged here (``shown``
        in place of lines that carry secrets). A batch with replies in flight reads them
        first, unless it is the sender: the session never goes out of step."""
        if self._batch is not None and self._batch is not sender:
            self._batch.absorb()
        self._transport.check_open()  # a closed connection raises here, saying why it closed
        self._transport.start_operation()
        if self._log.isEnabledFor(_DEBUG):
            for line in lines if shown is None else shown:
                self._log_line("C:", line)
        for reply in expected:
            self._reader.expect(reply)
        self._transport.send(lines[0] if len(lines) == 1 else b"".join(lines))

    def _pull(self, read: Callable[[], _T | _NeedData], doing: str = "reading a response") -> _T:
        """``read()`` (the reader's next_event or next_reply) until it has an answer, receiving
        as it needs: the one receive loop of the client."""
        if not self._transport.is_open:  # after a failure the reader's state means nothing
            self._transport.check_open()  # raises, saying why the connection closed
        try:
            answer = read()
            while isinstance(answer, _NeedData):
                self._transport.receive(self._reader, doing)
                answer = read()
            return answer
        except Error as exc:  # framing broke: the session is out of step
            self._transport.fail(exc)
        except BaseException:  # Ctrl-C, say: the rest of the reply is still on its way
            self._transport.close("a response was cut short")
            raise

    def _event(self, doing: str = "reading a multi-line response") -> ReplyEvent:
        """The next event of a streamed body or a SASL exchange."""
        return cast(ReplyEvent, self._pull(self._reader.next_event, doing))

    def _reply(self, command: str, summarise: bool = True) -> tuple[bytes, bytes]:
        """Read one reply: the text after +OK and its body if it has one read whole (dot-
        stuffing removed, CRLF line ends; else b""); -ERR raises the fitting ServerError.
        A body is logged as its size, or not at all without ``summarise`` (the caller logs
        its lines)."""
        ok, text, body = self._pull(self._reader.next_reply)
        debug = self._log.isEnabledFor(_DEBUG)
        if debug or self._reader.eol != b"\r\n":
            self._log_status(ok, text)
        if not ok:
            raise refusal(text, command)
        if body is None:
            return text, b""
        if debug and summarise:
            self._log.debug("S: <%d octets, then .>", len(body))
        return text, body

    def _status(self, command: str) -> bytes:
        """Read one status line: the text after +OK, or the fitting ServerError raised."""
        return self._reply(command)[0]

    def _log_status(self, ok: bool, text: bytes) -> None:
        if self._reader.eol == b"\n":
            self._log.debug("server ended a line with a bare LF; tolerating it")
        if self._log.isEnabledFor(_DEBUG):
            indicator = b"+OK" if ok else b"-ERR"
            self._log_line("S:", indicator + (b" " + text if text else b""))

    def _stream(self, write: Callable[[bytes], object]) -> int:
        """Pass a multi-line body (after its +OK) to ``write`` piece by piece, each about
        STREAM_CHUNK octets and cut at a line end where possible. Returns its octets."""
        try:
            while True:
                event = self._event("reading a multi-line response")
                if isinstance(event, BodyEnd):
                    break
                write(cast(BodyPiece, event).data)
        except BaseException:  # the caller's write failed (or Ctrl-C): out of step
            self._transport.close("a response was cut short")
            raise
        if self._log.isEnabledFor(_DEBUG):
            self._log.debug("S: <%d octets, then .>", event.octets)
        return event.octets

    def _simple(self, verb: str, *args: str, public: int | None = None) -> bytes:
        """A command with a one-line answer: the text after +OK."""
        self._send(verb, *args, public=public)
        return self._status(verb)

    def _multiline(self, verb: str, *args: str) -> list[bytes]:
        """A command with a multi-line answer, as a list of lines without line ends."""
        self._send(verb, *args, expected=Expected(multiline=True, limit=MAX_LISTING_SIZE))
        text, body = self._reply(verb, summarise=False)
        lines = _lines(body)
        if self._log.isEnabledFor(_DEBUG):  # CAPA and listings are what -v is turned on to see
            for line in lines:
                self._log_line("S:", b"." + line if line.startswith(b".") else line)
            self._log.debug("S: .")
        return lines

    def command(
        self,
        verb: str,
        *args: str,
        multiline: bool | None = None,
        limit: int | None = None,
    ) -> Response:
        """Send any command and return its Response(text, body); -ERR raises ServerError.

        ``multiline`` says whether a +OK brings a body; by default it is known for the verbs
        of RFC 1939, 2449 and 6856 (RETR, TOP, CAPA; LIST, UIDL, LANG without an argument) and
        False for any other. A body may be ``limit`` octets (default: max_message_size for
        RETR and TOP, MAX_LISTING_SIZE otherwise). The same checks as every method apply:
        CR, LF and NUL are refused in arguments, and so are the verbs with a method of their
        own (USER, PASS, APOP, AUTH: credentials stay out of logs; STLS, UTF8, QUIT)."""
        verb = verb.upper()
        if verb in _OWN_METHOD_VERBS:
            raise ValueError(f"use {_OWN_METHOD_VERBS[verb]} for {verb}, not command()")
        if multiline is None:
            multiline = is_multiline(verb, *args)
        if limit is None:
            limit = self.max_message_size if verb in ("RETR", "TOP") else MAX_LISTING_SIZE
        self._send(verb, *args, expected=Expected(multiline=multiline, limit=limit))
        text, body = self._reply(verb)
        if verb == "DELE" and args and args[0].isascii() and args[0].isdecimal():
            self._marked.add(int(args[0]))
        elif verb == "RSET":
            self._marked.clear()
        return Response(text, body if multiline else None)

    # -- connection setup: greeting, TLS, STLS -------------------------------------------------

    def _read_greeting(self, wait: float | None, implicit: bool) -> None:
        self._reader.expect()
        self._transport.deadline = time.monotonic() + (self.timeout if wait is None else wait)
        try:
            text = self._status("greeting")
        except Timeout as exc:
            waited = self.timeout if wait is None else wait
            message = f"no greeting from {self.host}:{self.port} within {waited:g}s"
            if not implicit:
                message += " (the port may expect TLS from the first byte: tls='implicit')"
            raise Timeout(message, reason="greeting" if wait else exc.reason) from None
        self.greeting = display_text(text)
        self.timestamp = find_apop_timestamp(text)

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = create_tls_context()
        return self._ssl_context

    def _start_tls(self) -> None:
        self._transport.start_tls(self._context())
        self._log.debug("TLS established: %s %s", self.tls_version, self.cipher)

    def _negotiate_stls(self, required: bool) -> None:
        if not self.capa().stls:
            if required:
                raise TLSError(
                    f"{self.host}:{self.port} does not offer STLS; use implicit TLS (port 995), "
                    "or pass tls='none' to send everything unencrypted",
                    reason="no-stls",
                )
            return
        if not required:
            try:
                import ssl  # noqa: F401
            except ImportError:  # loopback, no ssl module: plaintext is allowed there
                return
        try:
            self.stls()
        except ServerError as exc:
            if required:
                self._transport.close("STLS refused")
                raise TLSError(f"server refused STLS: {exc.text}", reason="stls-refused") from None
            # loopback: plaintext is allowed, carry on without TLS

    def stls(self) -> str:
        """STLS (RFC 2595): upgrade to TLS. Forgets the capabilities and the APOP timestamp
        learned in plaintext and asks CAPA again. Returns the server's +OK text."""
        if self.tls_version:
            raise ValueError("the connection is already using TLS")
        if self._utf8:
            raise ValueError("STLS is not allowed after UTF8 (RFC 6856 section 2.1)")
        self._context()
        # RFC 2595 section 4 / RFC 8314 section 4.4: bytes after +OK and before the handshake
        # are a response-injection attempt; they must never be read as if they came over TLS.
        injection = TLSError(
            "server sent data after its STLS reply (possible response injection); "
            "connection closed",
            reason="injection",
        )
        try:
            text = self._simple("STLS")
        except ProtocolError as exc:
            if exc.reason != "surplus":
                raise
            raise injection from None  # the reader found them with the +OK
        if self._transport.data_waiting():
            self._transport.fail(injection)
        self._start_tls()
        self._caps = None
        self.timestamp = None
        self.capa()
        return display_text(text)

    # -- capabilities and modes -----------------------------------------------------------------

    def capa(self) -> Capabilities:
        """CAPA (RFC 2449) as ``{NAME: [args]}``; empty if the server has no CAPA.
        Cached; asked again after STLS and after login (RFC 2449 section 5)."""
        self._transport.check_open()  # even a cached answer: nothing after the connection closed
        if self._caps is None:
            try:
                lines = self._multiline("CAPA")
            except ServerError:
                self._caps = Capabilities()
            else:
                self._caps = parse_capabilities(lines)
        return self._caps

    def _may_pipeline(self) -> bool:
        """PIPELINING offered. RFC 2449 section 5: "Capabilities available in the
        AUTHORIZATION state MUST be announced in both states", so one seen before login still
        holds after it, and the CAPA round trip after login is saved."""
        before = self._caps_before_login
        if self._caps is None and before is not None and before.pipelining:
            return True
        return self.capa().pipelining

    def utf8(self) -> str:
        """UTF8 (RFC 6856): enter UTF-8 mode. Returns the server's +OK text."""
        if self._authenticated:  # checked here, so nothing is sent
            raise ValueError("UTF8 is only allowed before login (RFC 6856 section 2)")
        text = self._simple("UTF8")
        self._utf8 = self._utf8_mode = True
        return display_text(text)

    def _enable_utf8(self) -> None:
        """Before login, UTF8 when wanted and offered: RFC 6856 section 2 allows it only in
        the AUTHORIZATION state. A refusal (the server MAY refuse it) leaves ASCII mode."""
        if not self._want_utf8 or self._authenticated or self._utf8_mode:
            return
        if self.capa().utf8:
            try:
                self.utf8()
            except ServerError as exc:
                self._log.debug("UTF8 refused (%s): messages may come as surrogates", exc.text)

    def lang(self, language: str | None = None) -> str | list[str]:
        """LANG (RFC 6856 section 3): with a language range, switch to it and return the +OK
        text; without, the languages offered (``["en English", ...]``)."""
        if language is None:
            return [display_text(line) for line in self._multiline("LANG")]
        return display_text(self._simple("LANG", language))

    # -- authentication -----------------------------------------------------------------------

    def _require_private_link(self, what: str) -> None:
        """The one check that every login path sending a password or token goes through."""
        if self.tls_version or self.loopback or self._tls_mode == "none":
            return
        raise InsecureError(
            f"refusing to send {what} over an unencrypted connection to {self.host}; "
            "use TLS, or pass tls='none' to allow it",
            what,
        )

    def _check_credential(self, value: str, what: str) -> None:
        """RFC 6856 section 2.2: non-ASCII credentials only if the server says UTF8 USER."""
        if not isinstance(value, str):
            raise TypeError(f"{what} must be str, not {type(value).__name__}")
        if value.isascii():
            return
        if not self.capa().utf8_user:
            raise ValueError(
                f"the {what} is not ASCII and the server does not accept UTF-8 credentials "
                "(no 'UTF8 USER' capability, RFC 6856 section 2.2)"
            )
        self._utf8 = True  # RFC 6856 allows UTF-8 credentials before the UTF8 command

    def _logged_in(self, user: str) -> None:
        self._authenticated = True
        self._user = user
        # RFC 2449 section 5: capabilities may change after login, so CAPA is asked again
        # when needed; what was announced before login still holds (see _may_pipeline).
        self._caps_before_login = self._caps
        self._caps = None

    def login(self, user: str, password: str) -> str:
        """USER and PASS (in one write when the server pipelines). Returns the +OK text."""
        self._require_private_link("a password")
        pairs = (("USER", user), ("PASS", password))
        for verb, value in pairs:  # CR, LF, NUL: refused before anything is sent
            format_command(verb, value if isinstance(value, str) else "", encoding="utf-8")
        self._enable_utf8()
        self._check_credential(user, "user name")
        self._check_credential(password, "password")
        lines = [format_command(verb, value, encoding=self._encoding) for verb, value in pairs]
        if not self.capa().pipelining:
            self._simple("USER", user)
            text = self._simple("PASS", password, public=0)
        else:  # one write; nothing goes behind PASS before its answer (see _logged_in)
            shown = [lines[0], _masked("PASS", (password,), 0)]
            self._transmit(lines, [_SINGLE_LINE, _SINGLE_LINE], shown)
            try:
                self._status("USER")
            except ServerError:
                with contextlib.suppress(ServerError):  # its answer no longer matters, but
                    self._status("PASS")  # it is read, so the session stays in step
                raise
            text = self._status("PASS")
        self._logged_in(user)
        return display_text(text)

    def apop(self, user: str, password: str) -> str:
        """APOP (RFC 1939 section 7) with the greeting's timestamp. The password is not sent,
        but MD5 challenge-response is weak (CVE-2007-1558): prefer TLS with login() or SCRAM.
        After STLS the timestamp (which came in plaintext) is discarded and APOP refused."""
        if self.timestamp is None:
            raise ValueError(
                "no APOP timestamp: the greeting had none, it was not a valid msg-id, or it "
                "came before STLS and was discarded"
            )
        self._enable_utf8()
        self._check_credential(user, "user name")
        self._check_credential(password, "password")
        if self._utf8:  # RFC 6856 section 2.2: SASLprep, user as query, password as stored
            user = saslprep(user)
            password = saslprep(password, allow_unassigned=False)
        digest = apop_digest(self.timestamp, password)
        text = self._simple("APOP", user, digest, public=1)
        self._logged_in(user)
        return display_text(text)

    def auth(
        self,
        mechanism: str | Mechanism,
        user: str = "",
        password: str | None = None,
        *,
        token: str | None = None,
        authzid: str = "",
    ) -> str:
        """SASL AUTH (RFC 5034) with a mechanism name or a Mechanism object."""
        if isinstance(mechanism, str):
            mech = mechanism_for(
                mechanism,
                user,
                password=password,
                token=token,
                authzid=authzid,
                host=self.host,
                port=self.port,
            )
        else:
            mech = mechanism
        if mech.sends_secret:
            self._require_private_link(f"a {mech.name} credential")
        self._enable_utf8()
        try:
            text = self._sasl_exchange(mech)
        except Error:
            raise  # a -ERR (session in step), or the connection is already closed
        except BaseException:
            self._transport.close("authentication was interrupted")  # out of step
            raise
        self._logged_in(mech.user)
        return display_text(text)

    def _sasl_exchange(self, mech: Mechanism) -> bytes:
        """The AUTH command and its challenges; the text of the final +OK."""
        exchange = SaslExchange(mech)
        self._send("AUTH", *exchange.arguments, public=1, expected=_SASL_REPLY)
        while True:
            event = self._event()
            if isinstance(event, StatusLine):
                break
            if not isinstance(event, Challenge):  # pragma: no cover - the reader forbids it
                self._transport.fail(ProtocolError("unexpected reply to AUTH"))
            self._log_line("S:", b"+ " + event.data)
            try:
                line = exchange.answer(event.data)
            except ProtocolError as exc:
                self._transport.fail(exc)
            # Each round gets the full timeout (_transmit starts it): SCRAM's key derivation
            # on our side may take a while and must not eat into the server's time to answer.
            shown = line if line == b"*" else b"****"
            self._transmit([line + b"\r\n"], [_SASL_REPLY], [shown])
        self._log_status(event.ok, event.text)
        try:
            return exchange.finish(event.ok, event.text)
        except ServerError:
            raise  # refused: the session is in step
        except Error as exc:
            if exchange.cancelled and not event.ok:
                raise  # we cancelled, the server said -ERR: in step, and this is why
            # +OK to a cancelled exchange, or without the server's proof: it may be an
            # impostor, so nothing more is sent on this session.
            self._transport.fail(exc)

    def login_oauth2(
        self, user: str, token: str | Callable[[], str], mechanism: str | None = None
    ) -> str:
        """OAuth 2.0: OAUTHBEARER (RFC 7628) if offered, else XOAUTH2 (Google, Microsoft).
        ``token`` may be a callable returning a fresh token, such as an OAuth2 token source:
        then a token the server refuses is refreshed once and tried once more, and a source
        made for another account is refused before anything is sent."""
        value = token() if callable(token) else token
        account = getattr(token, "user", None)
        if account and account.lower() != user.lower():
            where = getattr(token, "path", "the token source")
            message = f"token file {where} was made for {account!r}, not {user!r}; sign in again"
            raise OAuth2Error(message, reason="token-file")
        if mechanism is None:
            mechanism = choose_oauth2_mechanism(self.capa().sasl)
        refresh = getattr(token, "refresh", None)
        try:
            return self.auth(mechanism, user, token=value)
        except AuthenticationError:
            if refresh is None or not self.is_open:
                raise
        # The token looked valid here but the server refused it (revoked, or clocks apart).
        return self.auth(mechanism, user, token=refresh(value))

    def login_best(self, user: str, password: str) -> str:
        """Log in with the strongest password mechanism offered (SCRAM-SHA-256, SCRAM-SHA-1,
        CRAM-MD5, PLAIN, LOGIN, then USER/PASS) and return its name.

        Exactly one mechanism is tried: a refusal raises rather than trying the next, so one
        wrong password never counts twice towards a lockout. APOP is never chosen."""
        choice = choose_password_mechanism(self.capa().sasl)
        if choice is None:
            self.login(user, password)
            return "USER"
        self.auth(choice, user, password)
        return choice

    # -- transaction commands -----------------------------------------------------------------

    def stat(self) -> Stat:
        """STAT: Stat(count, size) of the messages not marked as deleted."""
        return self._stat_from(self._simple("STAT"))

    def _stat_from(self, text: bytes) -> Stat:
        stat = parse_stat(text)
        self._maildrop_octets = stat.size
        if self._highest is None:
            self._highest = stat.count + len(self._marked)
        return stat

    def _sizes_from(self, lines: list[bytes]) -> dict[int, int]:
        sizes = unique_listing(map(parse_scan_listing, lines), "LIST")
        self._check_listing(sizes, "LIST")
        self._sizes = sizes
        return dict(sizes)

    def _uids_from(self, lines: list[bytes]) -> UIDList:
        uids = UIDList(unique_listing(map(parse_uid_listing, lines), "UIDL").items())
        self._check_listing(uids, "UIDL")
        if uids.duplicates:
            self._log.debug("server gave one UID to several messages: %r", uids.duplicates)
        return uids

    def _check_listing(self, numbers: Iterable[int], what: str) -> None:
        """A full LIST or UIDL names only messages the maildrop has (RFC 1939 section 8: it is
        locked for the session). Raised after the whole listing was read: still in step."""
        highest = max(numbers, default=0)
        if self._highest is not None and highest > self._highest:
            raise ProtocolError(
                f"{what} lists message {highest}, but the maildrop has only {self._highest}"
            )
        if self._highest is None:
            self._highest = max(highest, max(self._marked, default=0))

    def _check_number(self, asked: int, answered: int, what: str) -> None:
        """A LIST or UIDL for one message must answer for that message."""
        if answered != asked:
            raise ProtocolError(f"{what} {asked} was answered for message {answered}")

    @overload
    def list(self) -> dict[int, int]: ...

    @overload
    def list(self, number: int) -> int: ...

    def list(self, number: int | None = None) -> dict[int, int] | int:
        """LIST: ``{number: size}`` for every message, or one message's size."""
        if number is not None:
            answered, size = parse_scan_listing(self._simple("LIST", message_number(number)))
            self._check_number(number, answered, "LIST")
            return size
        return self._sizes_from(self._multiline("LIST"))

    @overload
    def uidl(self) -> UIDList: ...

    @overload
    def uidl(self, number: int) -> str: ...

    def uidl(self, number: int | None = None) -> UIDList | str:
        """UIDL: ``{number: uid}`` as a UIDList (see its ``duplicates``), or one UID."""
        if number is not None:
            answered, uid = parse_uid_listing(self._simple("UIDL", message_number(number)))
            self._check_number(number, answered, "UIDL")
            return uid
        return self._uids_from(self._multiline("UIDL"))

    def scan(self) -> tuple[Stat, dict[int, int], UIDList | None]:
        """STAT, LIST and UIDL: ``(stat, sizes, uids)``, in one round trip when the server
        pipelines; ``uids`` is None when the server refuses UIDL (it is optional)."""
        if not self._may_pipeline():
            stat, sizes = self.stat(), self.list()
            try:
                return stat, sizes, self.uidl()
            except ServerError:
                return stat, sizes, None
        verbs = ("STAT", "LIST", "UIDL")
        listing = Expected(multiline=True, limit=MAX_LISTING_SIZE)
        self._transmit([format_command(verb) for verb in verbs], [_SINGLE_LINE, listing, listing])
        # Every reply is read before a -ERR is raised, so the session stays in step.
        replies: list[bytes | ServerError] = []
        for verb in verbs:
            try:
                text, body = self._reply(verb)
            except ServerError as exc:
                replies.append(exc)
                continue
            replies.append(text if verb == "STAT" else body)
        stat_reply, list_reply, uidl_reply = replies
        for reply in (stat_reply, list_reply):
            if isinstance(reply, ServerError):
                raise reply
        return (
            self._stat_from(cast(bytes, stat_reply)),
            self._sizes_from(_lines(cast(bytes, list_reply))),
            None if isinstance(uidl_reply, ServerError) else self._uids_from(_lines(uidl_reply)),
        )

    def _message_reply(self, verb: str, *args: str, stream: bool = False) -> tuple[bytes, bytes]:
        """Send RETR or TOP and read its reply: (the +OK text, the body; b"" if streamed)."""
        limit = self.max_message_size
        self._send(verb, *args, expected=Expected(multiline=True, limit=limit, stream=stream))
        return self._reply(verb)

    def retr(self, number: int) -> bytes:
        """RETR: the whole message, CRLF line ends, dot-stuffing removed."""
        text, body = self._message_reply("RETR", message_number(number))
        self._check_size(number, len(body), parse_announced_size(text))
        return body

    def top(self, number: int, lines: int) -> bytes:
        """TOP: the header and the first ``lines`` lines of the body."""
        return self._message_reply("TOP", message_number(number), _check_lines(lines))[1]

    def retr_to(self, number: int, file: IO[bytes], max_size: int | None = None) -> int:
        """RETR into a binary file object in constant memory. Returns the octets written.

        There is no size limit unless ``max_size`` is given (then a longer message raises
        LimitExceeded and closes the connection); a server that streams without end is
        otherwise stopped only when it slows below MIN_TRANSFER_RATE."""
        text = self._message_reply("RETR", message_number(number), stream=True)[0]
        announced = parse_announced_size(text)
        written = 0

        def write(piece: bytes) -> None:
            nonlocal written
            if max_size is not None and written + len(piece) > max_size:
                raise LimitExceeded(f"message {number} is larger than {max_size} octets")
            _write_all(file, piece)
            written += len(piece)

        self._stream(write)
        self._check_size(number, written, announced)
        return written

    def _check_size(
        self, number: int, actual: int, announced: int | None, stacklevel: int = 3
    ) -> None:
        """Compare with the size in RETR's "+OK 5954 octets". Exchange and others announce
        sizes that differ from what they send, so by default a mismatch is a warning."""
        if announced is None or announced == actual:
            return
        text = f"message {number} is {actual} octets but the server announced {announced}"
        if self.strict_size:
            raise ProtocolError(text)
        import warnings

        warnings.warn(text, SizeMismatchWarning, stacklevel=stacklevel)

    def message(self, number: int) -> EmailMessage:
        """RETR parsed as an ``email.message.EmailMessage`` (email.policy.default), with
        mislabelled encoded words in the header repaired (see repair_encoded_words)."""
        import email.policy
        from email.parser import BytesParser

        data = self.retr(number)
        split = data.find(b"\r\n\r\n")
        header_end = len(data) if split < 0 else split + 2
        data = repair_encoded_words(data[:header_end]) + data[header_end:]
        parsed = BytesParser(policy=email.policy.default).parsebytes(data)
        return parsed  # type: ignore[return-value,unused-ignore]

    def dele(self, number: int) -> str:
        """DELE: mark a message for deletion; only QUIT commits it."""
        text = self._simple("DELE", message_number(number))
        self._marked.add(number)
        return display_text(text)

    def rset(self) -> str:
        """RSET: unmark every message marked for deletion."""
        text = self._simple("RSET")
        self._marked.clear()
        return display_text(text)

    def noop(self) -> str:
        """NOOP: keep the session alive."""
        return display_text(self._simple("NOOP"))

    def quit(self) -> str:
        """QUIT: commit deletions and close. Returns the server's sign-off text."""
        if self._quit_sent and self._batch is not None:  # a batch sent it (then_quit)
            self._batch.absorb()
        if not self._quit_sent:
            self._send("QUIT", expected=_LAST_REPLY)
            self._quit_sent = True
            self._quit_reply()
        result = self._quit_result
        if result is None:
            raise ValueError("QUIT was sent, and its reply never read: the session ended early")
        if isinstance(result, ServerError):
            raise result
        return display_text(result)

    def _quit_reply(self) -> None:
        """Read QUIT's reply, kept for quit() (a batch reads it too), and close."""
        try:
            self._quit_result = self._status("QUIT")
        except ServerError as exc:
            self._quit_result = exc
        finally:
            self._transport.close("QUIT sent", graceful=True)

    # -- batches, pipelined where the server allows it ------------------------------------------

    def retr_many(self, numbers: Iterable[int], *, then_quit: bool = False) -> Iterator[Fetched]:
        """RETR each message; yields Fetched(number, data, error) in order. Pipelined, with a
        bounded window, when the server advertises PIPELINING (RFC 2449 section 6.6).

        ``then_quit``: the session ends with this batch. When no message is marked for
        deletion, QUIT is sent behind the last RETR (a round trip less) and the connection
        closes after its reply; quit() then returns that reply. Otherwise call quit()."""
        return _Batch(self, "RETR", numbers, then_quit=then_quit)

    def top_many(self, numbers: Iterable[int], lines: int) -> Iterator[Fetched]:
        """TOP for each message, as retr_many() does RETR."""
        return _Batch(self, "TOP", numbers, (_check_lines(lines),))

    def dele_many(self, numbers: Iterable[int]) -> Iterator[Fetched]:
        """DELE each message, as retr_many() does RETR; ``data`` is None."""
        return _Batch(self, "DELE", numbers)

    def retr_many_to(
        self,
        numbers: Iterable[int],
        open_sink: Callable[[int], IO[bytes]],
        max_size: int | None = None,
        *,
        then_quit: bool = False,
    ) -> Iterator[Streamed]:
        """RETR each message into the binary file ``open_sink(number)`` returns (called once
        its +OK arrived), in constant memory, pipelined as retr_many() is. Yields
        Streamed(number, octets, error) in order; the caller closes each sink. A message over
        ``max_size`` octets is read to its end and discarded (the batch goes on) and comes
        with a LimitExceeded error; a -ERR comes as a ServerError; the sink may hold a part.
        ``then_quit`` as for retr_many()."""
        batch = _Batch(self, "RETR", numbers, sink=(open_sink, max_size), then_quit=then_quit)
        for fetched in batch:
            octets, over = batch.streamed.popleft()
            yield Streamed(fetched.number, octets, fetched.error or over)


class _Batch:
    """One pipelined batch (retr_many() and friends): it owns pipelining. It sends its
    commands through the session's one send path, keeps the books of what is in flight, and
    reads its replies, in order.

    Up to ``window`` commands (fewer when PIPELINE_WINDOW_BYTES octets of the batch's longest
    command line would not hold that many) and PIPELINE_MEMORY octets of expected responses
    are in flight. If the caller sends another command before the batch
    ends (a DELE after each RETR, say), the session calls absorb() first: the responses in
    flight are read into ``ready``, so the session never goes out of step; the response
    budget bounds that queue.
    """

    def __init__(
        self,
        pop: POP3,
        verb: str,
        numbers: Iterable[int],
        extra: tuple[str, ...] = (),
        sink: tuple[Callable[[int], IO[bytes]], int | None] | None = None,
        then_quit: bool = False,
    ) -> None:
        self.numbers = [int(message_number(n)) for n in numbers]  # before anything is sent
        self.count = len(self.numbers)
        self.verb = verb
        self.multiline = verb != "DELE"
        self.format_line = format_numbered(verb, *extra, encoding=pop._encoding)
        longest = len(self.format_line(max(self.numbers, default=1)))  # raises before sending
        window = pop.pipeline_window if pop._may_pipeline() else 1
        self.window = max(1, min(window, PIPELINE_WINDOW_BYTES // longest))
        self.step = max(1, self.window // 8)  # top up once this many are free (or all unsent)
        self.expected = Expected(
            multiline=self.multiline, limit=pop.max_message_size, stream=sink is not None
        )
        self.sent = 0
        self.answered = 0
        self.received = 0  # octets of bodies so far, for the average response size
        # ends[i]: the response octets expected for the first i commands, a running sum: the
        # octets in flight are ends[sent] - ends[answered], and a reply changes no books.
        self.ends = [0]
        # Results read ahead while another command waited; a size error (strict_size) is kept
        # in its place and raised when the caller reaches it, not from the other command.
        self.ready: deque[Fetched | ProtocolError] = deque()
        # retr_many_to(): bodies go to open_sink(number), up to max_size octets each (the rest
        # is read and dropped); (octets, LimitExceeded or None) per reply, in order.
        self.sink = sink
        self.streamed: deque[tuple[int, LimitExceeded | None]] = deque()
        self.then_quit = then_quit
        self._pop = pop

    def __iter__(self) -> _Batch:
        return self

    def __next__(self) -> Fetched:
        if self.ready:
            item = self.ready.popleft()
            if isinstance(item, ProtocolError):
                raise item
            return item
        if self.answered >= self.count:
            raise StopIteration
        pop = self._pop
        if pop._batch is not self:
            if pop._batch is not None:
                pop._batch.absorb()
            pop._batch = self
        free = self.window - (self.sent - self.answered)
        if self.sent < self.count and (free >= self.step or free >= self.count - self.sent):
            self._top_up()  # the window stays nearly full, in few, larger writes
        result = self._read_reply()
        if self.answered == self.sent:
            pop._batch = None  # nothing in flight: other commands need not wait for us
        return result

    def absorb(self) -> None:
        """Read every response in flight into the queue (before another command is sent)."""
        while self.answered < self.sent:
            try:
                item: Fetched | ProtocolError = self._read_reply()
            except ProtocolError as exc:
                if not self._pop.is_open:
                    raise  # out of step: nothing more can be read
                item = exc  # a size mismatch: the session is in step
            self.ready.append(item)
        if self._pop._batch is self:
            self._pop._batch = None

    def _expected_octets(self) -> int:
        """What a response will probably take where LIST has not said (LIST sizes are used
        where known, TOP's being at most that): the average so far. Before the first answer
        only two bounds are known: STAT's size of the whole maildrop (trusted as LIST sizes
        are: when it fits the budget, so does any batch) and max_message_size (the reader
        refuses more). Without a smaller one, half the budget: two commands, until the first
        answer tells more."""
        pop = self._pop
        if not self.multiline:
            return 0
        if pop._maildrop_octets is not None and pop._maildrop_octets <= PIPELINE_MEMORY:
            return 0
        if self.answered:
            return self.received // self.answered
        return min(PIPELINE_MEMORY // 2, pop.max_message_size)

    def _top_up(self) -> None:
        """Send as many more commands as the window and the response budget allow."""
        pop, numbers, ends = self._pop, self.numbers, self.ends
        guess = self._expected_octets()  # for a number without a known size
        sizes = pop._sizes if self.multiline and pop._sizes is not None else {}
        first = sent = self.sent
        stop = min(self.count, self.answered + self.window)
        budget = ends[self.answered] + PIPELINE_MEMORY
        total = ends[sent]
        added = []
        while sent < stop:
            total += sizes.get(numbers[sent], guess)
            if total > budget and sent > self.answered:
                break
            added.append(total)
            sent += 1
        lines = [self.format_line(number) for number in numbers[first:sent]]
        ends += added
        self.sent = sent
        expected = [self.expected] * len(lines)
        if self.then_quit and sent == len(numbers) and not pop._marked:
            # The session ends here and nothing is marked, so QUIT cannot commit anything
            # the caller might still want to undo: it rides along (one round trip less).
            lines.append(format_command("QUIT"))
            expected.append(_LAST_REPLY)
            pop._quit_sent = True
        pop._transmit(lines, expected, sender=self)

    def _read_reply(self) -> Fetched:
        pop = self._pop
        number = self.numbers[self.answered]
        data = error = over = None
        text = b""
        streamed = 0
        try:
            text, body = pop._reply(self.verb)
        except ServerError as exc:
            error = exc
        else:
            if self.sink is not None:
                open_sink, max_size = self.sink
                streamed, over = self._stream_into(open_sink(number), number, max_size)
            elif self.multiline:
                data = body
            else:
                pop._marked.add(number)  # DELE
        # The books first: the size check below may raise, and the batch must stay in step.
        self.answered += 1
        if self.sink is not None:
            self.streamed.append((streamed, over))
        size = streamed if data is None else len(data)
        self.received += size
        if self.answered == self.count and pop._quit_sent and pop.is_open:
            pop._quit_reply()  # QUIT went behind the last command
        # The size is parsed only when the +OK is not plainly "<the size> octets".
        if (
            error is None
            and over is None
            and self.verb == "RETR"
            and not text.startswith(b"%d octets" % size)
        ):
            # The caller's next(): __next__, here, _check_size.
            pop._check_size(number, size, parse_announced_size(text), stacklevel=4)
        return Fetched(number, data, error)

    def _stream_into(
        self, sink: IO[bytes], number: int, max_size: int | None
    ) -> tuple[int, LimitExceeded | None]:
        """A body into ``sink``: (its octets, LimitExceeded if over ``max_size``). Past the
        limit the rest is read and dropped, so the session stays in step."""
        received = 0
        over: LimitExceeded | None = None

        def write(piece: bytes) -> None:
            nonlocal received, over
            received += len(piece)
            if over is None and max_size is not None and received > max_size:
                over = LimitExceeded(f"message {number} is larger than {max_size} octets")
            if over is None:
                _write_all(sink, piece)

        self._pop._stream(write)
        return received, over


def _lines(body: bytes) -> list[bytes]:
    """A listing's body (CRLF line ends) as its lines, without line ends."""
    lines = body.split(b"\r\n")
    lines.pop()  # the body ends with CRLF, so the last item is empty
    return lines


def _write_all(file: IO[bytes], data: bytes) -> None:
    """file.write(data) until all is written: a raw (unbuffered) file may take less."""
    rest = data
    while rest:
        done = file.write(rest)
        if done is None or done >= len(rest):
            return
        if done <= 0:
            raise OSError("the file accepted no bytes")
        rest = rest[done:]



# =============================================================================================
# Delivery: save a mailbox into a Maildir, an mbox or a command, crash-safe, in constant memory
# =============================================================================================
#
#     with pop3lite.POP3("pop.example.com") as pop:
#         pop.login("alice", password)
#         pop3lite.save(pop, "~/Maildir", delete=True)
#
# save() drives a Destination (Maildir, Mbox, MDA) through these steps; the table is the
# durability order, in one place (what may be lost or doubled follows from it):
#
#   step                                            why
#   (1) begin/finish: write the message to tmp/     nothing else may point at data that is not
#       (Maildir), append it to the mbox, or        there yet
#       spool it for the command (MDA)
#   (2) sync: fdatasync the file (MDA: run the      its octets are on disk (the command said
#       command on it and wait for exit 0)          so) before anything counts it as saved
#   (3) deliver: Maildir renames it into new/       the rename is what makes it a message and
#       under a name that carries the record (tag   its name its record; a file still in tmp/
#       and key), then fsyncs new/ (per batch)      is incomplete (removed by the next run)
#   (4) journal lines ONLY for the keys step 3      a line never names a message that a power
#       returned; fsync the journal (per message    cut can take away; per message: at most
#       for an mbox and a command)                  the one message in flight is saved twice
#   (5) DELE only what is durable: this run's       the server's copy goes only when ours is
#       delivered messages; an earlier run's only   on disk; a Maildir file the user deleted
#       when its record is (Maildir: the file in    keeps the server's copy
#       new/ or cur/; mbox, MDA: the journal line)
#   (6) QUIT only after every write succeeded       QUIT commits the DELEs (RFC 1939 section
#                                                   6); any failure leaves without it
#
# Before step 1, save() reads what earlier runs saved: the journal, and the records the
# destination holds itself (Maildir file names a kill kept out of the journal: recorded(),
# made durable by settle() before the journal names them).
# A failure the process survives journals nothing more: it cuts an mbox back to where the
# message began, and delivers a Maildir's complete messages (steps 2 and 3), whose names the
# next run journals after syncing new/ and cur/ again.
# Every run writes records (issue 19: a second `save` must not fetch everything again), so
# every run syncs: the records cost what the journal costs. new=False fetches every message
# again (and records it again).
# Records are keyed by the UID (_record_keys): a UID several messages share is told apart by
# the size when it can be, else those messages get no record and are fetched every time.

_JOURNAL_MAGIC = "pop3lite-journal 1"
_SYNC_BATCH = 64  # Maildir messages per directory fsync and journal write
_SYNC_BATCH_OCTETS = 16 * 1024 * 1024
_HEADER_LIMIT = 64 * 1024  # octets of header an mbox From_ line is looked for in
_STALE_LOCK_AGE = 1024  # seconds after which a lock without a live pid is stale (procmail's)
_LOCK_ATTEMPTS = 10
_LOCK_WAIT = 10.0  # seconds a dot lock held by a live process is waited for
_LOCK_POLL = 0.2  # seconds between looks at such a lock
_SAFE_UID = re.compile(r"[A-Za-z0-9._-]{1,40}")  # a UID that is its own key (short names)
# The Maildir record: ",pop3lite=TAG-KEY" (not ",U=", which mbsync reads as its own UID).
_MAILDIR_RECORD = re.compile(r",pop3lite=([0-9a-f]{8})-([A-Za-z0-9._~#-]+)(?::|$)")
# mboxrd (see the README): a line that matches >*From gets one more ">", so reading removes it.
_FROM_LINE = re.compile(rb"^>*From ", re.MULTILINE)
_FROM_PREFIX = re.compile(rb">*(?:F(?:r(?:o(?:m)?)?)?)?")


class _StaleLockWarning(UserWarning):
    """save() took over a lock a dead process left (the command line says so even with -q)."""


class SaveReport(NamedTuple):
    """What save() did: ``saved`` messages of ``octets`` octets (as the server sent them);
    ``already`` skipped as saved by an earlier run; ``skipped`` ``(number, size)`` of those
    over ``max_size`` (neither saved nor deleted); ``deleted`` on the server; ``kind`` of the
    destination ("Maildir", "mbox" or "MDA")."""

    saved: int
    octets: int
    already: int
    skipped: list[tuple[int, int]]
    deleted: int
    kind: str


def _descriptor_writer(descriptor: int) -> Callable[[bytes], None]:
    """A function that writes all of its bytes to ``descriptor`` (os.write may take less)."""
    import os

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]

    return write


def _fsync_directory(path: str) -> None:
    import os

    if os.name == "nt":
        return  # a directory cannot be opened on Windows; NTFS journals renames itself
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_data(descriptor: int) -> None:
    """fdatasync where there is one: the data and the size, not the times (on ext4 about a
    quarter of an fsync's cost); the directory entry is made durable by a directory fsync."""
    import os

    getattr(os, "fdatasync", os.fsync)(descriptor)


_SYNC_THREADS = 8  # fdatasyncs at once: see _sync_all


def _sync_all(descriptors: list[int]) -> None:
    """fdatasync every descriptor, several at once. ext4 and XFS fold syncs that wait at the
    same time into one journal commit, so a batch costs the time of a few syncs, not one per
    file (measured 2-3x faster here for 64 small files). Raises the first error, after every
    sync has ended."""
    if len(descriptors) < 2:
        for descriptor in descriptors:
            _sync_data(descriptor)
        return
    import threading

    pending = list(descriptors)
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            try:
                descriptor = pending.pop()  # atomic: each descriptor is synced once
            except IndexError:
                return
            try:
                _sync_data(descriptor)
            except BaseException as exc:  # reported by the caller's thread
                errors.append(exc)
                return

    workers = min(_SYNC_THREADS, len(descriptors))
    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:  # a signal in the join: the descriptors must outlive their syncs
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


def _state_part(text: str, limit: int | None = 80) -> str:
    """``text`` made safe (and short) as the readable part of a file name (the tag after it
    is what tells two accounts apart)."""
    return re.sub(r"[^A-Za-z0-9.@_-]", "_", text)[:limit]


def _record_key(uid: str) -> str:
    """The key a UID is recorded under: the UID itself when it is short and safe in a file
    name, else "~" and 40 hex digits of its SHA-256 (file names stay below NAME_MAX)."""
    import hashlib

    if _SAFE_UID.fullmatch(uid):
        return uid
    return "~" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _record_keys(sizes: dict[int, int], uids: UIDList | None) -> dict[int, str]:
    """The record key of each message that can have one. A UID several messages share is
    told apart by the size (from LIST) when that size is unique among them; otherwise, or
    without a UID (UIDL skipped the message), there is no key: such a message is fetched
    every time (a duplicate is possible, a loss is not)."""
    keys: dict[int, str] = {}
    if uids is None:
        return keys
    for number in sizes:
        uid = uids.get(number)
        if uid is None:
            continue
        if uid not in uids.duplicates:
            keys[number] = _record_key(uid)
            continue
        size = sizes[number]
        same = [n for n in uids.duplicates[uid] if sizes.get(n) == size]
        if same == [number]:
            keys[number] = f"{_record_key(uid)}#{size}"
    return keys


def _boot_time() -> float | None:
    """When the system started (Linux: btime in /proc/stat), or None where that is unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/stat", "rb") as file:
        for line in file.read(1 << 16).splitlines():
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return None


def _flock(descriptor: int, what: str, wait: float = 0.0) -> None:
    """An exclusive advisory lock, waiting up to ``wait`` seconds for another process to
    release it; BlockingIOError naming ``what`` when it does not."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; the dot lock still guards mboxes
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise BlockingIOError(f"{what} is in use by another process") from None
        time.sleep(_LOCK_POLL)  # bounded by the deadline


class _Journal:
    """The append-only record of the keys saved for one account (see the section comment)."""

    def __init__(self, path: str, identity: str) -> None:
        self.path = path
        self.identity = identity
        self.descriptor = -1
        self.lines = 0

    def open(self) -> set[str]:
        """Lock the journal (creating it) and return the keys it records."""
        import os

        for _ in range(_LOCK_ATTEMPTS):
            created = not os.path.exists(self.path)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                _flock(descriptor, f"the state file {self.path}")
                # A compaction may have replaced the file between open and lock: retry.
                if os.path.exists(self.path) and os.path.samestat(
                    os.fstat(descriptor), os.stat(self.path)
                ):
                    break
            except BaseException:
                os.close(descriptor)
                raise
            os.close(descriptor)
        else:
            raise BlockingIOError(f"the state file {self.path} keeps changing")
        self.descriptor = descriptor
        if os.fstat(descriptor).st_size == 0:
            os.write(descriptor, f"{_JOURNAL_MAGIC} {self.identity}\n".encode())
            if created:
                _fsync_directory(os.path.dirname(self.path))
        return self._read()

    def _read(self) -> set[str]:
        import os

        os.lseek(self.descriptor, 0, os.SEEK_SET)
        text = b"".join(iter(lambda: os.read(self.descriptor, 1 << 20), b""))
        if not text.startswith(_JOURNAL_MAGIC.encode()):
            raise OSError(f"{self.path} is not a pop3lite state file; move it away")
        header = text.split(b"\n", 1)[0].decode("utf-8", "replace")
        if header != f"{_JOURNAL_MAGIC} {self.identity}":  # never trust another's records
            raise OSError(
                f"{self.path} is the state of {header[len(_JOURNAL_MAGIC) + 1 :]!r}, not of "
                f"{self.identity!r}; move it away"
            )
        if not text.endswith(b"\n"):  # a line cut short by a crash: the record never was
            os.ftruncate(self.descriptor, text.rfind(b"\n") + 1)
        lines = text.split(b"\n")[1:-1]
        self.lines = len(lines)
        return {line[2:].decode("ascii", "replace") for line in lines if line.startswith(b"+ ")}

    def append(self, keys: Iterable[str], sync: bool = False) -> None:
        """Record ``keys`` in one write (a kill cannot split a line from the next)."""
        import os

        data = "".join(f"+ {key}\n" for key in keys).encode("ascii")
        if data:
            os.write(self.descriptor, data)
            self.lines += data.count(b"\n")
        if sync:
            os.fsync(self.descriptor)

    def compact(self, keep: set[str]) -> None:
        """Rewrite the journal with ``keep`` only, atomically, when it has grown mostly stale."""
        import os

        if self.lines <= 2 * len(keep) + 256:
            return
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="ascii") as file:
            file.write(f"{_JOURNAL_MAGIC} {self.identity}\n")
            file.writelines(f"+ {key}\n" for key in sorted(keep))
            file.flush()
            os.fsync(file.fileno())
        new = os.open(temporary, os.O_RDWR | os.O_APPEND)
        try:
            _flock(new, f"the state file {self.path}")
            os.replace(temporary, self.path)
        except BaseException:
            os.close(new)
            raise
        _fsync_directory(os.path.dirname(self.path))
        os.close(self.descriptor)
        self.descriptor = new
        self.lines = len(keep)

    def close(self) -> None:
        import os

        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1


def _legacy_state(path: str) -> set[str]:
    """The UIDs of a state file of pop3lite 0.1 (JSON, rewritten whole at the end of a run)."""
    import json

    with open(path, encoding="utf-8") as file:
        state = json.load(file)
    uids = state.get("uids") if isinstance(state, dict) else None
    if not isinstance(uids, list) or not all(isinstance(uid, str) for uid in uids):
        raise ValueError("no list of UIDs in it")
    return set(uids)


class _LocalLines:
    """A binary sink that stores a message as local files hold it: CRLF becomes LF (also
    when a CRLF is split between two pieces) and, for an mbox, mboxrd quoting of >*From lines
    (the From_ line is _MboxMessage's)."""

    def __init__(
        self, write: Callable[[bytes], None], quote_from: bool, counted: Callable[[int], None]
    ) -> None:
        self._write = write
        self._quote_from = quote_from
        self._counted = counted
        self._held = b""  # a CR that may start a CRLF, or a line start that may become >From
        self._at_line_start = True
        self.last = b"\n"  # the last octet passed on

    def write(self, data: bytes) -> int:
        self._counted(len(data))
        self._pass(self._held + data, final=False)
        return len(data)

    def finish(self) -> None:
        held, self._held = self._held, b""
        self._pass(held, final=True)

    def _pass(self, data: bytes, final: bool) -> None:
        self._held = b""
        if not final and data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n")
        if self._quote_from:
            if not final:  # hold back a line start that may yet become ">*From "
                cut = data.rfind(b"\n") + 1
                tail = data[cut:]
                at_line_start = cut > 0 or self._at_line_start
                if at_line_start and len(tail) < 4096 and _FROM_PREFIX.fullmatch(tail):
                    data, self._held = data[:cut], tail + self._held
            if self._at_line_start:
                data = _FROM_LINE.sub(b">\\g<0>", data)
            else:
                split = data.find(b"\n") + 1
                if split:
                    data = data[:split] + _FROM_LINE.sub(b">\\g<0>", data[split:])
        if data:
            self._write(data)
            self._at_line_start = data.endswith(b"\n")
            self.last = data[-1:]


class _MboxMessage:
    """Writes one message into an mbox: its From_ line first, made from the header, so the
    header (up to _HEADER_LIMIT octets) is held until it is complete."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._header = bytearray()
        self._started = False

    def write(self, data: bytes) -> None:
        if self._started:
            self._write(data)
            return
        self._header += data
        end = self._header.find(b"\n\n")
        if end >= 0 or len(self._header) >= _HEADER_LIMIT:
            self._start(end)

    def close(self) -> None:
        if not self._started:
            self._start(-1)

    def _start(self, end: int) -> None:
        self._started = True
        held, self._header = bytes(self._header), bytearray()
        self._write(_from_line(held[:end] if end >= 0 else held) + held)


class Destination:
    """Where save() puts messages: the delivery interface (Maildir, Mbox and MDA implement it;
    a subclass of your own works the same way). save() calls, in this order:

    - ``open()``, then ``state_path()`` for the journal, ``recorded()`` and ``settle()``;
    - per message ``begin()``, whose sink receives the octets, then ``finish()`` (step 1), or
      ``abandon()`` when the message failed;
    - after every message (``per_message``) or per batch: ``sync()`` (step 2) and
      ``deliver()`` (step 3), whose keys it journals (step 4);
    - finally ``close()``, whatever happened.

    What save() needs to know, each destination declares: ``per_message``, and
    ``records_in_place``. Local failures raise OSError (the MDA: DeliveryError)."""

    kind = ""
    """A word for people: "Maildir", "mbox", "MDA" (SaveReport.kind)."""
    path = ""
    """Where the mail goes: the Maildir or the mbox; the MDA's state directory."""
    per_message = True
    """True: sync, deliver and journal after every message (a kill doubles at most the one
    in flight); False: per batch of up to _SYNC_BATCH messages (Maildir: its file names are
    the record, so a batch loses no record)."""
    records_in_place = False
    """True: the destination holds its own records (Maildir: file names), and an earlier
    run's message is deleted on the server only while that record is there; False: the
    journal line is the record."""

    def open(self) -> None:
        """Create or lock the destination, syncing what was created."""
        raise NotImplementedError

    def state_path(self, name: str) -> str:
        """Where the journal (or a 0.1 state file) named ``name`` lives."""
        raise NotImplementedError

    def recorded(self, tag: str) -> set[str]:
        """The keys of the records the destination itself holds for the account ``tag``
        (Maildir: file names in new/ and cur/); our cut-short leftovers removed."""
        return set()

    def settle(self) -> None:
        """Make the records recorded() found durable before the journal names them (a kill
        between a rename and the directory fsync leaves them undurable)."""

    def begin(self, key: str | None, count: Callable[[int], None]) -> IO[bytes]:
        """Start a message recorded under ``key`` (None: no record) and return the binary
        file its octets (CRLF line ends, as the server sends them) are written to;
        ``count(octets)`` is to be called as they arrive. Step 1."""
        raise NotImplementedError

    def finish(self) -> None:
        """The message begun last is complete (step 1 done)."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Drop the message being written (it failed); the finished ones stay."""
        raise NotImplementedError

    def sync(self) -> None:
        """Step 2: make the finished messages durable. When it raises, those messages are
        dropped (not delivered; the next run fetches them again)."""
        raise NotImplementedError

    def deliver(self) -> list[str]:
        """Step 3: make the synced messages messages; return their keys (those that have
        one), the only ones the journal may name."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything; what was not delivered is dropped (Maildir: left in tmp/,
        where the next run removes it)."""
        raise NotImplementedError


class Maildir(Destination):
    """A Maildir destination for save() (created if missing, as cur, new and tmp)."""

    kind = "Maildir"
    per_message = False  # the file names are the record; the journal follows per batch
    records_in_place = True

    def __init__(self, path: str) -> None:
        import os

        self.path = os.path.abspath(os.path.expanduser(path))
        self._sequence = 0
        self._tag = ""
        # (descriptor, tmp path, new path, key) of the message being written, of those
        # finished but not synced, and of those synced but not renamed
        self._current: tuple[int, str, str, str | None] | None = None
        self._complete: list[tuple[int, str, str, str | None]] = []
        self._synced: list[tuple[str, str, str | None]] = []
        self._sink: _LocalLines | None = None

    def __repr__(self) -> str:
        return f"<pop3lite.Maildir {self.path!r}>"

    def open(self) -> None:
        import os

        layout = [os.path.join(self.path, sub) for sub in ("cur", "new", "tmp")]
        partial = os.path.isdir(self.path) and not all(os.path.isdir(sub) for sub in layout)
        if partial and os.listdir(self.path):
            raise OSError(
                f"{self.path} is a directory but not a Maildir (no cur, new and tmp in it); "
                "give a new or empty directory, or a FILE.mbox"
            )
        created = not os.path.isdir(self.path)
        os.makedirs(self.path, 0o700, exist_ok=True)
        for sub in layout:
            if not os.path.isdir(sub):
                os.mkdir(sub, 0o700)
                created = True
        if created:
            for sub in layout:
                _fsync_directory(sub)
            _fsync_directory(self.path)
            _fsync_directory(os.path.dirname(self.path))

    def state_path(self, name: str) -> str:
        import os

        return os.path.join(self.path, f".pop3lite-{name}")

    def recorded(self, tag: str) -> set[str]:
        import os

        self._tag = tag
        keys = set()
        for sub in ("new", "cur"):
            for name in os.listdir(os.path.join(self.path, sub)):
                match = _MAILDIR_RECORD.search(name)
                if match and match.group(1) == tag:
                    keys.add(match.group(2))
        tmp = os.path.join(self.path, "tmp")
        for name in os.listdir(tmp):
            match = _MAILDIR_RECORD.search(name)
            if match and match.group(1) == tag:  # ours, cut short: we hold the journal lock
                os.unlink(os.path.join(tmp, name))
        return keys

    def settle(self) -> None:
        import os

        for sub in ("new", "cur"):
            _fsync_directory(os.path.join(self.path, sub))

    def begin(self, key: str | None, count: Callable[[int], None]) -> IO[bytes]:
        import os

        self._sequence += 1
        now = time.time()
        host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        host = host.replace(",", "\\054")[:64]
        when = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}"
        unique = f"{when}Q{self._sequence}R{os.urandom(4).hex()}.{host}"
        if key is not None and self._tag:
            unique += f",pop3lite={self._tag}-{key}"
        temporary = os.path.join(self.path, "tmp", unique)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._current = (descriptor, temporary, os.path.join(self.path, "new", unique), key)
        self._sink = _LocalLines(_descriptor_writer(descriptor), False, count)
        return cast(IO[bytes], self._sink)

    def finish(self) -> None:
        """The message is complete in tmp/; sync() and deliver() move it into new/."""
        assert self._current is not None and self._sink is not None
        self._sink.finish()
        self._complete.append(self._current)
        self._current = None

    def abandon(self) -> None:
        import os

        if self._current is not None:
            descriptor, temporary, _, _ = self._current
            self._current = None
            os.close(descriptor)
            os.unlink(temporary)

    def sync(self) -> None:
        """Sync the batch's files all at once (see _sync_all). When a sync fails the whole
        batch stays in tmp/ (the next run removes it and fetches those messages again)."""
        import os

        complete, self._complete = self._complete, []
        try:
            _sync_all([descriptor for descriptor, _, _, _ in complete])
        finally:
            for descriptor, _, _, _ in complete:
                os.close(descriptor)
        self._synced.extend((temporary, final, key) for _, temporary, final, key in complete)

    def deliver(self) -> list[str]:
        """Rename each synced file into new/, then one fsync of new/."""
        import os

        synced, self._synced = self._synced, []
        delivered: list[str] = []
        for temporary, final, key in synced:
            os.rename(temporary, final)
            if key is not None:
                delivered.append(key)
        if synced:
            _fsync_directory(os.path.join(self.path, "new"))
        return delivered  # only now: renamed and the directory synced

    def close(self) -> None:
        import os

        self.abandon()
        complete, self._complete = self._complete, []
        for descriptor, _, _, _ in complete:  # never renamed: left in tmp/, fetched again
            os.close(descriptor)
        self._synced = []


class Mbox(Destination):
    """An mbox destination for save() (mboxrd, see the README), dot-locked and flock'd while
    save() runs. A lock left by a dead process is taken over with a warning."""

    kind = "mbox"

    def __init__(self, path: str) -> None:
        import os

        self.path = os.path.abspath(os.path.expanduser(path))
        self._descriptor = -1
        self._locked = False
        # Where the message being written begins, and the first one not yet synced: a
        # failed message, or a failed sync, cuts the mbox back there.
        self._start = self._unsynced = 0
        self._sink: _LocalLines | None = None
        self._message: _MboxMessage | None = None
        self._key: str | None = None
        self._finished: list[str | None] = []  # keys of the messages appended, not synced
        self._synced: list[str] = []

    def __repr__(self) -> str:
        return f"<pop3lite.Mbox {self.path!r}>"

    def open(self) -> None:
        import os

        self._lock()
        try:
            created = not os.path.exists(self.path)
            # Mail is private: a new mbox is the user's alone.
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            _flock(self._descriptor, self.path)
            if created:
                _fsync_directory(os.path.dirname(self.path))
            size = os.lseek(self._descriptor, 0, os.SEEK_END)
            if size:  # a new From_ line must follow an empty line
                os.lseek(self._descriptor, max(0, size - 2), os.SEEK_SET)
                end = os.read(self._descriptor, 2)
                if not end.endswith(b"\n"):
                    os.write(self._descriptor, b"\n\n")
                elif end != b"\n\n" and size > 1:
                    os.write(self._descriptor, b"\n")
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """The dot lock (DEST.lock holding our pid), taking over one left by a dead process
        and waiting up to _LOCK_WAIT seconds for a live holder to finish."""
        import os
        import warnings

        lock = f"{self.path}.lock"
        deadline = time.monotonic() + _LOCK_WAIT
        attempts = 0
        while attempts < _LOCK_ATTEMPTS:
            try:
                descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                try:
                    stale = self._stale_lock(lock)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(_LOCK_POLL)  # bounded by the deadline
                    continue
                attempts += 1
                if stale is None:
                    continue  # it went away meanwhile: try again
                os.unlink(lock)
                warnings.warn(
                    f"took over the stale lock {lock} ({stale})", _StaleLockWarning, stacklevel=4
                )
                continue
            try:
                os.write(descriptor, f"{os.getpid()}\n".encode())
            finally:
                os.close(descriptor)
            self._locked = True
            return
        raise BlockingIOError(f"cannot take the lock {lock}: it keeps coming back")

    @staticmethod
    def _stale_lock(lock: str) -> str | None:
        """Why the existing ``lock`` is stale; OSError naming its holder if it is live."""
        import os

        try:
            with open(lock, "rb") as file:
                content = file.read(64)
            made = os.stat(lock).st_mtime
        except FileNotFoundError:
            return None
        age = time.time() - made
        boot = _boot_time()
        if boot is not None and made < boot:  # its pid may now be another process's
            return f"made before the system started, {age:.0f} s old"
        words = content.split()
        pid = int(words[0]) if words and words[0].isdigit() else None
        if pid is not None and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"process {pid} that made it no longer runs; {age:.0f} s old"
            except OSError:  # PermissionError: alive, another user's; Windows: no such check
                pass
            raise BlockingIOError(
                f"{lock} is held by process {pid}, which is still running (lock {age:.0f} s "
                f"old, waited {_LOCK_WAIT:g} s); try again once it has finished"
            )
        if age > _STALE_LOCK_AGE:
            return f"no process id in it, {age:.0f} s old"
        raise BlockingIOError(
            f"{lock} exists ({age:.0f} s old, no process id in it): another program is writing "
            f"the mbox; it counts as stale after {_STALE_LOCK_AGE} s"
        )

    def state_path(self, name: str) -> str:
        import os

        folder, base = os.path.split(self.path)
        return os.path.join(folder, f".{base}.pop3lite-{name}")

    def begin(self, key: str | None, count: Callable[[int], None]) -> IO[bytes]:
        import os

        self._start = os.lseek(self._descriptor, 0, os.SEEK_END)
        if not self._finished:
            self._unsynced = self._start
        self._key = key
        self._message = _MboxMessage(_descriptor_writer(self._descriptor))
        self._sink = _LocalLines(self._message.write, True, count)
        return cast(IO[bytes], self._sink)

    def finish(self) -> None:
        import os

        assert self._sink is not None and self._message is not None
        self._sink.finish()
        self._message.close()
        # mboxrd: the message ends with a line end, then an empty line before the next From_.
        os.write(self._descriptor, b"\n" if self._sink.last == b"\n" else b"\n\n")
        self._sink = self._message = None
        self._finished.append(self._key)

    def abandon(self) -> None:
        import os

        if self._sink is not None and self._descriptor >= 0:
            self._sink = self._message = None
            os.ftruncate(self._descriptor, self._start)  # we hold the lock: nothing came after

    def sync(self) -> None:
        import os

        finished, self._finished = self._finished, []
        if finished:
            try:
                _sync_data(self._descriptor)
            except BaseException:
                os.ftruncate(self._descriptor, self._unsynced)
                raise
            self._synced.extend(key for key in finished if key is not None)

    def deliver(self) -> list[str]:
        delivered, self._synced = self._synced, []  # an appended, synced message is delivered
        return delivered

    def close(self) -> None:
        import os

        try:
            self.abandon()
            if self._finished and self._descriptor >= 0:  # appended, never synced: cut off
                self._finished = []
                os.ftruncate(self._descriptor, self._unsynced)
        finally:
            if self._descriptor >= 0:
                os.close(self._descriptor)
                self._descriptor = -1
            if self._locked:
                self._locked = False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}.lock")


def _from_line(header: bytes) -> bytes:
    """The mbox separator for a message with this header (LF line ends): "From SENDER DATE"
    (see _envelope)."""
    sender, stamp = _envelope(header)
    return f"From {sender} {stamp}\n".encode("ascii")


def _envelope(header: bytes) -> tuple[str, str]:
    """The envelope sender (Return-Path, else From) and the Date header in UTC, in the
    asctime() form mailers write, of a message with this header (LF line ends);
    MAILER-DAEMON and the current time where they are missing or unusable (an address made up
    by reading a folded header; a year outside 1970..9999)."""
    sender, when = "MAILER-DAEMON", time.time()
    try:
        from email.utils import mktime_tz, parseaddr, parsedate_tz
    except ImportError:  # a Python without the email package: the plain separator
        return sender, time.asctime(time.gmtime(when))
    fields: dict[str, str] = {}
    name = ""
    for line in header.split(b"\n"):
        text = line.decode("latin-1")
        if text[:1] in (" ", "\t") and name:
            fields[name] += " " + text.strip()
        elif ":" in text:
            name, _, value = text.partition(":")
            name = name.strip().lower()
            if name in fields:
                name = ""  # the first occurrence counts (Return-Path: the newest hop's)
            else:
                fields[name] = value.strip()
        else:
            name = ""
    if fields.get("return-path", "").replace(" ", "") != "<>":  # <>: a bounce, MAILER-DAEMON
        for field in ("return-path", "from"):
            value = fields.get(field, "")
            address = parseaddr(value)[1]
            # parseaddr glues the words of "x@y continued" (a folded line) into "x@ycontinued":
            # an address that is not in the header as written is not the sender's.
            if address and address in value and re.fullmatch(r"[!-~]{1,255}", address):
                sender = address
                break
    parsed = parsedate_tz(fields.get("date", ""))
    if parsed is not None and 1970 <= parsed[0] <= 9999:  # asctime() and readers stop there
        with contextlib.suppress(OverflowError, ValueError):
            when = float(mktime_tz(parsed))
    try:
        stamp = time.asctime(time.gmtime(when))
    except (OverflowError, ValueError, OSError):
        stamp = time.asctime(time.gmtime())
    return sender, stamp


_EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, the sender should try again later
_MDA_OUTPUT = 1024  # octets of a failed command's output shown in the error


class MDA(Destination):
    """Delivery to a command, as fetchmail's --mda and mpop's ``delivery mda`` do: each
    message (LF line ends, no From_ line) on the command's standard input; a message counts as
    delivered when the command exits with 0. ``command`` is a string for the shell, or a list
    of arguments run without one; "%F" in it is replaced by the envelope sender (as the mbox
    From_ line has it: Return-Path, else From; MAILER-DAEMON for a bounce, when neither is
    usable, or for an address with other characters than A-Z a-z 0-9 . _ % + = @ - or that
    starts with "-", which a command would take for an option): safe for the shell as it is,
    so put no quotes around %F. The command runs in its own process group, with its
    output kept apart (shown in the error when it fails); one that runs longer than
    ``timeout`` seconds is killed, group and all. A command that fails raises DeliveryError.

    The journal is the record: ``state_dir`` holds one per account (default
    ``$XDG_STATE_HOME/pop3lite``, else ``~/.local/state/pop3lite``), whatever the command."""

    kind = "MDA"

    def __init__(
        self, command: str | Sequence[str], *, timeout: float = 60.0, state_dir: str | None = None
    ) -> None:
        import os

        if not command or (not isinstance(command, str) and not all(command)):
            raise ValueError("MDA() needs a command")
        self.command = command if isinstance(command, str) else list(command)
        self.timeout = timeout
        if state_dir is None:
            base = os.environ.get("XDG_STATE_HOME") or os.path.join("~", ".local", "state")
            state_dir = os.path.join(base, "pop3lite")
        self.path = os.path.abspath(os.path.expanduser(state_dir))
        self._spool: IO[bytes] | None = None  # the message being written, then run
        self._key: str | None = None
        self._finished: tuple[IO[bytes], str | None] | None = None
        self._synced: list[str] = []

    def __repr__(self) -> str:
        return f"<pop3lite.MDA {self.command!r}>"

    def open(self) -> None:
        import os

        if not os.path.isdir(self.path):
            os.makedirs(self.path, 0o700)
            _fsync_directory(self.path)
            _fsync_directory(os.path.dirname(self.path))

    def state_path(self, name: str) -> str:
        import os

        return os.path.join(self.path, f"mda-{name}")

    def begin(self, key: str | None, count: Callable[[int], None]) -> IO[bytes]:
        import tempfile

        # Private (0600) and gone once closed; it outlives this call, so no ``with``.
        spool = self._spool = tempfile.TemporaryFile()  # noqa: SIM115
        self._key = key
        return cast(IO[bytes], _LocalLines(lambda data: _write_all(spool, data), False, count))

    def finish(self) -> None:
        assert self._spool is not None
        self._finished, self._spool = (self._spool, self._key), None

    def abandon(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def sync(self) -> None:
        """Run the command on the finished message (its exit 0 is its promise to keep it)."""
        if self._finished is None:
            return
        (spool, key), self._finished = self._finished, None
        with spool:
            spool.seek(0)
            header = spool.read(_HEADER_LIMIT).split(b"\n\n")[0]  # LF: see begin()
            spool.seek(0)
            self._run(spool, _envelope(header)[0])
        if key is not None:
            self._synced.append(key)

    def deliver(self) -> list[str]:
        delivered, self._synced = self._synced, []
        return delivered

    def close(self) -> None:
        self.abandon()
        if self._finished is not None:
            self._finished[0].close()
            self._finished = None

    def _argv(self, sender: str) -> str | list[str]:
        # Quoting cannot make any sender safe: a command may put %F inside its own quotes,
        # where ` and $ still run. So only the characters of ordinary addresses pass.
        if not re.fullmatch(r"[A-Za-z0-9._%+=@][A-Za-z0-9._%+=@-]*", sender):
            sender = "MAILER-DAEMON"
        if isinstance(self.command, str):
            return self.command.replace("%F", sender)
        return [part.replace("%F", sender) for part in self.command]

    def _run(self, spool: IO[bytes], sender: str) -> None:
        import os
        import subprocess

        argv = self._argv(sender)
        command = printable(argv if isinstance(argv, str) else " ".join(argv))[:200]
        shown = f"the command '{command}'"
        try:
            status, output = _run_command(argv, spool, self.timeout)
        except subprocess.TimeoutExpired:
            message = f"{shown} did not finish within {self.timeout:g} s; killed it"
            raise DeliveryError(message, reason="timeout") from None
        except OSError as exc:
            message = f"cannot run {shown}: {exc.strerror or exc}"
            raise DeliveryError(message, reason="start") from None
        with output:
            if status == 0:
                return
            size = output.seek(0, os.SEEK_END)
            output.seek(max(0, size - _MDA_OUTPUT))
            said = printable(output.read(_MDA_OUTPUT).decode("utf-8", "replace").strip())
        how = f"exited with {status}" if status > 0 else f"was killed by signal {-status}"
        if status == _EX_TEMPFAIL:
            how += " (EX_TEMPFAIL)"
        raise DeliveryError(
            f"{shown} {how}" + (f": {said}" if said else ""),
            reason="tempfail" if status == _EX_TEMPFAIL else "failed",
            status=status,
        )


def _run_command(
    command: str | list[str],
    stdin: IO[bytes] | None,
    timeout: float,
    stderr: bool = True,
    own_session: bool = True,
) -> tuple[int, IO[bytes]]:
    """Run ``command`` (a string: by /bin/sh) in a session of its own, stdin from ``stdin``
    (None: closed), stdout (and stderr) into a temporary file (not memory); return the exit
    status and that file. A timeout (TimeoutExpired) or an interrupt kills the whole group.
    ``own_session`` False keeps our terminal (a pinentry may ask on it); only the command
    itself is then killed."""
    import subprocess
    import tempfile

    output = tempfile.TemporaryFile()  # noqa: SIM115 (handed to the caller, who closes it)
    try:
        process = subprocess.Popen(
            command,
            shell=isinstance(command, str),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=output,
            stderr=output if stderr else None,
            start_new_session=own_session,  # its own group: a timeout ends its children too
        )
        try:
            status = process.wait(timeout)
        except BaseException:
            if own_session:
                _kill_group(process)
            else:
                process.kill()
                process.wait()
            raise
        output.seek(0)
        return status, output
    except BaseException:
        output.close()
        raise


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command and everything it started (its own process group), then reap it."""
    import os
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (AttributeError, OSError):  # Windows (no groups), or it has just ended
        process.kill()
    process.wait()


def _server_identity(pop: POP3) -> str:
    """What names the server whatever name reached it: the first DNS name of its certificate
    when TLS was verified (an unverified certificate proves nothing); "localhost:PORT" on a
    loopback address (two tunnels on two ports are two servers); else the canonical DNS name
    and the port."""
    certificate = pop.peer_certificate or {}
    for kind, value in certificate.get("subjectAltName", ()):
        if kind == "DNS" and isinstance(value, str):
            return value.lower()
    if pop.loopback:
        return f"localhost:{pop.port}"
    name = pop.host.lower()
    with contextlib.suppress(OSError):
        for *_, canonical, _ in socket.getaddrinfo(
            pop.host, pop.port, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME
        ):
            if canonical:
                name = canonical.lower()
                break
    return f"[{name}]:{pop.port}" if ":" in name else f"{name}:{pop.port}"


def _destination(dest: str | Destination) -> Destination:
    """A path names an mbox when it ends in .mbox or is an existing file, else a Maildir."""
    import os

    if isinstance(dest, Destination):
        return dest
    path = os.path.expanduser(dest)
    return Mbox(path) if path.endswith(".mbox") or os.path.isfile(path) else Maildir(path)


def save(
    pop: POP3,
    dest: str | Destination,
    *,
    new: bool = True,
    delete: bool = False,
    max_size: int | None = None,
    progress: Callable[[int, int, int, int], None] | None = None,
    user: str | None = None,
) -> SaveReport:
    """Save the mailbox into ``dest``: a Destination (Maildir, Mbox, MDA) or a path (FILE.mbox
    or an existing file is an mbox, anything else a Maildir); streaming, crash-safe (see the
    README). Every message saved is recorded (by UIDL) in the destination's journal.

    ``new``: only messages no earlier run saved into this destination (the default);
    ``new=False`` fetches every message again. ``delete``: once everything is durable, DELE
    what is saved (with ``new``, also what earlier runs saved) and QUIT. ``max_size``: skip
    (and report) messages larger than this. ``progress(messages_done, messages, octets_done,
    octets)`` is called as octets arrive. ``user`` names the account in the records (default:
    the user name of the login). Local failures raise OSError; a command's, DeliveryError."""
    import hashlib

    destination = _destination(dest)
    account = user if user is not None else pop.user
    if not account:
        raise ValueError("save() needs the user name: log in first, or pass user=")
    _, sizes, uids = pop.scan()
    if new and uids is None and sizes:
        pop.uidl()  # raises the server's refusal: without UIDs "new" has no meaning
    keys = _record_keys(sizes, uids)
    identity = f"{account}@{_server_identity(pop)}"
    tag = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    destination.open()
    name = f"{_state_part(identity)}-{tag}.journal"
    journal = _Journal(destination.state_path(name), identity)
    try:
        seen, present = _earlier_runs(pop, destination, journal, account, tag, keys, uids)
        numbers = [n for n in sorted(sizes) if not new or keys.get(n) not in seen]
        fetch = [n for n in numbers if max_size is None or sizes[n] <= max_size]
        too_big = [(n, sizes[n]) for n in numbers if max_size is not None and sizes[n] > max_size]
        saved, skipped = _fetch(pop, destination, journal, fetch, sizes, keys, max_size, progress)
        skipped = sorted(too_big + skipped)  # steps 1 to 4 are done
    finally:
        try:
            journal.close()
        finally:
            destination.close()
    deleted = 0
    if delete and sizes:
        records = present if destination.records_in_place else seen
        earlier = {n for n in sizes if keys.get(n) in records}.difference(numbers)
        deleted = _delete(pop, sorted(earlier.union(saved)))  # steps 5 and 6
    octets = sum(saved.values())
    return SaveReport(
        len(saved), octets, len(sizes) - len(numbers), skipped, deleted, destination.kind
    )


def _earlier_runs(
    pop: POP3,
    destination: Destination,
    journal: _Journal,
    account: str,
    tag: str,
    keys: dict[int, str],
    uids: UIDList | None,
) -> tuple[set[str], set[str]]:
    """What earlier runs saved: the keys the journal names (a 0.1 state file folded in), and
    those whose records the destination holds itself."""
    seen = journal.open()
    host = f"[{pop.host}]" if ":" in pop.host else pop.host
    legacy = f"{account}@{host}:{pop.port}"  # pop3lite 0.1: as typed
    _migrate(journal, destination.state_path(f"{_state_part(legacy, None)}.json"), seen)
    present = destination.recorded(tag)
    current = set(keys.values())
    # Saved, but killed before the journal line: the records in place say so. Only the
    # current messages' keys: the others are gone from the server, and journaling them
    # again would make every run rewrite the journal.
    found = (present - seen) & current
    if found:
        destination.settle()
        journal.append(sorted(found), sync=True)
        seen |= found
    if uids is not None:
        journal.compact(seen & current)
    return seen, present


def _delete(pop: POP3, numbers: list[int]) -> int:
    """Steps 5 and 6: DELE what is durable (this run's delivered messages, an earlier run's
    while its record is there: a message left on the server would stay forever, as new=True
    skips it), then QUIT, which alone commits the deletions."""
    for fetched in pop.dele_many(numbers):
        if fetched.error is not None:
            raise fetched.error
    pop.quit()
    return len(numbers)


def _migrate(journal: _Journal, legacy_path: str, seen: set[str]) -> None:
    """Fold a pop3lite 0.1 state file (named after the host and port as typed) into the
    journal once, so an upgrade does not fetch everything again."""
    import os

    if not os.path.exists(legacy_path):
        return
    try:
        uids = _legacy_state(legacy_path)
    except (OSError, ValueError) as exc:
        raise OSError(
            f"cannot read the old state file {legacy_path} ({exc}); remove it to treat every "
            "message as new"
        ) from None
    keys = {_record_key(uid) for uid in uids}
    journal.append(sorted(keys - seen), sync=True)
    seen |= keys
    os.unlink(legacy_path)


def _fetch(
    pop: POP3,
    destination: Destination,
    journal: _Journal,
    numbers: list[int],
    sizes: dict[int, int],
    keys: dict[int, str],
    max_size: int | None,
    progress: Callable[[int, int, int, int], None] | None,
) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """Steps 1 to 4: RETR ``numbers`` into ``destination``, journaling each once it is
    delivered. Returns {number: octets} of the messages saved, and (number, octets) of those
    that turned out larger than ``max_size`` (LIST said otherwise)."""
    total = sum(sizes[n] for n in numbers)
    saved: dict[int, int] = {}
    too_big: list[tuple[int, int]] = []
    done = [0, 0]  # octets of the messages saved, of the one arriving
    batch = [0, 0]  # messages and octets not yet synced

    def count(octets: int) -> None:
        done[1] += octets
        if progress is not None:
            progress(len(saved), len(numbers), done[0] + done[1], total)

    def open_sink(number: int) -> IO[bytes]:
        done[1] = 0
        return destination.begin(keys.get(number), count)  # step 1

    def commit() -> None:
        if batch[0]:
            destination.sync()  # step 2
            delivered = destination.deliver()  # step 3
            journal.append(delivered, sync=destination.per_message)  # step 4
        batch[:] = [0, 0]

    try:
        for result in pop.retr_many_to(numbers, open_sink, max_size):
            if result.error is not None:
                destination.abandon()
                if not isinstance(result.error, LimitExceeded):
                    raise result.error
                too_big.append((result.number, result.octets))
                continue
            destination.finish()
            saved[result.number] = result.octets
            done[0] += result.octets
            batch[0] += 1
            batch[1] += result.octets
            if destination.per_message or batch[0] >= _SYNC_BATCH or batch[1] >= _SYNC_BATCH_OCTETS:
                commit()
            if progress is not None:
                progress(len(saved), len(numbers), done[0], total)
        commit()
        if not destination.per_message:  # step 4 of the batches: durable before any DELE
            journal.append((), sync=True)
    except BaseException:
        _give_up(destination)
        raise
    return saved, too_big


def _give_up(destination: Destination) -> None:
    """After a failure: drop the message being written, and journal nothing more. Where the
    destination holds its own records, deliver what is complete: the next run rebuilds the
    records from it (recorded()); elsewhere, and when that fails, it is fetched again."""
    destination.abandon()
    if destination.records_in_place:
        with contextlib.suppress(OSError):
            destination.sync()
            destination.deliver()


# =============================================================================================
# OAuth 2.0: fresh access tokens for XOAUTH2 and OAUTHBEARER, from a token file
# =============================================================================================
#
#     source = pop3lite.OAuth2("~/.config/pop3lite/alice.json")  # written once by sign_in()
#     with pop3lite.POP3("outlook.office365.com") as pop:
#         pop.login_oauth2("alice@contoso.com", source)  # refreshes when needed
#
# The token file (JSON, mode 0600) holds what an unattended run needs: the endpoints, the
# client id (and secret), the scope, the account, the refresh token, the access token and its
# expiry. Providers rotate refresh tokens and refuse a spent one (RFC 6749 section 6: the
# client MUST discard the old one), so every refresh is written back at once, under a lock that
# makes a second run sharing the file read the new token instead of spending the old one.
# Secrets stay in the state dict and the file; reprs and messages never show them.

# Provider presets ({tenant}: "common", "organizations", "consumers", a tenant id or domain).
OAUTH2_PROVIDERS: dict[str, dict[str, str]] = {
    "microsoft": {
        "auth_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        "token_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "device_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        "scope": "https://outlook.office.com/POP.AccessAsUser.All offline_access",
        # App-only access (POP.AccessAsApp) is asked for as the resource's ".default" scope.
        "app_scope": "https://outlook.office365.com/.default",
        "grant": "device",
    },
    # Google's device grant refuses the Gmail scope (invalid_scope): the loopback grant.
    "google": {
        "auth_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_url": "https://oauth2.googleapis.com/token",
        "scope": "https://mail.google.com/",
        "grant": "loopback",
    },
}
OAUTH2_GRANTS = ("device", "loopback", "client-credentials")
MAX_OAUTH2_REPLY = 1024 * 1024  # octets; a token reply is a few KiB, a larger one is not OAuth2
OAUTH2_REFRESH_MARGIN = 60.0  # seconds: a token this close to its expiry is refreshed first
MAX_SIGN_IN_WAIT = 900.0  # seconds a sign-in waits for the user (device code, browser)
SLOW_DOWN_STEP = 5.0  # RFC 8628 section 3.5: slow_down adds 5 seconds to the poll interval
_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"  # RFC 8628 section 3.4
_TOKEN_FILE_FORMAT = "pop3lite-oauth2/1"
# What the user can do about a provider's error (RFC 6749 section 5.2, RFC 8628 section 3.5).
_OAUTH2_HINTS = {
    "invalid_grant": "the refresh token or code has expired, was revoked or was already used: "
    "sign in again",
    "access_denied": "the sign-in was declined: sign in again and accept the request",
    "expired_token": "the code expired before the sign-in was completed: sign in again",
    "invalid_client": "the client id or secret is wrong, or the registration does not allow "
    "this grant: check the app registration and sign in again",
    "unauthorized_client": "the app registration does not allow this grant (Microsoft: turn "
    "on 'Allow public client flows'); sign in again once it does",
    "invalid_scope": "the scope was refused (Google's device grant refuses the Gmail scope: "
    "use the loopback grant); sign in again with another scope or grant",
}
# Errors that say the provider has a passing problem (RFC 6749 section 4.1.2.1): reason
# "endpoint", to be tried again later, not "sign-in".
_PASSING_ERRORS = ("server_error", "temporarily_unavailable")


def _oauth2_text(value: object) -> str:
    """A provider's string made safe to show, white space runs folded, at most 500 chars."""
    if not isinstance(value, str):
        return ""
    return printable(" ".join(value.split()))[:500]


def _provider_error(details: dict[str, Any], where: str) -> OAuth2Error:
    """The OAuth2Error for a provider's error reply; AADSTS codes stay in the description."""
    error = _oauth2_text(details.get("error")) or "unknown error"
    description = _oauth2_text(details.get("error_description"))
    said = f"{error}: {description}" if description else error
    hint = _OAUTH2_HINTS.get(error, "sign in again, or check the app registration")
    reason = "endpoint" if error in _PASSING_ERRORS else "sign-in"
    hint = "the provider has a passing problem" if reason == "endpoint" else hint
    return OAuth2Error(
        f"{where} refused ({said}); {hint}", reason=reason, error=error, description=description
    )


def _endpoint_name(url: str) -> str:
    import urllib.parse

    return f"the OAuth2 endpoint {urllib.parse.urlsplit(url).netloc}"


def oauth2_post(
    url: str, fields: dict[str, str], timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """POST a form to an OAuth2 endpoint and return its JSON object (RFC 6749 section 5.1).
    A provider's error (section 5.2): OAuth2Error "sign-in" with its ``error`` and
    ``error_description``; no reply within ``timeout`` seconds in all, a 5xx, HTML, broken
    HTTP or a huge body: "endpoint". No redirects; verified TLS; http only to loopback."""
    import http.client
    import threading
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    host, https = parts.hostname or "", parts.scheme == "https"
    if not (https and host) and not (parts.scheme == "http" and is_loopback(host)):
        raise ValueError(f"OAuth2 endpoint {url!r} must be https:// (http only to 127.0.0.1)")
    where = _endpoint_name(url)
    # RFC 6749 appendix B: a parameter without a value counts as omitted (an empty scope).
    body = urllib.parse.urlencode({k: v for k, v in fields.items() if v}).encode("ascii")
    headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    connection = kind(host, parts.port)
    deadline = time.monotonic() + timeout

    def stop() -> None:  # the deadline bounds every read: a trickling server ends here
        with contextlib.suppress(OSError, TypeError):  # TypeError: not connected yet
            socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.sock = socket.create_connection((host, connection.port), timeout)
        if https:
            context = create_tls_context()
            connection.sock = context.wrap_socket(connection.sock, server_hostname=host)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("POST", target, body, headers)
        response = connection.getresponse()
        data = response.read(MAX_OAUTH2_REPLY + 1)
        if time.monotonic() >= deadline:
            raise socket.timeout("no complete reply")
        if response.length and len(data) <= MAX_OAUTH2_REPLY:  # read(amount) does not check
            raise http.client.IncompleteRead(data, response.length)
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline or isinstance(exc, socket.timeout):
            message = f"cannot reach {where}: no complete reply within {timeout:g} s"
        elif isinstance(exc, http.client.HTTPException):
            message = f"{where} sent broken HTTP ({type(exc).__name__})"
        else:
            message = f"cannot reach {where}: {printable(str(exc)) or type(exc).__name__}"
        raise OAuth2Error(message, reason="endpoint") from None
    finally:
        watchdog.cancel()
        connection.close()
    if len(data) > MAX_OAUTH2_REPLY:
        message = f"{where} sent more than 1 MiB, which is no OAuth2 reply"
        raise OAuth2Error(message, reason="endpoint")
    return _oauth2_reply(response.status, response.headers.get_content_type(), data, where)


def _oauth2_reply(status: int, kind: str, data: bytes, where: str) -> dict[str, Any]:
    """Judge a token endpoint's reply: its JSON object, or the fitting OAuth2Error."""
    if status >= 500:
        raise OAuth2Error(f"{where} failed (HTTP {status})", reason="endpoint")
    details = _json_object(data)
    if details is None:
        what = "an HTML page" if "html" in kind or data.lstrip()[:1] == b"<" else "no JSON"
        message = f"{where} answered HTTP {status} with {what}, not OAuth2 (a proxy?)"
        raise OAuth2Error(message, reason="endpoint")
    if "error" in details:
        raise _provider_error(details, where)
    if status != 200:
        raise OAuth2Error(f"{where} answered HTTP {status} without an error", reason="endpoint")
    return details


def _oauth2_token(details: dict[str, Any], key: str, where: str) -> str:
    """A token from a reply, checked as a bearer token (RFC 6750 section 2.1)."""
    value = details.get(key)
    if isinstance(value, str) and len(value) <= 16 * 1024:
        try:
            _check_token(value)
            return value
        except ValueError:
            pass
    raise OAuth2Error(f"{where} sent no usable {key}", reason="endpoint")


def _reply_seconds(value: object, default: float, where: str, what: str) -> float:
    """A number of seconds from a reply (Microsoft once sent them as strings)."""
    if value is None:
        return default
    try:
        number = float(value) if isinstance(value, (int, float, str)) else -1.0
    except ValueError:
        number = -1.0
    if not 0 <= number <= 10 * 365 * 86400 or isinstance(value, bool):
        raise OAuth2Error(f"{where} sent an invalid {what}: {value!r:.40}", reason="endpoint")
    return number


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636 sections 4.1 and 4.2)."""
    import secrets

    verifier = secrets.token_urlsafe(64)  # 86 unreserved characters; 43 to 128 allowed
    return verifier, pkce_challenge(verifier)


def pkce_challenge(verifier: str) -> str:
    """BASE64URL(SHA256(ASCII(code_verifier))) without padding (RFC 7636 section 4.2)."""
    import base64
    import hashlib

    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _browser_page(handler: http.server.BaseHTTPRequestHandler, status: int, text: str) -> None:
    """Answer the browser that came back to the loopback redirect with a page saying ``text``."""
    body = f"<!DOCTYPE html><title>pop3lite</title><p>{text}</p>\n".encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _await_redirect(state: str, show: Callable[[str], object], wait: float) -> tuple[str, str]:
    """Listen on 127.0.0.1 at a random port (RFC 8252 section 7.3), call ``show`` with the
    redirect URI, wait at most ``wait`` seconds for the browser to come back with ``state``
    and a code, and return (code, redirect URI)."""
    import http.server
    import secrets
    import socketserver
    import threading
    import urllib.parse

    result: dict[str, str] = {}
    arrived = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10.0  # a browser that connects and says nothing must not hold the listener

        def do_GET(self) -> None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            if "state" not in query or arrived.is_set():
                _browser_page(self, 404, "This is not the sign-in redirect pop3lite waits for.")
                return
            if not secrets.compare_digest(query["state"].encode(), state.encode()):
                _browser_page(self, 400, "The sign-in reply does not match the request; try again.")
                result["problem"] = "the browser came back with another state (RFC 6749 10.12)"
            elif "code" in query:
                result["code"] = query["code"]
                _browser_page(self, 200, "pop3lite is signed in. You can close this window.")
            else:  # RFC 6749 section 4.1.2.1: the provider's error and error_description
                result.update(error=query.get("error", "no code"))
                result.update(error_description=query.get("error_description", ""))
                _browser_page(self, 200, "The sign-in was not completed; see the terminal.")
            arrived.set()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the request line holds the code: it never reaches stderr

    # Not HTTPServer, which looks up the host name; a thread per connection, so that an idle
    # preconnect of a browser cannot hold up the redirect.
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        show(redirect_uri)
        arrived.wait(wait)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(wait)
    if "code" in result:
        return result["code"], redirect_uri
    if "error" in result:
        raise _provider_error(result, "the sign-in in the browser")
    problem = result.get("problem", f"no browser came back within {wait:.0f} s")
    raise OAuth2Error(f"{problem}; sign in again", reason="sign-in")


@contextlib.contextmanager
def _token_file_lock(path: str, wait: float) -> Iterator[None]:
    """An exclusive lock on PATH.lock while a run reads, refreshes and rewrites the token file
    (a refresh token may be spent once). Waits at most ``wait`` seconds; on systems without
    fcntl (Windows) there is no lock: do not share a token file between runs there."""
    import os

    try:
        descriptor = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        message = f"cannot write the token file lock {path}.lock: {exc.strerror or exc}"
        raise OAuth2Error(message, reason="token-file") from None
    try:
        try:
            _flock(descriptor, f"the token file lock {path}.lock", wait)
        except BlockingIOError as exc:
            raise OAuth2Error(str(exc), reason="busy") from None
        yield
    finally:
        os.close(descriptor)


def _read_token_file(path: str) -> dict[str, Any]:
    """The token file's state; OAuth2Error if it is missing, open to others or damaged."""
    import os
    import stat

    try:  # O_NONBLOCK: a FIFO put in its place must not block the open
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        message = f"token file {path} does not exist; sign in first"
        raise OAuth2Error(message, reason="sign-in") from None
    except OSError as exc:
        message = f"cannot read token file {path}: {exc.strerror or exc}"
        raise OAuth2Error(message, reason="token-file") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a directory, a FIFO, a device
        os.close(descriptor)
        raise OAuth2Error(f"token file {path} is not a regular file", reason="token-file")
    with open(descriptor, "rb") as file:
        mode = os.fstat(descriptor).st_mode & 0o777
        # Refused, not tightened: whoever could read it may already hold the refresh token.
        if os.name == "posix" and mode & 0o077:
            raise OAuth2Error(
                f"token file {path} is open to other users (mode {mode:03o}); run chmod 600 "
                f"{path}, and sign in again if someone else may have read it",
                reason="permissions",
            )
        data = file.read(MAX_OAUTH2_REPLY + 1)
    state = _json_object(data) if len(data) <= MAX_OAUTH2_REPLY else None
    if state is None or state.get("format") != _TOKEN_FILE_FORMAT or not _valid_state(state):
        raise OAuth2Error(
            f"token file {path} is damaged or not a pop3lite token file; sign in again to "
            "write a new one",
            reason="token-file",
        )
    return state


def _valid_state(state: dict[str, Any]) -> bool:
    texts = ("provider", "token_url", "client_id", "scope", "user", "grant", "access_token")
    numbers = ("expires_at", "lifetime")
    return (
        all(isinstance(state.get(key), str) for key in texts)
        and all(isinstance(state.get(key), (int, float)) for key in numbers)
        and isinstance(state.get("refresh_token", ""), str)
        and not re.search("[\r\n\0]", state["access_token"])  # it goes on a command line
    )


def _write_token_file(path: str, state: dict[str, Any]) -> None:
    """Replace the token file atomically: a temporary file in the same directory, 0600 from
    its first byte, synced, renamed over the old one, and the directory synced."""
    import json
    import os
    import secrets

    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(descriptor, "wb") as file:
            file.write(json.dumps(state, indent=1, sort_keys=True).encode("utf-8") + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    _fsync_directory(directory)


_Prompt = Callable[[str, str], object]  # prompt(message, url): what the user must open
_Reply = Dict[str, Any]  # a token endpoint's JSON reply


def _print_prompt(message: str, url: str) -> None:
    print(message, file=sys.stderr)


class OAuth2:
    """A token source for login_oauth2(): the access token from ``token_file``, refreshed
    (and the file rewritten) when it has expired or will within OAUTH2_REFRESH_MARGIN.

    ``OAuth2(path)`` alone uses what sign_in() wrote there. The other arguments say how to
    sign in: ``provider`` "microsoft" (``tenant`` "common" unless given) or "google", or the
    endpoints themselves; ``client_id`` (and ``client_secret``) of your app registration;
    ``scope`` overrides the provider's. When the file exists, a provider, token URL or client
    id that differs from the file's is refused (OAuth2Error, reason "token-file").
    """

    def __init__(
        self,
        token_file: str,
        provider: str | None = None,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        scope: str | None = None,
        tenant: str | None = None,
        token_url: str | None = None,
        device_url: str | None = None,
        auth_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        import os

        self.path = os.path.expanduser(token_file)
        self.timeout = timeout
        preset = OAUTH2_PROVIDERS.get(provider or "")
        if provider is not None and preset is None:
            raise ValueError(f"unknown OAuth2 provider {provider!r}; known: microsoft, google")
        given = {"token_url": token_url, "device_url": device_url, "auth_url": auth_url}
        given.update(client_id=client_id, scope=scope)
        tenant = tenant or "common"
        config = {key: value.format(tenant=tenant) for key, value in (preset or {}).items()}
        config.update({key: value for key, value in given.items() if value})
        if provider or token_url:
            config["provider"] = provider or "custom"
        self._config = config
        self._secret = client_secret
        self._state: dict[str, Any] | None = None

    def __repr__(self) -> str:
        provider = (self._state or self._config).get("provider", "?")
        return f"<pop3lite.OAuth2 {self.path!r} provider={provider} user={self.user!r}>"

    @property
    def user(self) -> str | None:
        """The account the token file was made for (None before it was read or written;
        "" for client credentials, which serve every mailbox the app may read)."""
        return None if self._state is None else str(self._state["user"])

    def __call__(self) -> str:
        """A fresh access token (refreshed first if it expires within the margin)."""
        state = self._load()
        if self._fresh(state):
            return str(state["access_token"])
        return self.refresh(str(state["access_token"]))

    def refresh(self, spent: str | None = None) -> str:
        """A new access token, unless another run already replaced ``spent`` with one that is
        still fresh; the file is rewritten before this returns."""
        with _token_file_lock(self.path, self.timeout + 5.0):
            state = self._load()  # after the lock: another run may have refreshed
            if state["access_token"] != spent and self._fresh(state):
                return str(state["access_token"])
            fields = {"grant_type": "client_credentials", "scope": state["scope"]}
            if state.get("refresh_token"):
                fields.update(grant_type="refresh_token", refresh_token=state["refresh_token"])
            elif state["grant"] != "client-credentials":
                message = f"token file {self.path} has no refresh token; sign in again"
                raise OAuth2Error(message, reason="sign-in")
            self._store(state, self._token_request(state, fields))
        return str(state["access_token"])

    def _fresh(self, state: dict[str, Any]) -> bool:
        margin = min(OAUTH2_REFRESH_MARGIN, float(state["lifetime"]) / 2)
        return time.time() < float(state["expires_at"]) - margin

    def _load(self) -> dict[str, Any]:
        state = _read_token_file(self.path)
        for key in ("provider", "token_url", "client_id"):
            if key in self._config and self._config[key] != state[key]:
                raise OAuth2Error(
                    f"token file {self.path} was made for {key} {_oauth2_text(state[key])!r}, "
                    f"not {self._config[key]!r}; sign in again or name another file",
                    reason="token-file",
                )
        self._state = state
        return state

    def _token_request(self, state: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
        fields["client_id"] = state["client_id"]
        secret = self._secret or state.get("client_secret")
        if secret:
            fields["client_secret"] = secret
        return oauth2_post(state["token_url"], fields, self.timeout)

    def _store(self, state: dict[str, Any], reply: dict[str, Any]) -> None:
        """Take a token reply into ``state`` and write the file at once (RFC 6749 section 6:
        a new refresh token replaces the old one, which may already be refused), even when
        the rest of the reply is unusable: the spent refresh token is lost either way."""
        where = _endpoint_name(state["token_url"])
        if "refresh_token" in reply:
            state["refresh_token"] = _oauth2_token(reply, "refresh_token", where)
        try:
            access = _oauth2_token(reply, "access_token", where)
            if str(reply.get("token_type", "")).lower() != "bearer":  # RFC 6750 tokens only
                message = f"{where} sent a token that is not a bearer token"
                raise OAuth2Error(message, reason="endpoint")
            lifetime = _reply_seconds(reply.get("expires_in"), 3600.0, where, "expires_in")
        except OAuth2Error:
            if "refresh_token" in reply:
                _write_token_file(self.path, state)
            raise
        state.update(access_token=access, lifetime=lifetime, expires_at=time.time() + lifetime)
        _write_token_file(self.path, state)
        self._state = state

    def sign_in(
        self,
        user: str = "",
        grant: str | None = None,
        prompt: _Prompt = _print_prompt,
        wait: float = MAX_SIGN_IN_WAIT,
    ) -> None:
        """Obtain the first token for ``user`` and write the token file.

        ``grant``: "device" (RFC 8628), "loopback" (authorization code with PKCE and a
        redirect to 127.0.0.1, RFC 8252) or "client-credentials" (needs the secret); by
        default the provider's, else "device" when a device URL is known, else "loopback".
        ``prompt(message, url)`` tells the user what to open (and the device code); the wait
        for the user ends after ``wait`` seconds at most. Without a provider or token URL, an
        existing token file's settings are used again."""
        import os

        config, secret = self._settings()
        grant = grant or config.get("grant") or ("device" if "device_url" in config else "loopback")
        if grant not in OAUTH2_GRANTS:
            raise ValueError(f"unknown grant {grant!r}; known: {', '.join(OAUTH2_GRANTS)}")
        if grant == "client-credentials" and not secret:
            raise ValueError("the client-credentials grant needs the client secret")
        if grant != "client-credentials" and not user:
            raise ValueError(f"the {grant} grant needs the user the tokens are for")
        app_scope = config.get("app_scope") if grant == "client-credentials" else None
        state: dict[str, Any] = {
            **{key: config[key] for key in ("device_url", "auth_url") if key in config},
            **({"client_secret": secret} if secret else {}),
            "format": _TOKEN_FILE_FORMAT, "provider": config.get("provider", ""),
            "token_url": config["token_url"], "client_id": config["client_id"], "grant": grant,
            "scope": self._config.get("scope") or app_scope or config.get("scope", ""),
            "user": "" if grant == "client-credentials" else user,
            "access_token": "", "lifetime": 0, "expires_at": 0,
        }  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), 0o700, exist_ok=True)
        self._secret = secret
        with _token_file_lock(self.path, self.timeout + 5.0):  # before the user is asked
            if grant == "device":
                reply = self._device_grant(state, prompt, wait)
            elif grant == "loopback":
                reply = self._loopback_grant(state, prompt, wait)
            else:
                fields = {"grant_type": "client_credentials", "scope": state["scope"]}
                reply = self._token_request(state, fields)
            if grant != "client-credentials" and "refresh_token" not in reply:
                message = f"{_endpoint_name(state['token_url'])} sent no refresh token, so the "
                message += "sign-in would last an hour only (Microsoft: is offline_access in "
                raise OAuth2Error(message + "the scope?); sign in again", reason="sign-in")
            self._store(state, reply)

    def _settings(self) -> tuple[dict[str, str], str | None]:
        """The endpoints, client and scope to sign in with, and the client secret: those
        given, else (signing in again) those of the token file."""
        import os

        config, secret = self._config, self._secret
        if "token_url" not in config and os.path.exists(self.path):
            old = _read_token_file(self.path)
            keys = ("provider", "token_url", "device_url", "auth_url", "client_id", "scope")
            config = {**{key: old[key] for key in keys if old.get(key)}, **config}
            config.setdefault("grant", old["grant"])
            secret = secret or old.get("client_secret")
        if "token_url" not in config or "client_id" not in config:
            raise ValueError("sign_in() needs a provider or token_url, and a client_id")
        return config, secret

    def _device_grant(self, state: dict[str, Any], prompt: _Prompt, wait: float) -> _Reply:
        """RFC 8628 sections 3.1 to 3.5: ask for a code, show it, poll until approved."""
        if "device_url" not in state:
            raise ValueError("the device grant needs a device authorization URL")
        where = _endpoint_name(state["device_url"])
        fields = {"client_id": state["client_id"], "scope": state["scope"]}
        codes = oauth2_post(state["device_url"], fields, self.timeout)
        device_code = _oauth2_token(codes, "device_code", where)
        user_code = _oauth2_text(codes.get("user_code"))
        # Google names it verification_url.
        url = _oauth2_text(codes.get("verification_uri") or codes.get("verification_url"))
        if not user_code or not url:
            raise OAuth2Error(f"{where} sent no user_code or verification_uri", reason="endpoint")
        interval = max(_reply_seconds(codes.get("interval"), 5.0, where, "interval"), 0.01)
        lifetime = _reply_seconds(codes.get("expires_in"), 600.0, where, "expires_in")
        deadline = time.monotonic() + min(lifetime, wait)
        prompt(f"To sign in, open {url} and enter the code {user_code}", url)
        fields = {"grant_type": _DEVICE_GRANT, "device_code": device_code}
        while True:
            time.sleep(interval)  # section 3.5: wait at least the interval between requests
            if time.monotonic() > deadline:
                message = "the code expired before the sign-in was completed; sign in again"
                raise OAuth2Error(message, reason="sign-in")
            try:
                return self._token_request(state, dict(fields))
            except OAuth2Error as exc:
                if exc.error == "slow_down":
                    interval += SLOW_DOWN_STEP
                elif exc.error != "authorization_pending":
                    raise

    def _loopback_grant(self, state: dict[str, Any], prompt: _Prompt, wait: float) -> _Reply:
        """The authorization code grant with PKCE S256 (RFC 7636) and a loopback redirect."""
        import secrets
        import urllib.parse

        if "auth_url" not in state:
            raise ValueError("the loopback grant needs an authorization URL")
        verifier, challenge = pkce_pair()
        expected = secrets.token_urlsafe(24)
        query = {"client_id": state["client_id"], "response_type": "code"}
        query.update(scope=state["scope"], state=expected, code_challenge=challenge)
        query["code_challenge_method"] = "S256"
        if state["provider"] == "google":
            # Google's "send a refresh token"; without the consent asked again, a second
            # sign-in gets none.
            query.update(access_type="offline", prompt="consent")

        def show(redirect_uri: str) -> None:
            query["redirect_uri"] = redirect_uri
            given = {key: value for key, value in query.items() if value}  # no empty scope
            url = state["auth_url"] + "?" + urllib.parse.urlencode(given)
            prompt(f"To sign in, open this address in a browser on this computer:\n{url}", url)

        code, redirect_uri = _await_redirect(expected, show, wait)
        fields = {"grant_type": "authorization_code", "code": code}
        fields.update(redirect_uri=redirect_uri, code_verifier=verifier)
        return self._token_request(state, fields)


# =============================================================================================
# Command line
# =============================================================================================
#
# ``python pop3lite.py HOST USER [ACTION]``: the quick check, retr/top/capa/uidl, save into a
# Maildir, an mbox or a command, and an interactive shell. Everything beyond the client
# (argparse, getpass, json, email, mailbox, unicodedata...) is imported inside the functions
# that need it, so ``import pop3lite`` stays cheap. main() returns an exit status and never
# lets an expected failure become a traceback.

# The exit statuses, one row each: the code, the name the code uses (_EXIT["AUTH"]) and what
# it means. The --help epilog, _FAILURES and the README's table (checked by a test) come
# from here.
_EXIT_STATUSES = (
    (0, "OK", "success"),
    (1, "LOCAL", "a local file could not be read or written, or the --mda command failed"),
    (2, "USAGE", "usage error, or no password available"),
    (3, "AUTH", "authentication failed"),
    (4, "CONNECTION", "connection, TLS or timeout failure (or a password would cross an "
     "unencrypted link)"),
    (5, "TEMPORARY", "temporary server condition (mailbox in use, login delay, SYS/TEMP), "
     "the --oauth2 FILE in use by another run, or the --mda command exited with 75 "
     "(EX_TEMPFAIL): try again later"),
    (6, "SERVER", "other server or protocol error"),
    (7, "SKIPPED", "save: messages larger than --max-size were skipped (the rest were saved)"),
    (130, "INTERRUPTED", "interrupted (Ctrl-C): the connection is closed without QUIT, "
     "nothing is deleted; 143 (SIGTERM) and 129 (SIGHUP) the same"),
    (141, "PIPE", "the output was closed early (a pipe into head, say): the run stops "
     "quietly, as a tool that SIGPIPE ends (128 + 13), and closes the connection without QUIT"),
)  # fmt: skip
_EXIT = {name: code for code, name, _ in _EXIT_STATUSES}

_ACTIONS = ("check", "retr", "top", "capa", "uidl", "save", "shell", "oauth2")
_PASSWORD_VARIABLE = "POP3_PASSWORD"
_DEMO_USER = "hogehoge"  # the seed's account on the fake OperaMail server
_DEMO_PASSWORD = "fugafuga"  # handed to the login in-process, never through argv
_TABLE_ROWS = 50  # rows the check shows by default; --json lists every message unless --limit
_TOP_LINES = 10  # body lines `top N` shows by default
_SECRET_FILE_LIMIT = 64 * 1024  # a password or token file larger than this is a mistake
_SHELL_PROMPT = "pop3> "
_PRINT_LIMIT = 1024 * 1024  # octets: retr and the shell ask before printing a larger message
_PASSWORD_TRIES = 3  # a password typed at the prompt and refused is asked again, as ssh does
_PASSWORD_OPTIONS = ("--password", "--pass", "--passwd", "--pw")  # what people try; not options

_USAGE = """\
%(prog)s HOST[:PORT] [USER] [ACTION [ARGS...]] [OPTIONS]
       %(prog)s USER@HOST[:PORT] [ACTION [ARGS...]] [OPTIONS]
       %(prog)s --demo [ACTION [ARGS...]] [OPTIONS]
HOST may be a URL: pop3s://HOST[:PORT] (implicit TLS), pop3://HOST[:PORT] (STLS, port 110),
with USER@ in it too; the last "@" ends the user name (alice@example.com@pop.example.com).
Without USER, the user is ~/.netrc's login for HOST, or asked for at a terminal (an action
word is never taken for a user). ACTION --help shows the help of one action."""

_DESCRIPTION = """\
Check a POP3 mailbox, fetch or save its messages, or talk POP3 by hand.

actions:
  check               the default: greeting, TLS and certificate, capabilities, login
                      method, "N messages, M octets" and a table of number, size, UID,
                      date, sender and subject (from TOP n 0). Never deletes anything.
  retr N [N...]       print messages (decoded on a terminal, the raw bytes otherwise);
                      -o FILE writes one message, -o DIR writes N.eml files
                      (several messages to a pipe or file need -o DIR)
  top N [LINES]       the header and the first LINES body lines (default 10) of message N
  capa                the capabilities offered before login (needs no password)
  uidl                the unique id of each message
  save DIR|FILE.mbox  copy the messages no earlier run saved there into a Maildir (a
                      directory) or an mbox file (a name ending in .mbox, or an existing
                      file); save --mda CMD hands each to a command
  shell               an interactive POP3 session: type STAT, LIST, TOP 2 5, RETR 1,
                      DELE 1, RSET, QUIT...; TLS and the login are done for you
  oauth2              sign in once with OAuth 2.0 and write the --oauth2 FILE that every
                      other action then logs in with (refreshing it as needed)"""

# The exit statuses are added below this from _EXIT_STATUSES.
_EPILOG = """\
password:
  read from --password-file FILE (its first line; "-" reads a line of stdin), else
  $POP3_PASSWORD, else ~/.netrc ("machine HOST login USER password ..."), else asked for
  without echo when stdin is a terminal, once the server has been reached (and again when it
  is refused, three tries in all). Never from the command line, where other users could see
  it. A refused login says where it came from.

TLS:
  --tls auto on a port other than 110 and 995 waits 3 seconds (or --timeout, if shorter) for
  a plaintext greeting; a server that stays silent is taken to expect TLS from the first byte
  and implicit TLS is tried instead (said on stderr). --tls implicit or --tls starttls skips
  that wait, and so does a URL: pop3:// means STLS, pop3s:// implicit TLS.

examples:
  %(prog)s --demo                     try it against the built-in fake server
  %(prog)s --demo shell               the same, typing POP3 commands by hand
  %(prog)s pop.example.com alice      check a mailbox (implicit TLS, port 995)
  %(prog)s pop3s://alice@pop.example.com
  %(prog)s mail.example.com:110 alice --tls starttls --limit 10
  %(prog)s pop.example.com alice --json
  %(prog)s pop.example.com alice retr 3 -o message3.eml
  %(prog)s pop.example.com alice save ~/Maildir
  %(prog)s pop.example.com alice save mail.mbox --delete
  %(prog)s pop.example.com alice save --mda 'procmail -f %%F'
  %(prog)s pop.example.com alice shell --log session.txt

check --json prints one object with these fields:
  server        {"host", "port", "greeting"}
  tls           null (plaintext) or {"version", "cipher", "verified", "subject", "san"}
  capabilities  {NAME: [ARGUMENT...]} offered before login ({} without CAPA)
  user, auth    the user name and the login method ("USER", "APOP", "SCRAM-SHA-256"...)
  count, size   the number of messages and their total size in octets
  messages      [{"number", "size", "uid", "date", "from", "subject"}], all of them
                unless --limit N (then the last N); "date" is ISO 8601 when the Date
                header can be parsed, else as written; unknown values are null
capa --json prints the capabilities object, uidl --json [{"number", "uid"}]."""

# ACTION --help: the usage and what the action does; its options are listed from _OPTIONS.
_ACTION_HELP = {
    "check": (
        "[check] [--limit N] [--json]",
        """\
The default action. Shows the greeting, the TLS version and certificate, the capabilities,
the login method, "N messages, M octets" and a table of number, size, UID, date, sender
and subject (from TOP n 0). Never deletes anything. --json prints one object (its fields
are listed in --help).""",
    ),
    "retr": (
        "retr N [N...] [-o PATH]",
        """\
Print messages: decoded on a terminal (headers, charsets and transfer encodings undone),
the raw bytes when stdout is a pipe or a file. Several messages go to a terminal one after
the other, or with -o DIR into files; to a pipe or file they are refused, as raw messages
have nothing between them (save FILE.mbox writes one mbox file). On a terminal, a message
larger than 1 MiB is printed only once you say so, as in the shell.""",
    ),
    "top": (
        "top N [LINES]",
        """\
The header and the first LINES body lines (default 10) of message N (POP3 TOP), decoded on
a terminal, raw for a pipe or a file.""",
    ),
    "capa": (
        "capa [--json]",
        """\
The capabilities the server offers before login (POP3 CAPA), as {NAME: [ARGUMENT...]}
with --json. Needs no password.""",
    ),
    "uidl": (
        "uidl [--json]",
        """\
The unique id of each message (POP3 UIDL), "NUMBER UID" per line; --json prints
[{"number", "uid"}].""",
    ),
    "save": (
        "save DIR|FILE.mbox | --mda CMD [--all] [--delete] [--max-size SIZE]",
        """\
Copy the messages into a Maildir (a directory) or an mbox file (a name ending in .mbox, or
an existing file), or hand each to a command (--mda). A message counts as saved once it is
on disk (fsync), or the command exited with 0. Only messages no earlier run saved there are
fetched (each run records what it saved); --all fetches every message again.""",
    ),
    "shell": (
        "shell [--log FILE]",
        """\
An interactive POP3 session: type STAT, LIST, TOP 2 5, RETR 1, DELE 1, RSET, QUIT... and see
the server's answers (responses as on the wire; messages decoded, ":raw" shows the bytes).
TLS and the login are done for you. Ctrl-C cancels the line being typed; Ctrl-D or exit
leaves without QUIT (nothing is deleted); QUIT commits the deletions. On a terminal, RETR
asks before printing a message larger than 1 MiB.""",
    ),
    "oauth2": (
        "oauth2 --oauth2 FILE --client-id ID (--provider microsoft|google | --token-url URL)",
        """\
Sign in once with OAuth 2.0 and write FILE (mode 0600): the device grant prints an address
and a code to enter there (microsoft); the loopback grant prints an address to open in a
browser on this computer (google). From then on every action takes --oauth2 FILE alone and
refreshes the token in it as needed. See the README's OAuth2 section for the app
registration each provider needs.""",
    ),
}


class _CommandLineError(Exception):
    """A failure the command line reports in one line, with the exit status to return."""

    def __init__(self, message: str, status: int = _EXIT["USAGE"]) -> None:
        super().__init__(message)
        self.status = status


def _program_name() -> str:
    """How the user started us, for usage lines: "python3 pop3lite.py" or "pop3lite"."""
    import os

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return f"python3 {name}" if name.endswith(".py") else "pop3lite"


def _split_host_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    port = ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _CommandLineError(f"bad host {text!r}: write an IPv6 address as [::1]:PORT")
        port = rest[1:]
        if rest and not port:
            raise _CommandLineError(f"bad host {text!r}: the port is missing after ':'")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:  # a name, an IPv4 address, or an IPv6 address without a port
        host = text
    if not host:
        raise _CommandLineError(f"bad host {text!r}: the host name is empty")
    if not port:
        return host, None
    return host, _port_number(port)


class _Server:
    """HOST as the user typed it: ``host[:port]``, ``[v6][:port]``, ``user@host[:port]``,
    ``pop3://[user@]host[:port]`` or ``pop3s://[user@]host[:port]`` (as curl takes them)."""

    def __init__(self, text: str) -> None:
        self.scheme = ""
        self.user: str | None = None
        rest = text
        scheme, sep, after = text.partition("://")
        if sep and scheme.lower() not in ("pop3", "pop3s"):
            raise _CommandLineError(
                f"unknown scheme {printable(scheme)}://; pop3lite knows pop3:// (STLS) and "
                "pop3s:// (TLS from the first byte)"
            )
        if sep:
            self.scheme, rest = scheme.lower(), after
        if self.scheme:
            rest = rest[:-1] if rest.endswith("/") else rest
            if any(mark in rest for mark in "/?#"):
                raise _CommandLineError(
                    f"bad URL {text!r}: give the action as a word (retr 1), not as a URL path"
                )
        # The last "@" ends the user name: user names are often mail addresses themselves
        # (alice@example.com@pop.example.com), while a host name never holds an "@".
        user, at, rest = rest.rpartition("@")
        if at:
            if ":" in user:  # user:password@host, as in URLs
                raise _CommandLineError(
                    "the password is never taken from the command line, where other users "
                    "can see it; use --password-file FILE, $POP3_PASSWORD, ~/.netrc, or type "
                    "it when asked (a user name with a ':' in it goes in the USER word)"
                )
            if self.scheme:
                import urllib.parse

                user = urllib.parse.unquote(user)  # RFC 3986: %40 for an "@" in a URL
            if not user:
                raise _CommandLineError(f"bad host {text!r}: the user name before '@' is empty")
            self.user = user
        if not rest:
            raise _CommandLineError(f"bad host {text!r}: the host name is missing")
        self.host, self.port = _split_host_port(rest)


def _port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise _CommandLineError(f"bad port {text!r}: give a number from 1 to 65535")
    return int(text)


def _positive(text: str, what: str, minimum: int = 1) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < minimum:
        raise _CommandLineError(f"{what} must be a whole number >= {minimum}, not {text!r}")
    return int(text)


def _parse_size(text: str) -> int:
    """--max-size: octets, or a number with K, M or G (KiB, MiB, GiB)."""
    match = re.fullmatch(r"([0-9]{1,15})([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise _CommandLineError(f"--max-size must be a size like 500000, 800K or 20M, not {text!r}")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def _choice(flag: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """The reader of an option that takes one of ``choices``."""

    def value(text: str) -> str:
        if text not in choices:
            raise _CommandLineError(f"{flag} {text!r}: choose from {', '.join(choices)}")
        return text

    return value


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 86400:  # also refuses nan and inf, which sockets cannot take
        raise _CommandLineError("--timeout must be a number of seconds, at most 86400")
    return seconds


def _mechanism(text: str) -> str:
    mechanism = text.upper() if text.isascii() else text
    if mechanism not in (*SUPPORTED_MECHANISMS, "USER"):
        raise _CommandLineError(
            f"unknown --auth {text!r}; choose from {', '.join(SUPPORTED_MECHANISMS)}, USER"
        )
    return mechanism


_OAUTH2_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")


def _token_option(o: Any) -> str | None:
    """The option that gives an OAuth 2.0 token, if one does."""
    return o.oauth2 or o.oauth2_token_file or o.oauth2_token_command  # type: ignore[no-any-return]


def _token_check(o: Any) -> str:
    if o.apop or o.auth not in (None, *_OAUTH2_MECHANISMS):
        return "an OAuth 2.0 token goes with --auth XOAUTH2 or OAUTHBEARER only"
    return ""


def _needs_oauth2_file(o: Any) -> str:
    return "" if o.oauth2 else "--provider, --client-id and --token-url go with --oauth2 FILE"


class _Option(NamedTuple):
    """One option of the command line: how it is read, what it goes with, how it is checked.
    Its value is the attribute its last flag names (--max-size: ``o.max_size``)."""

    flags: tuple[str, ...]
    group: str  # the heading --help lists it under
    help: str
    metavar: str = ""  # "": a switch, True when given
    value: Callable[[str], Any] = str  # the text to the value; raises _CommandLineError
    default: Any = None
    actions: tuple[str, ...] = ()  # the actions it goes with; (): all of them
    conflicts: tuple[str, ...] = ()  # options it cannot be given with
    check: Callable[[Any], str] | None = None  # what is wrong given the other options, or ""

    @property
    def dest(self) -> str:
        return self.flags[-1].lstrip("-").replace("-", "_")

    def given(self, o: Any) -> bool:
        return bool(getattr(o, self.dest) != (self.default if self.metavar else False))


# Every option, in the order --help lists them. Adding one is one row here, and its use.
_OPTIONS = (
    _Option(("-p", "--port"), "connection", "port (default 995; 110 with --tls starttls or "
            "none)", "PORT", _port_number),
    _Option(("--tls",), "connection", "auto (default): implicit TLS on port 995, STLS on other "
            "ports (optional only on loopback); implicit; starttls; none: plaintext, the "
            "password is sent in clear", "{" + ",".join(TLS_MODES) + "}",
            _choice("--tls", TLS_MODES), "auto"),
    _Option(("--cafile",), "connection", "trust the CA certificates in FILE (PEM)", "FILE"),
    _Option(("--insecure",), "connection", "do not verify the certificate (dangerous)",
            conflicts=("--cafile",),
            check=lambda o: "--insecure has no meaning with --tls none (there is no TLS)"
            if o.tls == "none" else ""),
    _Option(("--timeout",), "connection", f"give up on a silent server after SECONDS "
            f"(default {DEFAULT_TIMEOUT:g})", "SECONDS", _seconds, DEFAULT_TIMEOUT),
    _Option(("--password-file",), "login", 'read the password from FILE ("-": stdin)', "FILE",
            conflicts=("--oauth2-token-file",)),
    _Option(("--auth",), "login", "log in with this SASL mechanism ({}), or USER for "
            "USER/PASS; default: the strongest offered".format(", ".join(SUPPORTED_MECHANISMS)),
            "MECH", _mechanism,
            check=lambda o: f"--auth {o.auth} needs --oauth2 FILE or --oauth2-token-file FILE"
            if o.auth in _OAUTH2_MECHANISMS and not _token_option(o) else ""),
    _Option(("--apop",), "login", "log in with APOP", conflicts=("--auth",)),
    _Option(("--oauth2-token-file",), "login", "log in with the OAuth 2.0 access token in FILE "
            "(OAUTHBEARER, else XOAUTH2)", "FILE", check=_token_check),
    _Option(("--password-command",), "login", "the password is the first line CMD prints (run "
            "by the shell, stdin closed)", "CMD",
            conflicts=("--password-file", "--oauth2", "--oauth2-token-file",
                       "--oauth2-token-command")),
    _Option(("--oauth2",), "login", "log in with OAuth 2.0, the tokens kept in FILE (written "
            "by the oauth2 action, refreshed as needed)", "FILE",
            conflicts=("--password-file", "--oauth2-token-file", "--oauth2-token-command"),
            check=_token_check),
    _Option(("--oauth2-token-command",), "login", "log in with the OAuth 2.0 access token "
            "that CMD prints (run by the shell, stdin closed)", "CMD",
            conflicts=("--password-file", "--oauth2-token-file"), check=_token_check),
    _Option(("--provider",), "oauth2", "microsoft (tenant common unless --tenant) or google: "
            "their endpoints, scope and grant", "{microsoft,google}",
            _choice("--provider", tuple(OAUTH2_PROVIDERS)),
            check=_needs_oauth2_file),
    _Option(("--client-id",), "oauth2", "the client (application) id of your app "
            "registration", "ID", check=_needs_oauth2_file),
    _Option(("--client-secret-file",), "oauth2", "the registration's client secret, if it "
            "has one (client-credentials needs it); kept in the --oauth2 FILE", "FILE",
            actions=("oauth2",)),
    _Option(("--grant",), "oauth2", "default: the provider's; with URLs given, device when "
            "--device-url is, else loopback", "{" + ",".join(OAUTH2_GRANTS) + "}",
            _choice("--grant", OAUTH2_GRANTS),
            actions=("oauth2",)),
    _Option(("--tenant",), "oauth2", "microsoft: common (default), organizations, consumers, "
            "or a tenant id or domain", "TENANT", actions=("oauth2",)),
    _Option(("--scope",), "oauth2", "the scope to ask for (default: the provider's)", "SCOPE",
            actions=("oauth2",)),
    _Option(("--token-url",), "oauth2", "another provider's token endpoint", "URL",
            check=_needs_oauth2_file),
    _Option(("--device-url",), "oauth2", "its device authorization endpoint", "URL",
            actions=("oauth2",)),
    _Option(("--auth-url",), "oauth2", "its authorization endpoint", "URL", actions=("oauth2",)),
    _Option(("--limit",), "check, capa, uidl", f"show the last N messages (default "
            f"{_TABLE_ROWS}, all with --json; 0: all)", "N",
            lambda text: _positive(text, "--limit", 0), actions=("check",)),
    _Option(("--json",), "check, capa, uidl", "print JSON (fields below)",
            actions=("check", "capa", "uidl")),
    _Option(("-o", "--output"), "retr, save, shell", "write the one message N to the file "
            "PATH (through a temporary file: never half-written), or each message to "
            "PATH/N.eml when PATH is a directory", "PATH", actions=("retr",)),
    _Option(("--new",), "retr, save, shell", "the default: only messages no earlier run saved "
            "there (by UIDL, as the journal records them)", actions=("save",)),
    _Option(("--all",), "retr, save, shell", "fetch every message again, also those earlier "
            "runs saved (and record them again)", actions=("save",), conflicts=("--new",)),
    _Option(("--mda",), "retr, save, shell", "deliver each message to the command CMD (run by "
            "/bin/sh, the message on its stdin; %%F: the envelope sender, with no quotes "
            "around it) instead of DIR or FILE.mbox; exit status 0 means delivered, 75 try "
            "again later; bounded by --timeout", "CMD", actions=("save",)),
    _Option(("--delete",), "retr, save, shell", "once every message is safely on disk (or "
            "delivered), delete them on the server, and those earlier runs saved (unless "
            "--all)", actions=("save",)),
    _Option(("--max-size",), "retr, save, shell", "leave messages larger than SIZE (octets, or "
            "with K, M, G) on the server and report them (exit status 7); default: no limit",
            "SIZE", _parse_size, actions=("save",)),
    _Option(("--log",), "retr, save, shell", "append the session to FILE (the password never "
            "appears in it)", "FILE", actions=("shell",)),
    _Option(("-v", "--verbose"), "other", "print the protocol exchange (C:/S:, secrets "
            "hidden) on stderr"),
    _Option(("-q", "--quiet"), "other", "print nothing on success but what the action exists "
            "to print (messages, listings, --json): no report, notice or progress; errors "
            "still go to stderr (cron)", conflicts=("--verbose",)),
    _Option(("--demo",), "other", "run against a fake OperaMail server (fakeserver.py) as "
            "hogehoge"),
)  # fmt: skip


def _option_help(option: _Option) -> str:
    """The option's help in --help: under a heading naming several actions, its own first."""
    if not option.actions or option.group == ", ".join(option.actions):
        return option.help
    return f"{', '.join(option.actions)}: {option.help}"


def _parser(prog: str) -> argparse.ArgumentParser:
    import argparse
    import textwrap

    statuses = "".join(
        textwrap.fill(meaning, 92, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7)
        + "\n"
        for code, _, meaning in _EXIT_STATUSES
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=_USAGE,
        description=_DESCRIPTION,
        epilog=f"{_EPILOG}\n\nexit status:\n{statuses}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # "--password SECRET" must not pass for --password-file
    )
    parser.add_argument("words", nargs="*", help=argparse.SUPPRESS)
    groups: dict[str, Any] = {}
    for option in _OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        if option.metavar:
            groups[option.group].add_argument(
                *option.flags, metavar=option.metavar, type=option.value,
                default=option.default, help=_option_help(option),
            )  # fmt: skip
        else:
            groups[option.group].add_argument(
                *option.flags, action="store_true", help=_option_help(option)
            )
    parser.add_argument("--version", action="version", version=f"pop3lite {__version__}")
    return parser


def _parse_command_line(argv: list[str] | None) -> Any:
    """The options, read once from ``argv`` and checked; raises SystemExit (from argparse)
    for --help, --version and errors."""
    words = sys.argv[1:] if argv is None else argv
    prog = _program_name() if argv is None else "pop3lite"
    parser = _parser(prog)
    asked_help = action = None
    for word in words:
        if word.split("=", 1)[0] in _PASSWORD_OPTIONS:  # refused without echoing its value
            parser.error(
                f"{word.split('=', 1)[0]}: the password is never taken from the command "
                "line, where other users can see it; use --password-file FILE, "
                "$POP3_PASSWORD, ~/.netrc, or type it when asked"
            )
        asked_help = asked_help or word in ("-h", "--help")
        action = action or (word if word in _ACTIONS else None)
    if asked_help and action:  # "retr --help": that action's help (a HOST called "retr" loses)
        _out(_action_help(prog, action))
        raise SystemExit(_EXIT["OK"])
    try:
        o = parser.parse_intermixed_args(words)
        _read_words(o)
        for option in _OPTIONS:
            _check_option(option, o)
    except _CommandLineError as exc:
        parser.error(str(exc))
    return o


def _action_help(prog: str, action: str) -> str:
    import textwrap

    usage, text = _ACTION_HELP[action]
    lines = [f"usage: {prog} HOST[:PORT] USER {usage}", "", text]
    options = [option for option in _OPTIONS if action in option.actions]
    if options:
        lines.append("")
    indent = " " * 20
    for option in options:  # as argparse lays them out: a long name gets a line of its own
        name = f"  {', '.join(option.flags)} {option.metavar}".rstrip()
        if len(name) > 18:
            lines.append(name)
        first = f"{name:<20}" if len(name) <= 18 else indent
        text = option.help.replace("%%", "%")  # written for argparse, which formats it
        lines.append(textwrap.fill(text, 92, initial_indent=first, subsequent_indent=indent))
    lines.append(f"\nConnection and login options: see {prog} --help.")
    return "\n".join(lines)


def _check_option(option: _Option, o: Any) -> None:
    """Refuse an option given with an action it does not go with, or with another it
    contradicts, or that its own check finds wrong."""
    if not option.given(o):
        return
    flags = "/".join(option.flags)
    if option.actions and o.action not in option.actions:
        raise _CommandLineError(f"{flags} only goes with {' or '.join(option.actions)}")
    for other in option.conflicts:
        if next(opt for opt in _OPTIONS if other in opt.flags).given(o):
            raise _CommandLineError(f"{option.flags[-1]} and {other}: choose one")
    problem = option.check(o) if option.check is not None else ""
    if problem:
        raise _CommandLineError(problem)


def _read_words(o: Any) -> None:
    """HOST, USER, the action and its arguments, from the words among the options: sets
    ``o.host``, ``o.user`` (None when not given: ~/.netrc or a prompt tells it), ``o.action``
    and the action's arguments, and settles ``o.port`` and ``o.tls`` with what a URL or
    HOST:PORT says. An action word is never taken for a user (USER@HOST gives such a one)."""
    words: list[str] = o.words
    o.scheme = ""  # "pop3" or "pop3s" when HOST was given as a URL
    if o.demo:
        if words and words[0] not in _ACTIONS:
            raise _CommandLineError(
                f"--demo takes an action ({', '.join(_ACTIONS)}), not {words[0]!r}"
            )
        o.host, o.user = "127.0.0.1", _DEMO_USER
    elif not words:
        raise _CommandLineError("give HOST and USER (or try --demo; --help shows more)")
    else:
        server = _Server(words[0])
        if None not in (o.port, server.port) and o.port != server.port:
            raise _CommandLineError(
                f"two ports given: {server.port} in HOST:PORT and {o.port} in -p"
            )
        o.host, o.scheme, o.port = server.host, server.scheme, o.port or server.port
        o.user, host, words = server.user, words[0], words[1:]
        if words and words[0] not in _ACTIONS:
            if o.user is not None:
                raise _CommandLineError(
                    f"unknown action {words[0]!r} (the user is already given in {host}); "
                    f"choose from {', '.join(_ACTIONS)}"
                )
            o.user, words = words[0], words[1:]
        if o.user == "":
            raise _CommandLineError("USER is empty")
    if words and words[0] not in _ACTIONS:
        raise _CommandLineError(f"unknown action {words[0]!r}; choose from {', '.join(_ACTIONS)}")
    o.action = words[0] if words else "check"
    _action_arguments(o, words[1:])
    _url_scheme(o)


def _url_scheme(o: Any) -> None:
    """What pop3:// and pop3s:// say about TLS and the port."""
    if o.scheme == "pop3s":  # POP3 over TLS from the first byte (RFC 8314 section 3.3)
        if o.tls in ("starttls", "none"):
            raise _CommandLineError(f"pop3s:// means TLS from the first byte, not --tls {o.tls}")
        o.tls = "implicit"
    elif o.scheme == "pop3":  # POP3 on port 110: plaintext, upgraded with STLS
        if o.tls == "implicit":
            raise _CommandLineError("pop3:// means STLS on port 110; write pop3s:// instead")
        o.port = o.port or POP3_PORT
        o.tls = "starttls" if o.tls == "auto" else o.tls  # explicit: never implicit TLS


def _action_arguments(o: Any, words: list[str]) -> None:
    """The arguments after the action: message numbers, a line count, a save target."""
    import os

    o.numbers, o.lines, o.target = [], _TOP_LINES, ""
    if o.action == "retr":
        if not words:
            raise _CommandLineError("usage: retr N [N...]")
        o.numbers = [_positive(word, "a message number") for word in words]
    elif o.action == "top":
        if not 1 <= len(words) <= 2:
            raise _CommandLineError("usage: top N [LINES]")
        o.numbers = [_positive(words[0], "a message number")]
        if len(words) == 2:
            o.lines = _positive(words[1], "LINES", 0)
    elif o.action == "save" and o.mda:
        if words:
            raise _CommandLineError(f"save --mda CMD takes no DIR or FILE.mbox: {words[0]!r}")
    elif o.action == "save":
        if len(words) != 1 or not words[0]:
            raise _CommandLineError("usage: save DIR|FILE.mbox, or save --mda CMD")
        o.target = os.path.expanduser(words[0])
    elif o.action == "oauth2" and not words:
        if not o.oauth2:
            raise _CommandLineError("oauth2 needs --oauth2 FILE: the token file to write")
        again = os.path.exists(os.path.expanduser(o.oauth2))  # sign_in() reuses its settings
        if not again and (not o.client_id or not (o.provider or o.token_url)):
            raise _CommandLineError("oauth2 needs --client-id ID and --provider (or --token-url)")
    elif words:
        raise _CommandLineError(f"{o.action} takes no arguments, but got {words[0]!r}")


class _Run:
    """What the run decides, beside the options (which stay as they were read): where it
    connects (--demo: the fake server), whether auto TLS turned implicit after a silent
    greeting, and where the password or token came from (for a refused login)."""

    def __init__(self, o: Any) -> None:
        self.o = o
        self.host: str = o.host
        self.port: int | None = o.port
        self.tls: str = o.tls
        self.user: str | None = o.user
        self.source = ""

    @property
    def implicit_tls(self) -> bool:
        return self.tls == "implicit" or (self.tls == "auto" and self.port in (None, POP3S_PORT))

    @property
    def where(self) -> str:
        """HOST[:PORT] as given, for the command lines the run suggests."""
        return f"{self.host}:{self.port}" if self.port else self.host

    @property
    def target_name(self) -> str:
        port = self.port or (POP3S_PORT if self.implicit_tls else POP3_PORT)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"


# -- display: RFC 2047 headers, charsets that lie, sizes -----------------------------------

# Patterns as strings: re compiles and caches them on first use, not at import time.
_HIGH_BYTE = rb"[\x80-\xff]"
_BLANKS = "[ \t\r\n]+"  # folding white space; U+3000 and friends are text
_JIS_ESCAPE = rb"\x1b[$(][@BJ]"
_DISPLAY_HEADER_LIMIT = 16 * 1024  # octets of a header value decoded for display; the rest: noise


def _decode_text(data: bytes, charset: str | None = None) -> str:
    """Decode ``data`` in its declared charset if the bytes fit it, else guess: ISO-2022-JP
    when JIS escape sequences are present, UTF-8, Shift_JIS (cp932), then UTF-8 with U+FFFD.

    ISO-2022-JP is 7-bit, so a declared ISO-2022-JP with 8-bit bytes is a lie (the seed's
    message 2 puts Shift_JIS in it). UTF-8 is tried before cp932 because valid UTF-8 is
    almost never an accident, while cp932 decodes most byte strings without error."""
    codecs: list[str] = []
    declared = (charset or "").strip().strip('"').lower()
    if declared and not ("2022" in declared and re.search(_HIGH_BYTE, data)):
        codecs.append(declared)
    if re.search(_JIS_ESCAPE, data):
        codecs += ["iso-2022-jp", "iso2022_jp_ext", "iso2022_jp_2"]
    codecs += _FALLBACK_CHARSETS
    for codec in codecs:
        try:
            return data.decode(codec)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("utf-8", "replace")


def _decode_header(raw: bytes) -> str:
    """An unfolded header value with RFC 2047 encoded words decoded, on one line."""
    text = _decode_text(raw[:_DISPLAY_HEADER_LIMIT])
    if "=?" in text:
        import email.errors
        import email.header

        try:
            parts = email.header.decode_header(text)
        except (email.errors.HeaderParseError, ValueError, LookupError, AssertionError):
            parts = [(text, None)]
        words = []
        for value, charset in parts:
            if isinstance(value, str):
                words.append(value)
            elif charset is None:  # decode_header encodes undecoded runs this way
                try:
                    words.append(value.decode("raw-unicode-escape"))
                except UnicodeDecodeError:
                    words.append(value.decode("latin-1"))
            else:
                words.append(_decode_text(value, charset))
        text = "".join(words)
    return printable(re.sub(_BLANKS, " ", text).strip(" "))


def _header_fields(header: bytes) -> list[tuple[str, list[bytes]]]:
    """The fields of a header block (CRLF line ends) as (lower-case name, physical lines)."""
    fields: list[tuple[str, list[bytes]]] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        elif b":" in line:
            name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            fields.append((name, [line]))
    return fields


def _field_value(lines: list[bytes]) -> bytes:
    """A field's unfolded value (RFC 5322 section 2.2.3: remove the CRLFs, keep the rest)."""
    return b"".join(lines).split(b":", 1)[1].strip()


def _split_message(data: bytes) -> tuple[bytes, bytes | None]:
    """(header, body) of a message with CRLF line ends; body None when there is no blank line."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    head, sep, body = data.partition(b"\r\n\r\n")
    return (head, body) if sep else (data.rstrip(b"\r\n"), None)


def _human_size(count: int) -> str:
    """``count`` octets in binary units, for a person to read: "512 B", "20.1 MiB"."""
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def _size(count: int) -> str:
    """Octets, exact, and in human units beside them once that says more: "10180 octets
    (9.9 KiB)"."""
    if count < 1024:
        return _plural(count, "octet")
    return f"{count} octets ({_human_size(count)})"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# -- secrets ------------------------------------------------------------------------------------


def _read_secret_file(path: str, what: str) -> str:
    """The first line of ``path`` ("-": of stdin), without its line end."""
    if path == "-":
        data = _read_secret_line(what)
        path = "on stdin"
    else:
        try:
            with open(path, "rb") as file:
                data = file.read(_SECRET_FILE_LIMIT + 1)
        except OSError as exc:
            raise _CommandLineError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return _first_line(data, f"{what} {path}")


def _first_line(data: bytes, where: str) -> str:
    """The secret on the first line of ``data`` (which came from ``where``), without its CR/LF."""
    if len(data) > _SECRET_FILE_LIMIT:
        raise _CommandLineError(f"{where} is too large to hold a password or token")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _CommandLineError(f"{where} is not UTF-8 text") from None
    # Only a line feed ends the line: str.splitlines() would also cut at \x0b, \x1c, U+2028...,
    # which a password may contain.
    value = text.split("\n", 1)[0]
    value = value[:-1] if value.endswith("\r") else value
    if not value:
        raise _CommandLineError(f"{where} is empty (the secret goes on its first line)")
    return value


def _command_secret(command: str, option: str, timeout: float) -> str:
    """The first line a shell command prints (as mpop's passwordeval, mbsync's PassCmd): stdin
    closed, stderr left to the user, at most ``timeout`` seconds (see _run_command)."""
    import subprocess

    where = f"{option} {command!r}"
    try:
        # At a terminal the command keeps it, so that a pinentry (gpg, pass) can ask there.
        on_terminal = sys.stderr is not None and sys.stderr.isatty()
        status, output = _run_command(
            command, None, timeout, stderr=False, own_session=not on_terminal
        )
    except subprocess.TimeoutExpired:
        raise _CommandLineError(f"{where} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise _CommandLineError(f"{where} could not run: {exc.strerror or exc}") from None
    with output:
        if status != 0:
            raise _CommandLineError(f"{where} failed (exit status {status})")
        data = output.read(_SECRET_FILE_LIMIT + 1)
    if not data.strip(b"\r\n"):
        raise _CommandLineError(f"{where} printed nothing")
    return _first_line(data, f"the output of {where}")


def _read_secret_line(what: str) -> bytes:
    """One line of stdin, for ``--password-file -``; the rest stays there (for the shell)."""
    stdin = sys.stdin
    if stdin is None:
        raise _CommandLineError(f"cannot read the {what} from stdin: there is none")
    if stdin.isatty():  # a terminal would echo it: the prompt hides it instead
        raise _CommandLineError(
            f"the {what} - reads stdin, which is a terminal here (it would show the secret); "
            "leave the option out to be asked for the password without echo"
        )
    buffer = getattr(stdin, "buffer", None)
    if buffer is not None:
        data: bytes = buffer.readline(_SECRET_FILE_LIMIT + 1)
        return data
    return stdin.readline(_SECRET_FILE_LIMIT + 1).encode("utf-8", "surrogateescape")


def _netrc_entry(host: str) -> tuple[str, str] | None:
    """(login, password) of ~/.netrc's entry for ``host`` (either may be empty), if any."""
    import netrc

    try:
        entries = netrc.netrc()
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as exc:
        hint = " (chmod 600 ~/.netrc)" if "permissive" in str(exc) or "owned" in str(exc) else ""
        if "malformed" in str(exc) and sys.version_info < (3, 11):
            hint = " (before Python 3.11, every entry needs a password: add one)"
        raise _CommandLineError(f"cannot use ~/.netrc: {exc.msg}{hint}") from None
    except OSError as exc:
        if exc.errno is None:  # no home directory to look in (Python 3.7-3.9 raise this)
            return None
        raise _CommandLineError(f"cannot read ~/.netrc: {exc.strerror or exc}") from None
    found = entries.authenticators(host)
    if found is None:
        return None
    login, _, password = found
    return login or "", password or ""


def _stored_password(run: _Run) -> tuple[str | None, str]:
    """The password from --password-file, $POP3_PASSWORD or ~/.netrc (None if none holds
    one), and where it came from."""
    import os

    o = run.o
    password: str | None
    if o.demo:
        source, password = "--demo", _DEMO_PASSWORD
    elif o.password_command:
        source = "--password-command"
        password = _command_secret(o.password_command, source, o.timeout)
    elif o.password_file:
        where = "stdin" if o.password_file == "-" else o.password_file
        source = f"--password-file {where}"
        password = _read_secret_file(o.password_file, "password file")
    elif os.environ.get(_PASSWORD_VARIABLE):
        source, password = f"${_PASSWORD_VARIABLE}", os.environ[_PASSWORD_VARIABLE]
    else:
        entry = _netrc_entry(run.host)
        fits = entry is not None and entry[0] in ("", run.user)
        source, password = "~/.netrc", (entry[1] or None) if entry and fits else None
    return password, source


def _check_prompt(run: _Run, what: str) -> None:
    """Fail before connecting when the user or password is not known and there is no
    terminal to ask at."""
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        return
    if what == "user":
        raise _CommandLineError(
            f"no user for {run.host}: give HOST USER or USER@HOST, add \"machine {run.host} "
            "login USER\" to ~/.netrc, or run in a terminal to be asked"
        )
    raise _CommandLineError(
        f"no password for {run.user} on {run.host}: use --password-file FILE, set "
        f"{_PASSWORD_VARIABLE}, add the host to ~/.netrc, or run in a terminal to be asked"
    )


def _typed_user(run: _Run) -> str:
    """The user name, typed at the terminal (with echo) once the server has been reached."""
    _write(sys.stderr, f"User on {run.target_name}: ")
    sys.stderr.flush()
    typed = sys.stdin.readline().strip()
    if not typed:
        raise _CommandLineError("no user entered")
    return typed


def _typed_password(run: _Run) -> str:
    """The password, typed without echo: asked only once the server has been reached (as
    mpop does), so a wrong port or a bad certificate costs no typing."""
    import getpass

    try:
        typed = getpass.getpass(f"Password for {run.user} on {run.target_name}: ")
    except EOFError:  # Ctrl-D
        _write(sys.stderr, "\n")  # getpass leaves the cursor after its prompt
        typed = ""
    except KeyboardInterrupt:
        _write(sys.stderr, "\n")
        raise
    if not typed:
        raise _CommandLineError("no password entered")
    return typed


def _password_problem(password: str, source: str, sasl: bool) -> str | None:
    """Why the login cannot carry ``password`` (CR, LF or NUL, which no command line may hold;
    with ``sasl``, also a character SASLprep (RFC 4013) prohibits), naming its position but
    never the password; or None."""
    position, char = 0, ""
    for index, candidate in enumerate(password):
        if candidate in "\r\n\0":
            position, char = index + 1, candidate
            break
        if not sasl:
            continue
        try:
            saslprep(candidate, what="password")
        except ValueError:
            position, char = index + 1, candidate
            break
    if not position:
        try:
            if sasl:
                saslprep(password, what="password")
        except ValueError:
            return (
                f"the password (from {source}) mixes right-to-left and left-to-right text, "
                "which SASLprep (RFC 4013) prohibits"
            )
        return None
    what = {"\n": "a line feed", "\r": "a carriage return", "\t": "a tab", "\0": "NUL"}
    name = what.get(char, "a character that SASLprep (RFC 4013) prohibits")
    problem = (
        f"the password (from {source}) holds {name} (U+{ord(char):04X}) at character "
        f"{position} of {len(password)}, which cannot be sent"
    )
    if source == f"${_PASSWORD_VARIABLE}" and position == len(password) and char in "\r\n":
        problem += (
            f"; a trailing newline in ${_PASSWORD_VARIABLE} is the usual cause (or a "
            "carriage return, from a file with Windows line ends)"
        )
    return problem


# -- output helpers -------------------------------------------------------------------------------


def _write(stream: IO[str], text: str) -> None:
    """Write text; characters the stream cannot encode become escapes instead of errors."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def _out(text: str = "") -> None:
    _write(sys.stdout, text + "\n")


_quiet = False  # -q: notices are not shown (errors are: main() turns this off to report one)


def _say(text: str, always: bool = False) -> None:
    """One line on stderr, prefixed with the program's name (under -q only when ``always``:
    what says the run was not a plain success)."""
    if always or not _quiet:
        _write(sys.stderr, f"pop3lite: {text}\n")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    # Taking over a lock is said even under -q: someone's run died holding it.
    _say(f"warning: {message}", always=issubclass(category, _StaleLockWarning))


def _write_bytes(data: bytes) -> None:
    """Raw bytes to stdout (through its binary buffer when it has one)."""
    stdout = sys.stdout
    buffer = getattr(stdout, "buffer", None)
    if buffer is None:
        _write(stdout, data.decode("utf-8", "replace"))
        return
    stdout.flush()
    # A write that a signal cuts short (as the reader closing the pipe does) returns how
    # much went out, and CPython's buffered writer passes that count on without an error:
    # write the rest, which then fails (EPIPE) or goes out.
    view = memoryview(data)
    while view:
        view = view[buffer.write(view) or len(view) :]
    buffer.flush()


# -- the quick check --------------------------------------------------------------------------


def _parse_date(text: str) -> tuple[str, str]:
    """(ISO 8601, "YYYY-MM-DD HH:MM" in the sender's time zone), or the text twice."""
    import datetime
    import email.utils

    try:
        parsed = email.utils.parsedate_tz(text)
        if parsed is None:
            return text, text
        zone = datetime.timezone(datetime.timedelta(seconds=parsed[9] or 0))
        moment = datetime.datetime(*parsed[:6], tzinfo=zone)
    except (ValueError, TypeError, IndexError, OverflowError):
        return text, text
    return moment.isoformat(), moment.strftime("%Y-%m-%d %H:%M")


class _Summary:
    """One row of the check's table: what UIDL and TOP n 0 told about a message."""

    def __init__(self, number: int, size: int, uid: str | None, top: bytes | None) -> None:
        values: dict[str, str] = {}
        if top is not None:
            for name, lines in _header_fields(_split_message(top)[0]):
                if name in ("date", "from", "subject") and name not in values:
                    values[name] = _decode_header(_field_value(lines))
        self.number, self.size, self.uid = number, size, uid
        self.date = values.get("date")  # ISO 8601 when it parses, else as written
        self.date_shown = ""
        if self.date is not None:
            self.date, self.date_shown = _parse_date(self.date)
        self.sender = values.get("from")
        self.sender_shown = self.sender or ""
        if self.sender:
            import email.utils

            name, address = email.utils.parseaddr(self.sender)
            self.sender_shown = name or address or self.sender
        self.subject = values.get("subject")


def _summaries(pop: POP3, sizes: dict[int, int], numbers: list[int]) -> list[_Summary]:
    """UIDL and TOP n 0 (pipelined when offered) for ``numbers``; either may be missing."""
    caps = pop.capa()
    uids: dict[int, str] = {}
    if numbers and (not caps or "UIDL" in caps):
        with contextlib.suppress(ServerError):  # no UIDL: the table has no UID column
            uids = pop.uidl()
    headers: dict[int, bytes] = {}
    if numbers and (not caps or "TOP" in caps):
        try:  # one TOP first: a server without TOP then costs one -ERR, not one per message
            headers[numbers[0]] = pop.top(numbers[0], 0)
        except ServerError:
            pass
        else:
            for fetched in pop.top_many(numbers[1:], 0):
                if fetched.data is not None:
                    headers[fetched.number] = fetched.data
    return [_Summary(n, sizes.get(n, 0), uids.get(n), headers.get(n)) for n in numbers]


def _distinguished_name(rdns: Any) -> str:
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU"}
    return ", ".join(f"{short.get(key, key)}={value}" for rdn in rdns or () for key, value in rdn)


def _tls_report(pop: POP3, o: Any) -> dict[str, Any] | None:
    if not pop.tls_version:
        return None
    certificate = pop.peer_certificate or {}
    return {
        "version": pop.tls_version,
        "cipher": pop.cipher,
        "verified": not o.insecure,
        "subject": printable(_distinguished_name(certificate.get("subject"))) or None,
        "san": [
            printable(f"{kind}:{value}") for kind, value in certificate.get("subjectAltName", ())
        ],
    }


def _security_line(pop: POP3, run: _Run) -> str:
    tls = _tls_report(pop, run.o)
    if tls is None:
        if pop.loopback:
            return "plaintext (loopback)"
        return "PLAINTEXT: the password and the mail crossed the network unencrypted"
    how = "implicit TLS" if run.implicit_tls else "STLS"
    text = f"{tls['version']} ({how}, {tls['cipher']})"
    if not tls["verified"]:
        return text + ", certificate NOT verified (--insecure)"
    text += f", certificate verified: {tls['subject'] or 'no subject'}"
    if tls["san"]:
        text += f" ({', '.join(tls['san'])})"
    return text


def _capabilities_line(caps: dict[str, list[str]]) -> str:
    if not caps:
        return "none announced (the server does not answer CAPA)"
    return printable(", ".join(" ".join([name, *args]) for name, args in caps.items()))


def _method_name(method: str) -> str:
    return "USER/PASS" if method == "USER" else method


def _check(pop: POP3, run: _Run, caps: dict[str, list[str]], method: str) -> int:
    o = run.o
    count, size = pop.stat()
    sizes = pop.list() if count else {}
    numbers = sorted(sizes)
    limit = o.limit if o.limit is not None else (0 if o.json else _TABLE_ROWS)
    shown = numbers[-limit:] if limit else numbers
    rows = _summaries(pop, sizes, shown)
    if o.json:
        report = {
            "server": {"host": run.host, "port": pop.port, "greeting": pop.greeting},
            "tls": _tls_report(pop, o),
            "capabilities": caps,
            "user": run.user,
            "auth": method,
            "count": count,
            "size": size,
            "messages": [
                {
                    "number": row.number,
                    "size": row.size,
                    "uid": row.uid,
                    "date": row.date,
                    "from": row.sender,
                    "subject": row.subject,
                }
                for row in rows
            ],
        }
        _print_json(report)
        return _EXIT["OK"]
    if not o.quiet:  # -q: the table alone, what the check exists to print
        _out(f"Server:        {run.target_name}")
        _out(f"Greeting:      +OK {pop.greeting}".rstrip())  # popa3d's is a bare "+OK"
        _out(f"Security:      {_security_line(pop, run)}")
        _out(f"Capabilities:  {_capabilities_line(caps)}")
        _out(f"Login:         {_method_name(method)} as {printable(run.user or '')}")
        _out(f"Mailbox:       {_plural(count, 'message')}, {_size(size)}")
    if rows and not o.quiet:
        _out()
    for line in _table(rows, _terminal_width()) if rows else []:
        _out(line)
    if len(rows) < len(numbers) and not o.quiet:
        _out(f"(the last {len(rows)} of {len(numbers)} shown; --limit 0 shows all)")
    return _EXIT["OK"]


def _print_json(value: Any) -> None:
    import json

    text = json.dumps(value, ensure_ascii=False, indent=2) + "\n"
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):  # a stdout that cannot encode it: JSON escapes
        text = json.dumps(value, ensure_ascii=True, indent=2) + "\n"
    # In pieces: the text layer hands one large write to the buffer and ignores a short
    # count (see _write_bytes), so the rest of it would be lost without an error.
    for start in range(0, len(text), 8192):
        sys.stdout.write(text[start : start + 8192])


def _terminal_width() -> int:
    """Columns to fit the table in: the terminal's, $COLUMNS, or 0 (no limit) for a pipe."""
    import os
    import shutil

    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isascii() and columns.isdigit() else 0


def _char_width(char: str) -> int:
    """Terminal columns of one character: 2 for East Asian wide and fullwidth, 0 for marks."""
    import unicodedata

    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _text_width(text: str) -> int:
    return sum(_char_width(char) for char in text)


def _fit(text: str, width: int, right: bool = False) -> str:
    """``text`` in exactly ``width`` columns: padded, or cut with "..." at a character boundary."""
    used = _text_width(text)
    if used > width:
        room = max(width - 3, 0)
        kept, used = [], 0
        for char in text:
            w = _char_width(char)
            if used + w > room:
                break
            kept.append(char)
            used += w
        text = "".join(kept) + "..."[: width - used]
        used = _text_width(text)
    padding = " " * (width - used)
    return padding + text if right else text + padding


def _table(rows: list[_Summary], width: int) -> list[str]:
    """The check's table, each line at most ``width`` columns (0: no limit)."""
    header = ("#", "Size", "UID", "Date", "From", "Subject")
    cells = [
        (
            str(r.number),
            _human_size(r.size),
            r.uid or "",
            r.date_shown,
            r.sender_shown,
            r.subject or "",
        )
        for r in rows
    ]
    widths = [max(_text_width(c[i]) for c in [header, *cells]) for i in range(6)]
    widths[2] = min(widths[2], 24)
    widths[3] = min(widths[3], 16)
    widths[4] = min(widths[4], 26)
    show = [True, True, any(r.uid for r in rows), any(r.date_shown for r in rows), True, True]
    if width:

        def room() -> int:  # columns left for the sender and the subject
            return width - sum(w + 2 for w, s in zip(widths[:4], show[:4]) if s) - 2

        if room() < min(50, widths[4] + 2 + widths[5]):
            show[2] = False  # a narrow terminal: the UID gives way (uidl and --json show it)
        widths[4] = min(widths[4], max(8, room() // 3))
        widths[5] = max(10, min(widths[5], room() - widths[4]))
    lines = []
    for cell in [header, *cells]:
        parts = [_fit(cell[i], widths[i], right=i < 2) for i in range(6) if show[i]]
        lines.append("  ".join(parts).rstrip())
    return lines


# -- retr, top, capa, uidl -----------------------------------------------------------------------

_CHARSET = rb"""(?i)charset\s*=\s*["']?([^"';\s]+)"""


def _render_message(data: bytes, raw: bool = False, wire: bool = True) -> list[str]:
    """A message (or TOP's part of it) as display lines: headers with RFC 2047 decoded, the
    body in its declared charset (guessed when it lies), transfer encoding undone for a
    single text part; with ``raw``, the bytes escaped instead. With ``wire`` (the shell, which
    shows the response's "." terminator), lines starting with "." are shown dot-stuffed, as
    on the wire (RFC 1939 section 3), so none can be mistaken for the end of the response;
    without it (retr), as the message holds them."""
    if raw:
        lines = [_escaped(line) for line in data.split(b"\r\n")]
    else:
        head, body = _split_message(data)
        charset, encoding, text_part = None, "", True
        lines = []
        for name, field in _header_fields(head):
            value = _field_value(field)
            if name == "content-type":
                found = re.search(_CHARSET, value)
                charset = found.group(1).decode("ascii", "replace") if found else None
                text_part = value.lower().startswith((b"text/", b"text;")) or value == b""
            elif name == "content-transfer-encoding":
                encoding = value.decode("ascii", "replace").lower()
            if b"=?" in value:
                field_name = printable(field[0].split(b":", 1)[0].decode("ascii", "replace"))
                lines.append(f"{field_name}: {_decode_header(value)}")
            else:
                lines += [printable(_decode_text(line)) for line in field]
        if body is not None:
            lines.append("")
            if text_part and encoding in ("base64", "quoted-printable"):
                body = _undo_transfer_encoding(body, encoding)
            lines += [printable(_decode_text(line, charset)) for line in body.split(b"\r\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the final CRLF
    if not wire:
        return lines
    return ["." + line if line.startswith(".") else line for line in lines]


def _undo_transfer_encoding(body: bytes, encoding: str) -> bytes:
    import binascii

    try:
        if encoding == "base64":
            decoded = binascii.a2b_base64(body)
        else:
            decoded = binascii.a2b_qp(body)
    except (binascii.Error, ValueError):
        return body
    return decoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _confirm_printing(octets: int) -> bool:
    """At a terminal, ask before printing a message of more than _PRINT_LIMIT octets (retr
    and the shell; the response has been read in full, so the session stays in step)."""
    terminal = sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty()
    if octets <= _PRINT_LIMIT or not terminal:
        return True
    try:
        answer = input(f"Print {_size(octets)} on the terminal? [y/N] ")
    except (EOFError, KeyboardInterrupt):
        _out()
        return False
    return answer.strip().lower() in ("y", "yes")


def _show_messages(pop: POP3, o: Any) -> int:
    """retr without -o, and top: decoded on a terminal, the raw bytes for a pipe or file."""
    terminal = sys.stdout.isatty()
    if o.action == "top":
        results = iter([Fetched(o.numbers[0], pop.top(o.numbers[0], o.lines), None)])
    else:
        results = pop.retr_many(o.numbers)
    for fetched in results:
        if fetched.error is not None:
            raise fetched.error
        data = fetched.data or b""
        if not terminal:
            _write_bytes(data)
            continue
        if len(o.numbers) > 1:
            _out(f"--- message {fetched.number}: {_size(len(data))} ---")
        if not _confirm_printing(len(data)):
            _out(f"(message {fetched.number} not shown: {_size(len(data))})")
            continue
        for line in _render_message(data, wire=False):
            _out(line)
    return _EXIT["OK"]


def _retr_to_files(pop: POP3, o: Any) -> int:
    import os

    output = o.output or ""
    folder = os.path.isdir(output)
    for number in o.numbers:
        path = os.path.join(output, f"{number}.eml") if folder else output
        written = _retr_to_file(pop, number, path)
        _out(f"message {number}: {_size(written)} written to {path}")
    return _EXIT["OK"]


def _retr_to_file(pop: POP3, number: int, path: str) -> int:
    """RETR into ``path`` through a temporary file beside it: no half-written file stays."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=".pop3lite-", dir=folder)
    except OSError as exc:
        raise _CommandLineError(
            f"cannot write to {folder}: {exc.strerror}", _EXIT["LOCAL"]
        ) from None
    try:
        with os.fdopen(handle, "wb") as file:
            written = pop.retr_to(number, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return written


def _capa(pop: POP3, o: Any) -> int:
    caps = pop.capa()
    if o.json:
        _print_json(caps)
    elif not caps:
        _out("The server announces no capabilities (it does not answer CAPA).")
    else:
        for name, args in caps.items():
            _out(printable(" ".join([name, *args])))
    return _EXIT["OK"]


def _uidl(pop: POP3, o: Any) -> int:
    try:
        uids = pop.uidl()
    except ServerError as exc:
        raise _CommandLineError(
            f"the server refused UIDL ({exc.text}): it has no unique ids", _EXIT["SERVER"]
        ) from None
    if o.json:
        _print_json([{"number": n, "uid": uid} for n, uid in sorted(uids.items())])
    else:
        for number, uid in sorted(uids.items()):
            _out(f"{number} {uid}")
    return _EXIT["OK"]


# -- save: a Maildir, an mbox or a command (the work is save() in the Delivery section) -------


class _SaveProgress:
    """One line on stderr that moves as octets arrive, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.drawn = 0.0
        self.width = 0  # of the line on screen, so a shorter one covers it completely

    def __call__(self, done: int, count: int, octets: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.drawn < 0.1 and done < count):
            return
        self.drawn = now
        share = min(30, 30 * octets // max(total, 1))
        text = (
            f"saving [{'#' * share}{'.' * (30 - share)}] {done}/{count} messages, "
            f"{_human_size(octets)} of {_human_size(total)}"
        )[: max(10, self.columns() - 1)]
        _write(sys.stderr, "\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = len(text)

    @staticmethod
    def columns() -> int:
        import os

        try:
            return os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError, AttributeError):  # not a real terminal (a test's)
            return 80

    def finish(self) -> None:
        if self.enabled and self.width:
            _write(sys.stderr, "\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def _save(pop: POP3, o: Any) -> int:
    """save() with the options; any failure raises, so the ``with POP3`` block closes without
    QUIT and nothing is deleted."""
    progress = _SaveProgress(sys.stderr.isatty() and not _quiet)
    dest = MDA(o.mda, timeout=o.timeout) if o.mda else o.target
    where = f"the command {printable(o.mda)!r}" if o.mda else o.target
    try:
        report = save(
            pop, dest, new=not o.all, delete=o.delete, max_size=o.max_size, progress=progress
        )
    except ServerError as exc:
        if exc.command == "UIDL":
            raise _CommandLineError(
                f"the server refused UIDL ({exc.text}), so save cannot tell new messages "
                "from saved ones; --all fetches every message",
                _EXIT["SERVER"],
            ) from None
        raise
    except OSError as exc:
        if isinstance(exc, Error):  # the connection, not the disk
            raise
        file = f": {exc.filename}" if exc.filename else ""
        raise _CommandLineError(
            f"cannot save into {where}: {exc.strerror or exc}{file}", _EXIT["LOCAL"]
        ) from None
    finally:
        progress.finish()
    line = f"saved {_plural(report.saved, 'message')} ({report.octets} octets) to {where}"
    line += f" ({report.kind})"
    if report.already:
        line += f"; {_plural(report.already, 'message')} already saved before"
    if report.deleted:
        line += f"; deleted {_plural(report.deleted, 'message')} on the server"
    _out(line)
    if report.skipped:
        listed = ", ".join(f"{n} ({_human_size(size)})" for n, size in report.skipped)
        _say(  # even under -q: skipping is not success (and the exit status is 7)
            f"skipped {_plural(len(report.skipped), 'message')} larger than --max-size "
            f"{_human_size(o.max_size or 0)}, left on the server: {listed}",
            always=True,
        )
        return _EXIT["SKIPPED"]
    return _EXIT["OK"]


# -- shell ----------------------------------------------------------------------------------------

_SHELL_HELP = """\
POP3 commands, sent to the server as you type them:
  STAT              the number of messages and their total size
  LIST [N]          the size of each message (or of message N)
  UIDL [N]          the unique id of each message (or of message N)
  TOP N LINES       the header and the first LINES body lines of message N
  RETR N            the whole of message N
  DELE N            mark message N for deletion (carried out at QUIT)
  RSET              unmark every message marked for deletion
  NOOP              do nothing (keeps the connection alive)
  CAPA              the server's capabilities
  QUIT              delete the marked messages and leave
Shell commands:
  help              this text
  :raw              switch between decoded text and the raw bytes, escaped
  exit, Ctrl-D      leave without QUIT: messages marked with DELE stay on the server
  Ctrl-C            cancel the line being typed (or stop a command: that ends the session)
USER, PASS, APOP, AUTH and STLS are not needed: TLS and the login were done at the start."""

_LOGIN_VERBS = ("USER", "PASS", "APOP", "AUTH")
# What the shell does not send, and why: both are settled before its prompt.
_SHELL_NOT_SENT = {
    "STLS": "TLS is chosen when the shell starts, with --tls",
    "UTF8": "UTF8 is only allowed before login (RFC 6856 section 2)",
}


def _open_log(path: str) -> IO[str]:
    try:
        return open(path, "a", encoding="utf-8", errors="backslashreplace")
    except OSError as exc:
        raise _CommandLineError(
            f"cannot open the log {path}: {exc.strerror}", _EXIT["LOCAL"]
        ) from None


class _Shell:
    """The seed's telnet session, done right: raw commands in, whole responses out."""

    def __init__(self, pop: POP3, run: _Run, password: str | None, method: str) -> None:
        self.pop = pop
        self.facts = run
        self.o = run.o
        self.method = method
        self.raw = False
        self.terminal = sys.stdin is not None and sys.stdin.isatty()
        # Redacting a very short password would garble the log; it never reaches the screen
        # unless typed as an argument to some command, which the login verbs are refused for.
        self.secret = password if password and len(password) >= 4 else None
        self.log: IO[str] | None = None
        self.interrupted = False  # Ctrl-C was pressed at the prompt (explained once)

    def show(self, text: str, echo: bool = True) -> None:
        """A line for the screen (unless ``echo`` is false) and for the log."""
        if echo:
            _out(text)
        if self.log is not None:
            if self.secret:
                text = text.replace(self.secret, "****")
            self.log.write(text + "\n")
            self.log.flush()

    def run(self) -> int:
        if not self.o.log:
            return self.loop()
        with _open_log(self.o.log) as log:
            self.log = log
            log.write(
                f"# pop3lite shell, {self.facts.user} on {self.facts.target_name}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
            )
            return self.loop()

    def read(self) -> str | None:
        """The next command line, or None at the end of input."""
        if self.terminal:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            try:
                line = input(_SHELL_PROMPT)
            except EOFError:
                _out()
                return None
            except KeyboardInterrupt:
                # As in a shell: Ctrl-C cancels the line being typed, not the session.
                _out()
                if not self.interrupted:
                    _out("(line cancelled; Ctrl-D or exit leaves, QUIT commits deletions)")
                self.interrupted = True
                return ""
            self.show(_SHELL_PROMPT + line, echo=False)
            return line
        line = sys.stdin.readline()
        if not line:
            return None
        line = line.rstrip("\r\n")
        self.show(_SHELL_PROMPT + line)  # echoed, so the output reads like the session
        return line

    def loop(self) -> int:
        pop = self.pop
        self.show(f"Connected to {self.facts.target_name}: {_security_line(pop, self.facts)}")
        self.show(f"+OK {pop.greeting}".rstrip())  # as on the wire: "+OK" may have no text
        self.show(
            f"Logged in as {printable(self.facts.user or '')} with {_method_name(self.method)} "
            "(the password is never shown)."
        )
        self.show(
            'Type POP3 commands (STAT, LIST, TOP 2 5, RETR 1, DELE 1, RSET, QUIT); "help" '
            "lists them."
        )
        while True:
            line = self.read()
            if line is None or line.strip().lower() == "exit":
                self.show("Leaving without QUIT: messages marked with DELE stay on the server.")
                pop.abort()
                return _EXIT["OK"]
            words = line.split()
            if not words:
                continue
            if words[0].lower() in ("help", "?"):
                for text in _SHELL_HELP.splitlines():
                    self.show(text)
                continue
            if words[0].lower() == ":raw":
                self.raw = not self.raw
                self.show(f"(showing {'raw bytes, escaped' if self.raw else 'decoded text'})")
                continue
            verb = words[0].upper()
            if verb in _LOGIN_VERBS:
                self.show(
                    f"(not sent: {verb} is the login, already done for you, so no password is "
                    "typed on screen or into the log; choose the method with --apop or --auth)"
                )
                continue
            if verb in _SHELL_NOT_SENT:
                self.show(f"(not sent: {_SHELL_NOT_SENT[verb]})")
                continue
            if verb == "QUIT":
                try:
                    self.show(f"+OK {pop.quit()}".rstrip())
                except ServerError as exc:
                    self.show(self.error_line(exc))
                    return _EXIT["SERVER"]
                return _EXIT["OK"]
            self.command(verb, words[1:])

    def error_line(self, exc: ServerError) -> str:
        return ("-ERR " + (f"[{exc.code}] " if exc.code else "") + exc.text).rstrip()

    def command(self, verb: str, args: list[str]) -> None:
        try:
            response = self.pop.command(verb, *args)
        except ValueError as exc:
            self.show(f"(not sent: {exc})")
            return
        except ServerError as exc:
            self.show(self.error_line(exc))
            return
        text = response.text
        shown = _escaped(text) if self.raw else display_text(text)
        self.show(f"+OK {shown}".rstrip())
        body = response.body
        if body is not None:
            message = verb in ("RETR", "TOP")
            lines: list[str] = []
            if message and not _confirm_printing(len(body)):
                self.show(f"(not shown: {_size(len(body))})")
            elif message or self.raw:
                lines = _render_message(body, self.raw)
            else:
                lines = [printable(_decode_text(line)) for line in body.split(b"\r\n")[:-1]]
            for line in lines:
                self.show(line)
            self.show(".")


# -- running it all -------------------------------------------------------------------------------


def _tls_context(o: Any) -> ssl.SSLContext | None:
    if not (o.cafile or o.insecure):
        return None
    try:
        import ssl
    except ImportError:
        raise _CommandLineError("this Python has no ssl module", _EXIT["CONNECTION"]) from None
    try:
        context = create_tls_context(None if o.insecure else o.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise _CommandLineError(f"cannot load --cafile {o.cafile}: {exc}") from None
    if o.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _log_in(
    pop: POP3, run: _Run, password: str | None, token: str | Callable[[], str] | None
) -> str:
    """Log in as the options say; return the method used ("USER", "APOP", a SASL name)."""
    o, user = run.o, run.user or ""
    if token is not None:
        mechanism = str(o.auth or choose_oauth2_mechanism(pop.capa().sasl))
        if o.auth:  # XOAUTH2, the fallback, works on servers that do not list it
            _check_offered(pop, mechanism)
        pop.login_oauth2(user, token, mechanism)
        return mechanism
    assert password is not None
    caps = pop.capa()
    if o.apop or o.auth == "USER":
        sasl = False
    elif o.auth:
        sasl = True
        _check_offered(pop, o.auth)
    else:
        sasl = choose_password_mechanism(caps.sasl) is not None
    try:
        return _log_in_with_password(pop, o, user, password)
    except ValueError:
        problem = _password_problem(password, run.source, sasl)
        if problem is None:
            raise
        raise _CommandLineError(problem) from None
    except (AuthenticationError, NetworkError) as exc:
        if not o.auth or o.auth == "USER" or caps:
            raise
        # No CAPA, so nobody knows whether AUTH works here; such servers often answer an
        # unknown AUTH with a bare -ERR, or by hanging up.
        said = exc.text if isinstance(exc, AuthenticationError) else str(exc)
        status = _failure(exc, run)[0]
        raise _CommandLineError(
            f"AUTH {o.auth} failed ({said}); the server announces no capabilities (it does not "
            f"answer CAPA), so it may not support AUTH {o.auth}: leave --auth out to log in "
            f"with USER/PASS, or check the password (from {run.source})",
            status,
        ) from None


def _log_in_typing(pop: POP3, run: _Run) -> tuple[str, str]:
    """Log in with a password typed at the prompt, asked again when it is refused (up to
    _PASSWORD_TRIES times in all, as ssh and sudo do; a stored password is never retried).
    Returns the method and the password that worked."""
    run.source = "the prompt"
    for attempt in range(1, _PASSWORD_TRIES):
        password = _typed_password(run)
        try:
            return _log_in(pop, run, password, None), password
        except AuthenticationError as exc:
            if not pop.is_open:  # the server hung up: no second try on this connection
                raise
            said = f" ({exc.text})" if exc.text else ""
            _say(f"login refused{said}; try again ({attempt} of {_PASSWORD_TRIES} tries)")
    password = _typed_password(run)
    return _log_in(pop, run, password, None), password


def _check_offered(pop: POP3, mechanism: str) -> None:
    """Refuse, before sending anything, a SASL mechanism that the server's CAPA leaves out
    (RFC 2449 section 6.3); without CAPA the server is given the benefit of the doubt."""
    caps = pop.capa()
    offered = caps.sasl
    if not caps or mechanism in (name.upper() for name in offered if name.isascii()):
        return
    if offered:
        listing = printable(" ".join(offered))
        hint = "choose one of them with --auth, or leave --auth out for the strongest"
        raise _CommandLineError(
            f"the server does not offer AUTH {mechanism}; it offers SASL {listing}: {hint}",
            _EXIT["AUTH"],
        )
    raise _CommandLineError(
        f"the server does not offer AUTH {mechanism}: it announces no SASL mechanism at all; "
        "leave --auth out (or give --auth USER) to log in with USER/PASS",
        _EXIT["AUTH"],
    )


def _log_in_with_password(pop: POP3, o: Any, user: str, password: str) -> str:
    if o.apop:
        if pop.timestamp is None:
            raise _CommandLineError(
                "the server's greeting has no APOP timestamp (or it came before STLS and was "
                "discarded), so --apop cannot work; leave --apop out",
                _EXIT["SERVER"],
            )
        pop.apop(user, password)
        return "APOP"
    if o.auth == "USER":
        pop.login(user, password)
        return "USER"
    if o.auth:
        pop.auth(o.auth, user, password)
        return str(o.auth)
    return pop.login_best(user, password)


def _connect(run: _Run, context: ssl.SSLContext | None) -> POP3:
    """Connect as the options say. In auto mode on a port other than 110 and 995 the server
    gets _GREETING_WAIT seconds to greet in plaintext: a silent one probably waits for a TLS
    ClientHello (RFC 8314 section 3.3), so implicit TLS is tried, and said, on a second
    connection, instead of waiting out --timeout (``run.tls`` then says "implicit")."""
    given = {"timeout": run.o.timeout, "ssl_context": context}
    wait = min(_GREETING_WAIT, run.o.timeout)  # a shorter --timeout shortens it, and still probes
    if run.tls == "auto" and not run.implicit_tls and run.port != POP3_PORT:
        _Log().debug(  # -v says why a silent server gets a second connection
            "(does %s greet in plaintext within %gs?)", run.target_name, wait
        )
        try:
            return POP3(run.host, run.port, tls="auto", greeting_timeout=wait, **given)
        except Timeout as exc:
            if exc.reason != "greeting":
                raise
            _say(
                f"no plaintext greeting from {run.target_name} within {wait:g}s: the "
                "port may expect TLS from the first byte, so trying implicit TLS (--tls "
                "implicit skips this wait; --tls starttls waits for a slow plaintext server)"
            )
            run.tls = "implicit"
    return POP3(run.host, run.port, tls=run.tls, **given)


def _oauth2_source(o: Any, secret: str | None) -> OAuth2:
    """The token source for --oauth2 FILE; what else is given must agree with the file."""
    return OAuth2(
        o.oauth2,
        o.provider,
        client_id=o.client_id,
        client_secret=secret,
        scope=o.scope,
        tenant=o.tenant,
        token_url=o.token_url,
        device_url=o.device_url,
        auth_url=o.auth_url,
        timeout=o.timeout,
    )


def _show_sign_in(message: str, url: str) -> None:
    """What the user must open (and the device code): said even under -q."""
    _say(message, always=True)


def _oauth2_sign_in(run: _Run) -> int:
    """The oauth2 action: sign in once by the chosen grant and write the token file."""
    o, secret = run.o, None
    if o.client_secret_file:
        secret = _read_secret_file(o.client_secret_file, "client secret file")
    if o.grant != "client-credentials":
        _known_user(run)
        run.user = run.user or _typed_user(run)
    _oauth2_source(o, secret).sign_in(run.user or "", o.grant, _show_sign_in)
    _say(f"signed in; the tokens are in {o.oauth2} (keep it private)")
    _say(f"from now on: {_program_name()} {run.where} {run.user} check --oauth2 {o.oauth2}")
    return _EXIT["OK"]


def _secret(run: _Run) -> tuple[str | None, str | Callable[[], str] | None]:
    """(password, token) read before connecting, noting in ``run.source`` where they came
    from; both None when the password is to be asked for (fails now if it cannot be)."""
    o = run.o
    if o.action == "capa":
        return None, None
    _known_user(run)
    if o.oauth2:
        run.source = f"--oauth2 {o.oauth2}"
        tokens = _oauth2_source(o, None)
        tokens()  # refreshed now, if due: a slow token endpoint must not keep a server waiting
        return None, tokens
    if o.oauth2_token_command:
        run.source = "--oauth2-token-command"
        return None, _command_secret(o.oauth2_token_command, run.source, o.timeout)
    if o.oauth2_token_file:
        run.source = f"--oauth2-token-file {o.oauth2_token_file}"
        return None, _read_secret_file(o.oauth2_token_file, "token file").strip()
    password, source = _stored_password(run)
    if password is None:
        _check_prompt(run, "password")
    else:
        run.source = source
    return password, None


def _known_user(run: _Run) -> None:
    """A URL or HOST without USER: ~/.netrc's login; else one must be asked for."""
    if run.user is None:
        entry = _netrc_entry(run.host)
        run.user = entry[0] if entry and entry[0] else None
        if run.user is None:
            _check_prompt(run, "user")


def _session(run: _Run) -> int:
    """Connect, then ask for a password if none is stored, log in (except for capa), run the
    action; QUIT only if it succeeded."""
    import os

    o = run.o
    if o.action == "oauth2":
        return _oauth2_sign_in(run)
    if o.action == "retr" and o.output and len(o.numbers) > 1 and not os.path.isdir(o.output):
        raise _CommandLineError("-o must name an existing directory for several messages")
    if o.action == "retr" and not o.output and len(o.numbers) > 1 and not sys.stdout.isatty():
        raise _CommandLineError(
            "several messages to a pipe or a file would run together with nothing between "
            "them: give -o DIR for one N.eml file each, use save FILE.mbox, or retr them one "
            "at a time"
        )
    password, token = _secret(run)
    context = _tls_context(o)
    if o.insecure:
        _say(
            f"WARNING: --insecure: the certificate of {run.host} is not checked; anyone on the "
            "network path can pose as the server and read the password and the mail"
        )
    with _connect(run, context) as pop:
        if not pop.tls_version and not pop.loopback:
            _say("WARNING: --tls none: the password and the mail cross the network unencrypted")
        if o.action == "capa":
            return _capa(pop, o)
        caps = dict(pop.capa())
        if run.user is None:
            run.user = _typed_user(run)
        if password is None and token is None:
            method, password = _log_in_typing(pop, run)
        else:
            method = _log_in(pop, run, password, token)
        if o.action == "check":
            return _check(pop, run, caps, method)
        if o.action == "retr" and o.output:
            return _retr_to_files(pop, o)
        if o.action in ("retr", "top"):
            return _show_messages(pop, o)
        if o.action == "uidl":
            return _uidl(pop, o)
        if o.action == "save":
            import io

            quiet = contextlib.redirect_stdout(io.StringIO())  # -q: a report nobody reads
            with quiet if o.quiet else contextlib.nullcontext():
                return _save(pop, o)
        return _Shell(pop, run, password, method).run()


def _import_fakeserver() -> Any:
    """fakeserver.py from the import path, else from beside this file."""
    with contextlib.suppress(ImportError):
        import fakeserver

        return fakeserver
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakeserver.py")
    spec = importlib.util.spec_from_file_location("fakeserver", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise _CommandLineError(
            "--demo needs fakeserver.py next to pop3lite.py (it comes with the pop3lite "
            "repository)",
            _EXIT["LOCAL"],
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fakeserver"] = module
    spec.loader.exec_module(module)
    return module


def _demo(run: _Run) -> int:
    fakeserver = _import_fakeserver()
    with fakeserver.FakeServer() as server:
        run.host, run.port, run.tls = server.host, server.port, "auto"
        _say(f"demo: a fake OperaMail server (fakeserver.py) on {server.host}:{server.port}")
        return _session(run)


# What the command line says about a pop3lite error: the first row whose class and reason
# (empty: any) fit gives the exit status and the line, a template over these fields:
#   {error} the error's own message   {text} a -ERR's text   {where} HOST:PORT
#   {what} what would have crossed in clear   {said} {secret} {source} {tls_hint}: see _failure
# The library's messages speak of API arguments (tls='none'); rows that would repeat them
# say it with the command line's options instead.
_FAILURES: tuple[tuple[type[Error], str, int, str], ...] = (
    (AuthenticationError, "", _EXIT["AUTH"],
     "login refused{said}; check the user name and the {secret}{source}{other_login}"),
    (InUseError, "", _EXIT["TEMPORARY"],
     "the mailbox is in use by another session ({text}); try again once the other mail "
     "client has finished"),
    (LoginDelayError, "", _EXIT["TEMPORARY"],
     "the server wants more time between logins ({text}); try again later"),
    (TemporaryError, "", _EXIT["TEMPORARY"], "temporary server problem ({text}); try again later"),
    (ServerError, "", _EXIT["SERVER"], "{error}"),
    (DeliveryError, "tempfail", _EXIT["TEMPORARY"], "{error}; the command says: try again later"),
    (DeliveryError, "", _EXIT["LOCAL"], "{error}; the message stays on the server"),
    # Not "--tls implicit" on this port: a plaintext port answers a ClientHello with an
    # error that would send the user back to --tls starttls (issue 13, a circle).
    (TLSError, "no-stls", _EXIT["CONNECTION"],
     "{where} does not offer STLS; connect to its TLS port instead (HOST:995, or "
     "pop3s://HOST), or use --tls none to send everything unencrypted"),
    (TLSError, "not-tls", _EXIT["CONNECTION"],
     "{error}; the server speaks plaintext, not TLS from the first byte, on this port: try "
     "{plaintext_hint}"),
    (TLSError, "certificate", _EXIT["CONNECTION"],
     "{error}; if the server uses a private CA, pass --cafile CA.pem (--insecure skips the "
     "check, which is unsafe)"),
    (TLSError, "hostname", _EXIT["CONNECTION"],
     "{error}; connect by the name the certificate was issued for (--insecure skips the "
     "check, which is unsafe)"),
    (TLSError, "no-ssl", _EXIT["CONNECTION"],
     "{error}; use --tls none on a trusted network, or a Python built with ssl"),
    (TLSError, "", _EXIT["CONNECTION"], "{error}"),
    (Timeout, "", _EXIT["CONNECTION"],
     "{error}; check the host and port, or raise --timeout{tls_hint}"),
    (NetworkError, "resolve", _EXIT["CONNECTION"], "{error}; check the host name"),
    (NetworkError, "connect", _EXIT["CONNECTION"],
     "{error}; check the host name and the port (HOST:PORT or -p PORT)"),
    (NetworkError, "", _EXIT["CONNECTION"], "{error}"),
    (InsecureError, "", _EXIT["CONNECTION"],
     "refusing to send {what} over an unencrypted connection to {where}; use TLS (--tls "
     "starttls or --tls implicit), or --tls none to allow it"),
    (ProtocolError, "", _EXIT["SERVER"], "the server broke the protocol: {error}"),
    (OAuth2Error, "endpoint", _EXIT["CONNECTION"],
     "{error}; check the network (and --token-url), or try again later"),
    (OAuth2Error, "permissions", _EXIT["LOCAL"], "{error}"),
    (OAuth2Error, "busy", _EXIT["TEMPORARY"], "{error}; try again once it has finished"),
    (OAuth2Error, "", _EXIT["AUTH"], "{error}{sign_in}"),
    (Error, "", _EXIT["SERVER"], "{error}"),
)


def _failure(exc: Error, run: _Run | None = None) -> tuple[int, str]:
    """The exit status and the one line to print for a pop3lite error: what happened and
    what to try (``run``, when given, adds what the command line knows: where the password
    came from, which TLS mode was used)."""
    secret = "token" if run is not None and _token_option(run.o) else "password"
    fields = {
        "error": str(exc),
        "text": getattr(exc, "text", ""),
        "where": run.target_name if run is not None else "the server",
        "what": getattr(exc, "what", "") or "a password",
        "secret": secret,
        "said": "",
        "source": "",
        "tls_hint": "",
        "sign_in": f": run {_program_name()} HOST USER oauth2 --oauth2 FILE",
        "other_login": ", or choose another login method with --auth MECH or --apop",
        "plaintext_hint": "--tls starttls, or the implicit TLS port (995)",
    }
    if run is not None and run.o.oauth2:
        command = f"{_program_name()} {run.where} {run.user} oauth2 --oauth2 {run.o.oauth2}"
        fields["sign_in"] = "" if run.o.action == "oauth2" else f": run {command}"
    if secret == "token":
        fields["other_login"] = ""
    if isinstance(exc, AuthenticationError) and exc.text:
        # A -ERR's text is the server's; a refusal inside the SASL exchange (SCRAM "e=") is
        # told in the error's own words, which do not claim a -ERR.
        said = exc.text if exc.reason == "in-exchange" else f"the server said: {exc.text}"
        fields["said"] = f" ({said})"
    if run is not None and run.source:
        fields["source"] = f" (the {secret} came from {run.source})"
    timed_out = exc.reason in ("read", "handshake", "greeting", "")
    if run is not None and not run.implicit_tls and timed_out:
        implicit = f"pop3s://{run.target_name}" if run.o.scheme else "--tls implicit"
        fields["tls_hint"] = f"; if the port expects TLS from the first byte, use {implicit}"
    if run is not None and run.o.scheme == "pop3s":  # an explicit scheme: name the other one
        fields["plaintext_hint"] = f"pop3://{run.target_name} (STLS)"
    for cls, reason, status, template in _FAILURES:
        if isinstance(exc, cls) and reason in ("", exc.reason):
            return status, template.format_map(fields)
    raise AssertionError("the last row fits every Error")  # pragma: no cover


def _stdout_closed() -> int:
    """The exit status once stdout's reader has gone; stdout then points at /dev/null, so
    that the interpreter's last flush has nowhere to fail."""
    import os

    # ValueError, AttributeError: not a real file (a test's StringIO)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return _EXIT["PIPE"]


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, to end it as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _catch_signals() -> Callable[[], None]:
    """Turn SIGINT, SIGTERM and SIGHUP into exceptions (the first one only: a second signal
    must not interrupt the cleanup). Returns the function that restores the old handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # only the main thread may set handlers (main() run by a test)
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    numbers = [getattr(signal, name) for name in names if hasattr(signal, name)]
    previous = {number: signal.getsignal(number) for number in numbers}

    def handle(signum: int, frame: object) -> None:
        for number in numbers:
            signal.signal(number, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Signalled(signum)

    for number in numbers:
        if previous[number] is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(number, handle)

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    return restore


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python pop3lite.py HOST USER [ACTION]`` (``--help`` tells the rest).

    Returns the exit status: 0 on success, else one of those _EXIT_STATUSES lists (and
    ``--help`` shows), such as 3 when the login was refused.
    """
    global _quiet
    restore = _catch_signals()
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:  # wherever it came: parsing, a prompt, the cleanup
        _quiet = False
        if isinstance(exc, _Signalled):
            import signal

            name = signal.Signals(exc.signum).name
            _say(f"stopped by {name}; no QUIT was sent, so nothing was deleted")
            return 128 + exc.signum
        _say("interrupted; no QUIT was sent, so nothing was deleted")
        return _EXIT["INTERRUPTED"]
    finally:
        _quiet = False
        restore()


def _main(argv: list[str] | None) -> int:
    global _quiet
    import warnings

    try:
        o = _parse_command_line(argv)
    except SystemExit as exc:  # argparse has printed the help, the version or the error
        return exc.code if isinstance(exc.code, int) else _EXIT["USAGE"]
    run = _Run(o)
    if o.verbose:  # logging is imported only for -v: it costs a cron run 5 ms otherwise
        import logging

        log = logging.getLogger("pop3lite")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        level = log.level
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    _quiet = o.quiet
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", SizeMismatchWarning)
                warnings.showwarning = _show_warning
                status = _demo(run) if o.demo else _session(run)
                sys.stdout.flush()  # a closed pipe is found here, not at the interpreter's exit
                return status
        finally:
            _quiet = False  # from here on only errors are said, and they always are
    except _CommandLineError as exc:
        _say(str(exc))
        return exc.status
    except Error as exc:
        status, message = _failure(exc, run)
        _say(message)
        return status
    except ValueError as exc:  # a caller mistake the client caught before sending anything
        _say(str(exc))
        return _EXIT["USAGE"]
    except BrokenPipeError:  # stdout's reader is gone (`| head`): nothing to say, to no one
        return _stdout_closed()
    except OSError as exc:
        _say(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return _EXIT["LOCAL"]
    finally:
        if o.verbose:
            log.removeHandler(handler)
            log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
