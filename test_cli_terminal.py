"""The command line on a pseudo-terminal (issue 13): what a person at a terminal sees.

pop3lite.py runs as a child process whose controlling terminal is a pty (pty.fork), so
isatty(), getpass, readline and Ctrl-C behave as they do for a user. Every wait is bounded.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest

import fakeserver
from conftest import address
from fakeserver import FakeServer, Maildrop

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")

POP3LITE = str(Path(__file__).resolve().parent / "pop3lite.py")
WAIT = 20.0  # seconds to wait for expected output before the test fails


class Terminal:
    """pop3lite.py started on a pty: type into it and read what it shows."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        with warnings.catch_warnings():  # fork() with the fake server's threads running
            warnings.simplefilter("ignore", DeprecationWarning)
            pid, fd = _fork_on_pty()
        if pid == 0:  # the child: nothing but exec, whatever the threads held
            try:
                os.execve(sys.executable, [sys.executable, POP3LITE, *argv], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.output = b""
        self.status: int | None = None

    def read_until(self, wanted: bytes) -> bytes:
        """Everything shown up to and including ``wanted``; fails after WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while wanted not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{wanted!r} not shown; the terminal shows {self.output!r}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child has gone and the pty is closed
                    chunk = b""
                assert chunk, f"{wanted!r} not shown before the end: {self.output!r}"
                self.output += chunk
        shown, _, self.output = self.output.partition(wanted)
        return shown + wanted

    def type(self, text: bytes) -> None:
        os.write(self.fd, text)

    def wait(self) -> tuple[int, bytes]:
        """The exit status and the rest of the output."""
        rest = b""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                rest += chunk
                if chunk:
                    continue
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                # os.waitstatus_to_exitcode() is Python 3.9+
                if os.WIFSIGNALED(status):
                    self.status = -os.WTERMSIG(status)
                else:
                    self.status = os.WEXITSTATUS(status)
                return self.status, self.output + rest
        raise AssertionError(f"pop3lite did not end; the terminal shows {self.output + rest!r}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
        os.close(self.fd)


def _fork_on_pty() -> tuple[int, int]:
    import pty

    return pty.fork()


@pytest.fixture
def terminal_env(home: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TERM": "dumb",  # readline draws no escape sequences
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "COLUMNS": "200",
    }


Spawn = Callable[..., Terminal]


@pytest.fixture
def spawn(terminal_env: dict[str, str]) -> Iterator[Spawn]:
    started: list[Terminal] = []

    def start(*argv: str, password: str | None = "fugafuga") -> Terminal:
        env = dict(terminal_env)
        if password is not None:
            env["POP3_PASSWORD"] = password
        terminal = Terminal(list(argv), env)
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def test_retr_on_a_terminal_shows_lines_starting_with_a_dot_as_they_are(spawn: Spawn) -> None:
    with FakeServer("rfc") as server:
        terminal = spawn(address(server), "hogehoge", "retr", "1", "2")  # several: fine here
        status, shown = terminal.wait()
    assert status == 0, shown
    lines = shown.decode().split("\r\n")
    assert "--- message 2: 261 octets ---" in lines
    body = lines[lines.index("The next lines start with a dot and must survive dot-stuffing:") :]
    assert body[1:5] == [".", "..", ".hidden", ". a dot and a space"]


def test_shell_ctrl_c_at_the_prompt_cancels_the_line_not_the_session(spawn: Spawn) -> None:
    with FakeServer("rfc") as server:
        terminal = spawn(address(server), "hogehoge", "shell")
        terminal.read_until(b"pop3> ")
        terminal.type(b"DELE 1")
        terminal.read_until(b"DELE 1")
        # Ctrl-C: the line discipline sends SIGINT. Then Enter: CPython's readline notices a
        # signal only while it waits in select(), so one that lands while it is still echoing
        # waits for the line to end, and then cancels that line all the same.
        terminal.type(b"\x03")
        terminal.type(b"\r")
        terminal.read_until(b"line cancelled")
        terminal.read_until(b"pop3> ")
        terminal.type(b"STAT\r")
        terminal.read_until(b"+OK 3 ")  # the session goes on
        terminal.type(b"QUIT\r")
        status, _ = terminal.wait()
    assert status == 0
    assert server.sessions[-1].commands[-2:] == ["STAT", "QUIT"]
    assert not [c for c in server.sessions[-1].commands if c.startswith("DELE")]
    assert len(server.maildrops["hogehoge"].messages) == 3


def test_shell_asks_before_printing_a_large_message_on_a_terminal(spawn: Spawn) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    big += b"".join(b"line %07d of a large message\r\n" % n for n in range(50_000))
    drop = Maildrop("fugafuga", [big, fakeserver.RFC_MESSAGES[0]])
    with FakeServer("rfc", users={"hogehoge": drop}) as server:
        terminal = spawn(address(server), "hogehoge", "shell")
        terminal.read_until(b"pop3> ")
        terminal.type(b"RETR 1\r")
        question = terminal.read_until(b"[y/N] ")
        assert b"Print " in question and b"MiB" in question and b"line 0000001" not in question
        terminal.type(b"n\r")
        declined = terminal.read_until(b"pop3> ")
        assert b"(not shown: " in declined and b"line 0000001" not in declined
        terminal.type(b"RETR 2\r")  # small: shown without a question
        small = terminal.read_until(b"pop3> ")
        assert b"this is the first test message." in small and b"[y/N]" not in small
        terminal.type(b"QUIT\r")
        status, _ = terminal.wait()
    assert status == 0
    assert server.sessions[-1].commands[-3:] == ["RETR 1", "RETR 2", "QUIT"]


def test_retr_asks_before_printing_a_large_message_on_a_terminal(spawn: Spawn) -> None:
    lines = b"".join(b"line %07d of a large message\r\n" % n for n in range(50_000))
    big = b"Subject: big\r\n\r\n" + lines  # 1650016 octets
    drop = Maildrop("fugafuga", [big, fakeserver.RFC_MESSAGES[0]])
    with FakeServer("rfc", users={"hogehoge": drop}) as server:
        terminal = spawn(address(server), "hogehoge", "retr", "1", "2")
        question = terminal.read_until(b"[y/N] ")
        assert b"Print 1650016 octets (1.6 MiB) on the terminal?" in question  # as the shell
        assert b"line 0000001" not in question
        terminal.type(b"n\r")
        status, shown = terminal.wait()
    assert status == 0, shown
    assert b"(message 1 not shown: 1650016 octets (1.6 MiB))" in shown
    assert b"line 0000001" not in shown and b"this is the first test message." in shown
    assert server.sessions[-1].commands[-1] == "QUIT" and len(drop.messages) == 2


def test_the_password_prompt_comes_once_the_server_is_reached(spawn: Spawn) -> None:
    with FakeServer("rfc", tls="implicit") as untrusted:  # its private CA is not given
        terminal = spawn(address(untrusted), "hogehoge", "--tls", "implicit", password=None)
        status, shown = terminal.wait()
    assert status == 4 and b"not trusted" in shown and b"Password" not in shown
    with FakeServer("rfc") as server:
        terminal = spawn(address(server), "hogehoge", password=None)
        terminal.read_until(b"Password for hogehoge on ")
        assert server.transcripts  # connected before asking
        terminal.type(b"wrong\r")
        for _ in range(2):  # asked again after a refusal: three tries in all, as ssh gives
            terminal.read_until(b"login refused")
            terminal.read_until(b"Password for hogehoge on ")
            terminal.type(b"wrong\r")
        status, shown = terminal.wait()
    assert status == 3 and b"(the password came from the prompt)" in shown
    assert b"wrong" not in shown  # not echoed
    assert len(server.transcripts) == 1  # all three on the one connection


def test_a_mistyped_password_is_asked_for_again(spawn: Spawn) -> None:
    with FakeServer("rfc") as server:
        terminal = spawn(address(server), "hogehoge", "uidl", password=None)
        terminal.read_until(b"Password for hogehoge on ")
        terminal.type(b"wrong\r")
        refused = terminal.read_until(b"Password for hogehoge on ")
        assert b"login refused" in refused and b"try again (1 of 3 tries)" in refused
        terminal.type(b"fugafuga\r")
        status, shown = terminal.wait()
    assert status == 0, shown
    assert b"1 " in shown and b"wrong" not in shown and b"fugafuga" not in shown
    assert server.sessions[-1].commands[-1] == "QUIT"


def test_a_password_command_can_ask_on_the_terminal(spawn: Spawn) -> None:
    # As `pass` or gpg with a terminal pinentry: the command asks on /dev/tty, which it can
    # open only while it keeps our controlling terminal (no session of its own there).
    ask = "printf 'PIN? ' >/dev/tty && read -r pin </dev/tty && echo \"$pin\""
    with FakeServer("rfc") as server:
        terminal = spawn(address(server), "hogehoge", "uidl", "--password-command", ask,
                         password=None)
        terminal.read_until(b"PIN? ")
        terminal.type(b"fugafuga\r")
        status, shown = terminal.wait()
    assert status == 0, shown
    assert server.sessions[-1].user == "hogehoge" and server.sessions[-1].quit
