"""Tests of pop3lite's command line (issue 6): main() in-process against fakeserver."""

from __future__ import annotations

import io
import json
import mailbox
import os
import socket
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any, Callable

import pytest

import fakeserver
import pop3lite
from conftest import address, run_cli
from fakeserver import FakeServer, Fault

ATMARKIT_SUBJECT = "＠IT新着速報 - 2002/1/19　1FD Linuxで作る高機能ルータ ［インストール編］"
CSC_SUBJECT = "「ＣＳＣからの耳よりなお知らせ」<出会い編>"
SEED_SESSION = "STAT\nLIST\nTOP 2 5\nRETR 1\nDELE 1\nLIST\nRSET\nLIST\nQUIT\n"


@pytest.fixture(autouse=True)
def environment(cli_environment: Path) -> Path:
    return cli_environment


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_PASSWORD", "fugafuga")


@pytest.fixture
def server(make_pop3_server: Callable[..., FakeServer]) -> FakeServer:
    """The seed's OperaMail server (the plugin's fixture: stopped, and its errors reported, when
    the test ends)."""
    return make_pop3_server("operamail", idle_timeout=10)


def messages_left(server: FakeServer, user: str = "hogehoge") -> int:
    return len(server.maildrops[user].messages)


def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text(fakeserver.CA_PEM)
    return str(path)


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


# -- the quick check ---------------------------------------------------------------------------


@pytest.mark.usefixtures("password")
def test_check_shows_the_seed_mailbox_with_decoded_subjects(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 0, err
    assert "+OK InterChange POP3 Server v3.62 Ready (X-INF-V1)" in out
    assert "plaintext (loopback)" in out
    assert "none announced" in out  # OperaMail answers CAPA with -ERR
    assert "USER/PASS as hogehoge" in out
    assert "2 messages, 10180 octets" in out
    assert ATMARKIT_SUBJECT in out
    assert CSC_SUBJECT in out  # Shift_JIS bytes inside an encoded word that says ISO-2022-JP
    assert "3C4B82C800000001" in out and "3C4BC6A100000002" in out
    assert "2002-01-21 07:26" in out and "membership@atmarkit.co.jp" in out
    assert "Cyber Space Community" in out
    sent = server.sessions[-1].commands
    assert "TOP 1 0" in sent and "TOP 2 0" in sent
    assert not [c for c in sent if c.startswith(("DELE", "RETR"))]
    assert sent[-1] == "QUIT" and messages_left(server) == 2


@pytest.mark.usefixtures("password")
def test_check_table_fits_a_narrow_terminal_and_stays_aligned(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "72")
    status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0
    table = out.split("\n\n", 1)[1].splitlines()
    assert table[0].startswith("#") and len(table) == 3
    assert all(display_width(line) <= 72 for line in table)
    assert "..." in table[1]  # the long subject is cut cleanly
    # Every column starts at the same display column on every line.
    starts = [display_width(line[: line.index(word)]) for line, word in zip(table, "#12")]
    assert len(set(starts)) == 1
    subject_column = display_width(table[0][: table[0].index("Subject")])
    assert display_width(table[2][: table[2].index("「")]) == subject_column


@pytest.mark.usefixtures("password")
def test_check_json_has_the_documented_fields(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "--json")
    assert status == 0
    report = json.loads(out)
    assert set(report) == {
        "server", "tls", "capabilities", "user", "auth", "count", "size", "messages"
    }  # fmt: skip
    assert report["server"]["port"] == server.port
    assert report["server"]["greeting"].startswith("InterChange POP3 Server v3.62")
    assert report["tls"] is None and report["capabilities"] == {}
    assert (report["user"], report["auth"]) == ("hogehoge", "USER")
    assert (report["count"], report["size"]) == (2, 10180)
    first, second = report["messages"]
    assert set(first) == {"number", "size", "uid", "date", "from", "subject"}
    assert first == {
        "number": 1,
        "size": 5954,
        "uid": "3C4B82C800000001",
        "date": "2002-01-21T07:26:05+09:00",
        "from": "membership@atmarkit.co.jp",
        "subject": ATMARKIT_SUBJECT,
    }
    assert second["subject"] == CSC_SUBJECT


@pytest.mark.usefixtures("password")
def test_check_limit_shows_the_last_messages(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "--json", "--limit", "1")
    assert status == 0
    report = json.loads(out)
    assert report["count"] == 2 and [m["number"] for m in report["messages"]] == [2]
    assert "TOP 1 0" not in server.sessions[-1].commands
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "--limit", "1")
    assert "(the last 1 of 2 shown; --limit 0 shows all)" in out


@pytest.mark.usefixtures("password")
def test_check_against_a_modern_server_uses_sasl_and_pipelined_top(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeServer("rfc") as server:
        status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0
    assert "SCRAM-SHA-256 as hogehoge" in out
    assert "PIPELINING" in out and "SASL PLAIN LOGIN" in out
    assert "3 messages" in out
    assert "こんにちは" in out and "Jörg" in out and "Dots" in out
    sent = server.sessions[-1].commands
    assert sent.index("TOP 2 0") < sent.index("TOP 3 0")


@pytest.mark.usefixtures("password")
def test_check_degrades_when_the_server_has_no_uidl_and_no_top(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeServer("rfc", capabilities=["USER", "SASL PLAIN"]) as server:
        status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0
    assert "3 messages" in out
    assert "UID" not in out.split("\n\n", 1)[1]
    assert "Hello" not in out  # no TOP: no subjects, but the sizes are there
    assert not [c for c in server.sessions[-1].commands if c.startswith(("TOP", "UIDL"))]


@pytest.mark.usefixtures("password")
def test_check_survives_top_refused_without_capa(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeServer(faults=[Fault("sys-perm", "TOP")]) as server:
        status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0
    assert "2 messages, 10180 octets" in out and "3C4BC6A100000002" in out
    assert [c for c in server.sessions[-1].commands if c.startswith("TOP")] == ["TOP 1 0"]


def test_header_decoding_falls_back_when_the_charset_lies() -> None:
    lying = b"=?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI +?="
    assert pop3lite._decode_header(lying) == CSC_SUBJECT
    assert pop3lite._decode_header("件名".encode()) == "件名"
    assert pop3lite._decode_header("件名".encode("cp932")) == "件名"
    assert pop3lite._decode_header(b"=?utf-8?q?caf=C3=A9?= au lait") == "café au lait"
    assert pop3lite._decode_header(b"=?x-unknown?q?caf=C3=A9?=") == "café"
    assert pop3lite._decode_header(b"evil \x1b[2J\xe2\x80\xae") == "evil \\x1b[2J\\u202e"


def test_fit_counts_wide_characters_twice() -> None:
    assert pop3lite._fit("日本語", 8) == "日本語  "
    assert pop3lite._fit("日本語のテキスト", 8) == "日本... "
    assert display_width(pop3lite._fit("日本語のテキスト", 9)) == 9
    assert pop3lite._fit("12", 5, right=True) == "   12"


# -- retr, top, capa, uidl -------------------------------------------------------------------


@pytest.mark.usefixtures("password")
def test_retr_writes_the_message_to_a_file(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    target = tmp_path / "m1.eml"
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "retr", "1", "-o", str(target))
    assert status == 0
    assert target.read_bytes() == fakeserver.OPERAMAIL_MESSAGES[0]
    assert f"message 1: 5954 octets (5.8 KiB) written to {target}" in out
    assert messages_left(server) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "m1.eml"]  # no temporary left


@pytest.mark.usefixtures("password")
def test_retr_several_messages_into_a_directory(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    status, _, _ = run_cli(
        capsys, address(server), "hogehoge", "retr", "1", "2", "-o", str(tmp_path)
    )
    assert status == 0
    assert (tmp_path / "2.eml").read_bytes() == fakeserver.OPERAMAIL_MESSAGES[1]
    status, _, err = run_cli(capsys, address(server), "hogehoge", "retr", "1", "2", "-o", "x.eml")
    assert status == 2 and "existing directory" in err


@pytest.mark.usefixtures("password")
def test_retr_to_a_pipe_writes_the_raw_bytes(
    capsysbinary: pytest.CaptureFixture[bytes], server: FakeServer
) -> None:
    assert pop3lite.main([address(server), "hogehoge", "retr", "2"]) == 0
    assert capsysbinary.readouterr().out == fakeserver.OPERAMAIL_MESSAGES[1]


@pytest.mark.usefixtures("password")
def test_retr_of_a_missing_message_fails_with_status_6(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, _, err = run_cli(capsys, address(server), "hogehoge", "retr", "9")
    assert status == 6 and "RETR" in err


@pytest.mark.usefixtures("password")
def test_top_prints_the_header_and_lines(
    capsysbinary: pytest.CaptureFixture[bytes], server: FakeServer
) -> None:
    assert pop3lite.main([address(server), "hogehoge", "top", "2", "5"]) == 0
    out = capsysbinary.readouterr().out
    header, body = out.split(b"\r\n\r\n", 1)
    assert b"Subject: =?ISO-2022-JP?B?gXWC" in header
    assert len(body.split(b"\r\n")) == 6  # five lines, each ending in CRLF
    assert "TOP 2 5" in server.sessions[-1].commands


def test_message_rendering_decodes_for_a_terminal() -> None:
    lines = pop3lite._render_message(fakeserver.OPERAMAIL_MESSAGES[1])
    assert f"Subject: {CSC_SUBJECT}" in lines
    assert "From: Cyber Space Community<adv@csc.ne.jp>" in lines
    assert any(line.startswith("■□■□") for line in lines)
    assert not any("\x1b" in line for line in lines)
    raw = pop3lite._render_message(b"Subject: x\r\n\r\n\x1b$B$3\x1b(B\r\n.dot\r\n", raw=True)
    assert raw == ["Subject: x", "", "\\x1b$B$3\\x1b(B", "..dot"]
    encoded = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
    encoded += b"\r\n44GT44KT44Gr44Gh44Gv\r\n"
    assert pop3lite._render_message(encoded)[-1] == "こんにちは"


def test_capa_needs_no_password(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer("rfc") as server:
        status, out, _ = run_cli(capsys, address(server), "hogehoge", "capa")
        assert status == 0
        assert "SASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256 XOAUTH2 OAUTHBEARER" in out
        assert "EXPIRE NEVER" in out.splitlines()
        status, out, _ = run_cli(capsys, address(server), "hogehoge", "capa", "--json")
    assert json.loads(out)["EXPIRE"] == ["NEVER"]
    assert not [c for c in server.sessions[-1].commands if c.startswith(("USER", "PASS", "AUTH"))]


@pytest.mark.usefixtures("password")
def test_uidl_lists_unique_ids(capsys: pytest.CaptureFixture[str], server: FakeServer) -> None:
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "uidl")
    assert status == 0
    assert out.splitlines() == ["1 3C4B82C800000001", "2 3C4BC6A100000002"]
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "uidl", "--json")
    assert json.loads(out)[1] == {"number": 2, "uid": "3C4BC6A100000002"}


# -- save ------------------------------------------------------------------------------------


def maildir_messages(path: Path) -> list[bytes]:
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return sorted(box.get_bytes(key) for key in box.iterkeys())


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


@pytest.mark.usefixtures("password")
def test_save_new_twice_fetches_nothing_the_second_time(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    target = tmp_path / "Mail"
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "save", str(target), "--new")
    assert status == 0 and "saved 2 messages (10180 octets)" in out and "(Maildir)" in out
    assert maildir_messages(target) == sorted(lf(m) for m in fakeserver.OPERAMAIL_MESSAGES)
    state = [p for p in target.iterdir() if p.name.endswith(".journal")]
    assert len(state) == 1 and "hogehoge@localhost" in state[0].name  # not by host:port
    recorded = [line[2:] for line in state[0].read_text().splitlines()[1:]]
    assert recorded == list(fakeserver.OPERAMAIL_UIDS)

    status, out, _ = run_cli(capsys, address(server), "hogehoge", "save", str(target), "--new")
    assert status == 0 and "saved 0 messages" in out and "2 messages already saved" in out
    assert not [c for c in server.sessions[-1].commands if c.startswith("RETR")]
    assert len(maildir_messages(target)) == 2 and messages_left(server) == 2

    server.maildrops["hogehoge"].add(b"Subject: third\r\n\r\nnew mail\r\n", uid="third-uid")
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "save", str(target), "--new")
    assert "saved 1 message (" in out
    assert [c for c in server.sessions[-1].commands if c.startswith("RETR")] == ["RETR 3"]

    # --delete also deletes what earlier runs saved, or --new would skip it forever.
    argv = [address(server), "hogehoge", "save", str(target), "--new", "--delete"]
    status, out, _ = run_cli(capsys, *argv)
    assert status == 0 and "saved 0 messages" in out and "deleted 3 messages" in out
    assert not [c for c in server.sessions[-1].commands if c.startswith("RETR")]
    assert messages_left(server) == 0 and len(maildir_messages(target)) == 3


@pytest.mark.usefixtures("password")
def test_save_delete_into_mbox_empties_the_server_after_writing(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    target = tmp_path / "seed.mbox"
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "save", str(target), "--delete")
    assert status == 0 and "deleted 2 messages on the server" in out and "(mbox)" in out
    box = mailbox.mbox(str(target))
    assert [m["Message-ID"] for m in box] == [
        "<-2034930363.1011565565483.JavaMail.root@atmarkit-www.atmarkit.co.jp\n >",
        "<200201210744.QAA05582@platz.jp>",
    ]
    box.close()
    assert messages_left(server) == 0
    if os.name == "posix":
        assert stat.S_IMODE(target.stat().st_mode) == 0o600  # mail is private
    sent = server.sessions[-1].commands
    last_retr = max(i for i, c in enumerate(sent) if c.startswith("RETR"))
    first_dele = min(i for i, c in enumerate(sent) if c.startswith("DELE"))
    assert last_retr < first_dele and sent[-1] == "QUIT"
    journal = f".seed.mbox.pop3lite-hogehoge@localhost_{server.port}-"  # then the 8-hex tag
    assert [p for p in tmp_path.iterdir() if p.name.startswith(journal)]


@pytest.mark.usefixtures("password")
def test_save_delete_deletes_nothing_when_the_connection_drops(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "Mail"
    with FakeServer(faults=[Fault("drop", "RETR 2", 100, times=1)]) as server:
        status, _, err = run_cli(
            capsys, address(server), "hogehoge", "save", str(target), "--delete"
        )
        assert status == 4 and "closed" in err
        assert messages_left(server) == 2
        assert not [c for c in server.sessions[-1].commands if c.startswith(("DELE", "QUIT"))]
        assert len(maildir_messages(target)) == 1  # message 1 was saved before the drop
        status, out, _ = run_cli(capsys, address(server), "hogehoge", "save", str(target), "--new")
    assert status == 0 and "saved 1 message" in out  # the state file remembered message 1
    assert [c for c in server.sessions[-1].commands if c.startswith("RETR")] == ["RETR 2"]


@pytest.mark.usefixtures("password")
def test_save_delete_deletes_nothing_when_a_write_fails(
    capsys: pytest.CaptureFixture[str],
    server: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = pop3lite.Maildir.finish
    calls = []

    def failing_finish(store: Any) -> None:
        calls.append(store)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        original(store)

    monkeypatch.setattr(pop3lite.Maildir, "finish", failing_finish)
    status, _, err = run_cli(
        capsys, address(server), "hogehoge", "save", str(tmp_path / "M"), "--delete"
    )
    assert status == 1 and "No space left on device" in err
    assert messages_left(server) == 2
    assert not [c for c in server.sessions[-1].commands if c.startswith(("DELE", "QUIT"))]


@pytest.mark.usefixtures("password")
def test_save_refuses_a_directory_that_is_not_a_maildir(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    status, _, err = run_cli(capsys, address(server), "hogehoge", "save", str(tmp_path), "--delete")
    assert status == 1 and "not a Maildir" in err
    assert messages_left(server) == 2
    assert not [c for c in server.sessions[-1].commands if c.startswith(("RETR", "DELE"))]


# -- passwords and login methods ---------------------------------------------------------------


def test_password_from_a_file(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("fugafuga\nsecond line ignored\n")
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "--password-file", str(secret))
    assert status == 0 and "2 messages" in out


def test_password_file_line_ends_only_at_a_line_feed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    password = "fuga\x0bfuga\x1c!"  # str.splitlines() would cut at both
    drop = fakeserver.Maildrop(password, fakeserver.RFC_MESSAGES)
    secret = tmp_path / "secret"
    secret.write_bytes(password.encode() + b"\r\nsecond line\n")
    with FakeServer("rfc", users={"hogehoge": drop}) as server:
        argv = [address(server), "hogehoge", "--password-file", str(secret), "--auth", "USER"]
        status, out, _ = run_cli(capsys, *argv)  # USER: SASLprep refuses control characters
    assert status == 0 and "3 messages" in out


def test_password_from_netrc(
    capsys: pytest.CaptureFixture[str], server: FakeServer, environment: Path
) -> None:
    netrc = environment / ".netrc"
    netrc.write_text(f"machine {server.host} login hogehoge password fugafuga\n")
    netrc.chmod(stat.S_IRUSR | stat.S_IWUSR)
    status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0 and "2 messages" in out


def test_no_password_without_a_terminal_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, _, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 2
    assert "POP3_PASSWORD" in err and "--password-file" in err and "netrc" in err
    assert server.transcripts == []  # nothing was even connected


def test_password_prompt_on_a_terminal(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    import getpass

    prompts = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return "fugafuga"

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0 and "2 messages" in out
    assert prompts == [f"Password for hogehoge on {address(server)}: "]

    def end_of_input(prompt: str = "") -> str:
        raise EOFError  # Ctrl-D at the prompt

    monkeypatch.setattr(getpass, "getpass", end_of_input)
    status, _, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 2 and err == "\npop3lite: no password entered\n"  # not after the prompt


def test_the_password_is_never_taken_from_argv(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    for argv in (["--password", "fugafuga"], ["--password=fugafuga"], ["--pass", "fugafuga"]):
        status, _, err = run_cli(capsys, address(server), "hogehoge", *argv)
        assert status == 2 and "never taken from the command line" in err
        assert "fugafuga" not in err  # the usage error does not echo it
    assert server.transcripts == []
    assert pop3lite.main(["--help"]) == 0
    options = [w for w in capsys.readouterr().out.split() if w.startswith("--pass")]
    assert options and set(options) == {"--password-file", "--password-command"}


@pytest.mark.usefixtures("password")
def test_apop_and_auth_and_oauth2(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "--apop")
    assert status == 0 and "Login:         APOP as hogehoge" in out
    logins = [c for c in server.sessions[-1].commands if c.startswith(("APOP", "USER", "PASS"))]
    assert len(logins) == 1 and logins[0].startswith("APOP hogehoge ")
    with FakeServer("rfc") as modern:
        status, out, _ = run_cli(capsys, address(modern), "hogehoge", "--auth", "plain")
        assert status == 0 and "PLAIN as hogehoge" in out
        token = tmp_path / "token"
        token.write_text("fake-oauth-token\n")
        status, out, _ = run_cli(
            capsys, address(modern), "hogehoge", "--oauth2-token-file", str(token), "--json"
        )
    assert status == 0 and json.loads(out)["auth"] == "OAUTHBEARER"


@pytest.mark.usefixtures("password")
def test_verbose_prints_the_transcript_without_the_password(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, _, err = run_cli(capsys, address(server), "hogehoge", "-v", "uidl")
    assert status == 0
    assert "C: USER hogehoge" in err and "C: PASS ****" in err and "S: +OK 2 10180" not in err
    assert "C: UIDL" in err and "fugafuga" not in err


# -- TLS --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("password")
def test_implicit_tls_with_a_private_ca(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with FakeServer("rfc", tls="implicit") as server:
        argv = [address(server), "hogehoge", "--tls", "implicit"]
        status, out, _ = run_cli(capsys, *argv, "--cafile", ca_file(tmp_path))
        assert status == 0
        assert "implicit TLS" in out and "certificate verified" in out and "DNS:localhost" in out
        status, _, err = run_cli(capsys, *argv)
        assert status == 4 and "--cafile" in err
        status, out, err = run_cli(capsys, *argv, "--insecure", "--json")
    assert status == 0 and "WARNING: --insecure" in err
    assert json.loads(out)["tls"]["verified"] is False


@pytest.mark.usefixtures("password")
def test_starttls_required_but_not_offered_says_what_to_do(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, _, err = run_cli(capsys, address(server), "hogehoge", "--tls", "starttls")
    assert status == 4 and "STLS" in err and "--tls none" in err and "tls='none'" not in err


@pytest.mark.usefixtures("password")
def test_stls_upgrade_on_a_modern_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with FakeServer("rfc", tls="stls") as server:
        argv = [address(server), "hogehoge", "--cafile", ca_file(tmp_path), "--json"]
        status, out, _ = run_cli(capsys, *argv)
    assert status == 0 and json.loads(out)["tls"]["version"].startswith("TLSv1.")
    assert server.sessions[-1].commands[:2] == ["CAPA", "STLS"]


# -- failures and exit codes -------------------------------------------------------------------


def test_bad_password_exits_3(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_PASSWORD", "wrong")
    status, _, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 3 and "login refused" in err and "Invalid user name or password" in err
    assert "wrong" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("password")
def test_refused_connection_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # bound but not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        status, _, err = run_cli(capsys, f"127.0.0.1:{port}", "hogehoge", "--timeout", "5")
    assert status == 4 and "cannot connect" in err and "-p PORT" in err


@pytest.mark.usefixtures("password")
def test_timeout_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer(faults=[Fault("delay", "GREETING", 0.6)]) as server:
        status, _, err = run_cli(capsys, address(server), "hogehoge", "--timeout", "0.2")
    assert status == 4 and "--timeout" in err


@pytest.mark.usefixtures("password")
def test_mailbox_in_use_exits_5(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer(faults=[Fault("in-use", "PASS")]) as server:
        status, _, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 5 and "in use" in err and "try again" in err


@pytest.mark.usefixtures("password")
def test_other_server_error_exits_6(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer(faults=[Fault("sys-perm", "STAT")]) as server:
        status, _, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 6 and "STAT" in err


@pytest.mark.usefixtures("password")
def test_ctrl_c_closes_without_quit_and_exits_130(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: pop3lite.POP3) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pop3lite.POP3, "stat", interrupted)
    status, _, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 130 and "no QUIT was sent" in err
    assert "QUIT" not in server.sessions[-1].commands


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["host", "user", "frobnicate"],
        ["host", "user", "retr"],
        ["host", "user", "retr", "0"],
        ["host", "user", "top", "1", "2", "3"],
        ["host", "user", "save"],
        ["host", "user", "capa", "extra"],
        ["host", "user", "--new"],
        ["host", "user", "retr", "1", "--json"],
        ["host:99999", "user"],
        ["host:110", "user", "-p", "995"],
        ["[::1", "user"],
        ["host", "user", "--auth", "NTLM"],
        ["host", "user", "--apop", "--auth", "PLAIN"],
        ["host", "user", "--auth", "XOAUTH2"],
        ["host", "user", "--insecure", "--tls", "none"],
        ["host", "user", "--timeout", "0"],
        ["host", "user", "--timeout", "inf"],
        ["host", "user", "retr", "\u00b2"],
        ["host:\uff11\uff11\uff10", "user"],
        ["--demo", "host"],
    ],
    ids=lambda argv: " ".join(argv) or "nothing",
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and "error:" in err and out == ""


def test_host_and_port_forms() -> None:
    split = pop3lite._split_host_port
    assert split("pop.example.com") == ("pop.example.com", None)
    assert split("pop.example.com:110") == ("pop.example.com", 110)
    assert split("[::1]:1110") == ("::1", 1110)
    assert split("[::1]") == ("::1", None)
    assert split("fe80::1") == ("fe80::1", None)


@pytest.mark.parametrize(
    ("error", "status", "hint"),
    [
        (pop3lite.TLSError("x does not offer STLS", reason="no-stls"), 4, "pop3s://HOST"),
        (pop3lite.TLSError("handshake failed", reason="not-tls"), 4, "--tls starttls"),
        (pop3lite.TLSError("not trusted", reason="certificate"), 4, "--cafile"),
        (pop3lite.TLSError("not trusted", reason="hostname"), 4, "the name the certificate"),
        (pop3lite.TLSError("no ssl module", reason="no-ssl"), 4, "built with ssl"),
        (pop3lite.NetworkError("cannot resolve 'x'", reason="resolve"), 4, "the host name"),
        (pop3lite.NetworkError("cannot connect", reason="connect"), 4, "HOST:PORT"),
        (pop3lite.Timeout("timed out reading", reason="read"), 4, "--timeout"),
        (pop3lite.InsecureError("refusing", "a PLAIN credential"), 4, "a PLAIN credential"),
        (pop3lite.InUseError("locked", "IN-USE"), 5, "other mail client"),
        (pop3lite.ServerError("no such message"), 6, "-ERR: no such message"),
        (pop3lite.ProtocolError("junk", b"\x00"), 6, "broke the protocol"),
    ],
    ids=lambda v: v if isinstance(v, (int, str)) else f"{type(v).__name__}-{v.reason}",
)
def test_each_error_class_and_reason_has_its_status_and_hint(
    error: pop3lite.Error, status: int, hint: str
) -> None:
    got_status, message = pop3lite._failure(error)
    assert (got_status, hint in message) == (status, True), message
    assert "tls='none'" not in message


def test_a_refusal_inside_the_sasl_exchange_is_not_called_a_server_err() -> None:
    mech = pop3lite.ScramSHA256Mechanism("user", "pencil")
    mech.initial_response()
    with pytest.raises(pop3lite.AuthenticationError) as caught:
        mech.respond(b"e=invalid-proof")
    status, message = pop3lite._failure(caught.value)
    assert status == 3
    assert "server said" not in message and "invalid-proof" in message


def test_error_messages_name_the_command_line_option() -> None:
    insecure = pop3lite.InsecureError(
        "refusing to send a password over an unencrypted connection to h; use TLS, or pass "
        "tls='none' to allow it"
    )
    status, message = pop3lite._failure(insecure)
    assert status == 4 and "--tls none" in message and "tls='none'" not in message
    assert pop3lite._failure(pop3lite.LoginDelayError("wait", "LOGIN-DELAY"))[0] == 5
    assert pop3lite._failure(pop3lite.TemporaryError("busy", "SYS/TEMP"))[0] == 5
    assert pop3lite._failure(pop3lite.ProtocolError("junk", b"\x00"))[0] == 6


def test_help_shows_examples_exit_codes_and_json_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert pop3lite.main(["--help"]) == 0
    out = capsys.readouterr().out
    shown = ("examples:", "--demo", "save ~/Maildir", "save --mda", "exit status:", "130")
    for text in (*shown, "subject"):
        assert text in out


# -- shell --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("password")
def test_shell_follows_the_seed_session(
    capsys: pytest.CaptureFixture[str],
    server: FakeServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(SEED_SESSION))
    log = tmp_path / "session.log"
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "shell", "--log", str(log))
    assert status == 0
    for text in (
        "+OK InterChange POP3 Server v3.62 Ready",
        "pop3> STAT\n+OK 2 10180\n",
        "pop3> LIST\n+OK 2 messages 10180 octets\n1 5954\n2 4226\n.\n",
        f"Subject: {CSC_SUBJECT}",
        "※クライアント企業からの広告です。以下に耳より情報があります※",
        "+OK 5954 octets",
        "┃@┃I┃T┃ 新着速報 (2002/1/19)",
        "pop3> DELE 1\n+OK message 1 deleted\n",
        "pop3> LIST\n+OK 1 messages (4226 octets)\n2 4226\n.\n",
        "pop3> RSET\n+OK Everything has been reset\n",
        "pop3> QUIT\n+OK InterChange POP3 Server Signing Off\n",
    ):
        assert text in out
    assert "\x1b" not in out
    assert server.sessions[-1].commands[-9:] == [line for line in SEED_SESSION.splitlines()]
    assert messages_left(server) == 2
    logged = log.read_text(encoding="utf-8")
    assert "pop3> TOP 2 5" in logged and "@ITの新着記事をお届けします。" in logged
    assert "fugafuga" not in logged


@pytest.mark.usefixtures("password")
def test_shell_refuses_login_commands_and_leaves_without_quit_at_eof(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = "PASS fugafuga\nhelp\nDELE 1\nLIST 9\n:raw\nTOP 2 0\nNOOP\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "shell")
    assert status == 0
    assert "(not sent: PASS is the login" in out
    assert "RETR N" in out  # the help
    assert "-ERR No such message" in out
    assert (
        "Subject: =?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI\n" in out
    )
    assert "Leaving without QUIT" in out
    sent = server.sessions[-1].commands
    assert "PASS ****" in sent[:3] and sent[-1] == "NOOP" and "QUIT" not in sent
    assert messages_left(server) == 2  # DELE 1 was never committed


# -- demo and import cost ----------------------------------------------------------------------


def test_demo_runs_the_check_against_the_fake_server(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "--demo")
    assert status == 0
    assert ATMARKIT_SUBJECT in out and CSC_SUBJECT in out and "2 messages, 10180 octets" in out
    assert "fake OperaMail server" in err and "fugafuga" not in out + err


def test_demo_shell(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("STAT\nQUIT\n"))
    status, out, _ = run_cli(capsys, "--demo", "shell")
    assert status == 0 and "+OK 2 10180" in out and "Signing Off" in out


def test_importing_pop3lite_does_not_import_the_command_line_modules() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"  # PyPy preloads unicodedata: count only what we add
        "import pop3lite\n"
        "heavy = {'argparse', 'getpass', 'json', 'mailbox', 'email', 'unicodedata', 'netrc'}\n"
        "print(sorted(heavy & (set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(os.path.abspath(pop3lite.__file__)),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "[]"


# -- issue 13: what a new user runs into --------------------------------------------------------


@pytest.fixture
def short_greeting_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that does not greet within 0.3 s is taken to expect TLS from the first byte."""
    monkeypatch.setattr(pop3lite, "_GREETING_WAIT", 0.3)


@pytest.mark.usefixtures("password", "short_greeting_wait")
def test_an_implicit_tls_port_without_tls_implicit_is_tried_with_implicit_tls(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with FakeServer("rfc", tls="implicit") as server:
        argv = [address(server), "hogehoge", "--timeout", "20"]
        status, out, err = run_cli(capsys, *argv, "--cafile", ca_file(tmp_path), "--json")
        assert status == 0, err
        assert "may expect TLS from the first byte" in err and "--tls implicit" in err
        assert json.loads(out)["tls"]["verified"] is True
        # A private CA: the first byte is TLS, so the hint is about the certificate.
        status, _, err = run_cli(capsys, *argv)
    assert status == 4 and "trying implicit TLS" in err and "--cafile" in err


@pytest.mark.usefixtures("password", "short_greeting_wait")
def test_a_plaintext_server_on_another_port_gets_no_implicit_tls(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, err = run_cli(capsys, address(server), "hogehoge", "--timeout", "20")
    assert status == 0 and "2 messages" in out
    assert "TLS" not in err  # it greeted at once: no probing said
    assert server.sessions[-1].commands[-1] == "QUIT"
    assert len(server.transcripts) == 1  # one connection: the short wait is on the session's


@pytest.mark.usefixtures("password", "short_greeting_wait")
def test_a_slow_plaintext_greeting_ends_with_the_hint_to_wait_for_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    slow = [Fault("delay", "GREETING", 0.6)]
    with FakeServer("rfc", tls="stls", faults=slow) as server:
        argv = [address(server), "hogehoge", "--timeout", "20", "--cafile", ca_file(tmp_path)]
        status, _, err = run_cli(capsys, *argv)
        assert status == 4 and "trying implicit TLS" in err
        assert "speaks plaintext" in err and "--tls starttls" in err
        status, out, err = run_cli(capsys, *argv, "--tls", "starttls")  # what the hint says
    assert status == 0 and "3 messages" in out and "TLS" not in err
    assert server.sessions[-1].commands[:2] == ["CAPA", "STLS"]


@pytest.mark.usefixtures("password")
def test_tls_hints_on_a_plaintext_only_port_do_not_go_in_a_circle(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, _, implicit = run_cli(capsys, address(server), "hogehoge", "--tls", "implicit")
    assert status == 4 and "--tls starttls" in implicit
    status, _, starttls = run_cli(capsys, address(server), "hogehoge", "--tls", "starttls")
    assert status == 4 and "STLS" in starttls
    assert "--tls implicit" not in starttls  # which would send the user back to the first
    assert "995" in starttls and "--tls none" in starttls


@pytest.mark.usefixtures("password")
def test_a_silent_server_hint_mentions_implicit_tls(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer(faults=[Fault("delay", "GREETING", 0.6)]) as server:
        status, _, err = run_cli(capsys, address(server), "hogehoge", "--timeout", "0.2")
    assert status == 4 and "--timeout" in err and "--tls implicit" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_password_is_asked_for_once_the_server_is_reached(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import getpass

    connected_at_prompt: list[int] = []

    def fake_getpass(prompt: str = "") -> str:
        connected_at_prompt.append(len(server.transcripts))
        return "fugafuga"

    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0 and "2 messages" in out
    assert connected_at_prompt and connected_at_prompt[0] >= 1
    with FakeServer("rfc", tls="implicit") as untrusted:  # a private CA, not passed
        status, _, err = run_cli(capsys, address(untrusted), "hogehoge", "--tls", "implicit")
    assert status == 4 and "not trusted" in err
    assert len(connected_at_prompt) == 1  # no password typed for a server never reached


def test_a_refused_login_says_where_the_password_came_from(
    capsys: pytest.CaptureFixture[str],
    server: FakeServer,
    monkeypatch: pytest.MonkeyPatch,
    environment: Path,
    tmp_path: Path,
) -> None:
    import getpass

    def refused(*argv: str) -> str:
        status, _, err = run_cli(capsys, address(server), "hogehoge", *argv)
        assert status == 3 and "login refused" in err and "bad-secret" not in err
        return err

    monkeypatch.setenv("POP3_PASSWORD", "bad-secret")
    assert "(the password came from $POP3_PASSWORD)" in refused()
    secret = tmp_path / "secret"
    secret.write_text("bad-secret\n")
    from_file = refused("--password-file", str(secret))
    assert f"(the password came from --password-file {secret})" in from_file
    monkeypatch.delenv("POP3_PASSWORD")
    netrc = environment / ".netrc"
    netrc.write_text(f"machine {server.host} login hogehoge password bad-secret\n")
    netrc.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert "(the password came from ~/.netrc)" in refused()
    netrc.unlink()
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "bad-secret")
    assert "(the password came from the prompt)" in refused()


@pytest.mark.usefixtures("password")
def test_several_messages_to_a_pipe_are_refused_before_connecting(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, err = run_cli(capsys, address(server), "hogehoge", "retr", "1", "2")
    assert status == 2 and out == ""
    assert "-o DIR" in err and "save FILE.mbox" in err
    assert server.transcripts == []
    assert pop3lite.main(["retr", "--help"]) == 0
    assert "to a pipe or file they are refused" in capsys.readouterr().out


@pytest.mark.usefixtures("password")
def test_auth_with_a_mechanism_the_server_does_not_offer_lists_the_offered_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeServer("rfc", capabilities=["USER", "SASL PLAIN LOGIN"]) as server:
        status, _, err = run_cli(capsys, address(server), "hogehoge", "--auth", "CRAM-MD5")
    assert status == 3 and "does not offer AUTH CRAM-MD5" in err and "SASL PLAIN LOGIN" in err
    assert not [c for c in server.sessions[-1].commands if c.startswith(("AUTH", "USER", "PASS"))]
    with FakeServer("rfc", capabilities=["USER"]) as server:
        status, _, err = run_cli(capsys, address(server), "hogehoge", "--auth", "PLAIN")
    assert status == 3 and "no SASL mechanism" in err and "USER/PASS" in err


@pytest.mark.usefixtures("password")
def test_auth_on_a_server_without_capa_suggests_user_pass(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeServer() as server:  # OperaMail: no CAPA, and -ERR for AUTH
        status, _, err = run_cli(capsys, address(server), "hogehoge", "--auth", "PLAIN")
    assert status == 3 and "does not answer CAPA" in err and "leave --auth out" in err
    assert "$POP3_PASSWORD" in err
    with FakeServer(faults=[Fault("drop", "AUTH", 0)]) as server:  # hangs up instead
        status, _, err = run_cli(capsys, address(server), "hogehoge", "--auth", "PLAIN")
    assert status == 4 and "closed" in err and "leave --auth out" in err


def test_a_password_saslprep_refuses_names_the_position_and_the_source(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("POP3_PASSWORD", "fugafuga\n")
    with FakeServer("rfc") as server:  # SCRAM-SHA-256: SASLprep applies
        status, _, err = run_cli(capsys, address(server), "hogehoge")
        assert status == 2 and "line feed (U+000A) at character 9 of 9" in err
        assert "$POP3_PASSWORD" in err and "trailing newline" in err
        assert "fugafuga" not in err
        secret = tmp_path / "secret"
        secret.write_text("fu\ue000ga\n", encoding="utf-8")  # a private-use character
        argv = [address(server), "hogehoge", "--password-file", str(secret)]
        status, _, err = run_cli(capsys, *argv)
        assert status == 2 and "(U+E000) at character 3 of 5" in err
        assert f"--password-file {secret}" in err and "trailing newline" not in err
    assert not [c for c in server.sessions[-1].commands if c.startswith(("AUTH", "PASS"))]


def test_host_forms_urls_and_user_at_host() -> None:
    def parsed(text: str) -> tuple[str | None, str, int | None, str]:
        server = pop3lite._Server(text)
        return server.user, server.host, server.port, server.scheme

    assert parsed("alice@pop.example.com") == ("alice", "pop.example.com", None, "")
    assert parsed("alice@example.com@pop.example.com:1110") == (
        "alice@example.com", "pop.example.com", 1110, ""
    )  # fmt: skip
    assert parsed("pop3s://pop.example.com") == (None, "pop.example.com", None, "pop3s")
    assert parsed("POP3://pop.example.com:1110/") == (None, "pop.example.com", 1110, "pop3")
    assert parsed("pop3s://alice%40example.com@[::1]:1995") == (
        "alice@example.com", "::1", 1995, "pop3s"
    )  # fmt: skip
    assert parsed("alice@[2001:db8::1]") == ("alice", "2001:db8::1", None, "")
    assert parsed("[::1]:110") == (None, "::1", 110, "")


def test_url_schemes_choose_the_port_and_the_tls_mode() -> None:
    def options(*argv: str) -> tuple[str, str, int | None, str]:
        o = pop3lite._parse_command_line(list(argv))
        return o.user, o.host, o.port, o.tls

    assert options("pop3://alice@host") == ("alice", "host", 110, "starttls")
    assert options("pop3://host", "alice", "-p", "1110") == ("alice", "host", 1110, "starttls")
    assert options("pop3://host", "alice", "--tls", "none") == ("alice", "host", 110, "none")
    assert options("pop3s://alice@host", "uidl") == ("alice", "host", None, "implicit")
    assert options("pop3s://host:1995", "alice") == ("alice", "host", 1995, "implicit")
    assert options("alice@host:1110", "check") == ("alice", "host", 1110, "auto")


@pytest.mark.parametrize(
    "argv",
    [
        ["pop3://alice:secret@host"],
        ["alice:secret@host"],
        ["pop3://host/1", "alice"],
        ["pop3s://host", "alice", "--tls", "starttls"],
        ["pop3://host", "alice", "--tls", "implicit"],
        ["alice@host", "bob"],
        ["@host"],
        ["alice@"],
        ["pop3s://"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_host_forms_that_are_refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and "error:" in err and out == "" and "secret" not in err


@pytest.mark.usefixtures("password")
def test_urls_and_user_at_host_reach_the_server(
    capsys: pytest.CaptureFixture[str], server: FakeServer, tmp_path: Path
) -> None:
    status, out, _ = run_cli(capsys, f"hogehoge@{address(server)}", "uidl")
    assert status == 0 and out.splitlines()[0] == "1 3C4B82C800000001"
    with FakeServer("rfc", tls="stls") as stls:  # pop3:// means STLS
        url = f"pop3://hogehoge@{address(stls)}"
        status, out, _ = run_cli(capsys, url, "--json", "--cafile", ca_file(tmp_path))
        assert status == 0 and json.loads(out)["user"] == "hogehoge"
        assert stls.sessions[-1].commands[:2] == ["CAPA", "STLS"]
    with FakeServer("rfc", tls="implicit") as secure:
        url = f"pop3s://{address(secure)}"
        status, out, err = run_cli(capsys, url, "hogehoge", "--cafile", ca_file(tmp_path), "--json")
    assert status == 0 and json.loads(out)["tls"]["verified"] is True
    assert "may expect TLS" not in err  # pop3s:// says implicit TLS: nothing to probe


def test_password_file_dash_reads_a_line_of_stdin(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("fugafuga\nSTAT\nQUIT\n"))
    status, out, _ = run_cli(capsys, address(server), "hogehoge", "--password-file", "-", "shell")
    assert status == 0
    assert "pop3> STAT\n+OK 2 10180\n" in out and "Signing Off" in out  # the rest: commands
    monkeypatch.setattr(sys, "stdin", _Terminal("fugafuga\n"))
    status, _, err = run_cli(capsys, address(server), "hogehoge", "--password-file", "-")
    assert status == 2 and "terminal" in err


def test_action_help_shows_that_actions_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, wanted in (
        (["retr", "--help"], "retr N [N...] [-o PATH]"),
        (["host", "alice", "save", "-h"], "--new"),
        (["--help", "shell"], "Ctrl-C cancels the line"),
    ):
        status, out, err = run_cli(capsys, *argv)
        assert status == 0 and err == ""
        assert out.startswith("usage: pop3lite HOST[:PORT] USER ") and wanted in out
        assert "exit status:" not in out  # not the whole --help


@pytest.mark.usefixtures("password")
def test_sizes_are_shown_in_human_units_beside_octets(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, _ = run_cli(capsys, address(server), "hogehoge")
    assert status == 0 and "2 messages, 10180 octets (9.9 KiB)" in out
    assert "5.8 KiB" in out.split("\n\n", 1)[1]  # the table
    assert pop3lite._size(21_076_378) == "21076378 octets (20.1 MiB)"
    assert pop3lite._size(1) == "1 octet" and pop3lite._size(1023) == "1023 octets"
    assert pop3lite._human_size(512) == "512 B" and pop3lite._human_size(3 << 30) == "3.0 GiB"


def test_message_rendering_keeps_dots_as_the_message_holds_them() -> None:
    lines = pop3lite._render_message(fakeserver.RFC_MESSAGES[1], wire=False)
    assert lines[-6:] == [".", "..", ".hidden", ". a dot and a space", "", "end"]
    wire = pop3lite._render_message(fakeserver.RFC_MESSAGES[1])  # the shell's view
    assert wire[-6:] == ["..", "...", "..hidden", ".. a dot and a space", "", "end"]


# -- text shown to people ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain", "plain"),
        ("tab\tkept", "tab\tkept"),
        ("esc\x1b[31m", "esc\\x1b[31m"),
        ("line\r\nforged", "line\\r\\nforged"),
        ("c1\x9b", "c1\\x9b"),
        ("rtl\u202eoverride", "rtl\\u202eoverride"),  # never \x202e: it reads as \x20 + "2e"
        ("mark\u061c", "mark\\u061c"),
        ("日本語", "日本語"),
    ],
)
def test_one_escape_for_everything_shown(text: str, shown: str) -> None:
    assert pop3lite.printable(text) == shown
    assert pop3lite.display_text(text.encode("utf-8")) == shown
    assert pop3lite._escaped(text.encode("ascii", "ignore")) == pop3lite.printable(
        text.encode("ascii", "ignore").decode("ascii")
    )


def test_raw_view_escapes_non_ascii_bytes() -> None:
    assert pop3lite._escaped(b"\x1b\xe6\x97\xa5\t.") == "\\x1b\\xe6\\x97\\xa5\t."


# -- the exit-status table ---------------------------------------------------------------------


def test_readme_exit_status_table_is_the_programs_table() -> None:
    readme = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.strip("|").split("|")
        for line in section.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    documented = [(int(code), meaning.strip()) for code, meaning in rows]
    expected = [(code, meaning) for code, _, meaning in pop3lite._EXIT_STATUSES]
    table = "\n".join(f"| {code} | {meaning} |" for code, meaning in expected)
    assert documented == expected, f"the README's exit-status table should read:\n{table}"


def test_help_and_failures_take_their_exit_statuses_from_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run_cli(capsys, "--help")
    out = " ".join(out.split())  # the meanings are wrapped to the width of the help
    assert status == 0
    for code, _, meaning in pop3lite._EXIT_STATUSES:
        assert f" {code} {meaning}" in out
    codes = {code for code, _, _ in pop3lite._EXIT_STATUSES}
    assert {status for _, _, status, _ in pop3lite._FAILURES} <= codes


# -- issue 19: the command line as a new user meets it ----------------------------------------


def netrc(home: Path, text: str) -> None:
    path = home / ".netrc"
    path.write_text(text)
    path.chmod(0o600)


@pytest.mark.usefixtures("password")
def test_an_action_word_after_a_url_is_never_the_user(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, err = run_cli(capsys, f"pop3://{address(server)}", "capa", "--tls", "none")
    assert status == 0, err
    sent = server.sessions[-1].commands
    assert "capa" not in err and not [c for c in sent if c.startswith("USER")]
    status, _, err = run_cli(capsys, address(server), "uidl")  # no netrc, no terminal to ask at
    assert status == 2 and "no user for 127.0.0.1" in err and "~/.netrc" in err
    assert len(server.transcripts) == 1  # refused before connecting


@pytest.mark.usefixtures("password")
def test_the_user_comes_from_netrc_when_the_url_has_none(
    capsys: pytest.CaptureFixture[str], server: FakeServer, environment: Path
) -> None:
    # $POP3_PASSWORD comes before ~/.netrc's password, which Python 3.7-3.10 require
    netrc(environment, f"machine {server.host} login hogehoge password unused\n")
    status, out, err = run_cli(capsys, address(server), "uidl")
    assert status == 0, err
    assert out.splitlines()[0] == "1 3C4B82C800000001"
    assert "USER hogehoge" in server.sessions[-1].commands


def test_the_user_and_password_both_come_from_netrc(
    capsys: pytest.CaptureFixture[str], server: FakeServer, environment: Path
) -> None:
    netrc(environment, f"machine {server.host} login hogehoge password fugafuga\n")
    status, out, err = run_cli(capsys, f"pop3://{address(server)}", "check", "--tls", "none")
    assert status == 0, err
    assert "USER/PASS as hogehoge" in out


@pytest.mark.usefixtures("password")
def test_the_user_is_asked_for_at_a_terminal_once_the_server_is_reached(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", _Terminal("hogehoge\n"))
    status, out, err = run_cli(capsys, address(server), "uidl")
    assert status == 0, err
    assert f"User on {address(server)}: " in err
    assert "USER hogehoge" in server.sessions[-1].commands


@pytest.mark.parametrize(
    "argv",
    [["pop://host", "alice"], ["imaps://alice@host"], ["pop://alice:secret@host"]],
    ids=lambda argv: " ".join(argv),
)
def test_an_unknown_url_scheme_is_named(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    status, out, err = run_cli(capsys, *argv)
    scheme = argv[0].split(":", 1)[0]
    assert status == 2 and f"unknown scheme {scheme}://" in err
    assert "pop3://" in err and "pop3s://" in err
    assert "password" not in err and "secret" not in err


@pytest.mark.usefixtures("password", "short_greeting_wait")
def test_pop3_url_means_stls_and_its_hint_names_pop3s(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeServer("rfc", tls="implicit") as server:
        url = f"pop3://hogehoge@{address(server)}"
        status, _, err = run_cli(capsys, url, "--timeout", "0.6")
    assert status == 4 and "trying implicit TLS" not in err  # explicit: no probing
    assert f"use pop3s://{address(server)}" in err


@pytest.mark.usefixtures("password")
def test_pop3s_url_on_a_plaintext_port_hints_pop3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with FakeServer("rfc", tls="stls") as server:
        url = f"pop3s://hogehoge@{address(server)}"
        status, _, err = run_cli(capsys, url, "--cafile", ca_file(tmp_path))
    assert status == 4 and "speaks plaintext" in err
    assert f"pop3://{address(server)} (STLS)" in err


@pytest.mark.usefixtures("password")
def test_a_short_timeout_still_probes_for_implicit_tls(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pop3lite, "_GREETING_WAIT", 5.0)  # longer than --timeout
    with FakeServer("rfc", tls="implicit") as server:
        argv = [address(server), "hogehoge", "--timeout", "0.4", "--cafile", ca_file(tmp_path)]
        status, out, err = run_cli(capsys, *argv, "--json")
    assert status == 0, err
    assert "within 0.4s" in err and "trying implicit TLS" in err
    assert json.loads(out)["tls"]["verified"] is True


@pytest.mark.parametrize(
    "action", [["check", "--limit", "0"], ["uidl"], ["retr", "1"], ["--json"]], ids=" ".join
)
def test_a_closed_pipe_ends_every_action_quietly_with_141(
    action: list[str], environment: Path
) -> None:
    message = b"Subject: many\r\n\r\n" + b"a line of the message body\r\n" * 20_000
    many = fakeserver.Maildrop("fugafuga", [message] + [b"Subject: s\r\n\r\nx\r\n"] * 3000)
    env = {**os.environ, "HOME": str(environment), "POP3_PASSWORD": "fugafuga"}
    with FakeServer("rfc", users={"hogehoge": many}) as server:
        argv = [address(server), "hogehoge", "--tls", "none", *action]
        with subprocess.Popen(
            [sys.executable, pop3lite.__file__, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        ) as child:
            assert child.stdout is not None and child.stderr is not None
            assert child.stdout.read(100)  # like `| head -c 100`, then the reader is gone
            child.stdout.close()
            err = child.stderr.read()
            status = child.wait(timeout=60)
    assert status == 141 and err == b""
    assert len(many.messages) == 3001


@pytest.mark.usefixtures("password")
def test_quiet_check_keeps_its_table_and_json(
    capsys: pytest.CaptureFixture[str], server: FakeServer
) -> None:
    status, out, err = run_cli(capsys, address(server), "hogehoge", "-q")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("#") and "Subject" in lines[0] and len(lines) == 3
    assert ATMARKIT_SUBJECT in out and "Server:" not in out and "Greeting:" not in out
    status, out, err = run_cli(capsys, address(server), "hogehoge", "-q", "--json")
    assert status == 0 and json.loads(out)["count"] == 2


def test_save_help_lists_max_size_and_speaks_of_the_journal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run_cli(capsys, "save", "--help")
    assert status == 0 and "--max-size SIZE" in out and "--new" in out and "--delete" in out
    assert "state file" not in out and "journal" in out


def test_the_version_tells_this_release_from_the_old_state_file_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0 and out.strip() == f"pop3lite {pop3lite.__version__}"
    readme = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
    assert "A state file of pop3lite 0.1" in readme  # the old format, named by its release
    assert not pop3lite.__version__.startswith("0.1")
    pyproject = (Path(__file__).resolve().parent / "pyproject.toml").read_text(encoding="utf-8")
    assert f'version = "{pop3lite.__version__}"' in pyproject


@pytest.mark.usefixtures("password")
def test_verbose_shows_capa_and_listings_line_by_line_but_not_bodies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeServer("rfc") as server:
        argv = [address(server), "hogehoge", "--tls", "none", "-v"]
        status, _, err = run_cli(capsys, *argv, "uidl")
        assert status == 0, err
        lines = err.splitlines()
        assert "S: PIPELINING" in lines and "S: IMPLEMENTATION fakeserver" in lines
        uids = server.maildrops["hogehoge"].uids
        assert f"S: 1 {uids[0]}" in lines and "S: ." in lines
        assert "fugafuga" not in err
        status, out, err = run_cli(capsys, *argv, "retr", "1")
    assert status == 0
    assert "S: <" in err and "octets, then .>" in err  # a message body stays summarised
    assert out.splitlines()[0] not in err.splitlines()


def test_a_stored_password_that_is_refused_is_not_asked_again(
    capsys: pytest.CaptureFixture[str], server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_PASSWORD", "wrong")
    monkeypatch.setattr(sys, "stdin", _Terminal("fugafuga\n"))  # a terminal to ask at
    status, _, err = run_cli(capsys, address(server), "hogehoge")
    assert status == 3 and "$POP3_PASSWORD" in err and "try again" not in err
    assert len([c for c in server.sessions[-1].commands if c.startswith("PASS")]) == 1


# -- replies without text (popa3d, tools/interop.sh) ---------------------------------------------

# popa3d 1.0.3 answers "+OK" and "-ERR" with nothing after them.
_POPA3D_SESSION = """\
S: +OK
C: CAPA
S: -ERR
C: USER hogehoge
S: +OK
C: PASS ****
S: +OK
C: STAT
S: +OK 0 0
C: TOP 9 0
S: -ERR
C: QUIT
S: +OK
"""


@pytest.mark.parametrize(("action", "typed"), [("check", ""), ("shell", "UTF8\nTOP 9 0\nQUIT\n")])
def test_command_line_shows_replies_without_text_as_sent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, action: str, typed: str
) -> None:
    # The shell showed "+OK " and "-ERR " where popa3d sent "+OK" and "-ERR", and answered
    # UTF8 with "use utf8() for UTF8, not command()", a library hint.
    monkeypatch.setenv("POP3_PASSWORD", "fugafuga")
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    recording = fakeserver.parse_transcript(_POPA3D_SESSION)
    with fakeserver.FakeServer(replay=recording) as server:
        argv = [f"{server.host}:{server.port}", "hogehoge", action, "--tls", "none"]
        assert pop3lite.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.endswith(" ")] == []
    if action == "shell":
        assert lines.count("+OK") == 2 and "-ERR" in lines
        assert "(not sent: UTF8 is only allowed before login (RFC 6856 section 2))" in lines
    else:
        assert "Greeting:      +OK" in lines
