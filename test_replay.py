"""Record and replay: the transcript format, the recording proxy, FakeServer(replay=...).

Recordings are made through fakeserver's own Recorder in front of fakeserver's own servers, on
loopback only, with poplib and pop3lite as clients. Every socket has a timeout.
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import importlib.util
import poplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import fakeserver
import pop3lite
from fakeserver import FakeServer, Maildrop, Recorder

TIMEOUT = 5.0
HERE = Path(__file__).resolve().parent
PASSWORD = "fugafuga"
# A message with every byte value a line can hold, lines that start with ".", a line that is
# only ".", trailing blanks and a backslash: what the transcript escaping must carry exactly.
ODD_MESSAGE = (
    b"Subject: odd bytes\r\n\r\n"
    + bytes(b for b in range(256) if b not in (10, 13)) + b"\r\n"
    + b".\r\n..\r\n.leading dot\r\ntrailing blanks \t \r\nback\\slash \\x41\r\n"
    + b"ISO-2022-JP \x1b$B$3$s$K$A$O\x1b(B\r\nline separator \xe2\x80\xa8 end\r\n"
)


# ==================================================================================================
# The transcript format
# ==================================================================================================


@pytest.mark.parametrize(
    "wire, line",
    [
        (b"+OK ready\r\n", "S: +OK ready"),
        (b"\r\n", "S:"),
        (b"..hidden\r\n", "S: ..hidden"),
        (b"a\\b\r\n", "S: a\\\\b"),
        (b"tab\tin\r\n", "S: tab\tin"),
        (b"blank at end \r\n", "S: blank at end\\x20"),
        (b"\x1b$B$3\x1b(B\r\n", "S: \\x1b$B$3\\x1b(B"),
        (b"caf\xc3\xa9 \xff\r\n", "S: caf\u00e9 \\xff"),
        (b"bare LF\n", "S: bare LF\\x0a"),
        (b"CR CR LF\r\r\n", "S: CR CR LF\\x0d"),
        (b"no end", "S: no end\\"),
        (b"\xe2\x80\xa8\r\n", "S: \\xe2\\x80\\xa8"),
    ],
    ids=["text", "empty", "stuffed", "backslash", "tab", "trailing-blank", "jis", "not-utf8",
         "bare-lf", "cr-cr-lf", "no-end", "line-separator"],
)
def test_transcript_line_escapes_and_round_trips(wire: bytes, line: str) -> None:
    assert fakeserver.transcript_line("S", wire) == line
    session = fakeserver.parse_transcript("S: +OK\nC: X\n" + line + "\n")[0]
    assert session.exchanges[0].reply == wire


def test_every_byte_value_round_trips_through_a_file_line() -> None:
    for value in range(256):
        wire = b"x" + bytes([value]) + b"y\r\n"
        line = fakeserver.transcript_line("C", wire)
        assert line.replace("\t", " ").isprintable()
        parsed = fakeserver.parse_transcript("S: +OK\n" + line + "\nS: +OK\n")[0]
        assert parsed.exchanges[0].command.encode("utf-8", "surrogateescape") + b"\r\n" == wire


def test_parse_sessions_comments_sasl_and_windows_line_ends() -> None:
    text = (
        "# a comment\r\n"
        "S: +OK one\r\n"
        "C: AUTH PLAIN\r\n"
        "S: + \r\n"
        "C: ****\r\n"
        "S: +OK in\r\n"
        "= session 2\r\n"
        "S: +OK two\r\n"
        "C: STAT\r\n"
        "S: +OK 0 0\r\n"
    )
    first, second = fakeserver.parse_transcript(text)
    assert first.greeting == b"+OK one\r\n"
    assert first.exchanges == [fakeserver.Exchange("AUTH PLAIN", b"+OK in\r\n")]
    assert second.exchanges == [fakeserver.Exchange("STAT", b"+OK 0 0\r\n")]


@pytest.mark.parametrize("text", ["X: what\n", "S: stray \\q\n"])
def test_malformed_transcripts_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="line 1"):
        fakeserver.parse_transcript(text)


# ==================================================================================================
# The OperaMail recording: one source for the preset and the replay
# ==================================================================================================


def load_tool() -> Any:
    spec = importlib.util.spec_from_file_location(
        "operamail_recording", HERE / "tools" / "operamail_recording.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_embedded_recording_is_what_the_readable_source_produces() -> None:
    assert load_tool().recording() == fakeserver.OPERAMAIL_RECORDING


def exchange_raw(sock: socket.socket, reader: Any, command: str) -> bytes:
    """Send one command; return the reply's bytes as sent (multi-line when the recording says)."""
    sock.sendall(command.encode() + b"\r\n")
    data = reader.readline()
    multi = command.split()[0] in ("LIST", "UIDL", "TOP", "RETR") and command not in (
        "LIST 1", "UIDL 1")
    while multi and data.startswith(b"+OK") and not data.endswith(b"\r\n.\r\n"):
        line = reader.readline()
        assert line, "connection closed inside a reply"
        data += line
    return data


def play(server: FakeServer, commands: list[str]) -> list[bytes]:
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        replies = [reader.readline()]
        for command in commands:
            replies.append(exchange_raw(sock, reader, command))
        return replies


def recorded_commands(session: fakeserver.RecordedSession) -> list[str]:
    return [e.command.replace("PASS ****", "PASS " + PASSWORD) for e in session.exchanges]


def test_the_operamail_preset_answers_every_recorded_command_byte_for_byte() -> None:
    session = fakeserver.parse_transcript(fakeserver.OPERAMAIL_RECORDING)[0]
    with FakeServer() as server:
        replies = play(server, recorded_commands(session))
    assert replies == [session.greeting] + [e.reply for e in session.exchanges]


def test_replay_of_the_seed_session_equals_the_preset() -> None:
    seed = ["USER hogehoge", "PASS fugafuga", "STAT", "LIST", "TOP 2 5", "RETR 1", "DELE 1",
            "LIST", "RSET", "LIST", "QUIT"]
    with FakeServer() as preset:
        expected = play(preset, seed)
    with FakeServer(replay=fakeserver.OPERAMAIL_RECORDING) as replay:
        assert play(replay, seed) == expected
    assert replay.mismatches == []
    assert replay.sessions[0].state == "UPDATE" and replay.sessions[0].quit


# ==================================================================================================
# Replay: matching, credentials, mismatches
# ==================================================================================================


def test_replay_answers_reordered_and_pipelined_commands() -> None:
    with FakeServer(replay=fakeserver.OPERAMAIL_RECORDING) as server:
        with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"USER someone\r\nPASS fugafuga\r\nUIDL\r\nSTAT\r\nRETR 2\r\n")
            assert reader.readline().startswith(b"+OK User hogehoge accepted")
            assert reader.readline() == b"+OK Password accepted\r\n"
            assert reader.readline() == b"+OK\r\n"
            assert reader.readline() == b"1 3C4B82C800000001\r\n"
            assert reader.readline() == b"2 3C4BC6A100000002\r\n"
            assert reader.readline() == b".\r\n"
            assert reader.readline() == b"+OK 2 10180\r\n"
            assert reader.readline() == b"+OK 4226 octets\r\n"
    assert server.mismatches == []


def test_replay_checks_the_test_password_and_states() -> None:
    with FakeServer(replay=fakeserver.OPERAMAIL_RECORDING) as server:
        replies = play(server, ["STAT", "USER hogehoge", "PASS wrong", "PASS fugafuga"])
    assert replies[1] == b"-ERR Command not valid in this state\r\n"
    assert replies[3] == b"-ERR Invalid user name or password\r\n"
    assert replies[4] == b"-ERR send USER command first\r\n"
    assert server.sessions[0].state == "AUTHORIZATION"
    assert server.mismatches == []


def test_an_unrecorded_command_gets_err_and_a_mismatch_record() -> None:
    with FakeServer(replay=fakeserver.OPERAMAIL_RECORDING) as server:
        replies = play(server, ["USER hogehoge", "PASS fugafuga", "TOP 1 3", "NOOP", "STAT"])
    assert replies[3].startswith(b"-ERR") and replies[4].startswith(b"-ERR")
    assert replies[5] == b"+OK 2 10180\r\n"  # the session goes on
    assert [(m.session, m.command) for m in server.mismatches] == [(1, "TOP 1 3"), (1, "NOOP")]
    assert "RETR 1" in server.mismatches[0].recorded


def test_replay_apop_uses_the_recorded_timestamp_and_the_test_password() -> None:
    import hashlib

    recording = (
        "S: +OK ready <42.1@example.org>\nC: APOP bob ****\nS: +OK bob is in\n"
        "C: QUIT\nS: +OK bye\n"
    )
    good = hashlib.md5(b"<42.1@example.org>fugafuga").hexdigest()
    with FakeServer(replay=recording) as server:
        replies = play(server, ["APOP bob " + "0" * 32, "APOP alice " + good, "QUIT"])
    assert replies[1].startswith(b"-ERR")
    assert replies[2:] == [b"+OK bob is in\r\n", b"+OK bye\r\n"]
    assert server.sessions[0].login == "APOP" and server.sessions[0].user == "alice"
    assert good not in repr(server.transcripts)


def test_a_command_the_recorded_server_never_answered_ends_the_connection() -> None:
    with FakeServer(replay="S: +OK hi\nC: XTND\nS: +OK\nC: CAPA\n") as server:
        with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"XTND\r\nCAPA\r\n")
            assert reader.readline() == b"+OK\r\n"
            assert reader.read() == b""  # the connection ends, as it did when recorded
    assert server.mismatches == []


def test_replay_file_via_path_and_per_connection_sessions(tmp_path: Path) -> None:
    path = tmp_path / "two.txt"
    path.write_text("S: +OK first\nC: NOOP\nS: +OK 1\n= next\nS: +OK second\nC: NOOP\nS: +OK 2\n")
    with FakeServer(replay=path) as server:
        greetings = [play(server, [])[0] for _ in range(3)]
    assert greetings == [b"+OK first\r\n", b"+OK second\r\n", b"+OK second\r\n"]


def test_an_empty_recording_is_refused() -> None:
    with pytest.raises(ValueError, match="no session"):
        FakeServer(replay="# only a comment\n")


# ==================================================================================================
# The recording proxy, in front of fakeserver's own rfc preset
# ==================================================================================================


@pytest.fixture(params=[None, "implicit", "stls"], ids=["plain", "implicit-tls", "stls"])
def recorded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
        Callable[..., tuple[FakeServer, Recorder, Path]]]:
    """Start a real (fake) server and a Recorder in front of it with the param's TLS mode."""
    started: list[Any] = []

    def start(**server_options: Any) -> tuple[FakeServer, Recorder, Path]:
        server = FakeServer("rfc", tls=request.param, **server_options).start()
        out = tmp_path / "recording.txt"
        recorder = Recorder("localhost:%d" % server.port, out, tls=request.param or "none",
                            context=fakeserver.client_context(), timeout=TIMEOUT).start()
        started.extend([server, recorder])
        return server, recorder, out

    yield start
    for item in reversed(started):
        item.close()


def poplib_session(address: tuple[str, int]) -> list[Any]:
    pop = poplib.POP3(*address, timeout=TIMEOUT)
    results: list[Any] = [pop.getwelcome(), pop.capa()]
    pop.user("hogehoge")
    pop.pass_(PASSWORD)
    results += [pop.stat(), pop.list()[1], pop.uidl()[1]]
    results += [pop.retr(n)[1] for n in (1, 2, 3, 4)]
    results += [pop.top(2, 1)[1], pop.dele(1), pop.quit()]
    return results


def test_poplib_recorded_and_replayed_byte_for_byte(recorded: Callable[..., Any]) -> None:
    messages = list(fakeserver.RFC_MESSAGES) + [ODD_MESSAGE]
    server, recorder, out = recorded(users={"hogehoge": Maildrop(PASSWORD, messages)})
    live = poplib_session(recorder.address)
    recorder.close()
    text = out.read_text(encoding="utf-8")
    assert PASSWORD not in text and "C: PASS ****" in text
    assert server.maildrops["hogehoge"].messages == messages[1:]  # the real server was used
    with FakeServer(replay=out) as replay:
        assert poplib_session(replay.address) == live
    assert replay.mismatches == []
    assert b"".join(line + b"\r\n" for line in live[8]) == ODD_MESSAGE


def pop3lite_session(address: tuple[str, int]) -> list[Any]:
    with pop3lite.POP3(address[0], address[1], tls="none", timeout=TIMEOUT) as pop:
        mechanism = pop.login_best("hogehoge", PASSWORD)
        sizes = pop.list()
        results: list[Any] = [mechanism, pop.stat(), sizes, pop.uidl()]
        results += [(item.number, item.data) for item in pop.retr_many(sizes)]  # pipelined
        results.append(pop.top(3, 0))
    return results


def test_pop3lite_recorded_and_replayed_byte_for_byte(recorded: Callable[..., Any]) -> None:
    server, recorder, out = recorded()
    live = pop3lite_session(recorder.address)
    recorder.close()
    text = out.read_text(encoding="utf-8")
    assert live[0] == "SCRAM-SHA-256" and "C: AUTH SCRAM-SHA-256" in text
    assert PASSWORD not in text
    assert [data for _, data in live[4:7]] == list(fakeserver.RFC_MESSAGES)
    with FakeServer(replay=out) as replay:
        assert pop3lite_session(replay.address) == live
    assert replay.mismatches == []
    assert replay.sessions[0].mechanism == "SCRAM-SHA-256"


def raw_lines(address: tuple[str, int], lines: list[bytes]) -> list[bytes]:
    """Send each line after reading one reply line for the previous one."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        replies = [reader.readline()]
        for line in lines:
            sock.sendall(line + b"\r\n")
            replies.append(reader.readline())
        return replies


def test_sasl_secrets_never_reach_the_file(tmp_path: Path) -> None:
    import base64

    def b64(data: bytes) -> bytes:
        return base64.b64encode(data)

    token = b"ya29.secret-bearer-token"
    out = tmp_path / "sasl.txt"
    with FakeServer("rfc", oauth_token=token.decode()) as server:
        with Recorder("127.0.0.1:%d" % server.port, out, tls="none", timeout=TIMEOUT) as proxy:
            plain = b64(b"\0hogehoge\0" + PASSWORD.encode())
            replies = raw_lines(proxy.address, [
                b"AUTH PLAIN " + plain, b"QUIT"])
            assert replies[1].startswith(b"+OK")
            replies = raw_lines(proxy.address, [
                b"AUTH LOGIN", b64(b"hogehoge"), b64(PASSWORD.encode()), b"QUIT"])
            assert replies[3].startswith(b"+OK")
            xoauth = b64(b"user=hogehoge\x01auth=Bearer " + token + b"\x01\x01")
            replies = raw_lines(proxy.address, [b"AUTH XOAUTH2 " + xoauth, b"QUIT"])
            assert replies[1].startswith(b"+OK")
            bearer = b64(b"n,a=hogehoge,\x01auth=Bearer " + token + b"\x01\x01")
            replies = raw_lines(proxy.address, [b"AUTH OAUTHBEARER", bearer, b"QUIT"])
            assert replies[2].startswith(b"+OK")
    text = out.read_text(encoding="utf-8")
    for secret in (PASSWORD.encode(), token, plain, xoauth, bearer, b64(PASSWORD.encode()),
                   b64(b"hogehoge")):
        assert secret.decode() not in text
    assert "C: AUTH PLAIN ****" in text and "C: AUTH XOAUTH2 ****" in text
    assert text.count("C: ****") == 3  # LOGIN's two responses, OAUTHBEARER's one
    # The replay checks the same mechanisms against the test password and token.
    with FakeServer(replay=out, oauth_token=token.decode()) as replay:
        assert raw_lines(replay.address, [b"AUTH PLAIN " + plain])[1].startswith(b"+OK")
        wrong = b64(b"\0hogehoge\0wrong")
        assert raw_lines(replay.address, [b"AUTH PLAIN " + wrong])[1].startswith(b"-ERR")
        assert raw_lines(replay.address, [b"AUTH XOAUTH2 " + xoauth])[1].startswith(b"+OK")


def test_headers_only_keeps_the_header_and_cuts_the_body(tmp_path: Path) -> None:
    out = tmp_path / "headers.txt"
    with FakeServer("rfc") as server:
        with Recorder("127.0.0.1:%d" % server.port, out, tls="none", headers_only=True,
                      timeout=TIMEOUT) as proxy:
            pop = poplib.POP3(*proxy.address, timeout=TIMEOUT)
            pop.user("hogehoge")
            pop.pass_(PASSWORD)
            assert pop.retr(2)[1][-1] == b"end"  # the client still gets the whole message
            pop.quit()
    text = out.read_text(encoding="utf-8")
    assert "S: Subject: Dots" in text and "end" not in text.split("S: Subject: Dots")[1]
    assert "# 7 body lines (" in text


def test_the_tap_writes_pipelined_commands_before_their_replies() -> None:
    lines: list[str] = []
    tap = fakeserver._Tap(lines.append)
    tap.from_server(b"+OK hi\r\n")
    assert tap.from_client(b"STAT\r\nLIST\r\nPASS x") == [b"STAT\r\n", b"LIST\r\n"]
    for byte in b"+OK 1 5\r\n+OK\r\n1 5\r\n.\r\n":
        tap.from_server(bytes([byte]))
    tap.from_client(b"\r\n")
    tap.finish()
    assert lines == ["S: +OK hi", "C: STAT", "S: +OK 1 5", "C: LIST", "S: +OK", "S: 1 5", "S: .",
                     "C: PASS ****"]


def test_the_proxy_refuses_client_stls_and_verifies_the_server(tmp_path: Path) -> None:
    out = tmp_path / "r.txt"
    with FakeServer("rfc", tls="implicit") as server:
        with Recorder("localhost:%d" % server.port, out, tls="implicit",
                      context=fakeserver.client_context(), timeout=TIMEOUT) as proxy:
            replies = raw_lines(proxy.address, [b"STLS", b"NOOP"])
            assert replies[1].startswith(b"-ERR") and replies[2].startswith(b"-ERR")
        # Without the test CA the certificate does not verify: no session reaches the server.
        with Recorder("localhost:%d" % server.port, out, tls="implicit",
                      timeout=TIMEOUT, overwrite=True) as proxy:
            with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
                assert sock.recv(100) == b""
    assert "CERTIFICATE_VERIFY_FAILED" in out.read_text() or "certificate" in out.read_text()
    assert len(server.sessions) == 2 and server.sessions[1].commands == []


def test_command_line_replay(tmp_path: Path) -> None:
    path = tmp_path / "seed.txt"
    path.write_text(fakeserver.OPERAMAIL_RECORDING, encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, str(HERE / "fakeserver.py"), "--port", "0", "-q", "--replay", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        host, port = process.stdout.readline().strip().rsplit(":", 1)
        pop = poplib.POP3(host, int(port), timeout=TIMEOUT)
        pop.user("anyone")
        pop.pass_(PASSWORD)
        assert pop.stat() == (2, 10180)
        pop.quit()
    finally:
        process.terminate()
        process.communicate(timeout=TIMEOUT)


def test_an_existing_recording_is_never_overwritten_unasked(tmp_path: Path) -> None:
    out = tmp_path / "kept.pop3"
    out.write_text(fakeserver.OPERAMAIL_RECORDING, encoding="utf-8")
    with pytest.raises(FileExistsError):
        Recorder("127.0.0.1:1", out, tls="none")
    done = subprocess.run(
        [sys.executable, str(HERE / "fakeserver.py"), "--record", "127.0.0.1:1", "--port", "0",
         "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--force" in done.stderr and str(out) in done.stderr
    assert out.read_text(encoding="utf-8") == fakeserver.OPERAMAIL_RECORDING
    Recorder("127.0.0.1:1", out, tls="none", overwrite=True).server_close()
    assert out.read_text(encoding="utf-8").startswith(fakeserver.TRANSCRIPT_HEADER)
    assert "InterChange" not in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("tls", ["implicit", "stls"])
def test_the_proxy_finds_out_the_tls_of_an_unusual_port(
    tls: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fakeserver, "GREETING_WAIT", 0.3)  # the command line waits 3 s
    out = tmp_path / "r.pop3"
    caplog.set_level("INFO", logger="fakeserver")
    with FakeServer("rfc", tls=tls) as server:
        assert server.port not in (110, 995)
        with Recorder("localhost:%d" % server.port, out, context=fakeserver.client_context(),
                      timeout=TIMEOUT) as proxy:
            assert proxy.tls == "auto"
            replies = raw_lines(proxy.address, [b"NOOP", b"QUIT"])
        assert server.sessions[0].tls
    assert replies[0].startswith(b"+OK fakeserver") and replies[2].startswith(b"+OK")
    text = out.read_text(encoding="utf-8")
    assert "# the proxy chose TLS %s" % tls in text
    assert fakeserver.load_transcript(out)[0].exchanges[-1].command == "QUIT"
    assert "recorded session 1: 2 client lines into %s" % out in caplog.text


def test_a_timed_out_stls_recording_says_what_to_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeServer("rfc", tls="implicit") as server:
        with Recorder("localhost:%d" % server.port, tmp_path / "r.pop3", tls="stls",
                      context=fakeserver.client_context(), timeout=0.3) as proxy:
            with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
                assert sock.recv(100) == b""
    assert "pass --tls implicit" in caplog.text
