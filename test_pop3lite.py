"""Tests of pop3lite.py, in the module's order: errors, protocol core, transport, client.

The pure core is fed whole inputs, byte by byte and with trailing data. Client behaviour is
checked against a scripted peer (exact bytes both ways) and against fakeserver.py.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
import threading
import time
from typing import Any, Callable

import pytest

import pop3lite
from conftest import TIMEOUT, MakeServer, Peer, connect, scripted
from pop3lite import (
    Capabilities,
    Stat,
    apop_digest,
    display_text,
    find_apop_timestamp,
    find_body_end,
    format_command,
    is_loopback,
    message_number,
    parse_announced_size,
    parse_capabilities,
    parse_response_code,
    parse_scan_listing,
    parse_stat,
    parse_status,
    parse_uid_listing,
    safe_cut,
    server_error,
    to_crlf,
    unstuff,
)

GREETING = b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"


# =============================================================================================
# Errors
# =============================================================================================


@pytest.mark.parametrize(
    ("code", "command", "cls"),
    [
        ("IN-USE", "PASS", pop3lite.InUseError),
        ("LOGIN-DELAY", "APOP", pop3lite.LoginDelayError),
        ("SYS/TEMP", "RETR", pop3lite.TemporaryError),
        ("SYS/PERM", "PASS", pop3lite.PermanentError),
        ("AUTH", "PASS", pop3lite.AuthenticationError),
        (None, "PASS", pop3lite.AuthenticationError),
        (None, "USER", pop3lite.AuthenticationError),
        (None, "AUTH", pop3lite.AuthenticationError),
        (None, "RETR", pop3lite.ServerError),
        ("SYS/OTHER", "PASS", pop3lite.ServerError),
        ("UTF8", "RETR", pop3lite.ServerError),
        # RFC 2449 section 8: unknown hierarchical detail is ignored
        ("SYS/TEMP/DB", "RETR", pop3lite.TemporaryError),
        ("IN-USE/OTHER-CLIENT", "PASS", pop3lite.InUseError),
        ("AUTH/EXPIRED", "RETR", pop3lite.AuthenticationError),
    ],
)
def test_server_error_class_follows_code_and_command(
    code: str | None, command: str, cls: type
) -> None:
    error = server_error("text", code, command)
    assert type(error) is cls
    assert (error.code, error.text, error.command) == (code, "text", command)


def test_error_hierarchy_matches_builtins() -> None:
    assert issubclass(pop3lite.InUseError, pop3lite.TemporaryError)
    assert issubclass(pop3lite.NetworkError, ConnectionError)
    assert issubclass(pop3lite.TLSError, pop3lite.NetworkError)
    assert issubclass(pop3lite.Timeout, TimeoutError)
    assert issubclass(pop3lite.TruncatedResponse, pop3lite.ProtocolError)
    assert issubclass(pop3lite.TruncatedResponse, ConnectionError)
    for name in pop3lite.__all__:
        obj = getattr(pop3lite, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and name != "SizeMismatchWarning":
            assert issubclass(obj, pop3lite.Error), name


def test_server_error_message_shows_code_and_text() -> None:
    error = server_error("maildrop locked", "IN-USE", "PASS")
    assert str(error) == "server said -ERR to PASS: [IN-USE] maildrop locked"


# =============================================================================================
# Protocol core
# =============================================================================================


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"+OK", (True, b"")),
        (b"+OK ", (True, b"")),
        (b"+OK 2 10180", (True, b"2 10180")),
        (b"-ERR", (False, b"")),
        (b"-ERR [IN-USE] locked", (False, b"[IN-USE] locked")),
    ],
    ids=["ok-bare", "ok-space", "ok-text", "err-bare", "err-code"],
)
def test_parse_status(line: bytes, expected: tuple[bool, bytes]) -> None:
    assert parse_status(line) == expected


@pytest.mark.parametrize(
    "line",
    [b"+ok", b"+OKAY", b"-ERROR", b"-err x", b"OK", b"", b"+ OK", b"* OK", b"+OK\t1"],
    ids=["lower-ok", "okay", "error", "lower-err", "no-sign", "empty", "space", "imap", "tab"],
)
def test_parse_status_rejects_what_is_not_pop3(line: bytes) -> None:
    with pytest.raises(pop3lite.ProtocolError):
        parse_status(line)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"[IN-USE] locked", ("IN-USE", b"locked")),
        (b"[SYS/TEMP] try later", ("SYS/TEMP", b"try later")),
        (b"[sys/perm]gone", ("SYS/PERM", b"gone")),
        (b"[LOGIN-DELAY]", ("LOGIN-DELAY", b"")),
        (b"no code here", (None, b"no code here")),
        (b"[unclosed", (None, b"[unclosed")),
        (b"[] empty", (None, b"[] empty")),
        (b"[A B] space", (None, b"[A B] space")),
        (b"[A[B] bracket", ("A[B", b"bracket")),  # RFC 2449 rchar allows "["
    ],
)
def test_parse_response_code(text: bytes, expected: tuple[str | None, bytes]) -> None:
    assert parse_response_code(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [(b"2 10180", Stat(2, 10180)), (b"0 0", Stat(0, 0)), (b"1 5 extra words", Stat(1, 5))],
)
def test_parse_stat(text: bytes, expected: Stat) -> None:
    result = parse_stat(text)
    assert result == expected
    count, size = result
    assert (result.count, result.size) == (count, size)


@pytest.mark.parametrize(
    "text",
    [b"", b"2", b"-1 5", b"2  10180", b"a b", b"2 10180\r\n", b"1" * 21 + b" 5", b" 2 3"],
)
def test_parse_stat_rejects_malformed(text: bytes) -> None:
    with pytest.raises(pop3lite.ProtocolError):
        parse_stat(text)


def test_parse_listings() -> None:
    assert parse_scan_listing(b"1 5954") == (1, 5954)
    assert parse_uid_listing(b"2 whqtswO00WBw418f9t5JxYwZ") == (2, "whqtswO00WBw418f9t5JxYwZ")
    assert parse_uid_listing(b"3 " + b"~" * 70) == (3, "~" * 70)


@pytest.mark.parametrize(
    "line",
    [b"0 5", b"1", b"x 5", b"1 -5", b"1 5\x00", b"18446744073709551616000 1"],
)
def test_parse_scan_listing_rejects_malformed(line: bytes) -> None:
    with pytest.raises(pop3lite.ProtocolError):
        parse_scan_listing(line)


@pytest.mark.parametrize(
    "line",
    [b"1", b"0 abc", b"1 " + b"a" * 71, b"1 has space", b"1 caf\xc3\xa9", b"1 tab\t", b"1 a b"],
    ids=["no-uid", "zero", "too-long", "space", "8bit", "tab", "two"],
)
def test_parse_uid_listing_enforces_rfc1939(line: bytes) -> None:
    with pytest.raises(pop3lite.ProtocolError):
        parse_uid_listing(line)


def test_parse_capabilities() -> None:
    caps = parse_capabilities(
        [
            b"TOP",
            b"sasl SCRAM-SHA-256 plain",
            b"LOGIN-DELAY 900",
            b"EXPIRE NEVER",
            b"PIPELINING",
            b"UTF8 USER",
            b"IMPLEMENTATION Caf\xe9 \xff server",
            b"",
        ]
    )
    assert isinstance(caps, Capabilities)
    assert caps["SASL"] == ["SCRAM-SHA-256", "plain"]
    assert caps.sasl == ["SCRAM-SHA-256", "PLAIN"]
    assert caps.login_delay == 900
    assert caps.expire == "NEVER"
    assert caps.pipelining and caps.utf8 and caps.utf8_user and not caps.stls
    assert caps.implementation == "Caf\ufffd \ufffd server"


def test_parse_capabilities_merges_repeated_lines_and_ignores_odd_numbers() -> None:
    caps = parse_capabilities([b"SASL PLAIN", b"SASL SCRAM-SHA-256", b"LOGIN-DELAY \xc2\xb2"])
    assert caps.sasl == ["PLAIN", "SCRAM-SHA-256"]
    assert caps.login_delay is None  # "²" is a digit to str.isdigit(), not to POP3
    assert parse_capabilities([b"LOGIN-DELAY " + b"9" * 5000]).login_delay is None


def test_parse_announced_size() -> None:
    assert parse_announced_size(b"5954 octets") == 5954
    assert parse_announced_size(b"message follows") is None
    assert parse_announced_size(b"") is None


def test_apop_rfc1939_example() -> None:
    # RFC 1939 section 7: the example's digest.
    timestamp = find_apop_timestamp(b"POP3 server ready <1896.697170952@dbc.mtview.ca.us>")
    assert timestamp == "<1896.697170952@dbc.mtview.ca.us>"
    assert apop_digest(timestamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"


def test_apop_operamail_timestamp() -> None:
    greeting = (
        b"InterChange POP3 Server v3.62 Ready (X-INF-V1) <1BC07518.3C649B3F@operamail.com>"
    )
    assert find_apop_timestamp(greeting) == "<1BC07518.3C649B3F@operamail.com>"


@pytest.mark.parametrize(
    "greeting",
    [
        b"ready",
        b"ready <no-at-sign>",
        b"ready <a@b",
        b"ready <>",
        b"ready <@>",
        b"ready <a b@c>",
        b"ready <\x80\x81@collision>",
        b"ready <a@b\x00c>",
        b"ready <a<b@c>",
        b"ready <a@>",
    ],
    ids=["none", "no-at", "unclosed", "empty", "bare-at", "space", "8bit", "nul", "lt", "no-dom"],
)
def test_apop_timestamp_must_be_a_msg_id(greeting: bytes) -> None:
    # CVE-2007-1558: a server-chosen timestamp with arbitrary bytes enables MD5 collisions.
    assert find_apop_timestamp(greeting) is None


def test_format_command() -> None:
    assert format_command("STAT") == b"STAT\r\n"
    assert format_command("TOP", "2", "5") == b"TOP 2 5\r\n"
    assert format_command("PASS", "with space") == b"PASS with space\r\n"


@pytest.mark.parametrize("bad", ["a\r\nDELE 1", "a\nb", "a\rb", "a\0b", "\r\n"])
def test_format_command_refuses_line_breaks_and_nul(bad: str) -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        format_command("USER", bad)


@pytest.mark.parametrize(
    ("verb", "extra"), [("RETR", ()), ("TOP", ("0",)), ("TOP", ("25",)), ("DELE", ())]
)
def test_format_numbered_is_format_command(verb: str, extra: tuple[str, ...]) -> None:
    format_line = pop3lite.format_numbered(verb, *extra)
    for number in (1, 9, 10, 4321, 10**19):
        assert format_line(number) == format_command(verb, str(number), *extra)
    with pytest.raises(ValueError, match="255"):
        pop3lite.format_numbered("TOP", "9" * 240)(10**20)
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        pop3lite.format_numbered("TOP", "1\r\nDELE 1")


def test_format_command_enforces_255_octets() -> None:
    assert len(format_command("USER", "u" * 248)) == 255
    with pytest.raises(ValueError, match="256 octets"):
        format_command("USER", "u" * 249)


def test_format_command_error_carries_no_password() -> None:
    with pytest.raises(ValueError) as info:
        format_command("PASS", "s3cret\ud800", encoding="utf-8")
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert "s3cret" not in str(info.value)


def test_format_command_encoding() -> None:
    with pytest.raises(ValueError, match="not ascii"):
        format_command("USER", "j\u00f6rg")
    assert format_command("USER", "j\u00f6rg", encoding="utf-8") == b"USER j\xc3\xb6rg\r\n"
    with pytest.raises(TypeError):
        format_command("USER", b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "1", None])
def test_message_number_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError):
        message_number(bad)


def test_display_text_escapes_control_characters() -> None:
    assert display_text(b"ok \x1b[31mred\x07") == "ok \\x1b[31mred\\x07"
    assert display_text(b"caf\xc3\xa9 \xff") == "caf\u00e9 \ufffd"
    assert display_text(b"\xc2\x9b") == "\\x9b"  # C1 control (CSI) as UTF-8


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("1.127.0.0", False),
        ("::2", False),
        ("fe80::1%lo", False),
    ],
)
def test_is_loopback(address: str, expected: bool) -> None:
    assert is_loopback(address) is expected


# -- header repair --------------------------------------------------------------------------

SEED_SUBJECT_2 = (
    b"Subject: =?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI\r\n"
    b" +?=\r\n"
)


def test_repair_relabels_shift_jis_sent_as_iso_2022_jp() -> None:
    import email.policy
    from email.parser import BytesParser

    repaired = pop3lite.repair_encoded_words(SEED_SUBJECT_2)
    assert repaired.startswith(b"Subject: =?cp932?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5")
    parsed = BytesParser(policy=email.policy.default).parsebytes(repaired + b"\r\n")
    assert parsed["Subject"] == "\u300c\uff23\uff33\uff23\u304b\u3089\u306e\u8033\u3088\u308a" \
        "\u306a\u304a\u77e5\u3089\u305b\u300d<\u51fa\u4f1a\u3044\u7de8>"


@pytest.mark.parametrize(
    "header",
    [
        b"Subject: =?iso-2022-jp?B?GyRCIXcbKEJJVBskQj83Q2VCLkpzGyhCIC0gMjA=?=\r\n",
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n",
        b"Subject: =?x-unknown?B?gXWC?=\r\n",
        b"Subject: plain text =? not a word ?=\r\n",
        b"Subject: =?iso-2022-jp?B?not*base64?=\r\n",
    ],
    ids=["valid-jis", "q-encoding", "unknown-charset", "no-word", "bad-base64"],
)
def test_repair_leaves_good_or_unknown_words_alone(header: bytes) -> None:
    assert pop3lite.repair_encoded_words(header) == header


@pytest.mark.parametrize("charset", [b"undefined", b"base64", b"zlib", b"rot13"])
def test_repair_ignores_codecs_that_are_not_text_charsets(charset: bytes) -> None:
    header = b"Subject: =?" + charset + b"?B?gXWC?=\r\n"
    assert pop3lite.repair_encoded_words(header) == header


# -- multi-line framing ---------------------------------------------------------------------

FRAMING_CASES = {
    "empty": (b".\r\n", b""),
    "one-line": (b"hello\r\n.\r\n", b"hello\r\n"),
    "stuffed": (b"..\r\n...x\r\nmid..dle\r\n..\r\n.\r\n", b".\r\n..x\r\nmid..dle\r\n.\r\n"),
    "blank-lines": (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
    "dot-in-text": (b"a.\r\n.b\r\n.\r\n", b"a.\r\n.b\r\n"),
    "stuffed-first": (b"..first\r\nsecond\r\n.\r\n", b".first\r\nsecond\r\n"),
}


def frame_whole(raw: bytes, eol: bytes = b"\r\n") -> tuple[bytes, int]:
    end = find_body_end(raw, 0, 0, eol)
    assert end >= 0
    return unstuff(raw[:end], eol), end + len(eol) + 1


@pytest.mark.parametrize(("raw", "body"), FRAMING_CASES.values(), ids=FRAMING_CASES.keys())
def test_framing_whole_input_and_trailing_data(raw: bytes, body: bytes) -> None:
    assert frame_whole(raw) == (body, len(raw))
    # Trailing data (the next pipelined response) is not part of the body.
    assert frame_whole(raw + b"+OK next\r\n.\r\n") == (body, len(raw))


@pytest.mark.parametrize(("raw", "body"), FRAMING_CASES.values(), ids=FRAMING_CASES.keys())
def test_framing_every_prefix_is_incomplete(raw: bytes, body: bytes) -> None:
    for cut in range(len(raw)):
        assert find_body_end(raw[:cut], 0, 0, b"\r\n") == -1, cut


@pytest.mark.parametrize(("raw", "body"), FRAMING_CASES.values(), ids=FRAMING_CASES.keys())
def test_framing_incremental_search_matches_whole(raw: bytes, body: bytes) -> None:
    # Feed a byte at a time, searching only from where the last search left off (minus the
    # overlap the transport keeps), as the transport does.
    buf = b""
    search = 0
    for i in range(len(raw)):
        buf += raw[i : i + 1]
        end = find_body_end(buf, 0, search, b"\r\n")
        if end >= 0:
            assert i == len(raw) - 1
            assert unstuff(buf[:end]) == body
            break
        search = max(0, len(buf) - 4)
    else:
        raise AssertionError("terminator never found")


def test_framing_bare_lf() -> None:
    raw = b"a\n..b\n.\n"
    end = find_body_end(raw, 0, 0, b"\n")
    assert to_crlf(unstuff(raw[:end], b"\n")) == b"a\r\n.b\r\n"


def test_framing_respects_end_bound() -> None:
    raw = b"abc\r\n.\r\n"
    assert find_body_end(raw, 0, 0, b"\r\n", end=len(raw) - 1) == -1
    assert find_body_end(raw, 0, 0, b"\r\n", end=len(raw)) == 5


def test_unstuff_not_at_line_start() -> None:
    assert unstuff(b"..tail\r\n..x\r\n", at_line_start=False) == b"..tail\r\n.x\r\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"abc\r\ndef\r\ngh", (10, True)),
        (b"abc\r\n", (5, True)),
        (b"abcdef", (6, False)),
        (b"abcde\r", (5, False)),
    ],
)
def test_safe_cut(data: bytes, expected: tuple[int, bool]) -> None:
    assert safe_cut(data, 0, len(data), b"\r\n") == expected


# =============================================================================================
# Client against a scripted peer: exact bytes
# =============================================================================================


def test_greeting_and_timestamp() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"QUIT\r\n", b"+OK bye\r\n")

    with scripted(script) as port, connect(port) as pop:
        assert pop.greeting == "POP3 ready <1896.697170952@dbc.mtview.ca.us>"
        assert pop.timestamp == "<1896.697170952@dbc.mtview.ca.us>"
        assert "127.0.0.1" in repr(pop) and "authorization" in repr(pop)


def test_greeting_err_raises_typed_error() -> None:
    def script(peer: Peer) -> None:
        peer.send(b"-ERR [SYS/TEMP] too many connections\r\n")

    with scripted(script) as port, pytest.raises(pop3lite.TemporaryError) as info:
        connect(port)
    assert info.value.text == "too many connections"


_WITHOUT_LOGGING = """
import socket, sys, threading
import pop3lite
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
listener.settimeout(10)

def serve():
    conn, _ = listener.accept()
    conn.settimeout(10)
    conn.sendall(b"+OK ready\\r\\n")
    for reply in (b"+OK\\r\\n", b"+OK bye\\r\\n"):
        conn.recv(100)
        conn.sendall(reply)
    conn.close()

threading.Thread(target=serve, daemon=True).start()
with pop3lite.POP3("127.0.0.1", listener.getsockname()[1], tls="none", timeout=10) as pop:
    pop.noop()
print("logging" in sys.modules)
"""


def test_a_session_does_not_import_logging_unless_the_program_did() -> None:
    # Nothing can have configured a logger that nothing imported: the import (a few ms of a
    # short session) is saved. Once the program imports logging, the log works (see below).
    import os
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LOGGING], capture_output=True, timeout=60, cwd=here
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"False"]


def test_apop_sends_digest_and_never_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"-ERR no CAPA\r\n")  # before login: PIPELINING? UTF8?
        peer.expect(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n", b"+OK maildrop ready\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    caplog.set_level(logging.DEBUG, logger="pop3lite")
    with scripted(script) as port, connect(port) as pop:
        assert pop.apop("mrose", "tanstaaf") == "maildrop ready"
    assert "C: APOP mrose ****" in caplog.text
    assert "c4c9334b" not in caplog.text and "tanstaaf" not in caplog.text


def test_auth_without_initial_response_is_logged_as_sent(caplog: pytest.LogCaptureFixture) -> None:
    # "C: AUTH CRAM-MD5 ****" in a -v transcript (seen against Courier) claimed an initial
    # response that was never sent; RFC 2195's example exchange.
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"-ERR\r\n")  # as popa3d: no PIPELINING, no UTF8
        peer.expect(
            b"AUTH CRAM-MD5\r\n", b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n"
        )
        peer.expect(b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    caplog.set_level(logging.DEBUG, logger="pop3lite")
    with scripted(script) as port, connect(port) as pop:
        pop.auth("CRAM-MD5", "tim", "tanstaaftanstaaf")
    commands = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C:")]
    assert commands[:3] == ["C: CAPA", "C: AUTH CRAM-MD5", "C: ****"]
    assert "dGlt" not in caplog.text and "tanstaaf" not in caplog.text


def test_apop_without_timestamp_refuses_before_sending() -> None:
    def script(peer: Peer) -> None:
        peer.send(b"+OK no timestamp here\r\n")
        assert peer.eof()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(ValueError, match="no APOP timestamp"):
            pop.apop("user", "pw")
        pop.close()


def test_login_logs_are_redacted_and_errors_are_typed(caplog: pytest.LogCaptureFixture) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"-ERR no CAPA\r\n")  # before login: PIPELINING? UTF8?
        peer.expect(b"USER alice\r\n", b"+OK\r\n")
        peer.expect(b"PASS s3cret pass\r\n", b"-ERR [AUTH] invalid login\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    caplog.set_level(logging.DEBUG, logger="pop3lite")
    with scripted(script) as port, connect(port) as pop:
        with pytest.raises(pop3lite.AuthenticationError) as info:
            pop.login("alice", "s3cret pass")
        assert info.value.code == "AUTH"
        assert "s3cret" not in str(info.value) and "s3cret" not in repr(pop)
    assert "C: PASS ****" in caplog.text
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize("field", ["user", "password"])
def test_crlf_injection_is_refused_before_anything_is_sent(field: str) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        assert peer.eof()  # nothing at all reached the wire

    with scripted(script) as port:
        pop = connect(port)
        args = {"user": "alice", "password": "pw"}
        args[field] = "x\r\nDELE 1"
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            pop.login(args["user"], args["password"])
        pop.close()


def test_stat_list_uidl_retr_top_dele_rset_noop_quit() -> None:
    message = b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"STAT\r\n", b"+OK 2 320\r\n")
        peer.expect(b"LIST\r\n", b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n")
        peer.expect(b"LIST 2\r\n", b"+OK 2 200\r\n")
        peer.expect(b"UIDL\r\n", b"+OK\r\n1 abc\r\n2 def\r\n.\r\n")
        peer.expect(b"UIDL 1\r\n", b"+OK 1 abc\r\n")
        peer.expect(b"RETR 1\r\n", b"+OK %d octets\r\n" % len(message) + stuffed + b".\r\n")
        peer.expect(b"TOP 1 0\r\n", b"+OK\r\nSubject: hi\r\n\r\n.\r\n")
        peer.expect(b"DELE 1\r\n", b"+OK message 1 deleted\r\n")
        peer.expect(b"RSET\r\n", b"+OK reset\r\n")
        peer.expect(b"NOOP\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK signing off\r\n")

    with scripted(script) as port:
        pop = connect(port)
        assert pop.stat() == (2, 320)
        assert pop.list() == {1: 120, 2: 200}
        assert pop.list(2) == 200
        assert pop.uidl() == {1: "abc", 2: "def"}
        assert pop.uidl(1) == "abc"
        assert pop.retr(1) == message
        assert pop.top(1, 0) == b"Subject: hi\r\n\r\n"
        assert pop.dele(1) == "message 1 deleted"
        assert pop.rset() == "reset"
        assert pop.noop() == ""
        assert pop.quit() == "signing off"
        with pytest.raises(pop3lite.NetworkError, match="connection closed"):
            pop.noop()


def test_uidl_reports_duplicates() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"UIDL\r\n", b"+OK\r\n1 same\r\n2 other\r\n3 same\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        uids = pop.uidl()
        assert uids == {1: "same", 2: "other", 3: "same"}
        assert uids.duplicates == {"same": [1, 3]}


def test_body_sent_one_byte_at_a_time() -> None:
    body = b"line one\r\n..dotted\r\n\r\n" + b"x" * 3000 + b"\r\n"

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        assert peer.line() == b"RETR 1\r\n"
        peer.send_bytewise(b"+OK\r\n" + body + b".\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        assert pop.retr(1) == body.replace(b"\r\n..", b"\r\n.")


def test_bare_lf_server_is_tolerated_and_bodies_become_crlf() -> None:
    def script(peer: Peer) -> None:
        peer.send(b"+OK hi\n")
        peer.expect(b"RETR 1\r\n", b"+OK\nSubject: x\n\n..dot\n.\n")
        peer.expect(b"QUIT\r\n", b"+OK\n")

    with scripted(script) as port, connect(port) as pop:
        assert pop.retr(1) == b"Subject: x\r\n\r\n.dot\r\n"


def test_line_ends_are_judged_per_response() -> None:
    # One LF-only greeting must not make the client expect LF framing forever after.
    def script(peer: Peer) -> None:
        peer.send(b"+OK hi\n")
        peer.expect(b"LIST\r\n", b"+OK\r\n1 5\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        assert pop.list() == {1: 5}


def test_bare_cr_is_a_protocol_error() -> None:
    def script(peer: Peer) -> None:
        peer.send(b"+OK hi\rthere\r\n")

    with scripted(script) as port, pytest.raises(pop3lite.ProtocolError, match="bare CR"):
        connect(port)


def test_overlong_status_line_closes_the_connection() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(b"+OK " + b"x" * (pop3lite.MAX_RESPONSE_LINE + 10))
        assert peer.eof()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.LimitExceeded):
            pop.noop()
        with pytest.raises(pop3lite.NetworkError, match="connection closed"):
            pop.noop()


def test_message_over_the_size_limit_closes_the_connection() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(b"+OK\r\n" + b"y" * 5000 + b"\r\n.\r\n")
        assert peer.eof()

    with scripted(script) as port:
        pop = connect(port, max_message_size=4096)
        with pytest.raises(pop3lite.LimitExceeded, match="4096"):
            pop.retr(1)
        assert "closed" in repr(pop)


@pytest.mark.parametrize("cut", [b"+OK\r\npartial", b"+OK\r\npartial\r\n", b"+OK\r\n.."])
def test_eof_inside_multiline_is_truncated_response(cut: bytes) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(cut)

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.TruncatedResponse) as info:
            pop.retr(1)
        assert isinstance(info.value, ConnectionError)


@pytest.mark.parametrize("method", ["retr", "retr_to"])
def test_eof_right_after_the_status_line_is_truncated_response(method: str) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(b"+OK 5 octets\r\n")

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.TruncatedResponse):
            if method == "retr":
                pop.retr(1)
            else:
                pop.retr_to(1, io.BytesIO())


def test_failed_write_in_retr_to_closes_the_connection() -> None:
    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        # More than one streaming piece, no terminator yet: the client writes mid-response.
        filler = b"x" * 998 + b"\r\n"
        peer.expect(b"RETR 1\r\n", b"+OK\r\n+OK this line is message 1\r\n" + filler * 300)
        assert peer.eof()  # the client hung up instead of waiting for the rest

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(OSError, match="No space"):
            pop.retr_to(1, FullDisk())
        # Without closing, RETR 2 would take message 1's "+OK this line..." as its answer.
        with pytest.raises(pop3lite.NetworkError, match="connection closed"):
            pop.retr(2)


def test_retr_to_finishes_partial_writes() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.data = b""

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            self.data += bytes(data[:3])
            return min(3, len(data))

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"RETR 1\r\n", b"+OK\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        out = Trickle()
        assert pop.retr_to(1, out) == len(b"Subject: x\r\n\r\nbody\r\n")
        assert out.data == b"Subject: x\r\n\r\nbody\r\n"


def test_expired_deadline_is_a_timeout_on_every_python() -> None:
    # On 3.7-3.9 socket.timeout is not TimeoutError; the deadline check must not be
    # mistaken for a network failure.
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.eof()

    with scripted(script) as port:
        pop = connect(port)
        pop._transport.deadline = time.monotonic() - 1
        with pytest.raises(pop3lite.Timeout):
            pop._transport.send(b"NOOP\r\n")


def test_single_line_traffic_does_not_grow_the_buffer() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        for _ in range(300):
            peer.expect(b"NOOP\r\n", b"+OK " + b"n" * 400 + b"\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        for _ in range(300):
            pop.noop()
        assert pop._reader.pending == 0
        assert pop._reader.capacity <= pop3lite.RECV_SIZE


def test_eof_instead_of_answer_is_network_error() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.NetworkError, match="closed the connection"):
            pop.stat()


def test_two_answers_to_one_command_close_the_connection() -> None:
    # An extra response means the session is out of step: trusting the next line would
    # pair every later answer with the wrong command.
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"NOOP\r\n", b"+OK\r\n-ERR surprise\r\n")

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.ProtocolError, match="more than was asked"):
            pop.noop()
        with pytest.raises(pop3lite.NetworkError):
            pop.stat()


def test_trickling_server_cannot_stretch_the_deadline() -> None:
    stop = threading.Event()

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.send(b"+OK\r\n")
        for _ in range(100):  # one byte every 50 ms: 5 s at most, far past the deadline
            if stop.wait(0.05):
                return
            try:
                peer.send(b"z")
            except OSError:
                return

    with scripted(script) as port:
        pop = connect(port, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(pop3lite.Timeout):
            pop.retr(1)
        elapsed = time.monotonic() - started
        stop.set()
    assert elapsed < 2.0, elapsed


def test_silent_server_times_out() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()
        peer.eof()  # wait for the client to give up

    with scripted(script) as port:
        pop = connect(port, timeout=0.3)
        with pytest.raises(TimeoutError):
            pop.stat()


def test_context_manager_quits_on_success_and_aborts_on_error() -> None:
    def clean(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"DELE 1\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(clean) as port, connect(port) as pop:
        pop.dele(1)

    def failing(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"DELE 1\r\n", b"+OK\r\n")
        assert peer.eof(), "QUIT must not be sent when the block raised"

    with scripted(failing) as port, pytest.raises(RuntimeError):  # noqa: PT012
        with connect(port) as pop:
            pop.dele(1)
            raise RuntimeError("disk full")


def test_strict_size_error_in_a_batch_keeps_numbers_right() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"LIST\r\n", b"+OK\r\n1 9\r\n2 9\r\n.\r\n")
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        assert [peer.line() for _ in range(2)] == [b"RETR 1\r\n", b"RETR 2\r\n"]
        peer.send(b"+OK 99 octets\r\none\r\n.\r\n+OK 5 octets\r\ntwo\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port, strict_size=True) as pop:
        batch = pop.retr_many(pop.list())
        with pytest.raises(pop3lite.ProtocolError, match="announced 99"):
            next(batch)
        assert next(batch) == (2, b"two\r\n", None)


def test_strict_size_error_read_ahead_comes_from_the_batch_not_the_other_command() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"LIST\r\n", b"+OK\r\n1 9\r\n2 9\r\n.\r\n")
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        assert [peer.line() for _ in range(2)] == [b"RETR 1\r\n", b"RETR 2\r\n"]
        peer.send(b"+OK 3 octets\r\na\r\n.\r\n+OK 99 octets\r\ntwo\r\n.\r\n")
        peer.expect(b"DELE 1\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port, strict_size=True) as pop:
        batch = pop.retr_many(pop.list())
        assert next(batch) == (1, b"a\r\n", None)
        assert pop.dele(1) == ""  # reads RETR 2's reply ahead; its size error waits in line
        with pytest.raises(pop3lite.ProtocolError, match="announced 99"):
            next(batch)
        assert list(batch) == []


def test_size_mismatch_warns_or_raises() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        for _ in range(2):
            peer.expect(b"RETR 1\r\n", b"+OK 99 octets\r\nshort\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        with pytest.warns(pop3lite.SizeMismatchWarning, match="announced 99"):
            assert pop.retr(1) == b"short\r\n"
        pop.strict_size = True
        with pytest.raises(pop3lite.ProtocolError, match="announced 99"):
            pop.retr(1)


def test_retr_to_streams_large_message_across_chunks() -> None:
    lines = [b"..%06d" % i + b"." * (i % 7) for i in range(60000)]
    message = b"".join(line[1:] + b"\r\n" for line in lines)  # unstuffed form
    wire = b"".join(line + b"\r\n" for line in lines)

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"RETR 1\r\n", b"+OK %d octets\r\n" % len(message) + wire + b".\r\n")
        peer.expect(b"RETR 1\r\n", b"+OK %d octets\r\n" % len(message) + wire + b".\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        out = io.BytesIO()
        assert pop.retr_to(1, out) == len(message)
        assert out.getvalue() == message
        assert pop.retr(1) == message  # the large-body path of retr()


def test_pipelining_sends_ahead_and_keeps_order() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"LIST\r\n", b"+OK\r\n1 5\r\n2 5\r\n3 7\r\n.\r\n")
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        # All three commands arrive before any answer is sent: they were pipelined.
        commands = [peer.line() for _ in range(3)]
        assert commands == [b"RETR 1\r\n", b"RETR 2\r\n", b"RETR 3\r\n"]
        peer.send(b"+OK\r\none\r\n.\r\n-ERR no such message\r\n+OK\r\nthree\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        results = list(pop.retr_many(pop.list()))
        assert [r.number for r in results] == [1, 2, 3]
        assert results[0].data == b"one\r\n" and results[2].data == b"three\r\n"
        assert results[1].data is None
        assert isinstance(results[1].error, pop3lite.ServerError)
        assert results[1].error.text == "no such message"


def test_without_pipelining_batch_goes_one_at_a_time() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"-ERR unknown command\r\n")
        peer.expect(b"DELE 1\r\n", b"+OK\r\n")
        peer.expect(b"DELE 2\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        assert [r.error for r in pop.dele_many([1, 2])] == [None, None]


def test_command_inside_a_batch_keeps_the_session_in_step() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        assert [peer.line() for _ in range(2)] == [b"RETR 1\r\n", b"RETR 2\r\n"]
        peer.send(b"+OK\r\none\r\n.\r\n+OK\r\ntwo\r\n.\r\n")
        peer.expect(b"DELE 1\r\n", b"+OK\r\n")
        peer.expect(b"DELE 2\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        seen = []
        for item in pop.retr_many([1, 2]):
            seen.append(item.data)
            pop.dele(item.number)  # interleaved: the batch's answers are queued first
        assert seen == [b"one\r\n", b"two\r\n"]


def test_abandoned_batch_is_drained_before_the_next_command() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"LIST\r\n", b"+OK\r\n1 10\r\n2 10\r\n3 10\r\n.\r\n")
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        assert [peer.line() for _ in range(3)] == [b"TOP 1 0\r\n", b"TOP 2 0\r\n", b"TOP 3 0\r\n"]
        peer.send(b"+OK\r\na\r\n.\r\n+OK\r\nb\r\n.\r\n+OK\r\nc\r\n.\r\n")
        peer.expect(b"STAT\r\n", b"+OK 3 30\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        first = next(pop.top_many(pop.list(), 0))
        assert first.data == b"a\r\n"
        assert pop.stat() == (3, 30)


def test_pipeline_keeps_expected_response_octets_within_budget() -> None:
    # Messages of 5 MiB each (by LIST): with an 8 MiB budget only one RETR may be in flight
    # beyond the first, so an interrupted batch never holds more than that in memory.
    big = 5 * 1024 * 1024

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"LIST\r\n", b"+OK\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % (big, big, big))
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        assert peer.line() == b"RETR 1\r\n"
        peer.conn.settimeout(0.3)
        with pytest.raises(socket.timeout):
            peer.conn.recv(1)  # RETR 2 would exceed the budget: not sent yet
        peer.conn.settimeout(TIMEOUT)
        for number in (1, 2, 3):
            peer.send(b"+OK\r\nsmall %d\r\n.\r\n" % number)
            if number < 3:
                assert peer.line() == b"RETR %d\r\n" % (number + 1)
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        assert [r.data for r in pop.retr_many(pop.list())] == [
            b"small 1\r\n", b"small 2\r\n", b"small 3\r\n"]


def test_a_maildrop_within_the_budget_is_pipelined_at_once() -> None:
    # STAT says the whole maildrop is 30 octets: no batch can hold more, so every RETR goes
    # out in the first write instead of two, then the rest after the first answer.
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"STAT\r\n", b"+OK 3 30\r\n")
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        assert [peer.line() for _ in range(3)] == [b"RETR 1\r\n", b"RETR 2\r\n", b"RETR 3\r\n"]
        peer.send(b"+OK\r\na\r\n.\r\n+OK\r\nb\r\n.\r\n+OK\r\nc\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        count, _ = pop.stat()
        fetched = [r.data for r in pop.retr_many(range(1, count + 1))]
        assert fetched == [b"a\r\n", b"b\r\n", b"c\r\n"]


def test_max_message_size_bounds_the_first_window() -> None:
    # Sizes unknown: no reply can exceed max_message_size (1 MiB), so the 8 MiB budget holds
    # eight of them in flight from the start.
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        assert [peer.line() for _ in range(8)] == [b"RETR %d\r\n" % n for n in range(1, 9)]
        peer.conn.settimeout(0.3)
        with pytest.raises(socket.timeout):
            peer.conn.recv(1)  # RETR 9 would exceed the budget: not sent yet
        peer.conn.settimeout(TIMEOUT)
        peer.send(b"+OK\r\nx\r\n.\r\n" * 8)
        assert peer.line() == b"RETR 9\r\n"
        peer.send(b"+OK\r\nx\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port, max_message_size=1024 * 1024) as pop:
        assert len(list(pop.retr_many(range(1, 10)))) == 9


def test_pipeline_window_bounds_commands_in_flight() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"+OK\r\nPIPELINING\r\n.\r\n")
        # window=2: only two commands may be outstanding before the first answer.
        assert [peer.line() for _ in range(2)] == [b"DELE 1\r\n", b"DELE 2\r\n"]
        peer.conn.settimeout(0.3)
        with pytest.raises(socket.timeout):
            peer.conn.recv(1)
        peer.conn.settimeout(TIMEOUT)
        peer.send(b"+OK\r\n+OK\r\n")
        assert [peer.line() for _ in range(2)] == [b"DELE 3\r\n", b"DELE 4\r\n"]
        peer.send(b"+OK\r\n+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port, pipeline_window=2) as pop:
        assert len(list(pop.dele_many([1, 2, 3, 4]))) == 4


def test_calls_after_close_say_the_connection_is_closed() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)

    with scripted(script) as port:
        pop = connect(port)
        pop.abort()
        with pytest.raises(pop3lite.NetworkError, match="aborted by the client"):
            pop.stat()
        pop.close()  # closing twice is harmless


def test_caller_mistakes_raise_value_error() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        assert peer.eof()

    with scripted(script) as port:
        pop = connect(port)
        for call in (
            lambda: pop.retr(0),
            lambda: pop.dele(-3),
            lambda: pop.top(1, -1),
            lambda: pop.list(True),
            lambda: list(pop.retr_many([1, "2"])),  # type: ignore[list-item]
        ):
            with pytest.raises(ValueError):
                call()
        pop.close()
    with pytest.raises(ValueError):
        pop3lite.POP3("127.0.0.1", 1, tls="sometimes")


# -- wrong answers are not accepted (issue 13) -----------------------------------------------


@pytest.mark.parametrize(
    ("call", "command", "reply"),
    [
        (lambda pop: pop.list(1), b"LIST 1\r\n", b"+OK 99 1024\r\n"),
        (lambda pop: pop.uidl(1), b"UIDL 1\r\n", b"+OK 99 101\r\n"),
    ],
    ids=["LIST", "UIDL"],
)
def test_a_reply_for_another_message_is_refused_in_step(
    call: Callable[[pop3lite.POP3], Any], command: bytes, reply: bytes
) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(command, reply)
        peer.expect(b"NOOP\r\n", b"+OK still here\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        with pytest.raises(pop3lite.ProtocolError, match="answered for message 99"):
            call(pop)
        assert pop.noop() == "still here"  # the session stayed in step


@pytest.mark.parametrize("verb", ["LIST", "UIDL"])
def test_a_listing_beyond_the_maildrop_is_refused(verb: str) -> None:
    line = b"8 8192" if verb == "LIST" else b"8 uid8"

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"STAT\r\n", b"+OK 7 7000\r\n")
        peer.expect(verb.encode() + b"\r\n", b"+OK\r\n1 1\r\n" + line + b"\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        pop.stat()
        with pytest.raises(pop3lite.ProtocolError, match="message 8, but the maildrop"):
            pop.list() if verb == "LIST" else pop.uidl()


def test_a_listing_may_name_messages_hidden_by_dele_then_rset() -> None:
    # STAT counts only messages not marked: after DELE 7 it says 6, yet 7 still exists.
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"DELE 7\r\n", b"+OK\r\n")
        peer.expect(b"STAT\r\n", b"+OK 6 6000\r\n")
        peer.expect(b"RSET\r\n", b"+OK\r\n")
        listing = b"".join(b"%d 1000\r\n" % n for n in range(1, 8))
        peer.expect(b"LIST\r\n", b"+OK\r\n" + listing + b".\r\n")
        peer.expect(b"UIDL\r\n", b"+OK\r\n1 a\r\n9 b\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        pop.dele(7)
        assert pop.stat() == (6, 6000)
        pop.rset()
        assert max(pop.list()) == 7
        with pytest.raises(pop3lite.ProtocolError, match="message 9"):
            pop.uidl()


def test_an_earlier_listing_bounds_a_later_one() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"LIST\r\n", b"+OK\r\n1 10\r\n2 20\r\n.\r\n")
        peer.expect(b"UIDL\r\n", b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        pop.list()
        with pytest.raises(pop3lite.ProtocolError, match="message 3, but the maildrop has only"):
            pop.uidl()


def test_utf8_after_login_is_refused_without_sending() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"-ERR no CAPA\r\n")  # before login: PIPELINING? UTF8?
        peer.expect(b"USER u\r\n", b"+OK\r\n")
        peer.expect(b"PASS p\r\n", b"+OK\r\n")
        peer.expect(b"NOOP\r\n", b"+OK\r\n")  # not UTF8: nothing was sent for it
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        pop.login("u", "p")
        with pytest.raises(ValueError, match="RFC 6856"):
            pop.utf8()
        pop.noop()


# -- command(): any command, with the same checks ----------------------------------------------


def test_command_single_and_multi_line() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"NOOP\r\n", b"+OK fine\r\n")
        peer.expect(b"LIST\r\n", b"+OK 1 messages\r\n1 5\r\n.\r\n")
        peer.expect(b"LIST 1\r\n", b"+OK 1 5\r\n")
        peer.expect(b"TOP 1 0\r\n", b"+OK\r\n..dot\r\n.\r\n")
        peer.expect(b"XTND XLST\r\n", b"+OK\r\na\r\n.\r\n")
        peer.expect(b"DELE 9\r\n", b"-ERR [SYS/PERM] no such message\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        assert pop.command("NOOP") == (b"fine", None)
        assert pop.command("list") == (b"1 messages", b"1 5\r\n")
        assert pop.command("LIST", "1") == (b"1 5", None)
        assert pop.command("TOP", "1", "0").body == b".dot\r\n"
        assert pop.command("XTND", "XLST", multiline=True) == (b"", b"a\r\n")
        with pytest.raises(pop3lite.PermanentError) as caught:
            pop.command("DELE", "9")
        assert caught.value.command == "DELE"


@pytest.mark.parametrize(
    "verb",
    ["USER", "PASS", "APOP", "AUTH", "STLS", "UTF8", "QUIT", "NOOP\r\nDELE", "PASS x", " QUIT"]
    + ["Q"],
)
def test_command_refuses_verbs_with_their_own_method(verb: str) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"NOOP\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        with pytest.raises(ValueError, match=r"\(\)|not a POP3 keyword"):
            pop.command(verb.lower(), "x")
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            pop.command("NOOP", "a\r\nDELE 1")
        pop.noop()


# -- errors carry reasons -----------------------------------------------------------------


def test_a_silent_greeting_ends_after_greeting_timeout_with_its_reason() -> None:
    def script(peer: Peer) -> None:
        peer.hold()  # as a port that waits for a TLS ClientHello

    with scripted(script) as port:
        with pytest.raises(pop3lite.Timeout, match="no greeting .* within 0.2s") as caught:
            connect(port, timeout=TIMEOUT, greeting_timeout=0.2)
    assert caught.value.reason == "greeting"


def test_network_errors_say_why_in_reason() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(pop3lite.NetworkError) as caught:
            connect(port)
    assert caught.value.reason == "connect"

    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.line()

    with scripted(script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.NetworkError) as caught:
            pop.noop()
        with pytest.raises(pop3lite.NetworkError) as again:
            pop.noop()
    assert again.value.reason == "closed"


# =============================================================================================
# Client against fakeserver.py: the seed's session, TLS, SASL, response codes
# =============================================================================================

import ssl  # noqa: E402  (the sections above must not need ssl)

import fakeserver  # noqa: E402

SEED_USER, SEED_PASSWORD = "hogehoge", "fugafuga"


def client_context() -> ssl.SSLContext:
    return ssl.create_default_context(cadata=fakeserver.CA_PEM)


def fake_connect(server: fakeserver.FakeServer, **kwargs: Any) -> pop3lite.POP3:
    kwargs.setdefault("timeout", TIMEOUT)
    if server_tls(server):
        kwargs.setdefault("ssl_context", client_context())
        host = "localhost"
    else:
        kwargs.setdefault("tls", "none")
        host = server.host
    return pop3lite.POP3(host, server.port, **kwargs)


def server_tls(server: fakeserver.FakeServer) -> bool:
    return bool(getattr(server, "tls", None))


def test_seed_session_against_the_fake_operamail() -> None:
    with fakeserver.FakeServer() as server:
        with fake_connect(server) as pop:
            assert pop.greeting.startswith("InterChange POP3 Server v3.62 Ready")
            assert pop.timestamp == "<1BC07518.3C649B3F@operamail.com>"
            assert pop.login(SEED_USER, SEED_PASSWORD) == "Password accepted"
            assert pop.stat() == (2, 10180)
            assert pop.list() == {1: 5954, 2: 4226}
            top = pop.top(2, 5)
            assert top.startswith(b"Received: from platz.jp")
            first = pop.retr(1)
            assert len(first) == 5954
            assert pop.dele(1) == "message 1 deleted"
            assert pop.list() == {2: 4226}
            assert pop.rset() == "Everything has been reset"
            assert pop.list() == {1: 5954, 2: 4226}
            assert pop.message(1)["Subject"].startswith("\uff20IT\u65b0\u7740\u901f\u5831")
            # Message 2 labels Shift_JIS bytes as ISO-2022-JP; message() repairs that.
            assert pop.message(2)["Subject"].startswith("\u300c\uff23\uff33\uff23")
        transcript = server.transcripts[0]
    assert "C: PASS ****" in transcript
    assert "S: +OK 1 messages (4226 octets)" in transcript
    assert transcript[-1] == "S: +OK InterChange POP3 Server Signing Off"


def test_apop_against_the_fake_operamail() -> None:
    with fakeserver.FakeServer() as server, fake_connect(server) as pop:
        assert pop.apop(SEED_USER, SEED_PASSWORD)
        assert pop.stat() == (2, 10180)
    with fakeserver.FakeServer() as server, fake_connect(server) as pop:
        with pytest.raises(pop3lite.AuthenticationError):
            pop.apop(SEED_USER, "wrong")


def test_exception_inside_with_deletes_nothing(make_pop3_server: MakeServer) -> None:
    server = make_pop3_server("operamail")
    with pytest.raises(KeyError), fake_connect(server) as pop:
        pop.login(SEED_USER, SEED_PASSWORD)
        pop.dele(1)
        raise KeyError("the caller's own bug")
    server.wait_idle()  # the aborted session has let go of the maildrop
    with fake_connect(server) as pop:  # a second session sees both messages
        pop.login(SEED_USER, SEED_PASSWORD)
        assert pop.stat() == (2, 10180)
        pop.dele(1)
    with fake_connect(server) as pop:  # a clean exit sent QUIT: the deletion is committed
        pop.login(SEED_USER, SEED_PASSWORD)
        assert pop.list() == {1: 4226}


def test_retr_many_against_the_rfc_preset() -> None:
    with fakeserver.FakeServer(preset="rfc") as server, fake_connect(server) as pop:
        pop.login(SEED_USER, SEED_PASSWORD)
        sizes = pop.list()
        results = list(pop.retr_many([*sizes, 99]))
        for number, size in sizes.items():
            assert results[number - 1].data is not None
            assert len(results[number - 1].data or b"") == size
        assert results[-1].error is not None and results[-1].number == 99
        assert [r.data for r in results[:-1]] == [pop.retr(n) for n in sizes]
        stored = server.maildrops[SEED_USER].messages
        assert [r.data for r in results[:-1]] == list(stored)  # dot lines came through intact
        assert any(b"\r\n." in message for message in stored)


# -- TLS --------------------------------------------------------------------------------------


def test_implicit_tls_verifies_the_certificate(make_pop3_server: MakeServer) -> None:
    server = make_pop3_server(preset="rfc", tls="implicit")
    with fake_connect(server, tls="implicit") as pop:
        assert pop.tls_version in ("TLSv1.2", "TLSv1.3")
        assert pop.cipher
        assert pop.peer_certificate and pop.peer_certificate.get("subjectAltName")
        pop.login(SEED_USER, SEED_PASSWORD)
        assert pop.stat().count == 3


def test_untrusted_certificate_is_a_tls_error() -> None:
    with fakeserver.FakeServer(preset="rfc", tls="implicit") as server:
        with pytest.raises(pop3lite.TLSError, match="not trusted"):
            pop3lite.POP3("localhost", server.port, tls="implicit", timeout=TIMEOUT)
        commands = [line for line in server.transcripts[0] if line.startswith("C:")]
    assert commands == []


def fake_server_context(tmp_path: Any) -> ssl.SSLContext:
    """A server-side TLS context with the fake server's certificate, for scripted TLS peers."""
    (tmp_path / "server.pem").write_text(fakeserver.SERVER_CERT_PEM + fakeserver.SERVER_KEY_PEM)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "server.pem"))
    return context


def test_quit_ends_tls_with_close_notify(tmp_path: Any) -> None:
    # RFC 8446 section 6.1. Courier's couriertls logged "Unexpected SSL connection shutdown"
    # after every pop3lite session (tools/interop.sh, C:courier-tls-closed-with-close_notify).
    server_context = fake_server_context(tmp_path)
    ended: list[str] = []

    def script(peer: Peer) -> None:
        with server_context.wrap_socket(
            peer.conn, server_side=True, suppress_ragged_eofs=False
        ) as tls:
            peer.conn = tls
            peer.send(GREETING)
            peer.expect(b"QUIT\r\n", b"+OK bye\r\n")
            try:
                tls.unwrap()  # sends ours, then waits for the client's
            except (ssl.SSLError, OSError) as exc:
                ended.append(type(exc).__name__)
            else:
                ended.append("close_notify")

    with scripted(script) as port:
        pop = pop3lite.POP3("localhost", port, tls="implicit", ssl_context=client_context(),
                            timeout=TIMEOUT)
        pop.quit()
    assert ended == ["close_notify"]


def test_a_session_left_without_quit_still_ends_tls_with_close_notify(tmp_path: Any) -> None:
    # An exception in the with block closes without QUIT (nothing is committed), but the TLS
    # layer still ends cleanly: the server reads close_notify, not a cut connection.
    server_context = fake_server_context(tmp_path)
    ended: list[object] = []

    def script(peer: Peer) -> None:
        with server_context.wrap_socket(
            peer.conn, server_side=True, suppress_ragged_eofs=False
        ) as tls:
            tls.sendall(GREETING)
            try:
                ended.append(tls.recv(100))  # b"": close_notify came
            except (ssl.SSLError, OSError) as exc:
                ended.append(type(exc).__name__)

    with scripted(script) as port:
        with pytest.raises(KeyError):
            with pop3lite.POP3("localhost", port, tls="implicit", ssl_context=client_context(),
                               timeout=TIMEOUT):
                raise KeyError("the caller's own bug")
    assert ended == [b""]

def test_default_context_verifies_host_names_and_needs_tls12() -> None:
    default = pop3lite.POP3.__new__(pop3lite.POP3)
    default._ssl_context = None
    context = default._context()
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_stls_refreshes_capabilities_and_forgets_the_timestamp() -> None:
    with fakeserver.FakeServer(preset="rfc", tls="stls") as server:
        with fake_connect(server, tls="starttls") as pop:
            assert pop.tls_version
            assert pop.timestamp is None  # it came in plaintext
            assert "STLS" not in pop.capa()
            with pytest.raises(ValueError, match="APOP"):
                pop.apop(SEED_USER, SEED_PASSWORD)
            pop.login(SEED_USER, SEED_PASSWORD)
        commands = [line for line in server.transcripts[0] if line.startswith("C:")]
    assert commands[:3] == ["C: CAPA", "C: STLS", "C: CAPA"]


def test_auto_mode_uses_stls_on_loopback_when_offered() -> None:
    with fakeserver.FakeServer(preset="rfc", tls="stls") as server:
        pop = pop3lite.POP3("localhost", server.port, ssl_context=client_context(),
                            timeout=TIMEOUT)
        assert pop.tls_version
        pop.quit()
    with fakeserver.FakeServer(preset="rfc") as server:  # no STLS: loopback may stay plain
        pop = pop3lite.POP3(server.host, server.port, timeout=TIMEOUT)
        assert pop.tls_version is None
        pop.login(SEED_USER, SEED_PASSWORD)
        pop.quit()


def test_auto_mode_requires_stls_for_remote_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pop3lite, "is_loopback", lambda address: False)
    with fakeserver.FakeServer(preset="rfc") as server:
        with pytest.raises(pop3lite.TLSError, match="does not offer STLS"):
            pop3lite.POP3(server.host, server.port, timeout=TIMEOUT)
        commands = [line for line in server.transcripts[0] if line.startswith("C:")]
    assert commands == ["C: CAPA"]  # nothing else, certainly no credentials


@pytest.mark.parametrize("kind", ["stls-refused", "stls-absent"])
def test_required_stls_refused_or_absent_fails_before_credentials(kind: str) -> None:
    with fakeserver.FakeServer(preset="rfc", tls="stls", faults=[fakeserver.Fault(kind)]) as server:
        with pytest.raises(pop3lite.TLSError):
            pop3lite.POP3("localhost", server.port, tls="starttls", timeout=TIMEOUT,
                          ssl_context=client_context())
        commands = [line for line in server.transcripts[0] if line.startswith("C:")]
    assert not any(c.startswith(("C: USER", "C: PASS", "C: AUTH", "C: APOP")) for c in commands)


def test_plaintext_injected_after_stls_aborts(make_pop3_server: MakeServer) -> None:
    fault = fakeserver.Fault("stls-inject", value=b"+OK injected\r\n")
    server = make_pop3_server(preset="rfc", tls="stls", faults=[fault])
    with pytest.raises(pop3lite.TLSError, match="injection"):
        pop3lite.POP3("localhost", server.port, tls="starttls", timeout=TIMEOUT,
                      ssl_context=client_context())


def test_stalled_tls_handshake_times_out(make_pop3_server: MakeServer) -> None:
    fault = fakeserver.Fault("tls-stall")
    server = make_pop3_server(preset="rfc", tls="implicit", faults=[fault])
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        pop3lite.POP3("localhost", server.port, tls="implicit", timeout=0.5,
                      ssl_context=client_context())
    assert time.monotonic() - started < 3


def test_no_stls_after_utf8(make_pop3_server: MakeServer) -> None:
    server = make_pop3_server(preset="rfc", tls="stls")
    pop = pop3lite.POP3(server.host, server.port, tls="none", timeout=TIMEOUT)
    pop.utf8()
    with pytest.raises(ValueError, match="UTF8"):
        pop.stls()
    pop.close()


def test_password_never_crosses_plaintext_to_a_remote_host() -> None:
    with fakeserver.FakeServer(preset="rfc") as server:
        pop = pop3lite.POP3(server.host, server.port, tls="auto", timeout=TIMEOUT)
        pop.loopback = False  # as if the server were elsewhere and offered no STLS
        for attempt, what in (
            (lambda: pop.login(SEED_USER, SEED_PASSWORD), "a password"),
            (lambda: pop.auth("PLAIN", SEED_USER, SEED_PASSWORD), "a PLAIN credential"),
            (lambda: pop.auth("LOGIN", SEED_USER, SEED_PASSWORD), "a LOGIN credential"),
            (lambda: pop.login_oauth2(SEED_USER, "fake-oauth-token"), "a OAUTHBEARER credential"),
        ):
            with pytest.raises(pop3lite.InsecureError, match="tls='none'") as caught:
                attempt()
            assert (caught.value.what, caught.value.reason) == (what, "plaintext")
        # Challenge-response mechanisms never send the password: allowed.
        assert pop.auth("SCRAM-SHA-256", SEED_USER, SEED_PASSWORD) is not None
        pop.quit()
        commands = [line for line in server.transcripts[0] if line.startswith("C:")]
    assert not any(c.startswith(("C: USER", "C: PASS")) for c in commands)


# -- SASL ---------------------------------------------------------------------------------------

PASSWORD_MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]


@pytest.mark.parametrize("mechanism", PASSWORD_MECHANISMS)
def test_sasl_password_mechanisms(mechanism: str) -> None:
    with fakeserver.FakeServer(preset="rfc") as server:
        with fake_connect(server) as pop:
            pop.auth(mechanism, SEED_USER, SEED_PASSWORD)
            assert pop.stat().count == 3
        with fake_connect(server) as pop, pytest.raises(pop3lite.AuthenticationError):
            pop.auth(mechanism, SEED_USER, "wrong password")
        text = "\n".join(server.transcripts[0])
    assert SEED_PASSWORD not in text


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_oauth2_mechanisms_and_their_json_errors(
    mechanism: str, make_pop3_server: MakeServer
) -> None:
    server = make_pop3_server(preset="rfc")
    with fake_connect(server) as pop:
        pop.login_oauth2(SEED_USER, lambda: "fake-oauth-token", mechanism=mechanism)
    with fake_connect(server) as pop:
        with pytest.raises(pop3lite.AuthenticationError) as info:
            pop.login_oauth2(SEED_USER, "expired-token", mechanism=mechanism)
        assert info.value.details is not None
        assert "status" in info.value.details  # "401" (XOAUTH2) or "invalid_token" (RFC 7628)


def test_long_initial_response_goes_after_the_empty_challenge() -> None:
    # RFC 5034 section 4: an AUTH line over 255 octets must not carry the initial response.
    token = "t" * 400
    with fakeserver.FakeServer(preset="rfc", oauth_token=token) as server:
        with fake_connect(server) as pop:
            pop.login_oauth2(SEED_USER, token, mechanism="XOAUTH2")
        commands = [line for line in server.transcripts[0] if line.startswith("C:")]
    assert "C: AUTH XOAUTH2" in commands
    with fakeserver.FakeServer(preset="rfc") as server:
        with fake_connect(server) as pop:
            pop.login_oauth2(SEED_USER, "fake-oauth-token", mechanism="XOAUTH2")
        commands = [line for line in server.transcripts[0] if line.startswith("C:")]
    assert any(c.startswith("C: AUTH XOAUTH2 ") for c in commands)


def test_login_best_picks_the_strongest_and_tries_once() -> None:
    with fakeserver.FakeServer(preset="rfc") as server:
        with fake_connect(server) as pop:
            assert pop.login_best(SEED_USER, SEED_PASSWORD) == "SCRAM-SHA-256"
        with fake_connect(server) as pop, pytest.raises(pop3lite.AuthenticationError):
            pop.login_best(SEED_USER, "wrong")
        auth_lines = [c for c in server.transcripts[1] if c.startswith(("C: AUTH", "C: USER"))]
    assert len(auth_lines) == 1
    with fakeserver.FakeServer() as server, fake_connect(server) as pop:
        assert pop.login_best(SEED_USER, SEED_PASSWORD) == "USER"  # OperaMail has no CAPA


def test_scram_server_that_cannot_prove_itself_is_rejected() -> None:
    script = [
        (None, b"+OK ready\r\n"),
        ("AUTH", b"+ \r\n"),
    ]
    del script  # the scripted peer is more precise for this: see below

    def peer_script(peer: Peer) -> None:
        peer.send(b"+OK ready\r\n")
        peer.expect(b"CAPA\r\n", b"-ERR no CAPA\r\n")  # before login: PIPELINING? UTF8?
        line = peer.line()
        assert line.startswith(b"AUTH SCRAM-SHA-256 ")
        import base64

        client_first = base64.b64decode(line.split()[2])
        nonce = client_first.split(b"r=")[1]
        server_first = b"r=" + nonce + b"srv,s=" + base64.b64encode(b"salt") + b",i=4096"
        peer.send(b"+ " + base64.b64encode(server_first) + b"\r\n")
        peer.line()  # client-final with the proof
        peer.send(b"+ " + base64.b64encode(b"v=" + base64.b64encode(b"x" * 32)) + b"\r\n")
        assert peer.line() == b"*\r\n"  # the client cancels on a wrong server signature
        peer.send(b"-ERR cancelled\r\n")

    with scripted(peer_script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.ProtocolError, match="server signature"):
            pop.auth("SCRAM-SHA-256", SEED_USER, SEED_PASSWORD)
        pop.close()


def test_hostile_oauth_error_json_is_a_protocol_error() -> None:
    import base64

    def peer_script(peer: Peer) -> None:
        peer.send(b"+OK ready\r\n")
        peer.expect(b"CAPA\r\n", b"-ERR no CAPA\r\n")  # before login: PIPELINING? UTF8?
        assert peer.line().startswith(b"AUTH XOAUTH2 ")
        peer.send(b"+ " + base64.b64encode(b"[" * 20000) + b"\r\n")
        assert peer.line() == b"*\r\n"
        peer.send(b"-ERR cancelled\r\n")

    with scripted(peer_script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.ProtocolError, match="JSON"):
            pop.login_oauth2(SEED_USER, "token", mechanism="XOAUTH2")
        pop.close()


def test_server_that_accepts_a_cancelled_auth_is_dropped() -> None:
    def peer_script(peer: Peer) -> None:
        peer.send(b"+OK ready\r\n")
        peer.expect(b"CAPA\r\n", b"-ERR no CAPA\r\n")  # before login: PIPELINING? UTF8?
        assert peer.line() == b"AUTH CRAM-MD5\r\n"
        peer.send(b"+ %%%\r\n")
        assert peer.line() == b"*\r\n"
        peer.send(b"+OK welcome anyway\r\n")

    with scripted(peer_script) as port:
        pop = connect(port)
        with pytest.raises(pop3lite.ProtocolError, match="cancelled"):
            pop.auth("CRAM-MD5", SEED_USER, SEED_PASSWORD)
        with pytest.raises(pop3lite.NetworkError):
            pop.stat()


def test_undecodable_challenge_is_cancelled_with_star() -> None:
    def peer_script(peer: Peer) -> None:
        peer.send(b"+OK ready\r\n")
        peer.expect(b"CAPA\r\n", b"-ERR no CAPA\r\n")  # before login: PIPELINING? UTF8?
        assert peer.line() == b"AUTH CRAM-MD5\r\n"
        peer.send(b"+ not*base64!\r\n")
        assert peer.line() == b"*\r\n"
        peer.send(b"-ERR authentication cancelled\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(peer_script) as port, connect(port) as pop:
        with pytest.raises(pop3lite.ProtocolError, match="base64"):
            pop.auth("CRAM-MD5", SEED_USER, SEED_PASSWORD)


# -- response codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls", "code"),
    [
        ("in-use", pop3lite.InUseError, "IN-USE"),
        ("login-delay", pop3lite.LoginDelayError, "LOGIN-DELAY"),
        ("sys-temp", pop3lite.TemporaryError, "SYS/TEMP"),
        ("sys-perm", pop3lite.PermanentError, "SYS/PERM"),
        ("auth", pop3lite.AuthenticationError, "AUTH"),
    ],
)
def test_response_codes_become_exception_classes(kind: str, cls: type, code: str) -> None:
    fault = fakeserver.Fault(kind, command="PASS")
    with fakeserver.FakeServer(preset="rfc", faults=[fault]) as server, fake_connect(server) as pop:
        with pytest.raises(cls) as info:
            pop.login(SEED_USER, SEED_PASSWORD)
        assert info.value.code == code


def test_maildrop_lock_is_in_use_for_a_second_session(make_pop3_server: MakeServer) -> None:
    server = make_pop3_server(preset="rfc")
    with fake_connect(server) as first:
        first.login(SEED_USER, SEED_PASSWORD)
        with fake_connect(server) as second, pytest.raises(pop3lite.InUseError):
            second.login(SEED_USER, SEED_PASSWORD)


def test_utf8_credentials_need_the_utf8_user_capability() -> None:
    with fakeserver.FakeServer(preset="rfc") as server, fake_connect(server) as pop:
        if pop.capa().utf8_user:
            pytest.fail("the rfc preset is expected to say UTF8 without USER")
        with pytest.raises(ValueError, match="UTF8 USER"):
            pop.login("j\u00f6rg", "p\u00e4ss")


# -- issue 18: a pipelined login, QUIT behind the last batch -------------------------------------


PIPELINING_CAPA = b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n"


def logged_in_pipelined(peer: Peer) -> None:
    """The server side of connect() and login("u", "p") with PIPELINING offered."""
    peer.send(GREETING)
    peer.expect(b"CAPA\r\n", PIPELINING_CAPA)
    assert [peer.line(), peer.line()] == [b"USER u\r\n", b"PASS p\r\n"]
    peer.send(b"+OK\r\n+OK\r\n")


def test_user_and_pass_go_in_one_write_once_capa_shows_pipelining(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", PIPELINING_CAPA)
        # Both lines arrive before USER is answered: a client waiting for +OK would hang here.
        assert [peer.line(), peer.line()] == [b"USER alice\r\n", b"PASS s3cret\r\n"]
        assert peer.buf == b""  # nothing behind PASS (Courier would lose it)
        peer.send(b"+OK\r\n")
        peer.send(b"+OK logged in\r\n")
        peer.expect(b"STAT\r\n", b"+OK 0 0\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    caplog.set_level(logging.DEBUG, logger="pop3lite")
    with scripted(script) as port, connect(port) as pop:
        assert pop.login("alice", "s3cret") == "logged in"
        assert pop.stat() == (0, 0)
    assert "C: USER alice" in caplog.text and "C: PASS ****" in caplog.text
    assert "s3cret" not in caplog.text


def test_a_refused_user_in_a_pipelined_login_reads_both_replies() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", PIPELINING_CAPA)
        assert [peer.line(), peer.line()] == [b"USER nobody\r\n", b"PASS pw\r\n"]
        peer.send(b"-ERR [AUTH] no such user\r\n-ERR [AUTH] USER first\r\n")
        peer.expect(b"NOOP\r\n", b"+OK still in step\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        with pytest.raises(pop3lite.AuthenticationError, match="no such user"):
            pop.login("nobody", "pw")
        assert pop.noop() == "still in step"


def test_without_pipelining_pass_waits_for_the_answer_to_user() -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        peer.expect(b"CAPA\r\n", b"+OK\r\nUSER\r\n.\r\n")
        assert peer.line() == b"USER alice\r\n"
        assert peer.buf == b""
        peer.send(b"+OK\r\n")
        peer.expect(b"PASS pw\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK\r\n")

    with scripted(script) as port, connect(port) as pop:
        pop.login("alice", "pw")


def test_then_quit_sends_quit_behind_the_last_retr() -> None:
    def script(peer: Peer) -> None:
        logged_in_pipelined(peer)
        # QUIT arrives with the RETRs, before any of them is answered.
        assert [peer.line() for _ in range(3)] == [b"RETR 1\r\n", b"RETR 2\r\n", b"QUIT\r\n"]
        peer.send(b"+OK\r\none\r\n.\r\n+OK\r\ntwo\r\n.\r\n+OK bye\r\n")
        assert peer.eof()

    with scripted(script) as port, connect(port) as pop:
        pop.login("u", "p")
        data = [item.data for item in pop.retr_many([1, 2], then_quit=True)]
        assert data == [b"one\r\n", b"two\r\n"]
        assert not pop.is_open
        assert pop.quit() == "bye"  # the reply the batch read
        with pytest.raises(pop3lite.NetworkError, match="QUIT sent"):
            pop.noop()


def test_then_quit_leaves_quit_to_the_caller_when_a_message_is_marked() -> None:
    def script(peer: Peer) -> None:
        logged_in_pipelined(peer)
        peer.expect(b"DELE 1\r\n", b"+OK\r\n")
        peer.expect(b"RETR 2\r\n", b"+OK\r\ntwo\r\n.\r\n")
        assert peer.buf == b""  # no QUIT behind it: it would commit the DELE
        peer.expect(b"RSET\r\n", b"+OK\r\n")
        peer.expect(b"QUIT\r\n", b"+OK bye\r\n")

    with scripted(script) as port, connect(port) as pop:
        pop.login("u", "p")
        pop.dele(1)
        assert [item.data for item in pop.retr_many([2], then_quit=True)] == [b"two\r\n"]
        assert pop.is_open
        pop.rset()
        assert pop.quit() == "bye"


def test_every_command_line_is_logged_once_batch_and_sasl_included(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with fakeserver.FakeServer(preset="rfc") as server:
        caplog.set_level(logging.DEBUG, logger="pop3lite")
        with fake_connect(server) as pop:
            pop.auth("CRAM-MD5", SEED_USER, SEED_PASSWORD)
            pop.scan()
            list(pop.retr_many([1, 2]))
        sent = [line[3:] for line in server.transcripts[0] if line.startswith("C: ")]
    logged = [r.getMessage()[3:] for r in caplog.records if r.getMessage().startswith("C: ")]
    assert logged == sent  # the fake shows SASL responses as **** too
    assert "RETR 2" in logged and "STAT" in logged and "UIDL" in logged


# -- issue 19 item 1: a port that expects TLS from the first byte ------------------------------


def test_auto_on_another_port_tries_implicit_tls_after_a_short_wait(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pop3lite, "_GREETING_WAIT", 0.3)
    caplog.set_level(logging.DEBUG, logger="pop3lite")
    with fakeserver.FakeServer(preset="rfc", tls="implicit") as server:
        with pop3lite.POP3(
            "localhost", server.port, ssl_context=client_context(), timeout=TIMEOUT
        ) as pop:
            assert pop.tls_version is not None
            pop.login(SEED_USER, SEED_PASSWORD)
    assert "trying implicit TLS" in caplog.text and "tls='implicit'" in caplog.text


def test_auto_on_another_port_keeps_a_plaintext_server_on_one_connection(
    monkeypatch: pytest.MonkeyPatch, make_pop3_server: MakeServer
) -> None:
    monkeypatch.setattr(pop3lite, "_GREETING_WAIT", 0.3)
    server = make_pop3_server(preset="rfc", tls="stls")
    with pop3lite.POP3(
        "localhost", server.port, ssl_context=client_context(), timeout=TIMEOUT
    ) as pop:
        assert pop.tls_version is not None  # by STLS
    assert len(server.transcripts) == 1
    assert server.transcripts[0][1] == "C: CAPA"


def test_a_greeting_timeout_says_the_port_may_expect_tls() -> None:
    def script(peer: Peer) -> None:
        peer.hold()  # as a port that waits for a TLS ClientHello

    with scripted(script) as port:
        with pytest.raises(pop3lite.Timeout, match=r"tls='implicit'") as caught:
            connect(port, timeout=0.3)
    assert "no greeting" in str(caught.value)


def test_a_timeout_passed_on_implicit_tls_does_not_hint_at_tls() -> None:
    def script(peer: Peer) -> None:
        peer.hold()  # accepts, never answers the ClientHello

    with scripted(script) as port:
        with pytest.raises(pop3lite.Timeout) as caught:
            connect(port, timeout=0.3, tls="implicit", ssl_context=client_context())
    assert "tls='implicit'" not in str(caught.value)


# -- issue 19 item 17: UTF8 before login, so that messages come as they are stored --------------


def verbs(transcript: list[str]) -> list[str]:
    """The verbs of the command lines in a fake server's transcript."""
    return [line[3:].split()[0] for line in transcript if line.startswith("C: ")]


def test_utf8_is_sent_before_user_when_offered() -> None:
    with fakeserver.FakeServer(preset="rfc") as server:
        with fake_connect(server) as pop:
            pop.login(SEED_USER, SEED_PASSWORD)
        commands = verbs(server.transcripts[0])
    assert commands[:4] == ["CAPA", "UTF8", "USER", "PASS"]


def test_utf8_is_sent_before_auth_when_offered() -> None:
    with fakeserver.FakeServer(preset="rfc") as server:
        with fake_connect(server) as pop:
            pop.auth("PLAIN", SEED_USER, SEED_PASSWORD)
        commands = verbs(server.transcripts[0])
    assert commands[:3] == ["CAPA", "UTF8", "AUTH"]


def test_utf8_is_not_sent_when_not_offered_or_not_wanted() -> None:
    with fakeserver.FakeServer() as server:  # OperaMail: no CAPA at all
        with fake_connect(server) as pop:
            pop.login(SEED_USER, SEED_PASSWORD)
        with fakeserver.FakeServer(preset="rfc") as rfc, fake_connect(rfc, utf8=False) as pop:
            pop.login(SEED_USER, SEED_PASSWORD)
        for transcript in (server.transcripts[0], rfc.transcripts[0]):
            commands = verbs(transcript)
            assert "UTF8" not in commands and commands[:3] == ["CAPA", "USER", "PASS"]


def test_a_refused_quit_behind_a_batch_keeps_the_last_message_and_is_raised_by_quit() -> None:
    def script(peer: Peer) -> None:
        logged_in_pipelined(peer)
        assert [peer.line(), peer.line()] == [b"RETR 1\r\n", b"QUIT\r\n"]
        peer.send(b"+OK\r\none\r\n.\r\n-ERR [SYS/TEMP] could not update the maildrop\r\n")

    with scripted(script) as port, connect(port) as pop:
        pop.login("u", "p")
        assert [item.data for item in pop.retr_many([1], then_quit=True)] == [b"one\r\n"]
        with pytest.raises(pop3lite.TemporaryError, match="could not update"):
            pop.quit()
