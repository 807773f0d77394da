"""Tests of fakeserver.py: the seed replay, RFC 1939 behaviour, SASL, TLS, faults, command line.

Clients here are a raw socket (`Raw`) and CPython's poplib, never pop3lite: the fake server must be
right on its own. Every socket has a timeout; nothing sleeps to wait for a server.
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import base64
import email
import email.policy
import re
import socket
from pathlib import Path

import pytest

import fakeserver
from fakeserver import FakeServer

TIMEOUT = 5.0
HERE = Path(__file__).resolve().parent


class Raw:
    """A raw-socket POP3 client: send lines, read lines, nothing else."""

    def __init__(self, server: FakeServer, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(server.address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

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
        lines = []
        for _ in range(100000):
            line = self.line()
            assert line != b"<EOF>"
            if line == b".":
                return lines
            lines.append(line)
        raise AssertionError("no terminator")

    def eof(self) -> bool:
        return self.file.read(1) == b""


def unstuff(lines: list[bytes]) -> bytes:
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


# ==================================================================================================
# The seed: the OperaMail session exactly as the web page shows it
# ==================================================================================================

SEED_GREETING = (
    "+OK InterChange POP3 Server v3.62 Ready (X-INF-V1) <1BC07518.3C649B3F@operamail.com>"
)
SEED_TOP_2_5 = """\
+OK
Received: from platz.jp [210.143.104.205] (adv@csc.ne.jp) by operamail.com; Mon, 21 Jan 2002 02:45:53 -0500
Received: from adv (h133-191.tokyu-net.catv.ne.jp [210.149.133.191])
    by platz.jp (8.9.3/3.7Wpl201012312) with SMTP id QAA05582
    for <muller@operamail.com>; Mon, 21 Jan 2002 16:44:50 +0900
Date: Mon, 21 Jan 2002 16:44:50 +0900
Message-Id: <200201210744.QAA05582@platz.jp>
From: =?ISO-2022-JP?B?Q3liZXIgU3BhY2UgQ29tbXVuaXR5?=<adv@csc.ne.jp>
To: muller@operamail.com
Subject: =?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI
+?=
X-Mailer: Personal_ML11F
Reply-To: adv@csc.ne.jp
Mime-Version: 1.0
Content-Type: text/plain; charset=iso-2022-jp
■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□
Cyber Space Community <CSCからのお知らせ> powered by RAT Co.,Ltd.
■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□
※クライアント企業からの広告です。以下に耳より情報があります※
."""  # noqa: E501 (the seed's lines, verbatim)
SEED_RETR_1 = """\
+OK 5954 octets
Received: from www2.csc.ne.jp [203.141.151.50] (atmarkit-news-admin@atmarkit.co.jp) by operamail.com; Sun, 20 Jan 2002 21:51:20 -0500
Received: from atmarkit-www.atmarkit.co.jp (atmarkit-www.atmarkit.co.jp [211.4.251.193])
    by www2.csc.ne.jp (8.11.1/8.11.1) with ESMTP id g0L2ou432332
    for <muller@csc.jp>; Mon, 21 Jan 2002 11:50:56 +0900 (JST)
    (envelope-from atmarkit-news-admin@atmarkit.co.jp)
Received: from atmarkit-www.atmarkit.co.jp (IDENT:root@atmarkit-www.atmarkit.co.jp [211.4.251.193])
    by atmarkit-www.atmarkit.co.jp (8.9.3/8.9.3) with ESMTP id HAA21689
    for <muller@csc.jp>; Mon, 21 Jan 2002 07:26:05 +0900
Message-ID: <-2034930363.1011565565483.JavaMail.root@atmarkit-www.atmarkit.co.jp
>
Date: Mon, 21 Jan 2002 07:26:05 +0900 (JST)
From: membership@atmarkit.co.jp
To: muller@csc.jp
Subject: =?iso-2022-jp?B?GyRCIXcbKEJJVBskQj83Q2VCLkpzGyhCIC0gMjA=?=
=?iso-2022-jp?B?MDIvMS8xORskQiEhGyhCMUZEIA==?=
=?iso-2022-jp?B?TGludXgbJEIkRzpuJGs5YjUhRz0laxsoQg==?=
=?iso-2022-jp?B?GyRCITwlPxsoQiAbJEIhTiUkJXMlOSVIITwla0pUIU8bKEI=?=
Mime-Version: 1.0
Content-Type: text/plain; charset=iso-2022-jp
Content-Transfer-Encoding: 7bit
┏━┳━┳━┓
┃@┃I┃T┃ 新着速報 (2002/1/19)
┗━┻━┻━┛
@ITの新着記事をお届けします。
(以下省略)
."""  # noqa: E501 (the seed's lines, verbatim)
SEED_SESSION = [
    ("USER hogehoge", "+OK User hogehoge accepted, send PASS command for password validation"),
    ("PASS fugafuga", "+OK Password accepted"),
    ("STAT", "+OK 2 10180"),
    ("LIST", "+OK 2 messages 10180 octets\n1 5954\n2 4226\n."),
    ("TOP 2 5", SEED_TOP_2_5),
    ("RETR 1", SEED_RETR_1),
    ("DELE 1", "+OK message 1 deleted"),
    ("LIST", "+OK 1 messages (4226 octets)\n2 4226\n."),
    ("RSET", "+OK Everything has been reset"),
    ("LIST", "+OK 2 messages 10180 octets\n1 5954\n2 4226\n."),
    ("QUIT", "+OK InterChange POP3 Server Signing Off"),
]
# What the web page did to the lines it showed: JIS decoded for display, blank lines dropped, and
# the single space of folded header lines lost (the server restores it; the 4-space folds survived).
# "(以下省略)" is the page author's "(rest omitted)": from there on the page shows only the ".".
OMITTED = "(以下省略)"


def as_the_page_shows(line: bytes) -> str | None:
    text = line.decode("iso2022_jp")
    if not text:
        return None
    return text[1:] if re.match(r" \S", text) else text


def test_seed_replay_over_a_raw_socket() -> None:
    with FakeServer() as server, Raw(server) as client:
        assert client.line().decode() == SEED_GREETING
        for command, shown in SEED_SESSION:
            expected = shown.split("\n")
            status = client.cmd(command)
            assert status == expected[0], command
            if len(expected) == 1:
                continue
            body = client.body()
            page = [text for text in map(as_the_page_shows, body) if text is not None]
            if OMITTED in expected:
                cut = expected.index(OMITTED)
                assert page[: cut - 1] == expected[1:cut], command
                assert len(unstuff(body)) == int(status.split()[1])
            else:
                assert page == expected[1:-1], command
        assert client.eof()
    assert server.transcripts[0][0] == "S: " + SEED_GREETING
    assert "C: PASS ****" in server.transcripts[0]
    assert "fugafuga" not in "\n".join(server.transcripts[0])


def test_seed_top_2_5_is_the_header_and_five_body_lines() -> None:
    with FakeServer() as server, Raw(server) as client:
        client.line()
        client.cmd("USER hogehoge")
        client.cmd("PASS fugafuga")
        assert client.cmd("TOP 2 5") == "+OK"
        lines = client.body()
    blank = lines.index(b"")
    assert len(lines) == blank + 1 + 5
    # The page dropped one blank body line: the fifth, after the ad's four-line banner.
    assert lines[-1] == b""
    assert [line.decode("iso2022_jp") for line in lines[blank + 1 : -1]] == SEED_TOP_2_5.split(
        "\n"
    )[-5:-1]


@pytest.mark.parametrize("index, size", [(0, 5954), (1, 4226)])
def test_operamail_messages_are_exact_valid_iso_2022_jp(index: int, size: int) -> None:
    data = fakeserver.OPERAMAIL_MESSAGES[index]
    assert len(data) == size
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert all(byte < 0x80 for byte in data)  # 7bit, as the headers say
    for line in data.split(b"\r\n"):
        assert len(line) <= 998
        text = line.decode("iso2022_jp")
        assert text.encode("iso2022_jp") == line  # each line returns to ASCII
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    assert not message.defects
    assert message.get_content_charset() == "iso-2022-jp"
    assert message.get_payload(decode=True).decode("iso2022_jp").startswith(
        ("┏━┳━┳━┓\n", "■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□\n")[index].replace("\n", "\r\n")
    )


def test_operamail_subjects() -> None:
    first, second = fakeserver.OPERAMAIL_MESSAGES
    subject = email.message_from_bytes(first, policy=email.policy.default)["Subject"]
    assert subject == "＠IT新着速報 - 2002/1/19\u30001FD Linuxで作る高機能ルータ ［インストール編］"
    raw = email.message_from_bytes(second, policy=email.policy.compat32)["Subject"]
    assert raw.startswith("=?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI")
    # Shift_JIS bytes under an ISO-2022-JP label, folded inside the encoded word: kept on purpose.
    payload = raw.split("?")[3].replace("\r\n ", "").replace(" ", "")
    decoded = base64.b64decode(payload).decode("shift_jis")
    assert decoded == "「ＣＳＣからの耳よりなお知らせ」<出会い編>"
