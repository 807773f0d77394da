"""A fake POP3 server for tests and demonstrations: RFC 1939 done right, plus faults on demand.

By default it replays the OperaMail session of the project's seed (an InterChange POP3 server of
2002, user ``hogehoge``, password ``fugafuga``, two Japanese newsletters)::

    with FakeServer() as server:                  # 127.0.0.1, a free port, serving in a thread
        pop = poplib.POP3(server.host, server.port, timeout=5)
        pop.user("hogehoge"); pop.pass_("fugafuga")
        assert pop.stat() == (2, 10180)
    # leaving the block shuts the server down and re-raises the first error a session hit

API (everything else is private):

``FakeServer(preset="operamail", *, host="127.0.0.1", port=0, users=None, capabilities=None,
tls=None, faults=(), script=None, idle_timeout=600.0, max_sessions=50, oauth_token=None,
greeting=None, keep_transcripts=True, replay=None, utf8_downconvert=False, oauth2=None)``
    ``preset``: ``"operamail"`` (the seed: no CAPA, USER/PASS/APOP, fixed greeting timestamp) or
    ``"rfc"`` (a modern server: full CAPA and SASL, a fresh timestamp per connection, user
    ``hogehoge``/``fugafuga`` with three messages, one of them with lines that start with ".").
    ``users``: ``{name: Maildrop}``, replaces the preset's (the objects are used, not copied).
    ``capabilities``: CAPA lines; None keeps the preset's, an empty sequence turns CAPA off (but
    with ``tls="stls"`` CAPA always lists STLS, as RFC 2595 requires). The
    ``SASL`` line also selects the mechanisms AUTH accepts, ``UTF8`` enables the UTF8 command;
    ``STLS`` is added or left out by the server (offered only with ``tls="stls"``, before TLS).
    ``tls``: None, ``"stls"`` (RFC 2595) or ``"implicit"``; the certificate is the embedded one for
    localhost, 127.0.0.1 and ::1, signed by ``CA_PEM``.
    ``faults``: ``Fault`` objects (below). ``script``: a list of ``(expected_command, raw_reply)``
    pairs that replaces the whole protocol (expected None: send without reading; the first pair is
    usually ``(None, b"+OK hi\\r\\n")``); a different command fails the test at exit.
    ``idle_timeout``: seconds of client silence before autologout (the connection closes without
    a reply and without UPDATE, RFC 1939 section 3). ``max_sessions``: concurrent connections;
    more get ``-ERR [SYS/TEMP]`` and are closed. ``oauth_token``: the bearer token that XOAUTH2
    and OAUTHBEARER accept (preset "rfc": ``"fake-oauth-token"``). ``greeting``: the text after
    ``+OK``; ``{timestamp}`` in it becomes a fresh APOP timestamp. ``keep_transcripts``: False
    forgets each connection's transcript when it ends (a long-running server; the log still
    shows it). ``replay``: a recording to serve instead of a preset (below).
    ``utf8_downconvert``: as Courier, when UTF8 is offered and the client did not send it, a
    message with 8-bit header bytes is served (RETR, TOP) as a "Cannot display Unicode content"
    multipart with the original inside as ``message/global`` (RFC 6856 section 2.1, RFC 6532);
    LIST and STAT count the original, as Courier does; after UTF8 the original is served.
    ``oauth2``: a fake OAuth2 authorization server to run beside it (below, "OAuth2").

Attributes and methods: ``host``, ``port``, ``address`` (``(host, port)``), ``maildrops`` (name ->
``Maildrop``; ``.messages`` shows the current contents), ``transcripts`` (one list of ``"C: ..."``
/ ``"S: ..."`` strings per connection, in order of connection; each line is recorded before it is
written; passwords and SASL responses appear as ``****``), ``errors`` (exceptions sessions hit),
``start()``, ``stop()`` (stop serving, end every session; errors stay in ``errors``),
``close()`` (stop, then raise the first error), ``wait_idle(timeout=5.0)``,
``ssl_context_for_clients()``,
context manager. For assertions: ``sessions`` (a ``SessionLog`` per connection: ``number``,
``transcript``, ``commands``, ``tls``, ``login`` ("USER", "APOP" or "AUTH"), ``mechanism`` (of
AUTH), ``user``, ``state`` (the last: AUTHORIZATION, TRANSACTION, or UPDATE after QUIT), ``quit``,
``closed``, ``deleted`` (the messages its QUIT removed)), ``commands`` (every session's command
lines) and ``deleted`` (every message QUIT removed); ``mismatches`` (replay, below).

Record and replay. ``Recorder(upstream="HOST[:PORT]", out=PATH, *, tls=None, host="127.0.0.1",
port=0, context=None, headers_only=False, timeout=60.0, overwrite=False)`` is a proxy: a client
connects to its ``address`` in plaintext, the proxy talks to the real server (``tls``:
"implicit", the default on port 995 or with no port; "stls" (the proxy sends STLS), the default
on port 110; "auto", the default on other ports: a plaintext greeting within ``GREETING_WAIT``
seconds means STLS, none means implicit TLS, and the file says which; or "none"; certificates
are verified with ``context`` or the system's CAs) and appends each session to the transcript
file (format: section "Transcript files" below), secrets as ``****``, logging how many client
lines went into it; an existing ``out`` file raises FileExistsError unless ``overwrite``;
``headers_only`` keeps only the header of RETR and TOP messages. ``FakeServer(replay=...)`` (a
file path, transcript text, or ``parse_transcript()``'s sessions) serves a recording:
connection n gets recorded session n (later ones the last); each command gets the next recorded
reply to the same command line, whatever the order or pipelining; USER/PASS, APOP and AUTH are
checked against ``REPLAY_PASSWORD`` (any user name; ``users=`` to choose) and then get the
recorded reply; a command the recording has no
answer for gets ``-ERR`` and a ``ReplayMismatch(session, command, recorded)`` in
``mismatches``. ``OPERAMAIL_RECORDING`` is the seed session the operamail preset is built from.
``transcript_line(direction, data)``, ``parse_transcript(text)`` and ``load_transcript(path)``
(lists of ``RecordedSession(greeting, exchanges)``, each ``Exchange(command, reply)``) read and
write the format.

pytest plugin (``pytest11`` entry point of an installed pop3lite, or ``pytest_plugins =
["fakeserver"]`` in a conftest): fixtures ``pop3_server`` (a started server, preset "rfc",
configured by ``@pytest.mark.pop3_server(preset, **options)``), ``make_pop3_server(preset="rfc",
*, messages=None, maildir=None, mbox=None, eml_dir=None, user=None, password=None, **options)``,
``pop3_oauth2_server`` (preset "rfc" with a FakeOAuth2 of ``OAUTH2_TEST_OPTIONS``: 2-second
access tokens, 0.05-second device polling) and ``pop3_ca_file`` (the test
CA as a file); plain functions, clean under ``-W error``; a relative ``replay`` path is taken
from the test file's folder. When a test fails, the transcripts of its servers (and the
requests of their FakeOAuth2) appear in the report as the section "fakeserver transcript"; an
exception in a session fails the test that was running.

``Maildrop(password, messages=(), *, uids=None)`` with ``.messages``, ``.uids``, ``.add(data,
uid=None)``, and ``Maildrop.from_maildir(path, password)``, ``.from_mbox(...)``,
``.from_eml_dir(...)``. Messages are stored with CRLF line ends and a final CRLF.

``Fault(kind, command=None, value=None, times=None)``: ``command`` None selects every reply the
kind can apply to; a verb (``"RETR"``) selects that command; a full command line
(``"RETR 2"``) only that one; ``"GREETING"`` the greeting. ``times`` limits how many replies it
changes. Every reply passes through one place that chooses and applies its faults.
Kinds (``value`` in brackets):

- transport: ``delay`` [seconds, default 1] before the reply; ``drop`` [N, default 0] closes the
  connection after N bytes of the reply (command None: after N bytes of the whole connection; no
  UPDATE); the transcript shows the cut: the part of a line sent ends in a lone ``\\``, then a
  note of how many octets went out; ``bytewise`` sends one byte per send call.
- format: ``lf`` (LF-only line ends); ``long-line`` [octets, default 2048] (a single-line reply is
  padded, a multi-line reply gets such a first line); ``no-terminator`` (no final ".", then
  hang up); ``unstuffed-dot`` (body lines that start with "." are not dot-stuffed); ``8bit`` (8-bit
  and NUL bytes appended to a single-line reply, or as an extra last line of a multi-line one);
  ``wrong-octets`` [announced count, default size + 1] in ``+OK n octets`` of RETR;
  ``huge-sizes`` [added octets, default 2**32] to the sizes of STAT and LIST.
- response codes (the command is not executed; [text]): ``in-use``, ``login-delay``, ``auth``
  (command None: PASS, APOP and AUTH), ``sys-temp``, ``sys-perm`` (command None: every command).
- session: ``bad-timestamp`` [text, default an unterminated ``<...``] in the greeting;
  ``stls-refused`` (STLS answered -ERR); ``stls-absent`` (STLS neither offered nor accepted);
  ``stls-inject`` [bytes, default ``b"+OK injected before TLS\\r\\n"``] sent in plaintext in the
  same write as STLS's +OK; ``tls-stall`` (after STLS's +OK, or on connect with implicit TLS,
  no handshake: the server waits silently);
  ``raw`` [bytes, command required] the command runs, but these exact bytes are sent instead
  of its reply.

OAuth2 (a fake of Microsoft's and Google's sign-in for POP3, for testing a client's whole
sign-in and refresh offline): ``FakeServer(oauth2=FakeOAuth2(...))`` (``True``: the defaults; a
dict: FakeOAuth2's options) serves ``server.oauth2``, started and stopped with the server (or
alone: ``with FakeOAuth2() as oauth2:``). ``FakeOAuth2(*, client_id="pop3lite-test",
client_secret=None, access_lifetime=3600.0, refresh_lifetime=None, device_interval=1.0,
device_lifetime=600.0, approve_after=None, user=None, faults=(), slow_down_step=5.0,
offline_scope=None, host="127.0.0.1")`` is an authorization server over plain HTTP on a free
loopback port.
Lifetimes and intervals are seconds, fractions allowed (sent as such in ``expires_in`` and
``interval``; whole numbers as integers). ``user``: the account it signs in (default: the
server's first user). ``client_secret``: the registration has one (a confidential client): every
token and device request must carry it, in the body or by HTTP Basic (RFC 6749 section 2.3.1).
``offline_scope``: a scope without which no refresh token is issued (Microsoft's
``"offline_access"``); None: a refresh token with every grant but client credentials.
Attributes: ``base_url``, ``address``, ``token_url`` (``{base}/token``), ``device_url``
(``{base}/devicecode``), ``auth_url`` (``{base}/authorize``), ``default_user``.

- Device grant (RFC 8628): ``POST /devicecode`` (client_id, scope) answers device_code,
  user_code, verification_uri, expires_in, interval, message. ``POST /token`` with grant_type
  ``DEVICE_GRANT`` (``urn:ietf:params:oauth:grant-type:device_code``) answers
  ``authorization_pending`` until the test calls ``approve(user_code=None, user=None)`` (the code
  with that user code, else the latest pending one, else the next one requested) or
  ``deny(user_code=None)`` (then ``access_denied``), or automatically: ``approve_after=N``
  answers N polls pending and the next with tokens, or by hand: the verification_uri
  (``{base}/device``) is a page with a form that approves a user code. A poll sooner than the
  interval after the previous poll's reply gets ``slow_down``, and the interval grows by
  ``slow_down_step`` (RFC 8628 section 3.5 says 5 s); past ``device_lifetime``,
  ``expired_token``; once redeemed, ``invalid_grant``.
- Authorization code with PKCE (RFC 7636) and a loopback redirect (RFC 8252): ``GET
  /authorize`` (client_id, redirect_uri: http to 127.0.0.1, [::1] or localhost, any port;
  response_type=code; scope; state; code_challenge; code_challenge_method=S256, required)
  answers 302 to ``redirect_uri?code=...&state=...`` (errors go there too, with the state, except
  a bad client_id or redirect_uri: 400). ``browse(url, user=None, *, deny=False,
  timeout=5.0)`` is the user's browser: it opens the URL, signs in as ``user``, consents (or
  declines), and follows the redirect to the client's listener. The token request needs the
  same redirect_uri and the code_verifier; a code is good for one request.
- ``refresh_token``: a new access token and a new refresh token (rotation); the spent one is
  refused (``invalid_grant``, AADSTS70000), an expired one (``refresh_lifetime``, or after
  ``expire_refresh_tokens()``) gets ``invalid_grant`` AADSTS700082, a revoked one (``revoke()``)
  AADSTS50173.
- ``client_credentials`` (needs ``client_secret``): an access token without a refresh token,
  good for every user of the server (Microsoft 365's POP.AccessAsApp).

Replies are JSON with ``Cache-Control: no-store``: ``access_token``, ``token_type`` "Bearer",
``expires_in``, ``scope`` (as requested), ``refresh_token``. Errors as Microsoft words them (RFC
6749 section 5.2): ``error``, ``error_description`` ("AADSTS70000: ..." followed by trace id,
correlation id and timestamp lines), ``error_codes``, ``trace_id``, ``correlation_id``,
``timestamp``; status 400, or 401 for ``invalid_client``. Malformed HTTP, a form without
Content-Length (411) or over 64 KiB (413), a parameter given twice, an unknown path (404) or
method all get JSON ``invalid_request`` errors; every other client is served meanwhile.
Faults of the token endpoint: ``faults=[Fault(kind, command=None, value=None, times=None)]``
(or the kind alone as a string), ``kind`` one of ``OAUTH2_FAULT_KINDS``: ``"html"`` (200
text/html, a sign-in page; [bytes]), ``"500"`` (an HTML error page; [bytes]), ``"huge"`` (200
with a body of [octets, default 10 MiB]), ``"silent"`` (read the request, never answer, for
[seconds, default until close()]; close() does not wait for it), ``"slow_down"`` (a device-code
poll answered ``slow_down``). ``command``: a grant type (``"refresh_token"``, ``"device_code"``,
``"authorization_code"``, ``"client_credentials"``) or ``"devicecode"`` (the device authorization
endpoint); None: every token request. ``times`` limits how often it fires.

The POP3 side (XOAUTH2, two-step as Microsoft requires or with an initial response, and
OAUTHBEARER) accepts exactly the unexpired access tokens issued for that user, or by client
credentials (``FakeServer.accepts_token(user, token)``; ``FakeOAuth2.accepts(user, token)``);
the preset's static token is then off unless ``oauth_token=`` is given. A refused token gets the
error challenge, then ``-ERR [AUTH]``. ``expire_access_tokens()`` expires every access token
issued so far. For assertions: ``issued`` (``Issued(grant, user, scope, refresh)`` per token
reply) and ``requests`` (``OAuth2Request(path, grant, error)`` per request, ``error`` the OAuth2
error, ``"fault:KIND"``, or None); tokens, codes and secrets are in neither, nor in any repr,
log or transcript (the fake keeps only their SHA-256). ``errors``: exceptions a request handler
hit (with a FakeServer: its ``errors``).

``CA_PEM``: the test CA; ``ssl.create_default_context(cadata=CA_PEM)`` (or ``client_context()``)
verifies the server. ``OPERAMAIL_MESSAGES`` and ``RFC_MESSAGES``: the presets' messages (bytes).
``FAULT_KINDS``: the kind names.

Command line: ``python fakeserver.py --port 0`` (``--help`` lists the rest); the first line on
stdout is ``HOST:PORT``; Ctrl-C stops it. ``--replay FILE`` serves a recording;
``--record HOST[:PORT] --out FILE [--force] [--tls implicit|stls|none] [--headers-only]`` runs
the recording proxy (``--force`` to overwrite an existing FILE). The banner names the file
``--write-ca`` wrote, and with ``--replay`` the commands the recording answers. ``--oauth2``
runs a FakeOAuth2 beside the server (preset "rfc" by default) and prints ``token-url URL``,
``device-url URL``, ``auth-url URL`` and ``client-id ID`` on the lines after HOST:PORT;
``--oauth2-access-lifetime``, ``--oauth2-refresh-lifetime``,
``--oauth2-interval``, ``--oauth2-approve-after`` (default 1), ``--oauth2-client-id`` and
``--oauth2-client-secret`` set its options.

The module never imports pop3lite: its framing and dot-stuffing are its own, so a bug shared by
both cannot hide.
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import html
import http.server
import itertools
import json
import logging
import mailbox
import os
import re
import secrets
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    cast,
)

if TYPE_CHECKING:
    import argparse

__all__ = [
    "CA_PEM",
    "DEVICE_GRANT",
    "FAULT_KINDS",
    "OAUTH2_FAULT_KINDS",
    "OAUTH2_TEST_OPTIONS",
    "OPERAMAIL_MESSAGES",
    "OPERAMAIL_RECORDING",
    "REPLAY_PASSWORD",
    "RFC_MESSAGES",
    "Exchange",
    "FakeOAuth2",
    "FakeServer",
    "Fault",
    "Issued",
    "Maildrop",
    "OAuth2Request",
    "RecordedSession",
    "Recorder",
    "ReplayMismatch",
    "SessionLog",
    "client_context",
    "load_transcript",
    "main",
    "parse_transcript",
    "transcript_line",
]

logger = logging.getLogger("fakeserver")

# ======================================================================================
# Constants
# ======================================================================================

#: RFC 2449 section 4: a command line is at most 255 octets including the CRLF.
MAX_COMMAND_LINE = 255
#: RFC 5034 section 4 lifts the line limit for SASL responses; OAuth tokens run to a few KiB.
MAX_SASL_LINE = 16384
#: An over-long command line is skipped up to this many octets to stay in step; past it we hang up.
MAX_DISCARD = 65536
#: RFC 1939 section 3: an autologout timer must be at least 10 minutes.
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_MAX_SESSIONS = 50
#: RFC 7677 section 4 recommends at least 4096 iterations for SCRAM-SHA-256.
SCRAM_ITERATIONS = 4096
#: How long a closing connection waits for the client to close its side (avoids a reset).
LINGER_SECONDS = 1.0

OPERAMAIL_TIMESTAMP = "<1BC07518.3C649B3F@operamail.com>"
OAUTH_TOKEN = "fake-oauth-token"

# ======================================================================================
# Test certificates
# ======================================================================================

# BEGIN TEST CERTIFICATES (generated by tools/make_test_certs.sh; do not edit by hand)
CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBuTCCAV6gAwIBAgIILevmvV5PFlUwCgYIKoZIzj0EAwIwPzEXMBUGA1UECgwO
cG9wM2xpdGUgdGVzdHMxJDAiBgNVBAMMG3BvcDNsaXRlIGZha2VzZXJ2ZXIgdGVz
dCBDQTAgFw0yNjExMjYxODA4NDZaGA8yMTI2MTEwMjE4MDg0NlowPzEXMBUGA1UE
CgwOcG9wM2xpdGUgdGVzdHMxJDAiBgNVBAMMG3BvcDNsaXRlIGZha2VzZXJ2ZXIg
dGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABAULBve5Ol/v/DIW0w6a
z5lqrB780cDWs8R4D2Fkb/us9lQEXWN5nFZ5QRIs2ka9hPtRz1bQJwQbG7JhhEWy
VJejQjBAMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQW
BBRw+196RrHDE17fj2/+SE3m7Mn+lzAKBggqhkjOPQQDAgNJADBGAiEA1PEInrVy
kHd6reCiZNBPjXrpxCZPEflxilMGRAOirIwCIQCRcWHzlXHLQ6jlE1jCSGqIDrhZ
ONr5EBoMzXf4h7PX/A==
-----END CERTIFICATE-----
"""
SERVER_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIICCjCCAa+gAwIBAgIII1948E3GG+AwCgYIKoZIzj0EAwIwPzEXMBUGA1UECgwO
cG9wM2xpdGUgdGVzdHMxJDAiBgNVBAMMG3BvcDNsaXRlIGZha2VzZXJ2ZXIgdGVz
dCBDQTAgFw0yNjExMjYxODA4NDdaGA8yMTI2MTEwMjE4MDg0N1owLTEXMBUGA1UE
CgwOcG9wM2xpdGUgdGVzdHMxEjAQBgNVBAMMCWxvY2FsaG9zdDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABC3UwzDvajYaqlaYPEtpnI7heL4a81ESDhjJz12ODk9a
hOpi7oyCPEFGyRhkgVoZOVTKOpQYh2rU9cQ1q2xvvDijgaQwgaEwDAYDVR0TAQH/
BAIwADAOBgNVHQ8BAf8EBAMCBaAwEwYDVR0lBAwwCgYIKwYBBQUHAwEwLAYDVR0R
BCUwI4IJbG9jYWxob3N0hwR/AAABhxAAAAAAAAAAAAAAAAAAAAABMB0GA1UdDgQW
BBRILhXV0BpWbic4UjBXPIuVLQwq/DAfBgNVHSMEGDAWgBRw+196RrHDE17fj2/+
SE3m7Mn+lzAKBggqhkjOPQQDAgNJADBGAiEA+tAmYrWewjpbPqbKsohX3kU3ID5w
bqyLFBdYoYXsQLcCIQDjN6XDhV8XwxgDZCg3fEtPFHuJTLk4d2GKclovthQVdQ==
-----END CERTIFICATE-----
"""
SERVER_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgEwdKuQxAxkXaKCL5
lPe1dpHqTC2IF+ZOYJdKJuWSEqehRANCAAQt1MMw72o2GqpWmDxLaZyO4Xi+GvNR
Eg4Yyc9djg5PWoTqYu6MgjxBRskYZIFaGTlUyjqUGIdq1PXENatsb7w4
-----END PRIVATE KEY-----
"""
# END TEST CERTIFICATES

# ======================================================================================
# Transcript files
# ======================================================================================

# A transcript file holds what crossed the wire, one wire line per file line, so that a person can
# read it and a replay can reproduce every byte:
#
#   "S: " (server) or "C: " (client), then the line without its CRLF. UTF-8 text stands for
#   itself; "\\" is a backslash; "\xHH" is any other byte: C0 and C1 controls (ESC of
#   ISO-2022-JP included), DEL, bytes that are not UTF-8, the Unicode line separators, and a space
#   or tab at the end of a line (so that no editor can strip it). A line that did not end in CRLF
#   keeps its real end in escapes ("\x0a" for a bare LF); a line that had no end at all (cut
#   connection, or a chunk of an endless line) ends in a lone "\". Multi-line replies stay
#   dot-stuffed as sent, so the line "." always ends one. Secrets are "****" (_redact_command).
#   "#" starts a comment line; a line starting with "=" begins the next session (connection).

TRANSCRIPT_HEADER = "# fakeserver transcript (format: fakeserver.py, section Transcript files)"
_ESCAPED_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\\\\\u2028\u2029\ufeff\udc80-\udcff]")
_TRAILING_BLANKS_RE = re.compile(r"[ \t]+\Z")
_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{2}|\\|\Z)")


def _escape_char(found: re.Match[str]) -> str:
    char = found.group(0)
    if char == "\\":
        return "\\\\"
    if "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8 (surrogateescape)
        return "\\x%02x" % (ord(char) - 0xDC00)
    return "".join("\\x%02x" % byte for byte in char.encode("utf-8"))


def transcript_line(direction: str, data: bytes) -> str:
    """One file line for one wire line `data` (with its line end, if it had one)."""
    if data.endswith(b"\r\n"):
        data, end = data[:-2], ""
    elif data.endswith(b"\n"):
        end = ""  # the bare LF stays in the data and is escaped
    else:
        end = "\\"
    text = _ESCAPED_RE.sub(_escape_char, data.decode("utf-8", "surrogateescape"))
    blanks = _TRAILING_BLANKS_RE.search(text)
    if blanks:
        text = text[: blanks.start()] + "".join("\\x%02x" % ord(c) for c in blanks.group(0))
    return "%s:%s%s%s" % (direction, " " if text or end else "", text, end)


def _wire_bytes(text: str) -> bytes:
    """The wire bytes of a transcript line's text (what follows "S: " or "C: ")."""
    parts: list[bytes] = []
    position = 0
    ended = True
    for found in _ESCAPE_RE.finditer(text):
        parts.append(text[position : found.start()].encode("utf-8", "surrogateescape"))
        code = found.group(1)
        if code == "\\":
            parts.append(b"\\")
        elif code:
            parts.append(bytes([int(code[1:], 16)]))
        else:
            ended = False  # the lone "\" at the end: this line had no line end
        position = found.end()
    rest = text[position:]
    if "\\" in rest:
        raise ValueError("a transcript line has a stray backslash: %r" % text)
    parts.append(rest.encode("utf-8"))
    data = b"".join(parts)
    return data if not ended or data.endswith(b"\n") else data + b"\r\n"


class Exchange(NamedTuple):
    """One command and the server's bytes after it (after its last SASL response, for AUTH)."""

    command: str  # as recorded: secrets are "****"
    reply: bytes


class RecordedSession(NamedTuple):
    greeting: bytes
    exchanges: list[Exchange]


def parse_transcript(text: str) -> list[RecordedSession]:
    """The sessions of a transcript file's text (see the format above)."""
    sessions: list[RecordedSession] = []
    greeting: list[bytes] = []
    exchanges: list[Exchange] = []
    command: str | None = None
    reply: list[bytes] = []
    started = False

    def close_exchange() -> None:
        if command is not None:
            exchanges.append(Exchange(command, b"".join(reply)))

    for number, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line  # a file edited on Windows
        if not line or line.startswith("#"):
            continue
        if line.startswith("="):
            if started:
                close_exchange()
                sessions.append(RecordedSession(b"".join(greeting), exchanges))
            greeting, exchanges, command, reply, started = [], [], None, [], True
            continue
        direction, colon, rest = line[:1], line[1:2], line[2:]
        if direction not in ("S", "C") or colon != ":":
            raise ValueError("transcript line %d is not S:, C:, # or =: %r" % (number, line))
        started = True
        rest = rest[1:] if rest.startswith(" ") else rest
        try:
            data = _wire_bytes(rest)
        except ValueError as error:
            raise ValueError("transcript line %d: %s" % (number, error)) from None
        if direction == "S":
            (greeting if command is None else reply).append(data)
            continue
        last = reply[-1] if reply else b""
        if command is not None and command.upper().startswith("AUTH") and last.startswith(b"+ "):
            reply = []  # a SASL response: the exchange goes on
            continue
        close_exchange()
        command, reply = data.rstrip(b"\r\n").decode("utf-8", "surrogateescape"), []
    if started:
        close_exchange()
        sessions.append(RecordedSession(b"".join(greeting), exchanges))
    return sessions


def load_transcript(path: str | Path) -> list[RecordedSession]:
    """The sessions of a transcript file (UTF-8)."""
    return parse_transcript(Path(path).read_text(encoding="utf-8"))


def _redact_command(line: bytes, sasl_response: bool = False) -> bytes:
    """A client line with its secrets replaced by ****: the argument of PASS, APOP's digest,
    AUTH's initial response and every SASL response (RFC 5034: base64 of passwords, proofs,
    OAuth tokens). "*" (the client cancels) is no secret."""
    if sasl_response:
        return line if line in (b"*", b"") else b"****"
    parts = line.split(b" ")
    verb = parts[0].upper()
    if verb == b"PASS":
        return b"PASS ****"
    if verb in (b"APOP", b"AUTH") and len(parts) > 2:
        return b" ".join(parts[:2] + [b"****"])
    return line


def _unstuff(lines: Iterable[bytes]) -> bytes:
    """A message from the body lines of a multi-line reply (RFC 1939 section 3)."""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def _body_lines(reply: bytes) -> list[bytes]:
    """The body lines of a recorded multi-line reply, as sent (without status and ".")."""
    lines = reply.split(b"\r\n")
    if len(lines) < 3 or lines[-2:] != [b".", b""]:
        raise ValueError("not a multi-line reply: %r" % reply[:60])
    return lines[1:-2]


# ======================================================================================
# Mail of the presets
# ======================================================================================

# The OperaMail session of the seed is a recording in the transcript format above, and the
# operamail preset is built from it (greeting, messages, unique ids), so the preset and
# FakeServer(replay=OPERAMAIL_RECORDING) serve the same bytes. It is embedded, not a file beside
# the module, so that a copied fakeserver.py is complete. The seed (a web page) shows the session
# with the messages cut short; tools/operamail_recording.py rebuilds them whole from readable
# Japanese text, with the few repairs the page's lost white space needed, and wrote this text.
OPERAMAIL_RECORDING = r'''# fakeserver transcript (format: fakeserver.py, section Transcript files)
# The OperaMail session of the seed (InterChange POP3 3.62, 2002): user hogehoge, the
# test password fugafuga; the two newsletters whole (the seed cut them short), written by
# tools/operamail_recording.py. The operamail preset and FakeServer(replay=...) serve it.
S: +OK InterChange POP3 Server v3.62 Ready (X-INF-V1) <1BC07518.3C649B3F@operamail.com>
C: CAPA
S: -ERR Unknown command
C: USER hogehoge
S: +OK User hogehoge accepted, send PASS command for password validation
C: PASS ****
S: +OK Password accepted
C: STAT
S: +OK 2 10180
C: LIST
S: +OK 2 messages 10180 octets
S: 1 5954
S: 2 4226
S: .
C: UIDL
S: +OK
S: 1 3C4B82C800000001
S: 2 3C4BC6A100000002
S: .
C: TOP 2 5
S: +OK
S: Received: from platz.jp [210.143.104.205] (adv@csc.ne.jp) by operamail.com; Mon, 21 Jan 2002 02:45:53 -0500
S: Received: from adv (h133-191.tokyu-net.catv.ne.jp [210.149.133.191])
S:     by platz.jp (8.9.3/3.7Wpl201012312) with SMTP id QAA05582
S:     for <muller@operamail.com>; Mon, 21 Jan 2002 16:44:50 +0900
S: Date: Mon, 21 Jan 2002 16:44:50 +0900
S: Message-Id: <200201210744.QAA05582@platz.jp>
S: From: =?ISO-2022-JP?B?Q3liZXIgU3BhY2UgQ29tbXVuaXR5?=<adv@csc.ne.jp>
S: To: muller@operamail.com
S: Subject: =?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI
S:  +?=
S: X-Mailer: Personal_ML11F
S: Reply-To: adv@csc.ne.jp
S: Mime-Version: 1.0
S: Content-Type: text/plain; charset=iso-2022-jp
S:
S: \x1b$B"#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#""\x1b(B
S: Cyber Space Community <CSC\x1b$B$+$i$N$*CN$i$;\x1b(B> powered by RAT Co.,Ltd.
S: \x1b$B"#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#""\x1b(B
S: \x1b$B"(%/%i%$%"%s%H4k6H$+$i$N9-9p$G$9!#0J2<$K<*$h$j>pJs$,$"$j$^$9"(\x1b(B
S:
S: .
C: RETR 1
S: +OK 5954 octets
S: Received: from www2.csc.ne.jp [203.141.151.50] (atmarkit-news-admin@atmarkit.co.jp) by operamail.com; Sun, 20 Jan 2002 21:51:20 -0500
S: Received: from atmarkit-www.atmarkit.co.jp (atmarkit-www.atmarkit.co.jp [211.4.251.193])
S:     by www2.csc.ne.jp (8.11.1/8.11.1) with ESMTP id g0L2ou432332
S:     for <muller@csc.jp>; Mon, 21 Jan 2002 11:50:56 +0900 (JST)
S:     (envelope-from atmarkit-news-admin@atmarkit.co.jp)
S: Received: from atmarkit-www.atmarkit.co.jp (IDENT:root@atmarkit-www.atmarkit.co.jp [211.4.251.193])
S:     by atmarkit-www.atmarkit.co.jp (8.9.3/8.9.3) with ESMTP id HAA21689
S:     for <muller@csc.jp>; Mon, 21 Jan 2002 07:26:05 +0900
S: Message-ID: <-2034930363.1011565565483.JavaMail.root@atmarkit-www.atmarkit.co.jp
S:  >
S: Date: Mon, 21 Jan 2002 07:26:05 +0900 (JST)
S: From: membership@atmarkit.co.jp
S: To: muller@csc.jp
S: Subject: =?iso-2022-jp?B?GyRCIXcbKEJJVBskQj83Q2VCLkpzGyhCIC0gMjA=?=
S:  =?iso-2022-jp?B?MDIvMS8xORskQiEhGyhCMUZEIA==?=
S:  =?iso-2022-jp?B?TGludXgbJEIkRzpuJGs5YjUhRz0laxsoQg==?=
S:  =?iso-2022-jp?B?GyRCITwlPxsoQiAbJEIhTiUkJXMlOSVIITwla0pUIU8bKEI=?=
S: Mime-Version: 1.0
S: Content-Type: text/plain; charset=iso-2022-jp
S: Content-Transfer-Encoding: 7bit
S:
S: \x1b$B(.(,(3(,(3(,(/\x1b(B
S: \x1b$B(-\x1b(B@\x1b$B(-\x1b(BI\x1b$B(-\x1b(BT\x1b$B(-\x1b(B \x1b$B?7CeB.Js\x1b(B (2002/1/19)
S: \x1b$B(1(,(5(,(5(,(0\x1b(B
S: @IT\x1b$B$N?7Ce5-;v$r$*FO$1$7$^$9!#\x1b(B
S:
S: \x1b$B(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,\x1b(B
S: \x1b$B"#\x1b(BLinux Square
S:   1FD Linux\x1b$B$G:n$k9b5!G=%k!<%?!N%$%s%9%H!<%kJT!O\x1b(B
S:   \x1b$B%U%m%C%T!<\x1b(B1\x1b$BKg$G5/F0$9$k\x1b(BLinux\x1b$B$G!";H$o$J$/$J$C$?\x1b(BPC\x1b$B$r%k!<%?$H$7$F\x1b(B
S:   \x1b$B$h$_$,$($i$;$^$9!#:#2s$O%$%s%9%H!<%k$H4pK\\@_Dj$N<j=g$r2r@b$7$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/flinux/special/1fd/1fd02a.html
S:
S: \x1b$B"#\x1b(BWindows Server Insider
S:   Windows 2000 Server\x1b$B$N%0%k!<%W%]%j%7!<$r;H$$$3$J$9!JBh\x1b(B3\x1b$B2s!K\x1b(B
S:   \x1b$B%/%i%$%"%s%H$N%G%9%/%H%C%W4D6-$r0l3g$7$F4IM}$9$kJ}K!$r>R2p$7$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fwin2k/operation/gpolicy03/gpolicy03_01.html
S:
S: \x1b$B"#\x1b(BJava Solution
S:   \x1b$B%5!<%V%l%C%H$H\x1b(BJSP\x1b$B$G:n$k\x1b(BWeb\x1b$B%"%W%j%1!<%7%g%sF~Lg!JA0JT!K\x1b(B
S:   \x1b$B%;%C%7%g%s4IM}$N9M$(J}$H!"%U%)!<%`$NCM$r0BA4$K07$&J}K!$r3X$S$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fjava/rensai/webapp01/webapp01.html
S:
S: \x1b$B"#\x1b(BSecurity & Trust
S:   \x1b$B:#$5$iJ9$1$J$$%U%!%$%"%&%)!<%k$N4pAC\x1b(B
S:   \x1b$B%Q%1%C%H%U%#%k%?%j%s%0$H%"%W%j%1!<%7%g%s%2!<%H%&%'%$$N0c$$$r!"\x1b(B
S:   \x1b$B?^$r;H$C$FJ,$+$j$d$9$/@bL@$7$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fsecurity/special/firewall/firewall01.html
S:
S: \x1b$B"#\x1b(BMaster of IP Network
S:   \x1b$B%M%C%H%o!<%/4IM}<T$N$?$a$N\x1b(BDNS\x1b$B:FF~Lg!JBh\x1b(B2\x1b$B2s!K\x1b(B
S:   \x1b$B%>!<%sE>Aw$N@_Dj$r8+D>$7$F!"ITMW$J>pJs$NO3$($$$rKI$.$^$7$g$&!#\x1b(B
S:   http://www.atmarkit.co.jp/fnetwork/rensai/dns02/dns02.html
S:
S: \x1b$B"#\x1b(BDatabase Expert
S:   PostgreSQL\x1b$B$G;O$a$k%G!<%?%Y!<%9@_7W\x1b(B
S:   \x1b$B@55,2=$N4pK\\$+$i!"%$%s%G%C%/%9$rD%$k>l=j$NA*$SJ}$^$G$r07$$$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fdb/rensai/pgsql01/pgsql01.html
S:
S: \x1b$B"#\x1b(BXML & Web Services
S:   SOAP\x1b$B%a%C%;!<%8$NCf?H$rFI$s$G$_$h$&\x1b(B
S:   Web\x1b$B%5!<%S%9$N8F$S=P$7$G<B:]$KN.$l$k\x1b(BXML\x1b$B$r!"0l9T$:$DDI$$$+$1$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fxml/rensai/soap02/soap02.html
S:
S: \x1b$B"#\x1b(BSystem Insider
S:   \x1b$B%O!<%I%G%#%9%/$NMFNL$O$I$3$^$GA}$($k$N$+\x1b(B
S:   \x1b$B5-O?L)EY$N8~>e$r;Y$($k5;=Q$H!":#8e$N%m!<%I%^%C%W$rE8K>$7$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fsys/zunouhoudan/hdd01/hdd01.html
S:
S: \x1b$B"#2q5D<<$+$i\x1b(B
S:   \x1b$B!V\x1b(BLinux Square\x1b$B!W2q5D<<!'%+!<%M%k\x1b(B2.4\x1b$B$X0\\9T$9$k$H$-$NCm0UE@$O!)\x1b(B
S:   \x1b$B!V\x1b(BJava Solution\x1b$B!W2q5D<<!'\x1b(BTomcat\x1b$B$NJ8;z2=$1$rD>$9$K$O\x1b(B
S:   http://www.atmarkit.co.jp/bbs/
S:
S: \x1b$B"#\x1b(BWeb Site Design
S:   \x1b$B%9%?%$%k%7!<%H$G:n$k!"FI$_$d$9$$%Z!<%8$N%l%$%"%&%H\x1b(B
S:   \x1b$B%F!<%V%k$r;H$o$:$KCJAH$_$r<B8=$9$k%F%/%K%C%/$r>R2p$7$^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fwebdesign/rensai/css02/css02.html
S:
S: \x1b$B"#\x1b(BBusiness Computing
S:   \x1b$BCf7x4k6H$N$?$a$N\x1b(BIT\x1b$BEj;q!"<:GT$7$J$$$?$a$N\x1b(B5\x1b$B$D$N%]%$%s%H\x1b(B
S:   \x1b$BF3F~A0$K3NG'$7$F$*$-$?$$HqMQ$H8z2L$N8+@Q$b$jJ}$r9M$($^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/fbiz/column/invest01/invest01.html
S:
S: \x1b$B(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,\x1b(B
S: \x1b$B"#:#=5$NFC=8\x1b(B
S:   2002\x1b$BG/!"%(%s%8%K%"$,2!$5$($F$*$-$?$$5;=Q%H%l%s%I\x1b(B
S:   \x1b$B%V%m!<%I%P%s%I$NIa5Z!"L5@~\x1b(BLAN\x1b$B!"\x1b(BWeb\x1b$B%5!<%S%9!"$=$7$F%;%-%e%j%F%#!#\x1b(B
S:   \x1b$B3F%U%)!<%i%`$NJT=8<T$,!":#G/CmL\\$9$Y$-5;=Q$r$=$l$>$l$N;kE@$+$i\x1b(B
S:   \x1b$BM=A[$7$^$9!#$"$J$?$NM=A[$HHf$Y$F$_$F$/$@$5$$!#\x1b(B
S:   http://www.atmarkit.co.jp/news/special/trend2002/trend01.html
S:
S: \x1b$B"#%$%Y%s%H>pJs\x1b(B
S:   2\x1b$B7n\x1b(B7\x1b$BF|!JLZ!K!!\x1b(B@IT\x1b$B<g:E%;%_%J!<!V\x1b(BLinux\x1b$B%5!<%P9=C[$N<B:]!W\x1b(B
S:   \x1b$B2q>l!'El5~!&?7=I!!Dj0w!'\x1b(B100\x1b$BL>!J;22CL5NA!";vA0EPO?@)!K\x1b(B
S:   http://www.atmarkit.co.jp/event/
S:
S:   \x1b$B!&:#=5$N%"%/%;%9%i%s%-%s%0$O!"%H%C%W%Z!<%8$+$i$4Mw$$$?$@$1$^$9!#\x1b(B
S:
S:   \x1b$B!&FI<T%"%s%1!<%H$X$N$46(NO$r$*4j$$$$$?$7$^$9!#\x1b(B
S:
S:   \x1b$B!&<!9f$O\x1b(B1\x1b$B7n\x1b(B26\x1b$BF|$KG[?.$NM=Dj$G$9!#\x1b(B
S:
S: \x1b$B"#%P%C%/%J%s%P!<\x1b(B
S:   2002/01/12\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/020112.html
S:   2002/01/05\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/020105.html
S:   2001/12/29\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/011229.html
S:   2001/12/22\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/011222.html
S:   2001/12/15\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/011215.html
S:   2001/12/08\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/011208.html
S:   2001/12/01\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/011201.html
S:   2001/11/24\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/011124.html
S:   2001/11/17\x1b$B9f!!\x1b(Bhttp://www.atmarkit.co.jp/club/backnumber/011117.html
S: --------------------------------------------------------------------------
S: \x1b$B(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,(,\x1b(B
S: \x1b$B$3$N%a!<%k$O!"\x1b(B@IT\x1b$B2q0w$NJ}$K$*Aw$j$7$F$$$^$9!#\x1b(B
S: \x1b$BG[?.$NDd;_$dEPO?FbMF$NJQ99$O!"0J2<$N%Z!<%8$G9T$($^$9!#\x1b(B
S:   http://www.atmarkit.co.jp/club/
S: \x1b$BH/9T!'3t<02q<R%"%C%H%^!<%/!&%"%$%F%#\x1b(B
S: Copyright (c) 2002 atmarkit.co.jp All rights reserved.
S: .
C: RETR 2
S: +OK 4226 octets
S: Received: from platz.jp [210.143.104.205] (adv@csc.ne.jp) by operamail.com; Mon, 21 Jan 2002 02:45:53 -0500
S: Received: from adv (h133-191.tokyu-net.catv.ne.jp [210.149.133.191])
S:     by platz.jp (8.9.3/3.7Wpl201012312) with SMTP id QAA05582
S:     for <muller@operamail.com>; Mon, 21 Jan 2002 16:44:50 +0900
S: Date: Mon, 21 Jan 2002 16:44:50 +0900
S: Message-Id: <200201210744.QAA05582@platz.jp>
S: From: =?ISO-2022-JP?B?Q3liZXIgU3BhY2UgQ29tbXVuaXR5?=<adv@csc.ne.jp>
S: To: muller@operamail.com
S: Subject: =?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI
S:  +?=
S: X-Mailer: Personal_ML11F
S: Reply-To: adv@csc.ne.jp
S: Mime-Version: 1.0
S: Content-Type: text/plain; charset=iso-2022-jp
S:
S: \x1b$B"#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#""\x1b(B
S: Cyber Space Community <CSC\x1b$B$+$i$N$*CN$i$;\x1b(B> powered by RAT Co.,Ltd.
S: \x1b$B"#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#""\x1b(B
S: \x1b$B"(%/%i%$%"%s%H4k6H$+$i$N9-9p$G$9!#0J2<$K<*$h$j>pJs$,$"$j$^$9"(\x1b(B
S:
S: \x1b$B!V#C#S#C$+$i$N<*$h$j$J$*CN$i$;!W\x1b(B<\x1b$B=P2q$$JT\x1b(B>
S:
S: \x1b$B?7$7$$G/$,;O$^$j$^$7$?!#:#G/$3$=?7$7$$Cg4V$r8+$D$1$?$$!"\x1b(B
S: \x1b$B$=$s$J$"$J$?$K$T$C$?$j$N<qL#$N%3%_%e%K%F%#$r$4>R2p$7$^$9!#\x1b(B
S:
S: \x1b$B!z<qL#$NCg4V$,8+$D$+$k!V%[%S!<%j%s%/!W\x1b(B
S:   \x1b$BN99T!"<L??!"NAM}!"2;3Z$J$I!"I4$rD6$($k%F!<%^$N7G<(HD$,$"$j$^$9!#\x1b(B
S:   \x1b$BF1$8<qL#$r;}$DA49q$N2q0w$H!"5$7Z$K%a%C%;!<%8$r8r49$G$-$^$9!#\x1b(B
S:   \x1b$BEPO?$OL5NA!"%a!<%k%"%I%l%9$@$1$G:#$9$0;O$a$i$l$^$9!#\x1b(B
S:
S: \x1b$B!zKh=5Kv$O%*%U2q$r3+:E\x1b(B
S:   \x1b$BEl5~!"Bg:e!"L>8E20!"J!2,$N3FCO$G!"2q0wF1;N$N8rN.2q$r3+$$$F$$$^$9!#\x1b(B
S:   \x1b$B=i$a$F$NJ}$G$b0B?4$7$F;22C$G$-$k$h$&!"%9%?%C%U$,$40FFb$7$^$9!#\x1b(B
S:
S: \x1b$B!z:#$J$iEPO?FCE5$D$-\x1b(B
S:   1\x1b$B7n\x1b(B31\x1b$BF|$^$G$K$4EPO?$NJ}$K$O!"%W%m%U%#!<%kMQ$N<L??;#1F$r\x1b(B
S:   \x1b$BL5NA$G$4MxMQ$$$?$@$1$k%/!<%]%s$r:9$7>e$2$^$9!#\x1b(B
S:
S: \x1b$B"'>\\$7$/$O$3$A$i\x1b(B
S:   http://www.hobbylink.example.jp/csc/
S:
S: \x1b$B"($3$N$*CN$i$;$NFbMF$K4X$9$k$*Ld$$9g$o$;$O!"9-9p<g$XD>@\\$*4j$$$7$^$9!#\x1b(B
S:
S: \x1b$B"#"""#!!$b$&$R$H$D$N<*$h$j>pJs!!"#"""#\x1b(B
S:
S: \x1b$B!z%Q%=%3%s65<<!V$O$8$a$F$N%$%s%?!<%M%C%H!W\x1b(B
S:   \x1b$B%a!<%k$NAw$jJ}$+$i%[!<%`%Z!<%8$N:n$jJ}$^$G!">/?M?t$GCzG+$K65$($^$9!#\x1b(B
S:   \x1b$BJ?F|$NLk$HEZMKF|$N%/%i%9$,$"$j!"$*;E;v5"$j$K$bDL$($^$9!#\x1b(B
S:   \x1b$B:#$J$iBN83%l%C%9%s$,L5NA$G$9!#$*5$7Z$K$*?=$79~$_$/$@$5$$!#\x1b(B
S:
S: \x1b$B!z<u9V@8$N@<\x1b(B
S:   \x1b$B!V<+J,$G%G%8%+%a$N<L??$r%a!<%k$GAw$l$k$h$&$K$J$j$^$7$?!W!J\x1b(B60\x1b$BBeCK@-!K\x1b(B
S:   \x1b$B!V;R$I$b$H0l=o$K%[!<%`%Z!<%8$r:n$C$F$$$^$9!W!J\x1b(B40\x1b$BBe=w@-!K\x1b(B
S:
S: \x1b$B"'$*?=$79~$_!&$*Ld$$9g$o$;\x1b(B
S:   http://www.pc-school.example.jp/csc/
S:   \x1b$BEEOC!'\x1b(B03-0000-0000\x1b$B!J<uIU;~4V!!J?F|\x1b(B10\x1b$B;~$+$i\x1b(B19\x1b$B;~$^$G!K\x1b(B
S:
S:   \x1b$B!&2q0w>pJs$NJQ99$O!"\x1b(BCSC\x1b$B$N%[!<%`%Z!<%8$+$i9T$($^$9!#\x1b(B
S:
S:   \x1b$B!&7HBSEEOC8~$1$N%5!<%S%9$b=`HwCf$G$9!#\x1b(B
S:
S: \x1b$B"#:#8e$N%*%U2q$NM=Dj\x1b(B
S:   1\x1b$B7n\x1b(B26\x1b$BF|!JEZ!K!!El5~!&=BC+2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   1\x1b$B7n\x1b(B27\x1b$BF|!JF|!K!!Bg:e!&G_ED2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B2\x1b$BF|!JEZ!K!!L>8E20!&1I2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B3\x1b$BF|!JF|!K!!J!2,!&E7?@2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B9\x1b$BF|!JEZ!K!!;%KZ!&BgDL2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B10\x1b$BF|!JF|!K!!@gBf!&@DMU2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B16\x1b$BF|!JEZ!K!!El5~!&=BC+2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B17\x1b$BF|!JF|!K!!Bg:e!&G_ED2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B23\x1b$BF|!JEZ!K!!L>8E20!&1I2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   2\x1b$B7n\x1b(B24\x1b$BF|!JF|!K!!J!2,!&E7?@2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B2\x1b$BF|!JEZ!K!!;%KZ!&BgDL2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B3\x1b$BF|!JF|!K!!@gBf!&@DMU2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B9\x1b$BF|!JEZ!K!!El5~!&=BC+2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B10\x1b$BF|!JF|!K!!Bg:e!&G_ED2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B16\x1b$BF|!JEZ!K!!L>8E20!&1I2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B17\x1b$BF|!JF|!K!!J!2,!&E7?@2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B23\x1b$BF|!JEZ!K!!;%KZ!&BgDL2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B24\x1b$BF|!JF|!K!!@gBf!&@DMU2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S:   3\x1b$B7n\x1b(B30\x1b$BF|!JEZ!K!!El5~!&=BC+2q>l!!Dj0w\x1b(B20\x1b$BL>\x1b(B
S: ------------
S: \x1b$B"#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#""\x1b(B
S: CSC (Cyber Space Community) http://www.csc.ne.jp/
S: \x1b$B$3$N%a!<%k$O!"\x1b(BCSC\x1b$B$K$4EPO?$$$?$@$$$?J}$K$*Aw$j$7$F$$$^$9!#\x1b(B
S: \x1b$BG[?.$NDd;_$r$44uK>$NJ}$O!"\x1b(Badv@csc.ne.jp \x1b$B$^$G$4O"Mm$/$@$5$$!#\x1b(B
S: \x1b$B"#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#"""#""\x1b(B
S: .
C: DELE 1
S: +OK message 1 deleted
C: LIST
S: +OK 1 messages (4226 octets)
S: 2 4226
S: .
C: RSET
S: +OK Everything has been reset
C: LIST
S: +OK 2 messages 10180 octets
S: 1 5954
S: 2 4226
S: .
C: QUIT
S: +OK InterChange POP3 Server Signing Off
'''  # noqa: E501 (wire lines, verbatim)


def _from_recording(text: str) -> tuple[str, tuple[bytes, ...], tuple[str, ...]]:
    """The greeting text, messages (RETR n) and unique ids (UIDL) of a recorded session."""
    session = parse_transcript(text)[0]
    replies = {exchange.command: exchange.reply for exchange in reversed(session.exchanges)}
    uids = [line.split(b" ")[1].decode("ascii") for line in _body_lines(replies["UIDL"])]
    messages = tuple(
        _unstuff(_body_lines(replies["RETR %d" % n])) for n in range(1, len(uids) + 1)
    )
    greeting = session.greeting.decode("utf-8").rstrip("\r\n")
    return greeting[len("+OK ") :], messages, tuple(uids)


OPERAMAIL_GREETING, OPERAMAIL_MESSAGES, OPERAMAIL_UIDS = _from_recording(OPERAMAIL_RECORDING)

RFC_MESSAGES = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: hogehoge@example.org\r\n"
    b"Subject: Hello\r\n"
    b"Date: Tue, 01 Apr 2025 10:00:00 +0000\r\n"
    b"Message-ID: <hello.1@example.org>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"\r\n"
    b"this is the first test message.\r\n",
    b"From: Bob Example <bob@example.org>\r\n"
    b"To: hogehoge@example.org\r\n"
    b"Subject: Dots\r\n"
    b"Date: Tue, 01 Apr 2025 11:00:00 +0000\r\n"
    b"Message-ID: <dots.2@example.org>\r\n"
    b"\r\n"
    b"The next lines start with a dot and must survive dot-stuffing:\r\n"
    b".\r\n"
    b"..\r\n"
    b".hidden\r\n"
    b". a dot and a space\r\n"
    b"\r\n"
    b"end\r\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>\r\n"
    b"To: hogehoge@example.org\r\n"
    b"Subject: =?utf-8?b?44GT44KT44Gr44Gh44Gv?=\r\n"
    b"Date: Tue, 01 Apr 2025 12:00:00 +0000\r\n"
    b"Message-ID: <utf8.3@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe, \xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf.\r\n",
)

# ======================================================================================
# Maildrops
# ======================================================================================

_UID_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")  # RFC 1939 section 7: unique-id


def _crlf(data: bytes) -> bytes:
    """Return `data` with CRLF line ends and a final CRLF (unless it is empty)."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class Maildrop:
    """One user's maildrop: a password and messages, shared by all sessions of a server."""

    def __init__(
        self, password: str, messages: Iterable[bytes] = (), *, uids: Iterable[str] | None = None
    ) -> None:
        self.password = password
        self._lock = threading.Lock()
        self._entries: list[tuple[str, bytes]] = []
        self._in_use = False
        uid_list = list(uids) if uids is not None else None
        for index, data in enumerate(messages):
            self.add(data, uid_list[index] if uid_list is not None else None)

    def __repr__(self) -> str:  # no password here
        return "<Maildrop of %d messages>" % len(self._entries)

    @property
    def messages(self) -> list[bytes]:
        """The current messages, in order (a copy)."""
        with self._lock:
            return [data for _, data in self._entries]

    @property
    def uids(self) -> list[str]:
        """The unique ids of the current messages, in order (a copy)."""
        with self._lock:
            return [uid for uid, _ in self._entries]

    def add(self, data: bytes, uid: str | None = None) -> None:
        """Append a message (line ends become CRLF); `uid` defaults to a digest of the content."""
        data = _crlf(bytes(data))
        with self._lock:
            taken = {old for old, _ in self._entries}
            if uid is None:
                base = hashlib.md5(data).hexdigest()
                uid = next(
                    candidate
                    for candidate in itertools.chain(
                        [base], ("%s-%d" % (base, n) for n in itertools.count(2))
                    )
                    if candidate not in taken
                )
            elif not _UID_RE.match(uid) or uid in taken:
                raise ValueError("invalid or duplicate unique id %r" % uid)
            self._entries.append((uid, data))

    # The session side: an exclusive lock while a session is in TRANSACTION state.
    def _acquire(self) -> list[tuple[str, bytes]] | None:
        with self._lock:
            if self._in_use:
                return None
            self._in_use = True
            return list(self._entries)

    def _release(self, expunge: Iterable[str] = ()) -> None:
        gone = set(expunge)
        with self._lock:
            self._entries = [entry for entry in self._entries if entry[0] not in gone]
            self._in_use = False

    @classmethod
    def from_maildir(cls, path: str | Path, password: str) -> Maildrop:
        """The messages of a Maildir (new and cur), ordered by their keys; keys become uids."""
        box = mailbox.Maildir(str(path), factory=None, create=False)
        drop = cls(password)
        for key in sorted(box.keys()):
            drop.add(box.get_bytes(key), key if _UID_RE.match(key) else None)
        return drop

    @classmethod
    def from_mbox(cls, path: str | Path, password: str) -> Maildrop:
        """The messages of an mbox file, in file order, without their "From " lines."""
        box = mailbox.mbox(str(path), factory=None, create=False)
        drop = cls(password)
        try:
            for key in box.iterkeys():
                drop.add(box.get_bytes(key))
        finally:
            box.close()
        return drop

    @classmethod
    def from_eml_dir(cls, path: str | Path, password: str) -> Maildrop:
        """The ``*.eml`` files of a folder, ordered by name; names without ".eml" become uids."""
        if not Path(path).is_dir():
            raise NotADirectoryError("not a folder: %s" % path)
        drop = cls(password)
        for file in sorted(Path(path).glob("*.eml")):
            drop.add(file.read_bytes(), file.stem if _UID_RE.match(file.stem) else None)
        return drop


# ======================================================================================
# Faults
# ======================================================================================


class Fault(NamedTuple):
    """A deviation from the protocol, for client tests (kinds in the module docstring)."""

    kind: str
    command: str | None = None
    value: object = None
    times: int | None = None


_LOGIN_VERBS = frozenset({"PASS", "APOP", "AUTH"})
_CODE_KINDS = {
    "in-use": "IN-USE",
    "login-delay": "LOGIN-DELAY",
    "auth": "AUTH",
    "sys-temp": "SYS/TEMP",
    "sys-perm": "SYS/PERM",
}
_CODE_TEXTS = {
    "in-use": "maildrop already locked by another session",
    "login-delay": "minimum time between logins not yet elapsed",
    "auth": "authentication failed",
    "sys-temp": "temporary system failure, try again later",
    "sys-perm": "permanent system failure",
}
# For command=None: the verbs a kind applies to (None: every reply, greeting included).
_SCOPE: dict[str, frozenset[str] | None] = {
    "delay": None,
    "drop": None,
    "bytewise": None,
    "lf": None,
    "long-line": None,
    "no-terminator": None,
    "unstuffed-dot": None,
    "8bit": None,
    "raw": None,
    "wrong-octets": frozenset({"RETR"}),
    "huge-sizes": frozenset({"STAT", "LIST"}),
    "in-use": _LOGIN_VERBS,
    "login-delay": _LOGIN_VERBS,
    "auth": _LOGIN_VERBS,
    "sys-temp": None,
    "sys-perm": None,
    "bad-timestamp": frozenset({"GREETING"}),
    "stls-refused": frozenset({"STLS"}),
    "stls-absent": frozenset({"STLS", "CAPA"}),
    "stls-inject": frozenset({"STLS"}),
    "tls-stall": frozenset({"STLS", "TLS"}),
}
FAULT_KINDS = frozenset(_SCOPE)
_FORMAT_KINDS = ("delay", "drop", "bytewise", "lf", "long-line", "no-terminator",
                 "unstuffed-dot", "8bit", "raw")


def _check_fault(fault: Fault) -> None:
    if fault.kind not in FAULT_KINDS:
        raise ValueError("unknown fault kind %r" % (fault.kind,))
    if fault.kind == "raw" and (fault.command is None or not isinstance(fault.value, bytes)):
        raise ValueError("a raw fault needs a command and bytes")


def _fault_matches(fault: Fault, verb: str, line: str) -> bool:
    """Whether `fault` selects the reply to `line` (its upper-case `verb`, or "GREETING")."""
    if fault.command is None:
        scope = _SCOPE[fault.kind]
        if scope is None:
            return verb != "GREETING" or fault.kind not in _CODE_KINDS
        return verb in scope
    want_verb, _, want_args = fault.command.strip().partition(" ")
    if want_verb.upper() != verb:
        return False
    return not want_args or line == "%s %s" % (verb, want_args)


# ======================================================================================
# TLS
# ======================================================================================

_server_context: ssl.SSLContext | None = None
_server_context_lock = threading.Lock()


def _tls_server_context() -> ssl.SSLContext:
    """The server's TLS context, built once from the embedded certificate and key."""
    global _server_context
    with _server_context_lock:
        if _server_context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            with tempfile.TemporaryDirectory(prefix="fakeserver-") as folder:
                certfile = os.path.join(folder, "cert.pem")
                keyfile = os.path.join(folder, "key.pem")
                Path(certfile).write_text(SERVER_CERT_PEM + CA_PEM)
                Path(keyfile).write_text(SERVER_KEY_PEM)
                context.load_cert_chain(certfile, keyfile)
            _server_context = context
        return _server_context


def client_context() -> ssl.SSLContext:
    """A client context that trusts only the test CA (hostname checking stays on)."""
    return ssl.create_default_context(cadata=CA_PEM)


# ======================================================================================
# Presets
# ======================================================================================


class _Preset(NamedTuple):
    greeting: str
    voice: Mapping[str, str]
    capabilities: Sequence[str]
    oauth_token: str | None
    make_users: Callable[[], dict[str, Maildrop]]


# Reply texts after "+OK " or "-ERR ". The OperaMail ones the seed shows are verbatim; the rest
# are written in the same voice.
_OPERAMAIL_VOICE = {
    "user": "User {user} accepted, send PASS command for password validation",
    "pass": "Password accepted",
    "apop": "APOP authentication accepted",
    "auth": "Authentication accepted",
    "stat": "{count} {size}",
    "list": "{count} messages {size} octets",
    "list-marked": "{count} messages ({size} octets)",
    "list-one": "{n} {size}",
    "retr": "{size} octets",
    "top": "",
    "uidl": "",
    "uidl-one": "{n} {uid}",
    "dele": "message {n} deleted",
    "rset": "Everything has been reset",
    "noop": "",
    "quit": "InterChange POP3 Server Signing Off",
    "capa": "Capability list follows",
    "stls": "Begin TLS negotiation",
    "utf8": "UTF8 enabled",
    "bad-login": "Invalid user name or password",
    "unknown": "Unknown command",
    "state": "Command not valid in this state",
    "syntax": "Invalid command syntax",
    "no-message": "No such message",
    "deleted": "message {n} already deleted",
    "too-long": "Command line too long",
    "no-user": "send USER command first",
    "no-apop": "APOP not available",
    "no-tls": "TLS not available",
    "tls-active": "TLS already active",
    "mechanism": "Unsupported authentication mechanism",
    "cancelled": "Authentication cancelled",
    "base64": "Invalid base64 data",
    "busy": "Too many sessions, try again later",
    "in-use": "Mailbox is locked by another session",
}
_RFC_VOICE = dict(
    _OPERAMAIL_VOICE,
    user="send PASS",
    **{
        "pass": "maildrop locked and ready",
        "apop": "maildrop locked and ready",
        "auth": "maildrop locked and ready",
        "list": "{count} messages ({size} octets)",
        "rset": "maildrop has {count} messages ({size} octets)",
        "quit": "fakeserver POP3 server signing off",
        "uidl": "unique-id listing follows",
        "top": "top of message follows",
        "unknown": "unknown command",
        "state": "command not valid in this state",
        "syntax": "invalid arguments",
        "no-message": "no such message",
        "bad-login": "invalid user name or password",
    }
)

_RFC_CAPABILITIES = (
    "TOP",
    "USER",
    "UIDL",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "PIPELINING",
    "SASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256 XOAUTH2 OAUTHBEARER",
    "UTF8",
    "EXPIRE NEVER",
    "LOGIN-DELAY 0",
    "IMPLEMENTATION fakeserver",
)

_PRESETS = {
    # InterChange 3.62 (2002) predates wide CAPA support: it answers CAPA with -ERR, as RFC 2449
    # expects of an old server, and it has no AUTH; UIDL and TOP work without being advertised.
    "operamail": _Preset(
        OPERAMAIL_GREETING,
        _OPERAMAIL_VOICE,
        (),
        None,
        lambda: {"hogehoge": Maildrop("fugafuga", OPERAMAIL_MESSAGES, uids=OPERAMAIL_UIDS)},
    ),
    "rfc": _Preset(
        "fakeserver POP3 server ready {timestamp}",
        _RFC_VOICE,
        _RFC_CAPABILITIES,
        OAUTH_TOKEN,
        lambda: {"hogehoge": Maildrop("fugafuga", RFC_MESSAGES)},
    ),
}

# ======================================================================================
# OAuth2 authorization server
# ======================================================================================

# A fake of the sign-in side of Microsoft's and Google's POP3 service: the token, device
# authorization and authorization endpoints of RFC 6749, RFC 8628 and RFC 7636, over plain HTTP on
# a loopback address. FakeOAuth2 holds the state (under one lock) and what a test controls;
# _OAuth2Endpoints, its base, turns each request into its reply as a value (_HttpReply), without
# I/O; _OAuth2Handler is the only code that reads and writes HTTP. Tokens and codes are kept as
# their SHA-256 only, so no repr, log or traceback can show one.

#: A token or device request is a few hundred octets; a larger body is refused (413).
MAX_OAUTH2_BODY = 65536
#: A connection that sends nothing for this long is closed (every read is bounded in time).
OAUTH2_READ_TIMEOUT = 30.0
#: The size of the "huge" fault's body: far more than any token reply (10 MiB).
HUGE_REPLY_SIZE = 10 * 1024 * 1024
#: An authorization code is good for this long (RFC 6749 section 4.1.2: 10 minutes at most).
AUTH_CODE_LIFETIME = 600.0
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
OAUTH2_FAULT_KINDS = frozenset({"html", "500", "huge", "silent", "slow_down"})
_GRANTS = ("refresh_token", "device_code", "authorization_code", "client_credentials")
#: RFC 8628 section 6.1: user codes from 20 consonants, no vowels (no words), no lookalikes.
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
#: RFC 7636 section 4.1: code-verifier = 43*128unreserved.
_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}\Z")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
_INFINITY = float("inf")


class Issued(NamedTuple):
    """Tokens the fake authorization server handed out (``FakeOAuth2.issued``); no secret here."""

    grant: str  # "device_code", "authorization_code", "refresh_token" or "client_credentials"
    user: str | None  # None: client credentials (good for every user of the server)
    scope: str
    refresh: bool  # a (new) refresh token came with the access token


class OAuth2Request(NamedTuple):
    """One request to the fake authorization server (``FakeOAuth2.requests``); no secret here."""

    path: str  # "/token", "/devicecode", "/authorize" or another path asked for
    grant: str  # the short grant type of a token request ("device_code", ...), else ""
    error: str | None  # the OAuth2 error answered, "fault:KIND", or None for success


class _HttpReply(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    location: str | None = None  # for 302
    fault: Fault | None = None  # the token endpoint fault this reply carries out


class _Token(NamedTuple):
    user: str | None  # None: a client-credentials token
    scope: str
    expires: float  # time.monotonic() deadline


class _DeviceCode:
    """A device authorization request (RFC 8628 section 3.2) and how its polling went."""

    __slots__ = ("user_code", "scope", "expires", "interval", "polls", "last", "state", "user")

    def __init__(self, user_code: str, scope: str, expires: float, interval: float) -> None:
        self.user_code = user_code
        self.scope = scope
        self.expires = expires
        self.interval = interval  # grows by slow_down_step with every slow_down
        self.polls = 0
        self.last: float | None = None  # when the previous poll was answered
        self.state = "pending"  # then "approved", "denied" or "used"
        self.user: str | None = None


class _AuthCode(NamedTuple):
    redirect_uri: str
    challenge: str
    scope: str
    user: str
    expires: float


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _seconds(value: float) -> float | int:
    """A lifetime for JSON: an integer when it is one (what providers send), else the fraction."""
    return int(value) if float(value).is_integer() else value


def _json(status: int, fields: Mapping[str, object]) -> _HttpReply:
    return _HttpReply(status, json.dumps(fields).encode())


def _oauth2_error(error: str, description: str = "", code: int | None = None,
                  status: int = 400) -> _HttpReply:
    """An error reply as Microsoft's identity platform words it (RFC 6749 section 5.2 plus the
    AADSTS code, trace and correlation ids in the description, which a client must keep whole)."""
    fields: dict[str, object] = {"error": error}
    if description:
        trace, correlation = secrets.token_hex(16), secrets.token_hex(16)
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        prefix = "AADSTS%d: " % code if code is not None else ""
        fields["error_description"] = "%s%s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\n" \
            "Timestamp: %s" % (prefix, description, trace, correlation, stamp)
        if code is not None:
            fields["error_codes"] = [code]
        fields.update(timestamp=stamp, trace_id=trace, correlation_id=correlation)
    return _json(status, fields)


def _missing(parameter: str, code: int = 900144) -> _HttpReply:
    """A required parameter is missing: invalid_request, or invalid_client for the secret."""
    if code == 900144:
        error, status = "invalid_request", 400
    else:
        error, status = "invalid_client", 401
    return _oauth2_error(error, "The request body must contain the following parameter: '%s'."
                         % parameter, code, status)


def _key_of(form: Mapping[str, str], parameter: str) -> str | _HttpReply:
    """The SHA-256 of a required token or code parameter (the key it is kept under), or the
    reply that says it is missing."""
    value = form.get(parameter, "")
    return _digest(value) if value else _missing(parameter)


def _fault_reply(fault: Fault) -> _HttpReply:
    """What a transport-level fault of the token endpoint sends instead of the reply."""
    if fault.kind == "html":
        page = fault.value if isinstance(fault.value, bytes) else (
            b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form method=post>"
            b"<p>Your session has expired. Please sign in to continue.</p></form></body></html>")
        return _HttpReply(200, page, "text/html; charset=utf-8", fault=fault)
    if fault.kind == "500":
        page = fault.value if isinstance(fault.value, bytes) else (
            b"<html><body><h1>500 Internal Server Error</h1></body></html>")
        return _HttpReply(500, page, "text/html; charset=utf-8", fault=fault)
    return _HttpReply(200, fault=fault)  # "silent" and "huge": the handler carries them out


def _as_oauth2_fault(fault: Fault | str) -> Fault:
    fault = Fault(fault) if isinstance(fault, str) else fault
    if fault.kind not in OAUTH2_FAULT_KINDS:
        raise ValueError("unknown OAuth2 fault kind %r (use one of %s)"
                         % (fault.kind, ", ".join(sorted(OAUTH2_FAULT_KINDS))))
    if fault.command not in (None, "devicecode") + _GRANTS:
        raise ValueError("an OAuth2 fault's command is a grant type or \"devicecode\", not %r"
                         % (fault.command,))
    return fault


def _short_grant(grant_type: str) -> str:
    return "device_code" if grant_type == DEVICE_GRANT else grant_type


def _loopback_redirect(uri: str) -> bool:
    """RFC 8252 section 7.3: a native app's redirect is http to a loopback address, any port.
    Printable ASCII only: it goes back into a Location header as it came."""
    if not re.match(r"[\x21-\x7e]+\Z", uri):
        return False
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port  # raises ValueError for a port out of range
    except ValueError:
        return False
    return (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS and not parts.fragment
            and not parts.username and not parts.password and port != 0)


def _with_query(uri: str, fields: Mapping[str, str]) -> str:
    return uri + ("&" if "?" in uri else "?") + urllib.parse.urlencode(fields)


def _check_oauth2_options(access_lifetime: float, refresh_lifetime: float | None,
                          device_interval: float, device_lifetime: float,
                          approve_after: int | None, slow_down_step: float, host: str) -> None:
    for name, value in (("access_lifetime", access_lifetime),
                        ("device_interval", device_interval),
                        ("device_lifetime", device_lifetime)):
        if not 0 < value < _INFINITY:  # also refuses nan
            raise ValueError("%s must be a positive number of seconds" % name)
    if refresh_lifetime is not None and not 0 < refresh_lifetime < _INFINITY:
        raise ValueError("refresh_lifetime must be a positive number of seconds or None")
    if approve_after is not None and approve_after < 0:
        raise ValueError("approve_after must be 0 or more polls, or None")
    if not 0 <= slow_down_step < _INFINITY:
        raise ValueError("slow_down_step must be 0 or more seconds")
    if host not in _LOOPBACK_HOSTS - {"localhost"}:
        raise ValueError("the fake authorization server listens on a loopback address only")


class _OAuth2Endpoints:
    """What a client sees: each request's answer, from the state FakeOAuth2 keeps (no I/O).
    Part of FakeOAuth2, kept apart from what a test sees and controls."""

    client_id: str
    client_secret: str | None
    access_lifetime: float
    refresh_lifetime: float | None
    device_interval: float
    device_lifetime: float
    approve_after: int | None
    user: str | None
    faults: list[Fault]
    slow_down_step: float
    offline_scope: str | None
    issued: list[Issued]
    requests: list[OAuth2Request]
    _uses: list[int]
    _lock: threading.Lock
    _access: dict[str, _Token]
    _refresh: dict[str, _Token]
    _spent: set[str]
    _revoked: set[str]
    _devices: dict[str, _DeviceCode]
    _codes: dict[str, _AuthCode]
    _used_codes: set[str]
    _next_device: tuple[str, str | None] | None
    _users: Callable[[], Sequence[str]]

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    @property
    def default_user(self) -> str:
        """The account tokens are issued for: ``user``, else the server's first user."""
        if self.user is not None:
            return self.user
        users = self._users()
        return users[0] if users else "hogehoge"

    # ----- inside ------------------------------------------------------------------
    def _take_fault(self, kinds: Sequence[str], command: str) -> Fault | None:
        """The first fault of `kinds` that selects this request (`command`: the short grant
        type, or "devicecode"); it counts against its `times`. A fault without a command
        selects every token request ("slow_down": every device-code poll)."""
        with self._lock:
            for index, fault in enumerate(self.faults):
                wanted = fault.command
                if wanted is None and fault.kind == "slow_down":
                    wanted = "device_code"
                if fault.kind not in kinds or wanted not in (None, command):
                    continue
                if wanted is None and command == "devicecode":
                    continue
                if fault.times is not None and self._uses[index] >= fault.times:
                    continue
                self._uses[index] += 1
                return fault
        return None

    def _note(self, path: str, grant: str, reply: _HttpReply) -> _HttpReply:
        """Log the request (no secret: the error code only) and pass its reply on."""
        error: str | None = None
        if reply.fault is not None:
            error = "fault:" + reply.fault.kind
        elif reply.location is not None:
            error = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(reply.location).query)
                         ).get("error")
        elif reply.status >= 400:
            error = json.loads(reply.body).get("error")
        elif reply.content_type.startswith("text/html") and b"class=refused" in reply.body:
            error = "invalid_request"  # the verification page did not know the code
        with self._lock:
            self.requests.append(OAuth2Request(path, grant, error))
        return reply

    def _issue(self, grant: str, user: str | None, scope: str, refresh: bool) -> _HttpReply:
        """Mint an access token (and a refresh token) and the RFC 6749 section 5.1 reply."""
        if self.offline_scope is not None and self.offline_scope not in scope.split():
            refresh = False  # Microsoft: no refresh token unless offline_access was asked for
        now = time.monotonic()
        access = secrets.token_urlsafe(32)
        fields: dict[str, object] = {
            "token_type": "Bearer", "scope": scope,
            "expires_in": _seconds(self.access_lifetime), "access_token": access}
        with self._lock:
            self._access[_digest(access)] = _Token(user, scope, now + self.access_lifetime)
            if refresh:
                token = secrets.token_urlsafe(48)
                lifetime = self.refresh_lifetime
                expires = _INFINITY if lifetime is None else now + lifetime
                self._refresh[_digest(token)] = _Token(user, scope, expires)
                fields["refresh_token"] = token
            self.issued.append(Issued(grant, user, scope, refresh))
        return _json(200, fields)

    # ----- endpoints ---------------------------------------------------------------
    def _post(self, path: str, form: Mapping[str, str], basic: tuple[str, str] | None
              ) -> _HttpReply:
        if path == "/token":
            grant = _short_grant(form.get("grant_type", ""))
            return self._note(path, grant, self._token(grant, form, basic))
        if path == "/devicecode":
            return self._note(path, "", self._device_authorization(form, basic))
        if path == "/device":
            return self._note(path, "", self._verification_page(form))
        return self._note(path, "", _oauth2_error("invalid_request", "No such endpoint.",
                                                  status=404))

    def _get(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]
             ) -> _HttpReply:
        if path == "/authorize":
            return self._note(path, "", self._authorize(query, headers))
        if path == "/device":
            return self._note(path, "", self._verification_page(None))
        if path in ("/token", "/devicecode"):
            return self._note(path, "", _oauth2_error(
                "invalid_request", "The endpoint only accepts POST requests.", 900561, 405))
        return self._note(path, "", _oauth2_error("invalid_request", "No such endpoint.",
                                                  status=404))

    def _client_error(self, form: Mapping[str, str], basic: tuple[str, str] | None,
                      need_secret: bool) -> _HttpReply | None:
        """RFC 6749 section 2.3.1: the client id (and secret) in the body or in HTTP Basic."""
        client_id, secret = basic if basic is not None else (
            form.get("client_id", ""), form.get("client_secret"))
        if basic is not None and form.get("client_id", client_id) != client_id:
            return _oauth2_error("invalid_request", "Two different client ids were given.",
                                 900144)
        if not client_id:
            return _missing("client_id")
        if client_id != self.client_id:
            return _oauth2_error("invalid_client", "Application with identifier '%s' was not "
                                 "found in the directory." % client_id[:100], 700016, 401)
        if self.client_secret is None and not need_secret:
            return None
        if self.client_secret is None and secret is not None:
            return _oauth2_error("invalid_client", "Invalid client secret provided: this "
                                 "application has no secret.", 7000215, 401)
        if self.client_secret is None or secret is None:
            return _missing("client_assertion' or 'client_secret", 7000218)
        if not hmac.compare_digest(_digest(secret), _digest(self.client_secret)):
            return _oauth2_error("invalid_client", "Invalid client secret provided. Ensure the "
                                 "secret being sent in the request is the client secret value.",
                                 7000215, 401)
        return None

    def _token(self, grant: str, form: Mapping[str, str], basic: tuple[str, str] | None
               ) -> _HttpReply:
        """POST /token (RFC 6749 section 3.2)."""
        fault = self._take_fault(("html", "500", "huge", "silent"), grant)
        if fault is not None:
            return _fault_reply(fault)
        if not grant:
            return _missing("grant_type")
        if grant not in _GRANTS:
            return _oauth2_error("unsupported_grant_type", "The provided value for the input "
                                 "parameter 'grant_type' is not valid.", 70003)
        refused = self._client_error(form, basic, grant == "client_credentials")
        if refused is not None:
            return refused
        if grant == "client_credentials":
            return self._issue(grant, None, form.get("scope", "") or "pop", refresh=False)
        step = {"refresh_token": self._refresh_grant, "device_code": self._device_grant,
                "authorization_code": self._code_grant}[grant]
        return step(form)

    def _refresh_grant(self, form: Mapping[str, str]) -> _HttpReply:
        """RFC 6749 section 6, with rotation: the spent refresh token is refused afterwards."""
        key = _key_of(form, "refresh_token")
        if isinstance(key, _HttpReply):
            return key
        with self._lock:
            granted = self._refresh.get(key)
            if granted is None or key in self._spent:
                problem: str | None = "unknown"
            elif key in self._revoked:
                problem = "revoked"
            elif granted.expires <= time.monotonic():
                problem = "expired"
            else:
                problem = None
                self._spent.add(key)
        if problem == "expired":
            return _oauth2_error("invalid_grant", "The refresh token has expired due to "
                                 "inactivity: it was not used for longer than its lifetime.",
                                 700082)
        if problem == "revoked":
            return _oauth2_error("invalid_grant", "The provided grant has been revoked (the "
                                 "user changed the password or an administrator revoked it).",
                                 50173)
        if problem is not None or granted is None:
            return _oauth2_error("invalid_grant", "The provided value for 'refresh_token' is "
                                 "not valid: it is unknown or has already been used.", 70000)
        return self._issue("refresh_token", granted.user, granted.scope, refresh=True)

    def _device_authorization(self, form: Mapping[str, str], basic: tuple[str, str] | None
                              ) -> _HttpReply:
        """POST /devicecode (RFC 8628 sections 3.1 and 3.2)."""
        fault = self._take_fault(("html", "500", "huge", "silent"), "devicecode")
        if fault is not None:
            return _fault_reply(fault)
        refused = self._client_error(form, basic, need_secret=False)
        if refused is not None:
            return refused
        device_code = secrets.token_urlsafe(32)
        letters = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
        user_code = letters[:4] + "-" + letters[4:]
        entry = _DeviceCode(user_code, form.get("scope", ""),
                            time.monotonic() + self.device_lifetime, self.device_interval)
        with self._lock:
            if self._next_device is not None:  # approve() or deny() came first
                entry.state, entry.user = self._next_device
                self._next_device = None
            self._devices[_digest(device_code)] = entry
        page = self.base_url + "/device"
        return _json(200, {
            "device_code": device_code, "user_code": user_code, "verification_uri": page,
            "expires_in": _seconds(self.device_lifetime),
            "interval": _seconds(self.device_interval),
            "message": "To sign in, open the page %s in a web browser and enter the code %s."
            % (page, user_code)})

    def _device_grant(self, form: Mapping[str, str]) -> _HttpReply:
        """One poll of the device access token request (RFC 8628 sections 3.4 and 3.5)."""
        key = _key_of(form, "device_code")
        if isinstance(key, _HttpReply):
            return key
        slow = self._take_fault(("slow_down",), "device_code") is not None
        with self._lock:
            entry = self._devices.get(key)
            outcome = "unknown" if entry is None else self._poll(entry, slow)
        if outcome == "approved" and entry is not None:
            return self._issue("device_code", entry.user, entry.scope, refresh=True)
        return {
            "unknown": _oauth2_error("invalid_grant", "The provided value for 'device_code' "
                                     "is not valid.", 70000),
            "used": _oauth2_error("invalid_grant", "The device code has already been redeemed "
                                  "for tokens.", 54005),
            "expired": _oauth2_error("expired_token", "The device code has expired: start "
                                     "again with a new device authorization request.", 70019),
            "slow_down": _oauth2_error("slow_down", "Polling too fast: wait longer between "
                                       "requests (RFC 8628 section 3.5)."),
            "pending": _oauth2_error("authorization_pending", "Authorization is pending: the "
                                     "user has not yet entered the code. Continue polling.",
                                     70016),
            "denied": _oauth2_error("access_denied", "The user declined the authorization "
                                    "request.", 65004),
        }[outcome]

    def _poll(self, entry: _DeviceCode, slow: bool) -> str:
        """Account for one poll of `entry` (with the lock held); the outcome's name."""
        now = time.monotonic()
        if entry.state == "used":
            return "used"
        if now >= entry.expires:
            return "expired"
        entry.polls += 1
        # Measured from when the previous poll was answered, so a client that waits `interval`
        # after each reply is never too fast, however late its requests arrive.
        too_fast = entry.last is not None and now < entry.last + entry.interval - 0.001
        entry.last = now
        if slow or too_fast:
            entry.interval += self.slow_down_step  # RFC 8628 section 3.5: for all later polls
            return "slow_down"
        if entry.state == "pending" and self.approve_after is not None \
                and entry.polls > self.approve_after:
            entry.state, entry.user = "approved", self.default_user
        if entry.state == "approved":
            entry.state = "used"
            return "approved"
        return entry.state

    def _verification_page(self, form: Mapping[str, str] | None) -> _HttpReply:
        """The device grant's verification_uri, for a person who tries the fake by hand: GET
        shows a form for the user code, POST approves that code for the default user."""
        text = "Enter the code that the application shows."
        refused = False
        if form is not None:
            code = form.get("user_code", "").strip().upper()
            with self._lock:
                found = [entry for entry in self._devices.values()
                         if entry.state == "pending" and entry.user_code == code]
                if found:
                    found[0].state, found[0].user = "approved", self.default_user
            text = "Approved: the application signs in as %s." % self.default_user
            if not found:
                text, refused = "No device code waits for that code.", True
        page = ("<!DOCTYPE html><html><head><title>fakeserver sign-in</title></head><body>"
                "<p%s>%s</p><form method=post><input name=user_code autofocus> "
                "<button>Approve</button></form></body></html>"
                % (" class=refused" if refused else "", html.escape(text)))
        return _HttpReply(200, page.encode("utf-8"), "text/html; charset=utf-8")

    def _authorize(self, query: Mapping[str, str], headers: Mapping[str, str]) -> _HttpReply:
        """GET /authorize: the user signs in and consents, then goes back to the client
        (RFC 6749 section 4.1.1, RFC 7636 section 4.3, RFC 8252 section 7.3)."""
        if query.get("client_id") != self.client_id:  # section 4.1.2.1: no redirect then
            return _oauth2_error("unauthorized_client", "Application with identifier '%s' was "
                                 "not found." % query.get("client_id", "")[:100], 700016)
        redirect = query.get("redirect_uri", "")
        if not _loopback_redirect(redirect):
            return _oauth2_error("invalid_request", "The redirect URI must be http to a "
                                 "loopback address (RFC 8252 section 7.3).", 50011)
        back = {"state": query["state"]} if "state" in query else {}
        if query.get("response_type") != "code":
            back.update(error="unsupported_response_type")
        elif query.get("code_challenge_method") != "S256" or not re.match(
                r"[A-Za-z0-9_-]{43}\Z", query.get("code_challenge", "")):
            back.update(error="invalid_request",
                        error_description="PKCE with code_challenge_method S256 is required")
        elif headers.get("x-fakeserver-consent") == "deny":
            back.update(error="access_denied", error_description="the user declined")
        else:
            code = secrets.token_urlsafe(32)
            user = urllib.parse.unquote(headers.get("x-fakeserver-user", "")) or self.default_user
            with self._lock:
                self._codes[_digest(code)] = _AuthCode(
                    redirect, query["code_challenge"], query.get("scope", ""), user,
                    time.monotonic() + AUTH_CODE_LIFETIME)
            back.update(code=code)
        return _HttpReply(302, b"", "text/plain", location=_with_query(redirect, back))

    def _code_grant(self, form: Mapping[str, str]) -> _HttpReply:
        """The access token request of RFC 6749 section 4.1.3, checked as RFC 7636 section 4.6
        says. A code is good for one request, even a failed one (section 4.1.2)."""
        key = _key_of(form, "code")
        if isinstance(key, _HttpReply):
            return key
        with self._lock:
            granted = self._codes.get(key)
            used = key in self._used_codes
            self._used_codes.add(key)
        verifier = form.get("code_verifier", "")
        if granted is None:
            return _oauth2_error("invalid_grant", "The provided authorization code is not "
                                 "valid.", 70000)
        if used:
            return _oauth2_error("invalid_grant", "The authorization code has already been "
                                 "redeemed.", 54005)
        if granted.expires <= time.monotonic():
            return _oauth2_error("invalid_grant", "The authorization code has expired.", 70008)
        if form.get("redirect_uri") != granted.redirect_uri:
            return _oauth2_error("invalid_grant", "The redirect_uri does not match the one of "
                                 "the authorization request.", 50148)
        computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if not _VERIFIER_RE.match(verifier) or not hmac.compare_digest(
                computed.rstrip(b"=").decode(), granted.challenge):
            return _oauth2_error("invalid_grant", "The code_verifier does not match the "
                                 "code_challenge of the authorization request.", 501481)
        return self._issue("authorization_code", granted.user, granted.scope, refresh=True)


class FakeOAuth2(_OAuth2Endpoints):
    """A fake OAuth2 authorization server over HTTP (see the module docstring)."""

    def __init__(
        self,
        *,
        client_id: str = "pop3lite-test",
        client_secret: str | None = None,
        access_lifetime: float = 3600.0,
        refresh_lifetime: float | None = None,
        device_interval: float = 1.0,
        device_lifetime: float = 600.0,
        approve_after: int | None = None,
        user: str | None = None,
        faults: Sequence[Fault | str] = (),
        slow_down_step: float = 5.0,
        offline_scope: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        _check_oauth2_options(access_lifetime, refresh_lifetime, device_interval,
                              device_lifetime, approve_after, slow_down_step, host)
        self.client_id = client_id
        self.client_secret = client_secret
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.device_interval = device_interval
        self.device_lifetime = device_lifetime
        self.approve_after = approve_after
        self.user = user
        self.faults = [_as_oauth2_fault(fault) for fault in faults]
        self.slow_down_step = slow_down_step
        self.offline_scope = offline_scope
        self.issued: list[Issued] = []
        self.requests: list[OAuth2Request] = []
        self.errors: list[BaseException] = []  # shared with the FakeServer it is attached to
        self._uses = [0] * len(self.faults)
        self._lock = threading.Lock()
        self._access: dict[str, _Token] = {}  # SHA-256 of the token -> what it grants
        self._refresh: dict[str, _Token] = {}
        self._spent: set[str] = set()  # refresh tokens already exchanged (rotation)
        self._revoked: set[str] = set()
        self._devices: dict[str, _DeviceCode] = {}  # SHA-256 of the device code -> request
        self._codes: dict[str, _AuthCode] = {}  # SHA-256 of the authorization code -> grant
        self._used_codes: set[str] = set()
        self._next_device: tuple[str, str | None] | None = None  # approve()/deny() in advance
        self._users: Callable[[], Sequence[str]] = lambda: ()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._attached = False
        self._http = _OAuth2HTTPServer(self, host)

    def __repr__(self) -> str:  # no token, code or secret here
        return "<FakeOAuth2 %s, client %s, %d issued>" % (
            self.base_url, self.client_id, len(self.issued))

    # ----- public ------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self.address
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    @property
    def address(self) -> tuple[str, int]:
        return str(self._http.server_address[0]), int(self._http.server_address[1])

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    @property
    def device_url(self) -> str:
        return self.base_url + "/devicecode"

    @property
    def auth_url(self) -> str:
        return self.base_url + "/authorize"

    def start(self) -> FakeOAuth2:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._http.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True,
                name="fakeserver oauth2 %s" % self.base_url)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (a "silent" reply in progress ends too), then raise the first error a
        request handler hit (when not attached to a FakeServer, which raises it instead)."""
        self._stop()
        if self.errors and not self._attached:
            raise self.errors[0]

    def __enter__(self) -> FakeOAuth2:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self._stop()
        if exc_type is None and self.errors and not self._attached:
            raise self.errors[0]

    def approve(self, user_code: str | None = None, user: str | None = None) -> None:
        """Approve a device code as its user would on the verification page: the one with this
        user code, or else the latest one still pending, or else the next one requested."""
        self._decide(user_code, "approved", user if user is not None else self.default_user)

    def deny(self, user_code: str | None = None) -> None:
        """Decline a device code (the client gets access_denied); chosen as by approve()."""
        self._decide(user_code, "denied", None)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now (POP3 refuses it)."""
        with self._lock:
            self._access = {key: token._replace(expires=-_INFINITY)
                            for key, token in self._access.items()}

    def expire_refresh_tokens(self) -> None:
        """Every refresh token issued so far expires now: the next refresh gets invalid_grant
        with AADSTS700082, as after Microsoft's 90 days of inactivity."""
        with self._lock:
            self._refresh = {key: token._replace(expires=-_INFINITY)
                             for key, token in self._refresh.items()}

    def revoke(self) -> None:
        """Revoke every token issued so far (a changed password, an admin's revocation): access
        tokens are refused by POP3, refresh tokens get invalid_grant (AADSTS50173)."""
        with self._lock:
            self._revoked.update(self._refresh)
            self._access.clear()

    def accepts(self, user: str, token: str) -> bool:
        """Whether `token` is an unexpired access token issued for `user` (or by client
        credentials, then for any user; the caller checks that the user exists)."""
        with self._lock:
            granted = self._access.get(_digest(token))
        if granted is None or granted.expires <= time.monotonic():
            return False
        return granted.user is None or granted.user == user

    # ----- the user's browser ------------------------------------------------------
    def browse(self, url: str, user: str | None = None, *, deny: bool = False,
               timeout: float = 5.0) -> None:
        """Act as the user's browser in the authorization-code grant: open `url` (this
        server's authorization URL; sign in as `user`, consent unless `deny`), then follow
        the redirect to the client's loopback redirect_uri. ValueError if the authorization
        endpoint refuses (no redirect: a bad client id or redirect_uri)."""
        parts = urllib.parse.urlsplit(url)
        if (parts.scheme, parts.netloc, parts.path) != (
                "http", urllib.parse.urlsplit(self.base_url).netloc, "/authorize"):
            raise ValueError("not this server's authorization URL")
        headers = {"X-Fakeserver-User": urllib.parse.quote(user or self.default_user)}
        if deny:
            headers["X-Fakeserver-Consent"] = "deny"
        status, location, body = _http_get(url, headers, timeout)
        if status != 302 or location is None or not _loopback_redirect(location):
            raise ValueError("the authorization endpoint refused (HTTP %d): %s"
                             % (status, body[:300].decode("utf-8", "replace")))
        _http_get(location, {}, timeout)  # the client's listener; its page is not needed

    # ----- inside ------------------------------------------------------------------
    def _attach(self, users: Callable[[], Sequence[str]], errors: list[BaseException]) -> None:
        """Serve beside a FakeServer: its users are the default account, errors go to its list."""
        self._users = users
        self.errors = errors
        self._attached = True

    def _stop(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()  # ends "silent" replies
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        self._http.abort_all()
        self._http.server_close()  # joins the request threads

    def _decide(self, user_code: str | None, state: str, user: str | None) -> None:
        with self._lock:
            pending = [d for d in self._devices.values() if d.state == "pending"
                       and (user_code is None or d.user_code == user_code)]
            if not pending:
                if user_code is not None:
                    raise ValueError("no pending device code with that user code")
                self._next_device = (state, user)
                return
            pending[-1].state, pending[-1].user = state, user


def _http_get(url: str, headers: Mapping[str, str], timeout: float
              ) -> tuple[int, str | None, bytes]:
    """GET a URL on a loopback address: status, Location and (up to 64 KiB of) the body."""
    parts = urllib.parse.urlsplit(url)
    connection = HTTPConnection(parts.hostname or "", parts.port or 80,
                                            timeout=timeout)
    try:
        connection.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/",
                                                           parts.query, "")), headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Location"), response.read(MAX_OAUTH2_BODY)
    finally:
        connection.close()


def _parse_form(text: str) -> dict[str, str] | None:
    """Form fields (RFC 6749 appendix B), or None: bad encoding, or a field given twice
    (sections 3.1 and 3.2: parameters MUST NOT be included more than once)."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict")
    except ValueError:  # UnicodeDecodeError: percent-encoded bytes that are not UTF-8
        return None
    form = dict(pairs)
    return form if len(form) == len(pairs) else None


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """Client id and secret from HTTP Basic (RFC 6749 section 2.3.1: each form-encoded first);
    ValueError for a malformed header."""
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("only HTTP Basic client authentication is supported")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("malformed HTTP Basic credentials") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise ValueError("malformed HTTP Basic credentials")
    return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)


class _OAuth2Handler(http.server.BaseHTTPRequestHandler):
    """One HTTP connection to the fake authorization server: the section's only I/O."""

    server: _OAuth2HTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection
    default_request_version = "HTTP/1.0"  # every reply has a status line, even to garbage
    server_version = "fakeserver-oauth2"
    sys_version = ""
    timeout = OAUTH2_READ_TIMEOUT

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            pass  # the client went away or went silent: not our bug

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        parts = urllib.parse.urlsplit(self.path)
        query = _parse_form(parts.query)
        if query is None:
            return self.answer(_oauth2_error("invalid_request", "Malformed query string."))
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.answer(self.server.oauth2._get(parts.path, query, headers))

    def do_POST(self) -> None:  # noqa: N802
        form = self.read_form()
        if isinstance(form, _HttpReply):
            return self.answer(form)
        try:
            basic = _basic_credentials(self.headers.get("Authorization"))
        except ValueError as error:
            return self.answer(_oauth2_error("invalid_client", str(error), status=401))
        path = urllib.parse.urlsplit(self.path).path
        self.answer(self.server.oauth2._post(path, form, basic))

    def read_form(self) -> dict[str, str] | _HttpReply:
        """The form body, read within MAX_OAUTH2_BODY, or the error reply."""
        length = self.headers.get("Content-Length", "")
        if "Transfer-Encoding" in self.headers or not length.isdigit():
            return _oauth2_error("invalid_request", "A Content-Length is required.", status=411)
        if int(length) > MAX_OAUTH2_BODY:
            return _oauth2_error("invalid_request", "The request body is too large.",
                                 status=413)
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            raise ConnectionResetError("the client closed in the middle of its request")
        if self.headers.get_content_type() != "application/x-www-form-urlencoded":
            return _oauth2_error("invalid_request", "The body must be "
                                 "application/x-www-form-urlencoded.", 900144)
        try:
            form = _parse_form(body.decode("ascii"))
        except UnicodeDecodeError:
            form = None
        if form is None:
            return _oauth2_error("invalid_request", "Malformed form body (bad encoding, or a "
                                 "parameter given more than once).", 900144)
        return form

    def answer(self, reply: _HttpReply) -> None:
        """Send a reply, or carry out its fault ("silent": say nothing; "huge": 10 MiB)."""
        fault = reply.fault
        if fault is not None and fault.kind == "silent":
            seconds = float(cast(float, fault.value)) if fault.value is not None else None
            self.server.oauth2._stopping.wait(seconds)  # until shutdown, or `value` seconds
            self.close_connection = True
            return
        huge = fault is not None and fault.kind == "huge"
        size = len(reply.body)
        if fault is not None and huge:
            size = int(cast(int, fault.value or HUGE_REPLY_SIZE))
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Cache-Control", "no-store")  # RFC 6749 section 5.1
        self.send_header("Pragma", "no-cache")
        if reply.location is not None:
            self.send_header("Location", reply.location)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if not huge:
            self.wfile.write(reply.body)
            return
        start = b'{"access_token": "'
        self.wfile.write(start)
        left = size - len(start)
        while left > 0:
            chunk = min(left, 65536)
            self.wfile.write(b"A" * chunk)
            left -= chunk

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """http.server's own errors (a malformed request line, headers too long, an unknown
        method) as JSON, like every other error here."""
        self.close_connection = True
        self.answer(_oauth2_error("invalid_request", message or "Bad request.", status=code))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path only: a query string carries state and PKCE values.
        path = urllib.parse.urlsplit(getattr(self, "path", "")).path
        logger.debug("oauth2: %s %s -> %s", getattr(self, "command", ""), path[:100], code)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("oauth2: %s", format.split("%")[0].strip())  # arguments may hold secrets


def _shut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _OAuth2HTTPServer(http.server.ThreadingHTTPServer):
    """The HTTP side of a FakeOAuth2: threaded, on a loopback address, every connection
    closable from outside so that shutdown never waits for a client."""

    # Request threads are joined by server_close() (block_on_close), after abort_all().
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128

    def __init__(self, oauth2: FakeOAuth2, host: str) -> None:
        self.oauth2 = oauth2
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._aborted = False
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, 0), _OAuth2Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's name (a DNS query); nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", int(self.server_address[1])

    def track(self, connection: socket.socket, is_open: bool) -> None:
        with self._open_lock:
            if not is_open:
                self._open.discard(connection)
                return
            self._open.add(connection)
            aborted = self._aborted
        if aborted:  # accepted just before shutdown: abort_all() did not see it
            _shut(connection)

    def abort_all(self) -> None:
        """Unblock every request thread (shutdown): its reads and writes fail at once."""
        with self._open_lock:
            self._aborted = True
            connections = list(self._open)
        for connection in connections:
            _shut(connection)

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, OSError):
            logger.error("oauth2 request failed: %r", error)
            self.oauth2.errors.append(error)


# ======================================================================================
# Sessions
# ======================================================================================
#
# A connection is a _Session (the socket, the transcript, reading and writing), which hands each
# command to its protocol: _Pop3 (the POP3 states and commands) or, for a recording, _ReplayedPop3
# (recorded answers); AUTH goes on to _Sasl. A script (FakeServer(script=...)) replaces the
# protocol with _run_script (its raw replies take no faults). Faults act in one place,
# _Faults.reply(), through which every other reply passes; _Session.send(), the one path for
# the bytes the server sends, only carries out the transport faults chosen there.


class _HangUp(Exception):
    """End the session now (no UPDATE)."""


def _hang_up() -> None:
    raise _HangUp()


class _SaslFailure(Exception):
    """End an AUTH exchange with -ERR and this reply text."""


class _LineTooLong(Exception):
    """A command line over the limit was read and skipped."""


class _Reply:
    """One reply: a status line and, for multi-line replies, the body lines (not yet stuffed)."""

    __slots__ = ("status", "body", "after", "extra", "raw", "sized", "timestamp", "end",
                 "stuffed", "terminated")

    def __init__(
        self, status: bytes, body: list[bytes] | None = None, raw: bytes | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.raw = raw  # a recorded reply: these exact bytes replace status and body
        self.after: Callable[[], None] | None = None  # runs once the reply is sent
        self.extra = b""  # raw bytes sent right after the reply, in the same send
        # The same reply with every size it announces passed through a function (STAT, LIST,
        # RETR), for the size faults.
        self.sized: Callable[[Callable[[int], int]], _Reply] | None = None
        self.timestamp: str | None = None  # a greeting's APOP timestamp
        self.end = b"\r\n"  # the line end (faults: "lf")
        self.stuffed = True  # body lines that start with "." get another (RFC 1939 section 3)
        self.terminated = True  # a multi-line reply ends with "."

    def wire(self) -> bytes:
        """The bytes to send."""
        if self.raw is not None:
            return self.raw
        lines = [self.status]
        if self.body is not None:
            if self.stuffed:
                lines += [b"." + line if line.startswith(b".") else line for line in self.body]
            else:
                lines += self.body
            if self.terminated:
                lines.append(b".")
        return b"".join(line + self.end for line in lines) + self.extra


_TRANSPORT_KINDS = ("delay", "drop", "bytewise")
_SHAPE_KINDS = ("lf", "long-line", "8bit", "raw")
_MULTI_LINE_KINDS = ("no-terminator", "unstuffed-dot")
_SIZE_KINDS = {"STAT": "huge-sizes", "LIST": "huge-sizes", "RETR": "wrong-octets"}


class _Faults:
    """A server's faults: which ones select a reply (each use counts against its ``times``) and
    what they do to it. Every reply passes through reply(), the one place where faults act."""

    def __init__(self, faults: Sequence[Fault]) -> None:
        for fault in faults:
            _check_fault(fault)
        self.faults = list(faults)
        self._uses = [0] * len(self.faults)
        self._lock = threading.Lock()

    def take(self, kinds: Iterable[str], verb: str, line: str = "") -> list[Fault]:
        """The faults of `kinds` that select this reply; each use counts against its `times`."""
        wanted = frozenset(kinds)
        found = []
        with self._lock:
            for index, fault in enumerate(self.faults):
                if fault.kind not in wanted or not _fault_matches(fault, verb, line):
                    continue
                if fault.times is not None and self._uses[index] >= fault.times:
                    continue
                self._uses[index] += 1
                found.append(fault)
        return found

    def reply(self, session: _Session, verb: str, line: str,
              produce: Callable[[], _Reply]) -> _Reply:
        """The reply to `line` (`verb` "GREETING" for the greeting, "TLS" for the implicit TLS
        handshake) with its faults applied. A response-code fault answers instead of the
        command, which then does not run; the transport faults are chosen before the command
        runs, so that they shape its SASL challenges too."""
        if verb == "TLS":
            reply = produce()
            if self.take(("tls-stall",), verb, verb):
                reply.after = session.stall_tls
            return reply
        # Response codes answer commands: not the greeting, nor a line too long to be one.
        codes = self.take(_CODE_KINDS, verb, line) if verb not in ("GREETING", "") else []
        session.transport = self.take(_TRANSPORT_KINDS, verb, line)
        if codes:
            text = codes[0].value if codes[0].value is not None else _CODE_TEXTS[codes[0].kind]
            reply = session.pop.err(str(text), _CODE_KINDS[codes[0].kind])
        else:
            reply = produce()
        return self.shape(verb, line, self.change(session, verb, line, reply))

    def change(self, session: _Session, verb: str, line: str, reply: _Reply) -> _Reply:
        """The faults that change what a reply says."""
        if reply.raw is not None:
            return reply
        if verb == "GREETING":
            for fault in self.take(("bad-timestamp",), verb):
                bad = str(fault.value) if fault.value is not None else "<1896.697170952@localhost"
                bad_bytes = bad.encode("utf-8")
                if reply.timestamp:
                    reply.status = reply.status.replace(reply.timestamp.encode(), bad_bytes)
                else:
                    reply.status += b" " + bad_bytes
                reply.timestamp = None
        size_kind = _SIZE_KINDS.get(verb)
        if size_kind is not None and reply.sized is not None:
            faults = self.take((size_kind,), verb, line)
            if faults:
                reply = reply.sized(functools.partial(_resize, faults))
        offered = verb in ("CAPA", "STLS") and session.pop.offers_stls()
        if offered and self.take(("stls-absent",), verb, line):
            return session.pop.without_stls(verb, reply)
        if verb == "STLS" and reply.status.startswith(b"+OK"):
            refused = self.take(("stls-refused",), verb, line)
            if refused:
                voice = session.server.voice
                return session.pop.err(str(refused[0].value or voice["no-tls"]))
            for fault in self.take(("stls-inject",), verb, line):
                data = fault.value
                reply.extra = data if isinstance(data, bytes) else b"+OK injected before TLS\r\n"
            if self.take(("tls-stall",), verb, line):
                reply.after = session.stall_tls
        return reply

    def shape(self, verb: str, line: str, reply: _Reply) -> _Reply:
        """The faults that change how a reply is framed."""
        multi = reply.body is not None
        found = self.take(_SHAPE_KINDS + (_MULTI_LINE_KINDS if multi else ()), verb, line)
        raw = [fault for fault in found if fault.kind == "raw"]
        if raw:
            reply.raw = cast(bytes, raw[0].value)  # the command ran; these bytes are its reply
        if reply.raw is not None:
            return reply
        for fault in found:
            if fault.kind == "long-line":
                width = int(cast(int, fault.value or 2048))
                if reply.body is None:
                    reply.status += b" " + b"x" * max(0, width - len(reply.status) - 1)
                else:
                    reply.body = [b"x" * width] + reply.body
            elif fault.kind == "8bit":
                if reply.body is None:
                    reply.status += b" 8bit:\xe9\xff\x80 nul:\x00"
                else:
                    reply.body = reply.body + [b"8bit:\xe9\xff\x80 nul:\x00"]
            elif fault.kind == "lf":
                reply.end = b"\n"
            elif fault.kind == "unstuffed-dot":
                reply.stuffed = False
            elif fault.kind == "no-terminator":
                reply.terminated = False
                reply.after = _hang_up
        return reply

    @staticmethod
    def limit(transport: Sequence[Fault], sent: int) -> int | None:
        """How many octets of the next write the drop faults let through (None: all);
        `sent` is what the connection sent before."""
        limit: int | None = None
        for fault in transport:
            if fault.kind == "drop":
                budget = int(cast(int, fault.value or 0))
                if fault.command is None:  # N octets of the whole connection
                    budget -= sent
                limit = max(0, budget if limit is None else min(limit, budget))
        return limit

    @staticmethod
    def deliver(sock: socket.socket, data: bytes, transport: Sequence[Fault]) -> None:
        """Send `data` after the delays, one byte per send with "bytewise"."""
        for fault in transport:
            if fault.kind == "delay":
                time.sleep(float(cast(float, fault.value if fault.value is not None else 1.0)))
        if any(fault.kind == "bytewise" for fault in transport):
            for index in range(len(data)):
                sock.sendall(data[index : index + 1])
        else:
            sock.sendall(data)


def _resize(faults: Sequence[Fault], size: int) -> int:
    """An announced size after the size faults ("huge-sizes", "wrong-octets")."""
    for fault in faults:
        if fault.kind == "huge-sizes":
            size += int(cast(int, fault.value if fault.value is not None else 2**32))
        else:
            size = int(cast(int, fault.value)) if fault.value is not None else size + 1
    return size


def _show(line: bytes) -> str:
    return line.decode("utf-8", "backslashreplace")


def _for_terminal(line: str) -> str:
    """A transcript line for a log: ISO-2022-JP decoded, other control characters escaped."""
    if "\x1b" in line:
        try:
            line = line.encode("ascii").decode("iso2022_jp")
        except UnicodeError:
            pass
    return re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: "\\x%02x" % ord(m.group(0)), line)


def _b64decode(text: bytes) -> bytes:
    """Strict base64 (RFC 5034 section 4): any non-alphabet character or misplaced "=" fails."""
    if text == b"=":
        return b""
    if len(text) % 4 or not re.match(rb"[A-Za-z0-9+/]*={0,2}\Z", text):
        raise _SaslFailure("base64")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise _SaslFailure("base64") from None


def _scram_name(value: str) -> str:
    """Decode a SCRAM saslname (RFC 5802 section 5.1): "=2C" is ",", "=3D" is "="."""
    if re.search(r"=(?!2C|3D)", value):
        raise _SaslFailure("bad-login")
    return value.replace("=2C", ",").replace("=3D", "=")


class SessionLog:
    """What one connection did, for a test to assert on (``FakeServer.sessions``)."""

    def __init__(self) -> None:
        self.number = 0  # from 1, in order of connection
        self.transcript: list[str] = []  # "C: ..." / "S: ..." lines, secrets as ****
        self.tls = False  # TLS was in use (implicit, or STLS completed)
        self.login: str | None = None  # "USER" (USER/PASS), "APOP" or "AUTH" once logged in
        self.mechanism: str | None = None  # the SASL mechanism of a successful AUTH
        self.user: str | None = None
        self.state = "AUTHORIZATION"  # then TRANSACTION; UPDATE after QUIT in TRANSACTION
        self.quit = False  # the client sent QUIT and got its reply
        self.closed = False  # the connection has ended
        self.deleted: list[bytes] = []  # messages this session's QUIT removed (RFC 1939 UPDATE)

    @property
    def commands(self) -> list[str]:
        """The command lines (and SASL responses) the client sent, secrets as ****."""
        return [line[3:] for line in self.transcript if line.startswith("C: ")]

    def __repr__(self) -> str:
        return "<SessionLog %d: %s, user %r, %d commands>" % (
            self.number, self.state, self.user, len(self.commands)
        )


class ReplayMismatch(NamedTuple):
    """A command a replayed recording had no answer for (it got -ERR)."""

    session: int  # SessionLog.number
    command: str  # as received, secrets as ****
    recorded: tuple[str, ...]  # the commands the recorded session has answers for


class _Session(socketserver.BaseRequestHandler):
    """One connection: its socket, transcript, reading and writing. Each command goes to the
    protocol (``self.pop``), each reply through the server's faults (``_Faults.reply``)."""

    server: FakeServer

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.buffer = bytearray()
        self.log = SessionLog()
        self.transcript = self.log.transcript
        self.tls = False
        self.sent = 0  # octets sent on this connection
        self.transport: list[Fault] = []  # the transport faults of the current reply
        self.serial = 0  # the connection's number, from 1, set by the server
        protocol = _ReplayedPop3 if self.server.recording is not None else _Pop3
        self.pop: _Pop3 = protocol(self)

    # ----- entry point -------------------------------------------------------------
    def handle(self) -> None:
        server = self.server
        server._join(self)
        try:
            self.sock.settimeout(server.idle_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not server._admit(self):
                self.send(b"-ERR [SYS/TEMP] " + server.voice["busy"].encode() + b"\r\n")
                return
            if server.script is not None:
                _run_script(self, server.script)
            else:
                self.run()
        except (_HangUp, OSError):
            pass  # the peer went away, timed out, failed TLS, or a fault hung up: not our bug
        finally:
            self.pop.release()
            self.log.state = self.pop.state
            self.log.closed = True
            server._leave(self)
            self.linger()

    def run(self) -> None:
        if self.server.tls == "implicit":
            handshake = _Reply(b"", raw=b"")  # nothing to send; then the TLS handshake
            handshake.after = self.start_tls
            self.respond("TLS", "", lambda: handshake)
        self.pop.timestamp = self.respond("GREETING", "", self.pop.greeting).timestamp
        while True:
            try:
                raw = self.readline(MAX_COMMAND_LINE)
            except _LineTooLong:
                self.record("C: (a command line over %d octets, skipped)" % MAX_COMMAND_LINE)
                self.respond("", "", lambda: self.pop.err("too-long"))
                continue
            if raw is None:
                return
            text = raw.decode("utf-8", "surrogateescape")
            verb, _, args = text.partition(" ")
            verb = verb.upper()
            self.record("C: " + _show(_redact_command(raw)))
            pending, self.pop.pending_user = self.pop.pending_user, None
            line = verb + (" " + args if args else "")
            answer = functools.partial(self.pop.dispatch, verb, args, line, pending)
            self.respond(verb, line, answer)

    def respond(self, verb: str, line: str, produce: Callable[[], _Reply]) -> _Reply:
        """Answer one command (or greet): the reply through the faults, sent, then its
        follow-up (STLS's handshake, QUIT's hang-up)."""
        reply = self.server.faults.reply(self, verb, line, produce)
        self.send(reply.wire())
        if reply.after is not None:
            reply.after()
        return reply

    def linger(self) -> None:
        """Close our side, let the client close its side (so it sees no reset), then close."""
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                # RFC 8446 section 6.1: end TLS with close_notify, so the client can tell a
                # finished session from a cut one. unwrap() also waits (bounded) for the
                # client's own close_notify, which most POP3 clients never send.
                self.sock.settimeout(LINGER_SECONDS)
                try:
                    self.sock = self.sock.unwrap()
                except (OSError, ValueError):
                    pass
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(LINGER_SECONDS)
            for _ in range(64):
                if not self.sock.recv(4096):
                    break
        except OSError:
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        """Unblock this session's reads from another thread (server shutdown)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def record(self, line: str) -> None:
        self.transcript.append(line)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[%d] %s", self.serial, _for_terminal(line))

    # ----- reading -----------------------------------------------------------------
    def readline(self, limit: int) -> bytes | None:
        """One line without its CRLF (or bare LF), None at the end of input.

        A line longer than `limit` octets (line end included) raises _LineTooLong once its end has
        been read and skipped, so the session stays in step; past MAX_DISCARD octets we hang up.
        Bytes after the line stay buffered for the next command (pipelining)."""
        skipped = 0
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                if skipped or end + 1 > limit:
                    raise _LineTooLong()
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buffer) > limit:
                skipped += len(self.buffer)
                del self.buffer[:]
                if skipped > MAX_DISCARD:
                    raise _HangUp()
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buffer += data

    # ----- writing -----------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Record, then send, server bytes through the current reply's transport faults: every
        byte the server sends passes here. A reply cut by a "drop" fault is recorded as cut:
        the lines sent, the part of a line sent (ending in a lone "\\"), and a note."""
        limit = _Faults.limit(self.transport, self.sent)
        cut = limit is not None and len(data) > limit
        sent = data[:limit] if cut else data
        lines = sent.splitlines(keepends=True)
        for index, line in enumerate(lines):
            open_end = cut and index == len(lines) - 1 and not line.endswith((b"\n", b"\r"))
            self.record("S: " + _show(line.rstrip(b"\r\n")) + ("\\" if open_end else ""))
        if cut:
            self.record("S: (connection dropped by a fault after %d of the reply's %d octets)"
                        % (len(sent), len(data)))
        _Faults.deliver(self.sock, sent, self.transport)
        self.sent += len(sent)
        if cut:
            raise _HangUp()

    def send_line(self, line: bytes) -> None:
        """Send one line outside the reply framing (SASL challenges)."""
        self.send(line + b"\r\n")

    def start_tls(self) -> None:
        """Discard plaintext the client sent after STLS (RFC 2595 section 4), then handshake."""
        del self.buffer[:]
        # Handshake only once self.sock is the TLS socket, so abort() can unblock a client that
        # never starts one (a plaintext client on the implicit TLS port waiting for a greeting).
        self.sock = _tls_server_context().wrap_socket(
            self.sock, server_side=True, do_handshake_on_connect=False
        )
        if self.server._closing:
            raise _HangUp()  # abort() ran while the plain socket was being wrapped
        self.sock.do_handshake()
        self.tls = self.log.tls = True
        self.pop.pending_user = None

    def stall_tls(self) -> None:
        """The "tls-stall" fault: no handshake; wait silently until the client gives up."""
        del self.buffer[:]
        for _ in range(1024):
            if not self.sock.recv(4096):
                break
        raise _HangUp()


class _Pop3:
    """The POP3 states and commands (RFC 1939; CAPA RFC 2449, STLS RFC 2595, UTF8 RFC 6856):
    ``cmd_<verb>`` methods, one reply each. AUTH's exchange is _Sasl's."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.server = session.server
        self.log = session.log
        self.sasl = _Sasl(session, self)
        self.state = "AUTHORIZATION"
        self.utf8 = False
        self.pending_user: str | None = None
        self.timestamp: str | None = None  # the greeting's, for APOP
        self.line = ""  # the current command line
        self.user: str | None = None
        self.maildrop: Maildrop | None = None
        self.entries: list[tuple[str, bytes]] = []
        self.shown: list[bytes] = []  # what RETR sends of each entry (a surrogate or the message)
        self.marked: set[int] = set()

    def ok(self, key: str, body: list[bytes] | None = None, **values: object) -> _Reply:
        text = self.server.voice[key].format(**values)
        return _Reply(b"+OK " + text.encode("utf-8", "surrogateescape") if text else b"+OK", body)

    def err(self, key: str, code: str | None = None, **values: object) -> _Reply:
        """-ERR with the voice's text for `key` (or `key` itself as the text)."""
        voice = self.server.voice
        text = voice[key].format(**values) if key in voice else key
        if code is not None:
            text = "[%s] %s" % (code, text)
        return _Reply(b"-ERR " + text.encode("utf-8", "surrogateescape"))

    def greeting(self) -> _Reply:
        text = self.server.greeting
        if "{timestamp}" in text:
            text = text.replace("{timestamp}", self.server._fresh_timestamp())
        found = re.search(r"<[^<>\s]*@[^<>\s]*>", text)
        reply = _Reply(("+OK " + text).encode("utf-8"))
        reply.timestamp = found.group(0) if found else None
        return reply

    def dispatch(self, verb: str, args: str, line: str, pending: str | None) -> _Reply:
        """The reply to one command (`pending`: the user name of a USER just before)."""
        self.line = line
        method = getattr(self, "cmd_" + verb.lower(), None) if _VERB_RE.match(verb) else None
        if method is None:
            return self.err("unknown")
        states = _STATES.get(verb, ("AUTHORIZATION", "TRANSACTION"))
        if self.state not in states:
            return self.err("state")
        if verb == "PASS":
            return self.cmd_pass(args, pending)
        return cast(Callable[[str], _Reply], method)(args)

    def release(self) -> None:
        """The connection ended: let go of the maildrop (no UPDATE: only QUIT deletes)."""
        if self.maildrop is not None:
            self.maildrop._release()
            self.maildrop = None

    # ----- AUTHORIZATION -----------------------------------------------------------
    def cmd_user(self, args: str) -> _Reply:
        if not args:
            return self.err("syntax")
        self.pending_user = args
        return self.ok("user", user=args)

    def cmd_pass(self, args: str, pending: str | None) -> _Reply:
        if pending is None:
            return self.err("no-user")
        if not self.server._password_ok(pending, args):
            return self.err("bad-login", self.auth_code())
        return self.login(pending, "pass")

    def cmd_apop(self, args: str) -> _Reply:
        user = self.apop_user(args)
        return user if isinstance(user, _Reply) else self.login(user, "apop")

    def apop_user(self, args: str) -> str | _Reply:
        """The user an APOP command proves to be, or the -ERR (RFC 1939 section 7)."""
        parts = args.split(" ")
        if len(parts) != 2 or not parts[0]:
            return self.err("syntax")
        if self.timestamp is None:
            return self.err("no-apop")
        drop = self.server._maildrop(parts[0])
        expected = hashlib.md5((self.timestamp + (drop.password if drop else "")).encode())
        given = parts[1].lower().encode("utf-8", "surrogateescape")
        if drop is None or not hmac.compare_digest(expected.hexdigest().encode(), given):
            return self.err("bad-login", self.auth_code())
        return parts[0]

    def cmd_auth(self, args: str) -> _Reply:
        mechanisms = self.sasl.mechanisms()
        if not mechanisms:
            return self.err("unknown")
        if not args:
            return self.ok("capa", [m.encode() for m in mechanisms])
        user = self.sasl.authenticate(args)
        return user if isinstance(user, _Reply) else self.login(user, "auth")

    def auth_code(self) -> str | None:
        return "AUTH" if "AUTH-RESP-CODE" in self.server.capabilities else None

    def login(self, user: str, key: str) -> _Reply:
        drop = self.server.maildrops[user]
        entries = drop._acquire()
        if entries is None:
            return self.err("in-use", "IN-USE")
        self.user, self.maildrop, self.entries = user, drop, entries
        # RFC 6856 section 2.1: without UTF8, a message with 8-bit headers is not sent as is;
        # with utf8_downconvert the server sends a surrogate, as Courier does.
        convert = self.server.utf8_downconvert and self.offers_utf8() and not self.utf8
        self.shown = [_surrogate(data) if convert else data for _, data in entries]
        self.marked = set()
        self.logged_in(user, key)
        count, size = self.totals()
        return self.ok(key, user=user, count=count, size=size)

    def logged_in(self, user: str, key: str) -> None:
        self.state = self.log.state = "TRANSACTION"
        self.log.user = user
        self.log.login = "USER" if key == "pass" else key.upper()

    def cmd_capa(self, args: str) -> _Reply:
        lines = self.capabilities()
        if not lines:
            return self.err("unknown")
        if args:
            return self.err("syntax")
        return self.ok("capa", [line.encode() for line in lines])

    def capabilities(self) -> list[str]:
        lines = [line for line in self.server.capabilities if line.upper() != "STLS"]
        # RFC 2595 section 4: a server with STLS MUST have CAPA, so clients can find it. Even
        # the OperaMail preset (its 2002 original knew neither) then lists STLS alone.
        if self.offers_stls():
            lines.append("STLS")
        return lines

    def offers_stls(self) -> bool:
        return self.server.tls == "stls" and not self.session.tls

    def without_stls(self, verb: str, reply: _Reply) -> _Reply:
        """The reply of a server that does not offer STLS (the "stls-absent" fault)."""
        if verb == "STLS":
            return self.err("unknown")
        body = [line for line in reply.body or [] if line.upper() != b"STLS"]
        if not body:
            return self.err("unknown")
        reply.body = body
        return reply

    def cmd_stls(self, args: str) -> _Reply:
        if self.session.tls:
            return self.err("tls-active")
        if not self.offers_stls():
            return self.err("unknown")
        if args:
            return self.err("syntax")
        reply = self.ok("stls")
        reply.after = self.session.start_tls
        return reply

    def offers_utf8(self) -> bool:
        return any(line.split(" ")[0].upper() == "UTF8" for line in self.server.capabilities)

    def cmd_utf8(self, args: str) -> _Reply:
        if not self.offers_utf8():
            return self.err("unknown")
        if args:
            return self.err("syntax")
        self.utf8 = True
        return self.ok("utf8")

    def cmd_quit(self, args: str) -> _Reply:
        if args:
            return self.err("syntax")
        if self.state == "TRANSACTION" and self.maildrop is not None:
            # UPDATE: the only place where deletions are applied.
            self.maildrop._release(self.entries[n - 1][0] for n in self.marked)
            self.log.deleted = [self.entries[n - 1][1] for n in sorted(self.marked)]
            self.maildrop = None
            self.state = self.log.state = "UPDATE"
        return self.hang_up_after(self.ok("quit"))

    def hang_up_after(self, reply: _Reply) -> _Reply:
        """The reply to QUIT: once it is sent, the session ends. (The log is updated before the
        reply goes out, so a client that has the reply sees it.)"""
        self.log.quit = True
        reply.after = _hang_up
        return reply

    # ----- TRANSACTION -------------------------------------------------------------
    def totals(self, change: Callable[[int], int] = int) -> tuple[int, int]:
        """The number and the octets of the messages not marked (`change`: a size fault)."""
        # Sizes are the stored messages', also where RETR sends a surrogate (as Courier does).
        sizes = [len(data) for n, (_, data) in enumerate(self.entries, 1) if n not in self.marked]
        return len(sizes), change(sum(sizes))

    def message(self, args: str, count: int) -> int | _Reply:
        """The number in `args` (of `count` arguments) of a message not marked, or the -ERR."""
        parts = args.split()
        if len(parts) != count:
            return self.err("syntax")
        if not re.match(r"[0-9]{1,9}\Z", parts[0]) or not 1 <= int(parts[0]) <= len(self.shown):
            return self.err("no-message")
        n = int(parts[0])
        if n in self.marked:
            return self.err("deleted", n=n)
        return n

    def cmd_stat(self, args: str) -> _Reply:
        if args:
            return self.err("syntax")

        def sized(change: Callable[[int], int]) -> _Reply:
            count, size = self.totals(change)
            return self.ok("stat", count=count, size=size)

        return _sized(sized)

    def cmd_list(self, args: str) -> _Reply:
        n = self.message(args, 1) if args else None
        if isinstance(n, _Reply):
            return n

        def sized(change: Callable[[int], int]) -> _Reply:
            if n is not None:
                return self.ok("list-one", n=n, size=change(len(self.entries[n - 1][1])))
            sizes = [(n, change(len(data))) for n, (_, data) in enumerate(self.entries, 1)
                     if n not in self.marked]
            body = [b"%d %d" % pair for pair in sizes]
            key = "list-marked" if self.marked else "list"
            return self.ok(key, body, count=len(sizes), size=sum(size for _, size in sizes))

        return _sized(sized)

    def cmd_uidl(self, args: str) -> _Reply:
        if args:
            n = self.message(args, 1)
            if isinstance(n, _Reply):
                return n
            return self.ok("uidl-one", n=n, uid=self.entries[n - 1][0])
        body = [
            b"%d %s" % (n, uid.encode())
            for n, (uid, _) in enumerate(self.entries, 1)
            if n not in self.marked
        ]
        return self.ok("uidl", body)

    def cmd_retr(self, args: str) -> _Reply:
        n = self.message(args, 1)
        if isinstance(n, _Reply):
            return n
        data = self.shown[n - 1]
        lines = data[:-2].split(b"\r\n") if data else []
        return _sized(lambda change: self.ok("retr", lines, size=change(len(data))))

    def cmd_top(self, args: str) -> _Reply:
        parts = args.split()
        if len(parts) != 2 or not re.match(r"[0-9]{1,9}\Z", parts[1]):
            return self.err("syntax")
        n = self.message(parts[0], 1)
        if isinstance(n, _Reply):
            return n
        data = self.shown[n - 1]
        lines = data[:-2].split(b"\r\n") if data else []
        header_end = lines.index(b"") + 1 if b"" in lines else len(lines)
        return self.ok("top", lines[: header_end + int(parts[1])])

    def cmd_dele(self, args: str) -> _Reply:
        n = self.message(args, 1)
        if isinstance(n, _Reply):
            return n
        self.marked.add(n)
        return self.ok("dele", n=n)

    def cmd_rset(self, args: str) -> _Reply:
        if args:
            return self.err("syntax")
        self.marked = set()
        count, size = self.totals()
        return self.ok("rset", count=count, size=size)

    def cmd_noop(self, args: str) -> _Reply:
        return self.err("syntax") if args else self.ok("noop")


def _sized(build: Callable[[Callable[[int], int]], _Reply]) -> _Reply:
    """A reply that announces sizes, and can be rebuilt with them changed (size faults)."""
    reply = build(int)
    reply.sized = build
    return reply


def _surrogate(message: bytes) -> bytes:
    """What a down-converting server sends instead of a message whose header has 8-bit bytes,
    to a client that did not send UTF8 (RFC 6856 section 2.1): Courier 1.0.16's wrapper, a
    note with the original inside, unchanged, as message/global (RFC 6532 section 3.7); LIST
    and STAT still count the original (see tools/courier-1.0.16.pop3). Others as they are."""
    header = message.split(b"\r\n\r\n", 1)[0]
    if all(byte < 0x80 for byte in header):
        return message
    boundary = b"=_fakeserver-" + hashlib.md5(message).hexdigest()[:10].encode()
    return _crlf(b"\r\n".join([
        b"From: Mail Delivery Subsystem <postmaster>",
        b"Subject: Cannot display Unicode content",
        b"Mime-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"',
        b"", b"", b"",
        b"--" + boundary,
        b"Content-Type: text/plain",
        b"",
        b"This E-mail message was determined to be Unicode-formatted",
        b"but your E-mail reader does not support Unicode E-mail.",
        b"",
        b"The original message is included as a separate attachment",
        b"so that it can be downloaded manually.",
        b"",
        b"--" + boundary,
        b"Content-Type: message/global",
        b"",
    ]) + b"\r\n" + message + b"\r\n--" + boundary + b"--\r\n")


class _Sasl:
    """AUTH's SASL exchange (RFC 5034) and its mechanisms, ``sasl_<name>`` methods that return
    the user a client proved to be, or raise _SaslFailure."""

    def __init__(self, session: _Session, pop: _Pop3) -> None:
        self.session = session
        self.pop = pop
        self.server = session.server

    def mechanisms(self) -> list[str]:
        for line in self.server.capabilities:
            words = line.split()
            if words and words[0].upper() == "SASL":
                return [word.upper() for word in words[1:]]
        return []

    def authenticate(self, args: str) -> str | _Reply:
        """Run the SASL exchange of ``AUTH args``: the user it proves, or the -ERR."""
        mechanisms = self.mechanisms()
        parts = args.split(" ")
        if len(parts) > 2:
            return self.pop.err("syntax")
        mechanism = parts[0].upper()
        if mechanism not in mechanisms:
            return self.pop.err("mechanism")
        step = getattr(self, "sasl_" + mechanism.replace("-", "_").lower(), None)
        if step is None:
            return self.pop.err("mechanism")
        try:
            # The line was decoded with surrogateescape: undo it the same way (8-bit bytes are
            # then simply not base64).
            raw = parts[1].encode("utf-8", "surrogateescape") if len(parts) == 2 else None
            initial = _b64decode(raw) if raw is not None else None
            user = cast(Callable[[Optional[bytes]], str], step)(initial)
        except _SaslFailure as failure:
            key = failure.args[0]
            return self.pop.err(key, self.pop.auth_code() if key == "bad-login" else None)
        self.session.log.mechanism = mechanism
        return user

    def exchange(self, challenge: bytes) -> bytes:
        """Send a challenge, return the decoded response; "*" cancels."""
        self.session.send_line(b"+ " + base64.b64encode(challenge))
        try:
            raw = self.session.readline(MAX_SASL_LINE)
        except _LineTooLong:
            self.session.record("C: (a response over %d octets, skipped)" % MAX_SASL_LINE)
            raise _SaslFailure("too-long") from None
        if raw is None:
            raise _HangUp()
        if raw == b"*":
            self.session.record("C: *")
            raise _SaslFailure("cancelled")
        self.session.record("C: ****")
        return _b64decode(raw) if raw else b""

    def check(self, user: str, password: str) -> str:
        if not self.server._password_ok(user, password):
            raise _SaslFailure("bad-login")
        return user

    def sasl_plain(self, initial: bytes | None) -> str:
        message = initial if initial is not None else self.exchange(b"")
        parts = message.split(b"\0")
        if len(parts) != 3:
            raise _SaslFailure("bad-login")
        try:
            authzid, authcid, password = (part.decode("utf-8") for part in parts)
        except UnicodeDecodeError:
            raise _SaslFailure("bad-login") from None
        if authzid not in ("", authcid):
            raise _SaslFailure("bad-login")
        return self.check(authcid, password)

    def sasl_login(self, initial: bytes | None) -> str:
        user = initial if initial else self.exchange(b"Username:")
        password = self.exchange(b"Password:")
        return self.check(
            user.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")
        )

    def sasl_cram_md5(self, initial: bytes | None) -> str:
        if initial is not None:
            raise _SaslFailure("syntax")  # server-first: no initial response (RFC 5034 section 4)
        challenge = self.server._fresh_timestamp().encode()
        user, _, digest = self.exchange(challenge).decode("utf-8", "replace").rpartition(" ")
        drop = self.server._maildrop(user)
        if drop is None:
            raise _SaslFailure("bad-login")
        expected = hmac.new(drop.password.encode(), challenge, hashlib.md5).hexdigest()
        if not hmac.compare_digest(expected.encode(), digest.encode()):
            raise _SaslFailure("bad-login")
        return user

    def sasl_scram_sha_1(self, initial: bytes | None) -> str:
        return self.scram("sha1", initial)

    def sasl_scram_sha_256(self, initial: bytes | None) -> str:
        return self.scram("sha256", initial)

    def scram(self, hash_name: str, initial: bytes | None) -> str:
        """RFC 5802 server side, without channel binding and without SASLprep."""
        first = (initial if initial is not None else self.exchange(b"")).decode("utf-8", "replace")
        match = re.match(r"([ny]),(?:a=[^,]*)?,(n=([^,]*),r=([\x21-\x2b\x2d-\x7e]+)(?:,.*)?)\Z",
                         first)
        if not match:
            raise _SaslFailure("bad-login")
        gs2_header = first[: len(first) - len(match.group(2))]
        first_bare, user, client_nonce = match.group(2), _scram_name(match.group(3)), match.group(4)
        drop = self.server._maildrop(user)
        salt = hashlib.sha256(b"fakeserver salt " + user.encode()).digest()[:16]
        nonce = client_nonce + base64.b64encode(os.urandom(18)).decode()
        server_first = "r=%s,s=%s,i=%d" % (nonce, base64.b64encode(salt).decode(), SCRAM_ITERATIONS)
        final = self.exchange(server_first.encode()).decode("utf-8", "replace")
        without_proof, _, proof_b64 = final.rpartition(",p=")
        expected_start = "c=%s,r=%s" % (base64.b64encode(gs2_header.encode()).decode(), nonce)
        if drop is None or not (without_proof + ",").startswith(expected_start + ","):
            raise _SaslFailure("bad-login")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:  # binascii.Error, or a str with non-ASCII characters
            raise _SaslFailure("bad-login") from None
        salted = hashlib.pbkdf2_hmac(hash_name, drop.password.encode(), salt, SCRAM_ITERATIONS)
        client_key = hmac.new(salted, b"Client Key", hash_name).digest()
        stored_key = hashlib.new(hash_name, client_key).digest()
        auth_message = ",".join((first_bare, server_first, without_proof)).encode()
        signature = hmac.new(stored_key, auth_message, hash_name).digest()
        if len(proof) != len(signature):
            raise _SaslFailure("bad-login")
        recovered = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.new(hash_name, recovered).digest(), stored_key):
            raise _SaslFailure("bad-login")
        server_key = hmac.new(salted, b"Server Key", hash_name).digest()
        verifier = hmac.new(server_key, auth_message, hash_name).digest()
        # RFC 5034: the server-final message is a challenge; the client answers with an empty line.
        if self.exchange(b"v=" + base64.b64encode(verifier)) != b"":
            raise _SaslFailure("bad-login")
        return user

    def sasl_xoauth2(self, initial: bytes | None) -> str:
        message = initial if initial is not None else self.exchange(b"")
        match = re.match(rb"user=([^\x01]*)\x01auth=Bearer ([^\x01]*)\x01\x01\Z", message)
        user = match.group(1).decode("utf-8", "replace") if match else ""
        token = match.group(2).decode("utf-8", "replace") if match else ""
        error = {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
        return self.bearer(user, token, error)

    def sasl_oauthbearer(self, initial: bytes | None) -> str:
        message = initial if initial is not None else self.exchange(b"")
        match = re.match(rb"[ny],a=([^,]*),\x01((?:[^\x01]*\x01)*)\x01\Z", message)
        user = _scram_name(match.group(1).decode("utf-8", "replace")) if match else ""
        token = ""
        for pair in match.group(2).split(b"\x01") if match else []:
            if pair.startswith(b"auth=Bearer "):
                token = pair[len(b"auth=Bearer ") :].decode("utf-8", "replace")
        error = {
            "status": "invalid_token",
            "scope": "pop",
            "openid-configuration": "https://localhost/.well-known/openid-configuration",
        }
        return self.bearer(user, token, error)

    def bearer(self, user: str, token: str, error: Mapping[str, str]) -> str:
        if self.server.accepts_token(user, token):
            return user
        # RFC 7628 section 3.2.2: an error challenge, to which the client answers %x01 (or, with
        # XOAUTH2, an empty line); only then the -ERR.
        self.exchange(json.dumps(error).encode())
        raise _SaslFailure("bad-login")


class _ReplayedPop3(_Pop3):
    """A recorded session served again (FakeServer(replay=...)): connection n gets recorded
    session n (later ones the last); each command gets the next recorded reply to the same
    command line. Credentials are checked against the test password, not replayed; STLS is
    real when the server has ``tls="stls"``."""

    def __init__(self, session: _Session) -> None:
        super().__init__(session)
        self.replies: dict[str, list[bytes]] = {}  # command -> recorded replies

    def greeting(self) -> _Reply:
        """The recorded greeting; the session's replies indexed by command."""
        sessions = cast(Sequence[RecordedSession], self.server.recording)
        recorded = sessions[min(self.session.serial, len(sessions)) - 1]
        for exchange in recorded.exchanges:
            self.replies.setdefault(_command_key(exchange.command), []).append(exchange.reply)
        found = re.search(rb"<[^<>\s]*@[^<>\s]*>", recorded.greeting)
        reply = _Reply(b"", raw=recorded.greeting)
        reply.timestamp = found.group(0).decode("utf-8", "replace") if found else None
        return reply

    def dispatch(self, verb: str, args: str, line: str, pending: str | None) -> _Reply:
        self.line = line
        states = _STATES.get(verb)
        if states is not None and self.state not in states:
            return self.err("state")
        if verb == "USER":
            if not args:
                return self.err("syntax")
            self.pending_user = args
        elif verb in ("PASS", "APOP") or (verb == "AUTH" and args):
            return self.login_replayed(verb, args, pending)
        elif verb == "STLS" and self.server.tls == "stls":
            return self.cmd_stls(args)
        elif verb == "QUIT":
            if self.state == "TRANSACTION":
                self.state = self.log.state = "UPDATE"
            return self.hang_up_after(self.recorded(verb))
        return self.recorded(verb)

    def login_replayed(self, verb: str, args: str, pending: str | None) -> _Reply:
        """Check the credentials for real; then the recorded reply."""
        user: str | _Reply
        if verb == "PASS":
            user = pending if pending is not None else self.err("no-user")
            if pending is not None and not self.server._password_ok(pending, args):
                user = self.err("bad-login", self.auth_code())
        else:
            user = self.apop_user(args) if verb == "APOP" else self.sasl.authenticate(args)
        if isinstance(user, _Reply):
            return user
        reply = self.recorded(verb)
        if reply.raw is not None and reply.raw.startswith(b"+OK"):
            self.logged_in(user, verb.lower())
        return reply

    def recorded(self, verb: str) -> _Reply:
        """The next recorded reply to the current command (the last one again once used up).
        Names and credentials differ between a recording and a test, so USER, PASS, APOP, AUTH
        (same mechanism) and QUIT fall back to any recorded command with the same verb."""
        key = _command_key(_show(_redact_command(self.line.encode("utf-8", "surrogateescape"))))
        replies = self.replies.get(key)
        if replies is None and verb in ("USER", "PASS", "APOP", "AUTH", "QUIT"):
            prefix = " ".join(key.split(" ")[: 2 if verb == "AUTH" else 1])
            for known, answers in self.replies.items():
                if known == prefix or known.startswith(prefix + " "):
                    replies = answers
                    break
        if replies is None:
            self.server._mismatch(ReplayMismatch(self.session.serial, key, tuple(self.replies)))
            return self.err("no recorded answer to this command (fakeserver replay)")
        reply = _Reply(b"", raw=replies.pop(0) if len(replies) > 1 else replies[0])
        if not reply.raw:  # the recorded server never answered: the connection ended there
            reply.after = _hang_up
        return reply


def _run_script(session: _Session, script: Sequence[tuple[str | None, bytes]]) -> None:
    """Send raw replies; each expected command must match exactly (else AssertionError)."""
    challenged = False  # a SASL response follows a "+ " line: never shown
    for step, (expected, reply) in enumerate(script):
        if expected is not None:
            raw = session.readline(MAX_SASL_LINE)
            if raw is None:
                return  # the client closed: what it sent so far is in the transcript
            shown = "****" if challenged and raw != b"*" else _show(_redact_command(raw))
            session.record("C: " + shown)
            if _show(raw) != expected:
                raise AssertionError(
                    "script step %d: expected %r, the client sent %r" % (step, expected, shown)
                )
        session.send(reply)
        challenged = reply.startswith(b"+ ")


def _command_key(command: str) -> str:
    """A command line as a replay looks it up: verb in upper case, arguments as sent."""
    verb, space, args = command.partition(" ")
    return verb.upper() + space + args


_VERB_RE = re.compile(r"[A-Z0-9]{1,8}\Z")  # RFC 1939 keywords, RFC 2449 allows digits (UTF8)
_STATES = {
    "USER": ("AUTHORIZATION",),
    "PASS": ("AUTHORIZATION",),
    "APOP": ("AUTHORIZATION",),
    "AUTH": ("AUTHORIZATION",),
    "STLS": ("AUTHORIZATION",),
    "UTF8": ("AUTHORIZATION",),
    "STAT": ("TRANSACTION",),
    "LIST": ("TRANSACTION",),
    "UIDL": ("TRANSACTION",),
    "RETR": ("TRANSACTION",),
    "TOP": ("TRANSACTION",),
    "DELE": ("TRANSACTION",),
    "RSET": ("TRANSACTION",),
    "NOOP": ("TRANSACTION",),
}


# ======================================================================================
# The server
# ======================================================================================

#: The password a replay accepts for every user name (the seed's, public on purpose).
REPLAY_PASSWORD = "fugafuga"


def _load_replay(replay: str | Path | Sequence[RecordedSession]) -> list[RecordedSession]:
    """Sessions from a transcript file's path, a transcript's text, or parsed sessions."""
    if isinstance(replay, Path) or (isinstance(replay, str) and "\n" not in replay):
        sessions = load_transcript(replay)
    elif isinstance(replay, str):
        sessions = parse_transcript(replay)
    else:
        sessions = list(replay)
    if not sessions:
        raise ValueError("the recording to replay has no session")
    return sessions


def _recorded_capabilities(sessions: Sequence[RecordedSession]) -> list[str]:
    """The CAPA lines of a recording (for AUTH's mechanisms), plus a SASL line for mechanisms
    the recording used with AUTH but CAPA did not list."""
    lines: list[str] = []
    used: list[str] = []
    for session in sessions:
        for exchange in session.exchanges:
            words = exchange.command.split(" ")
            if words[0].upper() == "CAPA" and exchange.reply.startswith(b"+OK") and not lines:
                try:
                    body = _body_lines(exchange.reply)
                except ValueError:  # a cut recording: no capabilities then
                    body = []
                lines = [line.decode("utf-8", "replace") for line in body]
            elif words[0].upper() == "AUTH" and len(words) > 1:
                used.append(words[1].upper())
    sasl = [line for line in lines if line.upper().startswith("SASL")]
    offered = sasl[0].split()[1:] if sasl else []
    missing = [name for name in dict.fromkeys(used) if name not in offered]
    if missing:
        lines = [line for line in lines if line not in sasl]
        lines.append("SASL " + " ".join(offered + missing))
    return lines


def _oauth2_beside(server: FakeServer, oauth2: FakeOAuth2 | bool | Mapping[str, Any] | None
                   ) -> FakeOAuth2 | None:
    """The FakeOAuth2 a FakeServer serves beside itself (``oauth2=True``: the defaults; a
    mapping: FakeOAuth2's options, e.g. in a ``pop3_server`` marker)."""
    if oauth2 is None or oauth2 is False:
        return None
    if isinstance(oauth2, FakeOAuth2):
        beside = oauth2
    else:
        beside = FakeOAuth2(**({} if oauth2 is True else dict(oauth2)))
    beside._attach(lambda: list(server.maildrops), server.errors)
    return beside


def _check_options(
    preset: str, tls: str | None, port: int, idle_timeout: float, max_sessions: int
) -> None:
    """FakeServer's checks of its arguments (ValueError)."""
    if preset not in _PRESETS:
        raise ValueError("unknown preset %r (use one of %s)" % (preset, ", ".join(_PRESETS)))
    if tls not in (None, "stls", "implicit"):
        raise ValueError('tls must be None, "stls" or "implicit", not %r' % (tls,))
    if not 0 <= port <= 65535:
        raise ValueError("the port must be 0-65535, not %r" % (port,))
    if not 0 < idle_timeout < float("inf"):  # also refuses nan, which sockets cannot take
        raise ValueError("the idle timeout must be a positive number of seconds")
    if max_sessions < 1:
        raise ValueError("max_sessions must be at least 1, not %r" % (max_sessions,))


class FakeServer(socketserver.ThreadingTCPServer):
    """A POP3 server in a thread: ``with FakeServer(...) as server:`` (see the module docstring)."""

    # Session threads are joined by server_close() (block_on_close), so an exception a session
    # hits is recorded before close() looks for one.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    # socketserver's backlog of 5 makes a burst of clients wait for SYN retransmissions
    # (seconds) before they even get "-ERR [SYS/TEMP]" from the session cap.
    request_queue_size = 128

    def __init__(
        self,
        preset: str = "operamail",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        users: Mapping[str, Maildrop] | None = None,
        capabilities: Sequence[str] | None = None,
        tls: str | None = None,
        faults: Sequence[Fault] = (),
        script: Sequence[tuple[str | None, bytes]] | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        oauth_token: str | None = None,
        greeting: str | None = None,
        keep_transcripts: bool = True,
        replay: str | Path | Sequence[RecordedSession] | None = None,
        utf8_downconvert: bool = False,
        oauth2: FakeOAuth2 | bool | Mapping[str, Any] | None = None,
    ) -> None:
        _check_options(preset, tls, port, idle_timeout, max_sessions)
        self.faults = _Faults(faults)
        self.recording = _load_replay(replay) if replay is not None else None
        if self.recording is not None and capabilities is None:
            capabilities = _recorded_capabilities(self.recording)
        chosen = _PRESETS[preset]
        self.preset = preset
        self.voice = chosen.voice
        self.greeting = chosen.greeting if greeting is None else greeting
        self.capabilities = list(chosen.capabilities if capabilities is None else capabilities)
        self.maildrops: dict[str, Maildrop] = (
            dict(users) if users is not None else {} if replay is not None else chosen.make_users()
        )
        # A replay checks credentials, not recorded ones: any user name with REPLAY_PASSWORD.
        self._replay_password = REPLAY_PASSWORD if replay is not None and users is None else None
        if oauth_token is None and oauth2 in (None, False):  # OAuth2: only the tokens it issued
            oauth_token = OAUTH_TOKEN if replay is not None else chosen.oauth_token
        self.oauth_token = oauth_token
        self.tls = tls
        self.utf8_downconvert = utf8_downconvert
        self.script = list(script) if script is not None else None
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.keep_transcripts = keep_transcripts
        self._init_bookkeeping()
        self.oauth2 = _oauth2_beside(self, oauth2)
        if tls is not None:
            _tls_server_context()  # a broken certificate fails here, not in a session
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Session)

    def _init_bookkeeping(self) -> None:
        """What the server records (logs, errors) and its session bookkeeping."""
        self.transcripts: list[list[str]] = []
        self.sessions: list[SessionLog] = []
        self.mismatches: list[ReplayMismatch] = []
        self.errors: list[BaseException] = []
        self._connections = 0
        self._lock = threading.Lock()
        self._sessions: list[_Session] = []
        self._admitted: set[int] = set()
        self._serials = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closing = False

    # ----- public ------------------------------------------------------------------
    @property
    def host(self) -> str:
        return str(self.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> FakeServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True,
                name="fakeserver %s:%d" % self.address,
            )
            self._thread.start()
            if self.oauth2 is not None:
                self.oauth2.start()
        return self

    def stop(self) -> None:
        """Stop serving and end every session (their exceptions stay in ``errors``)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.abort()
        self.server_close()  # joins the session threads
        if self.oauth2 is not None:
            self.oauth2._stop()

    def close(self) -> None:
        """Stop serving, end every session, then raise the first exception a session hit."""
        self.stop()
        if self.errors:
            raise self.errors[0]

    @property
    def commands(self) -> list[str]:
        """Every command line clients sent, all sessions in order of connection (secrets ****)."""
        with self._lock:
            return [command for log in self.sessions for command in log.commands]

    @property
    def deleted(self) -> list[bytes]:
        """The messages QUIT removed (RFC 1939 UPDATE), all sessions in order of connection."""
        with self._lock:
            return [data for log in self.sessions for data in log.deleted]

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every session has ended (its maildrop lock released, its log closed).
        A client that closed without QUIT is noticed by its session thread only a moment
        later; a test that reconnects at once would otherwise race it and get [IN-USE].
        Raises TimeoutError if sessions remain after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._sessions:
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError("fakeserver sessions still open after %gs" % timeout)
            time.sleep(0.005)

    def ssl_context_for_clients(self) -> ssl.SSLContext:
        """A client context that trusts the test CA (equivalent to ``cadata=CA_PEM``)."""
        return client_context()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self.stop()
        if exc_type is None and self.errors:
            raise self.errors[0]

    # ----- socketserver hooks and session bookkeeping -------------------------------
    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if error is not None:
            logger.error("session failed: %r", error)
            with self._lock:
                self.errors.append(error)

    def _join(self, session: _Session) -> None:
        with self._lock:
            if self.keep_transcripts:
                self.transcripts.append(session.transcript)
                self.sessions.append(session.log)
            self._connections += 1
            session.serial = session.log.number = self._connections
            self._sessions.append(session)
            closing = self._closing
        if closing:
            session.abort()

    def _admit(self, session: _Session) -> bool:
        with self._lock:
            if len(self._admitted) >= self.max_sessions:
                return False
            self._admitted.add(id(session))
            return True

    def _leave(self, session: _Session) -> None:
        with self._lock:
            self._sessions.remove(session)
            self._admitted.discard(id(session))

    def _fresh_timestamp(self) -> str:
        """A new APOP/CRAM-MD5 challenge (RFC 1939 section 7: unique per connection)."""
        return "<%d.%d.%d@localhost>" % (os.getpid(), next(self._serials), time.time_ns())

    def _maildrop(self, user: str) -> Maildrop | None:
        drop = self.maildrops.get(user)
        if drop is None and self._replay_password is not None:
            return Maildrop(self._replay_password)  # a replay accepts any user name
        return drop

    def _mismatch(self, mismatch: ReplayMismatch) -> None:
        logger.warning("replay: no recorded answer to %r in session %d",
                       mismatch.command, mismatch.session)
        with self._lock:
            self.mismatches.append(mismatch)

    def _password_ok(self, user: str, password: str) -> bool:
        drop = self._maildrop(user)
        given = password.encode("utf-8", "surrogateescape")
        return drop is not None and hmac.compare_digest(given, drop.password.encode("utf-8"))

    def accepts_token(self, user: str, token: str) -> bool:
        """Whether XOAUTH2 and OAUTHBEARER accept this bearer token for this user: the static
        ``oauth_token``, or an unexpired access token ``oauth2`` issued for the user (or by
        client credentials)."""
        if self._maildrop(user) is None:
            return False
        static = self.oauth_token
        if static is not None and hmac.compare_digest(token.encode(), static.encode()):
            return True
        return self.oauth2 is not None and self.oauth2.accepts(user, token)


# ======================================================================================
# Recording proxy
# ======================================================================================

#: A wire line longer than this is written in chunks that end in a lone "\" (no line end).
MAX_RECORDED_CHUNK = 65536
#: With tls="auto", how long the proxy waits for a plaintext greeting before it tries implicit
#: TLS (pop3lite's command line waits as long).
GREETING_WAIT = 3.0


def _multi_line(command: bytes) -> bool:
    """Whether +OK to `command` starts a multi-line reply (RFC 1939, 2449, 5034)."""
    words = command.rstrip(b"\r\n").split(b" ")
    verb = words[0].upper()
    if verb in (b"CAPA", b"RETR", b"TOP"):
        return True
    return verb in (b"LIST", b"UIDL", b"AUTH") and len(words) == 1


class _Tap:
    """The recorder's core, without sockets: fed the bytes each side sent, it writes transcript
    lines in exchange order. A pipelined command is written right before its reply (replies
    come in command order, RFC 2449 section 6.6), so a replay can pair them."""

    def __init__(self, write: Callable[[str], None], headers_only: bool = False) -> None:
        self.write = write
        self.headers_only = headers_only
        self.sent: list[bytes] = []  # client lines not yet answered, oldest first
        self.client = bytearray()
        self.server = bytearray()
        self.greeted = False
        self.command: bytes | None = None  # the command of the multi-line reply being read
        self.in_header = True
        self.cut = [0, 0]  # body lines and octets left out (headers_only)
        self.sasl = False  # the server sent a "+ " challenge: the client's next line answers it

    def from_client(self, data: bytes) -> list[bytes]:
        """Take bytes from the client; return its complete lines (and chunks of endless ones)."""
        self.client += data
        lines = _split_lines(self.client)
        self.sent += lines
        return lines

    def from_server(self, data: bytes) -> None:
        self.server += data
        for line in _split_lines(self.server):
            self.server_line(line)

    def server_line(self, line: bytes) -> None:
        if not self.greeted:
            self.greeted = True
            self.write(transcript_line("S", line))
        elif self.command is not None:
            self.body_line(line)
        else:
            self.reply_start(line)

    def reply_start(self, line: bytes) -> None:
        if not self.sent:
            self.write("# the server sent this line before any command:")
            self.write(transcript_line("S", line))
            return
        command = self.sent.pop(0)
        self.write(transcript_line("C", _redact_line(command, self.sasl)))
        self.write(transcript_line("S", line))
        verb = command.split()[0].upper() if command.split() else b""
        self.sasl = line.startswith(b"+ ") and (self.sasl or verb == b"AUTH")
        if line.startswith(b"+OK") and _multi_line(command) and not self.sasl:
            self.command = command if verb in (b"RETR", b"TOP") else b""
            self.in_header = True
            self.cut = [0, 0]

    def body_line(self, line: bytes) -> None:
        if line in (b".\r\n", b".\n"):
            if self.cut[0]:
                self.write("# %d body lines (%d octets) not recorded (headers only)" % tuple(
                    self.cut))
            self.write(transcript_line("S", line))
            self.command = None
            return
        if self.headers_only and self.command and not self.in_header:
            self.cut[0] += 1
            self.cut[1] += len(line)
            return
        if line in (b"\r\n", b"\n"):
            self.in_header = False
        self.write(transcript_line("S", line))

    def finish(self) -> None:
        """Write what is left when the connection ends: unanswered commands, a cut line."""
        for command in self.sent:
            self.write(transcript_line("C", _redact_line(command, self.sasl)))
            self.sasl = False
        for rest, direction in ((self.client, "C"), (self.server, "S")):
            if rest:
                data = bytes(rest)
                self.write(transcript_line(direction, data if direction == "S" else
                                           _redact_line(data, self.sasl)))
        self.sent, self.client, self.server = [], bytearray(), bytearray()


def _split_lines(buffer: bytearray) -> list[bytes]:
    """Take the complete lines (LF-ended) out of `buffer`, and chunks of an endless line."""
    lines: list[bytes] = []
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) >= MAX_RECORDED_CHUNK:
                lines.append(bytes(buffer[:MAX_RECORDED_CHUNK]))
                del buffer[:MAX_RECORDED_CHUNK]
                continue
            return lines
        lines.append(bytes(buffer[: end + 1]))
        del buffer[: end + 1]


def _redact_line(line: bytes, sasl_response: bool) -> bytes:
    """_redact_command for a line with its line end (kept as it was)."""
    body = line.rstrip(b"\r\n")
    return _redact_command(body, sasl_response) + line[len(body) :]


def _parse_upstream(text: str) -> tuple[str, int | None]:
    """HOST[:PORT], with [v6]:PORT."""
    found = re.match(r"\[([^\]]+)\](?::(\d+))?\Z|([^:\[\]]+)(?::(\d+))?\Z", text)
    if not found:
        raise ValueError("not HOST[:PORT]: %r" % text)
    host = found.group(1) or found.group(3)
    port = found.group(2) or found.group(4)
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError("the port must be 1-65535, not %s" % port)
    return host, int(port) if port else None


class Recorder(socketserver.ThreadingTCPServer):
    """A recording POP3 proxy on loopback: clients connect here in plaintext, the proxy talks to
    the real server (TLS verified) and appends every session to a transcript file."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self,
        upstream: str,
        out: str | Path,
        *,
        tls: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        context: ssl.SSLContext | None = None,
        headers_only: bool = False,
        timeout: float = 60.0,
        overwrite: bool = False,
    ) -> None:
        server_host, server_port = _parse_upstream(upstream)
        if tls is None:  # secure by default: TLS either way, implicit on the POP3S port
            tls = {None: "implicit", 995: "implicit", 110: "stls"}.get(server_port, "auto")
        if tls not in ("implicit", "stls", "none", "auto"):
            raise ValueError('tls must be "implicit", "stls", "auto" or "none", not %r' % (tls,))
        self.upstream = (server_host, server_port or (995 if tls == "implicit" else 110))
        self.tls = tls
        self.out = Path(out)
        self.context = context
        self.headers_only = headers_only
        self.timeout = timeout
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._sessions = itertools.count(1)
        self._thread: threading.Thread | None = None
        # A recording is somebody's regression test: never truncate one unasked.
        with self.out.open("w" if overwrite else "x", encoding="utf-8") as file:
            file.write("%s\n# recorded through fakeserver.py --record %s:%d (TLS %s) on %s\n"
                       % (TRANSCRIPT_HEADER, self.upstream[0], self.upstream[1], tls,
                          time.strftime("%Y-%m-%d %H:%M:%S %z")))
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _ProxySession)

    @property
    def address(self) -> tuple[str, int]:
        return str(self.server_address[0]), int(self.server_address[1])

    def start(self) -> Recorder:
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever,
                                            kwargs={"poll_interval": 0.01}, daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop, wait for the sessions to end (each is in the file then)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
        if exc[0] is None and self.errors:
            raise self.errors[0]

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if error is not None:
            logger.error("recording session failed: %r", error)
            with self._lock:
                self.errors.append(error)

    def _connect(self, tap: _Tap) -> tuple[socket.socket, str]:
        """A connection to the real server, TLS verified, and its TLS mode: with "auto", a
        server that sends no plaintext greeting within GREETING_WAIT seconds is taken to
        expect TLS from the first byte (as pop3lite's command line does)."""
        host, port = self.upstream
        sock = socket.create_connection((host, port), timeout=self.timeout)
        tls = self.tls
        if tls == "auto":
            sock.settimeout(GREETING_WAIT)
            try:
                plaintext = bool(sock.recv(1, socket.MSG_PEEK))
            except socket.timeout:
                plaintext = False
            sock.settimeout(self.timeout)
            tls = "stls" if plaintext else "implicit"
            tap.write("# the proxy chose TLS %s: %s" % (tls, "the server greeted in plaintext"
                      if plaintext else "no plaintext greeting within %g s" % GREETING_WAIT))
        if tls == "implicit":
            context = self.context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
        return sock, tls

    def _append(self, number: int, peer: str, lines: Iterable[str]) -> None:
        commands = 0
        with self._lock, self.out.open("a", encoding="utf-8") as file:
            file.write("= session %d (client %s)\n" % (number, peer))
            for line in lines:
                commands += line.startswith("C:")
                file.write(line + "\n")
        logger.info("recorded session %d: %d client lines into %s", number, commands, self.out)


def _tls_hint(tls: str, error: BaseException) -> str:
    """What to pass when a recording session failed the way a wrong TLS mode fails."""
    if isinstance(error, socket.timeout) and tls == "stls":
        return " (if the server expects TLS from the first byte, pass --tls implicit)"
    if isinstance(error, ssl.SSLError) and tls == "implicit":
        return " (if the server greets in plaintext, pass --tls stls)"
    return ""


class _ProxySession(socketserver.BaseRequestHandler):
    server: Recorder

    def handle(self) -> None:
        recorder = self.server
        number = next(recorder._sessions)
        with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
            def write(line: str) -> None:
                spool.write(line + "\n")

            tap = _Tap(write, recorder.headers_only)
            try:
                self.relay(tap)
            except (OSError, ValueError) as error:  # the peer went away, TLS failed, ...
                tap.finish()
                spool.write("# the session ended: %s\n" % (error,))
                logger.warning("recording session %d ended: %s%s", number, error, _tls_hint(
                    recorder.tls, error))
            spool.seek(0)
            recorder._append(number, "%s:%d" % self.client_address[:2],
                             (line.rstrip("\n") for line in spool))

    def relay(self, tap: _Tap) -> None:
        import select

        recorder = self.server
        client: socket.socket = self.request
        client.settimeout(recorder.timeout)
        upstream, tls = recorder._connect(tap)
        try:
            if tls == "stls":
                upstream = self.start_tls(upstream, tap)
            sockets = [client, upstream]
            while True:
                pending = isinstance(upstream, ssl.SSLSocket) and upstream.pending()
                ready = [upstream] if pending else select.select(
                    sockets, [], [], recorder.timeout)[0]
                if not ready:
                    raise TimeoutError("no data either way for %s s" % recorder.timeout)
                if upstream in ready:
                    # Readable may mean a TLS record with no data in it (a TLS 1.3 session
                    # ticket): a blocking read would then wait for data that only comes after
                    # the client's next command, which this thread would never relay.
                    upstream.setblocking(False)
                    try:
                        data = upstream.recv(65536)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        data = None  # no application data yet
                    finally:
                        upstream.settimeout(recorder.timeout)
                    if data == b"":
                        break
                    if data:
                        tap.from_server(data)
                        client.sendall(data)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        break  # the client left: so do we (no QUIT, no UPDATE)
                    for line in tap.from_client(data):
                        if line.rstrip(b"\r\n").upper() == b"STLS" and len(tap.sent) == 1:
                            # The client side is plaintext on loopback; the server side is
                            # already what --tls says. Refuse locally rather than relay a
                            # handshake we could not record.
                            tap.sent.pop()
                            tap.write("# the proxy refused the client's STLS (client side is "
                                      "plaintext; the server side is TLS %s)" % tls)
                            client.sendall(b"-ERR STLS is not relayed by the recording proxy\r\n")
                            continue
                        upstream.sendall(line)
            tap.finish()
        finally:
            upstream.close()

    def start_tls(self, upstream: socket.socket, tap: _Tap) -> socket.socket:
        """Read the greeting, upgrade with STLS (RFC 2595), return the TLS socket."""
        recorder = self.server
        buffer = bytearray()
        lines: list[bytes] = []
        for _ in range(64):
            data = upstream.recv(4096)
            if not data:
                raise ConnectionError("the server closed before STLS")
            buffer += data
            lines += _split_lines(buffer)
            if lines:
                break
            if len(buffer) > 4096:
                raise ValueError("no greeting line in the server's first 4 KiB")
        if len(lines) != 1 or buffer:
            raise ValueError("the server sent more than its greeting")
        tap.from_server(lines[0])
        upstream.sendall(b"STLS\r\n")
        answer = bytearray()
        while b"\n" not in answer and len(answer) < 4096:
            data = upstream.recv(4096)
            if not data:
                raise ConnectionError("the server closed after STLS")
            answer += data
        if not answer.startswith(b"+OK") or not answer.endswith(b"\n"):
            raise ValueError("the server refused STLS: %r" % bytes(answer[:200]))
        context = recorder.context or ssl.create_default_context()
        upstream = context.wrap_socket(upstream, server_hostname=recorder.upstream[0])
        tap.write("# the proxy sent STLS, got %s and verified the server's certificate"
                  % transcript_line("S", bytes(answer))[3:])
        self.request.sendall(lines[0])
        return upstream


# ======================================================================================
# pytest plugin
# ======================================================================================

# pytest loads this module as a plugin through the pytest11 entry point of an installed pop3lite,
# or through `pytest_plugins = ["fakeserver"]` in a conftest.py next to a copied fakeserver.py.
# pytest itself is imported only in _pytest_plugin(), which only pytest calls: the module stays
# standard-library-only for everyone else.


#: The pop3_oauth2_server fixture's FakeOAuth2 options: access tokens that expire while a test
#: runs, device polling fast enough not to slow it down.
OAUTH2_TEST_OPTIONS: Mapping[str, Any] = {
    "access_lifetime": 2.0, "device_interval": 0.05, "device_lifetime": 60.0}


def pytest_configure(config: Any) -> None:
    """pytest hook: declare the marker and register the fixtures."""
    config.addinivalue_line(
        "markers",
        "pop3_server(preset='rfc', **options): configure the pop3_server fixture's FakeServer "
        "(the options of make_pop3_server)",
    )
    if not config.pluginmanager.has_plugin("fakeserver-fixtures"):
        config.pluginmanager.register(_pytest_plugin(), "fakeserver-fixtures")


def _mail_bytes(message: object) -> bytes:
    """A message given as bytes, str or an email.message.Message (EmailMessage)."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    as_bytes = getattr(message, "as_bytes", None)
    if as_bytes is None:
        raise TypeError("a message is bytes, str or an email Message, not %r" % (message,))
    return cast(bytes, as_bytes())


def _report_text(servers: Sequence[FakeServer]) -> str:
    """The transcripts of a test's servers, for its failure report (secrets are ****)."""
    parts: list[str] = []
    for index, server in enumerate(servers, 1):
        parts.append("server %d (%s:%d, %s%s): %d connection(s)" % (
            index, server.host, server.port,
            "replay" if server.recording is not None else "preset " + server.preset,
            ", TLS " + server.tls if server.tls else "", len(server.sessions)))
        for log in server.sessions:
            parts.append("  connection %d: ended in %s%s%s%s" % (
                log.number, log.state, ", TLS" if log.tls else "",
                ", AUTH " + log.mechanism if log.mechanism else "",
                ", QUIT" if log.quit else ", no QUIT"))
            parts.extend("    " + _for_terminal(line) for line in log.transcript)
        for mismatch in server.mismatches:
            parts.append("  replay: connection %d sent %r, which the recording has no answer for"
                         % (mismatch.session, mismatch.command))
        parts.extend(_oauth2_report(server.oauth2))
    return "\n".join(parts)


def _oauth2_report(oauth2: FakeOAuth2 | None) -> list[str]:
    """The requests a server's FakeOAuth2 answered, for a failure report (no secret in them)."""
    if oauth2 is None:
        return []
    lines = ["  oauth2 %s: %d request(s), %d token reply(ies)"
             % (oauth2.base_url, len(oauth2.requests), len(oauth2.issued))]
    lines.extend("    %s %s -> %s" % (request.path, request.grant or "-", request.error or "ok")
                 for request in oauth2.requests)
    return lines


def _make_server(
    preset: str = "rfc",
    *,
    messages: Iterable[object] | None = None,
    maildir: str | Path | None = None,
    mbox: str | Path | None = None,
    eml_dir: str | Path | None = None,
    user: str | None = None,
    password: str | None = None,
    folder: Path | None = None,
    **options: Any,
) -> FakeServer:
    """make_pop3_server's server (not started); a relative ``replay`` path is taken from
    `folder` (the test file's)."""
    name = user if user is not None else "hogehoge"
    secret = password if password is not None else "fugafuga"
    sources = [s for s in (messages, maildir, mbox, eml_dir) if s is not None]
    if len(sources) > 1:
        raise ValueError("give one of messages, maildir, mbox and eml_dir")
    drop: Maildrop | None = None
    if messages is not None:
        drop = Maildrop(secret, (_mail_bytes(m) for m in messages))
    elif maildir is not None:
        drop = Maildrop.from_maildir(maildir, secret)
    elif mbox is not None:
        drop = Maildrop.from_mbox(mbox, secret)
    elif eml_dir is not None:
        drop = Maildrop.from_eml_dir(eml_dir, secret)
    elif (user, password) != (None, None) and preset in _PRESETS:
        base = next(iter(_PRESETS[preset].make_users().values()))
        drop = Maildrop(secret, base.messages, uids=base.uids)
    if drop is not None:
        options["users"] = {name: drop}
    replay = options.get("replay")
    if folder is not None and isinstance(replay, (str, Path)) and "\n" not in str(replay):
        options["replay"] = folder / replay  # an absolute `replay` stays as it is
    return FakeServer(preset, **options)


def _add_to_report(report: Any, servers: Sequence[FakeServer] | None) -> None:
    """A test's servers in its report: once the test has run, its sessions are ended, so that
    an exception one of them hit is known now and fails this test (not a later one, not only
    the teardown); a failed test gets the transcripts."""
    import traceback

    if not servers:
        return
    if report.when == "call":
        for server in servers:
            server.stop()
        errors = [error for server in servers for error in server.errors]
        if errors:
            text = "".join(traceback.format_exception(
                type(errors[0]), errors[0], errors[0].__traceback__))
            if report.passed:
                report.outcome = "failed"
                report.longrepr = "a fakeserver session raised:\n" + text
            else:
                report.sections.append(("fakeserver session error", text))
    if report.failed:
        report.sections.append(("fakeserver transcript", _report_text(servers)))


def _ca_file_fixture(pytest: Any) -> object:
    @pytest.fixture(scope="session")  # type: ignore[untyped-decorator]
    def pop3_ca_file(tmp_path_factory: Any) -> Path:
        """The test CA (PEM) in a file, for clients that want a path (``--cafile``)."""
        path = Path(tmp_path_factory.mktemp("fakeserver-ca")) / "ca.pem"
        path.write_text(CA_PEM)
        return path

    return pop3_ca_file


def _pytest_plugin() -> object:
    """The fixtures pop3_server, make_pop3_server, pop3_oauth2_server and pop3_ca_file and the
    report hook, as a module: plain functions (pytest 9 deprecates instance-method fixtures)."""
    import types

    import pytest

    # The servers of each running test (its node id): per process, so pytest-xdist workers
    # share nothing, and every server has its own free port.
    servers: dict[str, list[FakeServer]] = {}

    @pytest.fixture
    def make_pop3_server(request: Any) -> Iterator[Callable[..., FakeServer]]:
        """A factory: ``make_pop3_server(preset="rfc", *, messages=None, maildir=None,
        mbox=None, eml_dir=None, user="hogehoge", password="fugafuga", **FakeServer
        options)`` returns a started server; all are stopped when the test ends. Messages
        are bytes, str or email Messages; with no mail source, `user` and `password` get
        the preset's messages. A relative ``replay`` path is relative to the test file."""
        started = servers.setdefault(request.node.nodeid, [])
        folder = Path(str(request.path)).parent

        def make(preset: str = "rfc", **options: Any) -> FakeServer:
            server = _make_server(preset, folder=folder, **options)
            started.append(server.start())
            return server

        yield make
        for server in started:
            server.stop()  # errors were reported with the test (pytest_runtest_makereport)
        servers.pop(request.node.nodeid, None)

    @pytest.fixture
    def pop3_server(request: Any, make_pop3_server: Callable[..., FakeServer]) -> FakeServer:
        """A started FakeServer (preset "rfc"), configured by a ``pop3_server`` marker."""
        marker = request.node.get_closest_marker("pop3_server")
        if marker is None:
            return make_pop3_server()
        return make_pop3_server(*marker.args, **marker.kwargs)

    @pytest.fixture
    def pop3_oauth2_server(make_pop3_server: Callable[..., FakeServer]) -> FakeServer:
        """A started FakeServer (preset "rfc") with a FakeOAuth2 (``.oauth2``) beside it, its
        lifetimes short for tests (``OAUTH2_TEST_OPTIONS``)."""
        return make_pop3_server(oauth2=OAUTH2_TEST_OPTIONS)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
        outcome = yield
        _add_to_report(outcome.get_result(), servers.get(item.nodeid))  # type: ignore[attr-defined]

    plugin = types.ModuleType("fakeserver_fixtures")
    plugin.__dict__.update(make_pop3_server=make_pop3_server, pop3_server=pop3_server,
                           pop3_ca_file=_ca_file_fixture(pytest),
                           pop3_oauth2_server=pop3_oauth2_server,
                           pytest_runtest_makereport=pytest_runtest_makereport)
    return plugin


# ======================================================================================
# Command line
# ======================================================================================


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fakeserver.py",
        description="A fake POP3 server. By default it replays the OperaMail session of the "
        "seed: user hogehoge, password fugafuga, two Japanese messages. With --oauth2, a fake "
        "OAuth2 authorization server runs beside it; its endpoints are printed after the "
        "HOST:PORT line.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=1110, help="port, 0 for a free one (1110)")
    parser.add_argument("--tls", choices=("none", "implicit", "stls"),
                        help="TLS mode (none); with --record, to the real server (implicit on "
                        "port 995 and when no port is given, stls on 110; on other ports the "
                        "proxy waits 3 s for a plaintext greeting, then tries implicit TLS)")
    parser.add_argument("--preset", choices=sorted(_PRESETS),
                        help="operamail (the seed; the default) or rfc (full CAPA, SASL, fresh "
                        "timestamps; the default with --oauth2)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--maildir", metavar="PATH", help="serve this Maildir")
    source.add_argument("--mbox", metavar="PATH", help="serve this mbox file")
    source.add_argument("--eml-dir", metavar="PATH", help="serve the *.eml files of a folder")
    parser.add_argument("--user", default="hogehoge",
                        help="user name for --maildir/--mbox/--eml-dir (hogehoge)")
    parser.add_argument("--password", default="fugafuga",
                        help="that user's password, a test password only (fugafuga)")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                        metavar="SECONDS", help="autologout after this much silence (600)")
    parser.add_argument("--write-ca", metavar="FILE",
                        help="write the test CA certificate (PEM) to FILE for a client to trust")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not print the C:/S: transcript on stderr")
    parser.add_argument("--replay", metavar="FILE",
                        help="serve a recorded transcript (any user, password fugafuga)")
    record = parser.add_argument_group(
        "recording", "run a proxy that records sessions with a real server into a transcript")
    record.add_argument("--record", metavar="HOST[:PORT]",
                        help="the real server (TLS verified); point your client at this proxy "
                        "in plaintext")
    record.add_argument("--out", metavar="FILE",
                        help="the transcript file to write (an existing one only with --force)")
    record.add_argument("--force", action="store_true",
                        help="overwrite the --out file if it exists")
    record.add_argument("--cafile", metavar="FILE",
                        help="trust these CA certificates for the real server (default: system)")
    record.add_argument("--headers-only", action="store_true",
                        help="record only the header of each RETR/TOP message")
    _add_oauth2_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fake server until Ctrl-C; the first line on stdout is HOST:PORT."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.record:
        return _record(parser, args)
    args.preset = args.preset or ("rfc" if args.oauth2 else "operamail")
    args.tls = args.tls or "none"
    try:
        server = _server_from(args)
    except mailbox.NoSuchMailboxError as error:
        print("fakeserver: no such mailbox: %s" % error, file=sys.stderr)
        return 1
    except (OSError, mailbox.Error) as error:
        print("fakeserver: %s" % error, file=sys.stderr)
        return 1
    except ValueError as error:  # a port or timeout out of range
        parser.error(str(error))
    if not args.quiet:
        _log_to_stderr(logging.DEBUG)
    _take_back_sigint()
    try:
        server.start()
        _print_banner(server, args)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    for failure in server.errors:
        print("fakeserver: a session failed: %r" % (failure,), file=sys.stderr)
    for mismatch in server.mismatches:
        print("fakeserver: session %d: no recorded answer to %r"
              % (mismatch.session, mismatch.command), file=sys.stderr)
    return 1 if server.errors else 0


def _server_from(args: argparse.Namespace) -> FakeServer:
    """The FakeServer the command line asks for (not started); writes --write-ca's file."""
    users: dict[str, Maildrop] | None = None
    if args.maildir:
        users = {args.user: Maildrop.from_maildir(args.maildir, args.password)}
    elif args.mbox:
        users = {args.user: Maildrop.from_mbox(args.mbox, args.password)}
    elif args.eml_dir:
        users = {args.user: Maildrop.from_eml_dir(args.eml_dir, args.password)}
    if args.write_ca:
        Path(args.write_ca).write_text(CA_PEM)
    tls = None if args.tls == "none" else args.tls
    return FakeServer(args.preset, host=args.host, port=args.port, users=users, tls=tls,
                      idle_timeout=args.idle_timeout, keep_transcripts=False,
                      replay=Path(args.replay) if args.replay else None,
                      oauth2=_oauth2_options(args))


def _add_oauth2_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "OAuth2", "a fake OAuth2 authorization server beside the POP3 server (on another free "
        "port of the same host); XOAUTH2 and OAUTHBEARER then accept the tokens it issues")
    group.add_argument("--oauth2", action="store_true",
                       help="run it; lines 2-5 of the output are token-url, device-url, "
                       "auth-url and client-id, each followed by its value")
    group.add_argument("--oauth2-client-id", default="pop3lite-test", metavar="ID",
                       help="the client id it knows (pop3lite-test)")
    group.add_argument("--oauth2-client-secret", metavar="SECRET",
                       help="a test client secret, needed for client credentials (none)")
    group.add_argument("--oauth2-access-lifetime", type=float, default=3600.0,
                       metavar="SECONDS", help="access token lifetime (3600)")
    group.add_argument("--oauth2-refresh-lifetime", type=float, metavar="SECONDS",
                       help="refresh token lifetime (unlimited)")
    group.add_argument("--oauth2-interval", type=float, default=1.0, metavar="SECONDS",
                       help="device grant polling interval (1)")
    group.add_argument("--oauth2-approve-after", type=int, default=1, metavar="N",
                       help="approve a device code after N polls (1); the authorization URL "
                       "consents at once")


def _oauth2_options(args: argparse.Namespace) -> Mapping[str, Any] | None:
    """FakeOAuth2's options from the command line (None: no --oauth2)."""
    if not args.oauth2:
        return None
    return {"client_id": args.oauth2_client_id, "client_secret": args.oauth2_client_secret,
            "access_lifetime": args.oauth2_access_lifetime,
            "refresh_lifetime": args.oauth2_refresh_lifetime,
            "device_interval": args.oauth2_interval, "approve_after": args.oauth2_approve_after,
            "host": "::1" if ":" in args.host else "127.0.0.1"}


def _print_oauth2(oauth2: FakeOAuth2 | None, where: str, user: str) -> None:
    """The endpoints, one per line right after HOST:PORT (for scripts), and a sign-in to try."""
    if oauth2 is None:
        return
    print("token-url %s\ndevice-url %s\nauth-url %s\nclient-id %s" % (
        oauth2.token_url, oauth2.device_url, oauth2.auth_url, oauth2.client_id))
    print("fakeserver: OAuth2 for user %s: device codes approved after %s poll(s), the "
          "authorization URL consents at once; access tokens live %gs"
          % (oauth2.default_user, oauth2.approve_after, oauth2.access_lifetime))
    print("sign in: python pop3lite.py %s %s oauth2 --tls none --token-url %s --device-url %s "
          "--client-id %s --oauth2 TOKEN-FILE" % (where, user, oauth2.token_url,
                                                   oauth2.device_url, oauth2.client_id),
          flush=True)


def _log_to_stderr(level: int) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def _take_back_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored; take it back so `kill -INT` stops
    us."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _print_banner(server: FakeServer, args: argparse.Namespace) -> None:
    """HOST:PORT on the first line, then who can log in and how to try it."""
    host = "[%s]" % server.host if ":" in server.host else server.host
    where = "%s:%d" % (host, server.port)
    custom = args.maildir or args.mbox or args.eml_dir
    user = args.user if custom else "hogehoge"
    # The demo password is the seed's, public on purpose; a password given on the command
    # line is the user's own and is not repeated.
    password = args.password if custom else "fugafuga"
    shown = password if password == "fugafuga" else "as given"
    what = "replay of %s" % args.replay if args.replay else "%s preset" % args.preset
    print(where, flush=True)
    _print_oauth2(server.oauth2, where, user)
    print("fakeserver: POP3 (%s, TLS %s) for user %s, password %s"
          % (what, args.tls, "(any)" if args.replay else user, shown))
    ca = args.write_ca or "CA.pem"
    if server.tls is None:
        print("try:  telnet %s %d   (or: nc -C %s %d)"
              % (server.host, server.port, server.host, server.port))
    else:
        starttls = " -starttls pop3" if server.tls == "stls" else ""
        print("try:  openssl s_client -connect %s%s -CAfile %s%s" % (
            where, starttls, ca, "" if args.write_ca else "  (CA.pem from --write-ca)"))
    if server.recording is not None:
        # A client other than the one recorded sends other commands: show what it can answer.
        print("  the recording answers (session 1): %s" % ", ".join(
            exchange.command for exchange in server.recording[0].exchanges))
    else:
        client_tls = {"none": "none", "implicit": "implicit", "stls": "starttls"}[args.tls]
        print("  or: python pop3lite.py %s %s --tls %s%s"
              % (where, user, client_tls, "" if server.tls is None else " --cafile " + ca))
    print("stop: Ctrl-C", flush=True)


def _record(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--record: run the recording proxy until Ctrl-C."""
    if not args.out:
        parser.error("--record needs --out FILE")
    try:
        context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
        recorder = Recorder(args.record, args.out, tls=args.tls, host=args.host, port=args.port,
                            context=context, headers_only=args.headers_only,
                            overwrite=args.force)
    except FileExistsError:
        print("fakeserver: %s exists, and a recording is somebody's test: choose another --out "
              "file, or pass --force to overwrite it" % args.out, file=sys.stderr)
        return 1
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        print("fakeserver: %s" % error, file=sys.stderr)
        return 1
    _take_back_sigint()
    _log_to_stderr(logging.INFO)
    host, port = recorder.address
    try:
        recorder.start()
        print("%s:%d" % ("[%s]" % host if ":" in host else host, port), flush=True)
        print("fakeserver: recording %s:%d (TLS %s) into %s; secrets are written as ****"
              % (recorder.upstream[0], recorder.upstream[1], recorder.tls, args.out))
        print("point your client at %s port %d without TLS; stop: Ctrl-C" % (host, port),
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        recorder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
